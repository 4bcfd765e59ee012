"""Worst-case-aware training steps: adversarial weight training ("adv", Algorithm 2 of the paper
with the one-step F-LWC perturbation) and A-TRICE ("atrice", Algorithm 3).

Per batch, :func:`sign_perturbation` finds the worst-case weights of the current model the way
F-LWC does: starting from δ = 0, ``steps`` times δ_l ← clamp(δ_l − s·sign(∂Σp/∂δ_l), ±th_g·s_l),
with p the LWC margin cost (:func:`cimext.worstcase.margin_loss`) and s_l = max|W_used,l| the
layer's full scale (``random_start``: from δ drawn uniformly inside the bound instead, as PGD
does, so that the model cannot fit one deterministic attack). As in F-LWC the step runs in
relative units u_l = δ_l / s_l, so one step size and one bound serve every layer and all layers
move in one fused ``cimext.ops.sign_step_`` call; the gradients w.r.t. δ equal those w.r.t. the
(quantized) weights. Then

- adv:    loss = CE(f(W + δ), y)
- atrice: loss = (1 − α)·CE(f(W + ΔW_rcg), y) + α·CE(f(W + δ), y), ΔW_rcg right-censored
  Gaussian noise s_l·σ_t·min(ε, th_rcg) (eq. 11) drawn inside the fused perturbed ops; with
  ``clean_weight`` β > 0, + β·CE(f(W), y) (a clean term that holds clean accuracy);
  ``adv_loss="trades"``: the α term is KL(f(W) ‖ f(W + δ)) (TRADES) instead of the CE.

δ is held fixed (detached) in the adversarial forward, so the gradient reaches W only through
W + δ, as in the paper. α = 1 skips the noisy pass and draws no noise seed, so it is method "adv"
step for step; α = 0 skips the perturbation and is method "trice".

Under DDP (fit() under torchrun) the δ-gradients are summed over the ranks before the sign is
taken, so every rank uses the perturbation of the global batch, the same one a single process
computes.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed, ops
from ..nn import cim_layers, sampling
from ..worstcase import margin_loss
from ..worstcase.results import used_weight
from .fit import StepContext, register_method


def _check_real(name: str, v, *, lo: float, hi: float | None = None, lo_open: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    v = float(v)
    if (v <= lo if lo_open else v < lo) or (hi is not None and v > hi):
        if hi is not None:
            rng = f"in [{lo:g}, {hi:g}]"
        else:
            rng = f"{'>' if lo_open else '>='} {lo:g}"
        raise ValueError(f"{name} must be {rng}, got {v!r}")
    return v


def check_adv_settings(settings: dict) -> dict:
    """Validate and complete the settings of "adv" / "atrice" (step_size defaults to th_g)."""
    s = dict(settings)
    s["th_g"] = _check_real("th_g", s["th_g"], lo=0.0, lo_open=True)
    if s.get("step_size") is None:
        s["step_size"] = s["th_g"]
    s["step_size"] = _check_real("step_size", s["step_size"], lo=0.0, lo_open=True)
    steps = s["adv_steps"]
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"adv_steps must be an int >= 1, got {steps!r}")
    s["adv_steps"] = int(steps)
    s["kappa"] = _check_real("kappa", s["kappa"], lo=0.0, lo_open=False)
    if not isinstance(s["random_start"], bool):
        raise ValueError(f"random_start must be True or False, got {s['random_start']!r}")
    if "alpha" in s:
        s["alpha"] = _check_real("alpha", s["alpha"], lo=0.0, hi=1.0, lo_open=False)
    if "clean_weight" in s:
        s["clean_weight"] = _check_real("clean_weight", s["clean_weight"], lo=0.0, lo_open=False)
    if "adv_loss" in s and s["adv_loss"] not in ("ce", "trades"):
        raise ValueError(f"adv_loss must be 'ce' or 'trades', got {s['adv_loss']!r}")
    return s


def _layers(model: nn.Module) -> list[nn.Module]:

    return [m for _, m in cim_layers(model)]


@torch.no_grad()
def _full_scales(layers: list[nn.Module]) -> list[torch.Tensor]:
    """s_l = max|W_used,l| as 0-d tensors. The symmetric quantizer keeps max|W| (its scale is
    max|W| / levels), so only 1-bit weights (sign·mean|W|) need the quantized tensor."""

    out = []
    for m in layers:
        bits = getattr(m.quant, "weight_bits", None) if m.quant is not None else None
        out.append((used_weight(m) if bits == 1 else m.weight).abs().amax())
    return out


def sign_perturbation(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    th_g: float = 0.03,
    step_size: float | None = None,
    steps: int = 1,
    kappa: float = 0.0,
    reduce: bool | None = None,
    random_start: bool = False,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """The F-LWC sign-gradient perturbation of ``model``'s current weights on one batch.

    ``steps`` times, from δ = 0: δ_l ← clamp(δ_l − step_size·s_l·sign(∂Σp/∂δ_l), ±th_g·s_l),
    p = :func:`cimext.worstcase.margin_loss` with confidence ``kappa`` (step_size defaults to
    th_g: one step to the bound). Returns δ_l in weight units (detached), one per CiM layer in
    ``cimext.cim_layers`` order. The layers' δ slots are left as they were. ``reduce`` (default:
    whether a torch.distributed group of more than one process is running): sum the gradients
    over the ranks first, so that each rank gets the perturbation of the global batch (every rank
    must then call this together). ``random_start``: start from δ_l drawn uniformly in
    ±th_g·s_l (with ``generator``, a CPU generator, so every device and every DDP rank draws the
    same start) instead of δ = 0, as PGD does: a model trained against it cannot fit one
    deterministic attack.
    """

    step_size = th_g if step_size is None else step_size
    if reduce is None:
        reduce = distributed.is_initialized()
    layers = _layers(model)
    scales = _full_scales(layers)
    if random_start:
        us = [
            (torch.rand(m.weight.shape, generator=generator) * (2 * th_g) - th_g).to(
                device=m.weight.device, dtype=m.weight.dtype
            )
            for m in layers
        ]
    else:
        us = [torch.zeros_like(m.weight, memory_format=torch.contiguous_format) for m in layers]
    bounds = [th_g] * len(us)
    saved = [m.__dict__.get("_delta") for m in layers]
    try:
        for _ in range(steps):
            ds = [(u * s).requires_grad_(True) for u, s in zip(us, scales, strict=True)]
            for m, d in zip(layers, ds, strict=True):
                m.__dict__["_delta"] = d  # shapes are right by construction
            cost = margin_loss(model(x), y, kappa).sum()
            grads = list(torch.autograd.grad(cost, ds))
            if reduce:
                distributed.all_reduce_sum_(grads)
            # sign(∂/∂u_l) = sign(∂/∂δ_l) since s_l > 0: one step size and bound for all layers
            ops.sign_step_(us, grads, step_size, bounds)
    finally:
        for m, d in zip(layers, saved, strict=True):
            m.__dict__["_delta"] = d
    return [u * s for u, s in zip(us, scales, strict=True)]


def _perturbed_loss(
    model: nn.Module, raw: nn.Module, x, y, ctx: StepContext, clean_logits=None
) -> torch.Tensor:
    """CE of the model under its sign-step worst case; with ``clean_logits`` (TRADES) the
    KL divergence KL(softmax(clean_logits) ‖ softmax(f(W + δ))), batch mean, instead."""
    st = ctx.settings
    deltas = sign_perturbation(
        raw,
        x,
        y,
        th_g=st["th_g"],
        step_size=st["step_size"],
        steps=st["adv_steps"],
        kappa=st["kappa"],
        reduce=ctx.module is not None,  # under DDP: the perturbation of the global batch
        random_start=st["random_start"],
        generator=ctx.generator,
    )
    layers = _layers(raw)
    saved = [m.__dict__.get("_delta") for m in layers]
    ctx.last_deltas = deltas
    try:
        for m, d in zip(layers, deltas, strict=True):
            m.__dict__["_delta"] = d
        # The graph keeps W + δ; the slots can be restored as soon as the forward is done.
        out = model(x)
        if clean_logits is None:
            return F.cross_entropy(out, y)
        return F.kl_div(
            F.log_softmax(out, -1),
            F.log_softmax(clean_logits, -1),
            reduction="batchmean",
            log_target=True,
        )
    finally:
        for m, d in zip(layers, saved, strict=True):
            m.__dict__["_delta"] = d


def _raw(model: nn.Module, ctx: StepContext) -> nn.Module:
    # The search runs on the unwrapped model: under DDP it must not count as a DDP forward.
    return ctx.module if ctx.module is not None else model


_ADV_DEFAULTS = dict(th_g=0.03, step_size=None, adv_steps=1, kappa=0.0, random_start=False)


@register_method("adv", needs_cim=True, defaults=_ADV_DEFAULTS, check=check_adv_settings)
def _adv_step(model, x, y, ctx):
    """Adversarial weight training (Algorithm 2): CE under the one-step F-LWC worst case."""
    return _perturbed_loss(model, _raw(model, ctx), x, y, ctx)


@register_method(
    "atrice",
    needs_cim=True,
    defaults=dict(_ADV_DEFAULTS, alpha=0.5, clean_weight=0.0, adv_loss="ce"),
    check=check_adv_settings,
)
def _atrice_step(model, x, y, ctx):
    """A-TRICE (Algorithm 3): (1 − α)·CE under RCG noise + α·CE under the sign-step worst case,
    plus clean_weight·CE of the clean weights (0: the paper's loss; > 0 holds clean accuracy up
    at the price of one more forward and backward). adv_loss "trades": the α term is
    KL(f(W) ‖ f(W + δ)) instead of CE(f(W + δ), y) (TRADES: it asks the perturbed model to agree
    with the clean one rather than with the label; give clean_weight > 0 with it)."""

    alpha, beta = ctx.settings["alpha"], ctx.settings["clean_weight"]
    trades = ctx.settings["adv_loss"] == "trades"
    loss = None
    clean_logits = model(x) if beta > 0.0 or (trades and alpha > 0.0) else None
    if alpha > 0.0:
        loss = alpha * _perturbed_loss(
            model, _raw(model, ctx), x, y, ctx, clean_logits if trades else None
        )
    if alpha < 1.0:
        with sampling(
            model,
            noise="rcg",
            sigma=ctx.settings["sigma_t"],
            th=ctx.settings["th_rcg"],
            generator=ctx.generator,
        ):
            loss_n = (1.0 - alpha) * F.cross_entropy(model(x), y)
        loss = loss_n if loss is None else loss + loss_n
    if beta > 0.0:
        loss = loss + beta * F.cross_entropy(clean_logits, y)
    return loss
