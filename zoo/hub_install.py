"""The last steps of :func:`clipzoo.zoo.hub.pull`: validate what was downloaded, then install it
in one transaction.

:func:`check_loadable` loads every staged expert exactly as the store would (config, weights on
the backbone, stats; a fusion expert over its sources) and the remote's router when it is taken,
so content that fails validation is refused while the zoo is still untouched. :func:`install`
then moves folders in (replaced ones into ``.trash/``), stages the new router version and writes
the registry; on any failure it puts everything back, so the zoo is byte-identical.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from clipzoo.errors import BackboneError, ClipzooError, IntegrityError
from clipzoo.router.stats import TaskStats
from clipzoo.zoo import leases, registry
from clipzoo.zoo.paths import contained, fsync_path, remove_path
from clipzoo.zoo.store import Store


def verify_staged(folder: Path, wanted: dict[str, str], fingerprint: str) -> None:
    """Every wanted file is a regular file (its size and sha256 were checked while it was downloaded);
    expert configs name the right backbone."""
    for path in wanted:
        file = folder / path
        if file.is_symlink() or not file.is_file():
            raise IntegrityError(f"{path} was not downloaded")
        if file.name == "config.json":
            try:
                cfg = json.loads(file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise IntegrityError(f"{path} from the remote is not valid JSON") from e
            if cfg.get("backbone_fingerprint", fingerprint) != fingerprint:
                raise BackboneError(f"{path} from the remote names another backbone than its registry")


def check_loadable(files: Path, remote: dict, fetch: list[str], local: Store | None, take_router: bool,
                   where: str) -> None:
    """Load each staged expert of ``fetch`` (and the remote router when ``take_router``) as the
    store would; raise IntegrityError naming the expert when one cannot be loaded."""
    from clipzoo.zoo.backbone import BackboneSpec, load_backbone
    from clipzoo.zoo.experts import Sources, load_expert
    from clipzoo.zoo.router_files import load_router

    if not fetch:
        return
    if local is not None:
        bb = local.backbone
    else:
        bb = load_backbone(BackboneSpec.from_dict(remote["backbone"]))
        if bb.fingerprint != remote["backbone"]["fingerprint"]:
            raise BackboneError(f"{where} names backbone {remote['backbone']['model']} with another fingerprint "
                                "than the one loaded here: refused")
    loaded: dict = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = (load_expert(contained(files, f"{registry.EXPERTS_DIR}/{name}"), bb, sources)
                            if name in fetch else local.expert(name))
        return loaded[name]

    def sha(name: str) -> str:
        return remote["experts"][name]["sha256"] if name in fetch else local.record(name)["sha256"]

    sources = Sources(list(dict.fromkeys([*(local.names if local else []), *fetch])), get, sha)
    for name in fetch:
        try:
            get(name)
            TaskStats.load(contained(files, f"{registry.EXPERTS_DIR}/{name}"))
        except ClipzooError as e:
            raise IntegrityError(f"refusing expert {name!r} from {where}: it cannot be loaded ({e})") from e
    if take_router and remote.get("router", {}).get("files"):
        try:
            load_router(files, remote["router"], list(remote["experts"]),
                        lambda n: TaskStats.load(contained(files, f"{registry.EXPERTS_DIR}/{n}")))
        except ClipzooError as e:
            raise IntegrityError(f"refusing the router of {where}: it cannot be loaded ({e})") from e


def install(root: Path, staged: Path, folders: list[str], reg: dict, stage: Callable[[], list[Path]],
            keep: set[str] | frozenset = frozenset()) -> None:
    """Under the zoo lock: move staged folders into the zoo (existing ones into ``.trash/``),
    ``stage()`` the router, write the registry; on any failure undo all of it."""
    done: list[tuple[Path, Path | None]] = []
    written: list[Path] = []
    trash_existed = (root / leases.TRASH).exists()
    try:
        for rel in folders:
            dst, old = contained(root, rel), None
            if dst.exists() or dst.is_symlink():
                old = leases.to_trash(root, dst)
            done.append((dst, old))
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staged / rel, dst)
            fsync_path(dst.parent)
        written = stage()
        registry.write(root, reg)
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        for dst, old in reversed(done):
            remove_path(root, dst)
            if old is not None:
                os.rename(old, dst)
        if not trash_existed and (root / leases.TRASH).is_dir() and not any((root / leases.TRASH).iterdir()):
            (root / leases.TRASH).rmdir()
        raise
    leases.collect(root, reg, keep)


def keep_text_cards(folder: Path, cards: list[str], limit: int = 1 << 20) -> list[str]:
    """The downloaded model cards that are regular UTF-8 files of at most ``limit`` bytes; the
    others are deleted (a card is only text to read; ``push`` regenerates a missing one)."""
    kept = []
    for rel in cards:
        file = folder / rel
        ok = file.is_file() and not file.is_symlink() and file.stat().st_size <= limit
        try:
            if ok:
                file.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            ok = False
        if ok:
            kept.append(rel)
        elif file.exists() or file.is_symlink():
            file.unlink()
    return kept
