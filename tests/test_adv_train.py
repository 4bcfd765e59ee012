"""Worst-case-aware training: adversarial weight training ("adv") and A-TRICE ("atrice"), the
validation metrics that pick the best epoch, and `cimext train --method atrice` / `cimext compare`."""

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_train import _cli, _loaders, _mlp

import cimext
from cimext.train import METHODS, METRICS, fit, sign_perturbation
from cimext.worstcase import flwc, margin_loss


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol)


def test_methods_registered():
    assert {"adv", "atrice"} <= set(METHODS)
    assert set(METRICS) == {"clean", "mc", "flwc"}


def test_alpha_one_is_adv():
    """alpha = 1 computes exactly the adversarial step (no noisy pass, no noise seed drawn)."""
    runs = []
    for method, kw in (("adv", {}), ("atrice", dict(alpha=1.0))):
        train, val = _loaders()
        model = _mlp()
        res = fit(model, train, val, method, epochs=2, lr=1e-2, progress=False, th_g=0.05, **kw)
        runs.append((_state(model), [r["train_loss"] for r in res.history]))
    _assert_same(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]


def test_alpha_zero_is_trice():
    runs = []
    for method, kw in (("trice", {}), ("atrice", dict(alpha=0.0))):
        train, val = _loaders()
        model = _mlp()
        fit(model, train, val, method, epochs=2, lr=1e-2, progress=False, sigma_t=0.2, **kw)
        runs.append(_state(model))
    _assert_same(*runs)


def test_atrice_mixes_both_losses():
    """0 < alpha < 1 differs from both ends (both terms contribute)."""
    states = {}
    for alpha in (0.0, 0.5, 1.0):
        train, val = _loaders()
        model = _mlp()
        fit(model, train, val, "atrice", epochs=1, lr=1e-2, progress=False, alpha=alpha)
        states[alpha] = _state(model)
    for end in (0.0, 1.0):
        assert not torch.equal(states[0.5]["0.weight"], states[end]["0.weight"])


@pytest.mark.parametrize("method", ["adv", "atrice"])
@pytest.mark.parametrize("quant", [None, (4, 4)])
def test_step_perturbation_respects_th_g(method, quant):
    """Every δ a training step puts on the layers satisfies |δ_l| <= th_g·max|W_used,l| and the
    one-step perturbation (step size = th_g) reaches the bound."""
    th_g = 0.04
    train, val = _loaders()
    model = _mlp()
    for _, m in cimext.cim_layers(model):
        m.quant = cimext.QuantConfig.coerce(quant)
    seen = []

    def hook(m, args):
        if m.delta is not None:
            from cimext.worstcase.results import used_weight

            s = float(used_weight(m).abs().max())
            seen.append(float(m.delta.detach().abs().max()) / s)

    handles = [m.register_forward_pre_hook(hook) for _, m in cimext.cim_layers(model)]
    fit(model, train, val, method, epochs=1, lr=1e-2, progress=False, th_g=th_g)
    for h in handles:
        h.remove()
    assert seen and max(seen) <= th_g * (1 + 1e-6)
    assert max(seen) == pytest.approx(th_g, rel=1e-6)
    # The layers' δ slots are left empty after training.
    assert all(m.delta is None for _, m in cimext.cim_layers(model))


def test_sign_perturbation_is_one_flwc_step():
    """One step from δ = 0: δ_l = −th_g·s_l·sign(∂Σp/∂W_l), p the LWC margin cost."""
    torch.manual_seed(0)
    model = _mlp()
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    layers = [m for _, m in cimext.cim_layers(model)]
    deltas = sign_perturbation(model, x, y, th_g=0.02)
    ws = [m.weight for m in layers]
    h = F.relu(F.linear(x, ws[0], layers[0].bias))
    cost = margin_loss(F.linear(h, ws[1], layers[1].bias), y).sum()
    grads = torch.autograd.grad(cost, ws)
    for d, w, g in zip(deltas, ws, grads, strict=True):
        expected = -0.02 * w.detach().abs().max() * g.sign()
        torch.testing.assert_close(d, expected)
    # Several smaller steps stay inside the bound.
    deltas = sign_perturbation(model, x, y, th_g=0.02, step_size=0.015, steps=3)
    for d, w in zip(deltas, ws, strict=True):
        assert float(d.abs().max()) <= 0.02 * float(w.detach().abs().max()) * (1 + 1e-6)


def test_sign_perturbation_random_start():
    """random_start draws δ uniformly inside the bound from the generator (same seed, same δ),
    then takes the sign steps from there; the result stays inside the bound."""
    torch.manual_seed(0)
    model = _mlp()
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    scales = [float(m.weight.detach().abs().max()) for _, m in cimext.cim_layers(model)]

    def run(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return sign_perturbation(model, x, y, th_g=0.02, random_start=True, generator=g, **kw)

    a, b, c = run(1, step_size=0.005), run(1, step_size=0.005), run(2, step_size=0.005)
    zero = sign_perturbation(model, x, y, th_g=0.02, step_size=0.005)
    for da, db, dc, dz, s in zip(a, b, c, zero, scales, strict=True):
        torch.testing.assert_close(da, db)
        assert not torch.equal(da, dc)
        assert not torch.equal(da, dz)
        assert float(da.abs().max()) <= 0.02 * s * (1 + 1e-6)
        # A step of 0.005 from zero gives ±0.005·s only; from a random start, values spread out.
        assert len(torch.unique(dz.abs())) <= 2 and len(torch.unique(da.abs())) > 2
    # The start is uniform over the bound: with tiny steps, δ covers most of ±th_g·s.
    tiny = run(3, step_size=1e-6)
    for d, s in zip(tiny, scales, strict=True):
        assert float(d.abs().max()) > 0.015 * s
        assert abs(float(d.mean())) < 0.01 * s


def test_random_start_in_training_is_reproducible():
    """fit(random_start=True) draws its starts from the run's generator: two runs agree, and
    differ from the zero start."""
    states = []
    for rs in (True, True, False):
        train, val = _loaders()
        model = _mlp()
        fit(model, train, val, "atrice", epochs=1, lr=1e-2, progress=False, th_g=0.05,
            step_size=0.02, adv_steps=2, random_start=rs)  # fmt: skip
        states.append(_state(model))
    _assert_same(states[0], states[1])
    assert not torch.equal(states[0]["0.weight"], states[2]["0.weight"])


def test_clean_weight_adds_the_clean_loss():
    """clean_weight β adds β·CE of the clean weights: the step's loss is the β = 0 loss plus it
    (same δ and noise: the clean pass draws nothing from the generator)."""
    from cimext.train.fit import StepContext

    torch.manual_seed(0)
    model = _mlp()
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    step = METHODS["atrice"]
    losses = {}
    for beta in (0.0, 0.7):
        st = step.check(dict(step.defaults, clean_weight=beta, sigma_t=0.1, th_rcg=1.0))
        ctx = StepContext(st, 0, 0, torch.Generator().manual_seed(3))
        losses[beta] = step(model, x, y, ctx).item()
    clean = F.cross_entropy(model(x), y).item()
    assert losses[0.7] == pytest.approx(losses[0.0] + 0.7 * clean, rel=1e-5)


def test_trades_loss_is_the_kl_to_the_clean_model():
    """adv_loss="trades": α·KL(f(W) ‖ f(W + δ)) + β·CE(f(W), y), δ the same sign perturbation."""
    from cimext.train.fit import StepContext

    torch.manual_seed(0)
    model = _mlp()
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    step = METHODS["atrice"]
    st = step.check(dict(step.defaults, alpha=1.0, clean_weight=0.5, adv_loss="trades", th_g=0.1))
    loss = step(model, x, y, StepContext(st, 0, 0, torch.Generator())).item()
    layers = [m for _, m in cimext.cim_layers(model)]
    deltas = sign_perturbation(model, x, y, th_g=0.1)
    with torch.no_grad():
        clean = model(x)
        for m, d in zip(layers, deltas, strict=True):
            m.delta = d
        pert = model(x)
        for m in layers:
            m.delta = None
    p = F.softmax(clean, -1)
    kl = (p * (p.log() - F.log_softmax(pert, -1))).sum(-1).mean()
    expected = kl + 0.5 * F.cross_entropy(clean, y)
    assert kl > 0
    assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_adv_training_raises_the_worst_case():
    """On the toy problem adversarial weight training lifts the F-LWC worst case above vanilla."""
    th_g = 0.3
    accs = {}
    for method, kw in (("vanilla", {}), ("atrice", dict(alpha=0.7, th_g=th_g))):
        train, val = _loaders()
        model = _mlp()
        fit(model, train, val, method, epochs=6, lr=1e-2, progress=False, **kw)
        accs[method] = flwc(model, val, th_g, progress=False).accuracy
    assert accs["atrice"] > accs["vanilla"] + 0.05, accs


@pytest.mark.parametrize("metric", ["mc", "flwc"])
def test_worst_case_metrics_select_best_epoch(metric):
    train, val = _loaders()
    model = _mlp()
    res = fit(
        model,
        train,
        val,
        "atrice",
        epochs=2,
        lr=1e-2,
        progress=False,
        metric=metric,
        metric_options=dict(n=16, q=0.1) if metric == "mc" else None,
    )
    assert res.metric == metric
    assert res.best_value == max(r["val_metric"] for r in res.history)
    # The model holds the best epoch: recomputing the metric gives the recorded value.
    if metric == "flwc":
        assert flwc(model, val, 0.03, progress=False).accuracy == pytest.approx(res.best_value)
    else:
        from cimext.worstcase import monte_carlo

        dev = cimext.cim_layers(model)[0][1].device
        mc = monte_carlo(model, val, dev, 16, progress=False)
        assert mc.quantile(0.1) == pytest.approx(res.best_value)
    assert res.settings["metric_options"]


def test_resume_atrice(tmp_path):
    train, val = _loaders()
    ref = _mlp()
    fit(ref, train, val, "atrice", epochs=2, lr=1e-2, progress=False, alpha=0.3)

    def stop(epoch, row):
        raise KeyboardInterrupt

    train, val = _loaders()
    with pytest.raises(KeyboardInterrupt):
        fit(_mlp(), train, val, "atrice", epochs=2, lr=1e-2, progress=False, alpha=0.3,
            checkpoint_dir=tmp_path, on_epoch_end=stop)  # fmt: skip
    train, val = _loaders()
    model = _mlp(seed=5)
    fit(model, train, val, "atrice", epochs=2, lr=1e-2, progress=False, alpha=0.3,
        checkpoint_dir=tmp_path)  # fmt: skip
    _assert_same(_state(model), _state(ref))
    with pytest.raises(ValueError, match="other settings"):
        fit(_mlp(), train, val, "atrice", epochs=2, lr=1e-2, progress=False, alpha=0.4,
            checkpoint_dir=tmp_path)  # fmt: skip


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(method="atrice", alpha=-0.1), ValueError, "alpha"),
        (dict(method="atrice", alpha=1.5), ValueError, "alpha"),
        (dict(method="atrice", alpha=math.nan), ValueError, "alpha"),
        (dict(method="atrice", alpha="half"), ValueError, "alpha"),
        (dict(method="atrice", step_size=0.0), ValueError, "step_size"),
        (dict(method="adv", step_size=-0.01), ValueError, "step_size"),
        (dict(method="adv", th_g=0.0), ValueError, "th_g"),
        (dict(method="adv", th_g=math.inf), ValueError, "th_g"),
        (dict(method="adv", adv_steps=0), ValueError, "adv_steps"),
        (dict(method="adv", kappa=-1.0), ValueError, "kappa"),
        (dict(method="adv", random_start=1), ValueError, "random_start"),
        (dict(method="atrice", random_start="yes"), ValueError, "random_start"),
        (dict(method="atrice", clean_weight=-0.5), ValueError, "clean_weight"),
        (dict(method="atrice", clean_weight=math.inf), ValueError, "clean_weight"),
        (dict(method="adv", clean_weight=0.5), TypeError, "clean_weight"),
        (dict(method="atrice", adv_loss="kl"), ValueError, "adv_loss"),
        (dict(method="atrice", adv_loss=None), ValueError, "adv_loss"),
        (dict(method="adv", alpha=0.5), TypeError, "alpha"),
        (dict(method="atrice", th=0.5), TypeError, "unexpected"),
        (dict(method="adv", metric="worst"), ValueError, "metric"),
        (dict(method="adv", metric="mc", metric_options=dict(q=2)), ValueError, "q"),
        (dict(method="adv", metric="mc", metric_options=dict(n=0)), ValueError, "n"),
        (dict(method="adv", metric="flwc", metric_options=dict(bound=1)), TypeError, "option"),
        (dict(method="adv", metric="flwc", metric_options=dict(th_g=-1)), ValueError, "th_g"),
        (dict(method="adv", metric="mc", metric_options=dict(device="rram")), TypeError, "device"),
    ],
)
def test_bad_input(kw, exc, match):
    train, val = _loaders()
    model = _mlp()
    before = _state(model)
    with pytest.raises(exc, match=match):
        fit(model, train, val, progress=False, epochs=1, **kw)
    _assert_same(_state(model), before)  # nothing was trained


def test_adv_needs_converted_model():
    train, val = _loaders()
    plain = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(TypeError, match="convert"):
        fit(plain, train, val, "adv", epochs=1, progress=False)


def test_cli_train_atrice(tmp_path):
    r = _cli("train", "--method", "atrice", "--alpha", "0.5", "--train-th-g", "0.03",
             "--epochs", "1", "--quant", "4,4", "--quiet", "--out", str(tmp_path))  # fmt: skip
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "train.json").read_text())
    assert rec["method"] == "atrice" and rec["settings"]["alpha"] == 0.5
    assert rec["settings"]["th_g"] == 0.03 and rec["settings"]["step_size"] == 0.03


@pytest.mark.parametrize(
    "args,match",
    [
        (["train", "--method", "atrice", "--alpha", "1.5"], "--alpha"),
        (["train", "--method", "atrice", "--alpha", "nan"], "--alpha"),
        (["train", "--method", "adv", "--step-size", "0"], "--step-size"),
        (["train", "--method", "adv", "--train-th-g", "-0.1"], "--train-th-g"),
        (["train", "--method", "adv", "--adv-steps", "0"], "--adv-steps"),
        (["train", "--metric", "worst"], "--metric"),
        (["compare", "--methods", "vanilla,magic"], "--methods"),
        (["compare", "--methods", "vanilla,vanilla"], "--methods"),
        (["compare", "--th-g", "0.01,zero"], "--th-g"),
        (["compare", "--th-g", "-0.01"], "--th-g"),
        (["compare", "--main-th-g", "0.05"], "--main-th-g"),
        (["compare", "--alpha", "2"], "--alpha"),
        (["compare", "--epochs", "0"], "--epochs"),
        (["compare", "--eval-samples", "-1"], "--eval-samples"),
        (["compare", "--seeds", "a"], "--seeds"),
        (["compare", "--quant", "x"], "--quant"),
        (["compare", "--out", "{tmp}/file/sub"], "not writable"),
    ],
)
def test_cli_bad_input_one_line(tmp_path, capsys, args, match):
    from cimext.cli import main

    (tmp_path / "file").write_text("")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert match.lower() in err.lower()


def test_cli_bad_alpha_subprocess(tmp_path):
    """The console entry point prints one line, no traceback, exit status 2."""
    r = _cli("train", "--method", "atrice", "--alpha", "-1", "--out", str(tmp_path))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "--alpha" in r.stderr


def test_cli_compare_small(tmp_path, capsys):
    from cimext.cli import main

    code = main(["compare", "--methods", "vanilla,atrice", "--epochs", "1", "--lr", "0.01",
                 "--th-g", "0.02,0.05", "--main-th-g", "0.05", "--eval-samples", "60",
                 "--lwc-steps", "2", "--search-steps", "1", "--quiet", "--out", str(tmp_path)])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    rec = json.loads((tmp_path / "compare.json").read_text())
    assert [run["method"] for run in rec["runs"]] == ["vanilla", "atrice"]
    for run in rec["runs"]:
        assert set(run["worst_case"]) == {"0.02", "0.05"}
        assert all(0.0 <= v <= 1.0 for v in run["worst_case"].values())
    assert (tmp_path / "compare.png").stat().st_size > 1000
    assert "A-TRICE" in out and "th_g" in out
