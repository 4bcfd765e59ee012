"""cimext.worstcase lwc / flwc / weight_pgd: the bound holds and verify() agrees, LWC finds a
worse case than weight PGD, F-LWC is faster than LWC, the margin, results I/O, bad input, and the
model left as it was."""

import copy
import json
import math
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cimext
from cimext.worstcase import WorstCaseResult, flwc, lwc, margin, margin_loss, weight_pgd

# ---------------------------------------------------------------------------------- fixtures


def _train(net: nn.Module, x, y, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 128):
            idx = perm[i : i + 128]
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net


@pytest.fixture(scope="module")
def trained():
    """Small digits models, trained once: an MLP and a CNN (plain nn, not converted)."""
    x, y = cimext.data.load("digits", "train").tensors
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 10)
    )
    return {"mlp": _train(mlp, x, y, 20), "cnn": _train(cnn, x, y, 10)}


@pytest.fixture(scope="module")
def test_data():
    return cimext.data.loader("digits", "test", 128)


def _model(trained, name, quant=None):
    return cimext.convert(copy.deepcopy(trained[name]), quant=quant).eval()


def _assert_left_clean(model, was_training=False):
    for name, layer in cimext.cim_layers(model):
        assert layer.noise_mode == "clean", name
        assert layer.delta is None, name
    assert all(p.requires_grad for p in model.parameters())
    assert model.training == was_training


def _check_result(res: WorstCaseResult, model, data, th_g):
    assert res.max_perturbation <= th_g + 1e-6
    assert res.th_g == th_g
    for name, layer in cimext.cim_layers(model):
        d = res.deltas[name]
        assert d.shape == layer.weight.shape and d.dtype == layer.weight.dtype
        assert float(d.abs().max()) / res.scales[name] <= th_g * (1 + 1e-6), name
    assert res.verify(model, data) == res.accuracy
    assert 0.0 <= res.accuracy <= 1.0 and res.samples == 359
    assert res.seconds > 0 and res.history


# ---------------------------------------------------------------------------------- margin


def test_margin_all_negative_logits():
    logits = torch.tensor([[-5.0, -1.0, -3.0], [-2.0, -7.0, -0.5]])
    t = torch.tensor([1, 0])
    # runner-up over the other classes: row 0 max(-5, -3) = -3; row 1 max(-7, -0.5) = -0.5
    assert torch.equal(margin(logits, t), torch.tensor([2.0, -1.5]))
    assert torch.equal(margin_loss(logits, t), torch.tensor([2.0, 0.0]))


def test_margin_true_class_max_and_misclassified():
    logits = torch.tensor([[4.0, 1.0, 2.5], [0.0, 3.0, 1.0]])
    t = torch.tensor([0, 2])
    assert torch.equal(margin(logits, t), torch.tensor([1.5, -2.0]))
    assert torch.equal(margin_loss(logits, t), torch.tensor([1.5, 0.0]))
    # kappa keeps a sample costing until another class wins by kappa
    assert torch.equal(margin_loss(logits, t, kappa=3.0), torch.tensor([4.5, 1.0]))


def test_margin_ties_and_gradient():
    logits = torch.tensor([[2.0, 2.0, 1.0], [1.0, 3.0, 3.0]], requires_grad=True)
    t = torch.tensor([0, 0])
    m = margin(logits, t)
    assert torch.equal(m.detach(), torch.tensor([0.0, -2.0]))
    assert torch.equal(margin_loss(logits.detach(), t), torch.tensor([0.0, 0.0]))
    m.sum().backward()
    # d/dO_t = 1, a tied runner-up shares the -1
    assert torch.allclose(logits.grad, torch.tensor([[1.0, -1.0, 0.0], [1.0, -0.5, -0.5]]))


def test_margin_bad_input():
    with pytest.raises(ValueError, match="2 classes"):
        margin(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        margin(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="logits"):
        margin(torch.zeros(4), torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------------------------- the bound


@pytest.mark.parametrize("quant", [None, (4, 4)])
@pytest.mark.parametrize("method", ["lwc", "flwc", "weight_pgd"])
def test_bound_verify_and_state(trained, test_data, method, quant):
    model = _model(trained, "mlp", quant)
    model.train()
    th = 0.03
    if method == "lwc":
        res = lwc(model, test_data, th, progress=False)
    elif method == "flwc":
        res = flwc(model, test_data, th, progress=False)
    else:
        res = weight_pgd(model, test_data, eps=th, progress=False)
    assert res.method == method
    _check_result(res, model, test_data, th)
    assert res.accuracy < res.clean_accuracy
    assert res.warning is None
    _assert_left_clean(model, was_training=True)
    # the reported accuracy is that of W_used + δ run through the CiM layers as well
    with cimext.clean(model), cimext.perturbation(model, res.deltas):
        acc = cimext.train.accuracy(model, test_data)
    assert acc == res.accuracy


def test_conv_model_bound_and_verify(trained, test_data):
    model = _model(trained, "cnn", (4, 4))
    for res in (
        flwc(model, test_data, 0.03, progress=False),
        weight_pgd(model, test_data, eps=0.03, steps=3, progress=False),
        lwc(model, test_data, 0.03, steps=4, search_steps=2, progress=False),
    ):
        _check_result(res, model, test_data, 0.03)
        assert res.accuracy < res.clean_accuracy
    _assert_left_clean(model)


def test_lwc_at_most_pgd_at_most_clean(trained, test_data):
    model = _model(trained, "mlp")
    th = 0.03
    r_lwc = lwc(model, test_data, th, progress=False)
    r_pgd = weight_pgd(model, test_data, eps=th, progress=False)
    r_flwc = flwc(model, test_data, th, progress=False)
    assert r_lwc.clean_accuracy == r_pgd.clean_accuracy == r_flwc.clean_accuracy
    assert r_lwc.accuracy <= r_pgd.accuracy <= r_pgd.clean_accuracy
    assert r_flwc.accuracy < r_flwc.clean_accuracy
    # a larger bound finds a worse case
    assert lwc(model, test_data, 2 * th, progress=False).accuracy < r_lwc.accuracy


def test_flwc_faster_than_lwc(trained, test_data):
    model = _model(trained, "mlp")
    t0 = time.perf_counter()
    r_lwc = lwc(model, test_data, 0.03, progress=False)
    t1 = time.perf_counter()
    r_flwc = flwc(model, test_data, 0.03, progress=False)
    t2 = time.perf_counter()
    assert t2 - t1 < t1 - t0
    assert r_flwc.seconds < r_lwc.seconds
    assert r_flwc.settings["epochs"] < r_lwc.settings["epochs"]


# ---------------------------------------------------------------------------------- LWC search


def test_lwc_search_history(trained, test_data):
    model = _model(trained, "mlp")
    res = lwc(model, test_data, 0.03, search_steps=6, progress=False)
    assert 1 <= len(res.history) <= 6
    for h in res.history:
        assert {"c", "max_perturbation", "feasible", "accuracy_clamped", "epochs"} <= set(h)
        assert h["feasible"] == (h["max_perturbation"] <= 0.03 * (1 + res.settings["tol"]))
    feasible = [h["c"] for h in res.history if h["feasible"]]
    assert res.settings["c"] == (max(feasible) if feasible else None)
    assert res.accuracy == min(h["accuracy_clamped"] for h in res.history)
    # the search bisects: every c after the first lies strictly inside the current bracket
    cs = [h["c"] for h in res.history]
    assert len(set(cs)) == len(cs)


def test_lwc_fixed_c_single_run(trained, test_data):
    model = _model(trained, "mlp")
    res = lwc(model, test_data, 0.03, c=0.5, steps=5, progress=False)
    assert len(res.history) == 1 and res.history[0]["c"] == 0.5
    assert res.settings["c_given"] == 0.5
    _check_result(res, model, test_data, 0.03)


def test_lwc_stops_when_everything_is_lost(trained, test_data):
    model = _model(trained, "mlp")
    res = lwc(model, test_data, 2.0, progress=False)
    assert res.accuracy == 0.0
    assert len(res.history) < res.settings["search_steps"]  # stopped at accuracy 0
    _check_result(res, model, test_data, 2.0)


def test_reproducible(trained, test_data):
    model = _model(trained, "mlp")
    a = flwc(model, test_data, 0.02, progress=False)
    b = flwc(model, test_data, 0.02, progress=False)
    assert all(torch.equal(a.deltas[n], b.deltas[n]) for n in a.deltas)
    p1 = weight_pgd(model, test_data, eps=0.02, steps=2, seed=1, progress=False)
    p2 = weight_pgd(model, test_data, eps=0.02, steps=2, seed=1, progress=False)
    p3 = weight_pgd(model, test_data, eps=0.02, steps=2, seed=2, progress=False)
    assert all(torch.equal(p1.deltas[n], p2.deltas[n]) for n in p1.deltas)
    assert not all(torch.equal(p1.deltas[n], p3.deltas[n]) for n in p1.deltas)
    assert (
        flwc(model, test_data, 0.02, eta=0.005, progress=False).settings["steps"] == 8
    )  # 2·th/eta


# ---------------------------------------------------------------------------------- verify


def test_verify_rejects_a_broken_bound(trained, test_data):
    model = _model(trained, "mlp")
    res = flwc(model, test_data, 0.02, progress=False)
    name = list(res.deltas)[1]
    res.deltas[name] = res.deltas[name] * 1.01
    with pytest.raises(AssertionError, match=name):
        res.verify(model, test_data)
    res.deltas[name] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        res.verify(model, test_data)


def test_verify_runs_no_cimext_code(trained, test_data, monkeypatch):
    model = _model(trained, "cnn", (4, 4))
    res = flwc(model, test_data, 0.03, progress=False)

    def boom(*a, **k):
        raise RuntimeError("cimext code ran inside verify")

    for cls in (cimext.nn.CiMLinear, cimext.nn.CiMConv2d):
        monkeypatch.setattr(cls, "forward", boom)
    monkeypatch.setattr(cimext.nn.layers, "quantize_ste", boom)
    for op in ("perturbed_linear", "perturbed_conv2d", "noise", "sign_step_"):
        monkeypatch.setattr(cimext.ops, op, boom)
    assert res.verify(model, test_data) == res.accuracy
    monkeypatch.undo()
    assert all("forward" not in m.__dict__ for _, m in cimext.cim_layers(model))


# ---------------------------------------------------------------------------------- results I/O


def test_save_load_round_trip(trained, test_data, tmp_path):
    model = _model(trained, "mlp", (4, 4))
    res = lwc(model, test_data, 0.03, steps=5, search_steps=3, progress=False)
    res.save(tmp_path / "wc")
    back = WorstCaseResult.load(tmp_path / "wc")
    for f in (
        "method",
        "accuracy",
        "clean_accuracy",
        "max_perturbation",
        "th_g",
        "samples",
        "scales",
        "warning",
        "settings",
        "seconds",
    ):
        assert getattr(back, f) == getattr(res, f), f
    assert back.history == json.loads(json.dumps(res.history))
    assert list(back.deltas) == list(res.deltas)
    assert all(torch.equal(back.deltas[n], res.deltas[n]) for n in res.deltas)
    assert back.verify(model, test_data) == res.accuracy
    d = json.loads(res.to_json())
    assert d["kind"] == "worst_case" and d["method"] == "lwc"
    assert set(d["layers"]) == set(res.deltas)
    with pytest.raises(FileNotFoundError):
        WorstCaseResult.load(tmp_path / "nothing")


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda m, d: lwc(m, d, 0.0), ValueError, "th_g"),
        (lambda m, d: lwc(m, d, -0.1), ValueError, "th_g"),
        (lambda m, d: lwc(m, d, math.nan), ValueError, "th_g"),
        (lambda m, d: lwc(m, d, 0.03, steps=0), ValueError, "steps"),
        (lambda m, d: lwc(m, d, 0.03, steps=1.5), TypeError, "steps"),
        (lambda m, d: lwc(m, d, 0.03, lr=0), ValueError, "lr"),
        (lambda m, d: lwc(m, d, 0.03, c=-1), ValueError, "c"),
        (lambda m, d: lwc(m, d, 0.03, c_start=0.0), ValueError, "c_start"),
        (lambda m, d: lwc(m, d, 0.03, search_steps=0), ValueError, "search_steps"),
        (lambda m, d: flwc(m, d, 0.0), ValueError, "th_g"),
        (lambda m, d: flwc(m, d, 0.03, eta=0.0), ValueError, "eta"),
        (lambda m, d: flwc(m, d, 0.03, eta=-0.01), ValueError, "eta"),
        (lambda m, d: flwc(m, d, 0.03, eta=0.05), ValueError, "eta"),
        (lambda m, d: flwc(m, d, 0.03, steps=0), ValueError, "steps"),
        (lambda m, d: weight_pgd(m, d, eps=0.0), ValueError, "eps"),
        (lambda m, d: weight_pgd(m, d, eps=-1.0), ValueError, "eps"),
        (lambda m, d: weight_pgd(m, d, eps=0.03, steps=0), ValueError, "steps"),
        (lambda m, d: weight_pgd(m, d, eps=0.03, alpha=0), ValueError, "alpha"),
        (lambda m, d: weight_pgd(m, d, eps="x"), TypeError, "eps"),
    ],
)
def test_bad_arguments(trained, test_data, call, exc, match):
    model = _model(trained, "mlp")
    with pytest.raises(exc, match=match):
        call(model, test_data)
    _assert_left_clean(model)


@pytest.mark.parametrize("fn", [lwc, flwc, weight_pgd])
def test_unconverted_model_and_empty_data(trained, test_data, fn):
    with pytest.raises(TypeError, match=r"call cimext\.convert\(model\) first"):
        fn(copy.deepcopy(trained["mlp"]), test_data, progress=False)
    model = _model(trained, "mlp")
    with pytest.raises(ValueError, match="data is empty"):
        fn(model, [], progress=False)
    empty = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0).long())
    )
    with pytest.raises(ValueError, match="data is empty"):
        fn(model, empty, progress=False)
    with pytest.raises(TypeError, match="data"):
        fn(model, 3, progress=False)
    with pytest.raises(TypeError, match="model"):
        fn("not a model", test_data, progress=False)
    _assert_left_clean(model)


def test_chance_level_model_warns(trained, test_data):
    model = _model(trained, "mlp")
    last = cimext.cim_layers(model)[-1][1]
    with torch.no_grad():
        last.weight.mul_(1e-6)  # the output is all bias: one class for every input
        last.bias.copy_(torch.arange(10.0))
    with pytest.warns(RuntimeWarning, match="chance"):
        res = flwc(model, test_data, 0.03, progress=False)
    assert res.warning and "chance" in res.warning
    assert res.clean_accuracy <= 0.15
    _check_result(res, model, test_data, 0.03)


def test_model_state_and_existing_delta_restored(trained, test_data):
    model = _model(trained, "mlp")
    name, layer = cimext.cim_layers(model)[0]
    own = torch.full_like(layer.weight, 1e-3)
    with cimext.perturbation(model, {name: own}):
        res = flwc(model, test_data, 0.02, progress=False)
        assert layer.delta is own  # the caller's δ is back
        # the search itself ignored it: results are relative to the unperturbed weights
        assert (
            res.clean_accuracy
            == flwc(_model(trained, "mlp"), test_data, 0.02, progress=False).clean_accuracy
        )
    _assert_left_clean(model)
