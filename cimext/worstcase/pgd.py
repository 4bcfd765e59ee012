"""Weight PGD: the baseline of the paper (section III-D, after [19]): maximize the cross-entropy
over the weight perturbation with ℓ∞-projected sign steps, |δ_l| <= eps·s_l.

Unlike LWC's margin cost, the cross-entropy keeps rewarding samples that are already
misclassified, so it spends much of its budget on them; the paper finds it stops near chance
accuracy where LWC goes lower.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .._util import check_seed
from ..nn import require_cim_layers
from . import _common as C
from .flwc import sign_pass
from .results import WorstCaseResult


def _neg_ce(out, y):
    # sign_step_ descends; descending −CE ascends the cross-entropy.
    return -F.cross_entropy(out, y, reduction="sum")


def weight_pgd(
    model,
    data,
    eps=0.03,
    alpha: float | None = None,
    steps: int = 10,
    *,
    random_start: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> WorstCaseResult | list[WorstCaseResult]:
    """Worst-case accuracy of a converted ``model`` found by weight PGD under |δ_l| <= eps·s_l.

    Starts at δ = 0 or (``random_start``) uniform in the box (CPU torch generator seeded with
    ``seed``); then for ``steps`` passes over the data, per mini-batch,
    δ ← clamp(δ + alpha·sign(∂CE/∂δ), ±eps·s_l). ``eps`` and ``alpha`` (default eps / 4) are
    fractions of each layer's full scale s_l = max|W_used,l|. The final δ is reported (the
    accuracy is evaluated once more after the last step). ``eps`` takes the forms of th_g in
    :func:`cimext.worstcase.flwc` (a number, an increasing sequence: one result each, later ones
    starting from the previous δ, or a dict of per-layer / per-weight bounds; alpha's default
    then refers to the largest bound). Returns a WorstCaseResult whose ``th_g`` is eps (one
    history entry per pass), or a list for a sequence.
    """
    what = "weight_pgd"
    spec = C.parse_th_g(eps, require_cim_layers(model, what), what, name="eps")
    if alpha is not None:
        alpha = C.check_positive("alpha", alpha)
    steps = C.check_steps("steps", steps)
    seed = check_seed(seed)

    t0 = time.perf_counter()
    with C.analysis(model, data, what) as prob:
        warning = C.chance_warning(prob, what)

        def run(prob: C.Problem, init):
            t_run = time.perf_counter() if init is not None else t0
            bar = C.progress_bar(steps, progress, what)
            try:
                us, settings, history = search(
                    prob,
                    init,
                    alpha=alpha,
                    steps=steps,
                    random_start=random_start,
                    seed=seed,
                    bar=bar,
                )
            finally:
                bar.close()
            return C.make_result(prob, "weight_pgd", us, t_run, settings, history, warning)

        return C.run_spec(prob, spec, run)


def search(
    prob: C.Problem,
    init: list[torch.Tensor] | None,
    *,
    alpha: float | None,
    steps: int,
    random_start: bool,
    seed: int,
    bar=None,
) -> tuple[list[torch.Tensor], dict, list[dict]]:
    """Weight PGD on a prepared problem (bounds set) from ``init`` (relative δ), else from a
    random start (``random_start``, CPU generator seeded with ``seed``) or 0. Returns (the final
    relative δ, settings, one history entry per pass)."""
    a = prob.largest / 4 if alpha is None else alpha
    if init is not None:
        us = prob.clamp(init)
    elif random_start:
        us = prob.random_start(torch.Generator().manual_seed(seed))
    else:
        us = prob.zeros()
    history: list[dict] = []
    for epoch in range(steps):
        t_ep = time.perf_counter()
        correct, total, _ = sign_pass(prob, us, _neg_ce, a)
        history.append(
            dict(
                epoch=epoch,
                running_accuracy=correct / prob.samples,
                cross_entropy=-total / prob.samples,
                max_perturbation=prob.max_relative(us),
                seconds=time.perf_counter() - t_ep,
            )
        )
        if bar is not None:
            bar.update(1)
            bar.set_postfix(acc=f"{correct / prob.samples:.3f}")
    settings = dict(
        eps=C.th_g_json(prob.th_g),
        alpha=a,
        steps=steps,
        random_start=bool(random_start) and init is None,
        seed=seed,
    )
    return us, settings, history
