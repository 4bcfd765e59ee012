"""Bad-argument cases for the op fuzz suite (tests/test_op_fuzz.py, scripts/op_fuzz_table.py).

A case is (op, corruption, seed): a valid call of schema op ``op`` with small random shapes,
built from ``seed``, with one argument made bad by ``corruption``. It is built afresh for each
backend (identical tensors), run through the backend's entry point (torch.ops.cimext.<op>,
torch.ops.cimext_triton.<op>, or the reference backend), and classified:

- clear: the op raised TypeError / ValueError / RuntimeError whose message names the op and the
  bad argument, with the same type and message as on every other backend;
- unclear: it raised such an error, but the message does not name the argument or differs
  between backends;
- silent: no error;
- crash: any other exception type (IndexError, AttributeError, a Triton compile error, ...);
- partial write: the op raised, but a tensor it writes (in-place ops, noise_out's out) changed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cimext.ops import _registry

BACKENDS = ["cpp", "ref", "triton"]
CLEAR_TYPES = (TypeError, ValueError, RuntimeError)
NOISE_OPS = ("noise", "noise_out", "perturbed_linear", "perturbed_conv2d")


def _seeds(rng: random.Random, n: int) -> torch.Tensor:
    return torch.tensor([rng.randrange(-(2**63), 2**63) for _ in range(n)], dtype=torch.int64)


def _noise_args(rng: random.Random, weight: torch.Tensor, n_seeds: int) -> dict:
    kind = rng.choice([0, 1, 2, 3])
    bits_per_device = rng.choice([1, 2, 4])
    level = rng.random() < 0.3
    mask = rng.random() < 0.3
    return dict(
        seeds=_seeds(rng, n_seeds),
        layer_id=rng.randrange(0, 1000),
        kind=kind,
        scale=None if rng.random() < 0.5 else rng.uniform(0.1, 2.0),
        weight_bits=8,
        bits_per_device=bits_per_device,
        sigma=rng.uniform(0.0, 0.2),
        level_sigma=[rng.uniform(0.5, 1.5) for _ in range(1 << bits_per_device)] if level else [],
        verified_sigma=rng.uniform(0.0, 0.02),
        th=rng.uniform(0.0, 0.1),
        verify=rng.random() < 0.5,
        verify_mask=(torch.rand(weight.shape) < 0.5) if mask else None,
    )


def _odd(rng: random.Random, lo: int = 1, hi: int = 7) -> int:
    return rng.randint(lo, hi)


def base_call(op: str, rng: random.Random) -> dict:
    """A valid call of ``op`` by schema argument name (small shapes, float32 unless drawn)."""
    dtype = torch.float32 if rng.random() < 0.8 else torch.float64
    if op in ("noise", "noise_out"):
        shape = [_odd(rng) for _ in range(rng.choice([1, 2, 4]))]
        w = torch.randn(shape, dtype=dtype)
        n = rng.randint(1, 3)
        a = dict(weight=w, **_noise_args(rng, w, n))
        if op == "noise_out":
            a["out"] = torch.full((n, *shape), 7.0, dtype=dtype)
        return a
    if op == "perturbed_linear":
        out_f, in_f = _odd(rng), _odd(rng)
        w = torch.randn(out_f, in_f, dtype=dtype)
        n = rng.randint(1, 3)
        x_stacked = n > 1 and rng.random() < 0.5
        lead = [_odd(rng, 1, 4)]
        x = torch.randn(*([n] if x_stacked else []), *lead, in_f, dtype=dtype)
        bias = torch.randn(out_f, dtype=dtype) if rng.random() < 0.5 else None
        delta = torch.randn(out_f, in_f, dtype=dtype) * 0.01 if rng.random() < 0.5 else None
        return dict(
            x=x, weight=w, bias=bias, delta=delta, x_stacked=x_stacked, **_noise_args(rng, w, n)
        )
    if op == "perturbed_conv2d":
        groups = rng.choice([1, 1, 2])
        cin, cout = groups * _odd(rng, 1, 3), groups * _odd(rng, 1, 3)
        k = rng.choice([1, 2, 3])
        w = torch.randn(cout, cin // groups, k, k, dtype=dtype)
        n = rng.randint(1, 2)
        x_stacked = n > 1 and rng.random() < 0.5
        hw = rng.randint(k, k + 3)
        x = torch.randn(*([n] if x_stacked else []), _odd(rng, 1, 2), cin, hw, hw, dtype=dtype)
        bias = torch.randn(cout, dtype=dtype) if rng.random() < 0.5 else None
        delta = torch.randn_like(w) * 0.01 if rng.random() < 0.5 else None
        return dict(
            x=x,
            weight=w,
            bias=bias,
            delta=delta,
            stride=[rng.randint(1, 2)] * 2,
            padding=[rng.randint(0, 1)] * 2,
            dilation=[1, 1],
            groups=groups,
            x_stacked=x_stacked,
            **_noise_args(rng, w, n),
        )
    if op == "sign_step_":
        n = rng.randint(2, 4)
        shapes = [[_odd(rng) for _ in range(rng.randint(1, 2))] for _ in range(n)]
        deltas = [torch.randn(s, dtype=dtype) * 0.01 for s in shapes]
        grads = [torch.randn(s, dtype=dtype) for s in shapes]
        bounds = [rng.uniform(0.0, 0.05) for _ in range(n)]
        bt = None
        if rng.random() < 0.5:
            bt = [torch.rand(s, dtype=dtype) * 0.05 if rng.random() < 0.5 else None for s in shapes]
        return dict(
            deltas=deltas, grads=grads, eta=rng.uniform(0, 0.01), bounds=bounds, bound_tensors=bt
        )
    if op in ("bitflip", "bitflip_"):
        dtype = rng.choice([torch.float32, torch.float16, torch.int8, torch.uint8, torch.int32])
        shape = [_odd(rng, 1, 40)]
        t = (torch.randn(shape) * 10).to(dtype)
        width = {torch.float32: 32, torch.int32: 32, torch.float16: 16}.get(dtype, 8)
        return dict(
            t=t,
            p01=rng.uniform(0, 0.3),
            p10=rng.uniform(0, 0.3),
            mask=rng.randrange(0, 1 << width),
            seed=rng.randrange(-(2**63), 2**63),
            layer_id=rng.randrange(0, 100),
            zero_nonfinite=rng.random() < 0.5,
        )
    raise ValueError(op)


def _pick(rng, values):
    return values[rng.randrange(len(values))]


def _bad_number(rng: random.Random, *, negative: bool = True) -> float:
    options = [math.nan, math.inf, -math.inf]
    if negative:
        options += [-rng.uniform(1e-6, 10.0), -1.0]
    return _pick(rng, options)


# corruption name -> (ops it applies to, words one of which the message must contain, mutate).
Mutate = Callable[[random.Random, dict], None]


@dataclass(frozen=True)
class Corruption:
    name: str
    ops: tuple[str, ...]
    names: tuple[str, ...]
    mutate: Mutate


def _set(key, make):
    def mutate(rng, a):
        a[key] = make(rng, a)

    return mutate


def _noise_corruptions() -> list[Corruption]:
    ops = NOISE_OPS
    c = [
        Corruption("seeds_float", ops, ("seeds",), _set("seeds", lambda r, a: a["seeds"].double())),
        Corruption("seeds_int32", ops, ("seeds",), _set("seeds", lambda r, a: a["seeds"].int())),
        Corruption(
            "seeds_2d", ops, ("seeds",), _set("seeds", lambda r, a: a["seeds"].reshape(1, -1))
        ),
        Corruption(
            "seeds_empty",
            ops,
            ("seeds",),
            _set("seeds", lambda r, a: torch.empty(0, dtype=torch.int64)),
        ),
        Corruption(
            "layer_id_negative",
            ops,
            ("layer_id",),
            _set("layer_id", lambda r, a: -r.randint(1, 2**62)),
        ),
        Corruption(
            "kind_out_of_range", ops, ("kind",), _set("kind", lambda r, a: _pick(r, [-1, 4, 99]))
        ),
        Corruption("scale_bad", ops, ("scale",), _set("scale", lambda r, a: _bad_number(r))),
        Corruption(
            "weight_bits_bad",
            ops,
            ("weight_bits",),
            _set("weight_bits", lambda r, a: _pick(r, [0, -3, 25, 64])),
        ),
        Corruption(
            "weight_bits_indivisible",
            ops,
            ("weight_bits", "bits_per_device"),
            lambda r, a: a.update(bits_per_device=_pick(r, [3, 5]), level_sigma=[]),
        ),
        Corruption(
            "bits_per_device_bad",
            ops,
            ("bits_per_device",),
            lambda r, a: a.update(bits_per_device=_pick(r, [0, -1, 9]), level_sigma=[]),
        ),
        Corruption("sigma_bad", ops, ("sigma",), _set("sigma", lambda r, a: _bad_number(r))),
        Corruption(
            "verified_sigma_bad",
            ops,
            ("verified_sigma",),
            _set("verified_sigma", lambda r, a: _bad_number(r)),
        ),
        Corruption("th_bad", ops, ("th",), _set("th", lambda r, a: _bad_number(r))),
        Corruption(
            "level_sigma_length",
            ops,
            ("level_sigma",),
            _set("level_sigma", lambda r, a: [1.0] * _pick(r, [1, 3, 5])),
        ),
        Corruption(
            "level_sigma_entry",
            ops,
            ("level_sigma",),
            lambda r, a: a.update(
                level_sigma=[
                    _bad_number(r) if i == 0 else 1.0 for i in range(1 << a["bits_per_device"])
                ]
            ),
        ),
        Corruption(
            "verify_mask_dtype",
            ops,
            ("verify_mask",),
            _set(
                "verify_mask",
                lambda r, a: torch.zeros(
                    a["weight"].shape, dtype=_pick(r, [torch.float32, torch.int64])
                ),
            ),
        ),
        Corruption(
            "verify_mask_shape",
            ops,
            ("verify_mask",),
            _set(
                "verify_mask",
                lambda r, a: torch.ones(a["weight"].numel() + r.randint(1, 3), dtype=torch.bool),
            ),
        ),
        Corruption(
            "verify_mask_flat",
            ops,
            ("verify_mask",),
            _set(
                "verify_mask",
                lambda r, a: torch.ones(
                    (1, a["weight"].numel()) if a["weight"].dim() == 1 else (a["weight"].numel(),),
                    dtype=torch.bool,
                ),
            ),
        ),
        Corruption(
            "weight_nonfinite",
            ops,
            ("weight",),
            lambda r, a: (
                a.update(scale=None),
                a["weight"]
                .view(-1)
                .__setitem__(
                    r.randrange(a["weight"].numel()), _pick(r, [math.nan, math.inf, -math.inf])
                ),
            ),
        ),
        Corruption(
            "weight_int",
            ("noise", "noise_out"),
            ("weight",),
            lambda r, a: a.update(
                weight=a["weight"].to(torch.int32),
                verify_mask=None,
                **({"out": a["out"].to(torch.int32)} if "out" in a else {}),
            ),
        ),
    ]
    return c


def _shift_shape(r, shape, k=None):
    shape = list(shape)
    i = r.randrange(len(shape)) if k is None else k
    shape[i] += r.randint(1, 3)
    return shape


def _operand_corruptions() -> list[Corruption]:
    lin, conv = ("perturbed_linear",), ("perturbed_conv2d",)
    both = lin + conv
    return [
        Corruption(
            "x_dtype",
            both,
            ("x",),
            _set(
                "x",
                lambda r, a: a["x"].to(
                    _pick(
                        r,
                        [
                            torch.float16,
                            torch.int32,
                            torch.float64 if a["x"].dtype == torch.float32 else torch.float32,
                        ],
                    )
                ),
            ),
        ),
        Corruption(
            "x_features",
            lin,
            ("x",),
            _set(
                "x",
                lambda r, a: torch.randn(*_shift_shape(r, a["x"].shape, -1), dtype=a["x"].dtype),
            ),
        ),
        Corruption(
            "x_scalar", lin, ("x",), _set("x", lambda r, a: torch.tensor(1.0, dtype=a["x"].dtype))
        ),
        Corruption(
            "x_stacked_leading",
            both,
            ("x",),
            lambda r, a: a.update(
                x_stacked=True,
                x=torch.randn(
                    a["seeds"].numel() + r.randint(1, 2),
                    *(a["x"].shape[1:] if a["x_stacked"] else a["x"].shape),
                    dtype=a["x"].dtype,
                ),
            ),
        ),
        Corruption(
            "weight_1d",
            lin,
            ("weight",),
            lambda r, a: a.update(weight=a["weight"].reshape(-1), delta=None, verify_mask=None),
        ),
        Corruption(
            "weight_3d",
            both,
            ("weight",),
            lambda r, a: a.update(
                weight=a["weight"].reshape(1, *a["weight"].shape[:1], -1),
                delta=None,
                verify_mask=None,
            ),
        ),
        Corruption(
            "bias_row",
            both,
            ("bias",),
            _set(
                "bias", lambda r, a: torch.randn(1, a["weight"].shape[0], dtype=a["weight"].dtype)
            ),
        ),
        Corruption(
            "bias_length",
            both,
            ("bias",),
            _set(
                "bias",
                lambda r, a: torch.randn(
                    a["weight"].shape[0] + r.randint(1, 3), dtype=a["weight"].dtype
                ),
            ),
        ),
        Corruption(
            "bias_dtype",
            both,
            ("bias",),
            _set("bias", lambda r, a: torch.randn(a["weight"].shape[0]).to(torch.float16)),
        ),
        Corruption(
            "delta_shape",
            both,
            ("delta",),
            _set(
                "delta",
                lambda r, a: torch.zeros(
                    *_shift_shape(r, a["weight"].shape), dtype=a["weight"].dtype
                ),
            ),
        ),
        Corruption(
            "delta_dtype",
            both,
            ("delta",),
            _set("delta", lambda r, a: torch.zeros(a["weight"].shape, dtype=torch.float16)),
        ),
        Corruption(
            "stride_bad", conv, ("stride",), _set("stride", lambda r, a: [_pick(r, [0, -1]), 1])
        ),
        Corruption(
            "padding_bad", conv, ("padding",), _set("padding", lambda r, a: [0, _pick(r, [-1, -5])])
        ),
        Corruption(
            "dilation_bad",
            conv,
            ("dilation",),
            _set("dilation", lambda r, a: [_pick(r, [0, -2])] * 2),
        ),
        Corruption("groups_bad", conv, ("groups",), _set("groups", lambda r, a: _pick(r, [0, -1]))),
        Corruption(
            "groups_mismatch",
            conv,
            ("groups", "channels"),
            _set("groups", lambda r, a: a["groups"] * _pick(r, [3, 5])),
        ),
        Corruption(
            "x_4d_missing",
            conv,
            ("x",),
            _set("x", lambda r, a: a["x"].reshape(-1, *a["x"].shape[-2:])),
        ),
        Corruption(
            "kernel_too_big",
            conv,
            ("kernel", "input"),
            lambda r, a: a.update(
                x=a["x"][..., :1, :1].contiguous(),
                padding=[0, 0],
                weight=torch.randn(*a["weight"].shape[:2], 3, 3, dtype=a["weight"].dtype),
                delta=None,
                verify_mask=None,
            ),
        ),
    ]


def _noise_out_corruptions() -> list[Corruption]:
    o = ("noise_out",)
    return [
        Corruption(
            "out_shape",
            o,
            ("out",),
            _set(
                "out",
                lambda r, a: torch.zeros(*_shift_shape(r, a["out"].shape), dtype=a["out"].dtype),
            ),
        ),
        Corruption(
            "out_dtype",
            o,
            ("out",),
            _set("out", lambda r, a: torch.zeros(a["out"].shape, dtype=torch.float16)),
        ),
        Corruption(
            "out_overlaps_weight",
            o,
            ("out",),
            lambda r, a: a.update(seeds=a["seeds"][:1], out=a["weight"].unsqueeze(0)),
        ),
        Corruption(
            "out_inference",
            o,
            ("out", "inference"),
            _set("out", lambda r, a: _inference(a["out"])),
        ),
    ]


def _inference(t: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return t.clone()


def _at(r, a, key="deltas"):
    return r.randrange(len(a[key]))


def _sign_step_corruptions() -> list[Corruption]:
    s = ("sign_step_",)

    def grads_at(r, a, make):
        i = _at(r, a)
        a["grads"][i] = make(a["deltas"][i])

    def deltas_at(r, a, make):
        i = r.randrange(1, len(a["deltas"]))  # not the first: a later bad tensor
        a["deltas"][i] = make(a["deltas"][i])
        a["grads"][i] = torch.zeros(a["deltas"][i].shape, dtype=a["deltas"][i].dtype)
        if a["bound_tensors"] is not None:
            a["bound_tensors"][i] = None

    def bt_at(r, a, make):
        i = r.randrange(1, len(a["deltas"]))
        if a["bound_tensors"] is None:
            a["bound_tensors"] = [None] * len(a["deltas"])
        a["bound_tensors"][i] = make(a["deltas"][i])

    def share_bound(r, a):
        # bound_tensors[i] is deltas[0] itself (deltas[i] made of its shape): memory that is
        # read as a bound while it is written as a delta.
        i = r.randrange(1, len(a["deltas"]))
        d0 = a["deltas"][0].abs_()
        a["deltas"][i] = torch.zeros_like(d0)
        a["grads"][i] = torch.ones_like(d0)
        if a["bound_tensors"] is None:
            a["bound_tensors"] = [None] * len(a["deltas"])
        a["bound_tensors"][i] = d0

    def nan_bound(d):
        b = torch.full_like(d, 0.01)
        b.view(-1)[-1] = math.nan
        return b

    return [
        Corruption("grads_missing", s, ("grads",), lambda r, a: a.update(grads=a["grads"][:-1])),
        Corruption(
            "bounds_missing", s, ("bounds",), lambda r, a: a.update(bounds=a["bounds"][:-1])
        ),
        Corruption("eta_bad", s, ("eta",), _set("eta", lambda r, a: _bad_number(r))),
        Corruption(
            "bound_bad",
            s,
            ("bounds",),
            lambda r, a: a["bounds"].__setitem__(r.randrange(1, len(a["bounds"])), _bad_number(r)),
        ),
        Corruption(
            "grad_dtype",
            s,
            ("grads",),
            lambda r, a: grads_at(
                r,
                a,
                lambda d: torch.zeros(
                    d.shape, dtype=torch.float16 if d.dtype != torch.float16 else torch.float32
                ),
            ),
        ),
        Corruption(
            "grad_shape",
            s,
            ("grads",),
            lambda r, a: grads_at(
                r, a, lambda d: torch.zeros(*_shift_shape(r, d.shape), dtype=d.dtype)
            ),
        ),
        Corruption(
            "delta_int",
            s,
            ("deltas",),
            lambda r, a: deltas_at(r, a, lambda d: torch.zeros(d.shape, dtype=torch.int32)),
        ),
        Corruption(
            "delta_expanded",
            s,
            ("deltas",),
            lambda r, a: deltas_at(r, a, lambda d: torch.zeros(1, dtype=d.dtype).expand(3)),
        ),
        Corruption(
            "delta_inference",
            s,
            ("deltas", "inference"),
            lambda r, a: deltas_at(r, a, _inference),
        ),
        Corruption(
            "deltas_overlap",
            s,
            ("deltas", "overlap"),
            lambda r, a: deltas_at(r, a, lambda d: a["deltas"][0]),
        ),
        Corruption(
            "bound_tensor_shape",
            s,
            ("bound_tensors",),
            lambda r, a: bt_at(
                r, a, lambda d: torch.ones(*_shift_shape(r, d.shape), dtype=d.dtype)
            ),
        ),
        Corruption(
            "bound_tensor_dtype",
            s,
            ("bound_tensors",),
            lambda r, a: bt_at(
                r,
                a,
                lambda d: torch.ones(
                    d.shape, dtype=torch.float16 if d.dtype != torch.float16 else torch.float32
                ),
            ),
        ),
        Corruption(
            "bound_tensor_nan",
            s,
            ("bound_tensors",),
            lambda r, a: bt_at(r, a, nan_bound),
        ),
        Corruption(
            "bound_tensor_negative",
            s,
            ("bound_tensors",),
            lambda r, a: bt_at(r, a, lambda d: torch.full_like(d, -0.5)),
        ),
        Corruption(
            "bound_tensor_is_delta",
            s,
            ("bound_tensors",),
            share_bound,
        ),
        Corruption(
            "bound_tensors_length",
            s,
            ("bound_tensors",),
            _set("bound_tensors", lambda r, a: [None] * (len(a["deltas"]) + r.choice([-1, 1]))),
        ),
    ]


def _bitflip_corruptions() -> list[Corruption]:
    b = ("bitflip", "bitflip_")

    def bad_p(r, a):
        return _pick(r, [math.nan, -0.1, 1.5, math.inf, -math.inf])

    return [
        Corruption("p01_bad", b, ("p01",), _set("p01", bad_p)),
        Corruption("p10_bad", b, ("p10",), _set("p10", bad_p)),
        Corruption(
            "mask_bad",
            b,
            ("mask",),
            _set("mask", lambda r, a: _pick(r, [-1, 1 << 40, 1 << 33])),
        ),
        Corruption(
            "mask_too_wide",
            b,
            ("mask",),
            lambda r, a: a.update(t=a["t"].to(torch.int8), mask=_pick(r, [256, 0xFFFF])),
        ),
        Corruption(
            "t_dtype",
            b,
            ("t", "dtype"),
            _set("t", lambda r, a: a["t"].to(_pick(r, [torch.float64, torch.int64, torch.bool]))),
        ),
        Corruption(
            "layer_id_negative", b, ("layer_id",), _set("layer_id", lambda r, a: -r.randint(1, 99))
        ),
        Corruption(
            "t_inference",
            ("bitflip_",),
            ("t", "inference"),
            _set("t", lambda r, a: _inference(a["t"])),
        ),
        Corruption(
            "t_expanded",
            ("bitflip_",),
            ("t",),
            _set("t", lambda r, a: torch.zeros(1, dtype=a["t"].dtype).expand(5)),
        ),
    ]


CORRUPTIONS: list[Corruption] = (
    _noise_corruptions()
    + _operand_corruptions()
    + _noise_out_corruptions()
    + _sign_step_corruptions()
    + _bitflip_corruptions()
)
OPS = (
    "noise",
    "noise_out",
    "perturbed_linear",
    "perturbed_conv2d",
    "sign_step_",
    "bitflip",
    "bitflip_",
)
CASES: list[tuple[str, Corruption]] = [(op, c) for c in CORRUPTIONS for op in c.ops]


def build(op: str, corruption: Corruption, seed: int) -> dict:
    """The bad call of ``op``: a valid call from ``seed`` with ``corruption`` applied."""
    rng = random.Random(seed)
    a = base_call(op, rng)
    corruption.mutate(rng, a)
    return a


def written(op: str, a: dict) -> list[torch.Tensor]:
    """The tensors ``op`` writes (compared before and after a failed call)."""
    if op == "sign_step_":
        return list(a["deltas"])
    if op == "bitflip_":
        return [a["t"]]
    if op == "noise_out":
        return [a["out"]]
    return []


def _snapshot(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    # Bit patterns, so that NaN entries compare equal.
    out = []
    for t in ts:
        c = t.detach().clone()
        out.append(c.view(torch.uint8) if c.numel() and c.is_contiguous() else c)
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a, b))


@dataclass
class Outcome:
    kind: str  # "error" | "silent" | "crash"
    exc_type: str = ""
    message: str = ""
    partial_write: bool = False


def run(op: str, backend: str, a: dict) -> Outcome:
    """Call ``op`` on ``backend`` with the arguments ``a`` (by schema name)."""
    fn = _registry.schema_op(op, backend)
    targets = written(op, a)
    before = _snapshot(targets)
    try:
        with torch.no_grad():
            fn(*_registry.bind(op, **a))
    except CLEAR_TYPES as e:
        after = _snapshot(targets)
        changed = any(not _same(x, y) for x, y in zip(before, after, strict=True))
        return Outcome("error", type(e).__name__, str(e).split("\n")[0], changed)
    except Exception as e:  # noqa: BLE001 - the fuzz suite classifies every exception
        return Outcome("crash", type(e).__name__, str(e).split("\n")[0])
    return Outcome("silent")


def classify(op: str, corruption: Corruption, outcomes: dict[str, Outcome]) -> dict[str, str]:
    """backend -> "clear" | "unclear" | "silent" | "crash" | "partial write"."""
    errors = {(o.exc_type, o.message) for o in outcomes.values() if o.kind == "error"}
    agree = len(errors) == 1 and all(o.kind == "error" for o in outcomes.values())
    prefix = "noise" if op == "noise_out" else op.rstrip("_")
    out = {}
    for backend, o in outcomes.items():
        if o.kind != "error":
            out[backend] = o.kind
        elif o.partial_write:
            out[backend] = "partial write"
        elif (
            agree and o.message.startswith(prefix) and any(n in o.message for n in corruption.names)
        ):
            out[backend] = "clear"
        else:
            out[backend] = "unclear"
    return out


def check_case(op: str, corruption: Corruption, seed: int, backends: list[str]) -> dict:
    """Run one bad call on every backend; returns (classification, outcomes)."""
    outcomes = {b: run(op, b, build(op, corruption, seed)) for b in backends}
    return classify(op, corruption, outcomes), outcomes


def available_backends() -> list[str]:
    """The CPU backends this machine runs (triton under TRITON_INTERPRET=1 where installed)."""
    out = ["cpp", "ref"]
    try:
        _registry.schema_op("noise", "triton")
        out.append("triton")
    except RuntimeError:
        pass
    return out
