"""bench/bench_linear_floor.py runs and reports consistent rows (a small shape, one round)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _module():
    spec = importlib.util.spec_from_file_location("floor", ROOT / "bench" / "bench_linear_floor.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("cpu_time", [False, True])
def test_floor_bench_rows(tmp_path, cpu_time):
    path = tmp_path / "floor.json"
    argv = ["--shape", "16,64,24", "--rounds", "1", "--reps", "1", "--simd", "0,2"]
    argv += ["--json", str(path)] + (["--cpu-time", "--threads", "1"] if cpu_time else [])
    prev = torch.get_num_threads()
    try:
        assert _module().main(argv) == 0
    finally:
        torch.set_num_threads(prev)
    data = json.loads(path.read_text())
    ms = data["ms"]
    assert ms["floor"] == pytest.approx(ms["clean"] + ms["normals"])
    assert {"perturbed_linear scalar", "clean", "normals"} <= set(ms)
    assert data["simd"]["0"] == 0 and data["simd"]["2"] <= 2
    assert torch.ops.cimext._cpu_simd() == data["simd"]["2"]  # the level is restored


def test_floor_bench_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        _module().main(["--shape", "1,2"])
    with pytest.raises(SystemExit):
        _module().main(["--simd", "3"])
