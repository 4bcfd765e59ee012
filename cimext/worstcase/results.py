"""WorstCaseResult: what lwc / flwc / weight_pgd found, how to check it, save it and load it.

``verify`` is deliberately independent of the code that produced the result: it rebuilds every
perturbed weight with plain torch (its own quantizer, F.linear / nn.Conv2d._conv_forward), so a
bug in a CiM layer, a context manager or a cimext op cannot make a wrong result look right.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

# Relative slack of the bound check: δ is stored in weight units (u·s with |u| <= th_g), and the
# product can land an ulp or two above th_g·s.
BOUND_RTOL = 1e-6

_DELTAS_FILE = "deltas.safetensors"
_BOUNDS_FILE = "bounds.safetensors"  # per-weight bound tensors (dict th_g only)
_JSON_FILE = "result.json"


def plain_quantize(
    t: torch.Tensor, bits: int | None, *, unsigned_if_nonneg: bool = False
) -> torch.Tensor:
    """Symmetric per-tensor quantization in plain torch: round(t / scale) * scale with
    scale = max|t| / (2^(bits-1) - 1), or max|t| / (2^bits - 1) when ``unsigned_if_nonneg`` and
    ``t`` has no negative value; bits=1 is sign(t) * mean|t|; None returns ``t``.

    The arithmetic of the CiM layers' quantizer (weights signed, inputs unsigned when
    non-negative), written out again on purpose so that :meth:`WorstCaseResult.verify` does not
    depend on it; it has to follow any change of that quantizer.
    """
    if bits is None or t.numel() == 0:
        return t
    t = t.detach()
    if bits == 1:
        return torch.sign(t) * t.abs().mean()
    levels = 2 ** (bits - 1) - 1
    if unsigned_if_nonneg and bool(t.min() >= 0):
        levels = 2**bits - 1
    scale = t.abs().amax() / levels
    if not bool(scale > 0):
        return t.clone()  # all zeros stay zeros
    return torch.round(t / scale) * scale


def _bits(layer: nn.Module, which: str) -> int | None:
    quant = getattr(layer, "quant", None)
    return None if quant is None else getattr(quant, which)


def used_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a CiM layer computes with (quantized when weight quantization is on),
    detached, in plain torch."""
    return plain_quantize(layer.weight.detach(), _bits(layer, "weight_bits"))


def _cim_named_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    # A CiM layer is a Linear / Conv2d that carries the CiM quantization slot; found by duck
    # typing so that verify needs nothing from cimext.nn.
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and hasattr(m, "quant") and hasattr(m, "delta")
    ]


@dataclass
class WorstCaseResult:
    """Outcome of a worst-case search (worst_case, lwc, flwc, weight_pgd).

    ``accuracy`` is the top-1 accuracy on the data with every CiM layer's weight W_used + δ
    (W_used: the quantized weight when weight quantization is on); ``deltas`` maps layer names to
    δ in weight units; |δ_l| <= th_g·s_l with s_l = max|W_used,l|, and ``max_perturbation`` is
    max_l max|δ_l| / s_l (DESIGN section 2). ``history`` has one dict per search stage (a c value
    of LWC, an epoch of F-LWC / PGD, a stage of worst_case). ``warning`` is set when the clean
    model was already at chance level.

    Per-layer / per-weight bounds (th_g given as a dict): ``bounds`` maps every layer to its
    bound b_l (a float, or a tensor of the weight's shape), |δ_l| <= b_l·s_l elementwise, and
    ``th_g`` holds the same as JSON (tensors summarized by shape, min, max, mean). With one
    number th_g, ``bounds`` is None and b_l = th_g. ``bound_ratio`` is max over weights of
    |δ| / (b·s_l): 1.0 when some weight sits at its bound, never above 1 for a valid result
    (infinite if a weight with bound 0 moved).
    """

    method: str
    accuracy: float
    clean_accuracy: float
    max_perturbation: float
    th_g: float | dict
    deltas: dict[str, torch.Tensor]
    seconds: float
    settings: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    samples: int = 0
    scales: dict[str, float] = field(default_factory=dict)
    warning: str | None = None
    bounds: dict[str, float | torch.Tensor] | None = None
    bound_ratio: float | None = None

    def bound_of(self, name: str) -> float | torch.Tensor:
        """The bound b_l of layer ``name`` (a fraction of its full scale; float or tensor)."""
        if self.bounds is not None:
            return self.bounds.get(name, 0.0)
        return float(self.th_g)

    # ------------------------------------------------------------------ checking

    def verify(self, model: nn.Module, data: Iterable) -> float:
        """Recompute the accuracy of ``model`` with W_used + δ on ``data`` using plain torch only.

        Checks every |δ_l| <= b_l·s_l elementwise first (b_l = th_g, or the layer's entry of
        ``bounds``; relative slack 1e-6, so a weight with bound 0 must be exactly unchanged) and
        raises AssertionError naming the first layer that breaks it. Every CiM layer's forward
        is temporarily replaced by a closure calling F.linear / nn.Conv2d._conv_forward on
        W_used + δ (inputs quantized in plain torch when the layer quantizes inputs); no cimext
        op runs. The model comes back unchanged (forwards, train/eval mode).
        """
        layers = _cim_named_layers(model)
        if not layers:
            raise TypeError("verify needs a converted model: call cimext.convert(model) first")
        by_name = dict(layers)
        unknown = [n for n in self.deltas if n not in by_name]
        if unknown:
            raise ValueError(f"deltas name layers the model does not have: {unknown}")
        effective: dict[str, torch.Tensor] = {}
        for name, layer in layers:
            w = used_weight(layer)
            d = self.deltas.get(name)
            if d is None:
                effective[name] = w
                continue
            if tuple(d.shape) != tuple(w.shape):
                raise ValueError(
                    f"deltas[{name!r}] has shape {tuple(d.shape)}, weight has {tuple(w.shape)}"
                )
            d = d.to(device=w.device, dtype=w.dtype)
            s = float(w.abs().max())
            b = self.bound_of(name)
            if isinstance(b, torch.Tensor):
                if tuple(b.shape) != tuple(w.shape):
                    raise ValueError(
                        f"bounds[{name!r}] has shape {tuple(b.shape)}, weight has {tuple(w.shape)}"
                    )
                limit = b.to(device=w.device, dtype=torch.float64) * s
                over = d.abs().double() > limit * (1 + BOUND_RTOL)
                if d.numel() and bool(over.any()):
                    i = int(over.flatten().nonzero()[0])
                    raise AssertionError(
                        f"layer {name!r}: |δ| = {float(d.flatten()[i].abs()):.6g} at flat index "
                        f"{i} exceeds its bound b·s = {float(b.flatten()[i]):g}·{s:.6g}"
                    )
            else:
                worst = float(d.abs().max()) if d.numel() else 0.0
                limit = float(b) * s
                if worst > limit * (1 + BOUND_RTOL):
                    raise AssertionError(
                        f"layer {name!r}: max|δ| = {worst:.6g} exceeds th_g·s = {float(b):g}·"
                        f"{s:.6g} = {limit:.6g} (|δ|/s = {worst / s if s else math.inf:.6g})"
                    )
            effective[name] = w + d

        def make_forward(layer: nn.Module, w_eff: torch.Tensor):
            in_bits = _bits(layer, "input_bits")
            if isinstance(layer, nn.Conv2d):

                def fwd(x):
                    x = plain_quantize(x, in_bits, unsigned_if_nonneg=True)
                    return nn.Conv2d._conv_forward(layer, x, w_eff, layer.bias)
            else:

                def fwd(x):
                    x = plain_quantize(x, in_bits, unsigned_if_nonneg=True)
                    return F.linear(x, w_eff, layer.bias)

            return fwd

        was_training = model.training
        model.eval()
        for name, layer in layers:
            # An instance attribute shadows the class forward; nn.Module.__call__ picks it up.
            layer.forward = make_forward(layer, effective[name])
        correct = total = 0
        try:
            dev = layers[0][1].weight.device
            with torch.no_grad():
                for x, y in data:
                    x, y = x.to(dev), y.to(dev)
                    correct += int((model(x).argmax(-1) == y).sum())
                    total += int(y.numel())
        finally:
            for _, layer in layers:
                layer.__dict__.pop("forward", None)
            model.train(was_training)
        if total == 0:
            raise ValueError("verify: the data yielded no samples")
        return correct / total

    # ------------------------------------------------------------------ serialization

    def _meta(self) -> dict:
        return dict(
            kind="worst_case",
            method=self.method,
            accuracy=self.accuracy,
            clean_accuracy=self.clean_accuracy,
            max_perturbation=self.max_perturbation,
            th_g=self.th_g,
            seconds=self.seconds,
            samples=self.samples,
            settings=self.settings,
            history=self.history,
            scales=self.scales,
            warning=self.warning,
            bound_ratio=self.bound_ratio,
            per_layer_bounds=self.bounds is not None,
            layers={
                n: dict(
                    shape=list(d.shape),
                    max_abs=float(d.abs().max()) if d.numel() else 0.0,
                    dtype=str(d.dtype).replace("torch.", ""),
                )
                for n, d in self.deltas.items()
            },
        )

    def to_json(self) -> str:
        """Everything but the δ tensors themselves (their shapes and max|δ| per layer are in
        ``layers``; per-weight bounds are summarized in ``th_g``) as a JSON string."""
        return json.dumps(_finite(self._meta()), indent=1)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path``/deltas.safetensors (δ per layer), ``path``/result.json (the rest) and,
        for per-weight bounds, ``path``/bounds.safetensors; ``path`` is a directory, created if
        needed. Returns it."""

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {n: d.detach().cpu().contiguous() for n, d in self.deltas.items()}
        # Write to temporary names and rename, so an interrupted save never leaves a half file
        # next to a complete one.
        tmp_t, tmp_j = out / (_DELTAS_FILE + ".tmp"), out / (_JSON_FILE + ".tmp")
        save_file(tensors, str(tmp_t), metadata={"method": self.method})
        tmp_j.write_text(self.to_json())
        bound_tensors = {
            n: b.detach().cpu().contiguous()
            for n, b in (self.bounds or {}).items()
            if isinstance(b, torch.Tensor)
        }
        if bound_tensors:
            tmp_b = out / (_BOUNDS_FILE + ".tmp")
            save_file(bound_tensors, str(tmp_b))
            os.replace(tmp_b, out / _BOUNDS_FILE)
        os.replace(tmp_t, out / _DELTAS_FILE)
        os.replace(tmp_j, out / _JSON_FILE)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> WorstCaseResult:
        """Read a result written by :meth:`save` (``path`` is its directory)."""

        src = Path(path)
        meta_file, delta_file = src / _JSON_FILE, src / _DELTAS_FILE
        for f in (meta_file, delta_file):
            if not f.is_file():
                raise FileNotFoundError(f"{f} not found: not a directory written by save()")
        meta = json.loads(meta_file.read_text())
        if meta.get("kind") != "worst_case":
            raise ValueError(f"{meta_file} is not a worst-case result")
        deltas = load_file(str(delta_file))
        # Keep the layer order of the original result (safetensors sorts its keys).
        order = list(meta.get("layers", {})) or list(deltas)
        bounds = None
        if meta.get("per_layer_bounds"):
            tensors = load_file(str(src / _BOUNDS_FILE)) if (src / _BOUNDS_FILE).is_file() else {}
            bounds = {
                n: tensors[n] if n in tensors else float(meta["th_g"].get(n, 0.0)) for n in order
            }
        return cls(
            method=meta["method"],
            accuracy=meta["accuracy"],
            clean_accuracy=meta["clean_accuracy"],
            max_perturbation=meta["max_perturbation"],
            th_g=meta["th_g"],
            deltas={n: deltas[n] for n in order},
            seconds=meta["seconds"],
            settings=meta.get("settings", {}),
            history=meta.get("history", []),
            samples=meta.get("samples", 0),
            scales=meta.get("scales", {}),
            warning=meta.get("warning"),
            bounds=bounds,
            bound_ratio=meta.get("bound_ratio"),
        )

    def summary(self) -> dict:
        """The headline figures as a small dict (for tables)."""
        return dict(
            method=self.method,
            accuracy=self.accuracy,
            clean_accuracy=self.clean_accuracy,
            max_perturbation=self.max_perturbation,
            th_g=self.th_g,
            seconds=self.seconds,
        )


def _finite(obj):
    """``obj`` with every non-finite float replaced by its string ("inf", "nan"): JSON proper has
    no Infinity / NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
