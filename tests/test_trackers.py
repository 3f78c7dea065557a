"""Experiment trackers, offline: a tiny TEID sweep mirrored to TensorBoard, wandb (offline mode) and
MLflow (file store), its student killed and resumed; the values read back from each tracker's own
files (TensorBoard's event reader, the wandb offline run files, MLflow's client) equal
metrics.jsonl and result.json, with no step twice; trackers change no result, and one that cannot
start or log is named once and dropped."""
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from hpc_kd.config import ConfigError, ExperimentConfig, from_dict

from .conftest import interrupt_and_resume, make_plan, run_plan, strip_times

ALL = ["tensorboard", "wandb", "mlflow"]
#: checkpoints at steps 4, 6 (epoch end), 8, 12; killed after step 11, the resume discards the
#: train record of step 10 and writes it again
RUN = {"checkpoint_every": 4, "log_every": 2}
KILL_AT = 11


def offline_env(mp, home: Path) -> None:
    """No network, nothing outside ``home``; each tool's defaults (inside the sweep folder) otherwise."""
    for name in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_API_KEY", "MLFLOW_TRACKING_URI"):
        mp.delenv(name, raising=False)
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("WANDB__DISABLE_STATS", "true")  # no system-metrics sampler
    mp.setenv("WANDB__DISABLE_META", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        mp.setenv(name, str(home / name.lower()))


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    offline_env(monkeypatch, tmp_path / "home")


@pytest.fixture(scope="module")
def sweeps(tiny_model, tmp_path_factory):
    """The same tiny chain twice: without trackers, and with all three (its student killed after
    step 11 and resumed)."""
    base = tmp_path_factory.mktemp("trackers")
    with pytest.MonkeyPatch.context() as mp:
        offline_env(mp, base / "home")
        ref = make_plan(tiny_model, base / "ref", run=RUN)
        reference = run_plan(ref)
        plan = make_plan(tiny_model, base / "tracked", run={**RUN, "trackers": ALL})
        student = list(plan.stages)[-1]
        interrupt_and_resume(plan, student, KILL_AT)
        results = {key: stage.run_dir(plan.root).result() for key, stage in plan.stages.items()}
    return ref, reference, plan, results


def expected_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as the trackers should show it: each number of a record as ``<type>/<key>``
    (nested: ``<type>/<key>/<inner>``) at the record's step."""
    out: dict[str, list] = {}

    def add(name, value, step):
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{name}/{k}", v, step)
        elif isinstance(value, (bool, int, float)):
            out.setdefault(name, []).append((step, float(value)))

    for r in records:
        for key, value in r.items():
            if key not in ("type", "step"):
                add(f"{r['type']}/{key}", value, r["step"])
    return out


def trained(plan):
    """The stages that log steps (all but the cache), with their metrics."""
    return {key: stage.run_dir(plan.root).metrics() for key, stage in plan.stages.items() if stage.kind != "cache"}


# -- configuration ----------------------------------------------------------------------------


def test_unknown_or_repeated_trackers_are_refused_naming_the_key():
    with pytest.raises(ConfigError) as err:
        from_dict(ExperimentConfig, {"run": {"trackers": ["tensorboard", "comet"]}})
    assert err.value.key == "run.trackers" and "allowed: tensorboard, wandb, mlflow" in str(err.value)
    with pytest.raises(ConfigError) as err:
        from_dict(ExperimentConfig, {"run": {"trackers": ["wandb", "wandb"]}})
    assert err.value.key == "run.trackers"
    assert from_dict(ExperimentConfig, {"run": {"trackers": "mlflow"}}).run.trackers == ("mlflow",)


def test_trackers_change_no_signature(tiny_model, tmp_path):
    assert list(make_plan(tiny_model, tmp_path, run={"trackers": ALL}).stages) == list(make_plan(tiny_model, tmp_path).stages)


# -- what each tracker holds ---------------------------------------------------------------------


def test_tracked_run_has_the_same_results_and_metrics(sweeps):
    ref, reference, plan, results = sweeps
    assert [strip_times(r) for r in results.values()] == [strip_times(r) for r in reference.values()]
    assert list(trained(plan).values()) == list(trained(ref).values())
    student = list(trained(plan).values())[-1]
    assert all("selection" in r and "teacher_share" in r for r in student if r["type"] == "train")


def test_tensorboard_holds_metrics_jsonl_once(sweeps):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, plan, results = sweeps
    for key, records in trained(plan).items():
        events = EventAccumulator(str(plan.root / "tensorboard" / key), size_guidance={"scalars": 0, "tensors": 0})
        events.Reload()
        tags = events.Tags()["scalars"]
        expected = expected_series(records)
        for name, series in expected.items():
            got = [(e.step, e.value) for e in events.Scalars(name)]
            assert got == [(s, float(np.float32(v))) for s, v in series], (key, name)  # TensorBoard keeps float32
        assert {t for t in tags if t.startswith("throughput/")} == {"throughput/steps_per_s", "throughput/examples_per_s"}
        for name, value in (("result/test/accuracy", results[key]["test"]["accuracy"]), ("result/params", results[key]["params"]),
                            ("result/test/collapsed", float(results[key]["test"]["collapsed"]))):
            assert [e.value for e in events.Scalars(name)] == [float(np.float32(value))]
        assert set(tags) - set(expected) == {t for t in tags if t.startswith(("throughput/", "result/"))}
        assert "config/text_summary" in events.Tags()["tensors"]


def wandb_records(path: Path) -> list:
    """The records of a wandb transaction log (``run-<id>.wandb``, LevelDB's log format: 32 KiB
    blocks of chunks, each with a 7-byte header: crc32, length, type full / first / middle / last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def wandb_sessions(root: Path, run_id: str) -> list[dict]:
    """Each offline session of run ``run_id``: its run record, history rows and summary, by start."""
    sessions = []
    files = root.glob(f"wandb/offline-run-*-{run_id}*/run-{run_id}.wandb")
    for file in sorted(files, key=lambda f: (f.parent.name[:27], int(f.parent.name[len(f"offline-run-YYYYMMDD_HHMMSS-{run_id}-"):] or 0))):
        session = {"run": None, "history": [], "summary": {}, "exit": None}
        for r in wandb_records(file):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                session["run"] = r.run
            elif kind == "history":
                session["history"].append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item})
            elif kind == "summary":
                session["summary"].update({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.summary.update})
            elif kind == "exit":
                session["exit"] = r.exit.exit_code
        sessions.append(session)
    return sessions  # by start: offline-run-<time>-<id>[-<n>] sorts so (n counts sessions started in one second)


def test_wandb_offline_runs_hold_metrics_jsonl_once(sweeps):
    from hpc_kd.trackers import wandb_id

    _, _, plan, results = sweeps
    student = list(plan.stages)[-1]
    for key, records in trained(plan).items():
        stage = plan.stages[key]
        sessions = wandb_sessions(plan.root, wandb_id(plan.root.name, key))
        assert len(sessions) == (2 if key == student else 1)
        assert [s["exit"] for s in sessions] == ([1, 0] if key == student else [0])  # the killed one, then done
        rows = [row for s in sessions for row in s["history"]]
        steps = [row["_step"] for row in rows]
        assert steps == sorted(set(steps)), f"{key}: a step shown twice or out of order: {steps}"
        for name, series in expected_series(records).items():
            assert [(row["_step"], row[name]) for row in rows if name in row] == series, (key, name)
        run = sessions[-1]["run"]
        assert (run.run_group, run.job_type, run.display_name) == (plan.root.name, stage.kind, key)
        assert f"seed={stage.seed}" in run.tags and f"role={stage.role}" in run.tags
        assert stage.depth is None or f"depth={stage.depth}" in run.tags  # a teacher's depth: its pretrained one
        config = {i.key: json.loads(i.value_json) for i in run.config.update}
        assert config["stage.signature"] == stage.signature and config["train.lr"] == stage.train.lr
        summary = sessions[-1]["summary"]
        assert summary["result/test/accuracy"] == results[key]["test"]["accuracy"]
        assert summary["result/params"] == results[key]["params"]
    assert f"policy={plan.stages[student].policy}" in sessions[-1]["run"].tags


def test_mlflow_file_store_holds_metrics_jsonl_once(sweeps):
    from hpc_kd.trackers import flatten, mlflow_client

    _, _, plan, results = sweeps
    client = mlflow_client(plan.root)
    assert client.tracking_uri.startswith("file:") and (plan.root / "mlruns").is_dir()
    experiment = client.get_experiment_by_name(plan.root.name)
    for key, stage in plan.stages.items():
        [run] = client.search_runs([experiment.experiment_id], filter_string=f"tags.`hpc_kd.stage` = '{key}'")
        assert run.info.run_name == key and run.info.status == "FINISHED"
        assert run.data.tags["hpc_kd.signature"] == stage.signature and run.data.tags["role"] == stage.role
        params = run.data.params
        for name, value in flatten(stage.settings()).items():
            assert params[name] == (value if isinstance(value, str) else json.dumps(value)), name
        assert run.data.metrics["result/test/accuracy" if stage.kind != "cache" else "result/rows"] == \
            (results[key]["test"]["accuracy"] if stage.kind != "cache" else results[key]["rows"])
        if stage.kind == "cache":
            continue
        for name, series in expected_series(stage.run_dir(plan.root).metrics()).items():
            history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
            assert history == series, (key, name)


def test_aggregate_pushes_the_table(sweeps, capsys):
    from hpc_kd import aggregate
    from hpc_kd.launch import sweep_record
    from hpc_kd.rundir import SweepDir
    from hpc_kd.trackers import mlflow_client, wandb_id

    _, _, plan, _ = sweeps
    SweepDir(plan.root).write_sweep(sweep_record(plan))
    assert aggregate.main([str(plan.root), "--push", *ALL]) == 0
    out = capsys.readouterr().out
    assert all(f"table pushed to {name}" in out for name in ALL), out
    [session] = wandb_sessions(plan.root, wandb_id(plan.root.name, "table"))
    assert session["summary"]["results/_type"] == "table-file" and session["exit"] == 0
    [files] = plan.root.glob(f"wandb/offline-run-*-{wandb_id(plan.root.name, 'table')}/files")
    table = json.loads((files / session["summary"]["results/path"]).read_text())
    csv = (plan.root / "table.csv").read_text().splitlines()
    assert table["columns"] == csv[0].split(",") and len(table["data"]) == len(csv) - 1 == len(plan.stages) - 1
    assert (files / "table.md").read_text() == (plan.root / "table.md").read_text()
    client = mlflow_client(plan.root)
    experiment = client.get_experiment_by_name(plan.root.name)
    [run] = client.search_runs([experiment.experiment_id], filter_string="tags.`hpc_kd.stage` = 'table'")
    assert {"table.md", "table.csv"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert any((plan.root / "tensorboard" / "table").glob("events.out.tfevents.*"))


# -- trackers that fail ------------------------------------------------------------------------


def test_trackers_that_cannot_be_imported_change_nothing(sweeps, tiny_model, tmp_path, monkeypatch, capsys):
    """With none of the three packages importable the teacher trains exactly as without trackers;
    each tracker is named once, with the extra that installs it."""
    ref, reference, _, _ = sweeps
    for module in ("wandb", "mlflow", "mlflow.tracking", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    plan = make_plan(tiny_model, tmp_path, run={**RUN, "trackers": ALL})
    teacher = list(plan.stages)[0]
    result = run_plan(plan, only=[teacher])[teacher]
    assert strip_times(result) == strip_times(reference[teacher])
    assert plan.stages[teacher].run_dir(plan.root).metrics() == ref.stages[teacher].run_dir(ref.root).metrics()
    err = capsys.readouterr().err
    for name in ALL:
        assert err.count(f"[trackers] {name} could not start") == 1 and f"pip install -e '.[{name}]'" in err


def test_a_tracker_that_fails_is_dropped_after_one_warning(monkeypatch, tmp_path, capsys):
    """The fan-out: a tracker raising while logging is named once and gets nothing more; the others
    get everything."""
    from hpc_kd import trackers
    from hpc_kd.rundir import RunDir

    calls = []

    class Good:
        name = "good"

        def __init__(self, info):
            pass

        def rewind(self, kept, discarded):
            calls.append(("rewind", len(kept), len(discarded)))

        def log(self, point):
            calls.append(("log", point.step, point.values))

        def finish(self, summary, result):
            calls.append(("finish", summary.values))

        def close(self):
            calls.append(("close",))

    class Broken(Good):
        name = "broken"

        def log(self, point):
            raise ConnectionError("no route to host")

    monkeypatch.setattr(trackers, "BACKENDS", {"tensorboard": Good, "wandb": Broken})
    info = trackers.StageInfo("s", tmp_path, "distill-x", "distill", "x", "student", {}, {})
    run = trackers.MirroredRun(tmp_path / "run", trackers.Mirror(info, ["tensorboard", "wandb"]))
    run.start({})
    run.append_metrics({"type": "train", "step": 2, "loss": 1.0})
    run.append_metrics({"type": "train", "step": 4, "loss": 0.5})
    run.truncate_metrics(1)  # a resume back to step 2
    run.append_metrics({"type": "train", "step": 4, "loss": 0.5})
    run.finish({"steps": 4, "test": {"accuracy": 0.75}})
    assert run.metrics() == [{"type": "train", "step": 2, "loss": 1.0}, {"type": "train", "step": 4, "loss": 0.5}]
    assert calls[0] == ("log", 2, {"train/loss": 1.0})
    assert ("rewind", 1, 1) in calls and calls[-1] == ("finish", {"result/steps": 4.0, "result/test/accuracy": 0.75})
    assert capsys.readouterr().err.count("[trackers] broken failed for distill-x (ConnectionError: no route to host)") == 1


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from tests.conftest import make_plan
plan = make_plan(Path(sys.argv[1]), Path(sys.argv[2]), run={"checkpoint_every": 4, "log_every": 2, "trackers": sys.argv[3:]})
teacher = next(iter(plan.stages.values()))

def kill(trainer, record):
    if trainer.p.step == %d:
        os.kill(os.getpid(), signal.SIGKILL)  # no finally, no tracker closed: as a node that dies

teacher(plan.root, plan.run, on_step=kill)
""" % KILL_AT


def test_a_job_killed_outright_resumes_with_no_step_twice(sweeps, tiny_model, tmp_path):
    """SIGKILL the teacher's process after step 11 (checkpoint at 8, train record of step 10 on
    disk), resume it here: TensorBoard and MLflow (flushed at every record) equal metrics.jsonl;
    wandb shows no step twice and no value that metrics.jsonl does not hold (its service writes the
    run's file every second, so the killed session may have lost its last records)."""
    import os
    import subprocess

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hpc_kd.trackers import mlflow_client, wandb_id

    from .conftest import process_env

    ref, reference, _, _ = sweeps
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tiny_model), str(tmp_path), *ALL], cwd=repo,
                          env=process_env(WANDB_SERVICE=""),  # its own wandb service, as a new job has
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    plan = make_plan(tiny_model, tmp_path, run={**RUN, "trackers": ALL})
    teacher = list(plan.stages)[0]
    run = plan.stages[teacher].run_dir(plan.root)
    assert run.checkpoint.exists() and [r["step"] for r in run.metrics()][-1] == 10
    result = run_plan(plan, only=[teacher])[teacher]
    assert strip_times(result) == strip_times(reference[teacher])
    records = run.metrics()
    assert records == ref.stages[teacher].run_dir(ref.root).metrics()
    expected = expected_series(records)

    events = EventAccumulator(str(plan.root / "tensorboard" / teacher), size_guidance={"scalars": 0})
    events.Reload()
    for name, series in expected.items():
        assert [(e.step, e.value) for e in events.Scalars(name)] == [(s, float(np.float32(v))) for s, v in series], name

    client = mlflow_client(plan.root)
    experiment = client.get_experiment_by_name(plan.root.name)
    [found] = client.search_runs([experiment.experiment_id], filter_string=f"tags.`hpc_kd.stage` = '{teacher}'")
    assert found.info.status == "FINISHED"
    for name, series in expected.items():
        assert sorted((m.step, m.value) for m in client.get_metric_history(found.info.run_id, name)) == series, name

    sessions = wandb_sessions(plan.root, wandb_id(plan.root.name, teacher))
    assert len(sessions) == 2 and sessions[-1]["exit"] == 0
    rows = [row for s in sessions for row in s["history"]]
    steps = [row["_step"] for row in rows]
    assert steps == sorted(set(steps)), steps
    for name, series in expected.items():
        assert set((row["_step"], row[name]) for row in rows if name in row) <= set(series), name
    assert [row["_step"] for row in sessions[-1]["history"]] == [12]


def test_a_resumed_tensorboard_file_sorts_after_the_killed_ones(tmp_path):
    """TensorBoard applies a purge only to the files it read before: a resumed writer's file must
    sort after a file the killed process wrote in the same second, whatever the two pids."""
    import time

    from torch.utils.tensorboard import SummaryWriter

    from hpc_kd.trackers import after_existing_event_files

    killed = tmp_path / f"events.out.tfevents.{int(time.time()) + 1}.vm.99999.0"  # this second or the next
    killed.write_bytes(b"")
    after_existing_event_files(tmp_path)
    writer = SummaryWriter(str(tmp_path), filename_suffix=".resumed")
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir())[-1].endswith(".resumed")
