"""The one console script, ``hpc-kd`` (``python -m hpc_kd``), dispatches to every command."""
from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

from hpc_kd import cli

ROOT = Path(__file__).resolve().parents[1]


def test_the_console_script_is_declared_and_dispatches(tmp_path, capsys):
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("hpc-kd") == "hpc_kd.cli:main"  # pip install -e . made it
    assert cli.main(["--help"]) == 0 and "hpc-kd launch SWEEP.yaml" in capsys.readouterr().out
    assert cli.main(["nope"]) == 2
    assert "unknown command 'nope'; allowed: launch, status, cancel, aggregate, run" in capsys.readouterr().err
    for command in ("status", "cancel", "aggregate"):  # each reaches its own command, which refuses a non-sweep
        assert cli.main([command, str(tmp_path)]) == 2
        assert f"error: {tmp_path} holds no sweep.json" in capsys.readouterr().err
    assert cli.main(["launch", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    out = subprocess.run([sys.executable, "-m", "hpc_kd", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and "hpc-kd status results/<sweep>" in out.stdout
