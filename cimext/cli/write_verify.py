"""``cimext write-verify``: train (or load) a model, then sweep selective write-verify.

Writes write_verify.json, write_verify_fraction.png and write_verify_pulses.png (accuracy mean
and 1st percentile against the fraction verified and against total pulses) into --out, and
prints a summary table with each method's speedup over full write-verify."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .. import data
from ..train import accuracy, fit
from ..writeverify.sensitivity import METHODS
from ..writeverify.sweep import DEFAULT_FRACTIONS, selective_write_verify
from . import _common as C

DEFAULT_LEVEL_SIGMA = "0.5,1.5,1.5,0.5"


def add_parser(sub) -> None:
    """Register the write-verify subcommand on an argparse subparsers object."""
    p = sub.add_parser(
        "write-verify",
        help="selective write-verify (U-SWIM): accuracy vs fraction verified and vs pulses",
    )
    C.add_data_options(p)
    p.add_argument("--width", type=float, default=0.125, help="channel multiplier (not lenet)")
    p.add_argument("--init", default=None, metavar="PATH", help="weights (model.safetensors)")
    p.add_argument("--epochs", type=int, default=5, help="training epochs when no --init")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--sigma", type=float, default=0.3, help="device sigma, in levels")
    p.add_argument(
        "--level-sigma",
        default=DEFAULT_LEVEL_SIGMA,
        help="per-level sigma multipliers (2**K numbers) or 'none' for uniform variation",
    )
    p.add_argument("--th", type=float, default=0.03, help="write-verify threshold, in levels")
    p.add_argument("--weight-bits", type=int, default=8)
    p.add_argument("--bits-per-device", type=int, default=2)
    p.add_argument("--max-pulses", type=int, default=100, help="pulse cap of one device")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument(
        "--fractions",
        default=None,
        help="fractions of weights to verify, comma separated (default: 0.005 ... 0.5)",
    )
    p.add_argument("--instances", type=int, default=100, help="programmed instances per point")
    p.add_argument(
        "--tolerance", type=float, default=0.5, help="accuracy loss (points) for the speedup"
    )
    p.add_argument("--hessian", default="obd", choices=["obd", "hutchinson"])
    p.add_argument(
        "--granularity",
        default="weight",
        choices=["weight", "device"],
        help="verify whole weights (all their devices; the paper) or single devices",
    )
    p.add_argument("--calib", type=int, default=1024, help="training samples for the Hessian")
    p.add_argument("--seed", type=C.seed, default=0)
    C.add_output_options(p, "runs/write-verify", "JSON, PNG, the trained model")
    p.set_defaults(run=run, trains=False)


def _floats(name: str, text: str) -> list[float]:
    return C.floats(text, name)


def _device(a):
    ls = None
    if a.level_sigma.strip().lower() not in ("", "none"):
        ls = tuple(_floats("--level-sigma", a.level_sigma))
    return C.device_model(
        weight_bits=a.weight_bits,
        bits_per_device=a.bits_per_device,
        sigma=a.sigma,
        level_sigma=ls,
        th=a.th,
    )


def _check_args(a):
    C.at_least(a, 1, "epochs", "batch_size", "instances", "max_pulses", "calib")
    C.finite_positive(a, "lr")
    if not 0.0 <= a.tolerance < 100.0:  # NaN fails too
        raise C.CLIError(f"--tolerance must be in [0, 100) accuracy points, got {a.tolerance}")
    C.finite_positive(a, "width")
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise C.CLIError(f"--methods must be a list of {', '.join(METHODS)}; got {a.methods!r}")
    fractions = None
    if a.fractions is not None:
        fractions = _floats("--fractions", a.fractions)
        if any(not 0.0 <= f <= 1.0 for f in fractions):
            raise C.CLIError(f"--fractions must be in [0, 1], got {a.fractions!r}")
    if a.init is not None and not Path(a.init).is_file():
        raise C.CLIError(f"--init {a.init}: no such file")
    return methods, fractions


def run(a: argparse.Namespace) -> int:
    """The write-verify subcommand (parsed arguments ``a``)."""
    methods, fractions = _check_args(a)
    device = _device(a)
    C.check_out(a.out)
    t0 = time.perf_counter()
    train = data.loader(a.dataset, "train", a.batch_size, root=a.root, seed=a.seed)
    val = data.loader(a.dataset, "val", 1024, root=a.root)
    test = data.loader(a.dataset, "test", 1024, root=a.root)
    width = a.width if a.model != "lenet" else None
    model = C.build_model(a.dataset, a.model, a.root, width, device=device, seed=a.seed)
    if a.init is not None:
        C.load_init(model, a.init, f"this {a.model}")
    with C.output_folder(a.out) as out:
        trained = None
        if a.init is None:
            trained = train_model(a, model, train, val, test, width, out)
        try:
            return _sweep(a, model, device, test, methods, fractions, out, t0)
        except KeyboardInterrupt:
            if trained is None:
                raise
            raise C.Interrupted(trained) from None


def train_model(a, model, train, val, test, width, out: Path, *, run_model=None) -> str:
    """Train ``model`` (vanilla, --epochs, --lr, --seed) for write-verify / bitflip and save it
    with its record (model.json), so that Ctrl-C in the analysis after training keeps both;
    returns what Ctrl-C then says. ``run_model`` (default ``model``) is what runs on the data
    (e.g. with a resize in front)."""
    run_model = run_model if run_model is not None else model
    res = fit(
        run_model,
        train,
        val,
        "vanilla",
        epochs=a.epochs,
        lr=a.lr,
        seed=a.seed,
        progress=not a.quiet,
    )
    C.save_weights(model, out / "model.safetensors")
    C.write_json(
        out / "model.json",
        dict(
            command=a.command,
            dataset=a.dataset,
            root=a.root,
            model=a.model,
            width=width,
            epochs=a.epochs,
            lr=a.lr,
            seed=a.seed,
            test_accuracy=accuracy(run_model, test),
            val_accuracy=res.best_value,
            best_epoch=res.best_epoch,
            history=res.history,
            torch=torch.__version__,
        ),
    )
    return (
        f"the trained model is kept in {a.out}/model.safetensors with model.json; "
        f"--init {a.out}/model.safetensors skips training next time"
    )


def _sweep(a, model, device, test, methods, fractions, out: Path, t0: float) -> int:
    clean_test = accuracy(model, test)
    # Hessian calibration: the first --calib training samples, in fixed order.
    calib_set = data.load(a.dataset, "train", a.root, seed=a.seed)
    n_cal = min(a.calib, len(calib_set))
    xs, ys = calib_set.tensors[0][:n_cal], calib_set.tensors[1][:n_cal]
    calib = [(xs[i : i + 256], ys[i : i + 256]) for i in range(0, n_cal, 256)]
    res = selective_write_verify(
        model,
        test,
        device,
        calib=calib,
        methods=methods,
        fractions=fractions if fractions is not None else DEFAULT_FRACTIONS,
        instances=a.instances,
        seed=a.seed,
        max_pulses=a.max_pulses,
        tolerance=a.tolerance / 100.0,
        hessian=a.hessian,
        granularity=a.granularity,
        progress=not a.quiet,
    )
    record = json.loads(res.to_json())
    record.update(
        command="write-verify",
        dataset=a.dataset,
        model=a.model,
        width=a.width if a.model != "lenet" else None,
        init=a.init,
        epochs=None if a.init else a.epochs,
        clean_test_accuracy=clean_test,
        total_seconds=time.perf_counter() - t0,
        torch=torch.__version__,
    )
    C.write_json(out / "write_verify.json", record)
    plots = res.plot(str(out / "write_verify"))
    print(summary_table(res))
    names = ", ".join(Path(p).name for p in plots)
    print(f"written: {a.out}/write_verify.json, {names}")
    return 0


def summary_table(res) -> str:
    """The terminal summary: per method, the cheapest point within tolerance of full verify."""
    full, none = res.full, res.none
    rows = [
        ("method", "verified", "pulses/weight", "acc mean", "acc q01", "speedup"),
        (
            "none",
            "0%",
            f"{none.pulses / res.weights:.2f}",
            f"{100 * none.mean:.2f}",
            f"{100 * none.q01:.2f}",
            "-",
        ),
        (
            "full",
            "100%",
            f"{full.pulses / res.weights:.2f}",
            f"{100 * full.mean:.2f}",
            f"{100 * full.q01:.2f}",
            "1.00x",
        ),
    ]
    for m, sp in res.speedup.items():
        rows.append(
            (
                m,
                f"{100 * sp['fraction']:.1f}%",
                f"{sp['pulses'] / res.weights:.2f}",
                f"{100 * sp['mean']:.2f}",
                f"{100 * sp['q01']:.2f}",
                f"{sp['speedup']:.2f}x",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    head = (
        f"selective write-verify: clean {100 * res.clean_accuracy:.2f}%, {res.instances} "
        f"instances, cheapest point within {100 * res.tolerance:.2f} points of full write-verify"
    )
    return "\n".join([head, lines[0], "-" * len(lines[0]), *lines[1:]])
