"""``cimext train``: train one model (vanilla, va, trice, adv, atrice) and write train.json,
model.safetensors and per-epoch checkpoints into --out; a killed run resumes from its last
finished epoch when the same command runs again."""

from __future__ import annotations

import argparse
import math
import shutil
import time

import torch

from .. import data, distributed
from .._util import device_dict
from ..train import DEFAULT_LR, METHODS, accuracy, fit
from ..train.fit import METRICS
from . import _common as C


def add_method_arguments(p: argparse.ArgumentParser) -> None:
    """The adv / A-TRICE options shared by ``cimext train`` and ``cimext compare``."""
    p.add_argument(
        "--alpha", type=float, default=0.5, help="atrice: weight of the adversarial loss"
    )
    p.add_argument(
        "--train-th-g",
        type=float,
        default=0.03,
        help="adv/atrice: bound of the training perturbation (fraction of max|W|)",
    )
    p.add_argument(
        "--step-size", type=float, default=None, help="adv/atrice: sign step s (default: the bound)"
    )
    p.add_argument("--adv-steps", type=int, default=1, help="adv/atrice: sign steps per batch")
    p.add_argument(
        "--metric",
        default="clean",
        help="validation metric that picks the best epoch: clean, mc or flwc",
    )


def method_kwargs(a: argparse.Namespace, method: str) -> dict:
    """fit() keywords of ``method`` from the parsed options; bad values raise CLIError."""
    if a.metric not in METRICS:
        raise C.CLIError(f"--metric must be one of {', '.join(METRICS)}; got {a.metric!r}")
    C.finite_positive(a, "train_th_g", "step_size")
    if not (math.isfinite(a.alpha) and 0.0 <= a.alpha <= 1.0):
        raise C.CLIError(f"--alpha must be in [0, 1], got {a.alpha}")
    C.at_least(a, 1, "adv_steps")
    kw: dict = dict(metric=a.metric)
    if a.metric == "flwc":
        kw["metric_options"] = dict(th_g=a.train_th_g)
    if method in ("adv", "atrice"):
        kw.update(th_g=a.train_th_g, step_size=a.step_size, adv_steps=a.adv_steps)
        if method == "atrice":
            kw["alpha"] = a.alpha
    return kw


def default_lr(dataset: str, lr: float | None) -> float:
    """--lr, or the dataset's default (chosen on its validation split, cimext.train.DEFAULT_LR)."""
    if lr is None:
        return DEFAULT_LR.get(dataset, DEFAULT_LR["default"])
    if not (math.isfinite(lr) and lr > 0):
        raise C.CLIError(f"--lr must be a finite number > 0, got {lr}")
    return lr


def add_parser(sub) -> None:
    """Register the ``train`` subcommand."""
    p = sub.add_parser(
        "train",
        help="train a model (vanilla, va, trice, adv, atrice)",
        description=__doc__.replace("\n", " "),
    )
    C.add_data_options(p)
    p.add_argument("--width", type=float, default=None, help="channel multiplier (not lenet)")
    p.add_argument("--method", default="vanilla", help="vanilla, va, trice, adv or atrice")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--lr", type=float, default=None, help="learning rate (default: the dataset's own)"
    )
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--quant", default=None, help="weight[,input] bits, e.g. 4,4 (default: float)")
    p.add_argument("--sigma", type=float, default=0.1, help="device sigma (va), per level")
    p.add_argument(
        "--weight-bits", type=int, default=None, help="device model M (default: quant W or 8)"
    )
    p.add_argument("--bits-per-device", type=int, default=2)
    p.add_argument("--sigma-t", type=float, default=0.1, help="trice: RCG sigma_t")
    p.add_argument("--th-rcg", type=float, default=1.0, help="trice: RCG cut-off th")
    add_method_arguments(p)  # --alpha, --train-th-g, --step-size, --adv-steps, --metric
    p.add_argument("--seed", type=C.seed, default=0)
    p.add_argument(
        "--init",
        default=None,
        metavar="PATH",
        help="start from these weights (a model.safetensors of an earlier run), e.g. to fine-tune "
        "a float model with quantization",
    )
    C.add_output_options(p, "runs/train", "JSON, weights, checkpoints")
    p.add_argument(
        "--no-resume", action="store_true", help="start over even if --out has a checkpoint"
    )
    p.set_defaults(run=run, trains=True)


def run(a: argparse.Namespace) -> int:
    """The ``cimext train`` command."""

    if a.method not in METHODS:
        raise C.CLIError(f"--method must be one of {', '.join(sorted(METHODS))}; got {a.method!r}")
    method_kw = method_kwargs(a, a.method)
    C.at_least(a, 1, "epochs", "batch_size")
    lr = default_lr(a.dataset, a.lr)
    quant = C.quant(a.quant)
    if a.weight_bits is not None and a.weight_bits < 1:
        raise C.CLIError(f"--weight-bits must be >= 1, got {a.weight_bits}")
    wbits = a.weight_bits if a.weight_bits is not None else (quant[0] if quant and quant[0] else 8)
    dev = C.device_model(weight_bits=wbits, bits_per_device=a.bits_per_device, sigma=a.sigma)
    C.finite_positive(a, "sigma_t", "th_rcg")
    C.check_out(a.out)
    model = C.build_model(a.dataset, a.model, a.root, a.width, quant=quant, device=dev, seed=a.seed)
    if a.init is not None:
        C.load_init(model, a.init, f"a {a.model} for {a.dataset}")
    train = data.loader(a.dataset, "train", a.batch_size, root=a.root, seed=a.seed)
    val = data.loader(a.dataset, "val", 1024, root=a.root)
    test = data.loader(a.dataset, "test", 1024, root=a.root)
    t0 = time.perf_counter()
    with C.output_folder(a.out, resumable=True, keep="checkpoints") as out:
        if a.no_resume:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        res = fit(
            model,
            train,
            val,
            a.method,
            epochs=a.epochs,
            lr=lr,
            optimizer=a.optimizer,
            sigma_t=a.sigma_t,
            th_rcg=a.th_rcg,
            seed=a.seed,
            checkpoint_dir=out / "checkpoints",
            resume=not a.no_resume,
            progress=not a.quiet,
            **method_kw,
        )
        test_acc = accuracy(model, test)
        if not distributed.is_main():
            return 0  # under torchrun rank 0 writes and prints
        C.save_weights(model, out / "model.safetensors")
        record = dict(
            command="train",
            dataset=a.dataset,
            root=a.root,
            model=a.model,
            width=a.width,
            method=a.method,
            quant=quant,
            device_model=device_dict(dev),
            lr=lr,
            test_accuracy=test_acc,
            best_epoch=res.best_epoch,
            val_accuracy=res.best_value,
            val_metric=res.metric,
            seconds=time.perf_counter() - t0,
            history=res.history,
            settings=res.settings,
            torch=torch.__version__,
        )
        C.write_json(out / "train.json", record)
    rows = [
        ("dataset", a.dataset),
        ("model", a.model),
        ("method", a.method),
        ("quant (W,A bits)", "float" if quant is None else f"{quant[0]},{quant[1]}"),
        ("learning rate", f"{lr:g}" + (" (the dataset's default)" if a.lr is None else "")),
        ("best epoch", f"{res.best_epoch + 1} of {a.epochs}"),
        (f"val accuracy ({res.metric})", f"{100 * res.best_value:.2f}%"),
        ("test accuracy", f"{100 * test_acc:.2f}%"),
        ("time", f"{record['seconds']:.1f} s"),
        ("written", f"{a.out}/train.json, model.safetensors, checkpoints/"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0
