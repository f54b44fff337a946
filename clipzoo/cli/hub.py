"""``clipzoo push`` and ``clipzoo pull``: sync a zoo with the Hugging Face Hub (see :mod:`clipzoo.zoo.hub`).

The endpoint and token come from huggingface_hub's configuration: ``HF_ENDPOINT`` (or
``--endpoint``), ``HF_TOKEN`` or the login cache (``hf auth login``). The token is never printed.
"""

from __future__ import annotations

import click

from clipzoo.cli.options import emit, json_option, zoo_option

endpoint_option = click.option("--endpoint", default=None,
                               help="Hub URL (default: $HF_ENDPOINT, else https://huggingface.co).")


@click.command()
@zoo_option
@click.argument("repo_id")
@click.option("--revision", default=None, help="Branch to push to (created from main if missing; default main).")
@click.option("--private", is_flag=True, help="Create the repository as private (if it does not exist).")
@click.option("--message", "-m", default=None, help="Commit message.")
@click.option("--dry-run", is_flag=True, help="List what would change; upload nothing.")
@endpoint_option
@json_option
def push(zoo_dir: str, repo_id: str, revision: str | None, private: bool, message: str | None, dry_run: bool,
         endpoint: str | None, as_json: bool) -> None:
    """Upload the zoo (registry, experts, router, model cards) to a Hub repository in one commit.

    \b
    Example:
      clipzoo push --zoo myzoo me/my-zoo --dry-run
      clipzoo push --zoo myzoo me/my-zoo --private -m "add mnist expert"
    """
    from clipzoo.zoo.hub import push as run

    r = run(zoo_dir, repo_id, revision=revision, private=private, message=message, dry_run=dry_run,
            endpoint=endpoint)
    c = r["changes"]
    lines = [f"  {verb:<7} {p}" for verb in ("add", "update", "delete") for p in c[verb]]
    head = (f"{'would push' if dry_run else 'pushed'} {len(r['experts'])} experts to {repo_id}@{r['revision']}"
            f"{' (new repository)' if r['create_repo'] else ''}: {len(c['add'])} added, {len(c['update'])} updated, "
            f"{len(c['delete'])} deleted, {len(c['unchanged'])} unchanged")
    tail = f"\ncommit {r['commit']}" if r["commit"] else ("" if dry_run else "\nnothing to commit: up to date")
    emit(r, as_json, "\n".join([head, *lines]) + tail)


@click.command()
@click.argument("repo_id")
@zoo_option
@click.option("--revision", default=None, help="Branch, tag or commit to pull (pinned to its commit; default main).")
@click.option("--only", default=None, help="Comma-separated expert names to pull (default: all).")
@click.option("--force", is_flag=True, help="Replace local experts whose weights differ from the remote's.")
@endpoint_option
@json_option
def pull(repo_id: str, zoo_dir: str, revision: str | None, only: str | None, force: bool, endpoint: str | None,
         as_json: bool) -> None:
    """Download experts from a Hub repository into a zoo (created if missing), verifying every sha256.

    \b
    Example:
      clipzoo pull me/my-zoo --zoo myzoo
      clipzoo pull me/my-zoo --zoo myzoo --revision v1 --only mnist,cifar10
    """
    from clipzoo.zoo.hub import pull as run

    names = [n.strip() for n in only.split(",") if n.strip()] if only else None
    r = run(zoo_dir, repo_id, revision=revision, only=names, force=force, endpoint=endpoint)
    parts = [f"{len(r[k])} {k}" for k in ("added", "replaced", "unchanged")]
    note = "; router refreshed" if r["router"] == "refreshed" else ""
    emit(r, as_json, f"pulled {repo_id}@{r['commit'][:12]} into {r['zoo']}"
                       f"{' (new zoo)' if r['created'] else ''}: {', '.join(parts)}{note}")
