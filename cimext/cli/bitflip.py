"""``cimext bitflip``: accuracy against bit-flip probability per storage dtype and bit set.

Trains the model (or loads --init), sweeps p for every (dtype, bits) pair, finds each pair's
midpoint (accuracy halfway from clean to chance, bisection in log10 p), and writes bitflip.json
and bitflip.png into --out; prints a table of midpoints with their ratio to the first pair."""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
from torch import nn

from .. import data
from .._util import progress as progress_bar
from ..bitflip.inject import STORAGE_DTYPES
from ..bitflip.study import evaluate, midpoint, midpoint_steps, sweep
from ..ops.bitflip import bit_mask
from . import _common as C
from .write_verify import train_model

DEFAULT_PS = "1e-9,1e-8,1e-7,1e-6,1e-5,1e-4,1e-3,1e-2,1e-1"


def add_parser(sub) -> None:
    """Register the bitflip subcommand on an argparse subparsers object."""
    p = sub.add_parser(
        "bitflip", help="bit-flip noise in memory: accuracy vs flip probability, midpoints"
    )
    C.add_data_options(p)
    p.add_argument("--width", type=float, default=0.125, help="channel multiplier (not lenet)")
    p.add_argument(
        "--resize",
        type=int,
        default=None,
        help="upsample inputs to this size first (default: 32 for VGG / ResNet on smaller "
        "inputs, whose five poolings need it)",
    )
    p.add_argument("--init", default=None, metavar="PATH", help="weights (model.safetensors)")
    p.add_argument("--epochs", type=int, default=5, help="training epochs when no --init")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--dtypes", default="float32,float16,int8", help="storage dtypes")
    p.add_argument("--bits", default="all,exponent,mantissa", help="bit sets (all, sign, ...)")
    p.add_argument("--targets", default="weights", choices=["weights", "activations", "both"])
    p.add_argument("--ps", default=DEFAULT_PS, help="flip probabilities of the sweep")
    p.add_argument("--seeds", type=int, default=3, help="noise seeds per point")
    p.add_argument("--tol", type=float, default=0.1, help="midpoint precision, in decades")
    p.add_argument("--no-midpoint", action="store_true", help="sweep only")
    p.add_argument("--test-samples", type=int, default=None, help="evaluate on the first N")
    p.add_argument(
        "--eval-batch",
        type=int,
        default=64,
        help="test batch size: every batch is a fresh memory read, so smaller batches average "
        "more flip draws per evaluation",
    )
    p.add_argument("--seed", type=C.seed, default=0, help="training seed")
    C.add_output_options(p, "runs/bitflip", "JSON, PNG, the trained model")
    p.set_defaults(run=run, trains=False)


def _list(name: str, text: str) -> list[str]:
    vals = [v.strip() for v in text.split(",") if v.strip()]
    if not vals:
        raise C.CLIError(f"{name} must be a comma-separated list, got {text!r}")
    return vals


def _check_args(a):
    C.at_least(a, 1, "epochs", "batch_size", "seeds", "eval_batch", "test_samples", "resize")
    C.finite_positive(a, "width")
    if not (a.tol > 0 and math.isfinite(a.tol)):
        raise C.CLIError(f"--tol must be > 0 decades, got {a.tol}")
    if not (a.lr > 0 and math.isfinite(a.lr)):
        raise C.CLIError(f"--lr must be > 0, got {a.lr}")
    try:
        ps = [float(v) for v in _list("--ps", a.ps)]
    except ValueError:
        raise C.CLIError(f"--ps must be comma-separated numbers, got {a.ps!r}") from None
    bad = [p for p in ps if not 0.0 <= p <= 1.0]  # NaN fails too
    if bad:
        raise C.CLIError(f"--ps must be probabilities in [0, 1], got {bad[0]}")
    dtypes = _list("--dtypes", a.dtypes)
    for d in dtypes:
        if d not in STORAGE_DTYPES:
            raise C.CLIError(f"--dtypes: {d!r} is not one of {', '.join(STORAGE_DTYPES)}")
    bits = _list("--bits", a.bits)
    pairs, skipped = [], []
    for d in dtypes:
        for b in bits:
            try:
                bit_mask(STORAGE_DTYPES[d], b)
            except ValueError as e:
                if "is not one of" in str(e):
                    raise C.CLIError(f"--bits: {e}") from None
                skipped.append(f"{d}/{b}")
                continue
            pairs.append((d, b))
    if not pairs:
        raise C.CLIError(f"no valid dtype / bits pair in --dtypes {a.dtypes} --bits {a.bits}")
    if a.init is not None and not os.path.isfile(a.init):
        raise C.CLIError(f"--init {a.init}: no such file")
    return ps, pairs, skipped


def _model(a):
    """(the model run on the data, the CiM net inside it, the resize or None): VGG / ResNet on
    inputs smaller than 32x32 get an upsampling layer in front (their five poolings need it)."""
    c, h, _ = data.input_shape(a.dataset, root=a.root)
    resize = a.resize
    if resize is None and a.model not in ("lenet", "convnet") and h < 32:
        resize = 32
    width = a.width if a.model != "lenet" else None
    net = C.build_model(a.dataset, a.model, a.root, width, seed=a.seed, input_size=resize or h)
    if resize is None or resize == h:
        return net, net, None
    up = nn.Upsample(size=(resize, resize), mode="bilinear", align_corners=False)
    return nn.Sequential(up, net), net, resize


def run(a: argparse.Namespace) -> int:
    """The bitflip subcommand (parsed arguments ``a``)."""
    ps, pairs, skipped = _check_args(a)
    C.check_out(a.out)
    t0 = time.perf_counter()
    # The test set in memory as fixed batches of --eval-batch (each batch one noisy read).
    xs, ys = zip(*data.loader(a.dataset, "test", 1024, root=a.root), strict=True)
    x, y = torch.cat(xs)[: a.test_samples], torch.cat(ys)[: a.test_samples]
    b = a.eval_batch
    test = [(x[i : i + b], y[i : i + b]) for i in range(0, len(y), b)]
    model, net, resize = _model(a)
    if a.init is not None:
        C.load_init(net, a.init, f"this {a.model}")
    with C.output_folder(a.out) as out:
        trained = None
        if a.init is None:
            train = data.loader(a.dataset, "train", a.batch_size, root=a.root, seed=a.seed)
            val = data.loader(a.dataset, "val", 1024, root=a.root)
            width = a.width if a.model != "lenet" else None
            trained = train_model(a, net, train, val, test, width, out, run_model=model)
        try:
            return _study(a, model, test, ps, pairs, skipped, resize, out, t0)
        except KeyboardInterrupt:
            if trained is None:
                raise
            raise C.Interrupted(trained) from None


def _study(a, model, test, ps, pairs, skipped, resize, out, t0) -> int:
    model.eval()
    clean = evaluate(model, test)[0]
    steps = len(ps) + (0 if a.no_midpoint else midpoint_steps(tol=a.tol))
    bar = None
    if not a.quiet:
        bar = progress_bar(
            total=len(pairs) * steps * a.seeds, desc="bitflip (evaluations)", leave=True
        )
    records = []
    try:
        for dtype, bits in pairs:
            if bar is not None:
                bar.set_postfix_str(f"{dtype}/{bits}")
            kw = dict(dtype=dtype, bits=bits, targets=a.targets, seeds=a.seeds)
            update = bar.update if bar is not None else None
            res = sweep(model, test, ps, progress=update, **kw)
            mid = None
            if not a.no_midpoint:
                mid = midpoint(model, test, tol=a.tol, progress=update, **kw)
            records.append(
                dict(dtype=dtype, bits=bits, midpoint=mid, sweep=json.loads(res.to_json()))
            )
    finally:
        if bar is not None:
            bar.close()
    record = dict(
        command="bitflip",
        dataset=a.dataset,
        model=a.model,
        width=a.width if a.model != "lenet" else None,
        resize=resize,
        init=a.init,
        epochs=None if a.init else a.epochs,
        targets=a.targets,
        seeds=a.seeds,
        eval_batch=a.eval_batch,
        clean_accuracy=clean,
        skipped=skipped,
        results=[dict(r, midpoint=_json_float(r["midpoint"])) for r in records],
        total_seconds=time.perf_counter() - t0,
        torch=torch.__version__,
    )
    C.write_json(out / "bitflip.json", record)
    _plot(records, str(out / "bitflip.png"), f"{a.model} on {a.dataset}")
    print(summary_table(records, clean))
    if skipped:
        print(f"skipped (no such bits in the dtype): {', '.join(skipped)}")
    print(f"written: {a.out}/bitflip.json, bitflip.png")
    return 0


def _json_float(v):
    if v is None:
        return None
    return "inf" if math.isinf(v) else v


def _fmt_p(v) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "> 0.5"
    if v == 0:
        return "< 1e-10"
    return f"{v:.2e}"


def summary_table(records, clean: float) -> str:
    """Midpoints per (dtype, bits) and their ratio to the first pair's."""
    base = records[0]["midpoint"]
    rows = [
        (
            "dtype",
            "bits",
            "clean acc",
            "midpoint p",
            f"x {records[0]['dtype']}/{records[0]['bits']}",
        )
    ]
    for r in records:
        m = r["midpoint"]
        if m is None or base in (None, 0.0) or math.isinf(base):
            ratio = "-"
        elif math.isinf(m):
            ratio = f"> {0.5 / base:.0f}"
        else:
            ratio = f"{m / base:.3g}"
        rows.append(
            (
                r["dtype"],
                str(r["bits"]),
                f"{100 * r['sweep']['clean_accuracy']:.2f}%",
                _fmt_p(m),
                ratio,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return f"clean accuracy (float32): {100 * clean:.2f}%\n" + "\n".join(lines)


def _plot(records, path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in records:
        s = r["sweep"]
        pts = [(p, m) for p, m in zip(s["ps"], s["mean"], strict=True) if p > 0]
        if not pts:
            continue
        line = ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=f"{r['dtype']}/{r['bits']}")
        m = r["midpoint"]
        if m is not None and 0 < m < math.inf:
            half = 0.5 * (s["clean_accuracy"] + s["chance"])
            ax.plot([m], [half], marker="x", ms=8, color=line[0].get_color())
    ax.set_xscale("log")
    ax.set_xlabel("bit-flip probability p")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}: accuracy under noisy memory reads (x: midpoint)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
