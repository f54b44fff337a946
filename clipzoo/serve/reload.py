"""Hot reload: the zoo a server answers with follows the zoo directory as other processes change it.

:class:`ZooSource` keeps one open, warm :class:`clipzoo.zoo.zoo.Zoo`. Before each batch the
batcher calls it; it stats ``registry.json`` (inode, size, mtime: a commit replaces the file
atomically, so any change shows) and only when that changed reads the registry and compares its
router version, which every add, remove and router refresh bumps. A new version is opened and
warmed (router and every expert loaded) before it is used, so the next batch answers with it
and no request sees a half-loaded zoo; a zoo that cannot be opened (say, damaged by hand) is
logged and the previous one keeps answering. The backbone is shared between versions (it is
cached per spec in this process). The old zoo object is dropped when no batch uses it, which
releases its reader lease (:mod:`clipzoo.zoo.leases`), so writers can collect old files.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from clipzoo.zoo import registry

_log = logging.getLogger(__name__)


def _stamp(root: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(root / registry.REGISTRY)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def open_warm(root: str | Path) -> Any:
    """Open the zoo and load what answering needs: the backbone model, the router, every expert."""
    from clipzoo.zoo.zoo import Zoo

    zoo = Zoo.open(root)
    _ = zoo.backbone.model  # built now, not on the first request
    if zoo.names:
        zoo.router()
        for name in zoo.names:
            zoo.expert(name)
    return zoo


def router_version(zoo: Any) -> int:
    """The registry version a zoo object answers with (its router version)."""
    return int(zoo.registry.get("router", {}).get("version", 0))


class ZooSource:
    """The current zoo of a directory, reopened when its registry version changes."""

    def __init__(self, root: str | Path, zoo: Any | None = None):
        self.root = Path(root)
        self._stamp = _stamp(self.root)
        self.zoo = zoo if zoo is not None else open_warm(self.root)
        self.reloads = 0
        self.last_error: str | None = None
        self.loaded_at = time.time()
        self._lock = threading.Lock()

    @property
    def version(self) -> int:
        return router_version(self.zoo)

    def __call__(self) -> Any:
        """The zoo to answer the next batch with (reloaded first when the registry changed)."""
        with self._lock:
            stamp = _stamp(self.root)
            if stamp == self._stamp:
                return self.zoo
            self._stamp = stamp
            try:
                reg = registry.read(self.root)
                if int(reg.get("router", {}).get("version", 0)) == self.version:
                    return self.zoo
                new = open_warm(self.root)
            except Exception as e:  # noqa: BLE001 - keep answering with the version we have
                self.last_error = " ".join(str(e).split()) or type(e).__name__
                _log.warning("zoo at %s not reloaded, still serving version %d: %s", self.root, self.version,
                             self.last_error)
                return self.zoo
            old = self.version
            self.zoo, self.reloads, self.last_error, self.loaded_at = new, self.reloads + 1, None, time.time()
            _log.info("zoo at %s reloaded: version %d -> %d (%d experts)", self.root, old, self.version,
                      len(new.names))
            return self.zoo

    def info(self) -> dict:
        """What ``GET /version`` reports."""
        z = self.zoo
        bb = z.registry["backbone"]
        return {"zoo_version": self.version, "experts": list(z.names),
                "router": z.registry.get("router", {}).get("kind"),
                "backbone": {k: bb.get(k) for k in ("model", "pretrained", "fingerprint", "embed_dim")},
                "reloads": self.reloads, "last_reload_error": self.last_error}
