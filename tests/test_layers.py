"""The architecture, enforced: the import-linter contracts in pyproject.toml, one namespace, short modules.

import-linter's graph builder walks one folder per top-level package, while setup.py maps several
repository folders into ``clipzoo``; so the contracts are checked on a mirror of the installed
layout (the same files, copied under ``clipzoo/``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

MAX_LINES = 420


def _roots() -> dict[str, str]:
    spec = importlib.util.spec_from_file_location("clipzoo_setup", REPO / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ROOTS


def _sources() -> list[Path]:
    return [p for folder in _roots().values() for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts]


def _mirror(dest: Path) -> Path:
    for name, folder in sorted(_roots().items()):
        target = dest.joinpath(*name.split("."))
        shutil.copytree(REPO / folder, target, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "assets", "*.md"))
    return dest


def test_import_contracts_hold(tmp_path):
    src = _mirror(tmp_path / "src")
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(src)}
    r = subprocess.run([str(lint), str(REPO / "pyproject.toml"), "--no-cache"], cwd=src, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout and "4 kept" in r.stdout, r.stdout[-2000:]


def test_the_contract_fails_on_an_upward_import(tmp_path):
    src = _mirror(tmp_path / "src")
    (src / "clipzoo" / "router" / "upward.py").write_text("from clipzoo.zoo import store  # noqa\n")
    lint = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(lint), str(REPO / "pyproject.toml"), "--no-cache"], cwd=src,
                       env={**os.environ, "PYTHONPATH": str(src)}, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "clipzoo.router.upward -> clipzoo.zoo.store" in r.stdout


def test_every_import_goes_through_the_clipzoo_namespace():
    bare = re.compile(r"^\s*(from|import)\s+(zoo|router|tasks|benchmarks)(\.|\s|$)", re.M)
    offenders = [str(p.relative_to(REPO)) for p in _sources() + list((REPO / "tests").glob("*.py"))
                 if bare.search(p.read_text())]
    assert not offenders, f"import these through clipzoo.*: {offenders}"


def test_modules_stay_short():
    long = {str(p.relative_to(REPO)): n for p in _sources() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules: {long}"
