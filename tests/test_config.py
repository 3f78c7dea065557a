"""Every invalid config fails before work starts, with the key path and what is allowed; the
command line turns it into one line on stderr and exit status 2, with no traceback."""
from pathlib import Path
import subprocess
import sys

import pytest

from hpc_kd.config import ConfigError, ExperimentConfig, from_dict, parse_override
from hpc_kd.plan import experiment, load_plan

from .conftest import tiny_config, write_yaml


def error_of(data):
    with pytest.raises(ConfigError) as info:
        experiment(data)  # the config's own checks, then the plan's (registries, disk)
    return info.value


def load_experiment(path, overrides=()):
    """The one cell of a sweep file without a grid, as the launcher builds it."""
    return load_plan(path, list(overrides)).cells[0].config


CASES = [
    ({"distill": {"polcy": "min_loss"}}, "distill.polcy", "unknown key; allowed: policy, tau"),
    ({"student": {"train": {"epochs": "three"}}}, "student.train.epochs", "expected an integer"),
    ({"distill": {"tau": True}}, "distill.tau", "expected a number"),
    ({"distill": {"policy": "best"}}, "distill.policy", "allowed: teacher, tutor, min_loss"),
    ({"distill": {"loss": "cosine"}}, "distill.loss", "allowed: kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tv, mse"),
    ({"data": {"source": "kaggle"}}, "data.source", "allowed: embedded, hf, local"),
    ({"data": {"name": "imdb"}}, "data.name", "allowed: rotten_tomatoes"),
    ({"student": {"layers": [5]}}, "student.layers", "smaller than its tutor"),
    ({"student": {"layers": [4, 4]}}, "student.layers", "smaller than its tutor"),
    ({"tutor": {"layers": 6}}, "tutor.layers", "smaller than its teacher (6 layers)"),
    ({"teacher": {"layers": 3}, "tutor": {"layers": 3}, "student": {"layers": 2}}, "tutor.layers", "smaller than its teacher"),
    ({"distill": {"tau": 0}}, "distill.tau", "must be > 0"),
    ({"distill": {"tau": -1.5}}, "distill.tau", "must be > 0"),
    ({"distill": {"alpha": 1.5}}, "distill.alpha", "must be in [0, 1]"),
    ({"distill": {"alpha": -0.1}}, "distill.alpha", "must be in [0, 1]"),
    ({"tutor": {"train": {"batch_size": 0}}}, "tutor.train.batch_size", "must be >= 1"),
    ({"teacher": {"train": {"epochs": 0}}}, "teacher.train.epochs", "must be >= 1"),
    ({"data": {"source": "local", "train_file": "/nope/train.csv", "validation_file": "/nope/v.csv"}},
     "data.train_file", "file not found: /nope/train.csv"),
    ({"data": {"source": "local"}}, "data.train_file", "required when source is 'local'"),
    ({"teacher": {"pretrained": "/no/such/model"}}, "teacher.pretrained", "model folder not found"),
    ({"data": "oops"}, "data", "expected a mapping"),
    ({"run": {"device": "tpu"}}, "run.device", "allowed: auto, cpu, cuda"),
    ({"distill": {"random_teacher_prob": 1.5}}, "distill.random_teacher_prob", "must be in [0, 1]"),
]


@pytest.mark.parametrize("data,key,message", CASES, ids=[c[1] + ":" + c[2][:20] for c in CASES])
def test_invalid_configs_name_the_key(data, key, message):
    err = error_of(data)
    assert err.key == key
    assert message in err.message


def test_defaults_are_valid_and_frozen():
    cfg = from_dict(ExperimentConfig, {})
    assert cfg.student.layers == (4,) and cfg.tutor.layers == 5
    with pytest.raises(Exception):
        cfg.seed = 3  # frozen


def test_scalars_coerced_where_natural():
    cfg = from_dict(ExperimentConfig, {"student": {"layers": 3}, "teacher": {"train": {"lr": "2e-5"}}})
    assert cfg.student.layers == (3,) and cfg.teacher.train.lr == 2e-5


def test_overrides(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"distill": {"tau": 2.0}})
    cfg = load_experiment(path, ["distill.alpha=0.25", "student.layers=[3, 2]", "seed=7"])
    assert (cfg.distill.tau, cfg.distill.alpha, cfg.student.layers, cfg.seed) == (2.0, 0.25, (3, 2), 7)
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    with pytest.raises(ConfigError):
        parse_override("no-equals-sign")
    with pytest.raises(ConfigError) as info:
        load_experiment(path, ["distill.temperature=3"])
    assert info.value.key == "distill.temperature"


def test_grid_points_are_validated(tmp_path, tiny_model):
    data = tiny_config(tiny_model, tmp_path, grid={"distill.policy": ["teacher", "nope"]})
    with pytest.raises(ConfigError) as info:
        load_plan(write_yaml(tmp_path / "s.yaml", data))
    assert info.value.key == "distill.policy" and "allowed: teacher, tutor, min_loss" in info.value.message
    data = tiny_config(tiny_model, tmp_path, grid={"distill.tau": 2.0})
    with pytest.raises(ConfigError) as info:
        load_plan(write_yaml(tmp_path / "s.yaml", data))
    assert info.value.key == "grid.distill.tau"


@pytest.mark.parametrize("override,needle", [
    ("distill.policy=best", "config error: distill.policy: unknown policy 'best'; allowed: teacher, tutor, min_loss"),
    ("distill.tau=0", "config error: distill.tau: must be > 0, got 0.0"),
    ("student.layers=[9]", "config error: student.layers: each student must be smaller than its tutor"),
    ("bogus=1", "config error: bogus: unknown key; allowed:"),
])
def test_cli_exits_2_with_one_line_and_no_traceback(tmp_path, tiny_model, override, needle):
    path = write_yaml(tmp_path / "s.yaml", tiny_config(tiny_model, tmp_path / "out"))
    proc = subprocess.run([sys.executable, "-m", "hpc_kd.launch", str(path), override, "--executor", "local"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith(needle)
    assert not (tmp_path / "out").exists()  # nothing was started


def test_cli_missing_config_file(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hpc_kd.launch", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "config file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_yaml_cannot_construct_objects(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    assert "not valid YAML" in info.value.message


def test_every_field_is_documented_and_the_readme_reference_is_current():
    """torchtitan's habit: a comment per field, where it is defined; the README's reference is
    generated from them and must not drift."""
    import dataclasses
    import re
    from pathlib import Path

    from hpc_kd import config

    sections = [ExperimentConfig, config.DataConfig, config.TeacherConfig, config.TutorConfig,
                config.StudentConfig, config.DistillConfig, config.TrainConfig, config.DeepSpeedConfig,
                config.RunConfig]
    for cls in sections:
        docs = config.field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no #: comment"
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"<!-- config-reference:[^\n]*-->\n(.*?)<!-- /config-reference -->", readme, re.S)
    assert block, "README.md lost its generated config reference"
    assert block.group(1) == config.reference(), "README's config reference is stale: paste `python -m hpc_kd.config`"


def test_bad_data_file_fails_the_launch_before_anything_is_written(tmp_path, tiny_model):
    train = tmp_path / "train.csv"
    train.write_text("text,label\ngood film,pos\nbad film,neg\n")
    (tmp_path / "val.csv").write_text("text,label\ngood,1\nbad,0\n")
    data = tiny_config(tiny_model, tmp_path / "out", data={"source": "local", "train_file": str(train),
                                                           "validation_file": str(tmp_path / "val.csv")})
    path = write_yaml(tmp_path / "s.yaml", data)
    proc = subprocess.run([sys.executable, "-m", "hpc_kd.launch", str(path), "--executor", "slurm"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith(f"config error: data.label_column ('label'): {train}, row 1 (line 2): string label 'pos'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text,needle", [
    ("", "is empty: a sweep file needs at least a name"),
    ("# only a comment\n", "is empty: a sweep file needs at least a name"),
    ("name: t\ngrid:\n  ~: [1, 2]\n", "config error: grid.None: a grid axis must be a dotted config key"),
    ("name: t\ngrid:\n  5: [1, 2]\n", "config error: grid.5: a grid axis must be a dotted config key"),
    ("name: !!python/name:os.system t\n", "is not valid YAML: could not determine a constructor for the tag"),
    ("name: [t\n", "is not valid YAML:"),
])
def test_bad_sweep_files_exit_2_in_one_line(tmp_path, text, needle):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "hpc_kd.launch", str(path), "--executor", "local"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert needle in proc.stderr
    assert not (tmp_path / "results").exists()  # nothing started (an empty file once ran a default sweep)


def test_a_grid_axis_can_be_overridden_from_the_command_line(tmp_path, tiny_model):
    data = tiny_config(tiny_model, tmp_path, grid={"distill.policy": ["teacher", "min_loss"], "seed": [0, 1]})
    path = write_yaml(tmp_path / "s.yaml", data)
    plan = load_plan(path, ["grid.distill.policy=[teacher]"])
    assert [c.values for c in plan.cells] == [{"distill.policy": "teacher", "seed": 0}, {"distill.policy": "teacher", "seed": 1}]
    plan = load_plan(path, ["grid.student.layers=[[2], [1]]", "seed=3", "grid.seed=[3]"])
    assert sorted((c.config.distill.policy, c.config.student.layers) for c in plan.cells) == sorted(
        (p, d) for p in ("teacher", "min_loss") for d in ((2,), (1,)))
    assert len(load_plan(path, ["grid=null"]).cells) == 1
    union = dict(data, grid=[{"distill.policy": ["teacher"]}, {"distill.policy": ["min_loss"], "distill.tutor_update": ["frozen"]}])
    plan = load_plan(write_yaml(tmp_path / "u.yaml", union), ["grid.seed=[0, 1]"])
    assert len(plan.cells) == 4 and {c.tutor_mode.value for c in plan.cells} == {"none", "frozen"}


@pytest.mark.parametrize("distill,key", [({"jsd_beta": 1.5}, "distill.jsd_beta"), ({"skew_lambda": 1.0}, "distill.skew_lambda")])
def test_divergence_parameters_are_checked(distill, key):
    with pytest.raises(ConfigError) as err:
        from_dict(ExperimentConfig, {"distill": distill})
    assert err.value.key == key


def test_the_committed_demo_run_is_still_found_by_this_code():
    """Signatures are stable: a setting added later is left out of a signature at its default, so
    runs made before it are reused. The demo's committed sweep.json names the stages that computed
    results/demo; this code must plan the same keys for jobs/demo.yaml."""
    import json

    root = Path(__file__).resolve().parents[1]
    committed = json.loads((root / "results" / "demo" / "sweep.json").read_text())["stages"]
    assert sorted(load_plan(root / "jobs" / "demo.yaml").stages) == sorted(committed)


@pytest.mark.parametrize("name", ["study_rt", "chat_demo", "lm_demo", "study_lm"])
def test_the_committed_studies_are_still_found_by_this_code(name):
    """The same for the other committed results: every stage of the committed sweep is planned with
    the same key by its job file (which may have grown, as study_rt did by four policies)."""
    import json

    root = Path(__file__).resolve().parents[1]
    committed = json.loads((root / "results" / name / "sweep.json").read_text())["stages"]
    assert set(committed) <= set(load_plan(root / "jobs" / f"{name}.yaml").stages)
