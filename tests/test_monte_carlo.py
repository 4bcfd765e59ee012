"""cimext.worstcase.monte_carlo: per-instance accuracies, reproducibility, agreement with a
plain per-instance loop, bad input."""

import importlib

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import cimext
from cimext import DeviceModel
from cimext.worstcase import instance_seeds, monte_carlo


def _setup(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 5)
    )
    x = torch.randn(50, 1, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(-1)  # labels the clean model gets right
    data = DataLoader(TensorDataset(x, y), batch_size=16)
    return cimext.convert(net), data


DEV = DeviceModel(sigma=0.6)


def test_matches_per_instance_loop():
    net, data = _setup()
    res = monte_carlo(net, data, DEV, 7, seed=3, instances_per_call=3, progress=False)
    assert res.clean_accuracy == 1.0 and res.n == 7 and res.samples == 50
    for i, s in enumerate(res.seeds()):
        with cimext.instance(net, seed=s):
            for m in [m for _, m in cimext.cim_layers(net)]:
                m.device = DEV
            acc = sum(int((net(x).argmax(-1) == y).sum()) for x, y in data) / 50
        assert res.accuracies[i] == pytest.approx(acc), i
    assert res.min <= res.mean <= res.max and res.std > 0
    assert res.quantile(0.0) == res.min and res.quantile(1.0) == res.max


def test_reproducible_prefix_and_chunking_independent():
    net, data = _setup()
    a = monte_carlo(net, data, DEV, 10, seed=1, progress=False)
    b = monte_carlo(net, data, DEV, 10, seed=1, instances_per_call=4, progress=False)
    c = monte_carlo(net, data, DEV, 4, seed=1, progress=False)
    d = monte_carlo(net, data, DEV, 10, seed=2, progress=False)
    assert a.accuracies == b.accuracies
    assert a.accuracies[:4] == c.accuracies
    assert a.accuracies != d.accuracies
    shard = monte_carlo(net, data, DEV, 6, seed=1, start=4, progress=False)
    assert a.accuracies[4:] == shard.accuracies


def test_layers_keep_their_device_model_and_mode():
    net, data = _setup()
    before = [m.device for _, m in cimext.cim_layers(net)]
    monte_carlo(net, data, DeviceModel.verified(0.03), 2, progress=False)
    assert [m.device for _, m in cimext.cim_layers(net)] == before
    assert all(m.noise_mode == "clean" for _, m in cimext.cim_layers(net))


def test_write_verified_population_stays_near_clean():
    net, data = _setup()
    res = monte_carlo(net, data, DeviceModel.verified(0.01), 5, progress=False)
    assert res.min > 0.8


def test_json_round_trip():
    import json

    net, data = _setup()
    res = monte_carlo(net, data, DEV, 3, progress=False)
    d = json.loads(res.to_json())
    assert d["summary"]["n"] == 3 and d["accuracies"] == res.accuracies
    assert instance_seeds(res.seed, 3) == res.seeds()


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(n=0), ValueError, "n must"),
        (dict(n=2.5), ValueError, "n must"),
        (dict(device="rram"), TypeError, "DeviceModel"),
        (dict(instances_per_call=0), ValueError, "instances_per_call"),
    ],
)
def test_bad_input(kw, exc, match):
    net, data = _setup()
    args = dict(device=DEV, n=2)
    args.update(kw)
    with pytest.raises(exc, match=match):
        monte_carlo(net, data, args.pop("device"), args.pop("n"), progress=False, **args)


def test_unconverted_model_and_empty_data():
    net, data = _setup()
    with pytest.raises(TypeError, match="convert"):
        monte_carlo(cimext.unconvert(net, inplace=False), data, DEV, 2, progress=False)
    with pytest.raises(ValueError, match="no samples"):
        monte_carlo(net, [], DEV, 2, progress=False)


def test_tuned_chunking_and_paths_give_the_same_accuracies():
    mc = importlib.import_module("cimext.worstcase.monte_carlo")
    net, data = _setup()
    mc._TUNED.clear()
    n = sum(mc.TUNE_CANDIDATES) + 3
    tuned = monte_carlo(net, data, DEV, n, seed=4, progress=False)
    assert tuned.settings["tuned"] and tuned.settings["instances_per_call"] in mc.TUNE_CANDIDATES
    again = monte_carlo(net, data, DEV, n, seed=4, progress=False)  # remembered: no tuning
    assert not again.settings["tuned"]
    one = monte_carlo(net, data, DEV, n, seed=4, instances_per_call=1, progress=False)
    fused = monte_carlo(net, data, DEV, n, seed=4, instances_per_call=5, fused=True, progress=False)
    assert tuned.accuracies == again.accuracies == one.accuracies == fused.accuracies
    assert not fused.settings["tuned"] and fused.settings["fused"]


def test_weight_storage_is_reused_across_chunks(monkeypatch):
    from cimext.nn._state import ForwardState

    net, data = _setup()
    storages = {}
    real = ForwardState.buffer

    def spy(self, key, shape, dtype, device):
        buf = real(self, key, shape, dtype, device)
        storages.setdefault(key, set()).add(buf.untyped_storage().data_ptr())
        return buf

    monkeypatch.setattr(ForwardState, "buffer", spy)
    monte_carlo(net, data, DEV, 11, instances_per_call=3, progress=False)
    assert len(storages) == 2 and all(len(v) == 1 for v in storages.values())


def test_clean_accuracy_can_be_skipped():
    import math

    net, data = _setup()
    res = monte_carlo(net, data, DEV, 2, clean_accuracy=False, progress=False)
    assert math.isnan(res.clean_accuracy)
    assert res.accuracies == monte_carlo(net, data, DEV, 2, progress=False).accuracies
    with pytest.raises(TypeError, match="clean_accuracy"):
        monte_carlo(net, data, DEV, 2, clean_accuracy=1, progress=False)
    with pytest.raises(TypeError, match="fused"):
        monte_carlo(net, data, DEV, 2, fused="no", progress=False)
    with pytest.raises(ValueError, match="start"):
        monte_carlo(net, data, DEV, 2, start=-1, progress=False)
