"""scripts/gpu_check.sh and bench/bench_gpu.py without a GPU: the script's control flow in its dry
run (a failing, hanging or skipped step is logged and the next one runs; summary.json and the exit
status say what happened) and the benchmark's CPU dry run of every code path."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _run(out: Path, **env) -> subprocess.CompletedProcess:
    e = dict(os.environ, CIMEXT_GPU_CHECK_DRY="1", PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    e.update(env)
    return subprocess.run(
        ["bash", str(SCRIPT), str(out)], env=e, capture_output=True, text=True, timeout=600
    )


def _steps(out: Path) -> dict[str, str]:
    summary = json.loads((out / "summary.json").read_text())
    return {s["step"]: s["status"] for s in summary["steps"]}


def test_failures_are_logged_and_the_next_steps_run(tmp_path):
    r = _run(
        tmp_path,
        CIMEXT_GPU_CHECK_FAIL="build,test-cuda,bench",
        CIMEXT_GPU_CHECK_HANG="test-triton",
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert _steps(tmp_path) == {
        "env": "ok",
        "build": "failed",
        "build-cpu-only": "ok",
        "test-cuda": "failed",
        "test-triton": "timeout",
        "bench": "failed",
    }
    log = (tmp_path / "gpu_check.log").read_text()
    assert "== [bench] failed (rc 3" in log and "gpu_check: FAILED" in log
    assert (tmp_path / "build.log").is_file()
    assert "summary" in r.stdout


def test_no_build_skips_the_rest(tmp_path):
    r = _run(tmp_path, CIMEXT_GPU_CHECK_FAIL="build,build-cpu-only")
    assert r.returncode == 1
    steps = _steps(tmp_path)
    assert steps["test-cuda"] == steps["test-triton"] == steps["bench"] == "skipped"


def test_needs_an_outdir():
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "usage" in r.stderr


@pytest.mark.slow
def test_dry_run_passes(tmp_path):
    # Every step for real except the install: the CUDA tests (skipped here), a Triton test
    # subset in the interpreter and the benchmark on the CPU with tiny shapes.
    r = _run(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert set(_steps(tmp_path).values()) == {"ok"}
    rows = json.loads((tmp_path / "bench_gpu.json").read_text())["rows"]
    assert {r["provider"] for r in rows} >= {"clean", "cimext-cpp", "cimext-triton"}


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "bench_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("only", ["linear", "conv", "mc"])
def test_bench_gpu_cpu_dry_run(tmp_path, only, capsys):
    bench = _bench_module()
    path = tmp_path / "b.json"
    rc = bench.main(["--device", "cpu", "--quick", "--only", only, "--json", str(path)])
    assert rc == 0, capsys.readouterr().out
    rows = json.loads(path.read_text())["rows"]
    assert rows and not [r for r in rows if "error" in r]
    if only == "mc":
        by = {r["provider"]: r for r in rows}
        assert by["cimext monte_carlo"]["instances_per_s"] > 0
        assert by["cimext monte_carlo"]["speedup_vs_loop"] > 0
        assert 0.0 <= by["cimext monte_carlo"]["mean_accuracy"] <= 1.0
    else:
        providers = {r["provider"] for r in rows}
        assert providers == {"clean", "cimext-cpp", "cimext-triton"}
        assert all(r["vs_clean"] > 0 for r in rows if r["provider"] != "clean")


def test_bench_gpu_reports_a_failing_case(tmp_path, monkeypatch):
    # A provider that raises is a row with its error; the other providers and cases still run.
    bench = _bench_module()

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(bench.ops, "perturbed_conv2d", broken)
    path = tmp_path / "b.json"
    rc = bench.main(["--device", "cpu", "--quick", "--only", "conv", "--json", str(path)])
    assert rc == 1
    rows = json.loads(path.read_text())["rows"]
    errors = [r for r in rows if "error" in r]
    assert errors and all("boom" in r["error"] for r in errors)
    assert any(r["provider"] == "clean" and "median_ms" in r for r in rows)


def test_bench_gpu_budget_skips_cases(tmp_path):
    bench = _bench_module()
    path = tmp_path / "b.json"
    rc = bench.main(
        ["--device", "cpu", "--quick", "--only", "linear,mc", "--budget", "0", "--json", str(path)]
    )
    data = json.loads(path.read_text())
    assert rc == 0 and len(data["skipped"]) >= 1
