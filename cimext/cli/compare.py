"""``cimext compare``: train several methods on one dataset and compare their worst cases.

Every method (default: vanilla, VA, TRICE and A-TRICE) is trained with the same data, model,
quantization and seeds, then evaluated with LWC (cimext.worstcase.lwc) at every bound th_g of a
range. Written into --out: ``compare.json`` (every run, every figure, the settings), the tables
on the terminal, and ``compare.png``, the worst-case accuracy against th_g (the paper's Fig. 8).
Two tables: methods x {clean, worst case at the main th_g} (Table V) and th_g x methods (the
layout of Table VI, with the write-verify bound th_g in place of the device variation). With
several --seeds every figure is a mean ± std over the seeds, as in the paper. An interrupted
compare resumes its training from the last finished epoch when the same command runs again.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from .. import data, distributed
from .._util import device_dict
from .._util import progress as progress_bar
from ..train import accuracy, fit
from ..train.fit import METHODS
from ..worstcase import lwc
from . import _common as C
from .train import add_method_arguments, default_lr, method_kwargs

DEFAULT_METHODS = ("vanilla", "va", "trice", "atrice")
LABELS = {"vanilla": "vanilla", "va": "VA", "trice": "TRICE", "adv": "adv", "atrice": "A-TRICE"}


def add_parser(sub) -> None:
    """Register the ``compare`` subcommand."""
    p = sub.add_parser(
        "compare",
        help="train vanilla, VA, TRICE and A-TRICE and compare their LWC worst cases",
        description=__doc__.split("\n\n")[1],
    )
    C.add_data_options(p)
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma-separated training methods (default: vanilla,va,trice,atrice)",
    )
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--lr", type=float, default=None, help="learning rate (default: the dataset's own)"
    )
    p.add_argument("--quant", default=None, help="weight[,input] bits, e.g. 4,4 (default: float)")
    p.add_argument("--sigma", type=float, default=0.1, help="va: device sigma, per level")
    p.add_argument("--bits-per-device", type=int, default=2)
    p.add_argument("--sigma-t", type=float, default=0.1, help="trice/atrice: RCG sigma_t")
    p.add_argument("--th-rcg", type=float, default=1.0, help="trice/atrice: RCG cut-off th")
    add_method_arguments(p)
    p.add_argument(
        "--th-g",
        default="0.01,0.02,0.03,0.04",
        help="comma-separated LWC bounds th_g to evaluate (fractions of max|W|)",
    )
    p.add_argument(
        "--main-th-g", type=float, default=None, help="th_g of the Table V column (default 0.03)"
    )
    p.add_argument(
        "--eval-samples",
        type=int,
        default=1000,
        help="test samples the LWC search runs on (the first N of the test split; 0: all)",
    )
    p.add_argument("--lwc-steps", type=int, default=30, help="LWC: Adam epochs per c value")
    p.add_argument("--search-steps", type=int, default=10, help="LWC: binary-search steps on c")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; one run per seed")
    C.add_output_options(p, "runs/compare", "JSON, PNG, weights")
    p.set_defaults(run=run, trains=True)


def _check(a) -> tuple[list[str], list[float], float, list[int]]:
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if not methods or bad:
        raise C.CLIError(
            f"--methods must be comma-separated names from {', '.join(sorted(METHODS))}; "
            f"got {a.methods!r}"
        )
    if len(set(methods)) != len(methods):
        raise C.CLIError(f"--methods names a method twice: {a.methods!r}")
    C.at_least(a, 1, "epochs", "batch_size", "lwc_steps", "search_steps")
    C.at_least(a, 0, "eval_samples")
    default_lr(a.dataset, a.lr)
    C.finite_positive(a, "sigma_t", "th_rcg", "main_th_g")
    th_gs = sorted(set(C.floats(a.th_g, "--th-g", positive=True)))
    main = 0.03 if a.main_th_g is None else a.main_th_g
    if a.main_th_g is None and main not in th_gs:
        main = th_gs[len(th_gs) // 2]
    if main not in th_gs:
        raise C.CLIError(f"--main-th-g {main} is not one of --th-g {a.th_g}")
    for m in methods:
        method_kwargs(a, m)  # validates --alpha and friends before any training
    return methods, th_gs, main, C.ints(a.seeds, "--seeds", seeds=True)


def _eval_loader(a):

    test = data.load(a.dataset, "test", root=a.root)
    x, y = test.tensors
    if a.eval_samples:
        x, y = x[: a.eval_samples], y[: a.eval_samples]
    return (
        DataLoader(TensorDataset(x, y), batch_size=1024),
        data.loader(a.dataset, "test", 1024, root=a.root),
        int(torch.numel(y)),
    )


def _mean_std(vals: list[float]) -> tuple[float, float]:
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _fmt(vals: list[float]) -> str:
    m, s = _mean_std(vals)
    return f"{100 * m:6.2f}" + (f" ± {100 * s:5.2f}" if len(vals) > 1 else "")


def tables(record: dict) -> str:
    """The two comparison tables of a compare record, as text."""
    methods, th_gs, main = record["methods"], record["th_g"], record["main_th_g"]
    runs = record["runs"]

    def vals(method, key):
        return [r[key] for r in runs if r["method"] == method]

    def wc(method, t):
        return [r["worst_case"][f"{t:g}"] for r in runs if r["method"] == method]

    quant = record["quant"]
    quant = "float" if not quant else ",".join("-" if q is None else str(q) for q in quant)
    lines = [
        f"Worst-case accuracy (%) under LWC at th_g = {main:g} "
        f"({record['dataset']}, {record['model']}, {quant} bits, {len(record['seeds'])} seed(s), "
        f"{record['eval_samples']} test samples)",
    ]
    head = f"{'method':10} {'clean':>15} {'worst case':>15}"
    lines += [head, "-" * len(head)]
    for m in methods:
        lines.append(
            f"{LABELS.get(m, m):10} {_fmt(vals(m, 'test_accuracy')):>15} {_fmt(wc(m, main)):>15}"
        )
    lines.append("")
    lines.append("Worst-case accuracy (%) by write-verify bound th_g")
    head = f"{'th_g':>6} " + " ".join(f"{LABELS.get(m, m):>15}" for m in methods)
    lines += [head, "-" * len(head)]
    for t in th_gs:
        lines.append(f"{t:6g} " + " ".join(f"{_fmt(wc(m, t)):>15}" for m in methods))
    return "\n".join(lines)


def plot(record: dict, path: Path) -> None:
    """Worst-case accuracy against th_g, one line per method (Fig. 8), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    th_gs = record["th_g"]
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    for m in record["methods"]:
        rows = [r for r in record["runs"] if r["method"] == m]
        stats = [_mean_std([r["worst_case"][f"{t:g}"] for r in rows]) for t in th_gs]
        ax.errorbar(
            th_gs,
            [100 * s[0] for s in stats],
            yerr=[100 * s[1] for s in stats] if len(rows) > 1 else None,
            marker="^" if m == "atrice" else "o",
            linestyle="-" if m == "atrice" else "--",
            capsize=3,
            label=LABELS.get(m, m),
        )
    ax.set_xlabel("write-verify bound th_g (fraction of max|W|)")
    ax.set_ylabel("worst-case accuracy (LWC, %)")
    ax.set_title(f"{record['model']} / {record['dataset']}")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(a: argparse.Namespace) -> int:
    """The ``cimext compare`` command."""

    methods, th_gs, main, seeds = _check(a)
    lr = default_lr(a.dataset, a.lr)
    quant = C.quant(a.quant)
    wbits = quant[0] if quant and quant[0] else 8
    dev = C.device_model(weight_bits=wbits, bits_per_device=a.bits_per_device, sigma=a.sigma)
    C.check_out(a.out)
    C.build_model(a.dataset, a.model, a.root, quant=quant, device=dev)  # fails before training
    val = data.loader(a.dataset, "val", 1024, root=a.root)
    eval_data, test, eval_n = _eval_loader(a)
    progress = not a.quiet and distributed.is_main()
    t0 = time.perf_counter()
    runs = []
    total = len(methods) * len(seeds) * len(th_gs)
    # Resumable: an interrupted compare keeps its checkpoints, and the same command resumes.
    with C.output_folder(a.out, resumable=True) as out:
        bar = None
        if progress:
            bar = progress_bar(total=total, desc="compare (LWC evaluations)", leave=True)
        _train_all(a, out, methods, th_gs, seeds, quant, dev, lr, val, eval_data, test, bar, runs)
        record = dict(
            command="compare",
            dataset=a.dataset,
            model=a.model,
            quant=quant,
            methods=methods,
            th_g=th_gs,
            main_th_g=main,
            seeds=seeds,
            epochs=a.epochs,
            lr=lr,
            eval_samples=eval_n,
            lwc=dict(steps=a.lwc_steps, search_steps=a.search_steps),
            device_model=device_dict(dev),
            runs=runs,
            seconds=time.perf_counter() - t0,
            torch=torch.__version__,
        )
        if not distributed.is_main():
            return 0
        C.write_json(out / "compare.json", record)
        plot(record, out / "compare.png")
    print(tables(record))
    print(f"\nwritten: {a.out}/compare.json, compare.png ({record['seconds']:.0f} s)")
    return 0


def _train_all(a, out, methods, th_gs, seeds, quant, dev, lr, val, eval_data, test, bar, runs):
    """Train every (seed, method) and evaluate it with LWC at every th_g; rows into ``runs``."""
    progress = bar is not None
    try:
        for seed in seeds:
            for method in methods:
                t_m = time.perf_counter()
                train = data.loader(a.dataset, "train", a.batch_size, root=a.root, seed=seed)
                model = C.build_model(
                    a.dataset, a.model, a.root, quant=quant, device=dev, seed=seed
                )
                run_dir = out / "runs" / f"{method}-seed{seed}"
                res = fit(
                    model,
                    train,
                    val,
                    method,
                    epochs=a.epochs,
                    lr=lr,
                    sigma_t=a.sigma_t,
                    th_rcg=a.th_rcg,
                    seed=seed,
                    checkpoint_dir=run_dir / "checkpoints",
                    progress=progress,
                    **method_kwargs(a, method),
                )
                test_acc = accuracy(model, test)
                if distributed.is_main():
                    C.save_weights(model, run_dir / "model.safetensors")
                worst, eval_clean = {}, None
                for t in th_gs:
                    if bar is not None:
                        bar.set_postfix_str(f"{method} seed {seed} th_g {t:g}")
                    r = lwc(
                        model,
                        eval_data,
                        t,
                        steps=a.lwc_steps,
                        search_steps=a.search_steps,
                        progress=False,
                    )
                    worst[f"{t:g}"] = r.accuracy
                    eval_clean = r.clean_accuracy
                    if bar is not None:
                        bar.update(1)
                runs.append(
                    dict(
                        method=method,
                        seed=seed,
                        test_accuracy=test_acc,
                        eval_clean_accuracy=eval_clean,  # on the --eval-samples LWC runs on
                        val_metric=res.best_value,
                        best_epoch=res.best_epoch,
                        worst_case=worst,
                        train_seconds=res.seconds,
                        seconds=time.perf_counter() - t_m,
                        settings=res.settings,
                    )
                )
    finally:
        if bar is not None:
            bar.close()
