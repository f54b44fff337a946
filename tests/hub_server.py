"""A minimal Hugging Face Hub server for the tests: the real ``huggingface_hub`` client talks to it
over HTTP on 127.0.0.1 (stdlib ``http.server`` + a thread; model repos only).

Endpoints implemented, with the request and response shapes huggingface_hub 2.x uses:

- ``POST /api/repos/create``                       create a repo, first commit ``.gitattributes`` (409 if it exists)
- ``GET  /api/models/{repo}[/revision/{rev}]``     repo info: ``id``, ``sha``, ``private``, ``siblings``
- ``GET  /api/models/{repo}/tree/{rev}[/{path}]``  tree listing (``?recursive=true``), files and directories
- ``POST /api/models/{repo}/branch/{branch}``      create a branch from ``startingPoint`` or main (409 if it exists)
- ``POST /api/validate-yaml``                      README metadata check: the YAML header must parse to a mapping
- ``POST /api/models/{repo}/preupload/{rev}``      upload modes, with the oid of a file already there
- ``POST /api/models/{repo}/commit/{rev}``         NDJSON commit: ``header``, ``file`` (base64), ``deletedFile``,
  ``deletedFolder``; ``parentCommit`` is checked
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``        file bytes with ``X-Repo-Commit``, ``ETag`` and ``Content-Length``

Errors carry ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound) as the Hub's do.
Writes, and reads of private repos, need ``Authorization: Bearer <token>``.

Uploads: the installed client sends every file the server marks ``"lfs"`` through Xet storage
when ``hf_xet`` is installed (it is), which needs a content-addressed storage service, and uses the
legacy LFS batch API only without ``hf_xet``. This server answers ``"regular"`` for every file, as a
Hub-compatible git server without large-file storage does, so file bytes travel base64-encoded in the
commit. Neither Xet nor the LFS batch API is implemented.

Test hooks: :meth:`HubServer.tamper` rewrites a file in place (same commit id, as a malicious
server could), :attr:`HubServer.drop` names paths whose download gets the connection closed
without an answer, :attr:`HubServer.requests` logs ``METHOD path`` of every request.
Hardening hooks: :attr:`HubServer.on_request` is called with ``"METHOD path"`` (holding the server's
lock) before each request is answered, e.g. to move a branch with :meth:`HubServer.commit` mid-pull;
:attr:`HubServer.serve` maps a path to what its download answers instead of the committed bytes (bytes,
sent with their own ``Content-Length``, or an iterable of chunks sent chunked without one) while the
tree listing keeps the committed size; :attr:`HubServer.sent` counts the body bytes written per path;
:attr:`HubServer.unpin` makes downloads ignore the requested revision and serve ``main``'s head.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit id
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit id -> path -> bytes

    def new_commit(self, files: dict[str, bytes]) -> str:
        oid = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
        self.commits[oid] = files
        return oid

    def resolve(self, rev: str) -> str | None:
        return self.branches.get(rev) or (rev if rev in self.commits else None)


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """A client that drops its connection (a refused download) is no server error: stay quiet."""
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class HubServer:
    """Start with :meth:`start`, stop with :meth:`stop`; ``endpoint`` is its base URL."""

    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.drop: set[str] = set()
        self.requests: list[str] = []
        self.on_request: Callable[[str], None] | None = None
        self.serve: dict[str, bytes | Iterable[bytes]] = {}
        self.sent: dict[str, int] = defaultdict(int)
        self.unpin = False
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> "HubServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(rev)]

    def tamper(self, repo_id: str, path: str, data: bytes, rev: str = "main") -> None:
        """Replace a file's bytes without a new commit (what a compromised server could do)."""
        self.files(repo_id, rev)[path] = data

    def commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        """Make ``files`` a new commit on ``branch`` directly (safe to call from :attr:`on_request`)."""
        repo = self.repos[repo_id]
        repo.branches[branch] = repo.new_commit(dict(files))
        return repo.branches[branch]


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        # ----- plumbing ---------------------------------------------------------------------
        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, ctype="application/json"):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, obj, status: int = 200) -> None:
            self._send(status, json.dumps(obj).encode())

        def _error(self, status: int, code: str | None, msg: str) -> None:
            headers = {"X-Error-Message": msg, **({"X-Error-Code": code} if code else {})}
            self._send(status, json.dumps({"error": msg}).encode(), headers)

        def _authorized(self) -> bool:
            return self.headers.get("Authorization") == f"Bearer {hub.token}"

        def _repo(self, repo_id: str, write: bool = False) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if write and not self._authorized():
                self._error(401, None, "Invalid credentials in Authorization header")
                return None
            if repo is None or (repo.private and not self._authorized()):
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                return None
            return repo

        def _oid(self, repo: Repo, rev: str) -> str | None:
            oid = repo.resolve(rev)
            if oid is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return oid

        # ----- routes -----------------------------------------------------------------------
        def do_HEAD(self) -> None:
            self._route()

        def do_GET(self) -> None:
            self._route()

        def do_POST(self) -> None:
            self._route()

        def _route(self) -> None:
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            query = parse_qs(url.query)
            hub.requests.append(f"{self.command} {url.path}")
            self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with hub._lock:
                if hub.on_request is not None:
                    hub.on_request(f"{self.command} {url.path}")
                if parts[:2] == ["api", "repos"] and parts[2:] == ["create"]:
                    return self._create_repo()
                if parts == ["api", "validate-yaml"]:
                    return self._validate_yaml()
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo_id, rest = "/".join(parts[2:4]), parts[4:]
                    if self.command == "GET" and not rest:
                        return self._info(repo_id, "main")
                    if self.command == "GET" and rest[0] == "revision" and len(rest) == 2:
                        return self._info(repo_id, rest[1])
                    if self.command == "GET" and rest[0] == "tree" and len(rest) >= 2:
                        return self._tree(repo_id, rest[1], "/".join(rest[2:]), query)
                    if self.command == "POST" and rest[0] in ("branch", "preupload", "commit") and len(rest) == 2:
                        return getattr(self, f"_post_{rest[0]}")(repo_id, rest[1])
                if len(parts) >= 5 and parts[2] == "resolve" and self.command in ("GET", "HEAD"):
                    return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
            self._error(404, None, f"not implemented: {self.command} {url.path}")

        def _create_repo(self) -> None:
            if not self._authorized():
                return self._error(401, None, "Invalid credentials in Authorization header")
            req = json.loads(self.body)
            repo_id = f"{req['organization']}/{req['name']}"
            if repo_id in hub.repos:  # the Hub's 409 names the existing repo's url
                msg = "You already created this model repo"
                return self._send(409, json.dumps({"error": msg, "url": f"{hub.endpoint}/{repo_id}"}).encode(),
                                  {"X-Error-Message": msg})
            repo = Repo(private=req.get("visibility") == "private" or bool(req.get("private")))
            repo.branches["main"] = repo.new_commit({".gitattributes": GITATTRIBUTES})
            hub.repos[repo_id] = repo
            self._json({"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})

        def _validate_yaml(self) -> None:
            content = json.loads(self.body)["content"]
            if content.startswith("---\n"):
                try:
                    meta = yaml.safe_load(content[4:].split("\n---", 1)[0])
                except yaml.YAMLError as e:
                    return self._json({"errors": [{"message": str(e)}]}, 400)
                if not isinstance(meta, dict):
                    return self._json({"errors": [{"message": "metadata must be a mapping"}]}, 400)
            self._json({"errors": [], "warnings": []})

        def _info(self, repo_id: str, rev: str) -> None:
            if (repo := self._repo(repo_id)) is None or (oid := self._oid(repo, rev)) is None:
                return
            files = repo.commits[oid]
            self._json({"id": repo_id, "sha": oid, "private": repo.private,
                        "siblings": [{"rfilename": p} for p in sorted(files)]})

        def _tree(self, repo_id: str, rev: str, prefix: str, query: dict) -> None:
            if (repo := self._repo(repo_id)) is None or (oid := self._oid(repo, rev)) is None:
                return
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            base = f"{prefix}/" if prefix else ""
            files, dirs = {}, set()
            for path, data in repo.commits[oid].items():
                if not path.startswith(base):
                    continue
                rel = path[len(base):].split("/")
                if recursive or len(rel) == 1:
                    files[path] = data
                for i in range(1, len(rel) if recursive else min(2, len(rel))):
                    dirs.add(base + "/".join(rel[:i]))
            if prefix and not files and not dirs:
                return self._error(404, "EntryNotFound", f"{prefix} does not exist at {rev}")
            out = [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)]
            out += [{"type": "file", "oid": git_oid(d), "size": len(d), "path": p} for p, d in sorted(files.items())]
            self._json(out)

        def _post_branch(self, repo_id: str, branch: str) -> None:
            if (repo := self._repo(repo_id, write=True)) is None:
                return
            body = self.body
            start = (json.loads(body) if body else {}).get("startingPoint") or "main"
            if branch in repo.branches:
                return self._error(409, None, f"Reference {branch} already exists")
            if (oid := self._oid(repo, start)) is not None:
                repo.branches[branch] = oid
                self._json({})

        def _post_preupload(self, repo_id: str, rev: str) -> None:
            if (repo := self._repo(repo_id, write=True)) is None or (oid := self._oid(repo, rev)) is None:
                return
            files = repo.commits[oid]
            self._json({"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 "oid": git_oid(files[f["path"]]) if f["path"] in files else None}
                for f in json.loads(self.body)["files"]]})

        def _post_commit(self, repo_id: str, branch: str) -> None:
            if (repo := self._repo(repo_id, write=True)) is None:
                return
            if branch not in repo.branches:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {branch}")
            lines = [json.loads(x) for x in self.body.splitlines() if x.strip()]
            header = lines[0]["value"]
            if header.get("parentCommit") not in (None, repo.branches[branch]):
                return self._error(412, None, "A commit has happened since. Please refresh and try again.")
            files = dict(repo.commits[repo.branches[branch]])
            for item in lines[1:]:
                key, path = item["key"], item["value"]["path"]
                if path.startswith("/") or ".." in path.split("/"):
                    return self._error(400, None, f"invalid path {path!r}")
                if key == "file":
                    files[path] = base64.b64decode(item["value"]["content"])
                elif key == "deletedFile":
                    files.pop(path, None)
                elif key == "deletedFolder":
                    files = {p: d for p, d in files.items() if not p.startswith(path.rstrip("/") + "/")}
                else:
                    return self._error(400, None, f"unsupported commit operation {key!r}")
            oid = repo.new_commit(files)
            repo.branches[branch] = oid
            self._json({"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid,
                        "pullRequestUrl": None})

        def _resolve(self, repo_id: str, rev: str, path: str) -> None:
            if hub.unpin and repo_id in hub.repos:
                rev = "main"
            if (repo := self._repo(repo_id)) is None or (oid := self._oid(repo, rev)) is None:
                return
            data = repo.commits[oid].get(path)
            if data is None:
                return self._error(404, "EntryNotFound", f"{path} does not exist at {rev}")
            if path in hub.drop:  # the network fails: the connection closes without an answer
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            headers = {"X-Repo-Commit": oid, "ETag": f'"{git_oid(data)}"'}
            body = hub.serve.get(path, data)
            try:
                if isinstance(body, bytes):
                    self._send(200, body, headers, ctype="application/octet-stream")
                    hub.sent[path] += len(body) if self.command == "GET" else 0
                else:
                    self._stream(body, headers, path)
            except (BrokenPipeError, ConnectionResetError):  # the client stopped reading: fine
                self.close_connection = True

        def _stream(self, chunks: Iterable[bytes], headers: dict, path: str) -> None:
            """Send ``chunks`` with ``Transfer-Encoding: chunked`` (no Content-Length)."""
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Transfer-Encoding", "chunked")
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command == "HEAD":
                return
            for chunk in chunks:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                hub.sent[path] += len(chunk)
            self.wfile.write(b"0\r\n\r\n")

    return Handler
