"""Loads the compiled ops and maps (op name, backend) to a callable with the schema's arguments.

"cpp" is torch.ops.cimext.<op> (C++ on CPU, CUDA kernels on GPU). "triton" is
torch.ops.cimext_triton.<op>, the same schema implemented by the Triton launchers (registered on
first use, so triton is only imported when asked for). "ref" is the pure-PyTorch reference.
Mutating ops (``Tensor(a!)`` in the schema) return nothing and bump the version counters of the
tensors they write, as ATen's in-place ops do.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable

import torch

OPS = (
    "noise",
    "noise_out",
    "perturbed_linear",
    "perturbed_conv2d",
    "sign_step_",
    "bitflip",
    "bitflip_",
)

try:
    from .. import _C  # noqa: F401  (loads the library: runs TORCH_LIBRARY registrations)

    HAS_CPP = True
except ImportError as e:  # pragma: no cover - only when the extension was not built
    HAS_CPP = False
    warnings.warn(
        f"cimext: compiled kernels unavailable ({e}); build with "
        "`pip install --no-build-isolation -e .`. Only the 'ref' backend works.",
        stacklevel=2,
    )

_ref_impls: dict[str, Callable] = {}
_triton_lib: torch.library.Library | None = None
_setup_hooks: list[Callable[[str], None]] = []


def register_ref(name: str, fn: Callable) -> None:
    """Register the reference implementation of op ``name`` (schema positional arguments)."""
    _ref_impls[name] = fn


def on_namespace(hook: Callable[[str], None]) -> None:
    """Call ``hook(namespace)`` for "cimext" now and for "cimext_triton" when it is created; op
    modules use it to register their fake and autograd kernels on both."""
    _setup_hooks.append(hook)
    if HAS_CPP:
        hook("cimext")
    if _triton_lib is not None:
        hook("cimext_triton")


def _ensure_triton() -> None:
    global _triton_lib
    if _triton_lib is not None:
        return
    if not HAS_CPP:
        raise RuntimeError("the triton backend needs the compiled schemas (cimext._C)")
    try:
        # In-place and out= ops live beside their out-of-place twin: sign_step_ in sign_step.py,
        # noise_out in noise.py.
        mods = {
            n: importlib.import_module(
                f"cimext.triton_kernels.{n.rstrip('_').removesuffix('_out')}"
            )
            for n in OPS
        }
    except ImportError as e:
        raise RuntimeError(f"the triton backend needs triton installed ({e})") from e
    lib = torch.library.Library("cimext_triton", "DEF")
    for name in OPS:
        schema = getattr(torch.ops.cimext, name).default._schema
        lib.define(str(schema).split("::", 1)[1])
        launcher = getattr(mods[name], name)
        # CPU registration serves TRITON_INTERPRET=1 (the interpreter runs on host tensors).
        for key in ("CUDA", "CPU"):
            lib.impl(name, launcher, key)
        if schema.is_mutable:
            lib.impl(name, _version_bump_kernel(name, schema), "ADInplaceOrView", with_keyset=True)
    _triton_lib = lib
    for hook in _setup_hooks:
        hook("cimext_triton")


def _version_bump_kernel(name: str, schema: torch.FunctionSchema) -> Callable:
    """An ADInplaceOrView kernel for mutating op cimext_triton::``name``: run the op, then bump
    the version counters of the tensors (or tensor lists) it writes, so that autograd notices an
    in-place change of a tensor saved for backward (the C++ ops do the same in C++)."""
    written = [
        (i, a.name)
        for i, a in enumerate(schema.arguments)
        if a.alias_info is not None and a.alias_info.is_write
    ]

    def kernel(keyset, *args, **kwargs):
        op = getattr(torch.ops.cimext_triton, name).default
        out = op.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, *args, **kwargs)
        for i, arg_name in written:
            arg = args[i] if i < len(args) else kwargs[arg_name]
            torch.autograd.graph.increment_version(arg)
        return out

    return kernel


def schema_op(name: str, backend: str) -> Callable:
    """The callable for op ``name`` on ``backend`` ("cpp", "triton" or "ref")."""
    if backend == "ref":
        return _ref_impls[name]
    if backend == "triton":
        _ensure_triton()
        return getattr(torch.ops.cimext_triton, name)
    if backend == "cpp":
        if not HAS_CPP:
            raise RuntimeError("the cpp backend is unavailable: cimext._C was not built")
        return getattr(torch.ops.cimext, name)
    raise ValueError(f"unknown backend {backend!r}")


_autograd_fns: dict[tuple[str, str], type] = {}


def call_differentiable(
    name: str, backend: str, args: tuple, tensors: tuple, setup_context, make_backward
):
    """Call op ``name`` on ``backend`` with ``args``; when any of ``tensors`` needs a gradient,
    go through a plain torch.autograd.Function built from the op's own setup_context and
    backward. It computes the same thing as the autograd kernel registered with
    torch.library.register_autograd (which direct torch.ops calls and opcheck use) but costs
    about 150 us less per call, which is most of the overhead on small layers."""
    op = schema_op(name, backend)
    if backend == "ref" or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        # Under torch.compile the registered autograd kernel is traced instead: the Function
        # below enters a dispatch guard that the compiler does not trace.
        return op(*args)
    if not any(t is not None and t.requires_grad for t in tensors):
        return op(*args)
    namespace = "cimext" if backend == "cpp" else "cimext_triton"
    fn = _autograd_fns.get((namespace, name))
    if fn is None:
        backward = make_backward(namespace)

        class _Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *inputs):
                with torch._C._AutoDispatchBelowAutograd():
                    out = op(*inputs)
                setup_context(ctx, inputs, out)
                return out

            @staticmethod
            def backward(ctx, *grads):
                return backward(ctx, *grads)

        _Function.__name__ = f"{namespace}_{name}_function"
        fn = _autograd_fns[(namespace, name)] = _Function
    return fn.apply(*args)


def _schema_arguments(name: str) -> list:
    """The arguments of schema cimext::``name`` (the one source of their names and order)."""
    args = _schema_cache.get(name)
    if args is None:
        args = _schema_cache[name] = list(getattr(torch.ops.cimext, name).default._schema.arguments)
    return args


_schema_cache: dict[str, list] = {}


def bind(name: str, /, **named) -> tuple:
    """The positional arguments of op ``name`` from keywords named as in its schema; an argument
    not given takes its schema default. Binding by name keeps callers right when an argument is
    added to the schema (e.g. one more field of NoiseArgs)."""
    out = []
    for a in _schema_arguments(name):
        if a.name in named:
            out.append(named.pop(a.name))
        elif a.has_default_value():
            out.append(a.default_value)
        else:
            raise TypeError(f"cimext::{name}: missing argument {a.name!r}")
    if named:
        raise TypeError(f"cimext::{name}: unexpected argument(s) {sorted(named)}")
    return tuple(out)


def named(name: str, args: tuple, kwargs: dict | None = None) -> dict:
    """The arguments of a call of op ``name`` (positional ``args`` and ``kwargs``, as a kernel or
    an autograd formula receives them) as a dict by schema name, defaults filled in."""
    out = {}
    kwargs = kwargs or {}
    for i, a in enumerate(_schema_arguments(name)):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
        else:
            raise TypeError(f"cimext::{name}: missing argument {a.name!r}")
    return out


def input_grads(name: str, /, **grads) -> tuple:
    """The tuple an autograd formula of op ``name`` returns: ``grads`` by argument name, None
    for every other argument of the schema."""
    return tuple(grads.get(a.name) for a in _schema_arguments(name))


def check(name: str, args: tuple, kwargs: dict | None = None):
    """Run cimext::_check_``name`` (csrc/common/checks.cpp, the one validation of every backend)
    on a call of op ``name``; returns the full scale (a float) for the noise ops, else None."""
    if not HAS_CPP:
        return None  # only the reference backend runs; reference.py's own checks apply
    out = getattr(torch.ops.cimext, f"_check_{name}")(*args, **(kwargs or {}))
    return None if out is None else float(out)


def check_in_fake(name: str, args: tuple, kwargs: dict | None = None) -> None:
    """The op's checks from its fake kernel, which is also its Meta kernel: run them on real
    tensors (a meta tensor among CPU ones dispatches here), but not while tracing, where fake
    tensors (maybe with symbolic sizes) have no memory or values; the kernel that runs the
    traced graph checks everything then."""
    if torch._guards.detect_fake_mode(args) is None:
        check(name, args, kwargs)
