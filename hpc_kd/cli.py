"""``hpc-kd COMMAND …`` (also ``python -m hpc_kd COMMAND …``): one console script for every command.

    hpc-kd launch SWEEP.yaml [key=value ...] [options]   start what is missing (python -m hpc_kd.launch)
    hpc-kd status results/<sweep>                        where every stage stands
    hpc-kd cancel results/<sweep> [--stage KEY ...]      stop its jobs
    hpc-kd aggregate results/<sweep>                     the results table again (python -m hpc_kd.aggregate)
    hpc-kd run SWEEP.yaml [--stage KEY ...]              on every rank of a torchrun/srun job
"""
from __future__ import annotations

import sys

COMMANDS = ("launch", "status", "cancel", "aggregate", "run")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; allowed: {', '.join(COMMANDS)} (hpc-kd --help)", file=sys.stderr)
        return 2
    if command == "aggregate":
        from .aggregate import main as aggregate_main

        return aggregate_main(rest)
    from .launch import main as launch_main

    return launch_main(rest if command == "launch" else [command, *rest])


if __name__ == "__main__":
    sys.exit(main())
