"""Scale-out with 2 gloo processes on CPU: fit() under DDP gives the weights of one process on the
same global batches, and monte_carlo() sharded over the ranks equals the unsharded run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cimext
from cimext import distributed
from cimext.train import fit
from cimext.worstcase import monte_carlo

WORLD = 2
# (method, settings): vanilla, and A-TRICE with both terms (the δ-gradients are all-reduced
# before the sign step and the RCG noise seed is the same on every rank).
CASES = [("vanilla", {}), ("atrice", dict(alpha=0.5, th_g=0.05))]


def _data(batch_size):
    from test_train import _blobs
    from torch.utils.data import DataLoader

    train = DataLoader(
        _blobs(200, 0),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    val = DataLoader(_blobs(96, 1), batch_size=48)
    return train, val


def _model():
    from test_train import _mlp

    return _mlp(seed=0)


def _train(method, settings, batch_size):
    train, val = _data(batch_size)
    model = _model()
    res = fit(model, train, val, method, epochs=2, lr=1e-2, progress=False, **settings)
    return model, res


def _mc(model):
    _, val = _data(32)
    return monte_carlo(
        model, val, cimext.DeviceModel(sigma=0.3), 11, seed=5, instances_per_call=3, progress=False
    )


# 32 divides into equal slices; 25 gives 13 / 12 (the loss weighting keeps the global mean).
BATCH_SIZES = (32, 25)


def _worker(rank, init_file, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        assert distributed.is_initialized() and distributed.world_size() == WORLD
        results = {}
        for bs in BATCH_SIZES:
            for method, settings in CASES:
                model, res = _train(method, settings, bs)
                results[bs, method] = dict(
                    state={k: v.clone() for k, v in model.state_dict().items()},
                    history=res.history,
                )
        results["mc"] = _mc(model).accuracies
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Every rank's results of one 2-process gloo run (spawned once for the module)."""
    tmp = tmp_path_factory.mktemp("ddp")
    mp.start_processes(
        _worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True, start_method="spawn"
    )
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("method,settings", CASES)
def test_ddp_matches_single_process(ddp_runs, method, settings, batch_size):
    torch.set_num_threads(1)
    model, res = _train(method, settings, batch_size)
    for r in ddp_runs:
        for k, v in model.state_dict().items():
            torch.testing.assert_close(r[batch_size, method]["state"][k], v, rtol=1e-4, atol=1e-5)
    # The epoch losses are reduced over the ranks: the same as one process sees.
    for row, ref in zip(ddp_runs[0][batch_size, method]["history"], res.history, strict=True):
        assert row["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-4)
        assert row["val_metric"] == pytest.approx(ref["val_metric"])


def test_sharded_monte_carlo_equals_unsharded(ddp_runs):
    assert ddp_runs[0]["mc"] == ddp_runs[1]["mc"]
    model = _model()
    model.load_state_dict(ddp_runs[0][BATCH_SIZES[-1], "atrice"]["state"])
    ref = _mc(model)
    assert ddp_runs[0]["mc"] == ref.accuracies
    assert len(set(ref.accuracies)) > 1  # the instances really differ


def test_helpers_outside_a_process_group():
    assert not distributed.is_initialized()
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.all_gather_object(3) == [3]
    t = torch.ones(2)
    distributed.all_reduce_sum_([t])
    assert t.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="torchrun"):
        train, val = _data(32)
        fit(_model(), train, val, epochs=1, progress=False, distributed=True)


@pytest.mark.slow
def test_torchrun_cli_train(tmp_path):
    """`torchrun --nproc-per-node 2 -m cimext.cli train` trains with DDP and writes once."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "-m",
            "cimext.cli",
            "train",
            "--method",
            "atrice",
            "--alpha",
            "0.5",
            "--epochs",
            "1",
            "--quiet",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "train.json").exists()
    assert r.stdout.count("test accuracy") == 1
