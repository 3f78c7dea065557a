"""Run by tests/test_distributed.py on every rank of ``torch.distributed.run``: one process group,
then several sweeps in order (one launch amortises the start-up of the ranks).

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py JOBS.json

JOBS.json: a list of ``{"sweep": path, "stop_at": step or null}``. ``stop_at`` interrupts the
sweep's last stage on every rank right after that optimiser step (as a preempted job would be),
leaving its checkpoint behind; the next job runs.
"""
import json
import sys

from hpc_kd import distributed
from hpc_kd.plan import load_plan


class Stopped(Exception):
    pass


def main(path: str) -> None:
    jobs = json.loads(open(path).read())
    world = distributed.detect()
    with distributed.session(world, "cpu"):
        for job in jobs:
            plan = load_plan(job["sweep"])
            *upstream, last = plan.stages
            distributed.run_plan(plan, keys=upstream, log=lambda *_: None)

            def stop(trainer, record, at=job.get("stop_at")):
                if at is not None and trainer.p.step == at:
                    raise Stopped

            try:
                distributed.run_plan(plan, keys=[last], on_step=stop, log=lambda *_: None)
            except Stopped:
                print(f"[worker] rank {world.rank}: stopped {last} at step {job['stop_at']}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
