"""F-LWC: fast worst-case estimate by sign-gradient steps on the LWC margin (paper IV-A, Alg. 1).

Starting from δ = 0, every mini-batch moves every weight by η (a fraction of its layer's full
scale s_l) against the sign of the gradient of Σ_batch p (the LWC margin cost of
:func:`cimext.worstcase.margin_loss`), and projects onto |δ_l| <= th_g·s_l. All layers are
updated by one multi-tensor ``cimext.ops.sign_step_`` call in relative units u_l = δ_l / s_l
(sign(∂/∂u_l) = sign(∂/∂δ_l) since s_l > 0, so one η and one bound th_g serve every layer; a
per-layer or per-weight bound goes to the op as a number or a tensor per layer).
"""

from __future__ import annotations

import math
import time

import torch

from ..nn import require_cim_layers
from ..ops._spec import check_nonnegative
from . import _common as C
from ._common import _auto_kappa, margin_loss
from .results import WorstCaseResult


def sign_pass(
    prob: C.Problem,
    us: list[torch.Tensor],
    loss_fn,
    step: float,
    *,
    skip_zero_loss: bool = False,
) -> tuple[int, float, int]:
    """One pass over the data: per batch, u_l ← clamp(u_l − step·sign(∂loss/∂u_l), ±b_l) (in
    place on ``us``, b_l the problem's bounds). ``skip_zero_loss``: a batch whose loss is exactly
    0 has a zero gradient (a sum of hinges all at or below the hinge), so its step is skipped.
    Returns (correct, Σ loss, updates made); ``correct`` counts each batch before its step."""
    correct, total_loss, updates = 0, 0.0, 0
    for x, y in prob.batches:
        ds = [(u * s).requires_grad_(True) for u, s in zip(us, prob.scales, strict=True)]
        for m, d in zip(prob.layers, ds, strict=True):
            m.__dict__["_delta"] = d
        out = prob.model(x)
        loss = loss_fn(out, y)
        lv = float(loss.detach())
        total_loss += lv
        correct += int((out.detach().argmax(-1) == y).sum())
        if skip_zero_loss and lv == 0.0:
            continue  # sign(0) = 0: the step would change nothing
        grads = torch.autograd.grad(loss, ds)
        with torch.no_grad():
            prob.sign_step_(us, grads, step)
        updates += 1
    return correct, total_loss, updates


def _margin_cost(kappa: float):
    def cost(out, y):
        return margin_loss(out, y, kappa).sum()

    return cost


def check_eta(eta, spec: C.BoundSpec) -> float | None:
    """A given eta must be > 0 and at most the smallest bound it steps in (the first of a sweep,
    the largest per-layer bound of a dict)."""
    if eta is None:
        return None
    limit = spec.value[0] if spec.kind == "sweep" else spec.largest
    return C.check_positive("eta", eta, upper=limit, upper_name="th_g")


def flwc(
    model,
    data,
    th_g=0.03,
    eta: float | None = None,
    *,
    steps: int | None = None,
    kappa: float | None = None,
    progress: bool = True,
) -> WorstCaseResult | list[WorstCaseResult]:
    """Fast worst-case accuracy of a converted ``model`` under |δ_l| <= th_g·s_l (F-LWC).

    Algorithm 1 of the paper: δ = 0; for ``steps`` epochs (the paper's Ep; default
    2·ceil(th_g / eta): the steps to reach the bound from 0, and as many again for weights to turn
    back), for every mini-batch, δ ← clamp(δ − η·sign(∂Σp/∂δ), ±th_g·s_l), with p the LWC margin
    cost (:func:`margin_loss`, confidence ``kappa``; default as in :func:`lwc`, half the median
    clean margin). ``eta`` (default th_g / 10) is a fraction of the full scale like th_g and
    must satisfy 0 < eta <= th_g; larger steps are faster and coarser. Stops early once an epoch
    leaves every sample misclassified by kappa (every later step would be zero).

    ``th_g``: a number; an increasing sequence (one result per bound, in order, each starting
    from the previous δ: a list of results with non-increasing accuracy); or a dict layer name ->
    number or tensor of the weight's shape (per-layer / per-weight bounds; unnamed layers are not
    perturbed; eta and the default steps then refer to the largest bound). Returns a
    WorstCaseResult (one history entry per epoch), or a list for a sequence.
    """
    what = "flwc"
    spec = C.parse_th_g(th_g, require_cim_layers(model, what), what)
    eta = check_eta(eta, spec)
    if steps is not None:
        steps = C.check_steps("steps", steps)
    if kappa is not None:
        kappa = check_nonnegative("kappa", kappa)

    t0 = time.perf_counter()
    with C.analysis(model, data, what) as prob:
        warning = C.chance_warning(prob, what)
        k = _auto_kappa(prob) if kappa is None else kappa

        def run(prob: C.Problem, init):
            t_run = time.perf_counter() if init is not None else t0
            bar = C.progress_bar(_default_steps(prob, eta, steps), progress, what)
            try:
                us, settings, history = search(prob, init, eta=eta, steps=steps, kappa=k, bar=bar)
            finally:
                bar.close()
            return C.make_result(prob, "flwc", us, t_run, settings, history, warning)

        return C.run_spec(prob, spec, run)


def _default_steps(prob: C.Problem, eta: float | None, steps: int | None) -> int:
    e = prob.largest / 10 if eta is None else eta
    return 2 * max(1, math.ceil(prob.largest / e - 1e-9)) if steps is None else steps


def search(
    prob: C.Problem,
    init: list[torch.Tensor] | None,
    *,
    eta: float | None,
    steps: int | None,
    kappa: float,
    bar=None,
) -> tuple[list[torch.Tensor], dict, list[dict]]:
    """F-LWC on a prepared problem (bounds set) from ``init`` (relative δ) or 0; eta and steps
    None: the defaults (largest bound / 10, 2·ceil(bound / eta)). Returns (the final relative δ,
    settings, one history entry per epoch)."""
    e = prob.largest / 10 if eta is None else eta
    n = _default_steps(prob, eta, steps)
    us = prob.zeros() if init is None else prob.clamp(init)
    cost = _margin_cost(kappa)
    history: list[dict] = []
    for epoch in range(n):
        t_ep = time.perf_counter()
        correct, total, updates = sign_pass(prob, us, cost, e, skip_zero_loss=True)
        history.append(
            dict(
                epoch=epoch,
                running_accuracy=correct / prob.samples,
                margin_sum=total,
                updates=updates,
                max_perturbation=prob.max_relative(us),
                seconds=time.perf_counter() - t_ep,
            )
        )
        if bar is not None:
            bar.update(1)
            bar.set_postfix(acc=f"{correct / prob.samples:.3f}")
        if updates == 0:
            break  # δ did not move this epoch and cannot move in the next ones
    return us, dict(eta=e, steps=n, kappa=kappa, epochs=len(history)), history
