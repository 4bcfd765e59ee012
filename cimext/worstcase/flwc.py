"""F-LWC: fast worst-case estimate by sign-gradient steps on the LWC margin (paper IV-A, Alg. 1).

Starting from δ = 0, every mini-batch moves every weight by η (a fraction of its layer's full
scale s_l) against the sign of the gradient of Σ_batch p (the LWC margin cost of
:func:`cimext.worstcase.margin_loss`), and projects onto |δ_l| <= th_g·s_l. All layers are
updated by one multi-tensor ``cimext.ops.sign_step_`` call in relative units u_l = δ_l / s_l
(sign(∂/∂u_l) = sign(∂/∂δ_l) since s_l > 0, so one η and one bound th_g serve every layer).
"""

from __future__ import annotations

import math
import time

import torch

from .. import ops
from ..ops._spec import check_nonnegative
from . import _common as C
from .lwc import _auto_kappa, margin_loss
from .results import WorstCaseResult


def sign_pass(
    prob: C.Problem,
    us: list[torch.Tensor],
    loss_fn,
    step: float,
    bound: float,
    *,
    skip_zero_loss: bool = False,
) -> tuple[int, float, int]:
    """One pass over the data: per batch, δ_l ← clamp(δ_l − step·sign(∂loss/∂δ_l), ±bound·s_l)
    (in relative units, in place on ``us``). ``skip_zero_loss``: a batch whose loss is exactly 0
    has a zero gradient (a sum of hinges all at or below the hinge), so its step is skipped.
    Returns (correct, Σ loss, updates made)."""
    bounds = [bound] * len(us)
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
            ops.sign_step_(us, list(grads), step, bounds)
        updates += 1
    return correct, total_loss, updates


def _margin_cost(kappa: float):
    def cost(out, y):
        return margin_loss(out, y, kappa).sum()

    return cost


def flwc(
    model,
    data,
    th_g: float = 0.03,
    eta: float | None = None,
    *,
    steps: int | None = None,
    kappa: float | None = None,
    progress: bool = True,
) -> WorstCaseResult:
    """Fast worst-case accuracy of a converted ``model`` under |δ_l| <= th_g·s_l (F-LWC).

    Algorithm 1 of the paper: δ = 0; for ``steps`` epochs (the paper's Ep; default
    2·ceil(th_g / eta): the steps to reach the bound from 0, and as many again for weights to turn
    back), for every mini-batch, δ ← clamp(δ − η·sign(∂Σp/∂δ), ±th_g·s_l), with p the LWC margin
    cost (:func:`margin_loss`, confidence ``kappa``; default as in :func:`lwc`, half the median
    clean margin). ``eta`` (default th_g / 10) is a fraction of
    the full scale like th_g and must satisfy 0 < eta <= th_g; larger steps are faster and
    coarser. Stops early once an epoch leaves every sample misclassified by kappa (every later
    step would be zero). Returns a WorstCaseResult (one history entry per epoch).
    """
    what = "flwc"
    th_g = C.check_positive("th_g", th_g)
    eta = th_g / 10 if eta is None else C.check_positive("eta", eta, upper=th_g, upper_name="th_g")
    if steps is None:
        steps = 2 * max(1, math.ceil(th_g / eta - 1e-9))
    steps = C.check_steps("steps", steps)
    if kappa is not None:
        kappa = check_nonnegative("kappa", kappa)

    t0 = time.perf_counter()
    with C.analysis(model, data, what) as prob:
        warning = C.chance_warning(prob, what)
        if kappa is None:
            kappa = _auto_kappa(prob)
        us = prob.zeros()
        cost = _margin_cost(kappa)
        history: list[dict] = []
        bar = C.progress_bar(steps, progress, what)
        try:
            for epoch in range(steps):
                t_ep = time.perf_counter()
                correct, total, updates = sign_pass(prob, us, cost, eta, th_g, skip_zero_loss=True)
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
                bar.update(1)
                bar.set_postfix(acc=f"{correct / prob.samples:.3f}")
                if updates == 0:
                    break  # δ did not move this epoch and cannot move in the next ones
        finally:
            bar.close()
        settings = dict(eta=eta, steps=steps, kappa=kappa, epochs=len(history))
        return C.make_result(prob, "flwc", us, th_g, t0, settings, history, warning)
