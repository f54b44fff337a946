"""Bounded, pinned downloads for :func:`clipzoo.zoo.hub.pull`: names, sizes and bytes checked.

:class:`Remote` lists the repository once at the commit id ``pull`` resolved, refuses unsafe names in
that listing, and downloads a file only when it is listed there as a file of at most its type's limit
(``LIMITS``). Each download asks for that commit id (so a branch that moves meanwhile cannot mix
versions), is refused when the server answers with another commit, and is streamed into a new regular
file of the staging folder (never a link, never outside it): it stops as soon as more bytes arrive than
the listing says, so an oversize or endless answer is never downloaded whole; the sha256 of what was
written is compared with the registry's. Files the registry does not name are never downloaded.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path, PureWindowsPath

from huggingface_hub import HfApi, constants, hf_hub_url
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from clipzoo.errors import HubError, IntegrityError

SAFE_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
LIMITS = {".json": 64 << 20, ".safetensors": 16 << 30, ".md": 1 << 20}  # bytes per file, by suffix
CHUNK = 1 << 16


def check_remote_name(path: str) -> str:
    """Any name a remote lists: refuse absolute paths, drives, backslashes and ``.``/``..`` parts."""
    parts = str(path).split("/")
    if path.startswith("/") or "\\" in path or PureWindowsPath(path).drive or any(p in ("", ".", "..") for p in parts):
        raise HubError(f"refusing to pull: the remote lists an unsafe file name {path!r} (path traversal)")
    return path


def safe_path(path: str) -> str:
    """A path the pull writes: relative, each part a plain name (``[A-Za-z0-9][A-Za-z0-9_.-]*``)."""
    check_remote_name(path)
    if not all(SAFE_PART.fullmatch(p) for p in path.split("/")):
        raise HubError(f"refusing to pull: unsafe file name {path!r} in the remote registry")
    return path


class Remote:
    """One repository at one commit: its file listing and bounded downloads of listed files."""

    def __init__(self, api: HfApi, repo_id: str, sha: str | None, token: str | bool | None):
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{40}", sha):
            raise HubError(f"refusing to pull from {repo_id}: the remote gave no valid commit id to pin ({sha!r})")
        self.api, self.repo_id, self.sha, self.token = api, repo_id, sha, token
        self.files: dict[str, RepoFile] = {}
        for entry in api.list_repo_tree(repo_id, revision=sha, recursive=True):
            check_remote_name(entry.path)
            if isinstance(entry, RepoFile):
                self.files[entry.path] = entry

    def size(self, path: str, digest: str | None = None) -> int:
        """The listed size of ``path``, refused when unlisted, over its limit, or with another LFS sha256."""
        entry = self.files.get(path)
        if entry is None:
            raise IntegrityError(f"{path} is named by the remote registry but is not a file of {self.repo_id} "
                                 f"at commit {self.sha[:12]}: rejected")
        size = entry.lfs.size if entry.lfs is not None else entry.size
        limit = LIMITS.get(Path(path).suffix, 0)
        if not isinstance(size, int) or size < 0 or size > limit:
            raise IntegrityError(f"refusing {path} from the remote: listed at {size} bytes, over the limit of "
                                 f"{limit} bytes for {Path(path).suffix or 'such'} files")
        if digest is not None and entry.lfs is not None and entry.lfs.sha256 != digest:
            raise IntegrityError(f"{path} from the remote does not match its sha256 in the remote registry: rejected")
        return size

    def fetch_all(self, wanted: dict[str, str | None], folder: Path) -> None:
        """Download every ``path -> sha256`` (None: no hash known) into ``folder``, sizes checked first."""
        sizes = {path: self.size(path, digest) for path, digest in wanted.items()}
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if sum(sizes.values()) > free:
            raise HubError(f"pull needs {sum(sizes.values())} bytes, {free} are free where the zoo is")
        for path, digest in wanted.items():
            self.fetch(path, folder, sizes[path], digest)

    def fetch(self, path: str, folder: Path, size: int, digest: str | None) -> Path:
        """Stream ``path`` at the pinned commit into ``folder/path``: at most ``size`` bytes, then verify."""
        dest = folder / safe_path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.resolve().is_relative_to(folder.resolve()):
            raise HubError(f"refusing to pull: {path!r} would be written outside the staging folder")
        url = hf_hub_url(self.repo_id, path, revision=self.sha, endpoint=self.api.endpoint)
        headers = build_hf_headers(token=self.token)
        got, h = 0, hashlib.sha256()
        with get_session().stream("GET", url, headers=headers, follow_redirects=True,
                                  timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
            hf_raise_for_status(response)
            for r in [*response.history, response]:
                commit = r.headers.get("X-Repo-Commit")
                if commit is not None and commit != self.sha:
                    raise IntegrityError(f"{path}: the remote served commit {commit[:12]!r} instead of the pinned "
                                         f"{self.sha[:12]} (the revision moved or the server ignores pins): rejected")
            declared = response.headers.get("Content-Length")
            if declared is not None and "Content-Encoding" not in response.headers and declared.strip() != str(size):
                raise IntegrityError(f"{path} from the remote is {declared.strip()[:20]} bytes, its listing says "
                                     f"{size}: rejected before downloading")
            with open(dest, "xb") as f:  # a new regular file: never through an existing link
                for chunk in response.iter_bytes(CHUNK):
                    got += len(chunk)
                    if got > size:
                        raise IntegrityError(f"{path} from the remote is larger than the {size} bytes its listing "
                                             "says: rejected, download stopped")
                    h.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())  # durable before the registry names it
        if got != size:
            raise IntegrityError(f"{path} from the remote is {got} bytes, its listing says {size}: rejected")
        if digest is not None and h.hexdigest() != digest:
            raise IntegrityError(f"{path} from the remote does not match its sha256 in the remote registry: rejected")
        return dest
