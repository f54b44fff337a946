"""The zoo's store: a directory with ``registry.json``, one folder per expert and the router.

:class:`Store` creates and opens a zoo, loads its backbone, experts and router lazily, and
changes it only through commits under the zoo's lock: files are staged under new names first
(fsynced) and the registry, written atomically, is what makes them part of the zoo, so a failed
or interrupted write leaves the zoo as it was. A store reads one registry version from start to
end: it holds a reader lease (:mod:`clipzoo.zoo.leases`) and writers delete files the registry no
longer names only when no other process holds one. Every expert folder and router path goes
through :func:`clipzoo.zoo.paths.contained`. Training (:mod:`clipzoo.zoo.learn`) and answering
(:mod:`clipzoo.zoo.predict`) build on it; :class:`clipzoo.zoo.zoo.Zoo` joins the three.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import SafetensorError

from clipzoo import __version__
from clipzoo.errors import BackboneError, ClipzooError, ConfigError, IntegrityError, RegistryError
from clipzoo.router.learned import RouterConfig
from clipzoo.router.ranpac import RanpacConfig
from clipzoo.router.ood import check_quantile
from clipzoo.router.stats import STATS_FILE, TaskStats
from clipzoo.tasks.spec import ImageSource
from clipzoo.zoo import leases, paths, registry
from clipzoo.zoo.backbone import Backbone, BackboneSpec, load_backbone
from clipzoo.zoo.cache import backbone_features
from clipzoo.zoo.experts import Expert, Sources, load_expert
from clipzoo.zoo.experts.base import read_config, read_weights
from clipzoo.zoo.router_files import KINDS, RANPAC, Router, load_router, stage_router

FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))  # "no space left" errors


class WriteError(RegistryError, OSError):
    """A commit that could not be written: one line for the CLI, still an OSError for callers."""


WRITE_FAILURES = (OSError, SafetensorError)  # what a failed write raises (safetensors' is no OSError)


def write_error(root: Path, e: BaseException) -> WriteError:
    """The one-line error for a write into ``root`` that failed (full disk, read-only folder, ...)."""
    reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())
    return WriteError(f"could not write to {root} ({reason}); the zoo is unchanged")


def _disk_full(e: BaseException) -> bool:
    return getattr(e, "errno", None) in FULL or "No space left" in str(e)


class Store:
    """A zoo directory (see :mod:`clipzoo.zoo.registry` for its layout)."""

    def __init__(self, root: Path, reg: dict):
        self.root = Path(root)
        self.registry = reg
        self._backbone: Backbone | None = None
        self._experts: dict[str, tuple[str, Expert]] = {}
        self._router: tuple[str, Router] | None = None

    # ----- creation and opening -------------------------------------------------------------
    @classmethod
    def create(cls, root: str | Path, backbone: BackboneSpec = BackboneSpec()):
        """Make an empty zoo on ``backbone`` (loaded now, so a bad backbone fails here)."""
        root = Path(root)
        if (root / registry.REGISTRY).exists():
            raise RegistryError(f"a zoo already exists at {root}: open it, or choose another --zoo")
        if root.exists() and any(root.iterdir()):
            raise RegistryError(f"{root} exists and is not empty: choose an empty or new directory")
        bb = load_backbone(backbone)
        root.mkdir(parents=True, exist_ok=True)
        (root / registry.EXPERTS_DIR).mkdir(exist_ok=True)
        (root / registry.LOCK).touch()
        reg = {
            "schema_version": registry.SCHEMA_VERSION,
            "clipzoo_version": __version__,
            "backbone": {**backbone.to_dict(), "fingerprint": bb.fingerprint, "params": bb.num_params,
                         "embed_dim": bb.embed_dim},
            "router": {"kind": RANPAC, "version": 0, "files": {}},
            "experts": {},
        }
        registry.write(root, reg)
        store = cls(root, reg)
        store._backbone = bb
        return store

    @classmethod
    def open(cls, root: str | Path):
        """Open a zoo for reading: take a reader lease first, then read the registry, so every
        file of the version read stays on disk while this store is alive."""
        root = Path(root)
        store = cls(root, registry.read(root))  # a clear error when ``root`` is not a zoo
        leases.take_lease(root, store)
        store.registry = registry.read(root)  # the version this store reads, under its lease
        return store

    # ----- backbone and features -----------------------------------------------------------
    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            spec = BackboneSpec.from_dict(self.registry["backbone"])
            bb = load_backbone(spec)
            if bb.fingerprint != self.registry["backbone"]["fingerprint"]:
                raise BackboneError(
                    f"backbone {spec} now has fingerprint {bb.fingerprint[:12]}, but this zoo was built on "
                    f"{self.registry['backbone']['fingerprint'][:12]}: restore the original weights"
                )
            self._backbone = bb
        return self._backbone

    def features(self, images: Sequence[ImageSource], desc: str = "encode",
                 errors: dict[int, str] | None = None) -> torch.Tensor:
        """Frozen image embeddings, each image encoded once per backbone (feature cache); with
        ``errors``, unreadable images are recorded there and skipped (see ``encode_cached``)."""
        return backbone_features(self.backbone, images, desc, errors=errors)

    def pixels(self, images: Sequence[ImageSource]) -> torch.Tensor:
        """Preprocessed pixels ``(N, 3, H, W)`` for experts that work inside the encoder."""
        from clipzoo.tasks.data import open_image

        return torch.stack([self.backbone.preprocess(open_image(im)) for im in images])

    # ----- experts --------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.registry["experts"])

    def records(self) -> list[dict]:
        """Every expert's registry record, in the order they were added."""
        return [dict(rec) for rec in self.registry["experts"].values()]

    def record(self, name: str) -> dict:
        if name not in self.registry["experts"]:
            known = ", ".join(self.names) or "none"
            raise RegistryError(f"no expert named {name!r} in {self.root} (experts: {known})")
        return self.registry["experts"][name]

    def expert_dir(self, name: str) -> Path:
        """The expert's folder; a name that is not a task name or a folder that leads outside the
        zoo (a link) is one RegistryError."""
        return paths.expert_path(self.root, name)

    def sources(self) -> Sources:
        """This zoo's experts as a composed expert reads them (loaded lazily, hashes from the registry)."""
        return Sources(self.names, self.expert, lambda n: self.record(n)["sha256"])

    def expert(self, name: str) -> Expert:
        """The expert, loaded lazily and kept while its weights hash is unchanged. Its files are
        checked against their sha256 in the registry first, so a damaged file is never read."""
        rec = self.record(name)
        cached = self._experts.get(name)
        if cached and cached[0] == rec["sha256"]:
            return cached[1]
        self.check_files(name, rec, [f for f in rec["files"] if f != STATS_FILE])
        exp = load_expert(self.expert_dir(name), self.backbone, self.sources())
        self._experts[name] = (rec["sha256"], exp)
        return exp

    def stats(self, name: str) -> TaskStats:
        """The expert's feature statistics, checked against their sha256 before they are read."""
        return self._load_stats(name, self.record(name))

    def _load_stats(self, name: str, rec: dict) -> TaskStats:
        self.check_files(name, rec, [STATS_FILE])
        return TaskStats.load(self.expert_dir(name))

    def check_files(self, name: str, rec: dict, fnames: Sequence[str]) -> None:
        """Raise IntegrityError (naming the expert, the file and the fix) unless each of ``fnames``
        matches its sha256 in ``rec``; a file that matched is not hashed again in this process."""
        folder = self.expert_dir(name)
        fix = f"restore it (clipzoo pull) or remove the expert (clipzoo remove --zoo {self.root} --name {name})"
        if not folder.is_dir():
            raise IntegrityError(f"expert {name!r}: its folder {folder} is missing; {fix}")
        for fname in fnames:
            problem = registry.file_problem(folder / fname, rec["files"][fname])
            if problem:
                raise IntegrityError(f"expert {name!r}: {fname} {problem}; {fix}")

    def dependents(self, name: str) -> list[str]:
        """Composed experts that use ``name``, directly or through another, users first."""
        return _dependents(registry.read(self.root), name)

    # ----- the router -------------------------------------------------------------------------
    def router(self) -> Router:
        """The zoo's router, ``registry["router"]["kind"]``: ``ranpac`` or ``learned`` (in versioned
        files, loaded once per version) or ``nearest-stats`` (built from every task's stats)."""
        spec = self.registry.get("router", {})
        key = json.dumps(spec, sort_keys=True)
        if self._router is None or self._router[0] != key:  # every add/remove/refresh bumps the version
            self._router = (key, load_router(self.root, spec, self.names, self._stats_reader()))
        return self._router[1]

    def _stats_reader(self, reg: dict | None = None) -> Callable[[str], TaskStats]:
        """Reads an expert's checked stats by name, with the records of ``reg`` (default: the
        registry in use; a commit passes the one it is about to write)."""
        return lambda n: self._load_stats(n, (reg or self.registry)["experts"][n])

    def _readable_stats(self, reg: dict, names: list[str]) -> dict[str, TaskStats]:
        """The stats of ``names`` that can be read (a damaged one is left out)."""
        out = {}
        for n in names:
            try:
                out[n] = self._load_stats(n, reg["experts"][n])
            except ClipzooError:
                pass
        return out

    def refresh_router(self, kind: str | None = None, ood_quantile: float | None = None,
                       config: RouterConfig | RanpacConfig | None = None) -> dict:
        """Rebuild the router from every task's stats (optionally switching ``kind``, the OOD
        quantile or the learned gate's settings) and commit it as a new version; returns
        ``registry["router"]``."""
        if kind not in (None, *KINDS):
            raise ConfigError(f"unknown router kind {kind!r}: choose one of {', '.join(KINDS)}")
        if ood_quantile is not None:
            check_quantile(ood_quantile)
        with registry.lock(self.root):
            leases.clean_stale(self.root)
            reg = registry.read(self.root)
            reg["router"] = {**reg.get("router", {}), **({"kind": kind} if kind else {}),
                             **({"ood_quantile": ood_quantile} if ood_quantile is not None else {})}
            want = RanpacConfig if reg["router"]["kind"] == RANPAC else RouterConfig
            if config is not None and not isinstance(config, want):
                raise ConfigError(f"a {reg['router']['kind']} router takes a {want.__name__}, "
                                  f"not a {type(config).__name__}")
            self._commit(reg, lambda: stage_router(self.root, reg, self._stats_reader(reg), rebuild=True,
                                                   config=config))
        return dict(self.registry["router"])

    # ----- commits ----------------------------------------------------------------------------
    def _commit(self, reg: dict, stage: Callable[[], list[Path]], undo: Callable[[], None] = lambda: None,
                free: Sequence[Path] = ()) -> None:
        """Under the lock: stage the router, write ``reg``; on any failure remove what was staged
        (and ``undo()``), so the zoo is exactly as it was. On a full disk, the folders in ``free``
        (the experts ``reg`` drops) are deleted first and the commit is tried once more. Then the
        garbage of ``reg`` is collected unless another process reads the zoo."""
        router = json.loads(json.dumps(reg.get("router", {})))  # staging bumps it: restored for a retry
        try:
            self._try_commit(reg, stage, undo)
        except WriteError:
            raise
        except WRITE_FAILURES as e:
            if not _disk_full(e) or not free:
                raise write_error(self.root, e) from e
            for folder in free:  # a rename into the trash, then the trash's contents: frees space first
                if folder.exists() or folder.is_symlink():
                    paths.remove_path(self.root, leases.to_trash(self.root, folder))
            reg["router"] = router
            try:
                self._try_commit(reg, stage, undo)
            except WRITE_FAILURES as e2:
                raise WriteError(
                    f"the disk is full: the removed experts' files are deleted, but {registry.REGISTRY} could not "
                    f"be written ({getattr(e2, 'strerror', None) or e2}); free some space and run 'clipzoo repair --zoo {self.root} "
                    "--yes'") from e2
        self.registry = reg
        leases.collect(self.root, reg, keep=leases.previous_to_keep(self.root, set(router.get("files", {})), self))

    def _try_commit(self, reg: dict, stage: Callable[[], list[Path]], undo: Callable[[], None]) -> None:
        written: list[Path] = []
        try:
            written = stage()
            registry.write(self.root, reg)
        except BaseException:
            for p in written:
                p.unlink(missing_ok=True)
            if written and not any(written[0].parent.iterdir()):
                written[0].parent.rmdir()
            undo()
            raise

    def commit_expert(self, name: str, staging: Path, record: dict, t0: float | None = None) -> None:
        """Under the lock: re-read the registry, move the staged folder in, update the router, write
        the registry. With ``t0`` (when the add began, ``time.perf_counter()``), the record's
        ``metrics`` get ``router_seconds`` and ``add_seconds`` up to the registry write."""
        with registry.lock(self.root):
            leases.clean_stale(self.root)
            reg = registry.read(self.root)
            if name in reg["experts"]:
                raise RegistryError(f"task {name!r} was added meanwhile by another process: choose another --name")
            target = self.expert_dir(name)
            paths.fsync_tree(staging)
            if target.exists() or target.is_symlink():  # garbage of an earlier expert of that name
                leases.to_trash(self.root, target)
            target.parent.mkdir(exist_ok=True)
            os.rename(staging, target)
            paths.fsync_path(target.parent)
            reg["experts"][name] = record

            def stage() -> list[Path]:
                t_router = time.perf_counter()
                written = stage_router(self.root, reg, self._stats_reader(reg), add=name)
                if t0 is not None:
                    now = time.perf_counter()
                    record["metrics"].update(router_seconds=round(now - t_router, 3), add_seconds=round(now - t0, 3))
                return written

            self._commit(reg, stage, undo=lambda: os.rename(target, staging))

    def remove(self, name: str, cascade: bool = False) -> list[str]:
        """Drop an expert, and with ``cascade=True`` the composed experts that use it (else they
        refuse it), in one commit. Its folder is deleted after the commit (or first, on a full
        disk) once no other process reads the zoo. Returns every name removed, ``name`` last."""
        with registry.lock(self.root):
            leases.clean_stale(self.root)
            reg = registry.read(self.root)
            if name not in reg["experts"]:
                raise RegistryError(f"no expert named {name!r} in {self.root}")
            users = _dependents(reg, name)
            if users and not cascade:
                raise RegistryError(f"expert {name!r} is a source of fusion expert(s) {', '.join(users)}: "
                                    "remove those first, or use --cascade to remove them too")
            gone = users + [name]
            folders = [self.expert_dir(n) for n in gone]  # every path checked before anything changes
            dropped = self._readable_stats(reg, gone)  # read before any folder goes: the router subtracts them
            for n in gone:
                del reg["experts"][n]
            self._commit(reg, lambda: stage_router(self.root, reg, self._stats_reader(reg), drop=gone,
                                                   dropped_stats=dropped), free=folders)
        for n in gone:
            self._experts.pop(n, None)
        return gone

    def repair(self, dry_run: bool = True) -> dict:
        """What cannot be validated (see :func:`clipzoo.zoo.repair.repair`); dropped unless ``dry_run``."""
        from clipzoo.zoo.repair import repair

        return repair(self, dry_run)

    # ----- integrity ------------------------------------------------------------------------
    def verify(self) -> dict:
        """Recompute every file's sha256 against the registry, then read each intact expert's
        config, weights and stats and the router: every problem is one line, nothing raises."""
        short = {"is missing": "missing", f"does not match its sha256 in {registry.REGISTRY}": "sha256 mismatch"}
        problems: list[str] = []
        for name, rec in self.registry["experts"].items():
            try:
                folder = self.expert_dir(name)
            except RegistryError as e:
                problems.append(str(e))
                continue
            bad = [f"{name}/{fname}: {short.get(pr, pr)}" for fname, digest in rec["files"].items()
                   if (pr := registry.file_problem(folder / fname, digest, cached=False))]
            problems += bad or self._readable(name)
        for rel, digest in self.registry.get("router", {}).get("files", {}).items():
            try:
                pr = registry.file_problem(paths.contained(self.root, rel), digest, cached=False)
            except RegistryError as e:
                pr = str(e)
            if pr:
                problems.append(f"{rel}: {short.get(pr, pr)}")
        if not problems and self.registry.get("router", {}).get("files"):
            try:
                load_router(self.root, self.registry["router"], self.names, self._stats_reader())
            except ClipzooError as e:
                problems.append(str(e))
        return {"ok": not problems, "experts": len(self.registry["experts"]), "problems": problems}

    def _readable(self, name: str) -> list[str]:
        """Problems reading an expert whose files match their hashes (a registry rehashed over
        damaged files): its config, weights and stats must parse."""
        folder = self.expert_dir(name)
        try:
            read_config(folder)
            read_weights(folder)
            TaskStats.load(folder)
        except ClipzooError as e:
            return [str(e)]
        return []


def _dependents(reg: dict, name: str) -> list[str]:
    """Experts of ``reg`` composed from ``name``, directly or through another (cycles tolerated)."""
    found: list[str] = []
    frontier, seen = [name], {name}
    while frontier:
        cur = frontier.pop(0)
        for n, rec in reg["experts"].items():
            if cur in rec.get("sources", []) and n not in seen:
                seen.add(n)
                found.append(n)
                frontier.append(n)
    return found[::-1]
