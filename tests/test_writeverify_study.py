"""cimext.writeverify.speedup_study, sensitivity(per_pulse=True) and expected_hessian_diag on a
tiny 4-bit model: the bisection against the exhaustive sweep, the JSON, bad input per argument."""

import json
import math

import pytest
import torch
from torch import nn

import cimext
from cimext import writeverify as wv
from cimext.writeverify.hessian import effective_weight
from cimext.writeverify.program import expected_pulses
from cimext.writeverify.sensitivity import expected_hessian_diag, extra_pulses
from cimext.writeverify.study import study_device

NU = (0.5, 1.5, 1.5, 0.5)


def _model(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    dev = cimext.DeviceModel(weight_bits=4, bits_per_device=2)
    return cimext.convert(net, device=dev, quant=(4, 4)).eval()


def _data(n=96, seed=0, batches=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    step = math.ceil(n / batches)
    return [(x[i : i + step], torch.zeros(0)) for i in range(0, n, step)]


def _labelled(model, n=96, seed=0):
    # Labels the model gets right, so that noise has accuracy to lose.
    data = _data(n, seed)
    with torch.no_grad():
        return [(x, model(x).argmax(-1)) for x, _ in data]


FR = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


def _study(model, data, **kw):
    args = dict(sigmas=(0.1, 0.3), instances=3, fractions=FR, progress=False)
    args.update(kw)
    return wv.speedup_study(model, data, data, **args)


def test_study_matches_exhaustive_sweep():
    model = _model()
    data = _labelled(model)
    res = _study(model, data, methods=("uswim", "magnitude"), tolerance=0.02)
    json.dumps(res)  # JSON-able
    assert res["sigma"] == [0.1, 0.3]
    for kind, ls in (("uniform", None), ("non-uniform", NU)):
        r = res[kind]
        for i, s in enumerate(res["sigma"]):
            device = study_device(model[0].device, s, 0.1, ls)
            sweep = wv.selective_write_verify(
                model, data, device, calib=data, methods=("uswim", "magnitude"),
                fractions=FR, instances=3, seed=0, tolerance=0.02, granularity="device",
                progress=False,
            )  # fmt: skip
            assert r["accuracy_full"][i] == pytest.approx(sweep.full.mean)
            assert r["accuracy_unverified"][i] == pytest.approx(sweep.none.mean)
            assert r["pulses_full"][i] == pytest.approx(sweep.full.pulses)
            for m in ("uswim", "magnitude"):
                pts = {p.fraction: p for p in sweep.methods[m]}
                f = r[f"{m}_fraction"][i]
                assert r[f"{m}_accuracy"][i] == pytest.approx(pts[f].mean)
                assert r[f"{m}_accuracy"][i] >= sweep.full.mean - 0.02 - 1e-12
                assert r[f"{m}_speedup"][i] == pytest.approx(sweep.full.pulses / pts[f].pulses)
                passing = [p.mean >= sweep.full.mean - 0.02 for p in sweep.methods[m]]
                if passing == sorted(passing):  # monotone: bisection finds the smallest
                    assert f == sweep.speedup[m]["fraction"]
                    assert r[f"{m}_speedup"][i] == pytest.approx(sweep.speedup[m]["speedup"])


def test_study_deterministic_and_settings():
    model = _model(1)
    data = _labelled(model)
    a = _study(model, data, methods=("swim", "random"), kinds=("non-uniform",), seed=3)
    b = _study(model, data, methods=("swim", "random"), kinds=("non-uniform",), seed=3)
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    assert "uniform" not in a
    st = a["settings"]
    assert st["instances"] == 3 and st["seed"] == 3 and st["level_sigma"] == list(NU)
    assert st["test_samples"] == 96 and st["granularity"] == "device"
    for v in a["non-uniform"]["swim_speedup"] + a["non-uniform"]["random_speedup"]:
        assert v >= 1.0 - 1e-12


def test_study_expected_hessian_runs():
    model = _model(2)
    data = _labelled(model)
    res = _study(model, data, methods=("uswim",), hessian_instances=2, per_pulse=True)
    assert res["settings"]["hessian_instances"] == 2 and res["settings"]["per_pulse"]
    assert len(res["non-uniform"]["uswim_speedup"]) == 2


def test_sensitivity_per_pulse():
    model = _model()
    data = _labelled(model)
    dev = cimext.DeviceModel(weight_bits=4, bits_per_device=2, sigma=0.3, th=0.03, level_sigma=NU)
    h = wv.hessian_diag(model, data)
    for gran in ("weight", "device"):
        plain = wv.sensitivity(model, data, dev, "uswim", hessian=h, granularity=gran)
        pp = wv.sensitivity(model, data, dev, "uswim", hessian=h, granularity=gran, per_pulse=True)
        for n, layer in cimext.nn.cim_layers(model):
            extra = extra_pulses(effective_weight(layer), dev)
            want = plain[n] / (extra if gran == "device" else extra.sum(-1))
            torch.testing.assert_close(pp[n], want)
    # Extra pulses: the closed form minus the unverified pulse; noisy levels cost more.
    w = torch.tensor([[0.0, 1.0 / 7, 1.0]])  # q = 0, 2, 15: digits (0,0), (2,0), (3,3)
    ex = extra_pulses(w, dev)
    quiet = float(expected_pulses(torch.tensor([0.15], dtype=torch.float64), 0.03, 100)) - 1
    noisy = float(expected_pulses(torch.tensor([0.45], dtype=torch.float64), 0.03, 100)) - 1
    torch.testing.assert_close(
        ex, torch.tensor([[[quiet, quiet], [noisy, quiet], [quiet, quiet]]], dtype=torch.float64)
    )
    # Uniform σ: every device costs the same, so the ranking is unchanged.
    uni = cimext.DeviceModel(weight_bits=4, bits_per_device=2, sigma=0.3, th=0.03)
    a = wv.sensitivity(model, data, uni, "swim", hessian=h, granularity="device")
    b = wv.sensitivity(model, data, uni, "swim", hessian=h, granularity="device", per_pulse=True)
    for n in a:
        assert torch.equal(a[n].reshape(-1).argsort(), b[n].reshape(-1).argsort())
    with pytest.raises(ValueError, match="per_pulse"):
        wv.sensitivity(model, data, dev, "magnitude", per_pulse=True)
    with pytest.raises(TypeError, match="per_pulse"):
        wv.sensitivity(model, data, dev, "uswim", hessian=h, per_pulse=1)
    with pytest.raises(ValueError, match="max_pulses"):
        wv.sensitivity(model, data, dev, "uswim", hessian=h, per_pulse=True, max_pulses=0)


def test_expected_hessian_diag():
    model = _model()
    data = _labelled(model)
    zero = cimext.DeviceModel(weight_bits=4, bits_per_device=2, sigma=0.0, th=0.0)
    h0 = wv.hessian_diag(model, data)
    he = expected_hessian_diag(model, data, zero, 2)
    for n in h0:
        torch.testing.assert_close(he[n], h0[n])
    noisy = cimext.DeviceModel(weight_bits=4, bits_per_device=2, sigma=0.8, th=0.08)
    h1 = expected_hessian_diag(model, data, noisy, 1, seed=5)
    h2 = expected_hessian_diag(model, data, noisy, 2, seed=5)
    assert any(not torch.allclose(h1[n], h0[n]) for n in h0)
    assert all(bool((h2[n] >= 0).all()) for n in h2)
    # The clean weights are restored afterwards.
    h0b = wv.hessian_diag(model, data)
    for n in h0:
        torch.testing.assert_close(h0b[n], h0[n])
    with pytest.raises(ValueError, match="instances"):
        expected_hessian_diag(model, data, noisy, 0)
    with pytest.raises(TypeError, match="device"):
        expected_hessian_diag(model, data, "rram", 1)


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(sigmas=()), ValueError, "sigmas"),
        (dict(sigmas=(0.1, -0.2)), ValueError, "sigmas"),
        (dict(sigmas=5), TypeError, "sigmas"),
        (dict(level_sigma=(1.0, 1.0)), ValueError, "level_sigma"),
        (dict(level_sigma=None), TypeError, "level_sigma"),
        (dict(level_sigma=(1.0, float("nan"), 1.0, 1.0)), ValueError, "level_sigma"),
        (dict(methods=("uswim", "bogus")), ValueError, "methods"),
        (dict(methods="uswim"), TypeError, "methods"),
        (dict(methods=()), ValueError, "methods"),
        (dict(granularity="row"), ValueError, "granularity"),
        (dict(per_pulse="yes"), TypeError, "per_pulse"),
        (dict(hessian_instances=-1), ValueError, "hessian_instances"),
        (dict(hessian_instances=1.5), TypeError, "hessian_instances"),
        (dict(kinds=("both",)), ValueError, "kinds"),
        (dict(kinds="uniform"), TypeError, "kinds"),
        (dict(instances=0), ValueError, "instances"),
        (dict(instances=True), ValueError, "instances"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=1.0), TypeError, "seed"),
        (dict(tolerance=1.5), ValueError, "tolerance"),
        (dict(tolerance="x"), TypeError, "tolerance"),
        (dict(th_ratio=0.0), ValueError, "th_ratio"),
        (dict(th_ratio=None), TypeError, "th_ratio"),
        (dict(max_pulses=0), ValueError, "max_pulses"),
        (dict(hessian="exact"), ValueError, "hessian"),
        (dict(fractions=(0.1, 1.5)), ValueError, "fractions"),
        (dict(fractions=3), TypeError, "fractions"),
        (dict(progress="yes"), TypeError, "progress"),
    ],
)
def test_study_bad_argument(kw, exc, match):
    model = _model()
    data = _labelled(model)
    with pytest.raises(exc, match=match):
        _study(model, data, **kw)


def test_study_bad_model_and_data():
    model = _model()
    data = _labelled(model)
    with pytest.raises((TypeError, ValueError), match="CiM"):
        wv.speedup_study(nn.Linear(6, 3), data, data, progress=False)
    with pytest.raises(ValueError, match="data"):
        wv.speedup_study(model, data, [], progress=False)
    with pytest.raises(ValueError, match="calib"):
        wv.speedup_study(model, [], data, progress=False)
    with pytest.raises(TypeError, match="calib"):
        wv.speedup_study(model, [1, 2], data, progress=False)
    with pytest.raises(TypeError, match="data"):
        wv.speedup_study(model, data, [(1, 2)], progress=False)
