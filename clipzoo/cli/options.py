"""What every leaf command shares: the error-to-one-line group, ``--zoo`` / ``--json`` options,
printing, and expanding image arguments."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from clipzoo.errors import ClipzooError

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
            raise ClipzooError(f"no such image or directory: {p}")
    if not out:
        raise ClipzooError("no images found in the given paths")
    return out


zoo_option = click.option("--zoo", "zoo_dir", required=True, type=click.Path(file_okay=False), help="Zoo directory.")
def _quiet_for_json(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:  # stdout carries one JSON document: no progress bars on stderr either
        from clipzoo.runtime import disable_progress_bars

        disable_progress_bars()
    return value


json_option = click.option("--json", "as_json", is_flag=True, callback=_quiet_for_json,
                           help="Print one JSON document (no progress bars).")
