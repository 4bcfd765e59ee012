"""worst_case: the default worst-case analysis, an ensemble in the spirit of AutoAttack.

No single method's tuning should decide how low the accuracy can go, so worst_case runs
several complementary searches on the same model and data and reports the lowest accuracy any
of them reached. The default budget's stages, in order:

1. ``flwc``, ``weight_pgd`` and ``lwc``: exactly what :func:`cimext.worstcase.flwc`,
   :func:`~cimext.worstcase.weight_pgd` and :func:`~cimext.worstcase.lwc` compute at their
   defaults (with seed 0; lwc's bracket is the two stages before it), so worst_case is never
   above any of them.
2. ``pgd-margin`` (from the best δ so far) and ``pgd-ce`` (from δ = 0): projected sign steps on
   the margin cost and on the cross-entropy, with a cosine step-size schedule from th_g / 4
   down to th_g / 100 (large steps leave the corner a search settled in, small ones settle
   again). The cross-entropy tends to collapse every prediction into one class, which on a data
   set with a rare class is a deep worst case of its own.
3. ``targeted-k``: a constant prediction of class k leaves exactly the samples of class k
   correct, so when the rarest class's share is below the best accuracy so far, a search pushes
   every other sample towards it (and its own samples towards their runner-up) from the best δ.
4. ``lwc-random-i`` (three): LWC runs (proximal Adam at the first, feasible c of the search) from
   uniform random starts in the box, each followed by sign PGD on the margin cost from where it
   ended: the accuracy LWC reaches varies by a point or more with its start, restarts take the
   best of several draws, and the sign steps often flip samples LWC left correct.
5. ``lwc-refine`` and ``pgd-margin-final``: the LWC c search warm-started from the best δ so far,
   then sign PGD on the margin cost from its result.

Every stage but flwc and weight_pgd works on the *active set* (the samples not yet misclassified
by the margin confidence κ, in as many mini-batches as the data has) and evaluates its δ after
every epoch (watching only the samples that can flip between full passes), keeping the lowest
(see cimext.worstcase._search), so an epoch costs a fraction of a pass over the data once the
accuracy is low. Every stage's δ is inside the bound (sign steps
project, LWC's δ is clamped) and the result is the lowest-accuracy δ of all stages, so its
accuracy is never above any stage's; ``settings["stages"]`` lists each stage's own accuracy,
the best so far and its seconds. ``budget="fast"`` is one LWC run from δ = 0 with short sign-PGD
refinements (about 1.5x the time of F-LWC); ``"thorough"`` adds restarts and epochs (about 3x
the default).
"""

from __future__ import annotations

import time

import torch

from .._util import check_finite_weights, check_seed
from ..nn import require_cim_layers
from . import _common as C
from . import _search as S
from ._common import _auto_kappa
from .flwc import search as flwc_search
from .lwc import search as lwc_search
from .pgd import search as pgd_search
from .results import WorstCaseResult

# The LWC settings every LWC stage shares (lwc's defaults).
_LWC = dict(c_start=0.25, tol=0.02, patience=5, rtol=1e-3)

#: The stages of each budget, run in order. ("flwc",), ("lwc",), ("weight_pgd",): the method at
#: its defaults; ("pgd", name, loss, start, epochs): sign PGD with the cosine schedule from
#: "best", "zero" or "random"; ("targeted", classes, epochs); ("lwc-run", name, start, epochs):
#: one LWC run at the first c; ("lwc-refine", first epochs, later epochs, c values): the LWC
#: search from the best δ; ("lwc-run", name, start, epochs, refine epochs): one LWC run at the
#: first c, then (refine epochs > 0) sign PGD on the margin cost from where it ended (an LWC
#: run and a sign-step refinement reach lower together: large sign steps shake the samples
#: LWC could not flip loose). ``min_steps``: a sign-PGD stage takes at least this many mini-batch
#: steps (on a data set of one or two batches an epoch is one step, and cheap).
BUDGETS: dict[str, dict] = {
    "fast": dict(
        stages=[
            ("lwc-run", "lwc-run", "zero", 25, 0),
            ("pgd", "pgd-margin", "margin", "best", 6),
            ("pgd", "pgd-ce", "ce", "zero", 4),
        ],
        min_steps=30,
    ),
    "default": dict(
        stages=[
            ("flwc",),
            ("weight_pgd",),
            ("lwc",),
            ("pgd", "pgd-margin", "margin", "best", 15),
            ("pgd", "pgd-ce", "ce", "zero", 12),
            ("targeted", 1, 12),
            *[("lwc-run", f"lwc-random-{i}", "random", 30, 20) for i in range(1, 4)],
            ("lwc-refine", 20, 4, 3),
            ("pgd", "pgd-margin-final", "margin", "best", 30),
        ],
        min_steps=60,
    ),
    "thorough": dict(
        stages=[
            ("flwc",),
            ("weight_pgd",),
            ("lwc",),
            ("pgd", "pgd-margin", "margin", "best", 30),
            ("pgd", "pgd-ce", "ce", "zero", 20),
            ("pgd", "pgd-ce-random", "ce", "random", 20),
            ("targeted", 3, 20),
            *[("lwc-run", f"lwc-random-{i}", "random", 40, 30) for i in range(1, 13)],
            ("lwc-refine", 40, 6, 6),
            ("pgd", "pgd-margin-final", "margin", "best", 30),
        ],
        min_steps=120,
    ),
}


def worst_case(
    model,
    data,
    th_g=0.03,
    *,
    budget: str = "default",
    seed: int = 0,
    progress: bool = True,
) -> WorstCaseResult | list[WorstCaseResult]:
    """The lowest accuracy of a converted ``model`` on ``data`` that an ensemble of worst-case
    searches finds under |δ_l| <= th_g·s_l: the default analysis, with no knob to tune.

    Runs F-LWC, LWC and weight PGD at their defaults, sign PGD with a step-size schedule and
    both the margin cost and the cross-entropy, a targeted search towards the rarest class,
    LWC from random starts and LWC warm-started from the best δ so far (see the module
    docstring), and returns the δ with the lowest accuracy, inside the bound: the result is
    never above any of its stages, nor above flwc, lwc and weight_pgd run at their defaults
    (``settings["stages"]``: each stage's own accuracy, the best so far and its seconds).

    Args:
        model: a model converted with cimext.convert (left as it was).
        data: iterable of (inputs, labels) batches, evaluated as a whole (read once).
        th_g: the bound, a fraction of each layer's full scale; an increasing sequence (one
            result per bound, in order, each warm-started from the previous δ, so the accuracy
            is non-increasing in th_g); or a dict layer name -> number or tensor of the weight's
            shape (per-layer / per-weight bounds; unnamed layers are not perturbed).
        budget: "fast" (one LWC run and short sign-PGD refinements: about 1.5x F-LWC's time),
            "default", or "thorough" (more restarts and epochs: about 3x the default).
        seed: seeds weight_pgd's random start and the random restarts (CPU generator: the same
            seed gives the same starts on every device).
        progress: show a tqdm bar (one tick per epoch of every stage).

    Returns a WorstCaseResult (``method`` "worst_case"), or a list of them for a sequence.
    """
    what = "worst_case"
    named = require_cim_layers(model, what)
    if not isinstance(budget, str) or budget not in BUDGETS:
        raise ValueError(f"budget must be one of {', '.join(map(repr, BUDGETS))}, got {budget!r}")
    seed = check_seed(seed)
    check_finite_weights(model, what)
    spec = C.parse_th_g(th_g, named, what)
    plan = BUDGETS[budget]

    t0 = time.perf_counter()
    with C.analysis(model, data, what) as prob:
        warning = C.chance_warning(prob, what)
        kappa = _auto_kappa(prob)

        def run(prob: C.Problem, init):
            t_run = time.perf_counter() if init is not None else t0
            bar = C.progress_bar(_epochs(plan, prob), progress, what)
            try:
                best, stages, history = _ensemble(prob, init, plan, kappa, seed, bar)
            finally:
                bar.close()
            settings = dict(
                budget=budget,
                seed=seed,
                kappa=kappa,
                stages=stages,
                # None: nothing to search (the start was already at accuracy 0)
                best_stage=min(stages, key=lambda s: s["accuracy"])["stage"] if stages else None,
            )
            return C.make_result(
                prob,
                "worst_case",
                best.us,
                t_run,
                settings,
                history,
                warning,
                accuracy=best.correct / prob.samples,
            )

        return C.run_spec(prob, spec, run)


def _stage_epochs(plan: dict, prob: C.Problem, epochs: int) -> int:
    """``epochs``, or more where the data has so few batches that they would make fewer than
    the plan's ``min_steps`` steps."""
    return max(epochs, -(-plan["min_steps"] // len(prob.batches)))


def _epochs(plan: dict, prob: C.Problem) -> int:
    """An upper bound of the epochs a plan runs (for the progress bar)."""
    n = 0
    for st in plan["stages"]:
        kind = st[0]
        if kind == "flwc":
            n += 20
        elif kind == "lwc":
            n += 30 + 2 * 6
        elif kind == "weight_pgd":
            n += 10
        elif kind == "pgd":
            n += _stage_epochs(plan, prob, st[4])
        elif kind == "targeted":
            n += st[1] * _stage_epochs(plan, prob, st[2])
        elif kind == "lwc-run":
            n += st[3] + (_stage_epochs(plan, prob, st[4]) if st[4] else 0)
        else:
            n += st[1] + (st[3] - 1) * st[2]
    return n


def _ensemble(prob: C.Problem, init, plan: dict, kappa: float, seed: int, bar):
    """Run the plan's stages; returns (the best Found, the stage records, the history)."""
    history: list[dict] = []
    stages: list[dict] = []
    gen = torch.Generator().manual_seed(seed)
    th = prob.largest
    start0 = S.evaluate(prob, prob.zeros() if init is None else prob.clamp(init))
    best = start0
    found_by: dict[str, S.Found] = {}

    def record(name: str, found: S.Found, t: float, **extra) -> None:
        nonlocal best
        if found.correct < best.correct:
            best = found
        stages.append(
            dict(
                stage=name,
                accuracy=found.correct / prob.samples,
                best_so_far=best.correct / prob.samples,
                seconds=time.perf_counter() - t,
                **extra,
            )
        )
        bar.set_postfix(stage=name, best=f"{best.correct / prob.samples:.3f}")

    def start(kind: str) -> S.Found:
        if kind == "best":
            return best
        if kind == "zero":
            return S.evaluate(prob, prob.zeros())
        return S.evaluate(prob, prob.random_start(gen))

    if init is not None:
        record("warm-start", start0, time.perf_counter())
    for st in plan["stages"]:
        kind, t = st[0], time.perf_counter()
        if kind == "flwc":
            us, _, h = flwc_search(prob, init, eta=None, steps=None, kappa=kappa, bar=bar)
            history += [dict(stage="flwc", **e) for e in h]
            found_by["flwc"] = S.evaluate(prob, us)
            record("flwc", found_by["flwc"], t)
        elif kind == "weight_pgd":
            us, _, h = pgd_search(
                prob, init, alpha=None, steps=10, random_start=True, seed=seed, bar=bar
            )
            history += [dict(stage="weight_pgd", **e) for e in h]
            found_by["weight_pgd"] = S.evaluate(prob, us)
            record("weight_pgd", found_by["weight_pgd"], t)
        elif kind in ("lwc", "lwc-refine"):
            if kind == "lwc":
                # lwc's bracket is the flwc and weight_pgd stages (same defaults, same start)
                first, later, runs, s0 = 30, 6, 3, init
                cands = {n: found_by[n] for n in ("flwc", "weight_pgd") if n in found_by}
            else:
                first, later, runs = st[1:]
                s0, cands = best.us, None
            if best.correct == 0:
                continue
            found, sett, h = lwc_search(
                prob,
                s0,
                candidates=cands,
                steps=first,
                lr=None,
                c=None,
                search_steps=runs,
                refine_steps=later,
                kappa=kappa,
                bar=bar,
                **_LWC,
            )
            history += [dict(stage=kind, **e) for e in h]
            record(kind, found, t, c=sett["c"], epochs=sett["epochs"])
        elif kind == "lwc-run":
            _, name, where, epochs, refine = st
            if best.correct == 0:
                continue
            found, _, stats = S.adam_search(
                prob,
                start(where),
                c=_LWC["c_start"],
                lr=th / 3,
                kappa=kappa,
                epochs=epochs,
                patience=_LWC["patience"],
                rtol=_LWC["rtol"],
                bar=bar,
                label=name,
            )
            history.append(dict(stage=name, start=where, **stats))
            if refine:
                found = S.sign_search(
                    prob,
                    found,
                    loss="margin",
                    kappa=kappa,
                    epochs=_stage_epochs(plan, prob, refine),
                    eta=th / 4,
                    eta_min=th / 100,
                    history=history,
                    bar=bar,
                    label=f"{name}+pgd",
                )
            record(name, found, t, start=where, epochs=stats["epochs"])
        elif kind == "pgd":
            _, name, loss, where, epochs = st
            if best.correct == 0:
                continue
            found = S.sign_search(
                prob,
                start(where),
                loss=loss,
                kappa=kappa,
                epochs=_stage_epochs(plan, prob, epochs),
                eta=th / 4,
                eta_min=th / 100,
                history=history,
                bar=bar,
                label=name,
            )
            record(name, found, t, loss=loss, start=where)
        elif kind == "targeted":
            _, n_classes, epochs = st
            labels = torch.cat([y for _, y in prob.batches])
            counts = torch.bincount(labels.long(), minlength=prob.num_classes)
            for k in counts.argsort(stable=True)[:n_classes].tolist():
                if int(counts[k]) >= best.correct:
                    continue  # a collapse into class k cannot beat the best so far
                t = time.perf_counter()
                found = S.sign_search(
                    prob,
                    best,
                    loss=f"target:{k}",
                    kappa=kappa,
                    epochs=_stage_epochs(plan, prob, epochs),
                    eta=th / 4,
                    eta_min=th / 100,
                    active=False,
                    history=history,
                    bar=bar,
                    label=f"targeted-{k}",
                )
                record(
                    f"targeted-{k}", found, t, target=k, class_share=int(counts[k]) / prob.samples
                )
    return best, stages, history


__all__ = ["BUDGETS", "worst_case"]
