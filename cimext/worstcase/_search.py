"""The search loops the worst-case methods are built from: projected sign steps (F-LWC, weight
PGD, the PGD stage of worst_case) and proximal Adam (LWC), both on relative perturbations u_l
inside the problem's box |u_l| <= b_l.

Two things make them cheap:

- The active set. With the LWC margin cost p = max(margin + κ, 0), a sample already
  misclassified by κ contributes no gradient. After every epoch the current δ is evaluated on all
  the data anyway (its accuracy decides which iterate is kept), and that pass also gives every
  sample's margin; the next epoch's gradient steps then run only on the samples with
  margin > −κ. Once most samples are lost, an epoch costs little more than that one forward
  pass. A sample that drifts back is picked up by the next evaluation.
- Keeping the best iterate. Sign steps and Adam both oscillate around the box's corners, so
  the accuracy of every epoch's δ (inside the box by construction, or clamped into it) is
  measured and the lowest is kept: a search never returns worse than its best epoch, nor worse
  than where it started.
- Watching only the samples that can flip. Once the accuracy is low, that evaluation pass is
  most of an epoch's cost, yet a sample misclassified by more than WATCH·κ does not become
  correct in one epoch. So between full passes (every REFRESH epochs) an epoch evaluates only
  the samples with margin > −WATCH·κ and counts the rest as misclassified; an epoch whose count
  beats the best so far is evaluated on all the data before it is kept, so every kept δ's
  accuracy is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import _common as C
from ._common import margin, margin_loss

# Between full evaluations (every REFRESH epochs) an epoch evaluates only the samples whose last
# known margin is above −WATCH·κ (see the module docstring).
WATCH = 2.0
REFRESH = 5


@dataclass
class Found:
    """A δ a search visited (relative units, inside the box), its number of correctly classified
    samples and every sample's margin; ``exact`` False: only the watched samples were evaluated
    (the others counted as misclassified, their margins as last known)."""

    us: list[torch.Tensor]
    correct: int
    margins: torch.Tensor  # per-sample margins under ``us`` (data order)
    exact: bool = True

    def accuracy(self, prob: C.Problem) -> float:
        return self.correct / prob.samples


def evaluate(prob: C.Problem, us: list[torch.Tensor]) -> Found:
    """The Found of ``us`` (one forward pass; ``us`` is stored as given, not copied)."""
    correct, margins = prob.evaluate(us)
    return Found(us=us, correct=correct, margins=margins)


def evaluate_epoch(
    prob: C.Problem, us: list[torch.Tensor], cur: Found, best: Found, kappa: float, epoch: int
) -> tuple[Found, Found]:
    """(this epoch's Found, the best so far) for the iterate ``us``: a full evaluation every
    REFRESH epochs (or when κ is 0), else one of the watched samples only, confirmed by a full
    evaluation when it would beat ``best`` (so ``best`` is always exact)."""
    if kappa <= 0 or epoch % REFRESH == REFRESH - 1:
        f = evaluate(prob, us)
    else:
        watch = cur.margins > -WATCH * kappa
        correct, m = prob.evaluate_subset(us, watch)
        margins = cur.margins.clone()
        margins[watch] = m
        f = Found(us=us, correct=correct, margins=margins, exact=False)
        if correct < best.correct:
            f = evaluate(prob, us)
    return f, (f if f.exact and f.correct < best.correct else best)


def loss_fn(name: str, kappa: float):
    """The per-batch cost a search descends: "margin" (Σ p, the LWC margin cost with confidence
    κ), "ce" (−Σ cross-entropy, i.e. ascend it) or "target:k" (Σ max(O_y − O_k + κ, 0) over
    the samples of other classes: every prediction pushed towards class k; the samples of class
    k keep the margin cost, pushed towards their runner-up)."""
    if name == "margin":
        return lambda out, y: margin_loss(out, y, kappa).sum()
    if name == "ce":
        return lambda out, y: -F.cross_entropy(out, y, reduction="sum")
    if name.startswith("target:"):
        k = int(name.split(":", 1)[1])

        def targeted(out, y):
            true = out.gather(1, y.long()[:, None]).squeeze(1)
            p = torch.where(y == k, margin(out, y), true - out[:, k])
            return torch.relu(p + kappa).sum()

        return targeted
    raise ValueError(f"unknown loss {name!r}")


def _batches(prob: C.Problem, found: Found, kappa: float, active: bool):
    if not active:
        return prob.batches
    return prob.subset(found.margins + kappa > 0)


def _n(batches) -> int:
    return sum(int(y.numel()) for _, y in batches)


def cosine(k: int, n: int, hi: float, lo: float) -> float:
    """Step k of n of a cosine schedule from ``hi`` down to ``lo``."""
    if n <= 1:
        return hi
    return lo + (hi - lo) * 0.5 * (1 + math.cos(math.pi * k / (n - 1)))


def sign_search(
    prob: C.Problem,
    start: Found,
    *,
    loss: str,
    kappa: float,
    epochs: int,
    eta: float,
    eta_min: float | None = None,
    active: bool = True,
    history: list[dict] | None = None,
    bar=None,
    label: str = "",
) -> Found:
    """Projected sign steps from ``start``: per mini-batch, u ← clamp(u − η_k·sign(∇loss), ±b),
    with η_k a cosine schedule from ``eta`` to ``eta_min`` (constant when None) over the
    epochs. Evaluates every epoch's δ and returns the lowest-accuracy one (``start`` included).
    Stops early once every sample is misclassified by κ (the margin cost has no gradient left)
    or the accuracy is 0. Appends one entry per epoch to ``history``."""
    lf = loss_fn(loss, kappa)
    us = [u.detach().clone().requires_grad_(True) for u in start.us]
    best, cur = start, start
    if not start.exact:
        raise ValueError("a search starts from an exactly evaluated δ")
    for k in range(epochs):
        step = eta if eta_min is None else cosine(k, epochs, eta, eta_min)
        batches = _batches(prob, cur, kappa, active)
        if not batches:
            break
        for x, y in batches:
            prob.set_relative(us)
            grads = torch.autograd.grad(lf(prob.model(x), y), us)
            with torch.no_grad():
                prob.sign_step_(us, grads, step)
        cur, best = evaluate_epoch(prob, [u.detach().clone() for u in us], cur, best, kappa, k)
        acc = cur.correct / prob.samples
        if history is not None:
            history.append(dict(stage=label, epoch=k, eta=step, samples=_n(batches), accuracy=acc))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(stage=label, acc=f"{acc:.3f}", best=f"{best.accuracy(prob):.3f}")
        if best.correct == 0:
            break
    return best


def adam_search(
    prob: C.Problem,
    start: Found,
    *,
    c: float,
    lr: float,
    kappa: float,
    epochs: int,
    patience: int,
    rtol: float,
    active: bool = True,
    bar=None,
    label: str = "",
) -> tuple[Found, list[torch.Tensor], dict]:
    """Proximal Adam on Σp + R(u)/c from ``start`` (an Adam step on the margin cost, then the
    prox of (lr/c)·R, R = Σ max(|u| − b, 0)); see lwc's module docstring.

    After every epoch the clamped iterate is evaluated. Returns (the lowest-accuracy clamped
    iterate of this run, ``start`` if no epoch ran, the last unclamped iterate, the run's
    statistics)."""
    us = [u.detach().clone().requires_grad_(True) for u in start.us]
    opt = torch.optim.Adam(us, lr=lr)
    lf = loss_fn("margin", kappa)
    pull = lr / c
    best = Found(us=start.us, correct=start.correct + 1, margins=start.margins)  # beaten by any
    cur = start
    best_obj, since = math.inf, 0
    epochs_run, objective = 0, math.inf
    for k in range(epochs):
        batches = _batches(prob, cur, kappa, active)
        if not batches:
            break
        epochs_run += 1
        sum_p = 0.0
        for x, y in batches:
            prob.set_relative(us)
            p = lf(prob.model(x), y)
            opt.zero_grad(set_to_none=True)
            p.backward()
            opt.step()
            prob.prox_(us, pull)
            sum_p += float(p.detach())
        objective = sum_p + prob.excess(us) / c
        previous = best
        cur, best = evaluate_epoch(prob, prob.clamp(us), cur, best, kappa, k)
        improved = best is not previous
        if bar is not None:
            bar.update(1)
            bar.set_postfix(stage=label, c=f"{c:.3g}", acc=f"{cur.correct / prob.samples:.3f}")
        if best.correct == 0:
            break
        if objective < best_obj * (1 - rtol):
            best_obj, improved = objective, True
        since = 0 if improved else since + 1
        if since >= patience:
            break
    stats = dict(epochs=epochs_run, objective=objective)
    return (
        (start if epochs_run == 0 or best.correct > start.correct else best),
        [u.detach() for u in us],
        stats,
    )
