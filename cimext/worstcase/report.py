"""The worst-case report: run several methods on one model, tabulate them (the paper's Table I),
and write JSON plus the paper's figures.

:func:`analyze` runs any of Monte Carlo ("mc"), weight PGD ("pgd"), F-LWC ("flwc"), LWC ("lwc")
and the ensemble worst_case ("auto", the default analysis; its stages get rows of their own) at
one bound th_g or over an increasing sequence of bounds (a sweep: every worst-case method runs
warm-started from bound to bound, Monte Carlo at the largest), plus (``eta_sweep``) F-LWC over
several step sizes for the time / precision trade-off. :func:`write` puts into a folder:

- ``report.json``: the table, every result's figures and settings, the Monte Carlo accuracies,
  the confusion matrix and the per-layer statistics behind the figures;
- ``<method>/deltas.safetensors`` + ``result.json`` per worst-case method (WorstCaseResult.save);
- ``<method>/th_g-<bound>/`` per worst-case method and bound of a sweep, and ``fig8_th_g_sweep``
  (worst-case accuracy against th_g, one line per method: the paper's Fig. 8);
- PNG figures: ``fig1_mc_histogram`` (MC accuracies with the worst-case points), ``fig3_c_search``
  (worst-case error and L(ΔW) against c), ``fig4_confidence`` (confidence of correct and wrong
  predictions of the worst-case model), ``fig5_delta_histogram`` (|δ|/th_g),
  ``fig6_at_bound`` (share of weights at the bound per layer), ``table3_confusion`` (confusion
  matrix of the worst-case model), ``fig7_eta_tradeoff`` (F-LWC time and accuracy over eta);
- ``report.html`` (``html=True``): the table and every figure embedded, one self-contained file.

Everything is written into a hidden temporary folder first and moved into place at the end, so
an interrupted run leaves no half-written report.
"""

from __future__ import annotations

import base64
import html as html_mod
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._util import check_finite_weights, check_seed
from ..device import DeviceModel
from ..nn import clean, perturbation, require_cim_layers
from . import _common as C
from .auto import BUDGETS, worst_case
from .flwc import flwc
from .lwc import lwc
from .monte_carlo import monte_carlo
from .pgd import weight_pgd
from .results import WorstCaseResult

METHODS = ("mc", "pgd", "flwc", "lwc", "auto")
WORST_CASE_METHODS = ("pgd", "flwc", "lwc", "auto")
LABELS = {
    "mc": "Monte Carlo (min)",
    "pgd": "weight PGD",
    "flwc": "F-LWC",
    "lwc": "LWC",
    "auto": "auto (ensemble)",
}
# Relative slack for "at the bound": δ is stored in weight units (u·s), an ulp off th_g·s.
_AT_BOUND_RTOL = 1e-4


@dataclass
class Report:
    """What :func:`analyze` found: one WorstCaseResult per worst-case method (at the largest
    bound of a sweep), the Monte Carlo result, the th_g sweep (``sweep``: method -> one result
    per bound of ``th_gs``), the F-LWC eta sweep and the statistics of the worst of the
    worst-case models."""

    th_g: float
    clean_accuracy: float
    samples: int
    results: dict[str, WorstCaseResult] = field(default_factory=dict)
    monte_carlo: object | None = None  # MonteCarloResult
    eta_sweep: list[dict] = field(default_factory=list)
    th_gs: list[float] = field(default_factory=list)
    sweep: dict[str, list[WorstCaseResult]] = field(default_factory=dict)
    worst: str | None = None  # the method whose δ the model statistics below describe
    confusion: list[list[int]] = field(default_factory=list)
    confidence_correct: list[float] = field(default_factory=list)
    confidence_wrong: list[float] = field(default_factory=list)
    layer_stats: dict[str, dict] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def table(self) -> list[dict]:
        """Rows of the Table-I comparison: method, accuracy, seconds (clean first)."""
        rows = [dict(method="clean", label="clean", accuracy=self.clean_accuracy, seconds=None)]
        if self.monte_carlo is not None:
            mc = self.monte_carlo
            rows.append(
                dict(
                    method="mc",
                    label=f"Monte Carlo min of {mc.n}",
                    accuracy=mc.min,
                    seconds=mc.seconds,
                    mean=mc.mean,
                    std=mc.std,
                )
            )
        for m in WORST_CASE_METHODS:
            if m in self.results:
                r = self.results[m]
                rows.append(dict(method=m, label=LABELS[m], accuracy=r.accuracy, seconds=r.seconds))
                for st in r.settings.get("stages", []) if m == "auto" else []:
                    rows.append(
                        dict(
                            method=f"auto:{st['stage']}",
                            label=f"  stage {st['stage']}",
                            accuracy=st["accuracy"],
                            seconds=st["seconds"],
                        )
                    )
        return rows

    def sweep_table(self) -> list[dict]:
        """One row per bound of a th_g sweep: th_g and each method's accuracy."""
        return [
            dict(
                th_g=th,
                **{m: rs[i].accuracy for m, rs in self.sweep.items()},
                seconds={m: rs[i].seconds for m, rs in self.sweep.items()},
            )
            for i, th in enumerate(self.th_gs)
        ]

    def format_table(self) -> str:
        """The Table-I comparison as aligned text."""
        lines = [f"worst case at th_g = {self.th_g:g} over {self.samples} samples"]
        head = f"{'method':<26} {'accuracy':>9} {'time (s)':>9}"
        lines += [head, "-" * len(head)]
        for r in self.table():
            t = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
            lines.append(f"{r['label']:<26} {100 * r['accuracy']:>8.2f}% {t:>9}")
            if r["method"] == "mc":
                lines.append(
                    f"{'  (mean ± std)':<26} {100 * r['mean']:>8.2f}% ± {100 * r['std']:.2f}"
                )
        if len(self.th_gs) > 1:
            methods = list(self.sweep)
            lines += ["", "th_g sweep (warm-started, accuracy non-increasing in th_g)"]
            head = f"{'th_g':>8} " + " ".join(f"{LABELS[m]:>16}" for m in methods)
            lines += [head, "-" * len(head)]
            for row in self.sweep_table():
                lines.append(
                    f"{row['th_g']:>8g} " + " ".join(f"{100 * row[m]:>15.2f}%" for m in methods)
                )
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        mc = None if self.monte_carlo is None else json.loads(self.monte_carlo.to_json())
        return dict(
            kind="worst_case_report",
            th_g=self.th_g,
            clean_accuracy=self.clean_accuracy,
            samples=self.samples,
            table=self.table(),
            results={m: json.loads(r.to_json()) for m, r in self.results.items()},
            monte_carlo=mc,
            eta_sweep=self.eta_sweep,
            th_gs=self.th_gs,
            sweep_table=self.sweep_table() if self.sweep else [],
            sweep={m: [json.loads(r.to_json()) for r in rs] for m, rs in self.sweep.items()},
            worst=self.worst,
            confusion=self.confusion,
            confidence=dict(
                correct_mean=_mean(self.confidence_correct),
                wrong_mean=_mean(self.confidence_wrong),
                correct=self.confidence_correct,
                wrong=self.confidence_wrong,
            ),
            layer_stats=self.layer_stats,
            settings=self.settings,
            seconds=self.seconds,
            warnings=self.warnings,
        )


def _mean(v: list[float]) -> float | None:
    return sum(v) / len(v) if v else None


def check_methods(methods) -> tuple[str, ...]:
    """Normalize a method list ("all", names from METHODS, or one comma-separated string of
    them); raises ValueError naming the bad one."""
    if isinstance(methods, str):
        methods = METHODS if methods == "all" else [m.strip() for m in methods.split(",")]
    out = []
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)} or 'all', got {m!r}")
        if m not in out:
            out.append(m)
    if not out:
        raise ValueError("methods is empty")
    return tuple(out)


def analyze(
    model: nn.Module,
    data,
    *,
    th_g=0.03,
    methods=METHODS,
    mc_n: int = 10_000,
    mc_device=None,
    seed: int = 0,
    eta: float | None = None,
    eta_sweep: tuple[float, ...] | None = (1.0, 0.5, 0.25, 0.1, 0.05),
    lwc_kwargs: dict | None = None,
    pgd_kwargs: dict | None = None,
    budget: str = "default",
    progress: bool = True,
    log=None,
) -> Report:
    """Run ``methods`` on a converted ``model`` over ``data`` at bound ``th_g``.

    ``th_g``: a number, or an increasing sequence of numbers (a sweep: every worst-case method
    returns one result per bound, warm-started in order; Monte Carlo, the eta sweep and the
    model statistics use the largest bound).
    mc: ``mc_n`` instances of ``mc_device`` (default: the devices of the model's first layer
    (weight bits, bits per device, σ), every one write-verified to th_g with
    ``DeviceModel.verified``, as the paper compares them).
    pgd: weight_pgd(eps=th_g). flwc: flwc(th_g, eta). lwc: lwc(th_g, **lwc_kwargs).
    auto: worst_case(th_g, budget=``budget``, seed=``seed``), the default analysis.
    ``eta_sweep``: fractions of th_g for the F-LWC time / precision sweep (Fig. 7), run when
    flwc is among the methods (None or () skips it). ``log``: a callable given one line per
    finished step (e.g. print). Returns a :class:`Report`.
    """

    methods = check_methods(methods)
    named = require_cim_layers(model, "analyze")
    seed = check_seed(seed)
    check_finite_weights(model, "analyze")
    spec = C.parse_th_g(th_g, named, "analyze")
    if spec.kind == "dict":
        raise TypeError(
            "analyze: th_g must be a number or an increasing sequence (per-layer bounds: call "
            "cimext.worstcase.worst_case directly)"
        )
    th_gs = list(spec.value) if spec.kind == "sweep" else [spec.value]
    th_run = th_gs if spec.kind == "sweep" else th_gs[0]
    th_top = th_gs[-1]
    if "mc" in methods:
        if isinstance(mc_n, bool) or not isinstance(mc_n, int) or mc_n < 1:
            raise ValueError(f"mc_n must be an int >= 1, got {mc_n!r}")
        if mc_device is None:
            base = getattr(named[0][1], "device", None) or DeviceModel()
            mc_device = DeviceModel.verified(
                th_top,
                weight_bits=base.weight_bits,
                bits_per_device=base.bits_per_device,
                sigma=base.sigma,
            )
        elif not isinstance(mc_device, DeviceModel):
            raise TypeError(f"mc_device must be a cimext.DeviceModel, got {mc_device!r}")
    if eta is not None:
        C.check_positive("eta", eta, upper=th_gs[0], upper_name="th_g")
    if "auto" in methods and budget not in BUDGETS:
        raise ValueError(f"budget must be one of {', '.join(map(repr, BUDGETS))}, got {budget!r}")
    say = log or (lambda s: None)
    batches = C._batches(data, named[0][1].weight.device, "analyze")  # read the data once
    t0 = time.perf_counter()
    rep = Report(th_g=th_top, clean_accuracy=0.0, samples=sum(int(y.numel()) for _, y in batches))
    rep.th_gs = th_gs
    rep.settings = dict(
        methods=list(methods),
        mc_n=mc_n if "mc" in methods else None,
        seed=seed,
        th_g=th_gs if spec.kind == "sweep" else th_top,
        budget=budget if "auto" in methods else None,
    )
    if "mc" in methods:
        mc = monte_carlo(model, batches, mc_device, mc_n, seed=seed, progress=progress)
        rep.monte_carlo, rep.clean_accuracy = mc, mc.clean_accuracy
        rep.settings["mc_device"] = mc.device
        say(f"monte carlo: min {100 * mc.min:.2f}% mean {100 * mc.mean:.2f}% ({mc.seconds:.1f} s)")
    runs = dict(
        pgd=lambda: weight_pgd(model, batches, th_run, progress=progress, **(pgd_kwargs or {})),
        flwc=lambda: flwc(model, batches, th_run, eta, progress=progress),
        lwc=lambda: lwc(model, batches, th_run, progress=progress, **(lwc_kwargs or {})),
        auto=lambda: worst_case(
            model, batches, th_run, budget=budget, seed=seed, progress=progress
        ),
    )
    for m in WORST_CASE_METHODS:
        if m in methods:
            out = runs[m]()
            rs = out if isinstance(out, list) else [out]
            if len(th_gs) > 1:
                rep.sweep[m] = rs
            r = rs[-1]
            rep.results[m], rep.clean_accuracy = r, r.clean_accuracy
            if r.warning and r.warning not in rep.warnings:
                rep.warnings.append(r.warning)
            say(f"{LABELS[m]}: {100 * r.accuracy:.2f}% ({sum(x.seconds for x in rs):.1f} s)")
    if "flwc" in methods and eta_sweep:
        for frac in eta_sweep:
            e = th_top * float(frac)
            r = flwc(model, batches, th_top, e, progress=False)
            rep.eta_sweep.append(
                dict(eta=e, eta_over_th_g=float(frac), accuracy=r.accuracy, seconds=r.seconds)
            )
        say(
            "F-LWC eta sweep: "
            + ", ".join(
                f"{d['eta_over_th_g']:g}: {100 * d['accuracy']:.1f}%" for d in rep.eta_sweep
            )
        )
    if rep.results:
        rep.worst = min(rep.results, key=lambda m: rep.results[m].accuracy)
        _model_stats(rep, model, batches, rep.results[rep.worst])
    rep.seconds = time.perf_counter() - t0
    return rep


@torch.no_grad()
def _model_stats(rep: Report, model: nn.Module, batches, res: WorstCaseResult) -> None:
    """Confusion matrix and confidences of the model under ``res``'s δ, and per-layer δ
    statistics (Fig. 4, 5, 6, Table III)."""

    dev = next(model.parameters()).device
    deltas = {n: d.to(dev) for n, d in res.deltas.items()}
    was_training = model.training
    model.eval()
    conf_ok, conf_bad, cm = [], [], None
    try:
        with clean(model), perturbation(model, deltas):
            for x, y in batches:
                prob = torch.softmax(model(x).float(), -1)
                c, pred = prob.max(-1)
                ok = pred == y
                conf_ok += c[ok].tolist()
                conf_bad += c[~ok].tolist()
                k = prob.shape[-1]
                if cm is None:
                    cm = torch.zeros(k, k, dtype=torch.int64)
                cm += torch.bincount((y * k + pred).cpu(), minlength=k * k).view(k, k)
    finally:
        model.train(was_training)
    rep.confusion = cm.tolist()
    rep.confidence_correct, rep.confidence_wrong = conf_ok, conf_bad
    th = res.th_g
    edges = torch.linspace(0, 1, 21)
    for n, d in res.deltas.items():
        u = (d.abs().double() / res.scales[n]).flatten()
        r = (u / th).clamp(max=1.0)
        hist = torch.histc(r, bins=20, min=0.0, max=1.0)
        rep.layer_stats[n] = dict(
            weights=int(u.numel()),
            at_bound=float((u >= th * (1 - _AT_BOUND_RTOL)).double().mean()) if u.numel() else 0,
            mean_abs_over_th_g=float(r.mean()) if u.numel() else 0.0,
            histogram=hist.long().tolist(),
            histogram_edges=edges.tolist(),
        )


# --------------------------------------------------------------------------------------- files
def write(rep: Report, out: str | os.PathLike, *, html: bool = False, extra: dict | None = None):
    """Write the report into folder ``out`` (JSON, δ per method, PNG figures, optional HTML).
    ``extra`` is merged into report.json (e.g. the model's training record). Returns the list
    of files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    try:
        d = rep.to_dict()
        if extra:
            d.update(extra)
        (tmp / "report.json").write_text(json.dumps(d, indent=1))
        for m, r in rep.results.items():
            r.save(tmp / m)
        for m, rs in rep.sweep.items():
            for th, r in zip(rep.th_gs, rs, strict=True):
                r.save(tmp / m / f"th_g-{th:g}")
        figs = figures(rep, tmp)
        if html:
            (tmp / "report.html").write_text(_html(rep, tmp, figs, extra or {}))
        written = []
        for p in sorted(tmp.iterdir()):
            dst = out / p.name
            if dst.is_dir():
                shutil.rmtree(dst)
            os.replace(p, dst)
            written.append(dst)
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def figures(rep: Report, folder: Path) -> list[Path]:
    """Draw the paper's figures for what the report holds into ``folder``; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[Path] = []

    def save(fig, name):
        p = folder / f"{name}.png"
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)

    colors = dict(pgd="tab:orange", flwc="tab:green", lwc="tab:red", auto="tab:purple")
    mc = rep.monte_carlo
    if mc is not None:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        acc = [100 * a for a in mc.accuracies]
        ax.hist(acc, bins=40, color="tab:blue", alpha=0.7, label=f"Monte Carlo, {mc.n} instances")
        for m, r in rep.results.items():
            ax.axvline(100 * r.accuracy, color=colors[m], ls="--", label=f"{LABELS[m]}")
        ax.set_xlabel("accuracy (%)")
        ax.set_ylabel("instances")
        ax.set_title(f"Fig. 1: accuracy under device variation, th_g = {rep.th_g:g}")
        ax.legend(fontsize=8)
        save(fig, "fig1_mc_histogram")
    lw = rep.results.get("lwc")
    if lw is not None and lw.history and "c" in lw.history[0]:
        h = sorted(lw.history, key=lambda e: e["c"])
        cs = [e["c"] for e in h]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.4))
        a1.plot(cs, [100 * (1 - e["accuracy_clamped"]) for e in h], "o-", color="tab:red")
        a1.set_xscale("log")
        a1.set_xlabel("c")
        a1.set_ylabel("worst-case error (%)")
        a2.plot(cs, [e["max_perturbation"] for e in h], "o-", color="tab:purple")
        a2.axhline(rep.th_g, color="k", ls=":", label="th_g")
        a2.set_xscale("log")
        a2.set_xlabel("c")
        a2.set_ylabel("L(ΔW) (fraction of full scale)")
        a2.legend(fontsize=8)
        fig.suptitle("Fig. 3: the binary search on c")
        save(fig, "fig3_c_search")
    if rep.worst is not None:
        name = LABELS[rep.worst]
        fig, ax = plt.subplots(figsize=(6, 3.4))
        bins = torch.linspace(0, 1, 21).tolist()
        if rep.confidence_correct:
            ax.hist(
                rep.confidence_correct,
                bins=bins,
                alpha=0.6,
                color="tab:green",
                label=f"correct (mean {_mean(rep.confidence_correct):.2f})",
            )
        if rep.confidence_wrong:
            ax.hist(
                rep.confidence_wrong,
                bins=bins,
                alpha=0.6,
                color="tab:red",
                label=f"wrong (mean {_mean(rep.confidence_wrong):.2f})",
            )
        ax.set_xlabel("confidence (max softmax)")
        ax.set_ylabel("samples")
        ax.set_title(f"Fig. 4: confidence of the worst-case model ({name})")
        ax.legend(fontsize=8)
        save(fig, "fig4_confidence")

        fig, ax = plt.subplots(figsize=(6, 3.4))
        total = None
        for st in rep.layer_stats.values():
            h = torch.tensor(st["histogram"], dtype=torch.float64)
            total = h if total is None else total + h
        if total is not None:
            centers = [(i + 0.5) / 20 for i in range(20)]
            ax.bar(
                centers, (total / total.sum().clamp(min=1)).tolist(), width=0.05, color="tab:purple"
            )
        ax.set_xlabel("|δ| / th_g")
        ax.set_ylabel("share of weights")
        ax.set_title(f"Fig. 5: perturbation magnitudes ({name})")
        save(fig, "fig5_delta_histogram")

        fig, ax = plt.subplots(figsize=(6, 3.4))
        names = list(rep.layer_stats)
        ax.bar(
            range(len(names)),
            [100 * rep.layer_stats[n]["at_bound"] for n in names],
            color="tab:brown",
        )
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("weights at ±th_g (%)")
        ax.set_title(f"Fig. 6: share of weights at the bound per layer ({name})")
        save(fig, "fig6_at_bound")

        k = len(rep.confusion)
        fig, ax = plt.subplots(figsize=(4.6, 4))
        cm = torch.tensor(rep.confusion, dtype=torch.float64)
        ax.imshow(cm.tolist(), cmap="Reds")
        for i in range(k):
            for j in range(k):
                if k <= 12:
                    ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=6)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"Table III: confusion of the worst-case model ({name})", fontsize=9)
        save(fig, "table3_confusion")
    if rep.sweep:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for m, rs in rep.sweep.items():
            ax.plot(
                rep.th_gs,
                [100 * r.accuracy for r in rs],
                "o-",
                color=colors.get(m),
                label=LABELS[m],
            )
        if mc is not None:
            ax.plot([rep.th_g], [100 * mc.min], "s", color="tab:blue", label=f"MC min of {mc.n}")
        ax.set_xlabel("th_g (fraction of each layer's full scale)")
        ax.set_ylabel("worst-case accuracy (%)")
        ax.set_title("Fig. 8: worst-case accuracy against the bound th_g")
        ax.legend(fontsize=8)
        save(fig, "fig8_th_g_sweep")
    if rep.eta_sweep:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        xs = [e["seconds"] for e in rep.eta_sweep]
        ys = [100 * e["accuracy"] for e in rep.eta_sweep]
        ax.plot(xs, ys, "o-", color="tab:green", label="F-LWC")
        for e, x, y in zip(rep.eta_sweep, xs, ys, strict=True):
            ax.annotate(
                f"η={e['eta_over_th_g']:g}·th_g",
                (x, y),
                fontsize=7,
                textcoords="offset points",
                xytext=(4, 4),
            )
        if lw is not None:
            ax.plot([lw.seconds], [100 * lw.accuracy], "s", color="tab:red", label="LWC")
        ax.set_xscale("log")
        ax.set_xlabel("time (s)")
        ax.set_ylabel("worst-case accuracy (%)")
        ax.set_title("Fig. 7: F-LWC time / precision over η")
        ax.legend(fontsize=8)
        save(fig, "fig7_eta_tradeoff")
    return made


def _html(rep: Report, folder: Path, figs: list[Path], extra: dict) -> str:
    esc = html_mod.escape

    def cell(seconds):
        return "" if seconds is None else f"{seconds:.1f}"

    rows = "".join(
        f"<tr><td>{esc(r['label'])}</td><td>{100 * r['accuracy']:.2f}%</td>"
        f"<td>{cell(r['seconds'])}</td></tr>"
        for r in rep.table()
    )
    imgs = "".join(
        f"<figure><img src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}'"
        f" alt='{esc(p.stem)}'><figcaption>{esc(p.stem)}</figcaption></figure>"
        for p in figs
    )
    model = extra.get("model_record") or {}
    about = ""
    if model:
        about = (
            f"<p>Model: {esc(str(model.get('model')))} on {esc(str(model.get('dataset')))}, "
            f"quantization {esc(str(model.get('quant')))}, test accuracy "
            f"{100 * float(model.get('test_accuracy', 0)):.2f}%.</p>"
        )
    warn = "".join(f"<p class='warn'>warning: {esc(w)}</p>" for w in rep.warnings)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>cimext worst-case report</title>
<style>body{{font-family:sans-serif;max-width:980px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px}}
figure{{display:inline-block;margin:8px}}img{{max-width:460px}}.warn{{color:#a00}}</style>
</head><body>
<h1>Worst-case analysis at th_g = {rep.th_g:g}</h1>
{about}{warn}
<table><tr><th>method</th><th>accuracy</th><th>time (s)</th></tr>{rows}</table>
<p>{rep.samples} samples; total {rep.seconds:.1f} s. Figures follow the paper's numbering.</p>
{imgs}
</body></html>
"""
