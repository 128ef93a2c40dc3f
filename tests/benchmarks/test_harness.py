"""The benchmark harness end to end on CPU at the smallest size: rows, ratios, CSV, markdown, PNG,
and failures that become rows instead of crashes."""
import csv

import pytest
import torch

from benchmarks import engines as E
from benchmarks import harness, report
from benchmarks.cli import main
from benchmarks.report import COLUMNS


class _Broken(E.NonPrivate):
    """Fails the way an engine meets a layer it has no rule for."""

    def step(self):
        raise NotImplementedError("no per-sample rule for BatchNorm2d (module 'bn')")


class _OutOfMemory(E.NonPrivate):
    def step(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny shapes: more threads only add contention on a shared CI box. Restored for other tests.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def opts():
    return harness.Options(steps=2, warmup=1, device=torch.device("cpu"))


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_cpu_run_writes_csv_markdown_and_plots(tmp_path, opts, monkeypatch):
    monkeypatch.setitem(E.ENGINES, "broken", _Broken)
    monkeypatch.setitem(E.ENGINES, "oom", _OutOfMemory)
    engines = [e for e in E.ENGINES if "triton" not in e]  # every engine that can run on CPU
    sweep = harness.Sweep(engines=engines, models=["tiny"], batch_sizes=[2], multiplicities=[2])
    rows = harness.run(sweep, opts, tmp_path, progress=False)

    by_engine = {r["engine"]: r for r in rows}
    assert rows[0]["engine"] == "non-private"  # the baseline runs first
    base = by_engine["non-private"]
    assert base["status"] == "ok" and base["throughput_x_nonprivate"] == 1.0
    assert base["rows"] == 4 and base["step_ms_median"] > 0 and base["peak_bytes"] >= 0

    # Installed optional engines run; the ones whose code is missing say so.
    for name in ("opacus-hooks", "opacus-ghost", "vmap", "dpfast-bk-torch", "dpfast-two-pass-torch"):
        assert by_engine[name]["status"] in ("ok", "unavailable"), by_engine[name]["error"]
    ok_private = [r for r in rows if r["status"] == "ok" and r["engine"] != "non-private"]
    assert ok_private, "at least one DP engine should run on CPU"
    for r in ok_private:
        assert r["throughput_x_nonprivate"] > 0 and r["samples_per_s"] > 0

    assert by_engine["broken"]["status"] == "error"
    assert "BatchNorm2d" in by_engine["broken"]["error"]
    assert by_engine["broken"]["throughput_x_nonprivate"] == ""
    assert by_engine["oom"]["status"] == "oom"
    assert "BatchNorm2d" in (tmp_path / "errors.log").read_text()  # full traceback kept

    table = _read_csv(tmp_path / "results.csv")
    assert list(table[0]) == COLUMNS and len(table) == len(rows)
    for r in table:  # every row says where and with what it ran
        for col in ("device_name", "torch", "triton", "commit", "dtype", "mem_method", "timer"):
            assert r[col], col
    md = (tmp_path / "results.md").read_text()
    assert "| tiny | 2 | 2 | fp32 | non-private |" in md and "error: NotImplementedError" in md
    png = tmp_path / "tiny_K2_fp32.png"
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_preset_ci_with_user_model(tmp_path, capsys):
    code = main(["--preset", "ci", "--engines", "non-private", "--models", "benchmarks.models:TinyUNet",
                 "--batch-sizes", "2", "--no-plots", "--no-progress", "--out", str(tmp_path),
                 "--search-max-batch", "8", "--search-mem-limit", "4", "--fail-on-error"])
    assert code == 0
    (row,) = _read_csv(tmp_path / "results.csv")
    assert row["model"] == "benchmarks.models:TinyUNet" and row["status"] == "ok"
    assert (row["max_batch"], row["max_batch_capped"]) == ("8", "True")  # real probes: 2, 4, 8
    assert "| benchmarks.models:TinyUNet | 2 | 1 | fp32 | non-private |" in capsys.readouterr().out


def test_unknown_model_becomes_an_unavailable_row(opts):
    row = harness.measure("non-private", "no_such_module:factory", 2, 1, "fp32", opts)
    assert row["status"] == "unavailable" and "no_such_module" in row["error"]


def test_max_batch_search_bisects_to_the_memory_limit(opts, monkeypatch):
    """The search logic alone, with a fake measurement: batches above 37 run out of memory."""
    probes = []

    def fake_measure(engine, model, b, k, dtype, opts, steps=None, warmup=None):
        probes.append(b)
        if b > 37:
            return {"status": "oom"}
        return {"status": "ok", "peak_bytes": b * 2 ** 20}

    monkeypatch.setattr(harness, "measure", fake_measure)
    opts.search_max_batch, opts.search_mem_limit_gib = 1024, 10.0
    best, capped, _ = harness.search_max_batch("e", "m", 1, "fp32", opts, start=4)
    assert 35 <= best <= 37 and not capped and len(probes) < 12
    opts.search_max_batch = 16  # the cap is reached before memory runs out
    assert harness.search_max_batch("e", "m", 1, "fp32", opts, start=4)[:2] == (16, True)
    opts.search_mem_limit_gib = 20 / 1024  # a budget of 20 MiB binds before the OOM does
    opts.search_max_batch = 1024
    assert 19 <= harness.search_max_batch("e", "m", 1, "fp32", opts, start=4)[0] <= 20
    opts.search_mem_limit_gib = None  # on CPU there is no safe OOM to probe for
    assert harness.search_max_batch("e", "m", 1, "fp32", opts)[0] is None


def test_ratios_are_taken_against_the_same_run_baseline(tmp_path, opts):
    def row(engine, dtype, sps, peak, status="ok"):
        r = {"engine": engine, "model": "m", "batch_size": 8, "multiplicity": 1, "dtype": dtype,
             "status": status, "error": "", "mem_method": "x", "note": ""}
        if status == "ok":
            r.update(samples_per_s=sps, peak_bytes=peak, step_ms_median=8e3 / sps,
                     step_ms_p25=1.0, step_ms_p75=2.0)
        return r

    rows = report.add_ratios([row("non-private", "fp32", 100.0, 2 ** 30), row("dp", "fp32", 50.0, 3 * 2 ** 30),
                              row("non-private", "bf16", 200.0, 2 ** 29), row("dp", "bf16", 0, 0, "error")])
    assert (rows[1]["throughput_x_nonprivate"], rows[1]["mem_x_nonprivate"]) == (0.5, 3.0)
    assert rows[1]["throughput_x_nonprivate_bf16"] == 0.25  # fp32 DP against the bf16 baseline
    assert rows[3]["throughput_x_nonprivate"] == "" and rows[3]["mem_x_nonprivate"] == ""
    env = harness.environment(torch.device("cpu"))
    report.write_markdown(rows, tmp_path / "r.md", env, opts)
    md = (tmp_path / "r.md").read_text()
    assert "x non-private bf16" in md and "| m | 8 | 1 | fp32 | dp | 160.0 [1.0–2.0] | 50.0 | 0.50 | 0.25 |" in md
