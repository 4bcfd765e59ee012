"""torch.compile(fullgraph=True) of converted models in every noise context and of every
cimext.ops wrapper: same results as eager, gradients, no recompilation per seed or per sampled
forward, no Python number made from a tensor on the hot path."""

import pytest
import torch
import torch._dynamo as dynamo
from torch import nn

import cimext
from cimext import DeviceModel, ops
from cimext import reference as ref

DEV = DeviceModel(sigma=0.2)


def _model(quant=None):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(48, 5),
    )
    return cimext.convert(net, device=DEV, quant=quant)


def _contexts(m):
    deltas = {"4": torch.full((5, 48), 0.01, requires_grad=True)}
    return {
        "clean": lambda: cimext.clean(m),
        "instance": lambda: cimext.instance(m, 2**64 - 5),
        "instances": lambda: cimext.instance(m, seeds=[1, 2, 3]),
        "sampling": lambda: cimext.sampling(m),
        "sampling-rcg": lambda: cimext.sampling(m, "rcg", sigma=0.1, th=1.0),
        "sampling-gaussian": lambda: cimext.sampling(m, "gaussian", sigma=0.1),
        "perturbation": lambda: cimext.perturbation(m, deltas),
    }


CONTEXTS = list(_contexts(None))


def _forward_backward(model, ctx, x):
    model.zero_grad(set_to_none=True)
    with ctx():
        y = model(x)
        y.square().sum().backward()
    return y.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "context, quant",
    [(c, None) for c in CONTEXTS]
    + [pytest.param(c, (4, 4), marks=pytest.mark.slow, id=f"{c}-quant") for c in CONTEXTS],
)
def test_compiled_model_matches_eager_in_every_context(context, quant):
    m = _model(quant)
    x = torch.randn(4, 1, 8, 8)
    ctx = _contexts(m)[context]
    dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    if context.startswith("sampling"):
        # The first compiled forward takes the seed an eager forward would draw first.
        torch.manual_seed(7)
        y_eager, g_eager = _forward_backward(m, ctx, x)
        torch.manual_seed(7)
        y_comp, g_comp = _forward_backward(compiled, ctx, x)
    else:
        y_eager, g_eager = _forward_backward(m, ctx, x)
        y_comp, g_comp = _forward_backward(compiled, ctx, x)
    torch.testing.assert_close(y_comp, y_eager, rtol=0, atol=0)
    for a, b in zip(g_comp, g_eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_no_recompilation_per_seed_or_per_sampled_forward():
    m = _model()
    x = torch.randn(4, 1, 8, 8)
    dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    # One compilation per mode (and grad mode), made here.
    for ctx in (lambda: cimext.instance(m, 1), lambda: cimext.instance(m, seeds=[1, 2])):
        with ctx():
            compiled(x).sum().backward()
    with cimext.sampling(m):
        compiled(x).sum().backward()
    outs = []
    with dynamo.config.patch(error_on_recompile=True):
        for s in (5, 2**64 - 1, 12345):
            with cimext.instance(m, s):
                outs.append(compiled(x))
                outs[-1].sum().backward()
        with cimext.instance(m, seeds=[7, 8]):
            compiled(x).sum().backward()
        with cimext.sampling(m) as state:
            seeds = set()
            for _ in range(4):
                outs.append(compiled(x))
                outs[-1].sum().backward()
                seeds.add(state.seed)
    assert len(seeds) == 4  # a fresh seed every forward
    assert not torch.equal(outs[0], outs[1])


def test_compiled_sampling_with_a_generator():
    m = _model()
    x = torch.randn(4, 1, 8, 8)
    dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="eager")

    def run(model, n=3):
        gen = torch.Generator().manual_seed(11)
        with torch.no_grad(), cimext.sampling(m, generator=gen) as state:
            ys = [model(x) for _ in range(n)]
            seeds = [state.seed] if n == 1 else None
        return ys, gen.get_state(), seeds

    ys, state_after, _ = run(compiled)
    again, _, _ = run(compiled)
    assert all(torch.equal(a, b) for a, b in zip(ys, again, strict=True))  # reproducible
    assert not torch.equal(ys[0], ys[1]) and not torch.equal(ys[1], ys[2])  # fresh each forward
    eager, eager_state, _ = run(m)
    # The first compiled forward uses the seed eager draws first, and the generator ends where
    # the eager forwards leave it.
    assert torch.equal(ys[0], eager[0])
    assert torch.equal(state_after, eager_state)


def test_sampling_seed_replays_as_an_instance_under_compile():
    m = _model()
    x = torch.randn(2, 1, 8, 8)
    dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    with torch.no_grad():
        with cimext.sampling(m) as state:
            compiled(x)
            y = compiled(x)
            seed = state.seed
        with cimext.instance(m, seed):
            assert torch.equal(m(x), y)


X = torch.randn(3, 5)
W = torch.randn(4, 5)
XC = torch.randn(2, 3, 6, 6)
WC = torch.randn(4, 3, 3, 3)
OP_CASES = {
    "noise": (lambda w: ops.noise(w, DEV, 3), (W,)),
    "noise out": (
        lambda w, o: ops.noise(w, DEV, seeds=[1, 2], out=o),
        (W, torch.empty(2, 4, 5)),
    ),
    "rcg_noise": (lambda w: ops.rcg_noise(w, 0.1, 1.0, 3), (W,)),
    "gaussian_noise": (lambda w, s: ops.gaussian_noise(w, 0.1, s), (W, torch.tensor([5]))),
    "perturbed_linear": (lambda x, w: ops.perturbed_linear(x, w, device=DEV, seed=3), (X, W)),
    "perturbed_linear seeds": (
        lambda x, w, s: ops.perturbed_linear(x, w, device=DEV, seeds=s),
        (X, W, torch.tensor([3, -4])),
    ),
    "perturbed_conv2d": (
        lambda x, w: ops.perturbed_conv2d(x, w, None, 1, 1, device=DEV, seed=3),
        (XC, WC),
    ),
    "sign_step_": (
        lambda d, g: ops.sign_step_([d], [g], 0.1, [0.05]),
        (torch.zeros(4, 5), torch.randn(4, 5)),
    ),
    "bitflip": (lambda t: ops.bitflip(t, 0.01, seed=1), (torch.randn(100),)),
    "bitflip_": (lambda t: ops.bitflip_(t, 0.01, seed=1), (torch.randn(100),)),
    "hdiag_linear": (ops.hdiag_linear, (torch.randn(8, 5), torch.rand(8, 4))),
    "hdiag_conv2d": (
        lambda a, c: ops.hdiag_conv2d(a, c, (3, 3), padding=1),
        (torch.randn(2, 3, 6, 6), torch.rand(2, 4, 6, 6)),
    ),
    "curv_backward_linear": (ops.curv_backward_linear, (torch.rand(8, 4), W)),
    "curv_backward_conv2d": (
        lambda c, w: ops.curv_backward_conv2d(c, w, (6, 6), padding=1),
        (torch.rand(2, 4, 6, 6), WC),
    ),
}


def _flat(out):
    if isinstance(out, tuple):
        return [t for o in out for t in _flat(o)]
    if isinstance(out, torch.Tensor):
        return [out.view(torch.int32) if out.dtype == torch.float32 else out]
    return [out]


@pytest.mark.parametrize("name", list(OP_CASES))
def test_every_op_wrapper_compiles(name):
    fn, args = OP_CASES[name]
    eager_args = [a.clone() for a in args]
    comp_args = [a.clone() for a in args]
    dynamo.reset()
    got = torch.compile(fn, fullgraph=True, backend="eager")(*comp_args)
    want = fn(*eager_args)
    for a, b in zip(_flat(got), _flat(want), strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    for a, b in zip(comp_args, eager_args, strict=True):  # in-place ops wrote the same
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_compiled_perturbed_op_gradients(op):
    torch.manual_seed(0)
    if op == "linear":
        x, w = torch.randn(3, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)

        def fn(x, w):
            return ops.perturbed_linear(x, w, device=DEV, seeds=[1, 2])
    else:
        x, w = (
            torch.randn(2, 3, 6, 6, requires_grad=True),
            torch.randn(4, 3, 3, 3, requires_grad=True),
        )

        def fn(x, w):
            return ops.perturbed_conv2d(x, w, None, 1, 1, device=DEV, seed=4)

    dynamo.reset()
    got = torch.autograd.grad(
        torch.compile(fn, fullgraph=True, backend="eager")(x, w).sum(), (x, w)
    )
    want = torch.autograd.grad(fn(x, w).sum(), (x, w))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_wrappers_make_no_python_number_of_the_full_scale(monkeypatch):
    # The full scale max|W| is computed inside the op: the wrappers never read it back.
    def forbidden(*_):
        raise AssertionError("full_scale called on the hot path")

    monkeypatch.setattr(ref, "full_scale", forbidden)
    x, w = torch.randn(3, 5), torch.randn(4, 5)
    ops.perturbed_linear(x, w, device=DEV, seed=1)
    ops.perturbed_conv2d(torch.randn(1, 3, 5, 5), torch.randn(2, 3, 3, 3), device=DEV, seed=1)
    ops.noise(w, DEV, 1)
    m = _model()
    with cimext.sampling(m):
        m(torch.randn(2, 1, 8, 8)).sum().backward()


@pytest.mark.slow
@pytest.mark.parametrize("context", ["instance", "sampling", "perturbation"])
def test_inductor_compiles_every_context(context):
    """The default backend (inductor): forward and backward match eager."""
    m = _model((4, 4))
    x = torch.randn(4, 1, 8, 8)
    ctx = _contexts(m)[context]
    dynamo.reset()
    compiled = torch.compile(m, fullgraph=True)
    torch.manual_seed(3)
    y_eager, g_eager = _forward_backward(m, ctx, x)
    torch.manual_seed(3)
    y_comp, g_comp = _forward_backward(compiled, ctx, x)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_comp, g_eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with dynamo.config.patch(error_on_recompile=True), ctx():
        for _ in range(2):
            compiled(x).sum().backward()


def test_inductor_compiles_an_op_wrapper():
    """The default backend on the fused op with several seeds (kept small: inductor compiles
    C++ for the graph)."""
    fn, args = OP_CASES["perturbed_linear seeds"]
    dynamo.reset()
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(*args), fn(*args))


@pytest.mark.slow
def test_inductor_compiles_the_op_wrappers():
    for name in ("noise out", "perturbed_conv2d", "sign_step_", "bitflip_"):
        fn, args = OP_CASES[name]
        dynamo.reset()
        got = torch.compile(fn, fullgraph=True)(*[a.clone() for a in args])
        want = fn(*[a.clone() for a in args])
        for a, b in zip(_flat(got), _flat(want), strict=True):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
