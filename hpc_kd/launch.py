"""``python -m hpc_kd.launch SWEEP.yaml [key=value ...] [--executor local|debug] [--dry-run] [--retry]``

Loads and validates the sweep (any error: one line, exit status 2, nothing run), expands it into
the deduplicated stage graph, runs what is missing in dependency order, then prints the results
table (also written to ``<output_root>/<name>/table.{md,csv,parquet}``).
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

from .config import ConfigError
from .plan import Plan, load_plan
from .policies import POLICIES
from .rundir import RunDir, write_json


def sweep_record(plan: Plan) -> dict:
    """What the aggregator needs to know about the plan, written to ``<root>/sweep.json``."""
    return {
        "name": plan.name,
        "grid": list(plan.grid_keys),
        "stages": {key: {"kind": s.kind, "role": s.role, "layers": s.depth,
                         "needs": sorted({r.stage for r in s.inputs()})} for key, s in plan.stages.items()},
        "cells": [{"values": c.values, "policy": c.config.distill.policy, "seed": c.config.seed,
                   "tutor_update": None if POLICIES[c.config.distill.policy].teacher_only else c.config.distill.tutor_update,
                   "chain": list(c.chain)} for c in plan.cells],
    }


def describe(plan: Plan) -> str:
    """The dry-run view: every stage, how many cells share it, and whether it is done."""
    shared = Counter(key for cell in plan.cells for key in set(cell.chain))
    lines = [f"sweep {plan.name!r}: {len(plan.cells)} cells, {len(plan.stages)} distinct stages -> {plan.root}"]
    for key, stage in plan.stages.items():
        run = stage.run_dir(plan.root)
        state = "done" if run.done() else ("failed" if (run.path / "error.json").exists() else
                                           "partial" if run.checkpoint.exists() else "to run")
        label = f"{stage.role}" + (f" it{stage.iteration}" if getattr(stage, "iteration", 0) else "")
        policy = getattr(stage, "policy", "")
        lines.append(f"  {key:<22} {label:<12} layers={stage.depth!s:<4} {policy:<10} cells={shared[key]:<3} {state}")
    return "\n".join(lines)


def run_local(plan: Plan, retry: bool = False) -> dict[str, str]:
    """Run every missing stage in this process, in dependency order. Returns the state of each."""
    states: dict[str, str] = {}
    for key, stage in plan.stages.items():
        run = stage.run_dir(plan.root)
        error = run.path / "error.json"
        blocked_by = [r.stage for r in stage.inputs() if states.get(r.stage) not in ("done",)]
        if run.done():
            states[key] = "done"
        elif blocked_by:
            states[key] = "blocked"
            print(f"[skip] {key}: never ran, because {blocked_by[0]} did not finish", file=sys.stderr)
        elif error.exists() and not retry:
            states[key] = "failed"
            print(f"[failed] {key}: failed before (see {error}); pass --retry to run it again", file=sys.stderr)
        else:
            error.unlink(missing_ok=True)
            print(f"[run] {key} ({stage.role}, {stage.depth} layers)", file=sys.stderr)
            started = time.time()
            try:
                stage(plan.root, plan.run)
                states[key] = "done"
                print(f"[done] {key} in {time.time() - started:.0f}s", file=sys.stderr)
            except Exception as err:  # a failed stage must not take the sweep down with it
                run.path.mkdir(parents=True, exist_ok=True)
                write_json(error, {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()})
                states[key] = "failed"
                print(f"[failed] {key}: {type(err).__name__}: {err} (details: {error})", file=sys.stderr)
    return states


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpc_kd.launch", description=__doc__.splitlines()[0])
    parser.add_argument("sweep", help="sweep YAML file")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. distill.tau=2")
    parser.add_argument("--executor", choices=["local", "debug"], default="local",
                        help="local: run here; debug: the same, in this process, no progress bars")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and run nothing")
    parser.add_argument("--retry", action="store_true", help="run failed stages again")
    args = parser.parse_args(argv)
    try:
        plan = load_plan(args.sweep, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.executor == "debug":
        from dataclasses import replace

        plan = replace(plan, run=replace(plan.run, progress=False))
    print(describe(plan))
    if args.dry_run:
        return 0
    plan.root.mkdir(parents=True, exist_ok=True)
    write_json(plan.root / "sweep.json", sweep_record(plan))
    started = time.time()
    states = run_local(plan, retry=args.retry)
    from .aggregate import collect, write_tables

    print()
    print(write_tables(plan.root, collect(plan.root)), end="")
    print(f"\n{sum(s == 'done' for s in states.values())}/{len(states)} stages done in {time.time() - started:.0f}s; "
          f"table: {plan.root / 'table.md'}")
    return 0 if all(s == "done" for s in states.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
