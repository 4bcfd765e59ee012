"""LWC: Lagrange-based worst-case analysis (paper section III, objective (10), search on c).

The worst-case weight perturbation minimizes the number of correctly classified samples subject
to max|ΔW| <= th_g (eq. 5). LWC relaxes the count to a sum of per-sample margins (eq. 6, 8) and
the constraint to a Lagrange term (eq. 10), minimizes that by gradient descent (Adam), and
searches the multiplier c for the largest c whose perturbation stays within th_g.

The margin. Eq. (8) as printed, max(max_{i≠t} O_i − O_t, 0), is zero exactly when a sample is
misclassified, so minimizing it would *restore* correct classifications. The search needs the
opposite orientation (Carlini and Wagner's f6, the criterion the paper cites): a sample costs
p = max(O_t − max_{i≠t} O_i + κ, 0), positive while it is still classified correctly and zero
once another class wins by κ (κ = 0 in the paper). The runner-up is the largest logit among the
other classes (the true logit is masked with −inf, so all-negative logits work).
:func:`margin_loss` is p, :func:`margin` the signed margin.

What this implementation does, and why:

- Units. δ_l is optimized as u_l = δ_l / s_l, so lr and th_g are fractions of each layer's full
  scale s_l = max|W_used,l| and one Adam step size fits every layer.
- The constraint term. (10) writes it as L(ΔW) − th_g with L = max|ΔW|. The gradient of a max
  reaches one weight per step, which cannot hold millions of weights inside a bound under a
  per-weight optimizer such as Adam. We use the exact-penalty form of the same constraint,
  R(u) = Σ_l Σ_i max(|u_li| − b_li, 0) (b = th_g, or the per-layer / per-weight bound): zero iff
  every weight is inside its bound, never below max(L − th_g, 0), and it acts on every weight
  outside the bound. The objective is Σp + R/c (c·Σp + R divided by c).
- Proximal Adam. Putting R's gradient into Adam's moment estimates freezes every weight that
  touches the bound (its second moment jumps by (1/c)² and then decays over ~1/(1−β2) steps), so
  each batch takes an Adam step on the margin term only, followed by R's proximal step: every
  |u| above th_g moves back by lr/c (not past th_g). Adam moves a weight by about lr per step,
  (at most about 3·lr when the gradient's scale jumps), so for c up to about 1 the bound holds,
  and above that weights with a consistent push drift past it, the more the larger c: L(c)
  grows monotonically and the search finds the edge. Below the edge LWC is box-constrained Adam
  on the margin objective, which is why F-LWC (sign steps in the same box) estimates it well
  (the paper's Table IV).
- The search starts inside the bound. The first c is ``c_start`` = 1/4 (the pull 4·lr exceeds
  any Adam step, so that run is feasible by construction and gets the full ``steps``); c then
  doubles while runs stay feasible and is bisected (in log space) between the largest feasible
  and the smallest infeasible c, so at most the last few, short runs leave the bound. (Starting
  in the middle of a wide bracket let L grow to 20x the bound for half the budget.)
- ``steps`` counts passes over the data (epochs) per c value; ``steps`` for the first c, then
  ``refine_steps``, each later run warm-started from the best clamped δ found so far (F-LWC's
  and weight PGD's included when ``bracket``) with a fresh Adam state.
- Feasible means L(u) <= th_g·(1 + tol). Whatever the search found, the reported δ is clamped to
  ±th_g·s_l and the reported accuracy is that of the clamped δ.

Speed:

- Batches are moved to the model's device once; weights need no gradient (only δ does), and the
  CiM layers run in clean mode, i.e. plain F.linear / F.conv2d on W_used + δ.
- The active set: a sample misclassified by κ has no gradient in Σp, so after every epoch (whose
  evaluation pass gives every sample's margin) the next epoch's Adam steps run only on the
  samples with margin > −κ, cut into as many mini-batches as the data has (an epoch keeps its
  number of steps while each step gets cheaper). Once the accuracy is low an epoch costs little
  more than its evaluation pass.
- Early stop of an Adam run: when an epoch classified nothing correctly with δ inside the bound,
  or when the epoch objective has not improved by a relative ``rtol`` for ``patience`` epochs.
- Early stop of the search: once a clamped δ reaches accuracy 0 no c can do better.
- Every epoch costs one forward pass over all the data (the accuracy of its clamped δ, from
  which the lowest is kept: Adam's iterates oscillate around the box's corners).

Of the clamped δ of all c values tried, the one with the lowest accuracy is returned (each is
feasible after clamping, so this can only tighten the worst case); ``settings["c"]`` is the
largest feasible c found by the search, ``settings["c_result"]`` the c of the returned δ, and
``history`` lists every c tried.
"""

from __future__ import annotations

import math
import time

import torch

from ..nn import require_cim_layers
from ..ops._spec import check_nonnegative
from . import _common as C
from . import _search as S
from ._common import _auto_kappa, margin, margin_loss  # noqa: F401  (public here too)
from .flwc import search as flwc_search
from .pgd import search as pgd_search
from .results import WorstCaseResult


def lwc(
    model,
    data,
    th_g=0.03,
    *,
    steps: int = 30,
    lr: float | None = None,
    c: float | None = None,
    c_start: float = 0.25,
    search_steps: int = 3,
    refine_steps: int | None = None,
    kappa: float | None = None,
    tol: float = 0.02,
    patience: int = 5,
    rtol: float = 1e-3,
    bracket: bool = True,
    progress: bool = True,
) -> WorstCaseResult | list[WorstCaseResult]:
    """Worst-case accuracy of a converted ``model`` on ``data`` under |δ_l| <= th_g·s_l (LWC).

    Minimizes Σ_data p + R(u)/c (objective (10) of the paper divided by c; p the margin cost of
    :func:`margin_loss`, R the exact penalty of the bound) over the relative perturbations
    u_l = δ_l / s_l by proximal Adam, and searches c for the largest c whose L = max_l max|u_l|
    stays within th_g·(1 + tol). ``c`` given: one run at that c. With ``bracket`` the search is
    bracketed by F-LWC and weight PGD at their defaults: the first c value starts from δ = 0 (its
    own basin), the later ones from the best δ of everything so far, those two included, so the
    result is never worse than :func:`flwc` or :func:`weight_pgd` (seed 0) would report. See the
    module docstring for the details and what makes it fast.

    Args:
        model: a model converted with cimext.convert (left as it was: mode, δ, grads, train/eval).
        data: iterable of (inputs, labels) batches, evaluated as a whole (read once).
        th_g: the bound, a fraction of each layer's full scale s_l = max|W_used,l|; or an
            increasing sequence (one result per bound, each warm-started from the previous δ: a
            list of results with non-increasing accuracy); or a dict layer name -> number or
            tensor of the weight's shape (per-layer / per-weight bounds; unnamed layers are not
            perturbed; lr then refers to the largest bound).
        steps: maximum passes over the data of the first c value (one Adam step per batch).
        lr: Adam learning rate in units of s_l (default th_g / 3).
        c: a fixed Lagrange multiplier (skips the search).
        c_start: the first c of the search. The penalty's pull lr/c then exceeds the largest
            step Adam takes (about 3·lr), so the first run stays inside the bound; the search
            doubles c while runs stay feasible, then bisects between the largest feasible and
            the smallest infeasible c.
        search_steps: number of c values tried by the search.
        refine_steps: maximum passes of the later c values, each warm-started from the best δ
            so far (default max(2, steps // 5)).
        kappa: confidence κ of the margin (logit units): a sample counts as lost once
            misclassified by κ. Default: half the median margin of the correctly classified
            samples of the unperturbed model, so lost samples are pushed well past the decision
            boundary and do not drift back while the search works on the rest.
        tol: relative slack of the feasibility test of a c value (the result is clamped).
        patience, rtol: stop an Adam run when its epoch objective has not improved by a factor
            (1 − rtol) for ``patience`` epochs.
        bracket: run F-LWC and weight PGD at their defaults first (about 30 passes over the
            data) and warm-start the later c values from the best δ found by anything.
        progress: show a tqdm bar (one tick per epoch).

    Returns a WorstCaseResult whose δ satisfies the bound exactly (clamped) and whose accuracy
    is that of the clamped δ; ``history`` has one entry per c value tried.
    """
    what = "lwc"
    spec = C.parse_th_g(th_g, require_cim_layers(model, what), what)
    steps = C.check_steps("steps", steps)
    if lr is not None:
        lr = C.check_positive("lr", lr)
    if kappa is not None:
        kappa = check_nonnegative("kappa", kappa)
    refine_steps = max(2, steps // 5) if refine_steps is None else refine_steps
    refine_steps = C.check_steps("refine_steps", refine_steps)
    tol = check_nonnegative("tol", tol)
    patience = C.check_steps("patience", patience)
    rtol = check_nonnegative("rtol", rtol)
    if c is not None:
        c = C.check_positive("c", c)
    else:
        c_start = C.check_positive("c_start", c_start)
        search_steps = C.check_steps("search_steps", search_steps)

    t0 = time.perf_counter()
    with C.analysis(model, data, what) as prob:
        warning = C.chance_warning(prob, what)
        k = _auto_kappa(prob) if kappa is None else kappa
        opts = dict(
            steps=steps,
            lr=lr,
            c=c,
            c_start=c_start,
            search_steps=search_steps,
            refine_steps=refine_steps,
            kappa=k,
            tol=tol,
            patience=patience,
            rtol=rtol,
        )

        def run(prob: C.Problem, init):
            t_run = time.perf_counter() if init is not None else t0
            n = steps + (search_steps - 1 if c is None else 0) * refine_steps
            bar = C.progress_bar(n + (30 if bracket else 0), progress, what)
            try:
                candidates = bracket_candidates(prob, init, k, bar) if bracket else {}
                found, settings, history = search(
                    prob, init, candidates=candidates, bar=bar, **opts
                )
            finally:
                bar.close()
            settings["kappa_given"] = kappa
            return C.make_result(
                prob,
                "lwc",
                found.us,
                t_run,
                settings,
                history,
                warning,
                accuracy=found.correct / prob.samples,
            )

        return C.run_spec(prob, spec, run)


def bracket_candidates(prob: C.Problem, init, kappa: float, bar=None) -> dict:
    """F-LWC and weight PGD (seed 0) at their defaults, from ``init`` when given (a sweep): the
    candidates that bracket an LWC search, as _search.Found by name."""
    us_f, _, _ = flwc_search(prob, init, eta=None, steps=None, kappa=kappa, bar=bar)
    us_p, _, _ = pgd_search(prob, init, alpha=None, steps=10, random_start=True, seed=0, bar=bar)
    return {"flwc": S.evaluate(prob, us_f), "weight_pgd": S.evaluate(prob, us_p)}


def search(
    prob: C.Problem,
    init: list[torch.Tensor] | None,
    *,
    candidates: dict | None = None,
    steps: int,
    lr: float | None,
    c: float | None,
    c_start: float,
    search_steps: int,
    refine_steps: int,
    kappa: float,
    tol: float,
    patience: int,
    rtol: float,
    bar=None,
    label: str = "lwc",
):
    """The LWC c search on a prepared problem (bounds set): the first c value from ``init``
    (relative δ) or 0, the later ones from the best δ so far, ``candidates`` (name -> Found, e.g.
    from :func:`bracket_candidates`) included.

    Returns (the lowest-accuracy clamped δ found as a _search.Found, settings, history: one entry
    per c value)."""
    lr = prob.largest / 3 if lr is None else lr
    start = S.evaluate(prob, prob.zeros() if init is None else prob.clamp(init))
    best = start
    for cand in (candidates or {}).values():
        if cand.correct < best.correct:
            best = cand
    history: list[dict] = []
    feasible_c, infeasible_c = None, None
    n_runs = 1 if c is not None else search_steps
    for i in range(n_runs):
        if c is not None:
            ck = c
        elif infeasible_c is None:
            ck = c_start if feasible_c is None else 2 * feasible_c
        elif feasible_c is None:
            ck = infeasible_c / 2
        else:
            ck = math.sqrt(feasible_c * infeasible_c)
        t_run = time.perf_counter()
        found, last, stats = S.adam_search(
            prob,
            start if i == 0 else best,
            c=ck,
            lr=lr,
            kappa=kappa,
            epochs=steps if i == 0 else refine_steps,
            patience=patience,
            rtol=rtol,
            bar=bar,
            label=label,
        )
        ratio = prob.outside_ratio(last)
        feasible = ratio <= 1 + tol
        acc = found.correct / prob.samples
        history.append(
            dict(
                step=i,
                c=ck,
                max_perturbation=prob.max_relative(last),
                bound_ratio=ratio,
                feasible=feasible,
                accuracy_clamped=acc,
                warm_start=i > 0 or init is not None,
                seconds=time.perf_counter() - t_run,
                **stats,
            )
        )
        if found.correct < best.correct:
            best = found
        if feasible:
            feasible_c = ck if feasible_c is None else max(feasible_c, ck)
        else:
            infeasible_c = ck if infeasible_c is None else min(infeasible_c, ck)
        if best.correct == 0:
            break  # no c can do better than accuracy 0
    settings = dict(
        steps=steps,
        lr=lr,
        kappa=kappa,
        tol=tol,
        patience=patience,
        rtol=rtol,
        c_given=c,
        c_start=None if c is not None else c_start,
        search_steps=None if c is not None else search_steps,
        c=feasible_c if c is None else c,
        c_result=_c_of(history, best.correct / prob.samples),
        runs=len(history),
        epochs=sum(h["epochs"] for h in history),
        refine_steps=refine_steps,
        start_accuracy=start.correct / prob.samples,
        bracket={n: f.correct / prob.samples for n, f in (candidates or {}).items()},
    )
    return best, settings, history


def _c_of(history: list[dict], acc: float) -> float | None:
    """The c of the first run that reached ``acc`` (None: the start was never beaten)."""
    for h in history:
        if h["accuracy_clamped"] == acc:
            return h["c"]
    return None
