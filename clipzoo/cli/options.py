"""What every leaf command shares: the error-to-one-line group, ``--zoo`` / ``--json`` options,
printing, and expanding image arguments."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable

import click

from clipzoo.errors import ClipzooError, ConfigError, DataError, RegistryError


class OneLineErrors(click.Group):
    """Turns any ClipzooError into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ClipzooError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)


def emit(obj, as_json: bool, text: str | None = None) -> None:
    """Print ``obj`` as one JSON document, or ``text`` for a person."""
    click.echo(json.dumps(obj, indent=2) if as_json else (text if text is not None else str(obj)))


def expand_images(paths: tuple[str, ...]) -> list[Path]:
    """Image files named, and those found under named folders (sorted)."""
    from clipzoo.tasks.data import IMAGE_EXTS

    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"no such image or directory: {p}")
    if not out:
        raise DataError("no images found in the given paths: name image files, or folders of them")
    return out


# ----- validation before any heavy import: click callbacks raising one-line ClipzooErrors -----------
def _opt(param: click.Parameter) -> str:
    return param.opts[0] if param.opts else param.name or "value"


def _zoo_exists(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from clipzoo.zoo.registry import REGISTRY

    if value is not None and not (Path(value) / REGISTRY).is_file():
        raise RegistryError(f"no zoo at {value}: {REGISTRY} missing "
                            f"(create one with 'clipzoo init --zoo {value}')")
    return value


def _zoo_new(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from clipzoo.zoo.registry import REGISTRY

    if value is not None and (Path(value) / REGISTRY).exists():
        raise RegistryError(f"a zoo already exists at {value}: open it, or choose another --zoo")
    return value


def check_data(spec: str) -> str:
    """An ImageFolder DIR that exists, or ``builtin:<domain>`` with a known domain (cheap: no torch)."""
    from clipzoo.tasks.data import BUILTIN_PREFIX, builtin_domains

    if spec.startswith(BUILTIN_PREFIX):
        if spec[len(BUILTIN_PREFIX):] not in builtin_domains():
            raise DataError(f"unknown built-in domain {spec[len(BUILTIN_PREFIX):]!r}: choose one of "
                            f"{', '.join(builtin_domains())}")
    elif not Path(spec).is_dir():
        raise DataError(f"data directory not found: {spec} (expected {spec}/train/<class>/*.png)")
    return spec


def data_callback(ctx: click.Context, param: click.Parameter, value):
    """Click callback: every given data spec (one, or a tuple of them) passes :func:`check_data`."""
    for v in (value if isinstance(value, tuple) else () if value is None else (value,)):
        check_data(v)
    return value


def existing_file(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Click callback: a file that exists (None passes)."""
    if value is not None and not Path(value).is_file():
        raise ConfigError(f"{_opt(param)} {value}: no such file")
    return value


def number(low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Callable:
    """Click callback: a finite number in [low, high] (``*_open``: the bound excluded); None passes."""
    def check(ctx: click.Context, param: click.Parameter, value):
        if value is None:
            return value
        bad = not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) or (
            high is not None and (value >= high if high_open else value > high))
        if bad:
            if low is not None and high is not None:
                rng = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            else:
                rng = f"{'>' if low_open else '>='} {low:g}" if low is not None else f"{'<' if high_open else '<='} {high:g}"
            raise ConfigError(f"bad {_opt(param)} {value!r}: {(param.name or 'value').replace('_', '-')} must be {rng}")
        return value
    return check


positive = number(0, low_open=True)
at_least_one = number(1)
non_negative = number(0)
fraction = number(0, 1, low_open=True, high_open=True)

zoo_option = click.option("--zoo", "zoo_dir", required=True, type=click.Path(file_okay=False), help="Zoo directory.")
# for commands that open a zoo (checked before any model is loaded), and for init:
existing_zoo_option = click.option("--zoo", "zoo_dir", required=True, type=click.Path(file_okay=False),
                                   callback=_zoo_exists, help="Zoo directory (with its registry.json).")
new_zoo_option = click.option("--zoo", "zoo_dir", required=True, type=click.Path(file_okay=False),
                              callback=_zoo_new, help="Zoo directory (new or empty).")


def _quiet_for_json(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:  # stdout carries one JSON document: no progress bars on stderr either
        from clipzoo.runtime import disable_progress_bars

        disable_progress_bars()
    return value


json_option = click.option("--json", "as_json", is_flag=True, callback=_quiet_for_json,
                           help="Print one JSON document (no progress bars).")
