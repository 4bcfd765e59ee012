"""``cimext bitflip``: accuracy against bit-flip probability per storage dtype and bit set.

Trains the model (or loads --init), sweeps p for every (dtype, bits) pair, finds each pair's
midpoint (accuracy halfway from clean to chance, bisection in log10 p), and writes bitflip.json
and bitflip.png into --out; prints a table of midpoints with their ratio to the first pair."""

from __future__ import annotations

import json
import math
import os
import time

DEFAULT_PS = "1e-9,1e-8,1e-7,1e-6,1e-5,1e-4,1e-3,1e-2,1e-1"


def add_parser(sub) -> None:
    """Register the bitflip subcommand on an argparse subparsers object."""
    from .. import data, models

    p = sub.add_parser(
        "bitflip", help="bit-flip noise in memory: accuracy vs flip probability, midpoints"
    )
    p.add_argument("--dataset", default="digits", choices=list(data.DATASETS))
    p.add_argument("--root", default=None, help="dataset folder (default: the dataset's own)")
    p.add_argument("--model", default="lenet", choices=list(models.MODELS))
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
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--out", default="runs/bitflip", help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _list(name: str, text: str) -> list[str]:
    from ..cli import CLIError

    vals = [v.strip() for v in text.split(",") if v.strip()]
    if not vals:
        raise CLIError(f"{name} must be a comma-separated list, got {text!r}")
    return vals


def _check_args(a):
    import torch

    from ..cli import CLIError
    from ..ops.bitflip import bit_mask
    from .inject import STORAGE_DTYPES

    for name in ("epochs", "batch_size", "seeds", "eval_batch"):
        if getattr(a, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.test_samples is not None and a.test_samples < 1:
        raise CLIError(f"--test-samples must be >= 1, got {a.test_samples}")
    if a.resize is not None and a.resize < 1:
        raise CLIError(f"--resize must be >= 1, got {a.resize}")
    if not a.width > 0:
        raise CLIError(f"--width must be > 0, got {a.width}")
    if not (a.tol > 0 and math.isfinite(a.tol)):
        raise CLIError(f"--tol must be > 0 decades, got {a.tol}")
    if not (a.lr > 0 and math.isfinite(a.lr)):
        raise CLIError(f"--lr must be > 0, got {a.lr}")
    try:
        ps = [float(v) for v in _list("--ps", a.ps)]
    except ValueError:
        raise CLIError(f"--ps must be comma-separated numbers, got {a.ps!r}") from None
    bad = [p for p in ps if not 0.0 <= p <= 1.0]  # NaN fails too
    if bad:
        raise CLIError(f"--ps must be probabilities in [0, 1], got {bad[0]}")
    dtypes = _list("--dtypes", a.dtypes)
    for d in dtypes:
        if d not in STORAGE_DTYPES:
            raise CLIError(f"--dtypes: {d!r} is not one of {', '.join(STORAGE_DTYPES)}")
    bits = _list("--bits", a.bits)
    pairs, skipped = [], []
    for d in dtypes:
        for b in bits:
            try:
                bit_mask(STORAGE_DTYPES[d], b)
            except ValueError as e:
                if "is not one of" in str(e):
                    raise CLIError(f"--bits: {e}") from None
                skipped.append(f"{d}/{b}")
                continue
            pairs.append((d, b))
    if not pairs:
        raise CLIError(f"no valid dtype / bits pair in --dtypes {a.dtypes} --bits {a.bits}")
    if a.init is not None and not os.path.isfile(a.init):
        raise CLIError(f"--init {a.init}: no such file")
    del torch
    return ps, pairs, skipped


def _model(a):
    import torch
    from torch import nn

    from .. import data, models
    from ..cli import CLIError

    torch.manual_seed(a.seed)
    c, h, _ = data.input_shape(a.dataset, root=a.root)
    resize = a.resize
    if resize is None and a.model not in ("lenet", "convnet") and h < 32:
        resize = 32
    size = resize or h
    kw = dict(num_classes=data.num_classes(a.dataset, root=a.root), in_channels=c, input_size=size)
    if a.model != "lenet":
        kw["width"] = a.width
    try:
        net = models.get(a.model, **kw)
    except (TypeError, ValueError) as e:
        raise CLIError(f"--model {a.model}: {e}") from None
    if resize is None or resize == h:
        return net, net, None
    up = nn.Upsample(size=(resize, resize), mode="bilinear", align_corners=False)
    return nn.Sequential(up, net), net, resize


def run(a) -> int:
    """The bitflip subcommand (parsed arguments ``a``)."""
    import torch

    from .. import data
    from ..cli import _writable_dir, load_init, save_weights
    from ..train import fit
    from .study import evaluate, midpoint, midpoint_steps, sweep

    ps, pairs, skipped = _check_args(a)
    out = _writable_dir(a.out)
    t0 = time.perf_counter()
    # The test set in memory as fixed batches of --eval-batch (each batch one noisy read).
    xs, ys = zip(*data.loader(a.dataset, "test", 1024, root=a.root), strict=True)
    x, y = torch.cat(xs)[: a.test_samples], torch.cat(ys)[: a.test_samples]
    b = a.eval_batch
    test = [(x[i : i + b], y[i : i + b]) for i in range(0, len(y), b)]
    model, net, resize = _model(a)
    if a.init is not None:
        load_init(net, a.init, f"this {a.model}")
    else:
        train = data.loader(a.dataset, "train", a.batch_size, root=a.root, seed=a.seed)
        val = data.loader(a.dataset, "val", 1024, root=a.root)
        fit(
            model,
            train,
            val,
            "vanilla",
            epochs=a.epochs,
            lr=a.lr,
            seed=a.seed,
            progress=not a.quiet,
        )
        save_weights(net, out / "model.safetensors")
    model.eval()
    clean = evaluate(model, test)[0]
    steps = len(ps) + (0 if a.no_midpoint else midpoint_steps(tol=a.tol))
    bar = None
    if not a.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(pairs) * steps * a.seeds, desc="bitflip (evaluations)", dynamic_ncols=True
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
    tmp = out / ".bitflip.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, out / "bitflip.json")
    png = _plot(records, str(out / "bitflip.png"), f"{a.model} on {a.dataset}")
    print(summary_table(records, clean))
    if skipped:
        print(f"skipped (no such bits in the dtype): {', '.join(skipped)}")
    print(f"written: {out / 'bitflip.json'}, {png}")
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
