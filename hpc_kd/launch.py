"""``python -m hpc_kd.launch SWEEP.yaml [key=value ...] [--executor slurm|local|debug] [--profile P]
[--jobs N] [--wait] [--retry] [--dry-run]``, ``python -m hpc_kd.launch status results/<sweep>`` and
``python -m hpc_kd.launch run SWEEP.yaml [key=value ...] [--stage KEY ...]``.

Loads and validates the sweep and the cluster profile (any error: one line, exit status 2,
nothing submitted), expands it into the deduplicated stage graph and starts what is missing:
``slurm`` queues every stage at once with ``afterok`` dependencies and returns (``--wait``
follows the jobs); ``local`` runs them here in dependency order, ``--jobs`` at a time; ``debug``
runs them in this process. When everything has ended, prints the results table (also written to
``<output_root>/<name>/table.{md,csv,parquet}``).

``status`` shows where every stage of a launched sweep stands (:mod:`hpc_kd.status`). ``run`` is
what every rank of a ``torchrun`` / ``srun`` job started by hand calls: it runs the sweep's missing
stages in order, all ranks together (:func:`hpc_kd.distributed.run_plan`).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import Counter
from dataclasses import replace

from . import distributed, executors
from .config import ConfigError
from .executors import Action
from .plan import Plan, load_plan
from .resources import load_profile
from .rundir import SweepDir, local_pid
from .status import State, launch_lock, stage_states


def sweep_record(plan: Plan) -> dict:
    """What the aggregator and ``status`` need to know about the plan: ``<root>/sweep.json``."""
    return {
        "name": plan.name,
        "grid": list(plan.grid_keys),
        "stages": executors.graph(plan),
        "order": list(plan.stages),  # topological
        "cells": [{"values": c.values, "policy": c.config.distill.policy, "seed": c.config.seed,
                   "tutor_update": c.tutor_mode.label,
                   "chain": list(c.chain)} for c in plan.cells],
    }


ACTIONS = {Action.DONE: "done", Action.INFLIGHT: "queued/running", Action.SUBMIT: "to run", Action.FAILED: "failed",
           Action.BLOCKED: "blocked"}


def describe(plan: Plan, states=None, actions=None) -> str:
    """The dry-run view: every stage, how many cells share it, its state and what a launch does."""
    states = states or stage_states(plan.root, executors.graph(plan))
    actions = actions or executors.decide(plan, states)
    shared = Counter(key for cell in plan.cells for key in set(cell.chain))
    lines = [f"sweep {plan.name!r}: {len(plan.cells)} cells, {len(plan.stages)} distinct stages -> {plan.root}"]
    tasks = len({cell.config.data.name for cell in plan.cells}) > 1  # a sweep over tasks names each stage's
    for key, stage in plan.stages.items():
        label = f"{stage.role}" + (f" it{stage.iteration}" if getattr(stage, "iteration", 0) else "")
        policy = getattr(stage, "policy", "")
        st = states[key]
        what = ACTIONS[actions[key]]
        if actions[key] is Action.SUBMIT and st.state is not State.MISSING:
            what += f" (was {st.state})"
        elif st.state is State.MISSING and "checkpoint" in st.detail:
            what += " (resumes from its checkpoint)"
        elif actions[key] is Action.BLOCKED:
            what += f" (never runs because {st.blocked_by} failed; --retry runs it again)"
        elif st.job_id and actions[key] is Action.INFLIGHT:
            what += f" (job {st.job_id})"
        task = f"{stage.data.name:<11} " if tasks else ""
        lines.append(f"  {key:<22} {task}{label:<12} layers={stage.depth!s:<4} {policy:<10} cells={shared[key]:<3} {what}")
    return "\n".join(lines)


def record_states(plan: Plan, states) -> None:
    """Keep each job record's last known state (call with the launch lock held)."""
    for key, st in states.items():
        run = plan.stages[key].run_dir(plan.root)
        record = run.job()
        if record and record.get("state") != st.state:
            run.write_job({**record, "state": st.state, "checked": time.strftime("%Y-%m-%d %H:%M:%S")})


def parse(argv):
    parser = argparse.ArgumentParser(prog="python -m hpc_kd.launch", description=__doc__.splitlines()[0],
                                     epilog="python -m hpc_kd.launch status results/<sweep>: where every stage stands; "
                                            "python -m hpc_kd.launch run SWEEP.yaml: run it on every rank of a "
                                            "torchrun/srun job; python -m hpc_kd.launch cancel results/<sweep> "
                                            "[--stage KEY]: stop its jobs")
    parser.add_argument("sweep", help="sweep YAML file")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. distill.tau=2")
    parser.add_argument("--executor", choices=["slurm", "local", "debug"], default="local",
                        help="slurm: queue every stage on SLURM; local: run here as subprocesses; "
                             "debug: run here, in this process, one stage after another")
    parser.add_argument("--profile", help="cluster profile YAML (resources per stage kind), e.g. slurm/profiles/local.yaml")
    parser.add_argument("--jobs", type=int, default=1, help="local: stages run at once [1]")
    parser.add_argument("--wait", action="store_true", help="slurm: follow the jobs until they end, then aggregate")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and submit nothing")
    parser.add_argument("--retry", action="store_true", help="run failed stages (and those they blocked) again")
    args = parser.parse_intermixed_args(argv)  # overrides may come after options too
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["status"]:
        from .status import main as status_main

        return status_main(argv[1:])
    if argv[:1] == ["run"]:
        return run_main(argv[1:])
    if argv[:1] == ["cancel"]:
        return cancel_main(argv[1:])
    args = parse(argv)
    with stop_on_sigterm():
        return _launch(args)


def _launch(args) -> int:
    try:
        plan = load_plan(args.sweep, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    try:
        profile = load_profile(args.profile) if args.profile else None
    except ConfigError as err:
        print(f"profile error: {args.profile}: {err}", file=sys.stderr)
        return 2
    if args.executor != "debug":  # jobs write logs, not progress bars; the launcher shows progress
        plan = replace(plan, run=replace(plan.run, progress=False))
    if args.dry_run:
        states = stage_states(plan.root, executors.graph(plan))
        print(describe(plan, states, executors.decide(plan, states, args.retry)))
        return 0
    started = time.time()
    sweep = SweepDir(plan.root)
    problem = unwritable(sweep)
    if problem:
        print(f"error: {problem}: nothing was started", file=sys.stderr)
        return 2
    try:
        with launch_lock(sweep):
            states, actions = _look(plan, args.retry)
            starting = [plan.stages[k].run_dir(plan.root).path for k, a in actions.items() if a is Action.SUBMIT]
            problem = unwritable(sweep, starting)
            if problem:
                print(f"error: {problem}: nothing was started", file=sys.stderr)
                return 2
            folder = sweep.submitit / executors.launch_id()
            if args.executor == "slurm":
                submitted = _submit(plan, actions, states, profile, folder)
                if submitted is None:
                    return 2
            else:
                outcome = executors.run_here(plan, actions, plan.run, folder=None if args.executor == "debug" else folder,
                                             jobs=args.jobs, profile=profile, log=_log)
                record_states(plan, stage_states(plan.root, executors.graph(plan)))
    except KeyboardInterrupt:
        print("interrupted: finished stages are kept; a relaunch resumes the rest", file=sys.stderr)
        return STOPPED
    if args.executor != "slurm":
        return _finish(plan, sum(a is Action.DONE for a in outcome.values()), len(outcome), started)
    return _after_submit(plan, actions, states, submitted, args.wait, started)


#: the exit status of a launcher stopped by Ctrl-C, SIGTERM or ``launch cancel`` (the shell's for SIGINT)
STOPPED = 130


@contextlib.contextmanager
def stop_on_sigterm():
    """While the launcher runs, stop it on SIGTERM (what ``launch cancel``, ``kill`` and batch
    systems send) as on Ctrl-C: it starts nothing more, kills its running jobs and exits
    :data:`STOPPED`. SIGINT is left as inherited: a launcher started in the background of a
    script ignores it (so that a Ctrl-C meant for the script's foreground does not reach it), and
    SIGTERM still stops it. The process's own handler is restored after (a launch called from
    Python, e.g. a test, leaves no trace); from a thread other than the main one nothing changes
    (only the main thread can set handlers)."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def unwritable(sweep: SweepDir, runs=()) -> str | None:
    """Why the sweep's folders, or the run folders ``runs`` (of the stages about to start),
    cannot take their records (None when they can): the launcher writes the sweep, its lock,
    each job's record and the jobs' logs there before anything starts. A real write is tried,
    since permission bits do not tell (root ignores them, a read-only mount does not show in them)."""
    import tempfile

    for folder in (sweep.root, sweep.runs, *runs):
        probe = folder
        while not probe.exists():
            probe = probe.parent
        try:
            with tempfile.NamedTemporaryFile(dir=probe, prefix=".hpc_kd-write-probe-"):
                pass
        except OSError as err:
            return f"{probe} is not writable ({err.strerror or type(err).__name__})"
    return None


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _look(plan: Plan, retry: bool):
    """Under the lock: record the sweep, find every stage's state, decide what to run."""
    SweepDir(plan.root).write_sweep(sweep_record(plan))
    states = stage_states(plan.root, executors.graph(plan))
    record_states(plan, states)
    actions = executors.decide(plan, states, retry)
    print(describe(plan, states, actions))
    for key, action in actions.items():
        if action is Action.FAILED:
            _log(f"[failed] {key}: {states[key].detail} (pass --retry to run it again)")
    return states, actions


def _after_submit(plan: Plan, actions, states, submitted, wait: bool, started: float) -> int:
    """SLURM: say what was queued and return, or follow the jobs to their end (``--wait``)."""
    queued = sum(a is Action.INFLIGHT for a in actions.values())
    if not wait and (submitted or queued):
        print(f"\n{len(submitted)} stage jobs submitted, {queued} already queued or running. "
              f"Follow with: python -m hpc_kd.launch status {plan.root}")
        return 0 if all(a in (Action.DONE, Action.SUBMIT, Action.INFLIGHT) for a in actions.values()) else 1
    if wait:
        try:
            states = executors.follow(plan, log=_log)
        except KeyboardInterrupt:
            print(f"\nstopped following; the jobs keep running: python -m hpc_kd.launch status {plan.root}")
            return STOPPED
        with launch_lock(SweepDir(plan.root)):
            record_states(plan, states)
    return _finish(plan, sum(st.state is State.DONE for st in states.values()), len(states), started)


def _submit(plan, actions, states, profile, folder):
    from .resources import Profile

    try:
        return executors.submit_slurm(plan, actions, states, profile or Profile(), folder, plan.run, log=_log)
    except RuntimeError as err:  # e.g. no srun/sbatch here
        print(f"slurm error: {err}", file=sys.stderr)
        return None


def _finish(plan, done: int, stages: int, started: float) -> int:
    from .aggregate import aggregate

    print()
    print(aggregate(plan.root), end="")
    print(f"\n{done}/{stages} stages done in {time.time() - started:.0f}s; table: {SweepDir(plan.root).table('md')}")
    return 0 if done == stages else 1


# -- cancel ------------------------------------------------------------------------------------


def cancel_main(argv=None) -> int:
    """``python -m hpc_kd.launch cancel results/<name> [--stage KEY ...] [--timeout S]``. Exit 0 when
    everything it found was stopped, 1 when a launcher holding the sweep did not stop."""
    parser = argparse.ArgumentParser(prog="python -m hpc_kd.launch cancel",
                                     description="Stop a sweep's queued and running jobs (all, or those of --stage "
                                                 "and what needs them). Finished stages stay; a later launch "
                                                 "resumes the cancelled ones from their checkpoints.")
    parser.add_argument("sweep_dir", help="results/<sweep>, the folder holding sweep.json")
    parser.add_argument("--stage", action="append", default=None, help="cancel this stage key (repeatable)")
    parser.add_argument("--timeout", type=float, default=60, metavar="S",
                        help="seconds a local launcher of the sweep has to stop on SIGTERM before it is killed [60]")
    args = parser.parse_args(argv)
    from .rundir import sweep_dir_argument
    from .status import sweep_graph

    root = sweep_dir_argument("python -m hpc_kd.launch cancel", "", [args.sweep_dir])
    if root is None:
        return 2
    sweep = SweepDir(root)
    graph = sweep_graph(sweep.root)
    unknown = [k for k in args.stage or [] if k not in graph]
    if unknown:
        print(f"error: no stage {', '.join(unknown)} in {sweep.root}", file=sys.stderr)
        return 2
    if args.stage:  # a local launcher may be running the rest: it sees these as cancelled
        stopped = executors.cancel(sweep.root, graph, stage_states(sweep.root, graph), args.stage, log=_log)
        print(f"{len(stopped)} stage job(s) cancelled; resume with the launch command (finished stages are kept)")
        return 0
    # What runs now is cancelled, and what the launcher still starts before it stops: a launcher
    # that stops kills its own jobs, which then no longer look like running ones.
    before = stage_states(sweep.root, graph)
    problem = stop_launcher(sweep, args.timeout)
    after = stage_states(sweep.root, graph)
    active = (State.RUNNING, State.PENDING)
    states = {k: before[k] if before[k].state in active and after[k].state is not State.DONE else after[k] for k in graph}
    if problem is None:
        with launch_lock(sweep, timeout_s=args.timeout):
            stopped = executors.cancel(sweep.root, graph, states, None, log=_log)
    else:  # its jobs are stopped all the same
        stopped = executors.cancel(sweep.root, graph, states, None, log=_log)
    print(f"{len(stopped)} stage job(s) cancelled; resume with the launch command (finished stages are kept)")
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    return 0


def stop_launcher(sweep: SweepDir, timeout_s: float) -> str | None:
    """Stop the launcher that holds the sweep's lock, if any: SIGTERM (which it handles as a
    Ctrl-C, whatever it inherited: see :func:`stop_on_sigterm`), then SIGKILL after ``timeout_s``.
    Returns None once the lock is free, else why it is not (a launcher on another host, or one
    that outlived both signals)."""
    import os
    import signal

    try:
        holder = sweep.lock_file.read_text().strip()
    except FileNotFoundError:
        return None
    pid = local_pid(holder)
    if pid is not None and pid != os.getpid():
        try:
            os.kill(pid, signal.SIGTERM)
            _log(f"[cancel] stopping the local launcher (pid {pid})")
        except ProcessLookupError:
            pass
    try:
        with launch_lock(sweep, timeout_s=timeout_s):
            return None
    except TimeoutError:
        if pid is None:
            return (f"the sweep is held by {holder}, which is not a process of this machine: stop that launcher "
                    f"there (its jobs here were cancelled)")
    try:
        os.kill(pid, signal.SIGKILL)
        _log(f"[cancel] the launcher (pid {pid}) did not stop within {timeout_s:.0f}s of SIGTERM: killed it")
    except ProcessLookupError:
        pass
    try:
        with launch_lock(sweep, timeout_s=10):
            return None
    except TimeoutError:
        return f"the launcher (pid {pid}) still holds {sweep.lock_file} after SIGTERM and SIGKILL"


# -- run: on every rank of a job started by hand ---------------------------------------------


def run_sweep(path: str, overrides: list[str] = (), keys=None, on_step=None) -> dict:
    """Load a sweep and run its stages (those in ``keys``, default all) in order on every rank of
    this job (torchrun, srun or submitit tasks): finished ones are skipped, an interrupted one
    resumes."""
    plan = load_plan(path, list(overrides))
    world = distributed.detect()
    with distributed.session(world, distributed.device_for(world, plan.run.device)):
        return distributed.run_plan(plan, keys, on_step)


def run_main(argv=None, prog: str = "python -m hpc_kd.launch run") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Run the sweep's missing stages in order on every "
                                                            "rank of this torchrun/srun job.")
    parser.add_argument("sweep", help="sweep YAML file")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. distill.tau=2")
    parser.add_argument("--stage", action="append", default=None, help="run only this stage key (repeatable)")
    args = parser.parse_intermixed_args(argv)
    try:
        run_sweep(args.sweep, args.overrides, args.stage)
    except ConfigError as err:
        if distributed.detect().is_main:
            print(f"config error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
