"""What the worst-case methods share: argument checks (th_g as a number, a sweep or per-layer /
per-weight bounds), the prepared problem (batches, layers, full scales, bounds), the analysis
context that leaves the model as it was, evaluation, th_g sweeps and results.

Perturbations are optimized in *relative* units u_l = δ_l / s_l, so one bound (th_g), one step
size (eta, alpha, lr) and one multi-tensor sign_step_ call serve every layer whatever its scale;
the layers get δ_l = u_l·s_l (weight units) at every forward. A per-layer bound b_l (a number)
or per-weight bound (a tensor of the weight's shape) is in the same units: |u_l| <= b_l.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import ops
from .._util import check_finite_weights, progress
from ..nn import clean, perturbation, require_cim_layers
from .results import WorstCaseResult, used_weight

# A clean accuracy at or below 1/num_classes + this is "at chance": nothing meaningful to attack.
CHANCE_MARGIN = 0.05
# The smallest mini-batch a search on a subset of the samples cuts (see Problem.subset).
MIN_SUBSET_BATCH = 32


# ---------------------------------------------------------------------------- argument checks


def check_positive(name: str, value, *, upper: float | None = None, upper_name: str = "") -> float:
    """A finite real > 0 (and <= upper when given) as float, else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if upper is not None and v > upper:
        raise ValueError(f"{name} must be <= {upper_name} ({upper:g}), got {value!r}")
    return v


def check_steps(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


# ---------------------------------------------------------------------------- th_g


@dataclass(frozen=True)
class BoundSpec:
    """A checked th_g. ``kind`` "scalar": one bound (float) for every weight; "dict": per layer
    (name -> float, or name -> tensor of the weight's shape on the CPU; layers not named get 0);
    "sweep": increasing floats, one result each."""

    kind: str
    value: float | dict | tuple

    @property
    def largest(self) -> float:
        """The largest bound of any weight (the unit of the default step sizes)."""
        if self.kind == "scalar":
            return self.value
        if self.kind == "sweep":
            return self.value[-1]
        return max(_bound_max(b) for b in self.value.values())


def _bound_max(b) -> float:
    return float(b.max()) if isinstance(b, torch.Tensor) else float(b)


def parse_th_g(th_g, named: list[tuple[str, nn.Module]], what: str, name: str = "th_g"):
    """Check ``th_g`` against the model's CiM layers ``named`` and return its BoundSpec.

    A number: finite and > 0. A sequence (list, tuple, 1-d tensor): non-empty, every entry a
    number > 0, strictly increasing. A dict: keys are CiM layer names, values numbers >= 0 or
    floating tensors of that layer's weight shape with finite entries >= 0 (fractions of the
    layer's full scale), and some bound > 0. Anything else raises TypeError / ValueError naming
    ``name``, before any work starts."""
    if isinstance(th_g, dict):
        layers = dict(named)
        out: dict[str, float | torch.Tensor] = {}
        for key, b in th_g.items():
            if key not in layers:
                valid = ", ".join(repr(n) for n in layers)
                raise ValueError(
                    f"{name}: {key!r} is not a CiM layer of the model (CiM layers: {valid})"
                )
            out[key] = _check_layer_bound(f"{name}[{key!r}]", b, layers[key].weight)
        if not out or max(_bound_max(b) for b in out.values()) <= 0:
            raise ValueError(f"{name}: every bound is 0, so no weight may move")
        full = {n: out.get(n, 0.0) for n, _ in named}  # unnamed layers: not perturbed
        return BoundSpec("dict", full)
    if isinstance(th_g, torch.Tensor) and th_g.dim() == 1:
        th_g = th_g.tolist()
    if isinstance(th_g, Sequence) and not isinstance(th_g, (str, bytes)):
        if len(th_g) == 0:
            raise ValueError(f"{name} is an empty sequence; give at least one bound")
        vals = tuple(check_positive(f"{name}[{i}]", v) for i, v in enumerate(th_g))
        for i in range(1, len(vals)):
            if not vals[i] > vals[i - 1]:
                raise ValueError(
                    f"{name} must be strictly increasing (a sweep runs in order, each bound "
                    f"warm-started from the previous one), got {name}[{i - 1}] = {vals[i - 1]:g} "
                    f"and {name}[{i}] = {vals[i]:g}"
                )
        return BoundSpec("sweep", vals)
    if isinstance(th_g, torch.Tensor) and th_g.dim() == 0:
        th_g = th_g.item()
    if isinstance(th_g, bool) or not isinstance(th_g, numbers.Real):
        raise TypeError(
            f"{name} must be a number, an increasing sequence of numbers or a dict of per-layer "
            f"bounds, got {type(th_g).__name__}"
        )
    return BoundSpec("scalar", check_positive(name, th_g))


def _check_layer_bound(name: str, b, weight: torch.Tensor) -> float | torch.Tensor:
    if isinstance(b, torch.Tensor) and b.dim() == 0:
        b = b.item()
    if isinstance(b, torch.Tensor):
        if not b.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {b.dtype}")
        if tuple(b.shape) != tuple(weight.shape):
            raise ValueError(
                f"{name} has shape {tuple(b.shape)} but the layer's weight has shape "
                f"{tuple(weight.shape)} (give one bound per weight, or one number)"
            )
        b = b.detach()
        if not bool(torch.isfinite(b).all()):
            raise ValueError(f"{name} has NaN or infinite entries")
        if bool((b < 0).any()):
            raise ValueError(f"{name} has negative entries (bounds must be >= 0)")
        return b.to("cpu", torch.float64).clone()
    if isinstance(b, bool) or not isinstance(b, numbers.Real):
        raise TypeError(f"{name} must be a number or a tensor, got {type(b).__name__}")
    v = float(b)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {b!r}")
    return v


def th_g_json(value) -> float | dict:
    """A bound (float or per-layer dict) as JSON: tensors become a summary of their entries."""
    if not isinstance(value, dict):
        return float(value)
    return {
        n: (
            dict(
                shape=list(b.shape),
                min=float(b.min()) if b.numel() else 0.0,
                max=float(b.max()) if b.numel() else 0.0,
                mean=float(b.double().mean()) if b.numel() else 0.0,
            )
            if isinstance(b, torch.Tensor)
            else float(b)
        )
        for n, b in value.items()
    }


# ---------------------------------------------------------------------------- the problem


@dataclass
class Problem:
    """A converted model and its data, prepared once for a worst-case search."""

    model: nn.Module
    names: list[str]
    layers: list[nn.Module]
    scales: list[torch.Tensor]  # s_l = max|W_used,l| as 0-d tensors on the weight's device
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    samples: int
    num_classes: int = 0
    clean_accuracy: float = 0.0
    # |u_l| <= bounds[l]: a float, or a tensor of the weight's shape (per-weight bounds)
    bounds: list = field(default_factory=list)
    th_g: float | dict = 0.0  # the bound as given (a float or the per-layer dict)
    largest: float = 0.0  # the largest bound of any weight: the unit of default step sizes
    _xy: tuple | None = None

    # ------------------------------------------------------------ bounds
    def set_bounds(self, th_g: float | dict) -> None:
        """Use bound ``th_g``: a float for every weight, or a per-layer dict (BoundSpec)."""
        if isinstance(th_g, dict):
            self.bounds = [
                b.to(m.weight.device, m.weight.dtype) if isinstance(b, torch.Tensor) else b
                for b, m in zip((th_g[n] for n in self.names), self.layers, strict=True)
            ]
            self.largest = max(_bound_max(b) for b in self.bounds)
        else:
            self.bounds = [float(th_g)] * len(self.layers)
            self.largest = float(th_g)
        self.th_g = th_g

    def clamp(self, us: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copies of ``us`` projected onto the box |u_l| <= b_l."""
        return [_clamp(u.detach(), b) for u, b in zip(us, self.bounds, strict=True)]

    def random_start(self, gen: torch.Generator) -> list[torch.Tensor]:
        """u_l uniform in the box (a CPU generator, so a seed gives the same start anywhere)."""
        out = []
        for m, b in zip(self.layers, self.bounds, strict=True):
            r = torch.rand(m.weight.shape, generator=gen, dtype=m.weight.dtype)
            out.append(((r * 2 - 1) * b).to(m.weight.device))
        return out

    def sign_step_(self, us: list[torch.Tensor], grads, eta: float) -> None:
        """u_l ← clamp(u_l − eta·sign(g_l), ±b_l) for every layer: one fused op call."""

        ops.sign_step_(us, list(grads), eta, self.bounds)

    def excess(self, us: list[torch.Tensor]) -> float:
        """R(u) = Σ max(|u| − b, 0): how far ``us`` lies outside the box (0 inside)."""
        with torch.no_grad():
            return float(
                sum(torch.relu(u.abs() - b).sum() for u, b in zip(us, self.bounds, strict=True))
            )

    def prox_(self, us: list[torch.Tensor], pull: float) -> None:
        """In place: every |u| above its bound moves ``pull`` back towards it (not past it)."""
        with torch.no_grad():
            for u, b in zip(us, self.bounds, strict=True):
                a = u.abs()
                u.copy_(torch.where(a > b, torch.sign(u) * torch.maximum(a - pull, _full(a, b)), u))

    def outside_ratio(self, us: list[torch.Tensor]) -> float:
        """max over weights of |u| / b (1 at the bound; the bound of a zero-bound weight is 0,
        so any movement there is infinitely outside)."""
        return max(_ratio(u.detach(), b) for u, b in zip(us, self.bounds, strict=True))

    # ------------------------------------------------------------ δ on the layers
    def zeros(self) -> list[torch.Tensor]:
        """Relative perturbations u_l = 0, one per layer."""
        return [torch.zeros_like(m.weight, requires_grad=False) for m in self.layers]

    def set_relative(self, us: list[torch.Tensor]) -> list[torch.Tensor]:
        """Give every layer δ_l = u_l·s_l (differentiable in u_l); returns the δ_l."""
        ds = [u * s for u, s in zip(us, self.scales, strict=True)]
        for m, d in zip(self.layers, ds, strict=True):
            m.__dict__["_delta"] = d  # shapes are right by construction; skip the setter checks
        return ds

    def clear(self) -> None:
        for m in self.layers:
            m.__dict__["_delta"] = None

    @torch.no_grad()
    def correct(self, us: list[torch.Tensor] | None) -> int:
        """Number of samples classified correctly with δ_l = u_l·s_l (None: no δ)."""
        if us is None:
            self.clear()
        else:
            self.set_relative(us)
        n = 0
        for x, y in self.batches:
            n += int((self.model(x).argmax(-1) == y).sum())
        return n

    @torch.no_grad()
    def evaluate(self, us: list[torch.Tensor] | None) -> tuple[int, torch.Tensor]:
        """(number correct, per-sample margins O_t − max_{i≠t} O_i in data order) with
        δ_l = u_l·s_l (None: no δ). One forward pass over the data."""
        if us is None:
            self.clear()
        else:
            self.set_relative(us)
        n, ms = 0, []
        for x, y in self.batches:
            out = self.model(x)
            n += int((out.argmax(-1) == y).sum())  # as correct(): ties go to the first class
            ms.append(margin(out.float(), y))
        return n, torch.cat(ms)

    @torch.no_grad()
    def evaluate_subset(
        self, us: list[torch.Tensor], mask: torch.Tensor
    ) -> tuple[int, torch.Tensor]:
        """(number correct, margins) of the samples where ``mask`` holds (data order), with
        δ_l = u_l·s_l; all the data when the inputs cannot be concatenated."""
        xy = self._concat()
        if xy is None:
            n, m = self.evaluate(us)
            return n, m[mask]
        x, y = xy
        self.set_relative(us)
        idx = mask.nonzero().flatten().to(x.device)
        bs = max(int(b[1].numel()) for b in self.batches)
        n, ms = 0, []
        for i in range(0, idx.numel(), bs):
            j = idx[i : i + bs]
            out = self.model(x[j])
            n += int((out.argmax(-1) == y[j]).sum())
            ms.append(margin(out.float(), y[j]))
        return n, (torch.cat(ms) if ms else torch.zeros(0, device=mask.device))

    def _concat(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """All inputs and labels concatenated (once), or None when the inputs differ in shape."""
        if self._xy is None:
            try:
                x = torch.cat([b[0] for b in self.batches])
            except RuntimeError:  # inputs of different shapes: no subsets
                self._xy = (None, None)
            else:
                self._xy = (x, torch.cat([b[1] for b in self.batches]))
        return None if self._xy[0] is None else self._xy

    def subset(self, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The samples where ``mask`` (data order) holds, in as many mini-batches as the data
        has (but none below MIN_SUBSET_BATCH samples): an epoch on a subset takes about as many
        steps as one on all the data, each on fewer samples. All the batches when the inputs
        cannot be concatenated."""
        xy = self._concat()
        if xy is None:
            return self.batches
        x, y = xy
        idx = mask.nonzero().flatten().to(x.device)
        n = idx.numel()
        parts = max(1, min(len(self.batches), n // MIN_SUBSET_BATCH))
        return [(x[i], y[i]) for i in torch.tensor_split(idx, parts) if i.numel()]

    def weight_deltas(self, us: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """δ_l = u_l·s_l in weight units, detached, on the CPU, by layer name."""
        return {
            n: (u.detach() * s).cpu().clone()
            for n, u, s in zip(self.names, us, self.scales, strict=True)
        }

    def relative(self, deltas: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """u_l = δ_l / s_l of weight-unit deltas by name, projected onto the current box (the
        division can land an ulp outside)."""
        us = [
            deltas[n].to(m.weight.device, m.weight.dtype) / s
            for n, m, s in zip(self.names, self.layers, self.scales, strict=True)
        ]
        return self.clamp(us)

    def max_relative(self, us: list[torch.Tensor]) -> float:
        """max_l max|u_l| (the paper's L(ΔW) in units of the full scale)."""
        return max(float(u.detach().abs().max()) if u.numel() else 0.0 for u in us)


def _full(a: torch.Tensor, b) -> torch.Tensor:
    return b if isinstance(b, torch.Tensor) else torch.full_like(a, b)


def _clamp(u: torch.Tensor, b) -> torch.Tensor:
    if isinstance(b, torch.Tensor):
        return torch.maximum(torch.minimum(u, b), -b)
    return u.clamp(-b, b)


def _ratio(u: torch.Tensor, b) -> float:
    if u.numel() == 0:
        return 0.0
    a = u.abs()
    if isinstance(b, torch.Tensor):
        if bool((a[b == 0] > 0).any()):
            return math.inf
        pos = b > 0
        return float((a[pos] / b[pos]).max()) if bool(pos.any()) else 0.0
    if b == 0:
        return math.inf if bool((a > 0).any()) else 0.0
    return float(a.max()) / b


def _batches(data, device: torch.device, what: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if data is None or isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(
            f"{what}: data must be an iterable of (inputs, labels) batches (a DataLoader), "
            f"got {type(data).__name__}"
        )
    out = []
    for i, batch in enumerate(data):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(f"{what}: data batch {i} must be an (inputs, labels) pair")
        x, y = batch
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"{what}: data batch {i} must hold tensors")
        if y.numel() == 0:
            continue
        out.append((x.to(device), y.to(device)))
    if not out:
        raise ValueError(f"{what}: data is empty (it yielded no samples)")
    return out


@contextlib.contextmanager
def analysis(model, data, what: str) -> Iterator[Problem]:
    """Prepare a worst-case search and leave the model exactly as it was afterwards.

    Inside: eval mode, every CiM layer in clean mode (no device noise; δ only) with no δ, and no
    parameter requiring grad (only δ is differentiated, so autograd skips every weight gradient).
    On exit the layers' previous modes and δ, the parameters' requires_grad flags and the
    train/eval mode come back, also when the search raises. The bounds are set by the caller
    (Problem.set_bounds) or by :func:`run_spec`.
    """

    named = require_cim_layers(model, what)
    check_finite_weights(model, what)
    device = named[0][1].weight.device
    batches = _batches(data, device, what)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    names = [n for n, _ in named]
    layers = [m for _, m in named]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        with clean(model), perturbation(model, dict.fromkeys(names)):
            scales = []
            for n, m in named:
                s = used_weight(m).abs().max()
                if not bool(s > 0):
                    raise ValueError(
                        f"{what}: layer {n!r} has an all-zero weight (full scale 0), so a "
                        "bound relative to max|W| allows no perturbation"
                    )
                scales.append(s)
            prob = Problem(
                model=model,
                names=names,
                layers=layers,
                scales=scales,
                batches=batches,
                samples=sum(int(y.numel()) for _, y in batches),
            )
            with torch.no_grad():
                correct = 0
                for x, y in batches:
                    out = model(x)
                    correct += int((out.argmax(-1) == y).sum())
            prob.num_classes = int(out.shape[-1])
            prob.clean_accuracy = correct / prob.samples
            yield prob
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)


def chance_warning(prob: Problem, what: str) -> str | None:
    """A warning (also issued with warnings.warn) when the clean model is at chance level."""
    chance = 1.0 / max(prob.num_classes, 1)
    if prob.clean_accuracy > chance + CHANCE_MARGIN:
        return None
    msg = (
        f"{what}: the clean accuracy {prob.clean_accuracy:.4f} is at chance level "
        f"(1/{prob.num_classes} classes = {chance:.4f}); the worst case says little about "
        "this model (is it trained?)"
    )
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return msg


def make_result(
    prob: Problem,
    method: str,
    us: list[torch.Tensor],
    t0: float,
    settings: dict,
    history: list[dict],
    warning: str | None,
    accuracy: float | None = None,
) -> WorstCaseResult:
    """The WorstCaseResult of relative perturbations ``us`` under the problem's current bound
    (``us`` is projected onto the box first; the accuracy is evaluated here unless given)."""
    us = prob.clamp(us)
    if accuracy is None:
        accuracy = prob.correct(us) / prob.samples
    deltas = prob.weight_deltas(us)
    scales = {n: float(s) for n, s in zip(prob.names, prob.scales, strict=True)}
    max_pert = max(
        (float(d.abs().max()) / scales[n] if d.numel() else 0.0) for n, d in deltas.items()
    )
    per_layer = isinstance(prob.th_g, dict)
    return WorstCaseResult(
        method=method,
        accuracy=accuracy,
        clean_accuracy=prob.clean_accuracy,
        max_perturbation=max_pert,
        th_g=th_g_json(prob.th_g) if per_layer else float(prob.th_g),
        deltas=deltas,
        seconds=time.perf_counter() - t0,
        settings=settings,
        history=history,
        samples=prob.samples,
        scales=scales,
        warning=warning,
        bounds=(
            {
                n: (b.detach().cpu().clone() if isinstance(b, torch.Tensor) else float(b))
                for n, b in zip(prob.names, prob.bounds, strict=True)
            }
            if per_layer
            else None
        ),
        bound_ratio=prob.outside_ratio(us),
    )


def run_spec(prob: Problem, spec: BoundSpec, run_one) -> WorstCaseResult | list[WorstCaseResult]:
    """Run ``run_one(prob, init)`` (init: relative δ to start from, or None) under the bound(s)
    of ``spec``: one result for a number or a dict, one result per bound for a sweep.

    A sweep runs its bounds in increasing order, each warm-started from the previous result's δ
    (inside the larger box too); when a search ends above the previous bound's accuracy, the
    previous δ is kept for it (``settings["kept_previous"]``), so the accuracies are
    non-increasing in th_g by construction."""
    if spec.kind != "sweep":
        prob.set_bounds(spec.value)
        return run_one(prob, None)
    results: list[WorstCaseResult] = []
    prev: WorstCaseResult | None = None
    for th in spec.value:
        prob.set_bounds(th)
        t0 = time.perf_counter()
        init = None if prev is None else prob.relative(prev.deltas)
        res = run_one(prob, init)
        res.settings["sweep"] = list(spec.value)
        res.settings["warm_start"] = prev is not None
        if prev is not None and res.accuracy > prev.accuracy:
            kept = make_result(
                prob,
                res.method,
                init,
                t0,
                dict(res.settings),
                res.history,
                res.warning,
                accuracy=prev.accuracy,
            )
            kept.settings["kept_previous"] = True
            kept.settings["search_accuracy"] = res.accuracy
            res = kept
        results.append(res)
        prev = res
    return results


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
def _auto_kappa(prob: Problem) -> float:
    """Half the median margin of the samples the unperturbed model classifies correctly."""
    prob.clear()
    ms = torch.cat([margin(prob.model(x).float(), y) for x, y in prob.batches])
    pos = ms[ms > 0]
    return 0.5 * float(pos.median()) if pos.numel() else 0.0


def progress_bar(total: int, enabled: bool, desc: str):
    """A manual progress bar of ``total`` ticks (a do-nothing stand-in when disabled)."""
    return progress(total=total, enabled=enabled, desc=desc)
