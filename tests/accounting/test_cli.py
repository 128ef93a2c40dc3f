"""``dpfast epsilon`` / ``dpfast calibrate``: output states epsilon, delta, adjacency and accountant;
--json is one JSON object; bad input exits 2 with a message and no traceback."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpfast.accounting import cli

EPSILON_ARGS = ["epsilon", "--noise-multiplier", "1.5", "--sample-rate", "0.04", "--steps", "2250", "--delta", "1e-5"]


def run(capsys, argv):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_epsilon_human_output(capsys):
    code, out, err = run(capsys, EPSILON_ARGS)
    assert code == 0 and err == ""
    assert "epsilon    = 6.8" in out and "upper bound" in out
    assert "delta      = 1e-05" in out
    assert "add/remove-one" in out and "accountant = prv" in out


def test_epsilon_json_rdp(capsys):
    code, out, _ = run(capsys, EPSILON_ARGS + ["--accountant", "rdp", "--json"])
    assert code == 0
    d = json.loads(out)
    assert d["accountant"] == "rdp" and d["adjacency"] == "add/remove-one" and d["delta"] == 1e-5
    assert d["epsilon"] == pytest.approx(7.33, abs=0.01) and d["steps"] == 2250


def test_calibrate_epochs_json(capsys):
    argv = ["calibrate", "--target-epsilon", "10", "--delta", "1e-5", "--sample-rate", str(4096 / 60000),
            "--epochs", "300", "--json"]
    code, out, _ = run(capsys, argv)
    assert code == 0
    d = json.loads(out)
    assert d["steps"] == 4395 and d["epochs"] == 300
    assert d["epsilon"] <= 10 and d["accountant"] == "prv" and d["adjacency"] == "add/remove-one"
    assert 2.3 < d["noise_multiplier"] < 2.45


def test_calibrate_human_output(capsys):
    argv = ["calibrate", "--target-epsilon", "2", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "1000",
            "--accountant", "rdp"]
    code, out, _ = run(capsys, argv)
    assert code == 0
    for field in ("noise_multiplier =", "epsilon          =", "delta            = 1e-05", "add/remove-one", "rdp"):
        assert field in out


@pytest.mark.parametrize("argv,message", [
    (["epsilon", "--noise-multiplier", "1", "--sample-rate", "2", "--steps", "3", "--delta", "1e-5"], "sample_rate"),
    (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "3", "--delta", "0"], "delta"),
    (["calibrate", "--target-epsilon", "1e-6", "--delta", "1e-5", "--sample-rate", "1", "--steps", "10",
      "--accountant", "rdp"], "cannot be reached"),
])
def test_invalid_values_exit_2_with_a_message(capsys, argv, message):
    code, out, err = run(capsys, argv)
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["epsilon", "--noise-multiplier", "-1", "--sample-rate", "0.1", "--steps", "3", "--delta", "1e-5"],
    ["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "1.5", "--delta", "1e-5"],
    ["calibrate", "--target-epsilon", "1", "--delta", "1e-5", "--sample-rate", "0.1"],  # neither steps nor epochs
    ["calibrate", "--target-epsilon", "1", "--delta", "1e-5", "--sample-rate", "0.1", "--steps", "5", "--epochs", "1"],
    ["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "3", "--delta", "1e-5",
     "--accountant", "moments"],
])
def test_usage_errors_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_add_commands_on_another_parser(capsys):
    # how the dpfast command mounts these: its own parser, its own subparsers, func(args) -> exit code
    parser = argparse.ArgumentParser(prog="dpfast")
    cli.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(EPSILON_ARGS + ["--accountant", "rdp"])
    assert args.func(args) == 0
    assert "7.3" in capsys.readouterr().out


def test_module_runs_standalone():
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "dpfast.accounting.cli", *EPSILON_ARGS, "--accountant", "rdp", "--json"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["epsilon"] == pytest.approx(7.33, abs=0.01)
