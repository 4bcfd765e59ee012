"""The ``cimext`` command line. Subcommands: demo, worst-case, reproduce, train, compare,
write-verify, bitflip, bench.

Every subcommand prints one clear line and exits non-zero on bad input, missing data, an
unwritable --out or Ctrl-C; results go to --out as JSON (checkpoints are written atomically, so an
interrupted run leaves no half-written file)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _writable_dir(path: str) -> Path:
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / ".cimext-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise CLIError(f"--out {path}: not writable ({e.strerror or e})") from None
    return p


def _quant(text: str | None):
    if text is None:
        return None
    try:
        parts = [int(v) if v.strip().lower() not in ("", "none") else None for v in text.split(",")]
    except ValueError:
        raise CLIError(f"--quant must be W or W,A bit counts like 4,4; got {text!r}") from None
    if len(parts) == 1:
        parts.append(None)
    if len(parts) != 2:
        raise CLIError(f"--quant must be W or W,A bit counts like 4,4; got {text!r}")
    return tuple(parts)


def _train_parser(sub) -> None:
    from . import data, models

    p = sub.add_parser("train", help="train a model (vanilla, va, trice, adv, atrice)")
    p.add_argument("--dataset", default="digits", choices=list(data.DATASETS))
    p.add_argument("--root", default=None, help="dataset folder (default: the dataset's own)")
    p.add_argument("--model", default="lenet", choices=list(models.MODELS))
    p.add_argument("--method", default="vanilla", help="vanilla, va, trice, adv or atrice")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--quant", default=None, help="weight[,input] bits, e.g. 4,4 (default: float)")
    p.add_argument("--sigma", type=float, default=0.1, help="device sigma (va), per level")
    p.add_argument(
        "--weight-bits", type=int, default=None, help="device model M (default: quant W or 8)"
    )
    p.add_argument("--bits-per-device", type=int, default=2)
    p.add_argument("--sigma-t", type=float, default=0.1, help="trice: RCG sigma_t")
    p.add_argument("--th-rcg", type=float, default=1.0, help="trice: RCG cut-off th")
    from .train.compare import add_method_arguments

    add_method_arguments(p)  # --alpha, --train-th-g, --step-size, --adv-steps, --metric
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--init",
        default=None,
        metavar="PATH",
        help="start from these weights (a model.safetensors of an earlier run), e.g. to fine-tune "
        "a float model with quantization",
    )
    p.add_argument("--out", default="runs/train", help="output folder (JSON, weights, checkpoints)")
    p.add_argument(
        "--no-resume", action="store_true", help="start over even if --out has a checkpoint"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def load_init(model, path: str, what: str) -> None:
    """Load the --init weights ``path`` (a safetensors file) into ``model``; a missing file, a
    bad file or weights of another model raise CLIError naming the file (``what`` names the
    expected model)."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise CLIError(f"--init {path}: no such file")
    try:
        state = load_file(path)
    except Exception as e:  # safetensors raises its own error type for a bad file
        raise CLIError(f"--init {path}: not a safetensors file ({e})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"--init {path}: not weights of {what} ({first})") from None


def save_weights(model, path) -> None:
    """Write ``model``'s state dict to ``path`` (safetensors)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))


def cmd_train(a) -> int:
    import torch

    from . import data, distributed, zoo
    from .device import DeviceModel
    from .train import METHODS, accuracy, fit
    from .train.compare import method_kwargs

    if a.method not in METHODS:
        raise CLIError(f"--method must be one of {', '.join(sorted(METHODS))}; got {a.method!r}")
    method_kw = method_kwargs(a, a.method)
    for name in ("epochs", "batch_size"):
        if getattr(a, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    out = _writable_dir(a.out)
    quant = _quant(a.quant)
    try:
        wbits = a.weight_bits or (quant[0] if quant and quant[0] else 8)
        dev = DeviceModel(weight_bits=wbits, bits_per_device=a.bits_per_device, sigma=a.sigma)
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None
    train = data.loader(a.dataset, "train", a.batch_size, root=a.root, seed=a.seed)
    val = data.loader(a.dataset, "val", 1024, root=a.root)
    test = data.loader(a.dataset, "test", 1024, root=a.root)
    model = zoo.build(a.dataset, a.model, quant, dev, a.seed)
    if a.init is not None:
        load_init(model, a.init, f"a {a.model} for {a.dataset}")
    t0 = time.perf_counter()
    res = fit(
        model,
        train,
        val,
        a.method,
        epochs=a.epochs,
        lr=a.lr,
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
    save_weights(model, out / "model.safetensors")
    record = dict(
        command="train",
        dataset=a.dataset,
        model=a.model,
        method=a.method,
        quant=quant,
        device_model=dict(weight_bits=wbits, bits_per_device=a.bits_per_device, sigma=a.sigma),
        test_accuracy=test_acc,
        best_epoch=res.best_epoch,
        val_accuracy=res.best_value,
        val_metric=res.metric,
        seconds=time.perf_counter() - t0,
        history=res.history,
        settings=res.settings,
        torch=torch.__version__,
    )
    tmp = out / ".train.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, out / "train.json")
    rows = [
        ("dataset", a.dataset),
        ("model", a.model),
        ("method", a.method),
        ("quant (W,A bits)", "float" if quant is None else f"{quant[0]},{quant[1]}"),
        ("best epoch", f"{res.best_epoch + 1} of {a.epochs}"),
        (f"val accuracy ({res.metric})", f"{100 * res.best_value:.2f}%"),
        ("test accuracy", f"{100 * test_acc:.2f}%"),
        ("time", f"{record['seconds']:.1f} s"),
        ("written", str(out / "train.json")),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cimext`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="cimext",
        description="Worst-case analysis and protection of DNNs on compute-in-memory hardware.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from . import demo, reproduce
    from .worstcase import cli as worstcase_cli

    demo.add_parser(sub)
    reproduce.add_parser(sub)
    _train_parser(sub)
    worstcase_cli.add_parser(sub)
    from .writeverify.cli import add_parser as _write_verify_parser

    _write_verify_parser(sub)
    from .bitflip.cli import add_parser as _bitflip_parser

    _bitflip_parser(sub)
    from .train import compare

    compare.add_parser(sub)
    sub.add_parser("bench", help="kernel benchmarks against plain PyTorch", add_help=False)
    if not argv:
        parser.print_help()
        return 2
    try:
        if argv[0] == "bench":
            from . import bench

            return bench.main(argv[1:])
        a = parser.parse_args(argv)
        if a.command == "train":
            return cmd_train(a)
        if a.command == "demo":
            return demo.run(a)
        if a.command == "reproduce":
            return reproduce.run(a)
        if a.command == "worst-case":
            return worstcase_cli.run(a)
        if a.command == "write-verify":
            from .writeverify.cli import run as cmd_write_verify

            return cmd_write_verify(a)
        if a.command == "compare":
            return compare.run(a)
        if a.command == "bitflip":
            from .bitflip.cli import run as cmd_bitflip

            return cmd_bitflip(a)
        parser.print_help()
        return 2
    except CLIError as e:
        print(f"cimext: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, TypeError, KeyError) as e:
        msg = e.args[0] if e.args else str(e)
        print(f"cimext: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "cimext: interrupted (no half-written output is left; training resumes from its "
            "last finished epoch)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    # Run the imported module's main, so that `python -m cimext.cli` and the submodules that
    # raise cimext.cli.CLIError share one CLIError class.
    from cimext.cli import main as _main

    raise SystemExit(_main())
