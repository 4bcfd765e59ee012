"""Hessian diagonals of the mean cross-entropy with respect to every CiM layer's weight.

"obd" is the Becker–LeCun recursion of Optimal Brain Damage: one forward and one backward pass in
which the backward carries the diagonal second derivative S = ∂²L/∂a² instead of the gradient.
It is run on the model as it is, through forward hooks: each CiM layer's output is routed through
a small autograd Function whose backward accumulates H_W += Σ S_out ⊗ x² (cimext.ops.hdiag_*)
and passes S_in = (W²)ᵀ S_out (cimext.ops.curv_backward_*) upstream. Everything else in the model
is left to autograd, which is exact for the recursion wherever the Jacobian holds only 0 and 1:
ReLU masks, max-pool routing, flatten, residual adds (S summed over the branches), concatenation.
Modules whose Jacobian has other coefficients are hooked too: eval BatchNorm (scale squared),
average pooling (window coefficient squared), Tanh / Sigmoid (f'(x)², the Gauss-Newton part).
The seed at the logits is the diagonal of the softmax cross-entropy Hessian, p(1 − p).

"hutchinson" estimates the exact Hessian diagonal as E[v ⊙ Hv] over Rademacher probes v, with Hv
from double backpropagation: slow, a check for "obd". :func:`diag_ggn_exact` gives the exact
diagonal of the generalized Gauss-Newton matrix (per-sample Jacobians), the quantity "obd"
approximates, for benchmarks.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._util import check_seed
from ..nn import clean, require_cim_layers
from ..nn.layers import CiMLinear
from ..nn.quant import quantize_ste

METHODS = ("obd", "hutchinson")

# Modules without CiM weights whose Jacobian holds only 0 / 1 (autograd's backward is already the
# recursion's), and modules the recursion must not meet.
_UNSUPPORTED = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d, nn.Linear, nn.Conv2d, nn.Conv1d)


def effective_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a CiM layer computes with in clean mode: quantized when its quant says so, plus
    its δ; detached."""
    with torch.no_grad():
        w = layer.weight
        q = layer.quant
        if q is not None and q.weight_bits is not None:
            w = quantize_ste(w, q.weight_bits)
        if layer.delta is not None:
            w = w + layer.delta
        return w.detach()


def _effective_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    q = layer.quant
    if q is not None and q.input_bits is not None:
        x = quantize_ste(x, q.input_bits, groups=1, unsigned_if_nonneg=True)
    return x.detach()


def _check_data_batch(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError("data must yield (inputs, labels) batches")
    x, y = batch[0], batch[1]
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("data must yield (inputs, labels) tensor batches")
    return x, y


@contextlib.contextmanager
def _analysis_mode(model: nn.Module, weights_grad: bool) -> Iterator[None]:
    """Eval mode, clean CiM layers; parameters frozen except (optionally) CiM weights."""
    was_training = model.training
    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        if weights_grad:
            for _, m in require_cim_layers(model, "hessian_diag"):
                m.weight.requires_grad_(True)
        with clean(model):
            yield
    finally:
        for p, r in zip(params, saved, strict=True):
            p.requires_grad_(r)
        model.train(was_training)


# ------------------------------------------------------------------------------------------------
# obd: the Becker–LeCun recursion through hooks
# ------------------------------------------------------------------------------------------------
class _LayerCurv(torch.autograd.Function):
    """Identity on a CiM layer's output y; backward: H += hdiag(x, S), S_in = curv_backward."""

    @staticmethod
    def forward(ctx, x, y, anchor, layer, x_eff, w_eff, acc):
        ctx.layer, ctx.x_eff, ctx.w_eff, ctx.acc = layer, x_eff, w_eff, acc
        return y.view_as(y)

    @staticmethod
    def backward(ctx, s_out):
        layer, x_eff, w_eff = ctx.layer, ctx.x_eff, ctx.w_eff
        s_out = s_out.contiguous()
        s_in = None
        if isinstance(layer, CiMLinear):
            ctx.acc[layer] += ops.hdiag_linear(x_eff, s_out)
            if ctx.needs_input_grad[0]:
                s_in = ops.curv_backward_linear(s_out, w_eff)
        else:
            xp, extra = layer._prepare(x_eff)
            pad = extra["padding"]
            unbatched = xp.dim() == 3
            if unbatched:
                xp, s_out = xp.unsqueeze(0), s_out.unsqueeze(0)
            args = (layer.stride, pad, layer.dilation, layer.groups)
            ctx.acc[layer] += ops.hdiag_conv2d(xp, s_out, layer.kernel_size, *args)
            if ctx.needs_input_grad[0]:
                s_in = ops.curv_backward_conv2d(s_out, w_eff, xp.shape[2:], *args)
                if unbatched:
                    s_in = s_in.squeeze(0)
                if xp.shape[-2:] != x_eff.shape[-2:]:
                    # Non-zero padding modes pad before the op: route S back through F.pad,
                    # whose Jacobian holds only 0 / 1 (copies are summed).
                    with torch.enable_grad():
                        xr = x_eff.detach().requires_grad_(True)
                        (s_in,) = torch.autograd.grad(layer._prepare(xr)[0], xr, s_in)
        return s_in, None, None, None, None, None, None


class _ScaleCurv(torch.autograd.Function):
    """Identity on a module's output; backward: S_in = coef · S_out (coef broadcastable)."""

    @staticmethod
    def forward(ctx, x, y, anchor, coef):
        ctx.coef = coef
        return y.view_as(y)

    @staticmethod
    def backward(ctx, s_out):
        return s_out * ctx.coef, None, None, None


class _PoolCurv(torch.autograd.Function):
    """Average pooling: S_in[i] = Σ_w c_w² S_out[w], i.e. autograd's backward of c ⊙ S_out."""

    @staticmethod
    def forward(ctx, x, y, anchor, module, coef):
        ctx.module, ctx.coef, ctx.x = module, coef, x.detach()
        return y.view_as(y)

    @staticmethod
    def backward(ctx, s_out):
        with torch.enable_grad():
            xr = ctx.x.requires_grad_(True)
            out = _pool_fn(ctx.module)(xr)
            (s_in,) = torch.autograd.grad(out, xr, s_out * ctx.coef)
        return s_in, None, None, None, None


def _pool_fn(m: nn.Module):
    """The module's pooling as a plain function (calling the module would re-enter its hook)."""
    if isinstance(m, nn.AvgPool2d):
        return lambda t: F.avg_pool2d(
            t,
            m.kernel_size,
            m.stride,
            m.padding,
            m.ceil_mode,
            m.count_include_pad,
            m.divisor_override,
        )
    return lambda t: F.adaptive_avg_pool2d(t, m.output_size)


def _avgpool_coef(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The coefficient c_w with which output window w averages each input it reads."""
    with torch.no_grad():
        ones = torch.ones_like(x[:1])
        mean = _pool_fn(module)(ones)  # c_w · (number of real inputs in w)
        if isinstance(module, nn.AvgPool2d):
            counted = F.avg_pool2d(
                ones,
                module.kernel_size,
                module.stride,
                module.padding,
                module.ceil_mode,
                count_include_pad=False,
                divisor_override=1,
            )
        else:  # AdaptiveAvgPool: every window averages its own inputs: c_w = 1 / count
            return 1.0 / _adaptive_counts(module, x)
        return mean / counted


def _adaptive_counts(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = module.output_size
    out = (out, out) if isinstance(out, int) else tuple(out)
    h, w = x.shape[-2:]
    oh = h if out[0] is None else out[0]
    ow = w if out[1] is None else out[1]

    def sizes(n_in: int, n_out: int) -> torch.Tensor:
        i = torch.arange(n_out)
        start = (i * n_in) // n_out
        end = ((i + 1) * n_in + n_out - 1) // n_out
        return (end - start).to(x.dtype)

    return (sizes(h, oh)[:, None] * sizes(w, ow)[None, :]).to(x.device)


def _make_hooks(model: nn.Module, acc: dict, anchor: torch.Tensor) -> list:
    cim = {id(m) for _, m in require_cim_layers(model, "hessian_diag")}
    handles = []
    for name, m in model.named_modules():
        if id(m) in cim:
            handles.append(m.register_forward_hook(_layer_hook(acc, anchor)))
        elif isinstance(m, _UNSUPPORTED):
            raise TypeError(
                f"hessian_diag(method='obd'): module {name!r} ({type(m).__name__}) is not "
                "supported; convert Linear / Conv2d layers with cimext.convert, or use "
                "method='hutchinson'"
            )
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            handles.append(m.register_forward_hook(_bn_hook(anchor)))
        elif isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            handles.append(m.register_forward_hook(_pool_hook(anchor)))
        elif isinstance(m, (nn.Tanh, nn.Sigmoid)):
            handles.append(m.register_forward_hook(_act_hook(anchor)))
    return handles


def _layer_hook(acc: dict, anchor: torch.Tensor):
    def hook(layer, args, y):
        x = args[0]
        if layer not in acc:
            acc[layer] = torch.zeros_like(layer.weight, dtype=y.dtype)
        x_eff = _effective_input(layer, x)
        return _LayerCurv.apply(x, y.detach(), anchor, layer, x_eff, effective_weight(layer), acc)

    return hook


def _bn_hook(anchor: torch.Tensor):
    def hook(bn, args, y):
        with torch.no_grad():
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight
            shape = [1, -1] + [1] * (y.dim() - 2)
            coef = scale.square().reshape(shape)
        return _ScaleCurv.apply(args[0], y.detach(), anchor, coef)

    return hook


def _pool_hook(anchor: torch.Tensor):
    def hook(pool, args, y):
        return _PoolCurv.apply(args[0], y.detach(), anchor, pool, _avgpool_coef(pool, args[0]))

    return hook


def _act_hook(anchor: torch.Tensor):
    def hook(act, args, y):
        with torch.no_grad():
            d = 1 - y.square() if isinstance(act, nn.Tanh) else y * (1 - y)
        # autograd of an identity gives S; the recursion wants f'(x)² S.
        return _ScaleCurv.apply(args[0], y.detach(), anchor, d.square())

    return hook


def _obd(model: nn.Module, data: Iterable) -> tuple[dict, int]:
    layers = require_cim_layers(model, "hessian_diag")
    acc: dict = {}
    # The Functions take this leaf so that the first layer's Function is on the graph even though
    # no input or parameter requires a gradient.
    anchor = torch.zeros((), requires_grad=True)
    samples = 0
    with _analysis_mode(model, weights_grad=False):
        handles = _make_hooks(model, acc, anchor)
        try:
            for batch in data:
                x, y = _check_data_batch(batch)
                dev = next(model.parameters()).device
                x, y = x.to(dev), y.to(dev)
                with torch.enable_grad():
                    logits = model(x)
                    if logits.dim() != 2:
                        raise ValueError(
                            f"hessian_diag: the model must return (batch, classes) logits, got "
                            f"shape {tuple(logits.shape)}"
                        )
                    with torch.no_grad():
                        p = torch.softmax(logits.detach().double(), dim=-1)
                        seed = (p * (1 - p)).to(logits.dtype)
                    if logits.requires_grad:
                        logits.backward(seed)
                samples += int(y.numel())
        finally:
            for h in handles:
                h.remove()
    out = {}
    for name, m in layers:
        h = acc.get(m)
        out[name] = torch.zeros_like(m.weight) if h is None else h.to(m.weight.dtype)
    return out, samples


# ------------------------------------------------------------------------------------------------
# hutchinson: E[v ⊙ Hv] by double backpropagation
# ------------------------------------------------------------------------------------------------
def _hutchinson(model: nn.Module, data: Iterable, probes: int, seed: int) -> tuple[dict, int]:
    layers = require_cim_layers(model, "hessian_diag")
    weights = [m.weight for _, m in layers]
    acc = [torch.zeros_like(w) for w in weights]
    # manual_seed takes [-2**63, 2**64); the seed was checked to be in [0, 2**64).
    gen = torch.Generator().manual_seed(int(seed))
    samples = 0
    with _analysis_mode(model, weights_grad=True):
        for batch in data:
            x, y = _check_data_batch(batch)
            dev = weights[0].device
            x, y = x.to(dev), y.to(dev)
            with torch.enable_grad():
                loss = F.cross_entropy(model(x), y, reduction="sum")
                grads = torch.autograd.grad(loss, weights, create_graph=True)
                for _ in range(probes):
                    vs = [
                        (torch.randint(0, 2, w.shape, generator=gen) * 2 - 1).to(w) for w in weights
                    ]
                    hv = torch.autograd.grad(grads, weights, vs, retain_graph=True)
                    for a, v, h in zip(acc, vs, hv, strict=True):
                        a += v * h
            samples += int(y.numel())
    out = {name: a / probes for (name, _), a in zip(layers, acc, strict=True)}
    return out, samples


def hessian_diag(
    model: nn.Module,
    data: Iterable,
    method: str = "obd",
    *,
    probes: int = 100,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Diagonal of the Hessian of the mean cross-entropy over ``data`` with respect to the weight
    of every CiM layer of the converted ``model`` (layer name -> tensor of the weight's shape).

    method="obd": the one-forward, one-backward Becker–LeCun recursion (a Gauss-Newton diagonal,
    non-negative). method="hutchinson": E[v ⊙ Hv] over ``probes`` Rademacher vectors (seeded with
    ``seed``) of the exact Hessian. BatchNorm runs in eval mode, CiM layers clean (quantization
    and δ still apply); the model's mode and requires_grad flags are restored afterwards.
    """
    require_cim_layers(model, "hessian_diag")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(probes, bool) or not isinstance(probes, numbers.Integral) or probes < 1:
        raise ValueError(f"probes must be an int >= 1, got {probes!r}")
    if method == "obd":
        out, n = _obd(model, data)
    else:
        out, n = _hutchinson(model, data, int(probes), check_seed(seed))
    if n == 0:
        raise ValueError("hessian_diag: the data yielded no samples")
    return {k: v / n for k, v in out.items()}


def diag_ggn_exact(model: nn.Module, data: Iterable, *, chunk: int = 32) -> dict[str, torch.Tensor]:
    """The exact diagonal of the generalized Gauss-Newton matrix of the mean cross-entropy,
    Σ_n Σ_k (J_nᵀ u_nk)² / N with u_nk = sqrt(p_k)(e_k − p) (diag(p) − ppᵀ = Σ_k u_k u_kᵀ), from
    per-sample vector-Jacobian products (torch.func). Clean float weights; a reference for "obd"."""
    from torch.func import functional_call, vjp, vmap

    layers = require_cim_layers(model, "diag_ggn_exact")
    names = [f"{n}.weight" if n else "weight" for n, _ in layers]
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    weights = {k: params[k] for k in names}
    acc = {k: torch.zeros_like(v) for k, v in weights.items()}
    samples = 0

    def logits_of(w, x):
        return functional_call(model, ({**params, **w}, buffers), (x.unsqueeze(0),)).squeeze(0)

    def per_sample(w, x, u):
        _, pull = vjp(lambda ww: logits_of(ww, x), w)
        return vmap(pull)(u)[0]

    with _analysis_mode(model, weights_grad=False):
        for batch in data:
            x, y = _check_data_batch(batch)
            x = x.to(next(iter(weights.values())).device)
            for c0 in range(0, x.shape[0], chunk):
                xc = x[c0 : c0 + chunk]
                with torch.no_grad():
                    p = torch.softmax(model(xc), dim=-1)
                    eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
                    u = p.sqrt()[:, :, None] * (eye[None] - p[:, None, :])  # (n, k, classes)
                jt = vmap(per_sample, in_dims=(None, 0, 0))(weights, xc, u)
                for k in acc:
                    acc[k] += jt[k].square().sum(dim=(0, 1))
            samples += int(y.numel())
    if samples == 0:
        raise ValueError("diag_ggn_exact: the data yielded no samples")
    return {n: acc[k] / samples for (n, _), k in zip(layers, names, strict=True)}
