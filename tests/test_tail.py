"""cimext.worstcase.tail_probability: intervals, agreement of the estimators, the tilted instance
equals the shifted-weight instance, the write-verify seam, bad input, JSON, determinism."""

import json
import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import cimext
from cimext import DeviceModel
from cimext.worstcase import TailResult, monte_carlo, tail_probability, tail_report
from cimext.worstcase import tail as T


def _setup(seed=0, flip=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 5)
    )
    x = torch.randn(60, 1, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(-1)  # labels the clean model gets right
    y[:flip] = (y[:flip] + 1) % 5  # and a few it gets wrong
    data = DataLoader(TensorDataset(x, y), batch_size=32)
    return cimext.convert(net), data


DEV = DeviceModel(sigma=0.6)
# A threshold that is not rare for DEV on the tiny model: the lower quartile of 200 instances.
_EASY = {}


def _easy_threshold(net, data):
    if "t" not in _EASY:
        mc = monte_carlo(net, data, DEV, 200, seed=99, progress=False)
        _EASY["t"] = mc.quantile(0.25)
    return _EASY["t"]


@pytest.mark.parametrize("method,n", [("mc", 100), ("is", 100), ("subset", 40)])
def test_p_in_unit_interval_and_ci_contains_p(method, n):
    net, data = _setup()
    thr = _easy_threshold(net, data)
    r = tail_probability(net, data, DEV, thr, n=n, method=method, progress=False)
    assert 0.0 <= r.p <= 1.0
    assert r.ci[0] <= r.p <= r.ci[1]
    assert r.n >= n if method == "subset" else r.n == n
    assert r.ess > 0 and r.seconds > 0 and r.method == method
    if method == "is":
        assert r.tilt["theta"] >= 0 and r.tilt["n_nominal"] + r.tilt["n_tilted"] == n
        assert r.diagnostics["weight_max"] <= r.diagnostics["weight_bound"] + 1e-9


def test_mc_and_is_agree_on_an_easy_threshold():
    net, data = _setup()
    thr = _easy_threshold(net, data)
    mc = tail_probability(net, data, DEV, thr, n=300, method="mc", seed=1, progress=False)
    est = tail_probability(net, data, DEV, thr, n=300, method="is", seed=2, progress=False)
    # Two independent estimates of the same p: their intervals overlap.
    assert est.ci[0] <= mc.ci[1] and mc.ci[0] <= est.ci[1], (mc.p, mc.ci, est.p, est.ci)
    assert est.trusted, est.notes


def _fixed_direction(net):
    g = torch.Generator().manual_seed(5)
    return {n: torch.randn(m.weight.shape, generator=g) for n, m in cimext.cim_layers(net)}


@pytest.mark.parametrize("device", [DEV, DeviceModel.rram_nonuniform(0.5)], ids=["fast", "levels"])
def test_tilted_instance_equals_shifted_weight_instance(device):
    """The fused op on W + Σ c·θ·d (the instance still its seed) computes what the materialized
    ΔW(ε + θ·d) computes."""
    net, data = _setup()
    x, _ = next(iter(data))
    layers = T._layers_of(net, device)
    dirs = T._direction(layers, _fixed_direction(net))
    theta, seed = 2.5, 1234
    shifts = {
        L.name: (theta * (L.coef * d).sum(1)).float().reshape(L.module.weight.shape)
        for L, d in zip(layers, dirs, strict=True)
    }
    with torch.no_grad(), T._population(net, device):
        with cimext.perturbation(net, shifts), cimext.instance(net, seed=seed):
            fused = net(x)
        eps = [
            e.double() + theta * d for e, d in zip(T.instance_eps(layers, seed), dirs, strict=True)
        ]
        with (
            cimext.clean(net),
            cimext.perturbation(net, T.tilted_noise_reference(layers, eps, device)),
        ):
            seam = net(x)
    torch.testing.assert_close(fused, seam, rtol=1e-4, atol=1e-4)


def test_seam_at_zero_tilt_is_the_fused_noise_of_a_verified_device():
    net, _ = _setup()
    device = DeviceModel(sigma=0.6, verified_sigma=0.3, th=0.4, verify=True)
    layers = T._layers_of(net, device)
    seed = 77
    got = T.tilted_noise_reference(layers, T.instance_eps(layers, seed), device)
    for L in layers:
        want = cimext.ops.noise(L.module.weight.detach(), device, seed, L.layer_id)
        torch.testing.assert_close(got[L.name], want, rtol=0, atol=1e-6)


def test_verified_device_runs_through_the_seam():
    net, data = _setup()
    device = DeviceModel(sigma=0.6, verified_sigma=1.0, th=1.5, verify=True)
    r = tail_probability(
        net, data, device, 0.9, n=40, direction=_fixed_direction(net), progress=False
    )
    assert 0 <= r.p <= 1 and r.ci[0] <= r.p <= r.ci[1] and r.tilt["n_tilted"] == 28


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(threshold=1.5), ValueError, "threshold"),
        (dict(threshold=-0.1), ValueError, "threshold"),
        (dict(threshold="0.5"), TypeError, "threshold"),
        (dict(n=0), ValueError, "n must"),
        (dict(n=2.5), ValueError, "n must"),
        (dict(method="magic"), ValueError, "method"),
        (dict(device="rram"), TypeError, "device"),
        (dict(device=DeviceModel(sigma=0.0)), ValueError, "device"),
        (dict(device=DeviceModel(verified_sigma=0.0, verify=True)), ValueError, "device"),
        (dict(direction={"1": torch.zeros(3)}), ValueError, "direction"),
        (dict(direction={"nope": torch.zeros(3)}), ValueError, "direction"),
        (dict(direction={"0": torch.zeros(4, 1, 3, 3)}), ValueError, "direction"),
        (dict(direction=[1, 2]), TypeError, "direction"),
        (dict(alpha=0.0), ValueError, "alpha"),
        (dict(method="subset", n=5), ValueError, "n must"),
    ],
)
def test_bad_input(kw, exc, match):
    net, data = _setup()
    args = dict(device=DEV, threshold=0.5, n=20, progress=False)
    args.update(kw)
    with pytest.raises(exc, match=match):
        tail_probability(net, data, args.pop("device"), args.pop("threshold"), **args)


def test_threshold_at_or_above_clean_accuracy_is_not_an_error():
    net, data = _setup(flip=6)  # clean accuracy 0.9
    r = tail_probability(net, data, DEV, 1.0, n=10, progress=False)
    assert r.p == 1.0 and r.ci == (1.0, 1.0) and r.notes and r.n == 0
    r = tail_probability(net, data, DEV, 0.95, n=50, progress=False)
    assert r.clean_accuracy == pytest.approx(0.9)
    assert r.p > 0.9 and r.method == "mc" and "clean accuracy" in r.notes[0]


def test_json_round_trip_and_report():
    net, data = _setup()
    r = tail_report(net, data, DEV, [0.5, 0.7], n=20, progress=False)
    assert [x.threshold for x in r] == [0.5, 0.7]
    d = json.loads(r[0].to_json())
    assert d["kind"] == "tail_probability" and d["p"] == r[0].p
    back = TailResult.from_json(r[0].to_json())
    assert back == r[0]


def test_deterministic_for_a_seed():
    net, data = _setup()
    thr = _easy_threshold(net, data)
    a = tail_probability(net, data, DEV, thr, n=30, seed=3, progress=False)
    b = tail_probability(net, data, DEV, thr, n=30, seed=3, progress=False)
    c = tail_probability(net, data, DEV, thr, n=30, seed=4, progress=False)
    assert (a.p, a.ci, a.tilt["theta"]) == (b.p, b.ci, b.tilt["theta"])
    assert a.nominal_accuracies != c.nominal_accuracies
    s1 = tail_probability(net, data, DEV, thr, n=20, method="subset", seed=3, progress=False)
    s2 = tail_probability(net, data, DEV, thr, n=20, method="subset", seed=3, progress=False)
    assert s1.p == s2.p and s1.ci == s2.ci


def test_untrusted_interval_is_widened_with_a_note():
    net, data = _setup()
    # A rare threshold with few instances: too few hits for the weights to be trusted.
    r = tail_probability(net, data, DEV, 0.0, n=20, seed=1, progress=False)
    assert not r.trusted and any("cannot be trusted" in s for s in r.notes)
    nom = r.diagnostics["nominal_ci"]
    assert r.ci[0] <= nom[0] and r.ci[1] >= nom[1]


def test_plot_tail(tmp_path):
    net, data = _setup()
    rs = tail_report(net, data, DEV, [0.5, 0.8], n=20, progress=False)
    path = tmp_path / "tail.png"
    T.plot_tail(rs, path, worst=0.2)
    assert path.stat().st_size > 1000
    assert math.isfinite(rs[0].rel_halfwidth) or rs[0].p == 0
