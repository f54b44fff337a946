"""The zoo's store: a directory with ``registry.json``, one folder per expert and the router.

:class:`Store` creates and opens a zoo, loads its backbone, experts and router lazily, and
changes it only through commits under the zoo's lock (:mod:`clipzoo.zoo.commit`: files staged
under new names first, then the registry written atomically, so a failed or interrupted write
leaves the zoo as it was). A store reads one registry version from start to
end: it holds a reader lease (:mod:`clipzoo.zoo.leases`) and writers delete files the registry no
longer names only when no other process holds one. Every expert folder and router path goes
through :func:`clipzoo.zoo.paths.contained`. Training (:mod:`clipzoo.zoo.learn`) and answering
(:mod:`clipzoo.zoo.predict`) build on it; :class:`clipzoo.zoo.zoo.Zoo` joins the three.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from clipzoo import __version__
from clipzoo.errors import BackboneError, ClipzooError, ConfigError, RegistryError
from clipzoo.router.entry import KINDS, RANPAC, check_quantile
from clipzoo.router.lda import RanpacConfig
from clipzoo.router.learned import RouterConfig
from clipzoo.router.stats import STATS_FILE, TaskStats
from clipzoo.tasks.spec import ImageSource
from clipzoo.zoo import commit, leases, paths, registry
from clipzoo.zoo.backbone import Backbone, BackboneSpec, load_backbone
from clipzoo.zoo.cache import backbone_features
from clipzoo.zoo.experts import Expert, Sources, load_expert
from clipzoo.zoo.experts.base import read_config, read_weights
from clipzoo.zoo.router_files import Router, load_router, stage_router

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
        commit.check_files(self.root, name, rec, [f for f in rec["files"] if f != STATS_FILE])
        exp = load_expert(self.expert_dir(name), self.backbone, self.sources())
        self._experts[name] = (rec["sha256"], exp)
        return exp

    def stats(self, name: str) -> TaskStats:
        """The expert's feature statistics, checked against their sha256 before they are read."""
        return self._stats_reader()(name)

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
        return commit.stats_reader(self.root, (reg or self.registry)["experts"])

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
    def _commit(self, reg: dict, stage: Callable[[], list[Path]], undo: Callable[[], None] = lambda: None) -> None:
        """:func:`clipzoo.zoo.commit.commit` as this store; it then reads ``reg``."""
        commit.commit(self.root, reg, stage, undo, writer=self)
        self.registry = reg

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
        """See :func:`clipzoo.zoo.commit.remove`; returns every name removed, ``name`` last."""
        gone, self.registry = commit.remove(self.root, name, cascade, writer=self)
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

