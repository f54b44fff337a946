"""The ``clipzoo`` command line: the root group adds the leaf commands of each module here.

Every command prints human-readable text, or one JSON document with ``--json``; errors are one
line on stderr and a non-zero exit status (:class:`clipzoo.cli.options.OneLineErrors`).
"""

from __future__ import annotations

import click

from clipzoo.cli import bench, hub, predict, repair, serve, zoo
from clipzoo.cli.options import OneLineErrors, at_least_one


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="clipzoo")
@click.option("--threads", default=None, type=int, callback=at_least_one,
              help="torch and BLAS threads for this process [default: $CLIPZOO_THREADS, else the CPU count].")
def main(threads: int | None) -> None:
    """clipzoo: a frozen CLIP, one expert per task, routed automatically.

    \b
    Example:
      clipzoo init --zoo myzoo
      clipzoo add-task --zoo myzoo --name shapes --data builtin:shapes
      clipzoo predict --zoo myzoo --json photo.png
    """
    from clipzoo import runtime

    if threads is not None or runtime.threads() is None:  # once per process, unless asked again
        runtime.set_threads(threads)


for command in (zoo.init, zoo.add_task, zoo.list_, zoo.remove, zoo.verify, zoo.router_cmd,
                predict.predict, predict.evaluate, hub.push, hub.pull, repair.repair,
                bench.bench, bench.demo, bench.bench_kinds, bench.bench_router, bench.bench_fusion,
                bench.pretrain_tiny, bench.bench_cost,
                serve.serve, serve.bench_serve):
    main.add_command(command)

if __name__ == "__main__":
    main()
