"""An independent weight attack for checking cimext's worst-case figures: sign PGD in plain PyTorch.

Nothing here imports cimext.worstcase or calls a cimext op. The attacked network is a plain copy
of the converted model: every CiM layer (a Linear / Conv2d carrying ``quant`` and ``delta``, found
by duck typing) is replaced by :class:`PlainLayer`, which quantizes its input and weight with its
own few lines (symmetric per-tensor grids, inputs unsigned when non-negative, as the CiM layers
do) and calls F.linear / F.conv2d on W_q + δ. :func:`clean_accuracy` lets a caller check that the
copy computes what the converted model computes.

The attack (:func:`sign_pgd`): ``restarts`` runs of ``steps`` passes over the data; in each pass
every mini-batch takes δ_l ← clamp(δ_l + α·sign(∇_δ loss), ±eps·s_l) with s_l = max|W_q,l|.
Restart 0 starts at δ = 0 with the cross-entropy; the others start uniformly in the box with a
margin loss (the logit margin of the true class, clipped at −κ so that samples already lost by κ
stop pulling); α follows a cosine schedule from eps/4 down to eps/100 within each run. After
every pass the accuracy of the current δ is measured on all the data and the lowest one is kept.
"""

from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F
from torch import nn


def _quantize(t: torch.Tensor, bits, *, unsigned_if_nonneg: bool = False) -> torch.Tensor:
    if bits is None or t.numel() == 0:
        return t
    if bits == 1:
        return torch.sign(t) * t.abs().mean()
    levels = 2 ** (bits - 1) - 1
    if unsigned_if_nonneg and bool(t.min() >= 0):
        levels = 2**bits - 1
    scale = t.abs().amax() / levels
    if not bool(scale > 0):
        return t
    return torch.round(t / scale) * scale


class PlainLayer(nn.Module):
    """A CiM layer's computation in plain torch: quantized input, W_q + δ, F.linear / F.conv2d."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        quant = getattr(layer, "quant", None)
        self.in_bits = None if quant is None else quant.input_bits
        w_bits = None if quant is None else quant.weight_bits
        self.register_buffer("weight", _quantize(layer.weight.detach().clone(), w_bits))
        bias = layer.bias
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.delta = torch.zeros_like(self.weight)
        self.conv = isinstance(layer, nn.Conv2d)
        if self.conv:
            if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                raise ValueError("plain_pgd handles zero-padded convolutions with int padding")
            self.conv_args = (layer.stride, layer.padding, layer.dilation, layer.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_bits is not None:
            # straight-through: the forward value is quantized, the gradient passes unchanged
            x = x + (_quantize(x.detach(), self.in_bits, unsigned_if_nonneg=True) - x).detach()
        w = self.weight + self.delta
        if self.conv:
            return F.conv2d(x, w, self.bias, *self.conv_args)
        return F.linear(x, w, self.bias)


def plain_copy(model: nn.Module) -> tuple[nn.Module, list[PlainLayer]]:
    """A deep copy of ``model`` whose CiM layers are PlainLayers (eval mode, no grad on params)."""
    net = copy.deepcopy(model).eval()
    layers = []
    for name, m in list(net.named_modules()):
        if isinstance(m, (nn.Linear, nn.Conv2d)) and hasattr(m, "quant") and hasattr(m, "delta"):
            parent = net
            *path, last = name.split(".")
            for p in path:
                parent = getattr(parent, p)
            plain = PlainLayer(m)
            setattr(parent, last, plain)
            layers.append(plain)
    if not layers:
        raise ValueError("plain_copy: the model has no CiM layers (is it converted?)")
    for p in net.parameters():
        p.requires_grad_(False)
    return net, layers


@torch.no_grad()
def _accuracy(net, batches) -> float:
    correct = total = 0
    for x, y in batches:
        correct += int((net(x).argmax(-1) == y).sum())
        total += int(y.numel())
    return correct / total


def clean_accuracy(model: nn.Module, batches) -> float:
    """Accuracy of the plain copy without δ (compare with the converted model's)."""
    net, _ = plain_copy(model)
    return _accuracy(net, batches)


def _margin(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    true = out.gather(1, y[:, None]).squeeze(1)
    other = out.scatter(1, y[:, None], float("-inf")).amax(1)
    return true - other


def sign_pgd(
    model: nn.Module,
    batches,
    eps: float = 0.03,
    *,
    steps: int = 60,
    restarts: int = 3,
    seed: int = 0,
) -> dict:
    """Lowest accuracy found by ``restarts`` x ``steps``-pass sign PGD under |δ_l| <= eps·s_l.

    Returns a dict: accuracy (the lowest), clean_accuracy, per-restart lowest accuracies, seconds,
    and the max |δ_l| / s_l of the kept δ (a check of the bound)."""
    t0 = time.perf_counter()
    batches = list(batches)
    net, layers = plain_copy(model)
    scales = [float(m.weight.abs().max()) for m in layers]
    clean = _accuracy(net, batches)
    with torch.no_grad():
        margins = torch.cat([_margin(net(x), y) for x, y in batches])
    pos = margins[margins > 0]
    kappa = 0.5 * float(pos.median()) if pos.numel() else 0.0
    gen = torch.Generator().manual_seed(seed)
    best_acc, best_max, per_restart = clean, 0.0, []
    for r in range(restarts):
        for m, s in zip(layers, scales, strict=True):
            if r == 0:
                m.delta = torch.zeros_like(m.weight)
            else:
                u = torch.rand(m.weight.shape, generator=gen, dtype=m.weight.dtype)
                m.delta = ((2 * u - 1) * eps * s).to(m.weight.device)
        run_best = clean
        for k in range(steps):
            alpha = eps / 100 + (eps / 4 - eps / 100) * 0.5 * (1 + math.cos(math.pi * k / steps))
            for x, y in batches:
                for m in layers:
                    m.delta.requires_grad_(True)
                out = net(x)
                if r == 0:
                    loss = F.cross_entropy(out, y, reduction="sum")
                else:
                    loss = -_margin(out, y).clamp(min=-kappa).sum()
                grads = torch.autograd.grad(loss, [m.delta for m in layers])
                with torch.no_grad():
                    for m, g, s in zip(layers, grads, scales, strict=True):
                        d = m.delta.detach() + alpha * s * g.sign()
                        m.delta = d.clamp(-eps * s, eps * s)
            for m in layers:
                m.delta = m.delta.detach()
            acc = _accuracy(net, batches)
            run_best = min(run_best, acc)
            if acc < best_acc:
                best_acc = acc
                best_max = max(
                    float(m.delta.abs().max()) / s for m, s in zip(layers, scales, strict=True)
                )
        per_restart.append(run_best)
    return dict(
        accuracy=best_acc,
        clean_accuracy=clean,
        restarts=per_restart,
        max_perturbation=best_max,
        kappa=kappa,
        steps=steps,
        seconds=time.perf_counter() - t0,
    )
