"""cimext.nn: CiM layers, convert, quantization and the noise-mode context managers."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cimext
from cimext import DeviceModel, ops
from cimext.nn import (
    CiMConv2d,
    CiMLinear,
    QuantConfig,
    cim_layers,
    draw_seed,
    quantize_ste,
    unconvert,
    unfold,
)

DEV = DeviceModel(sigma=0.5)  # large enough that instances differ visibly


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


class BasicBlock(nn.Module):
    """torchvision-style residual block with a downsample Sequential."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
        )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.downsample(x))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.layers = nn.ModuleDict({"block": BasicBlock(6, 8, stride=2)})
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.layers["block"](self.stem(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def small_cnn():
    torch.manual_seed(0)
    m = SmallCNN()
    for mod in m.modules():  # non-trivial BN statistics so eval BN is exercised
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    return m


class TwoConvRes(nn.Module):
    """Two CiM convs with pooling and a residual add, then a CiM linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.c1(x)), 2)
        h = h + F.relu(self.c2(h))
        return self.fc(h.flatten(1))


# ---- convert ----------------------------------------------------------------------------------


@pytest.mark.parametrize("make,shape", [(mlp, (5, 12)), (small_cnn, (3, 3, 8, 8))])
@pytest.mark.parametrize("train", [False, True])
def test_convert_is_bit_exact(make, shape, train):
    plain = make()
    conv = cimext.convert(copy.deepcopy(plain))
    plain.train(train)
    conv.train(train)
    x = torch.randn(shape)
    assert torch.equal(plain(x), conv(x))
    with cimext.clean(conv):
        assert torch.equal(plain(x), conv(x))


def test_convert_structure_and_ids():
    m = small_cnn()
    names = [n for n, mod in m.named_modules() if type(mod) in (nn.Linear, nn.Conv2d)]
    out = cimext.convert(m, DEV, (4, 8))
    assert out is m
    layers = cim_layers(m)
    assert [n for n, _ in layers] == names
    assert [layer.layer_id for _, layer in layers] == list(range(len(names)))
    assert isinstance(m.layers["block"].downsample[0], CiMConv2d)
    assert isinstance(m.head, CiMLinear) and isinstance(m.head, nn.Linear)
    assert all(layer.device is DEV and layer.quant == QuantConfig(4, 8) for _, layer in layers)


def test_convert_shared_root_and_inplace():
    shared = nn.Linear(4, 4)
    m = nn.Sequential(shared, nn.ReLU(), shared)
    cimext.convert(m)
    assert m[0] is m[2] and isinstance(m[0], CiMLinear) and len(cim_layers(m)) == 1
    lin = nn.Linear(3, 2)
    c = cimext.convert(lin, inplace=False)
    assert isinstance(c, CiMLinear) and type(lin) is nn.Linear and c.weight is not lin.weight
    x = torch.randn(2, 3)
    assert torch.equal(c(x), lin(x))


def test_convert_nothing_raises():
    with pytest.raises(ValueError, match="has no nn.Linear or nn.Conv2d layers to convert"):
        cimext.convert(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))


def test_unconvert_and_from_module():
    m = mlp()
    ref = copy.deepcopy(m)
    cimext.convert(m)
    w = m[0].weight
    back = unconvert(m)
    assert not cim_layers(back) and type(back[0]) is nn.Linear and back[0].weight is w
    x = torch.randn(2, 12)
    assert torch.equal(back(x), ref(x))
    conv = nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect")
    c = CiMConv2d.from_module(conv, DEV, None, 5)
    assert c.weight is conv.weight and c.layer_id == 5 and c.padding_mode == "reflect"
    with pytest.raises(TypeError):
        CiMLinear.from_module(conv)


def test_state_dict_round_trip():
    plain = small_cnn()
    conv = cimext.convert(copy.deepcopy(plain))
    conv.head.delta = torch.ones_like(conv.head.weight)  # δ is not state
    assert list(conv.state_dict()) == list(plain.state_dict())
    torch.manual_seed(1)
    other = cimext.convert(small_cnn())
    for p in other.parameters():
        p.data.normal_()
    plain.load_state_dict(other.state_dict(), strict=True)
    conv.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(2, 3, 8, 8)
    conv.head.delta = None
    plain.eval(), conv.eval(), other.eval()
    assert torch.equal(plain(x), other(x)) and torch.equal(conv(x), plain(x))


def test_constructor_matches_torch():
    torch.manual_seed(3)
    a = nn.Conv2d(3, 5, 3, 2, 1, bias=False)
    torch.manual_seed(3)
    b = CiMConv2d(3, 5, 3, 2, 1, bias=False, device_model=DEV, layer_id=2)
    assert torch.equal(a.weight, b.weight) and b.bias is None and b.layer_id == 2
    lin = CiMLinear(4, 3, quant=(None, 4))
    assert lin.quant == QuantConfig(None, 4) and lin.device == DeviceModel()
    with pytest.raises(ValueError, match="delta shape"):
        lin.delta = torch.zeros(3, 5)
    lin.delta = nn.Parameter(torch.zeros(3, 4))  # never registered as a parameter
    assert list(lin.state_dict()) == ["weight", "bias"]


# ---- instance / instances ---------------------------------------------------------------------


def test_instance_deterministic_and_by_hand():
    lin = cimext.convert(nn.Linear(12, 5), DEV)
    x = torch.randn(4, 12)
    with cimext.instance(lin, 7):
        a, b = lin(x), lin(x)
    with cimext.instance(lin, seed=8):
        c = lin(x)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.equal(a, ops.perturbed_linear(x, lin.weight, lin.bias, device=DEV, seed=7))
    assert lin.noise_mode == "clean" and torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))

    m = cimext.convert(TwoConvRes(), DEV)
    img = torch.randn(2, 2, 8, 8)
    with cimext.instance(m, 3):
        y = m(img)
    h = ops.perturbed_conv2d(img, m.c1.weight, m.c1.bias, 1, 1, device=DEV, seed=3, layer_id=0)
    h = F.max_pool2d(F.relu(h), 2)
    h2 = ops.perturbed_conv2d(h, m.c2.weight, m.c2.bias, 1, 1, device=DEV, seed=3, layer_id=1)
    h = (h + F.relu(h2)).flatten(1)
    ref = ops.perturbed_linear(h, m.fc.weight, m.fc.bias, device=DEV, seed=3, layer_id=2)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


@pytest.mark.parametrize(
    "padding,mode", [("same", "zeros"), ((1, 2), "reflect"), ("valid", "circular")]
)
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv_padding_modes_with_noise(padding, mode):
    conv = cimext.convert(nn.Conv2d(2, 3, (3, 4), padding=padding, padding_mode=mode), DEV)
    x = torch.randn(2, 2, 7, 9)
    with cimext.instance(conv, 11):
        y = conv(x)
        y1 = conv(x[0])  # unbatched input, as nn.Conv2d allows
    dw = ops.noise(conv.weight, DEV, 11, 0)
    torch.testing.assert_close(y, conv._conv_forward(x, conv.weight + dw, conv.bias))
    torch.testing.assert_close(y1, y[0])


@pytest.mark.parametrize("quant", [None, (4, 6)])
def test_instances_equal_instance_per_seed(quant):
    m = cimext.convert(TwoConvRes(), DEV, quant)
    x = torch.randn(3, 2, 8, 8)
    seeds = [5, 2**64 - 1, 17]
    with cimext.instance(m, seeds=seeds):
        y = m(x)
        y_again = m(x[:2])  # a new forward resets the folded batch size
    assert y.shape == (len(seeds) * 3, 3) and y_again.shape == (len(seeds) * 2, 3)
    ys, ys_again = unfold(y, len(seeds)), unfold(y_again, len(seeds))
    for i, s in enumerate(seeds):
        with cimext.instance(m, s):
            torch.testing.assert_close(ys[i], m(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ys_again[i], m(x[:2]), rtol=1e-5, atol=1e-5)


def test_instances_gradient_and_errors():
    m = cimext.convert(mlp(), DEV)
    x = torch.randn(4, 12)
    with cimext.instance(m, seeds=range(3)):
        m(x).sum().backward()
    g = m[0].weight.grad.clone()
    m.zero_grad()
    for s in range(3):
        with cimext.instance(m, s):
            m(x).sum().backward()
    torch.testing.assert_close(g, m[0].weight.grad, rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="exactly one"):
        cimext.instance(m)
    with pytest.raises(ValueError):
        unfold(torch.zeros(5, 2), 2)


# ---- sampling ---------------------------------------------------------------------------------


def test_sampling_fresh_reproducible_and_gradients():
    m = cimext.convert(mlp(), DEV)
    x = torch.randn(6, 12)
    torch.manual_seed(123)
    with cimext.sampling(m) as st:
        y1 = m(x)
        s1 = st.seed
        y2 = m(x)
    assert not torch.allclose(y1, y2)
    torch.manual_seed(123)
    assert draw_seed() == s1
    torch.manual_seed(123)
    with cimext.sampling(m):
        loss = m(x).square().sum()
    assert torch.equal(loss, y1.square().sum())
    loss.backward()  # after the context: the op regenerates the noise from its saved seed
    grads = [p.grad.clone() for p in m.parameters()]

    # The same forward written with the fused op by hand.
    ref = mlp()
    h = x
    for lid, i in enumerate((0, 2, 4)):
        h = ops.perturbed_linear(h, ref[i].weight, ref[i].bias, device=DEV, seed=s1, layer_id=lid)
        if i < 4:
            h = F.relu(h)
    h.square().sum().backward()
    for g, p in zip(grads, ref.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)

    gen = torch.Generator().manual_seed(9)
    with cimext.sampling(m, "gaussian", sigma=0.05, generator=gen) as st:
        a = m(x)
        sa = st.seed
    gen.manual_seed(9)
    with cimext.sampling(m, "gaussian", sigma=0.05, generator=gen):
        assert torch.equal(a, m(x))
    h = F.relu(ops.perturbed_linear(x, m[0].weight, m[0].bias, gaussian=0.05, seed=sa, layer_id=0))
    # Submodules called directly share the context's seed, drawn on first use.
    with cimext.sampling(m, "gaussian", sigma=0.05, generator=gen.manual_seed(9)):
        torch.testing.assert_close(m[1](m[0](x)), h)


def test_sampling_rcg_and_bad_params():
    m = cimext.convert(nn.Linear(12, 5))
    x = torch.randn(3, 12)
    with cimext.sampling(m, "rcg", sigma=0.1, th=1.0) as st:
        y = m(x)
    ref = ops.perturbed_linear(x, m.weight, m.bias, rcg=(0.1, 1.0), seed=st.seed)
    assert torch.equal(y, ref)
    with cimext.sampling(m, device=DEV) as st:
        y = m(x)
    assert torch.equal(y, ops.perturbed_linear(x, m.weight, m.bias, device=DEV, seed=st.seed))
    with pytest.raises(TypeError, match="needs"):
        cimext.sampling(m, "rcg", sigma=0.1)
    with pytest.raises(TypeError, match="unexpected"):
        cimext.sampling(m, "gaussian", sigma=0.1, th=2)
    with pytest.raises(ValueError, match="noise must be"):
        cimext.sampling(m, "uniform")
    with pytest.raises(ValueError):
        cimext.sampling(m, "gaussian", sigma=-1.0)


# ---- perturbation -----------------------------------------------------------------------------


def test_perturbation_forward_and_gradient():
    plain = small_cnn().eval()
    m = cimext.convert(copy.deepcopy(plain))
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(4)
    deltas = {
        n: (0.05 * torch.randn_like(layer.weight)).requires_grad_() for n, layer in cim_layers(m)
    }
    with cimext.perturbation(m, deltas):
        y = m(x)
    y.square().sum().backward()
    ref = copy.deepcopy(plain)
    with torch.no_grad():
        for n, mod in ref.named_modules():
            if n in deltas:
                mod.weight += deltas[n]
    yr = ref(x)
    torch.testing.assert_close(y, yr)
    yr.square().sum().backward()
    for n, mod in ref.named_modules():
        if n in deltas:
            torch.testing.assert_close(deltas[n].grad, mod.weight.grad)
    assert all(layer.delta is None for _, layer in cim_layers(m))


def test_perturbation_inside_instance_and_errors():
    lin = cimext.convert(nn.Linear(6, 4), DEV)
    d = torch.full_like(lin.weight, 0.01, requires_grad=True)
    x = torch.randn(3, 6)
    with cimext.instance(lin, 2), cimext.perturbation(lin, {"": d}):
        y = lin(x)
    y.sum().backward()
    d2 = d.detach().clone().requires_grad_()
    ref = ops.perturbed_linear(x, lin.weight, lin.bias, device=DEV, seed=2, delta=d2)
    ref.sum().backward()
    assert torch.equal(y, ref) and torch.equal(d.grad, d2.grad)

    m = cimext.convert(mlp())
    with pytest.raises(KeyError, match="valid names: '0', '2', '4'"):
        cimext.perturbation(m, {"fc": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        cimext.perturbation(m, {"0": torch.zeros(3, 3)})


# ---- contexts ---------------------------------------------------------------------------------


def test_nested_contexts_restore():
    m = cimext.convert(mlp(), DEV)
    x = torch.randn(2, 12)
    clean = m(x)
    d = {"2": torch.full_like(m[2].weight, 0.1)}
    with cimext.perturbation(m, d):
        with cimext.instance(m, 1):
            a = m(x)
            with cimext.sampling(m):
                assert m[0].noise_mode == "sampling"
                with cimext.clean(m):
                    assert m[0].noise_mode == "clean" and m[2].delta is d["2"]
                with cimext.instance(m, seeds=[1, 2]):
                    assert m(x).shape == (4, 3)
            assert m[4].noise_mode == "instance"
            assert torch.equal(m(x), a)
        assert m[0].noise_mode == "clean" and m[2].delta is d["2"]
    assert m[2].delta is None and torch.equal(m(x), clean)
    with pytest.raises(RuntimeError, match="boom"):
        with cimext.instance(m, seeds=[1, 2]), cimext.perturbation(m, d):
            raise RuntimeError("boom")
    assert m[2].delta is None and m[0].noise_mode == "clean"
    assert not m._forward_pre_hooks and torch.equal(m(x), clean)


@pytest.mark.parametrize("ctx", ["clean", "instance", "sampling", "perturbation"])
def test_context_needs_cim_layers(ctx):
    args = {"instance": (1,), "perturbation": ({},)}.get(ctx, ())
    with pytest.raises(TypeError, match="no CiM layers"):
        getattr(cimext, ctx)(mlp(), *args)


# ---- quantization -----------------------------------------------------------------------------


def test_quantization_levels_and_ste():
    w = torch.randn(64, 32, requires_grad=True)
    q = quantize_ste(w, 4)
    assert q.unique().numel() <= 16
    s = w.detach().abs().max() / 7
    torch.testing.assert_close(q, torch.round(w.detach() / s) * s)
    g = torch.randn_like(w)
    q.backward(g)
    assert torch.equal(w.grad, g)
    assert quantize_ste(w, 1).unique().numel() <= 3
    assert quantize_ste(w, None) is w
    assert torch.equal(quantize_ste(torch.zeros(3), 4), torch.zeros(3))

    m = cimext.convert(mlp(), quant=QuantConfig(weight_bits=4, input_bits=4))
    x = torch.randn(5, 12)
    qx = quantize_ste(x, 4)
    torch.testing.assert_close(m[0](x), F.linear(qx, quantize_ste(m[0].weight, 4), m[0].bias))
    m(x).sum().backward()
    assert m[0].weight.grad is not None and m[0].weight.grad.abs().sum() > 0


def test_quant_config_validation():
    with pytest.raises(ValueError, match="weight_bits"):
        QuantConfig(weight_bits=0)
    with pytest.raises(ValueError, match="input_bits"):
        QuantConfig(weight_bits=4, input_bits=-1)
    with pytest.raises(TypeError):
        QuantConfig(weight_bits=2.5)
    with pytest.raises(ValueError, match="weight_bits"):
        cimext.convert(mlp(), quant=(0, 4))
    assert QuantConfig.coerce((8, None)) == QuantConfig(8, None)


def test_nonnegative_inputs_use_the_unsigned_grid():
    from cimext.nn import quantize_ste

    x = torch.rand(1000) * 3.0
    q = quantize_ste(x, 4, unsigned_if_nonneg=True)
    assert len(torch.unique(q)) == 16 and q.min() >= 0
    assert len(torch.unique(quantize_ste(x, 4))) <= 8  # symmetric grid: 0..7 only
    xs = torch.randn(1000)
    torch.testing.assert_close(quantize_ste(xs, 4, unsigned_if_nonneg=True), quantize_ste(xs, 4))


# ---- instance modes reuse their perturbed weights when no gradient is needed -----------------


def _convnet(quant=None):
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding="same", padding_mode="reflect"),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 7),
        nn.ReLU(),
        nn.Linear(7, 3, bias=False),
    )
    return cimext.convert(net, DeviceModel.verified(0.05), quant=quant).eval()


@pytest.mark.parametrize("quant", [None, (4, 4)])
@pytest.mark.parametrize("seeds", [[2**64 - 3], [5, 6, 7]])
def test_reused_weights_are_bitwise_the_fused_ops(quant, seeds):
    m = _convnet(quant)
    layers = cim_layers(m)
    layers[0][1].verify_mask = torch.rand_like(layers[0][1].weight) < 0.5
    layers[2][1].delta = 0.01 * torch.randn_like(layers[2][1].weight)
    x = torch.randn(6, 2, 5, 5)
    kw = dict(seed=seeds[0]) if len(seeds) == 1 else dict(seeds=seeds)
    with torch.no_grad():
        with cimext.instance(m, reuse_weights=False, **kw):
            want = [m(x), m(x[:4])]
        with cimext.instance(m, **kw):
            got = [m(x), m(x[:4])]
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_reused_weights_are_built_once_and_rebuilt_on_change(monkeypatch):
    m = _convnet()
    x = torch.randn(3, 2, 5, 5)
    calls = []
    real = ops.noise
    monkeypatch.setattr(ops, "noise", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = cim_layers(m)[-1][1]
    with torch.no_grad(), cimext.instance(m, 9):
        first = m(x)
        assert len(calls) == 4  # one build per layer
        assert torch.equal(m(x), first) and len(calls) == 4  # reused
        layer.weight.mul_(2)  # an in-place change of a weight: that layer is rebuilt
        changed = m(x)
        assert len(calls) == 5
        layer.delta = torch.full_like(layer.weight, 0.1)
        with_delta = m(x)
        assert len(calls) == 6
    with torch.no_grad(), cimext.instance(m, 9, reuse_weights=False):
        assert torch.equal(m(x), changed)  # the context restored δ on exit
        layer.delta = torch.full_like(layer.weight, 0.1)
        assert torch.equal(m(x), with_delta)
    # A gradient to compute: the fused op (its backward regenerates the noise), no cache.
    calls.clear()
    with cimext.instance(m, 9):
        m(x).sum().backward()
    assert not calls and m[0].weight.grad is not None
    with pytest.raises(TypeError, match="reuse_weights"):
        cimext.instance(m, 1, reuse_weights="yes")


def test_converted_models_keep_module_methods():
    # The CiM layers add methods; none may shadow nn.Module's (.double() / .to() use _apply).
    from cimext.nn.layers import _CiMMixin

    m = _convnet().double()
    assert all(p.dtype == torch.float64 for p in m.parameters())
    m.to(torch.float32)
    with torch.no_grad(), cimext.instance(m, 3):
        assert m(torch.randn(2, 2, 5, 5)).dtype == torch.float32
    own = {n for c in (CiMLinear, CiMConv2d, _CiMMixin) for n in vars(c) if not n.startswith("__")}
    assert own & set(vars(nn.Module)) == {"forward", "extra_repr"}


def test_instance_modes_under_inference_mode():
    m = _convnet((4, 4))
    x = torch.randn(3, 2, 5, 5)
    with torch.no_grad(), cimext.instance(m, seeds=[1, 2]):
        want = m(x)
    with torch.inference_mode(), cimext.instance(m, seeds=[1, 2]):
        assert torch.equal(m(x), want)
