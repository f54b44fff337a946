"""Push a zoo to the Hugging Face Hub and pull one back, trusting nothing the remote sends.

The Hub repository holds the zoo directory exactly as on disk (``registry.json`` at its root, one
folder per expert, the router's folder when it has files) plus model cards, so a plain git clone
of it (with git-lfs for the safetensors files) is a usable zoo. :func:`push` makes one commit with
``HfApi.create_commit`` (creating the repository and branch when missing) and deletes remote zoo files
the local zoo no longer has; the client decides how bytes travel (inline, LFS or Xet, as the server
asks). Push reads the zoo under its lock and refuses a file whose sha256 disagrees with the registry.

:func:`pull` pins a revision to its commit id, downloads into a staging folder inside the zoo,
and only then touches the zoo: it reads JSON and safetensors only (executes nothing), refuses unsafe
file names (absolute, ``..``, anything outside ``[A-Za-z0-9_.-]`` per path part), checks every file's
sha256 against the remote registry, refuses another backbone, refuses an expert that exists
locally with other hashes unless ``force``, and loads every downloaded expert as the store would
(:func:`clipzoo.zoo.hub_install.check_loadable`) before the zoo is touched. Downloads (:mod:`clipzoo.zoo.hub_download`) fetch only the files
the registry names, each at the pinned commit, bounded by its listed size and a per-type limit. Then, under the zoo lock, folders are moved in and the
registry is written atomically; any error removes the staging folder and leaves the zoo as it was.
The remote's router files are taken only by a zoo without experts pulling all of the remote's;
otherwise the local router is rebuilt over the merged experts in the same commit.
Model cards (``README.md`` of the zoo and of each pulled expert) come along when they are UTF-8
text of at most 1 MiB; any other card is dropped (``push`` regenerates a missing one).

Endpoint and token come from huggingface_hub's own configuration (``HF_ENDPOINT``, ``HF_TOKEN``, the
login cache); ``HF_ENDPOINT`` is read at call time and passed as ``endpoint=``. Tokens are never
printed: error messages are scrubbed of the token in use.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, get_token
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from clipzoo.zoo import leases, paths, registry
from clipzoo.zoo.hub_download import LIMITS, Remote, check_remote_name, safe_path
from clipzoo.zoo.hub_install import check_loadable, install, keep_text_cards, verify_staged
from clipzoo.zoo.router_files import stage_router
from clipzoo.zoo.store import Store
from clipzoo.errors import BackboneError, ClipzooError, HubError, IntegrityError, RegistryError

CARD = "README.md"
READABLE = (".json", ".safetensors")


# ----- configuration and errors ---------------------------------------------------------------
def resolve_endpoint(endpoint: str | None = None) -> str:
    """``endpoint``, else ``$HF_ENDPOINT`` now, else huggingface_hub's default."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _scrub(text: str, token: str | bool | None) -> str:
    token = token if isinstance(token, str) else get_token()
    return text.replace(token, "<token>") if token else text


@contextmanager
def _hub_errors(what: str, token: str | bool | None) -> Iterator[None]:
    """Turn the client's errors (HTTP, network, validation) into one-line HubErrors."""
    try:
        yield
    except ClipzooError:
        raise
    except RepositoryNotFoundError as e:
        raise HubError(f"{what}: repository not found (or private: set HF_TOKEN or run 'hf auth login')") from e
    except RevisionNotFoundError as e:
        raise HubError(f"{what}: revision not found") from e
    except Exception as e:  # network failures, HTTP errors, malformed answers
        lines = [x for x in str(e).splitlines() if x.strip()]
        reason = _scrub(lines[0] if lines else type(e).__name__, token)
        if isinstance(e, HfHubHTTPError) and e.response is not None and e.response.status_code in (401, 403):
            reason += " (no write access: check HF_TOKEN or run 'hf auth login')"
        raise HubError(f"{what}: {reason}") from e


def git_blob_oid(data: bytes) -> str:
    """The git object id of a file's bytes, as the Hub reports non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# ----- what a zoo consists of -----------------------------------------------------------------
def sections(reg: dict) -> dict[str, dict]:
    """Top-level registry sections other than ``experts`` that list files (the learned router):
    their ``files`` map zoo-relative paths, inside a folder named after the section, to sha256."""
    return {k: v for k, v in reg.items() if k != "experts" and isinstance(v, dict) and v.get("files")}


def listed_files(reg: dict, experts: list[str] | None = None, with_sections: bool = True) -> dict[str, str]:
    """Zoo-relative path -> sha256 for every file the registry lists (experts, then sections)."""
    out = {}
    for name in reg["experts"] if experts is None else experts:
        for fname, digest in reg["experts"][name]["files"].items():
            out[f"{registry.EXPERTS_DIR}/{name}/{fname}"] = digest
    for sec in (sections(reg) if with_sections else {}).values():
        out.update(sec["files"])
    return out


def check_remote_registry(reg: dict) -> dict:
    """Validate a downloaded registry and every name in it before any of it is used."""
    try:
        registry.validate(reg)
    except RegistryError as e:
        raise HubError(f"refusing the remote {e}") from e
    bb = reg["backbone"]
    if not all(isinstance(bb[k], str) and re.fullmatch(pat, bb[k])
               for k, pat in (("fingerprint", r"[0-9a-f]{64}"), ("model", r"[ -~]{1,200}"))):
        raise HubError("refusing the remote registry: its backbone has a malformed model name or fingerprint")
    for name in reg["experts"]:
        safe_path(name)
        try:
            paths.check_name(name)
        except RegistryError as e:
            raise HubError(f"refusing the remote registry: {e}") from e
    for key, sec in sections(reg).items():
        if key in (registry.REGISTRY, CARD) or not isinstance(sec["files"], dict) or any(str(p).split("/")[0] != key for p in sec["files"]):
            raise HubError(f"the remote registry's {key!r} section lists files outside its folder {key}/")
    for path, digest in listed_files(reg).items():
        safe_path(path)
        if not path.endswith(READABLE):
            raise HubError(f"refusing {path!r} from the remote: only .json and .safetensors files are read")
        if not re.fullmatch(r"[0-9a-f]{64}", str(digest)):
            raise HubError(f"the remote registry lists {path!r} with a malformed sha256")
    return reg


# ----- push -----------------------------------------------------------------------------------
def _local_files(root: Path, reg: dict) -> dict[str, bytes]:
    """registry.json and every listed file, each checked against its sha256."""
    out = {registry.REGISTRY: (root / registry.REGISTRY).read_bytes()}
    for path, digest in listed_files(reg).items():
        file = root / path
        data = file.read_bytes() if file.is_file() else None
        if data is None or hashlib.sha256(data).hexdigest() != digest:
            raise IntegrityError(f"refusing to push: {path} is missing or does not match its sha256 "
                                 f"(run 'clipzoo verify --zoo {root}')")
        out[path] = data
    return out


def _with_cards(root: Path, reg: dict, files: dict[str, bytes], repo_id: str) -> dict[str, bytes]:
    """Add the zoo's and each expert's README.md: the one in the zoo if present, else generated."""
    from clipzoo.zoo.cards import expert_card, zoo_card

    cards = {CARD: lambda: zoo_card(reg, repo_id)}
    for name in reg["experts"]:
        cards[f"{registry.EXPERTS_DIR}/{name}/{CARD}"] = lambda name=name: expert_card(reg, name, repo_id)
    for path, make in cards.items():
        own = root / path
        files[path] = own.read_bytes() if own.is_file() else str(make()).encode()
    return files


def _remote_state(api: HfApi, repo_id: str, branch: str) -> tuple[bool, str | None, dict[str, RepoFile]]:
    """(repo exists, head commit to build on, files there); a missing branch starts from main."""
    for rev in dict.fromkeys([branch, constants.DEFAULT_REVISION]):
        try:
            sha = api.repo_info(repo_id, revision=rev).sha
        except RepositoryNotFoundError:
            return False, None, {}
        except RevisionNotFoundError:
            continue
        tree = api.list_repo_tree(repo_id, revision=sha, recursive=True)
        return True, sha, {f.path: f for f in tree if isinstance(f, RepoFile)}
    return True, None, {}


def _same(remote: RepoFile, data: bytes) -> bool:
    if remote.lfs is not None:
        return remote.lfs.sha256 == hashlib.sha256(data).hexdigest()
    return remote.blob_id == git_blob_oid(data)


def push(root: Path, repo_id: str, *, revision: str | None = None, private: bool = False,
         message: str | None = None, dry_run: bool = False, endpoint: str | None = None,
         token: str | bool | None = None) -> dict:
    """Upload the zoo at ``root`` to ``repo_id`` in one commit; return what changed (or would)."""
    root = Path(root)
    branch = revision or constants.DEFAULT_REVISION
    registry.read(root)  # a clear error when ``root`` is not a zoo, before the lock is created there
    with registry.lock(root):  # a consistent snapshot: no expert is added or removed while reading
        reg = registry.read(root)
        files = _local_files(root, reg)
    files = _with_cards(root, reg, files, repo_id)
    api = HfApi(endpoint=resolve_endpoint(endpoint), token=token)
    with _hub_errors(f"push to {repo_id}@{branch} failed", token):
        exists, parent, remote = _remote_state(api, repo_id, branch)
        managed = {k for k, v in reg.items() if isinstance(v, dict)}
        changes = {
            "add": sorted(p for p in files if p not in remote),
            "update": sorted(p for p in files if p in remote and not _same(remote[p], files[p])),
            "delete": sorted(p for p in remote if p not in files and p.split("/")[0] in managed),
        }
        changes["unchanged"] = sorted(p for p in files if p in remote and p not in changes["update"])
        result = {"repo_id": repo_id, "revision": branch, "endpoint": api.endpoint, "dry_run": dry_run,
                  "create_repo": not exists, "experts": list(reg["experts"]), "changes": changes, "commit": None}
        if dry_run:
            return result
        if not exists:
            api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=branch, revision=parent, exist_ok=True)
        ops = [CommitOperationAdd(p, files[p]) for p in changes["add"] + changes["update"]]
        ops += [CommitOperationDelete(p) for p in changes["delete"]]
        if ops:
            info = api.create_commit(repo_id, ops, revision=branch, parent_commit=parent if exists else None,
                                     commit_message=message or f"clipzoo: push {len(reg['experts'])} experts")
            result.update(commit=info.oid, url=info.commit_url)
    return result


# ----- pull -----------------------------------------------------------------------------------
def _plan(local: dict | None, remote: dict, only: list[str] | None, force: bool, where: str) -> dict[str, list[str]]:
    """Which remote experts to add, replace (``force``) or skip; raise on conflicts."""
    names = only if only is not None else list(remote["experts"])
    missing = [n for n in names if n not in remote["experts"]]
    if missing:
        raise HubError(f"{where} has no expert {', '.join(map(repr, missing))} "
                       f"(it has: {', '.join(remote['experts']) or 'none'})")
    plan: dict[str, list[str]] = {"add": [], "replace": [], "unchanged": []}
    for name in names:
        mine = (local or {"experts": {}})["experts"].get(name)
        theirs = remote["experts"][name]
        if mine is None:
            plan["add"].append(name)
        elif mine["sha256"] == theirs["sha256"] and mine["files"] == theirs["files"]:
            plan["unchanged"].append(name)
        else:
            plan["replace"].append(name)
    have = set((local or {"experts": {}})["experts"]) | set(names)
    for name in plan["add"] + plan["replace"]:
        lacking = [src for src in remote["experts"][name].get("sources", []) if src not in have]
        if lacking:
            raise HubError(f"expert {name!r} composes {', '.join(map(repr, lacking))}: pull those too (--only)")
    if plan["replace"] and not force:
        raise HubError(f"conflict: expert {', '.join(map(repr, plan['replace']))} exists locally with other weights "
                       f"than in {where}; remove it locally, pull --only other experts, or pass --force to replace it")
    for name, rec in (local or {"experts": {}})["experts"].items():
        if name not in plan["replace"] and set(rec.get("sources", [])) & set(plan["replace"]):
            raise HubError(f"local fusion expert {name!r} composes an expert the pull would replace: remove it first")
    return plan


def _check_backbone(local: dict | None, remote: dict, where: str) -> None:
    if local is not None and local["backbone"]["fingerprint"] != remote["backbone"]["fingerprint"]:
        raise BackboneError(
            f"{where} was built on backbone {remote['backbone']['model']} ({remote['backbone']['fingerprint'][:12]}), "
            f"this zoo on {local['backbone']['model']} ({local['backbone']['fingerprint'][:12]}): "
            "pull into another --zoo"
        )


def pull(root: Path, repo_id: str, *, revision: str | None = None, only: list[str] | None = None,
         force: bool = False, endpoint: str | None = None, token: str | bool | None = None) -> dict:
    """Merge the experts of ``repo_id`` at ``revision`` into the zoo at ``root`` (created if absent)."""
    root = Path(root)
    local = registry.read(root) if (root / registry.REGISTRY).is_file() else None
    if local is None and root.exists() and any(root.iterdir()):
        raise RegistryError(f"{root} exists, is not empty and is not a zoo: pull into an empty or new directory")
    api = HfApi(endpoint=resolve_endpoint(endpoint), token=token)
    rev = revision or constants.DEFAULT_REVISION
    where = f"{repo_id}@{rev}"
    with _hub_errors(f"pull from {where} failed", token):
        info = api.repo_info(repo_id, revision=rev)
        for sibling in info.siblings or []:
            check_remote_name(sibling.rfilename)
        src = Remote(api, repo_id, info.sha, token)  # every download below is pinned to this commit
    if registry.REGISTRY not in src.files:
        raise HubError(f"{where} has no {registry.REGISTRY} at its root: not a clipzoo zoo")
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    if local is not None:
        leases.clean_stale(root)
    staging, held = leases.new_staging(root, "pull-")  # its lock tells later writers this pull is alive
    try:
        with _hub_errors(f"pull from {where} failed", token):
            reg_file = src.fetch(registry.REGISTRY, staging / "meta", src.size(registry.REGISTRY), None)
            try:
                remote = check_remote_registry(json.loads(Path(reg_file).read_text()))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise HubError(f"{where}: registry.json is not valid JSON") from e
            _check_backbone(local, remote, where)
            plan = _plan(local, remote, only, force, where)
            fetch = plan["add"] + plan["replace"]
            take_sections = not (local or {"experts": {}})["experts"] and set(fetch) == set(remote["experts"])
            wanted = listed_files(remote, fetch, with_sections=take_sections)
            cards = [c for c in [f"{registry.EXPERTS_DIR}/{n}/{CARD}" for n in fetch] + ([CARD] if local is None else [])
                     if c in src.files and (src.files[c].lfs or src.files[c]).size <= LIMITS[".md"]]
            src.fetch_all({**wanted, **dict.fromkeys(cards)}, staging / "files")  # nothing unlisted is fetched
        verify_staged(staging / "files", wanted, remote["backbone"]["fingerprint"])
        check_loadable(staging / "files", remote, fetch, Store.open(root) if local is not None else None,
                       take_sections, where)
        paths.fsync_tree(staging / "files")
        cards = keep_text_cards(staging / "files", cards)
        folders = [f"{registry.EXPERTS_DIR}/{n}" for n in fetch] + (list(sections(remote)) if take_sections else [])
        folders += [CARD] if CARD in cards else []
        with registry.lock(root):
            now = registry.read(root) if (root / registry.REGISTRY).is_file() else None
            if (now is None) != (local is None) or (now and now["experts"] != local["experts"]):
                raise RegistryError(f"{root} changed during the pull: run it again")
            reg = _merged(local, remote, fetch, take_sections)
            refresh = bool(fetch) and not take_sections  # the router learns the new experts: one new version
            stats = Store(root, reg)._stats_reader(reg)
            if fetch or local is None:
                install(root, staging / "files", folders, reg,
                        lambda: stage_router(root, reg, stats, rebuild=True) if refresh else [],
                        keep=set((local or {}).get("router", {}).get("files", {})))
    except BaseException:
        leases.drop_staging(root, staging, held)
        if local is None:  # leave no half-made zoo behind
            (root / registry.LOCK).unlink(missing_ok=True)
            if created:
                try:
                    paths.remove_path(root.parent, root)
                except (OSError, ClipzooError):
                    pass
        raise
    leases.drop_staging(root, staging, held)
    (root / registry.EXPERTS_DIR).mkdir(exist_ok=True)
    router = "from remote" if take_sections else "refreshed" if refresh else "local"
    return {"repo_id": repo_id, "revision": rev, "commit": src.sha, "zoo": str(root), "created": local is None,
            "added": plan["add"], "replaced": plan["replace"], "unchanged": plan["unchanged"], "router": router,
            "cards": cards}


def _merged(local: dict | None, remote: dict, fetch: list[str], take_sections: bool) -> dict:
    """The registry after the pull: the local one plus the fetched experts (or the remote one, fresh)."""
    if local is None:
        reg = {**remote, "experts": {n: remote["experts"][n] for n in fetch}}
        if not take_sections:  # a partial clone: the router section without the remote's trained files
            for key, sec in sections(remote).items():
                reg[key] = {**{k: v for k, v in sec.items() if k != "sha256"}, "files": {}}
        return reg
    reg = json.loads(json.dumps(local))
    for name in fetch:
        reg["experts"][name] = remote["experts"][name]
    if take_sections:  # an empty zoo takes the remote's trained router as is
        reg.update(sections(remote))
    return reg
