"""Trained models for the analyses: load a `cimext train --out` folder, or train one and cache it.

``cimext worst-case`` and ``cimext demo`` need a trained, converted model. :func:`load_run`
reads the folder that ``cimext train --out DIR`` writes (train.json + model.safetensors);
:func:`trained` returns a model trained with fixed settings, training it on first use and caching
it under ``$CIMEXT_CACHE`` (default ``~/.cache/cimext``) so later calls reuse it. The cache entry
is written atomically (a killed run leaves no half-written model).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import data, models
from ._util import device_dict
from .device import DeviceModel
from .nn import cim_layers, convert
from .train import accuracy, fit

#: Training settings per dataset for the cached default models (the same as the README's
#: `cimext train` commands; digits trains in seconds, fashion-mnist in about a minute per epoch).
RECIPES: dict[str, dict] = {
    "digits": dict(epochs=15, lr=3e-3, batch_size=64),
    "fashion-mnist": dict(epochs=12, lr=1e-3, batch_size=128),
    "mnist": dict(epochs=8, lr=1e-3, batch_size=128),
}
_DEFAULT_RECIPE = dict(epochs=10, lr=1e-3, batch_size=128)


def cache_dir() -> Path:
    """The model cache folder: $CIMEXT_CACHE, else ~/.cache/cimext."""
    return Path(os.environ.get("CIMEXT_CACHE") or Path.home() / ".cache" / "cimext")


def build(
    dataset: str,
    model: str = "lenet",
    quant=None,
    device_model=None,
    seed: int = 0,
    *,
    root: str | os.PathLike | None = None,
    width: float | None = None,
    input_size: int | None = None,
):
    """A fresh ``model`` for ``dataset`` converted to CiM layers with ``quant`` (e.g. (4, 4)) and
    ``device_model`` (default: the paper's devices, K = 2 bits per device, σ = 0.1, for the
    quantized weight width, 8 bits for float weights).

    The input channels, image size and class count come from the data found under ``root``
    (the dataset's own folder when None); ``width`` scales the channels of the models that take
    it (not lenet); ``input_size`` overrides the image size (inputs resized before the model).
    A model that cannot take the data's images (e.g. VGG on 8x8 digits) raises ValueError."""

    if device_model is None:
        wbits = quant[0] if quant is not None and quant[0] else 8
        device_model = DeviceModel(weight_bits=wbits, bits_per_device=2 if wbits % 2 == 0 else 1)
    c, h, w = data.input_shape(dataset, root=root)
    size = h if input_size is None else input_size
    kw = dict(num_classes=data.num_classes(dataset, root=root), in_channels=c)
    if width is not None and model != "lenet":
        kw["width"] = width
    torch.manual_seed(seed)
    try:
        net = models.get(model, input_size=size, **kw)
        if model not in ("lenet", "convnet"):
            # The five poolings of VGG / ResNet need 32x32 inputs: fail here, before training.
            with torch.no_grad():
                net.eval()(torch.zeros(1, c, size, size if input_size is not None else w))
            net.train()
    except (ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"{model} cannot take {dataset}'s {size}x{size} images ({first}); use lenet or "
            "convnet, or resize the inputs to 32x32"
        ) from None
    return convert(net, device=device_model, quant=quant)


def _quant(q):
    return None if q is None else tuple(q)


def load_run(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """The model of a ``cimext train --out`` folder (or its model.safetensors) and its record.

    Raises FileNotFoundError when the folder has no train.json / model.safetensors and
    ValueError when the weights do not fit the recorded model."""

    p = Path(path)
    folder = p.parent if p.suffix == ".safetensors" else p
    record_file, weights = folder / "train.json", folder / "model.safetensors"
    for f in (record_file, weights):
        if not f.is_file():
            raise FileNotFoundError(
                f"{folder}: no {f.name} (expected a folder written by `cimext train --out`)"
            )
    try:
        record = json.loads(record_file.read_text())
        dataset, model = record["dataset"], record["model"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{record_file}: not a cimext train record ({e})") from None
    dev = record.get("device_model")
    if isinstance(dev, dict):
        try:
            dev = DeviceModel(**dev)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{record_file}: bad device_model ({e})") from None
    else:
        dev = None
    net = build(
        dataset,
        model,
        _quant(record.get("quant")),
        dev,
        root=record.get("root"),
        width=record.get("width"),
    )
    try:
        net.load_state_dict(load_file(str(weights)))
    except Exception as e:  # safetensors raises its own error type for a bad file
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"{weights}: not weights of a {model} for {dataset} ({first})") from None
    return net.eval(), record


def trained(
    dataset: str = "digits",
    model: str = "lenet",
    quant=(4, 4),
    *,
    seed: int = 0,
    root: str | None = None,
    cache: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[nn.Module, dict]:
    """A ``model`` trained (vanilla) on ``dataset`` with the recipe in :data:`RECIPES`, from the
    cache when it is there. Returns (the converted model in eval mode, its record: settings,
    accuracies, whether it came from the cache)."""

    recipe = RECIPES.get(dataset, _DEFAULT_RECIPE)
    q = _quant(quant)
    qtag = "float" if q is None else "q" + "-".join(str(b) for b in q)
    key = f"{dataset}-{model}-{qtag}-seed{seed}-e{recipe['epochs']}-v2"
    folder = Path(cache) if cache is not None else cache_dir() / "models" / key
    if (folder / "train.json").is_file() and (folder / "model.safetensors").is_file():
        try:
            net, record = load_run(folder)
            record["cached"] = True
            return net, record
        except (ValueError, FileNotFoundError):
            pass  # a stale or damaged entry: train again and overwrite it
    t0 = time.perf_counter()
    train = data.loader(dataset, "train", recipe["batch_size"], root=root, seed=seed)
    val = data.loader(dataset, "val", 1024, root=root)
    test = data.loader(dataset, "test", 1024, root=root)
    net = build(dataset, model, q, seed=seed, root=root)
    res = fit(
        net,
        train,
        val,
        "vanilla",
        epochs=recipe["epochs"],
        lr=recipe["lr"],
        seed=seed,
        progress=progress,
    )
    record = dict(
        command="train",
        dataset=dataset,
        model=model,
        method="vanilla",
        quant=list(q) if q is not None else None,
        device_model=device_dict(cim_device(net)),
        test_accuracy=accuracy(net, test),
        val_accuracy=res.best_value,
        best_epoch=res.best_epoch,
        seconds=time.perf_counter() - t0,
        settings=dict(recipe, seed=seed),
        torch=torch.__version__,
    )
    _save_atomic(net, record, folder)
    record["cached"] = False
    return net.eval(), record


def cim_device(net: nn.Module):
    """The DeviceModel of a converted model's first CiM layer."""

    return cim_layers(net)[0][1].device


def _save_atomic(net: nn.Module, record: dict, folder: Path) -> None:
    """Write model.safetensors + train.json into ``folder`` via a temporary sibling folder and a
    rename, so a reader never sees one without the other. A cache that cannot be written is
    skipped silently (the model is still returned)."""

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "train.json").write_text(json.dumps(record, indent=1))
        if folder.exists():
            for f in folder.iterdir():
                f.unlink()
            folder.rmdir()
        os.replace(tmp, folder)
    except OSError:
        pass
