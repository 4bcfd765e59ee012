"""worst_case (the ensemble), th_g sweeps and per-layer / per-weight bounds for every worst-case
method: never above a stage or a single method, monotone sweeps, bounds respected exactly,
verify() agreeing, results I/O, and bad input rejected before any work starts."""

import copy
import importlib
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cimext
from cimext.worstcase import WorstCaseResult, flwc, lwc, weight_pgd, worst_case
from cimext.worstcase import _common as C

METHODS = {
    "worst_case": lambda m, d, th, **k: worst_case(m, d, th, budget="fast", progress=False, **k),
    "lwc": lambda m, d, th, **k: lwc(m, d, th, steps=6, search_steps=2, progress=False, **k),
    "flwc": lambda m, d, th, **k: flwc(m, d, th, progress=False, **k),
    "weight_pgd": lambda m, d, th, **k: weight_pgd(m, d, th, steps=3, progress=False, **k),
}


@pytest.fixture(scope="module")
def mlp():
    """A small MLP trained on digits (plain nn, converted per test)."""
    x, y = cimext.data.load("digits", "train").tensors
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(20):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 128):
            idx = perm[i : i + 128]
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net


@pytest.fixture(scope="module")
def data():
    return list(cimext.data.loader("digits", "test", 128))


def _model(mlp, quant=None):
    return cimext.convert(copy.deepcopy(mlp), quant=quant).eval()


def _left_clean(model):
    for name, layer in cimext.cim_layers(model):
        assert layer.noise_mode == "clean" and layer.delta is None, name
    assert all(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------------- worst_case


@pytest.mark.parametrize("quant", [None, (4, 4)])
def test_worst_case_never_above_its_stages_or_the_single_methods(mlp, data, quant):
    model = _model(mlp, quant)
    res = worst_case(model, data, 0.03, progress=False)
    assert res.method == "worst_case"
    stages = res.settings["stages"]
    names = [s["stage"] for s in stages]
    assert names[:3] == ["flwc", "weight_pgd", "lwc"]
    assert {"pgd-margin", "pgd-ce", "lwc-refine"} <= set(names)
    assert res.accuracy == min(s["accuracy"] for s in stages)
    assert all(res.accuracy <= s["accuracy"] for s in stages)
    assert res.settings["best_stage"] in names
    # the first three stages are the single methods at their defaults, exactly
    single = {
        "flwc": flwc(model, data, 0.03, progress=False),
        "weight_pgd": weight_pgd(model, data, 0.03, progress=False),
        "lwc": lwc(model, data, 0.03, progress=False),
    }
    for name, r in single.items():
        stage = next(s for s in stages if s["stage"] == name)
        assert stage["accuracy"] == r.accuracy, name
        assert res.accuracy <= r.accuracy
    assert res.verify(model, data) == res.accuracy
    assert res.max_perturbation <= 0.03 + 1e-7 and res.bound_ratio <= 1 + 1e-6
    assert res.accuracy < res.clean_accuracy and res.warning is None
    _left_clean(model)


def test_lwc_bracket_never_above_flwc_or_weight_pgd(mlp, data):
    model = _model(mlp)
    r = lwc(model, data, 0.03, progress=False)
    assert set(r.settings["bracket"]) == {"flwc", "weight_pgd"}
    assert r.accuracy <= flwc(model, data, 0.03, progress=False).accuracy
    assert r.accuracy <= weight_pgd(model, data, 0.03, progress=False).accuracy
    plain = lwc(model, data, 0.03, bracket=False, progress=False)
    assert plain.settings["bracket"] == {}
    # the search starts feasible (c_start) and never runs far outside the bound
    assert plain.history[0]["feasible"] and plain.history[0]["c"] == 0.25
    assert (
        sum(h["epochs"] for h in plain.history if not h["feasible"])
        < sum(h["epochs"] for h in plain.history) / 2
    )


def test_worst_case_budgets_and_seed(mlp, data):
    model = _model(mlp)
    fast = worst_case(model, data, 0.03, budget="fast", progress=False)
    assert [s["stage"] for s in fast.settings["stages"]] == ["lwc-run", "pgd-margin", "pgd-ce"]
    assert fast.verify(model, data) == fast.accuracy
    a = worst_case(model, data, 0.02, budget="fast", seed=3, progress=False)
    b = worst_case(model, data, 0.02, budget="fast", seed=3, progress=False)
    assert all(torch.equal(a.deltas[n], b.deltas[n]) for n in a.deltas)
    assert a.settings["seed"] == 3 and a.settings["budget"] == "fast"


def test_worst_case_json_and_round_trip(mlp, data, tmp_path):
    model = _model(mlp)
    res = worst_case(model, data, 0.03, budget="fast", progress=False)
    d = json.loads(res.to_json())
    assert d["method"] == "worst_case" and d["settings"]["stages"]
    res.save(tmp_path / "wc")
    back = WorstCaseResult.load(tmp_path / "wc")
    assert back.settings == json.loads(json.dumps(res.settings))
    assert back.verify(model, data) == res.accuracy


def test_chance_level_model_warns_not_crashes(mlp, data):
    model = _model(mlp)
    last = cimext.cim_layers(model)[-1][1]
    with torch.no_grad():
        last.weight.mul_(1e-6)
        last.bias.copy_(torch.arange(10.0))
    with pytest.warns(RuntimeWarning, match="chance"):
        res = worst_case(model, data, 0.03, budget="fast", progress=False)
    assert res.warning and "chance" in res.warning
    assert res.verify(model, data) == res.accuracy


def test_nothing_correct_to_begin_with(mlp, data):
    # every label wrong for the clean model: accuracy 0 with a warning, no stage needed
    model = _model(mlp)
    with torch.no_grad():
        wrong = [(x, (model(x).argmax(-1) + 1) % 10) for x, _ in data]
    for budget in ("fast", "default"):
        with pytest.warns(RuntimeWarning, match="chance"):
            res = worst_case(model, wrong, 0.03, budget=budget, progress=False)
        assert res.accuracy == 0.0 and res.clean_accuracy == 0.0
        assert res.verify(model, wrong) == 0.0


# ------------------------------------------------------------------------------- sweeps


@pytest.mark.parametrize("method", list(METHODS))
def test_sweep_is_monotone_and_warm_started(mlp, data, method):
    model = _model(mlp, (4, 4))
    ths = [0.005, 0.01, 0.02, 0.04]
    res = METHODS[method](model, data, ths)
    assert isinstance(res, list) and len(res) == len(ths)
    accs = [r.accuracy for r in res]
    assert all(a >= b for a, b in zip(accs, accs[1:], strict=False)), accs
    assert accs[-1] < accs[0]
    for th, r in zip(ths, res, strict=True):
        assert r.th_g == th and r.max_perturbation <= th * (1 + 1e-6)
        assert r.verify(model, data) == r.accuracy
        assert r.settings["sweep"] == ths
    assert [r.settings["warm_start"] for r in res] == [False, True, True, True]
    _left_clean(model)


def test_sweep_keeps_the_previous_delta_when_a_search_ends_higher(mlp, data, monkeypatch):
    # A search that only ever returns δ = 0: every later bound keeps the first bound's δ.
    model = _model(mlp)
    first = flwc(model, data, 0.01, progress=False)
    flwc_module = importlib.import_module("cimext.worstcase.flwc")  # not the function
    real = flwc_module.search
    calls = []

    def fake_search(prob, init, **kw):
        calls.append(init is None)
        if init is None:
            return real(prob, init, **kw)
        return prob.zeros(), {}, []

    monkeypatch.setattr(flwc_module, "search", fake_search)
    res = flwc(model, data, [0.01, 0.03], progress=False)
    assert calls == [True, False]
    assert res[0].accuracy == first.accuracy
    assert res[1].accuracy == res[0].accuracy and res[1].settings["kept_previous"]
    assert res[1].settings["search_accuracy"] == res[0].clean_accuracy
    assert all(torch.equal(res[1].deltas[n], res[0].deltas[n]) for n in res[0].deltas)


# ------------------------------------------------------------------------------- bounds


@pytest.mark.parametrize("method", list(METHODS))
def test_per_weight_bounds_respected_exactly(mlp, data, method):
    model = _model(mlp, (4, 4))
    (n0, l0), (n1, l1) = cimext.cim_layers(model)
    g = torch.Generator().manual_seed(0)
    b0 = 0.05 * torch.rand(l0.weight.shape, generator=g)
    b0[:, ::2] = 0.0  # "write-verified" columns: must not move at all
    res = METHODS[method](model, data, {n0: b0, n1: 0.02})
    d0, d1 = res.deltas[n0], res.deltas[n1]
    s0, s1 = res.scales[n0], res.scales[n1]
    assert not d0[:, ::2].any()
    assert bool((d0.abs() <= b0 * s0 * (1 + 1e-6)).all())
    assert float(d1.abs().max()) <= 0.02 * s1 * (1 + 1e-6)
    assert d0.abs().max() > 0 and d1.abs().max() > 0
    assert res.bound_ratio <= 1 + 1e-6
    assert res.max_perturbation <= 0.05
    assert res.verify(model, data) == res.accuracy
    assert res.accuracy < res.clean_accuracy
    assert set(res.bounds) == {n0, n1} and torch.equal(res.bounds[n0], b0.double())
    j = json.loads(res.to_json())
    assert j["th_g"][n1] == 0.02 and j["th_g"][n0]["shape"] == list(b0.shape)
    assert j["per_layer_bounds"] and j["bound_ratio"] <= 1 + 1e-6
    _left_clean(model)


def test_unnamed_layers_are_not_perturbed(mlp, data):
    model = _model(mlp)
    (n0, _), (n1, _) = cimext.cim_layers(model)
    res = flwc(model, data, {n1: 0.03}, progress=False)
    assert not res.deltas[n0].any() and res.deltas[n1].any()
    assert res.bounds[n0] == 0.0 and res.bounds[n1] == 0.03
    assert res.verify(model, data) == res.accuracy


def test_per_layer_float_bounds_equal_a_scalar(mlp, data):
    model = _model(mlp)
    names = [n for n, _ in cimext.cim_layers(model)]
    a = flwc(model, data, 0.02, progress=False)
    b = flwc(model, data, dict.fromkeys(names, 0.02), progress=False)
    assert all(torch.equal(a.deltas[n], b.deltas[n]) for n in names)
    assert a.accuracy == b.accuracy


def test_per_weight_bounds_round_trip_and_verify_checks_them(mlp, data, tmp_path):
    model = _model(mlp)
    (n0, l0), (n1, _) = cimext.cim_layers(model)
    b0 = torch.full(l0.weight.shape, 0.03)
    b0[0] = 0.0
    res = flwc(model, data, {n0: b0, n1: 0.01}, progress=False)
    res.save(tmp_path / "r")
    assert (tmp_path / "r" / "bounds.safetensors").is_file()
    back = WorstCaseResult.load(tmp_path / "r")
    assert torch.equal(back.bounds[n0], res.bounds[n0]) and back.bounds[n1] == 0.01
    assert back.verify(model, data) == res.accuracy
    # a δ on a zero-bound weight is caught, naming the layer
    back.deltas[n0] = back.deltas[n0].clone()
    back.deltas[n0][0, 0] = 1e-3
    with pytest.raises(AssertionError, match=n0):
        back.verify(model, data)


def test_outside_ratio_and_clamp_with_tensor_bounds():
    b = torch.tensor([0.0, 0.1, 0.2])
    u = torch.tensor([0.0, -0.3, 0.1])
    assert C._ratio(u, b) == pytest.approx(3.0)
    assert C._ratio(torch.tensor([1e-9, 0.0, 0.0]), b) == math.inf
    assert torch.equal(C._clamp(u, b), torch.tensor([0.0, -0.1, 0.1]))


# ------------------------------------------------------------------------------- bad input


def _names(model):
    return [n for n, _ in cimext.cim_layers(model)]


BAD_TH = [
    (0.0, ValueError, "th_g"),
    (-0.01, ValueError, "th_g"),
    (math.nan, ValueError, "th_g"),
    (math.inf, ValueError, "th_g"),
    ("0.03", TypeError, "th_g"),
    ([], ValueError, "empty"),
    ([0.02, 0.01], ValueError, "increasing"),
    ([0.01, 0.01], ValueError, "increasing"),
    ([0.01, -0.02], ValueError, r"th_g\[1\]"),
    ([0.01, math.nan], ValueError, r"th_g\[1\]"),
    (lambda n: {"fc9": 0.03}, ValueError, "'fc9' is not a CiM layer"),
    (lambda n: {n[0]: -0.1}, ValueError, r"th_g\['1'\]"),
    (lambda n: {n[0]: math.nan}, ValueError, r"th_g\['1'\]"),
    (lambda n: {n[0]: "x"}, TypeError, r"th_g\['1'\]"),
    (lambda n: {n[0]: torch.zeros(3)}, ValueError, "shape"),
    (lambda n: {n[0]: -torch.ones(32, 64)}, ValueError, "negative"),
    (lambda n: {n[0]: torch.full((32, 64), math.nan)}, ValueError, "NaN"),
    (lambda n: {n[0]: torch.ones(32, 64, dtype=torch.int64)}, TypeError, "floating"),
    (lambda n: {n[0]: 0.0, n[1]: torch.zeros(10, 32)}, ValueError, "every bound is 0"),
    (lambda n: {}, ValueError, "every bound is 0"),
]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("th, exc, match", BAD_TH)
def test_bad_th_g_raises_before_any_work(mlp, data, method, th, exc, match, monkeypatch):
    model = _model(mlp)
    if callable(th):
        th = th(_names(model))

    def no_work(*a, **k):
        raise AssertionError("the analysis started before th_g was checked")

    monkeypatch.setattr(C, "analysis", no_work)
    if method == "weight_pgd":
        match = match.replace("th_g", "eps")
    with pytest.raises(exc, match=match):
        METHODS[method](model, data, th)
    _left_clean(model)


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(budget="huge"), ValueError, "budget"),
        (dict(budget=None), ValueError, "budget"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(seed=True), TypeError, "seed"),
    ],
)
def test_worst_case_bad_arguments(mlp, data, kw, exc, match, monkeypatch):
    model = _model(mlp)
    monkeypatch.setattr(C, "analysis", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(exc, match=match):
        worst_case(model, data, 0.03, progress=False, **kw)


def test_worst_case_unconverted_model_and_empty_data(mlp, data):
    with pytest.raises(TypeError, match=r"call cimext\.convert\(model\) first"):
        worst_case(copy.deepcopy(mlp), data, progress=False)
    with pytest.raises(ValueError, match="data is empty"):
        worst_case(_model(mlp), [], progress=False)


def test_flwc_eta_checked_against_the_smallest_bound_of_a_sweep(mlp, data):
    model = _model(mlp)
    with pytest.raises(ValueError, match="eta"):
        flwc(model, data, [0.01, 0.03], eta=0.02, progress=False)
    res = flwc(model, data, [0.02, 0.03], eta=0.02, progress=False)
    assert [r.settings["eta"] for r in res] == [0.02, 0.02]
