"""``clipzoo repair``: drop what cannot be validated and rebuild the router (see :mod:`clipzoo.zoo.repair`)."""

from __future__ import annotations

import sys

import click

from clipzoo.cli.options import emit, existing_zoo_option, json_option


@click.command()
@existing_zoo_option
@click.option("--yes", is_flag=True, help="Apply: drop what is listed and commit a new router version.")
@json_option
def repair(zoo_dir: str, yes: bool, as_json: bool) -> None:
    """Show what cannot be validated (experts with missing, mismatched or unloadable files, a router
    that does not match the experts); with --yes drop it and rebuild the router.

    \b
    Example: clipzoo repair --zoo myzoo          # show what would be dropped
             clipzoo repair --zoo myzoo --yes    # drop it; exit 0 when the zoo is consistent
    """
    from clipzoo.zoo.store import Store

    rep = Store.open(zoo_dir).repair(dry_run=not yes)
    lines = [f"  drop expert {n}: {why}" for n, why in rep["drop"].items()]
    if rep["router"]:
        lines.append(f"  rebuild the router: {rep['router']}")
    if rep["ok"]:
        text = "ok: every expert and the router validate; nothing to repair"
    elif rep["applied"]:
        text = "repaired:\n" + "\n".join(lines) + f"\nrouter is now version {rep['router_version']}"
    else:
        text = "would repair (run again with --yes):\n" + "\n".join(lines)
    emit(rep, as_json, text)
    if not rep["ok"] and not rep["applied"]:
        sys.exit(1)
