"""LWC: Lagrange-based worst-case analysis (paper section III, objective (10), binary search on c).

The worst-case weight perturbation minimizes the number of correctly classified samples subject
to max|ΔW| <= th_g (eq. 5). LWC relaxes the count to a sum of per-sample margins (eq. 6, 8) and
the constraint to a Lagrange term (eq. 10), minimizes that by gradient descent (Adam), and
binary-searches the multiplier c for the largest c whose perturbation stays within th_g.

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
  R(u) = Σ_l Σ_i max(|u_li| − th_g, 0): zero iff L <= th_g, never below max(L − th_g, 0), and it
  acts on every weight outside the bound. The objective is Σp + R/c (c·Σp + R divided by c).
- Proximal Adam. Putting R's gradient into Adam's moment estimates freezes every weight that
  touches the bound (its second moment jumps by (1/c)² and then decays over ~1/(1−β2) steps), so
  each batch takes an Adam step on the margin term only, followed by R's proximal step: every
  |u| above th_g moves back by lr/c (not past th_g). Adam moves a weight by about lr per step,
  so for c up to about 1 the bound holds exactly, and above that weights with a consistent
  push drift past it, the more the larger c: L(c) grows monotonically and the binary search
  finds the edge. Below the edge LWC is box-constrained Adam on the margin objective, which is
  why F-LWC (sign steps in the same box) estimates it well (the paper's Table IV).
- Mini-batches. The margin term of a batch is scaled by N/B (an unbiased estimate of the dataset
  sum); ``steps`` counts passes over the data (epochs) per c value.
- Feasible means L(u) <= th_g·(1 + tol). Whatever the search found, the reported δ is clamped to
  ±th_g·s_l and the reported accuracy is that of the clamped δ.

Speed:

- Batches are moved to the model's device once; weights need no gradient (only δ does), and the
  CiM layers run in clean mode, i.e. plain F.linear / F.conv2d on W_used + δ.
- Warm start: each Adam run after the first starts from the last feasible run's δ (or, while
  no run was feasible, from the first run's δ clamped into the box), with a fresh Adam state and
  ``refine_steps`` epochs, so the runs after the first refine instead of starting over.
- Early stop of an Adam run: when an epoch classified nothing correctly with δ inside the bound,
  or when the epoch objective has not improved by a relative ``rtol`` for ``patience`` epochs.
- Early stop of the search: once a clamped δ reaches accuracy 0 no c can do better.
- Each c value costs one extra forward pass over the data (the accuracy of its clamped δ).

Of the clamped δ of all c values tried, the one with the lowest accuracy is returned (each is
feasible after clamping, so this can only tighten the worst case); ``settings["c"]`` is the
largest feasible c found by the search, ``settings["c_result"]`` the c of the returned δ, and
``history`` lists every c tried.
"""

from __future__ import annotations

import math
import time

import torch

from ..ops._spec import check_nonnegative
from . import _common as C
from .results import WorstCaseResult


def margin(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Signed classification margin O_t − max_{i≠t} O_i per sample (shape (N,)).

    Positive: the true class t wins by that much; negative: another class wins; 0: a tie. The
    runner-up is taken over the other classes only (the true logit is replaced by −inf, not by
    0, so all-negative logits are handled). ``logits`` is (N, C) with C >= 2, ``targets`` (N,)
    class indices. Differentiable (a tied runner-up shares the gradient).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(
            f"logits must be a (N, C) tensor, got shape {tuple(getattr(logits, 'shape', ()))}"
        )
    if logits.shape[1] < 2:
        raise ValueError(f"logits need at least 2 classes for a margin, got {logits.shape[1]}")
    if not isinstance(targets, torch.Tensor) or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"targets must be a ({logits.shape[0]},) tensor of class indices, got shape "
            f"{tuple(getattr(targets, 'shape', ()))}"
        )
    t = targets.long().unsqueeze(1)
    true = logits.gather(1, t).squeeze(1)
    runner_up = logits.scatter(1, t, float("-inf")).amax(1)
    return true - runner_up


def margin_loss(logits: torch.Tensor, targets: torch.Tensor, kappa: float = 0.0) -> torch.Tensor:
    """Per-sample LWC cost p = max(O_t − max_{i≠t} O_i + κ, 0) (eq. 8 oriented for the search).

    p > 0 while a sample is still classified correctly (or another class wins by less than κ)
    and 0 once it is misclassified by at least κ, so minimizing Σp misclassifies samples and
    stops spending effort on those already lost. Shape (N,).
    """
    return torch.relu(margin(logits, targets) + kappa)


@torch.no_grad()
def _auto_kappa(prob: C.Problem) -> float:
    """Half the median margin of the samples the unperturbed model classifies correctly."""
    prob.clear()
    ms = torch.cat([margin(prob.model(x).float(), y) for x, y in prob.batches])
    pos = ms[ms > 0]
    return 0.5 * float(pos.median()) if pos.numel() else 0.0


def _excess(us: list[torch.Tensor], th_g: float) -> float:
    """R(u) = Σ max(|u| − th_g, 0): the constraint term of (10) as used here."""
    with torch.no_grad():
        return float(sum(torch.relu(u.abs() - th_g).sum() for u in us))


def _prox_(us: list[torch.Tensor], th_g: float, pull: float) -> None:
    """In place: the prox of pull·R, i.e. every |u| above th_g moves ``pull`` back towards th_g
    (and stops there): |u| <- max(th_g, |u| − pull) where |u| > th_g."""
    for u in us:
        a = u.abs()
        u.copy_(torch.where(a > th_g, torch.sign(u) * torch.clamp(a - pull, min=th_g), u))


def _adam_run(
    prob: C.Problem,
    start: list[torch.Tensor],
    c: float,
    th_g: float,
    lr: float,
    steps: int,
    kappa: float,
    patience: int,
    rtol: float,
    bar,
) -> tuple[list[torch.Tensor], list[torch.Tensor], float, dict]:
    """Minimize Σp + R(u)/c from ``start`` by proximal Adam (an Adam step on the margin term,
    then the prox of (lr/c)·R).

    After every epoch the clamped iterate is evaluated (one no-grad pass); the run keeps the
    clamped iterate with the lowest accuracy (Adam's iterates oscillate around the box's
    corners, so the last one is not the best one). Returns (the last unclamped u, the best
    clamped u, its accuracy, the run's statistics)."""
    us = [u.detach().clone().requires_grad_(True) for u in start]
    opt = torch.optim.Adam(us, lr=lr)
    n_total = prob.samples
    pull = lr / c
    best_obj, since_best = math.inf, 0
    best_acc, best_u = math.inf, None
    epochs, objective, L = 0, math.inf, 0.0
    for epoch in range(steps):
        epochs = epoch + 1
        sum_p = 0.0
        for x, y in prob.batches:
            prob.set_relative(us)
            out = prob.model(x)
            p = margin_loss(out, y, kappa)
            opt.zero_grad(set_to_none=True)
            # (N / B)·Σ_batch p: the batch's unbiased estimate of the dataset sum in (10).
            (p.sum() * (n_total / y.numel())).backward()
            opt.step()
            with torch.no_grad():
                _prox_(us, th_g, pull)
            sum_p += float(p.detach().sum())
        L = prob.max_relative(us)
        objective = sum_p + _excess(us, th_g) / c
        clamped = [u.detach().clamp(-th_g, th_g) for u in us]
        acc = prob.correct(clamped) / n_total
        improved = False
        if acc < best_acc:
            best_acc, best_u, improved = acc, clamped, True
        bar.update(1)
        bar.set_postfix(c=f"{c:.3g}", L=f"{L:.4f}", acc=f"{acc:.3f}", best=f"{best_acc:.3f}")
        if best_acc == 0.0:
            break  # every sample lost inside the bound: nothing left to find
        if objective < best_obj * (1 - rtol):
            best_obj, improved = objective, True
        since_best = 0 if improved else since_best + 1
        if since_best >= patience:
            break
    stats = dict(epochs=epochs, objective=objective, last_accuracy_clamped=acc)
    return [u.detach() for u in us], best_u, best_acc, stats


def lwc(
    model,
    data,
    th_g: float = 0.03,
    *,
    steps: int = 30,
    lr: float | None = None,
    c: float | None = None,
    c_range: tuple[float, float] = (1e-2, 1e2),
    search_steps: int = 6,
    refine_steps: int | None = None,
    kappa: float | None = None,
    tol: float = 0.02,
    patience: int = 5,
    rtol: float = 1e-3,
    progress: bool = True,
) -> WorstCaseResult:
    """Worst-case accuracy of a converted ``model`` on ``data`` under |δ_l| <= th_g·s_l (LWC).

    Minimizes Σ_data p + R(u)/c (objective (10) of the paper divided by c; p the margin cost of
    :func:`margin_loss`, R the exact penalty of the bound) over the relative perturbations
    u_l = δ_l / s_l by proximal Adam, and binary-searches c in log space within ``c_range`` for
    ``search_steps`` steps for the largest c whose L = max_l max|u_l| stays within
    th_g·(1 + tol). ``c`` given: one run at that c. See the module docstring for the details
    and what makes it fast.

    Args:
        model: a model converted with cimext.convert (left as it was: mode, δ, grads, train/eval).
        data: iterable of (inputs, labels) batches, evaluated as a whole (read once).
        th_g: the bound, a fraction of each layer's full scale s_l = max|W_used,l|.
        steps: maximum passes over the data of the first c value (one Adam step per batch).
        lr: Adam learning rate in units of s_l (default th_g / 3).
        c: a fixed Lagrange multiplier (skips the search).
        c_range: (low, high) bracket of the search (the edge is near c = 1, where the pull
            lr/c of the penalty matches Adam's step of about lr).
        search_steps: number of c values tried by the binary search.
        refine_steps: maximum passes of the later, warm-started c values (default
            max(2, steps // 5)).
        kappa: confidence κ of the margin (logit units): a sample counts as lost once
            misclassified by κ. Default: half the median margin of the correctly classified
            samples of the unperturbed model, so lost samples are pushed well past the decision
            boundary and do not drift back while the search works on the rest.
        tol: relative slack of the feasibility test of a c value (the result is clamped).
        patience, rtol: stop an Adam run when its epoch objective has not improved by a factor
            (1 − rtol) for ``patience`` epochs.
        progress: show a tqdm bar (one tick per epoch).

    Returns a WorstCaseResult whose δ satisfies the bound exactly (clamped) and whose accuracy
    is that of the clamped δ; ``history`` has one entry per c value tried.
    """
    what = "lwc"
    th_g = C.check_positive("th_g", th_g)
    steps = C.check_steps("steps", steps)
    lr = th_g / 3 if lr is None else C.check_positive("lr", lr)
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
        search_steps = C.check_steps("search_steps", search_steps)
        if not isinstance(c_range, (tuple, list)) or len(c_range) != 2:
            raise TypeError(f"c_range must be a (low, high) pair, got {c_range!r}")
        lo_c = C.check_positive("c_range[0]", c_range[0])
        hi_c = C.check_positive("c_range[1]", c_range[1])
        if lo_c >= hi_c:
            raise ValueError(f"c_range must have low < high, got {tuple(c_range)}")

    t0 = time.perf_counter()
    with C.analysis(model, data, what) as prob:
        warning = C.chance_warning(prob, what)
        kappa_given = kappa
        if kappa is None:
            kappa = _auto_kappa(prob)
        n_runs = 1 if c is not None else search_steps
        bar = C.progress_bar(steps + (n_runs - 1) * refine_steps, progress, what)
        history: list[dict] = []
        best_u: list[torch.Tensor] | None = None  # the lowest clamped accuracy so far
        best_acc, best_c = math.inf, None
        warm: list[torch.Tensor] | None = None  # where the next run starts
        largest_feasible = None
        log_lo = math.log(lo_c) if c is None else 0.0
        log_hi = math.log(hi_c) if c is None else 0.0
        try:
            for k in range(n_runs):
                ck = c if c is not None else math.exp(0.5 * (log_lo + log_hi))
                t_run = time.perf_counter()
                start = warm if warm is not None else prob.zeros()
                budget = steps if warm is None else refine_steps
                us, clamped, acc, stats = _adam_run(
                    prob, start, ck, th_g, lr, budget, kappa, patience, rtol, bar
                )
                L = prob.max_relative(us)
                feasible = L <= th_g * (1 + tol)
                history.append(
                    dict(
                        step=k,
                        c=ck,
                        max_perturbation=L,
                        feasible=feasible,
                        accuracy_clamped=acc,
                        warm_start=warm is not None,
                        seconds=time.perf_counter() - t_run,
                        **stats,
                    )
                )
                if acc < best_acc:
                    best_acc, best_u, best_c = acc, clamped, ck
                if feasible:
                    warm = us
                    largest_feasible = ck if largest_feasible is None else max(largest_feasible, ck)
                    log_lo = math.log(ck)
                else:
                    log_hi = math.log(ck)
                    if warm is None:
                        # no feasible run yet: continue from this run projected onto the box
                        # (feasible by construction) instead of from zero
                        warm = [u.clamp(-th_g, th_g) for u in us]
                if acc == 0.0:
                    break  # no c can do better than accuracy 0
        finally:
            bar.close()
        settings = dict(
            steps=steps,
            lr=lr,
            kappa=kappa,
            kappa_given=kappa_given,
            tol=tol,
            patience=patience,
            rtol=rtol,
            c_given=c,
            c_range=None if c is not None else [lo_c, hi_c],
            search_steps=None if c is not None else search_steps,
            c=largest_feasible if c is None else c,
            c_result=best_c,
            runs=len(history),
            epochs=sum(h["epochs"] for h in history),
            refine_steps=refine_steps,
        )
        return C.make_result(
            prob, "lwc", best_u, th_g, t0, settings, history, warning, accuracy=best_acc
        )
