"""Installs the repository's top-level folders under one namespace, ``clipzoo.*``.

Every package below each folder is found automatically; the folder -> namespace map is the
only list kept by hand (project metadata lives in pyproject.toml).
"""

from setuptools import find_packages, setup

ROOTS = {"clipzoo": "clipzoo", "clipzoo.tasks": "tasks", "clipzoo.router": "router", "clipzoo.zoo": "zoo",
         "clipzoo.bench": "benchmarks"}


def packages() -> list[str]:
    """Every package of the namespace: each root and what ``find_packages`` finds under its folder."""
    return [p for name, folder in ROOTS.items() for p in [name, *(f"{name}.{sub}" for sub in find_packages(folder))]]


if __name__ == "__main__":
    setup(packages=packages(), package_dir=ROOTS)
