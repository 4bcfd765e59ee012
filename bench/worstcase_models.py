"""The trained models of the worst-case figures (bench/bench_worst_case.py), cached on disk.

LeNet on digits and on Fashion-MNIST, float and 4-bit weights + inputs (quant=(4, 4)), training
seeds 0, 1, 2: cimext.zoo.trained (the library's own recipe and cache, under ``$CIMEXT_CACHE``).
ResNet-18 with 16 base channels (``width=0.25``: 16-32-64-128) trained for 3 epochs with
cimext.train.fit on Fashion-MNIST resized to 32x32 (bilinear), float weights, cached beside them.
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import cimext
from cimext import zoo

LENETS = [
    (dataset, quant, seed)
    for dataset in ("digits", "fashion-mnist")
    for quant in (None, (4, 4))
    for seed in (0, 1, 2)
]


def model_name(dataset: str, quant, seed: int) -> str:
    q = "float" if quant is None else "4bit"
    return f"lenet-{dataset}-{q}-s{seed}"


def lenet(dataset: str, quant, seed: int):
    """(converted model, record) from the zoo's cache (trained on first use)."""
    return zoo.trained(dataset, "lenet", quant, seed=seed, progress=False)


def resized(split: str, size: int = 32) -> TensorDataset:
    """A Fashion-MNIST split resized to ``size`` x ``size`` (bilinear, on the normalized images)."""
    x, y = cimext.data.load("fashion-mnist", split).tensors
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return TensorDataset(x, y)


RESNET_KEY = "fashion-mnist32-resnet18-w16-float-seed0-e3"


def resnet(progress: bool = False):
    """(converted ResNet-18 width 16 on Fashion-MNIST 32x32, record), trained on first use."""
    from safetensors.torch import load_file, save_file

    folder = zoo.cache_dir() / "models" / RESNET_KEY
    net = cimext.convert(
        cimext.models.resnet18(num_classes=10, in_channels=1, width=0.25),
        device=cimext.DeviceModel(weight_bits=8, bits_per_device=2),
    )
    if (folder / "model.safetensors").is_file() and (folder / "train.json").is_file():
        net.load_state_dict(load_file(str(folder / "model.safetensors")))
        return net.eval(), json.loads((folder / "train.json").read_text())
    torch.manual_seed(0)
    t0 = time.perf_counter()
    train = DataLoader(
        resized("train"), batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    val = DataLoader(resized("val"), batch_size=1024)
    res = cimext.train.fit(net, train, val, "vanilla", epochs=3, lr=1e-3, seed=0, progress=progress)
    test = DataLoader(resized("test"), batch_size=1024)
    record = dict(
        model="resnet18",
        width=0.25,
        dataset="fashion-mnist resized to 32x32",
        quant=None,
        epochs=3,
        val_accuracy=res.best_value,
        test_accuracy=cimext.train.accuracy(net, test),
        seconds=time.perf_counter() - t0,
    )
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "train.json").write_text(json.dumps(record, indent=1))
    return net.eval(), record


def test_batches(dataset: str, batch_size: int = 512, limit: int | None = None) -> list:
    """The test split as a list of batches (the first ``limit`` images when given)."""
    if dataset == "fashion-mnist32":
        ds = resized("test")
    else:
        ds = cimext.data.load(dataset, "test")
    x, y = ds.tensors
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]


def verified_device(net, th_g: float):
    """The Monte Carlo population of the paper's Table I: the model's devices (weight bits, bits
    per device, σ), every device write-verified so that the weight bound is th_g."""
    base = zoo.cim_device(net)
    return cimext.DeviceModel.verified(
        th_g, weight_bits=base.weight_bits, bits_per_device=base.bits_per_device, sigma=base.sigma
    )


def limit(batches: list, n: int) -> list:
    """The first ``n`` samples of a list of batches."""
    out, left = [], n
    for x, y in batches:
        if left <= 0:
            break
        out.append((x[:left], y[:left]))
        left -= int(y[:left].numel())
    return out
