"""The paper's studies on one data set over several seeds, resumable: :func:`reproduce`.

Per seed (the model initialization and training-data order), on LeNet with 4-bit weights and
inputs unless the plan says otherwise:

- ``training``: vanilla, VA, TRICE, adversarial and A-TRICE training (Tables V/VI, Fig. 8), each
  model's clean accuracy on the whole test set and its worst case (:func:`worst_case`, a
  warm-started sweep over ``th_gs``) on a fixed subset of the test set;
- ``worst-case``: on the vanilla model at ``th_g`` (Tables I and IV): the minimum accuracy of
  ``mc_n`` write-verified Monte Carlo instances, weight PGD, F-LWC, LWC and the ensemble, with
  their times;
- ``write-verify``: U-SWIM vs SWIM vs magnitude vs random selective write-verify on the vanilla
  model, pulses saved at <= 0.5 points accuracy loss, over device sigma, uniform and
  non-uniform level sigma;
- ``bitflip``: bit-flip midpoints (flip probability at half the accuracy drop) of a float LeNet
  stored as float32, float16 (all bits), float32 exponent or mantissa bits only, and int8.

Every piece of work is a *unit* (one training run, one sweep, one Monte Carlo block, ...) whose
result is written to ``<folder>/cache/units/<key>.json`` with the settings that produced it. A
later call with the same settings reuses finished units, so a killed run resumes where it
stopped; a unit whose settings changed is recomputed. A unit that raises is recorded as failed
(``<key>.failed.json``), the units that need it are skipped, and every other study still runs;
the results mark what failed. Trained models are kept under ``<folder>/cache/models``.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from . import data, zoo
from ._util import atomic_write as _atomic_write
from ._util import device_dict
from ._util import progress as _progress
from .device import DeviceModel
from .train import DEFAULT_LR, accuracy, fit

PARTS = ("training", "worst-case", "write-verify", "bitflip")
METHODS = ("vanilla", "va", "trice", "adv", "atrice")
LABELS = {
    "vanilla": "vanilla",
    "va": "VA",
    "trice": "TRICE",
    "adv": "adversarial",
    "atrice": "A-TRICE",
}
WC_METHODS = ("pgd", "flwc", "lwc", "auto")
BITFLIP_CASES = {  # JSON key -> (storage dtype, bit set)
    "float32": ("float32", "all"),
    "float16": ("float16", "all"),
    "exponent_only": ("float32", "exponent"),
    "mantissa_only": ("float32", "mantissa"),
    "int8": ("int8", "all"),
}
WV_METHODS = ("uswim", "swim", "magnitude", "random")

# A-TRICE settings chosen on the validation split (scripts/tune_atrice.py,
# results/atrice-tuning.json, configuration pgd3_a0.7_b0.06_e4_lr0.001); never on the test set:
# 4 epochs fine-tuning the vanilla model of the same seed, 3 sign steps of 0.025 from a random
# start inside a training bound of 0.06.
ATRICE_SETTINGS: dict = dict(
    init="vanilla",
    epochs=4,
    lr=1e-3,
    alpha=0.7,
    th_g=0.06,
    step_size=0.025,
    adv_steps=3,
    random_start=True,
)


def plan(
    dataset: str = "fashion-mnist",
    *,
    quick: bool = False,
    seeds: Sequence[int] | None = None,
    parts: Sequence[str] = PARTS,
    **overrides,
) -> dict:
    """The settings of a reproduction: the full run, or ``quick`` (a pipeline check in minutes:
    one seed, one epoch, few images and instances). ``overrides`` replace top-level entries
    (e.g. ``eval_images=1000``, ``mc_n=2000``). Raises ValueError naming a bad entry."""

    if dataset not in data.DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(data.DATASETS)}")
    parts = list(parts)
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ValueError(f"parts must name some of {', '.join(PARTS)}; got {parts}")
    p = dict(
        dataset=dataset,
        model="lenet",
        quant=[4, 4],
        seeds=[0] if quick else [0, 1, 2],
        parts=[x for x in PARTS if x in parts],
        th_g=0.03,
        th_gs=[0.01, 0.02, 0.03, 0.04],
        eval_images=300 if quick else 2000,
        epochs=1 if quick else 10,
        batch_size=128,
        lr=DEFAULT_LR.get(dataset, DEFAULT_LR["default"]),
        methods={
            "vanilla": {},
            "va": {},  # the layers' devices: sigma 0.1 per level
            "trice": dict(sigma_t=0.1, th_rcg=1.0),
            "adv": dict(th_g=0.03, step_size=0.03, adv_steps=1),
            "atrice": dict(ATRICE_SETTINGS),
        },
        mc_n=200 if quick else 10_000,
        mc_block=100 if quick else 2_000,
        budget="fast" if quick else "default",
        sweep_budget="fast",
        write_verify=dict(
            sigmas=[0.1, 0.5] if quick else [0.1, 0.2, 0.3, 0.4, 0.5],
            level_sigma=[0.5, 1.5, 1.5, 0.5],
            instances=2 if quick else 8,
            calib=256 if quick else 1024,
            methods=list(WV_METHODS),
        ),
        bitflip=dict(cases=list(BITFLIP_CASES), noise_seeds=1 if quick else 3, tol=0.2),
        quick=bool(quick),
    )
    if seeds is not None:
        seeds = [int(s) for s in seeds]
        if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct integers >= 0, got {seeds}")
        p["seeds"] = seeds
    for k, v in overrides.items():
        if k not in p:
            raise ValueError(f"unknown plan entry {k!r}; valid: {', '.join(sorted(p))}")
        p[k] = v
    for k in ("eval_images", "epochs", "mc_n", "mc_block", "batch_size"):
        if isinstance(p[k], bool) or not isinstance(p[k], int) or p[k] < 1:
            raise ValueError(f"{k} must be an int >= 1, got {p[k]!r}")
    return p


def atomic_write(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a reader sees the old file or the new one)."""
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# ----------------------------------------------------------------------------------- units
class _Failed(Exception):
    """A unit that failed (or needs one that did); the message says which and why."""


class Units:
    """Runs and caches the units of a reproduction under ``root / "cache"``."""

    def __init__(self, root: Path, log: Callable[[str], None] = print):
        self.root = Path(root)
        self.dir = self.root / "cache" / "units"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.failed: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self.reused: list[str] = []

    def __call__(self, key: str, settings: dict, fn: Callable[[], dict], needs=()) -> dict:
        """The result of unit ``key``: from the cache when it was computed with ``settings``,
        else ``fn()`` (saved). Raises _Failed when it or a unit in ``needs`` failed."""
        if key in self.failed:  # failed earlier in this run: do not spend the time again
            raise _Failed(self.failed[key])
        missing = [n for n in needs if n in self.failed]
        if missing:
            self.failed[key] = f"needs {', '.join(missing)}, which failed"
            raise _Failed(self.failed[key])
        settings = json.loads(json.dumps(settings))  # as it reads back from the file
        path, bad = self.dir / f"{key}.json", self.dir / f"{key}.failed.json"
        try:
            rec = json.loads(path.read_text())
            if rec.get("settings") == settings:
                self.seconds[key] = rec["seconds"]
                self.reused.append(key)
                return rec["result"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        self.log(f"-- {key}")
        t0 = time.perf_counter()
        try:
            result = fn()
        except (KeyboardInterrupt, _Failed):
            raise
        except Exception as e:  # one study's failure must not take the others down
            first = (str(e).strip().splitlines() or [""])[0]
            msg = f"{type(e).__name__}: {first}"
            self.failed[key] = msg
            atomic_write(
                bad,
                json.dumps(dict(key=key, error=msg, traceback=traceback.format_exc()), indent=1),
            )
            self.log(f"   FAILED {key}: {msg}")
            raise _Failed(msg) from None
        sec = time.perf_counter() - t0
        self.seconds[key] = sec
        rec = dict(key=key, settings=settings, seconds=sec, result=result)
        atomic_write(path, json.dumps(rec, indent=1, allow_nan=True))
        bad.unlink(missing_ok=True)
        self.log(f"   {key}: {sec:.1f} s")
        return result


# ----------------------------------------------------------------------------------- data
def _eval_batches(p: dict, batch: int = 500) -> list:
    """The first ``eval_images`` test images as fixed batches (the same for every study)."""
    ds = data.load(p["dataset"], "test")
    n = min(p["eval_images"], len(ds))
    x, y = ds.tensors[0][:n], ds.tensors[1][:n]
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def _calib_batches(p: dict, seed: int, n: int, batch: int = 256) -> list:
    ds = data.load(p["dataset"], "train", seed=seed)
    x, y = ds.tensors[0][:n], ds.tensors[1][:n]
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(y), batch)]


# ----------------------------------------------------------------------------------- training
def _train_settings(p: dict, method: str, seed: int, quant) -> dict:
    """A training unit's settings. A method's entry in ``p["methods"]`` may carry ``epochs`` and
    ``lr`` (its own) and ``init`` (the method whose model of the same seed it starts from, e.g.
    A-TRICE fine-tuning the vanilla model); the rest are fit() keywords."""
    ms = dict(p["methods"].get(method, {}))
    epochs, lr, init = ms.pop("epochs", p["epochs"]), ms.pop("lr", p["lr"]), ms.pop("init", None)
    return dict(
        dataset=p["dataset"],
        model=p["model"],
        quant=quant,
        method=method,
        seed=seed,
        epochs=epochs,
        batch_size=p["batch_size"],
        lr=lr,
        method_settings=ms,
        init=None if init is None else _train_settings(p, init, seed, quant),
    )


def _model_name(s: dict) -> str:
    return f"{'float-' if s['quant'] is None else ''}{s['method']}-seed{s['seed']}"


def _model_dir(root: Path, name: str) -> Path:
    return root / "cache" / "models" / name


def _train(root: Path, s: dict, name: str, progress: bool) -> dict:
    """Train one model as ``s`` says, save it under cache/models/``name``; its record."""
    quant = tuple(s["quant"]) if s["quant"] else None
    net = zoo.build(s["dataset"], s["model"], quant, seed=s["seed"])
    if s["init"] is not None:  # fine-tune a model trained before (its unit ran first)
        net.load_state_dict(_load(root, _model_name(s["init"])).state_dict())
    # One train / val split for every seed (drawn with seed 0, as data.loader's "val" is): the
    # seed initializes the model and shuffles the batches. Splitting with the seed would put
    # the val images that pick the best epoch into other seeds' training data.
    train = torch.utils.data.DataLoader(
        data.load(s["dataset"], "train", seed=0),
        batch_size=s["batch_size"],
        shuffle=True,
        generator=torch.Generator().manual_seed(s["seed"]),
    )
    val = data.loader(s["dataset"], "val", 1024)
    test = data.loader(s["dataset"], "test", 1024)
    kw = dict(s["method_settings"])
    res = fit(
        net,
        train,
        val,
        s["method"],
        epochs=s["epochs"],
        lr=s["lr"],
        seed=s["seed"],
        checkpoint_dir=root / "cache" / "checkpoints" / name,
        progress=progress,
        **kw,
    )
    record = dict(
        command="reproduce",
        dataset=s["dataset"],
        model=s["model"],
        quant=s["quant"],
        method=s["method"],
        device_model=device_dict(zoo.cim_device(net)),
        test_accuracy=accuracy(net, test),
        val_accuracy=res.best_value,
        best_epoch=res.best_epoch,
        train_seconds=res.seconds,
        settings=s,
    )
    zoo._save_atomic(net, record, _model_dir(root, name))
    if not (_model_dir(root, name) / "model.safetensors").is_file():
        raise OSError(f"could not write the model to {_model_dir(root, name)}")
    return record


def _load(root: Path, name: str):
    net, _ = zoo.load_run(_model_dir(root, name))
    return net.eval()


def _model(units: Units, root: Path, p: dict, method: str, seed: int, progress: bool, quant="p"):
    """(unit key, record) of the trained model, training it when needed."""
    q = p["quant"] if quant == "p" else quant
    s = _train_settings(p, method, seed, q)
    name = _model_name(s)
    key = f"train-{name}"
    needs = []
    if s["init"] is not None:
        needs.append(_model(units, root, p, s["init"]["method"], seed, progress, q)[0])
    rec = units(key, s, lambda: _train(root, s, name, progress), needs=needs)
    if not (_model_dir(root, name) / "model.safetensors").is_file():
        # The record survived but the weights did not (a damaged cache): train again.
        (units.dir / f"{key}.json").unlink(missing_ok=True)
        rec = units(key, s, lambda: _train(root, s, name, progress), needs=needs)
    return key, rec


# ----------------------------------------------------------------------------------- studies
def _sweep(net, batches, p: dict, progress: bool) -> dict:
    from .worstcase import worst_case

    rs = worst_case(net, batches, list(p["th_gs"]), budget=p["sweep_budget"], progress=progress)
    return dict(
        clean_subset=rs[0].clean_accuracy,
        worst=[r.accuracy for r in rs],
        worst_seconds=sum(r.seconds for r in rs),
    )


def _mc_block(net, batches, p: dict, seed: int, start: int, n: int, progress: bool) -> dict:
    from .worstcase import monte_carlo

    base = zoo.cim_device(net)
    dev = DeviceModel.verified(
        p["th_g"],
        weight_bits=base.weight_bits,
        bits_per_device=base.bits_per_device,
        sigma=base.sigma,
    )
    # Table I has the clean accuracy; a block needs only its instances' accuracies.
    r = monte_carlo(
        net, batches, dev, n, seed=seed, start=start, progress=progress, clean_accuracy=False
    )
    return dict(accuracies=[float(a) for a in r.accuracies])


def _table1(net, batches, p: dict, progress: bool) -> dict:
    from .worstcase import report

    rep = report.analyze(
        net,
        batches,
        th_g=p["th_g"],
        methods=WC_METHODS,
        budget=p["budget"],
        eta_sweep=None,
        progress=progress,
    )
    return dict(
        clean=rep.clean_accuracy,
        accuracy={m: rep.results[m].accuracy for m in WC_METHODS},
        seconds={m: rep.results[m].seconds for m in WC_METHODS},
        stages=rep.results["auto"].settings.get("stages", []),
    )


def _write_verify(net, calib, batches, p: dict, seed: int, progress: bool) -> dict:
    """cimext.writeverify.speedup_study on the model: speedups per method over sigma, uniform
    and non-uniform level sigma (th = sigma / 10, device granularity)."""
    from .writeverify.study import speedup_study

    w = p["write_verify"]
    r = speedup_study(
        net,
        calib,
        batches,
        sigmas=w["sigmas"],
        level_sigma=w["level_sigma"],
        methods=w["methods"],
        instances=w["instances"],
        seed=seed,
        progress=progress,
    )
    out = dict(settings=r["settings"], clean=r["clean_accuracy"], seconds=r["seconds"])
    for kind, key in (("uniform", "uniform"), ("non-uniform", "non_uniform")):
        rows = r[kind]
        out[key] = dict(
            unverified=rows["accuracy_unverified"],
            full=rows["accuracy_full"],
            **{f"{m}_speedup": rows[f"{m}_speedup"] for m in w["methods"]},
            **{f"{m}_fraction": rows[f"{m}_fraction"] for m in w["methods"]},
        )
    return out


def _bitflip(net, batches, p: dict, progress: bool) -> dict:
    from .bitflip.study import evaluate, midpoint

    b = p["bitflip"]
    seeds = list(range(b["noise_seeds"]))
    mids, above = {}, {}
    for case in b["cases"]:
        dtype, bits = BITFLIP_CASES[case]
        m = midpoint(net, batches, dtype=dtype, bits=bits, seeds=seeds, tol=b["tol"])
        # inf: still above half the drop at p = 0.5 (e.g. mantissa bits only); JSON has no inf
        mids[case] = m if math.isfinite(m) else None
        above[case] = not math.isfinite(m)
    return dict(clean=evaluate(net, batches)[0], midpoint=mids, above_max_p=above)


# ----------------------------------------------------------------------------------- driver
def reproduce(
    folder: str | Path,
    settings: dict | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the studies of ``settings`` (:func:`plan`; default: the full Fashion-MNIST plan) in
    ``folder``, reusing the finished units found there, and return the results (also written
    as ``results.json``, ``results.md`` and the figures ``fig8.png`` / ``write_verify.png``).

    The results hold, per seed (lists in seed order): ``worst_case`` (Table I: clean, mc_min,
    mc_n, pgd, flwc, lwc, auto, seconds), ``training`` (per method: clean on the whole test set
    and the worst case at every th_g), ``write_verify`` (speedups over sigma) and ``bitflip``
    (midpoints); ``failed`` maps each failed unit to its error."""

    p = plan() if settings is None else settings
    root = Path(folder)
    units = Units(root, log)
    t0 = time.perf_counter()
    batches = _eval_batches(p)
    seeds = p["seeds"]
    res: dict = {s: {} for s in seeds}
    parts = p["parts"]
    total = len(seeds) * len(parts)
    bar = _progress(total=total, desc="reproduce (seed x study)", enabled=progress, leave=True)

    def attempt(seed, part):
        try:
            res[seed][part] = _part(units, root, p, part, seed, batches, progress)
        except _Failed:
            res[seed][part] = None
        bar.update(1)

    try:
        for seed in seeds:
            bar.set_postfix_str(f"seed {seed}")
            for part in parts:
                attempt(seed, part)
    finally:
        bar.close()
    results = assemble(p, res, units)
    results["wall_seconds"] = time.perf_counter() - t0
    write(root, results)
    return results


def _part(units: Units, root: Path, p: dict, part: str, seed: int, batches, progress) -> dict:
    """One study for one seed; raises _Failed when everything in it failed."""
    pb = progress  # inner bars only when the caller asked for progress
    if part == "training":
        out = {}
        for m in METHODS:
            try:
                key, rec = _model(units, root, p, m, seed, pb)
                s = dict(
                    model=_train_settings(p, m, seed, p["quant"]),
                    th_gs=p["th_gs"],
                    budget=p["sweep_budget"],
                    eval_images=p["eval_images"],
                )
                sw = units(
                    f"sweep-{m}-seed{seed}",
                    s,
                    lambda key=key: _sweep(_load(root, key[6:]), batches, p, pb),
                    needs=[key],
                )
                out[m] = dict(clean=rec["test_accuracy"], seconds=rec["train_seconds"], **sw)
            except _Failed:
                out[m] = None
        return out
    if part == "worst-case":
        key, rec = _model(units, root, p, "vanilla", seed, pb)
        ms = _train_settings(p, "vanilla", seed, p["quant"])
        base = dict(model=ms, th_g=p["th_g"], eval_images=p["eval_images"])
        net = None

        def model():
            nonlocal net
            if net is None:
                net = _load(root, key[6:])
            return net

        out = {}
        try:
            out["table"] = units(
                f"worst-case-seed{seed}",
                dict(base, budget=p["budget"]),
                lambda: _table1(model(), batches, p, pb),
                needs=[key],
            )
        except _Failed:
            out["table"] = None
        accs, mc_sec, ok = [], 0.0, True
        for start in range(0, p["mc_n"], p["mc_block"]):
            n = min(p["mc_block"], p["mc_n"] - start)
            try:
                blk = units(
                    f"mc-seed{seed}-{start}",
                    dict(base, start=start, n=n, seed=seed),
                    lambda start=start, n=n: _mc_block(model(), batches, p, seed, start, n, pb),
                    needs=[key],
                )
                accs += blk["accuracies"]
                mc_sec += units.seconds[f"mc-seed{seed}-{start}"]
            except _Failed:
                ok = False
        out["mc"] = (
            dict(min=min(accs), mean=sum(accs) / len(accs), n=len(accs), seconds=mc_sec)
            if ok and accs
            else None
        )
        return out
    if part == "write-verify":
        key, _ = _model(units, root, p, "vanilla", seed, pb)
        s = dict(
            model=_train_settings(p, "vanilla", seed, p["quant"]),
            eval_images=p["eval_images"],
            **p["write_verify"],
        )
        return units(
            f"write-verify-seed{seed}",
            s,
            lambda: _write_verify(
                _load(root, key[6:]),
                _calib_batches(p, seed, p["write_verify"]["calib"]),
                batches,
                p,
                seed,
                pb,
            ),
            needs=[key],
        )
    if part == "bitflip":
        key, _ = _model(units, root, p, "vanilla", seed, pb, quant=None)
        s = dict(
            model=_train_settings(p, "vanilla", seed, None),
            eval_images=p["eval_images"],
            **p["bitflip"],
        )
        return units(
            f"bitflip-seed{seed}",
            s,
            lambda: _bitflip(_load(root, key[6:]), batches, p, pb),
            needs=[key],
        )
    raise ValueError(f"unknown part {part!r}")


# ----------------------------------------------------------------------------------- results
def _get(d, *path):
    for k in path:
        if d is None:
            return None
        d = d.get(k) if isinstance(d, dict) else None
    return d


def assemble(p: dict, res: dict, units: Units) -> dict:
    """The results record (the issue's schema: lists in seed order, None where a unit failed)."""
    seeds = p["seeds"]
    out: dict = dict(
        kind="cimext_reproduce",
        dataset=p["dataset"],
        model=p["model"],
        quant=p["quant"],
        quick=p["quick"],
        seeds=seeds,
        parts=p["parts"],
        eval_subset=dict(
            split="test",
            indices=f"0..{p['eval_images'] - 1} (the first {p['eval_images']} test images)",
            n=p["eval_images"],
            used_by="worst_case, training worst cases, write_verify, bitflip",
        ),
        settings=p,
    )
    if "worst-case" in p["parts"]:
        wc = [res[s].get("worst-case") for s in seeds]
        out["worst_case"] = dict(
            th_g=p["th_g"],
            clean=[_get(w, "table", "clean") for w in wc],
            mc_min=[_get(w, "mc", "min") for w in wc],
            mc_mean=[_get(w, "mc", "mean") for w in wc],
            mc_n=[_get(w, "mc", "n") for w in wc],
            **{m: [_get(w, "table", "accuracy", m) for w in wc] for m in WC_METHODS},
            seconds=dict(
                mc=[_get(w, "mc", "seconds") for w in wc],
                **{m: [_get(w, "table", "seconds", m) for w in wc] for m in WC_METHODS},
            ),
            budget=p["budget"],
            mc_population=f"DeviceModel.verified({p['th_g']}) of the model's devices",
        )
    if "training" in p["parts"]:
        tr = [res[s].get("training") or {} for s in seeds]
        out["training"] = dict(
            th_g=p["th_gs"],
            budget=p["sweep_budget"],
            epochs=p["epochs"],
            hyper_parameters=dict(
                p["methods"],
                atrice_source="chosen on the validation split: scripts/tune_atrice.py, "
                "results/atrice-tuning.json",
            ),
            **{
                m: dict(
                    clean=[_get(t, m, "clean") for t in tr],
                    worst=[_get(t, m, "worst") for t in tr],
                    eval_clean=[_get(t, m, "clean_subset") for t in tr],
                    train_seconds=[_get(t, m, "seconds") for t in tr],
                    worst_seconds=[_get(t, m, "worst_seconds") for t in tr],
                )
                for m in METHODS
            },
        )
    if "write-verify" in p["parts"]:
        wv = [res[s].get("write-verify") for s in seeds]
        w = p["write_verify"]
        rec = dict(
            sigma=w["sigmas"],
            level_sigma=w["level_sigma"],
            th="sigma / 10",
            granularity="device (single devices verified; fractions are of all devices)",
            instances=w["instances"],
        )
        for kind in ("non_uniform", "uniform"):
            sub = {}
            for k in (
                "unverified",
                "full",
                *(f"{m}_speedup" for m in w["methods"]),
                *(f"{m}_fraction" for m in w["methods"]),
            ):
                sub[k] = [_get(x, kind, k) for x in wv]
            if kind == "non_uniform":
                rec.update(sub)  # the top-level lists: non-uniform level sigma
            else:
                rec["uniform"] = sub
        out["write_verify"] = rec
    if "bitflip" in p["parts"]:
        bf = [res[s].get("bitflip") for s in seeds]
        out["bitflip"] = dict(
            model="LeNet, float weights (the storage dtype is the study's variable)",
            clean=[_get(b, "clean") for b in bf],
            midpoint={c: [_get(b, "midpoint", c) for b in bf] for c in p["bitflip"]["cases"]},
            above_max_p={c: [_get(b, "above_max_p", c) for b in bf] for c in p["bitflip"]["cases"]},
            note="midpoint null with above_max_p true: accuracy stays above half the drop up to "
            "p = 0.5 (no midpoint); null with above_max_p null: the unit failed",
        )
    by_part: dict[str, float] = {}
    for k, v in units.seconds.items():
        part = k.split("-seed")[0].split("-")[0]
        by_part[part] = by_part.get(part, 0.0) + v
    out["seconds"] = dict(total=sum(units.seconds.values()), by_unit_kind=by_part)
    out["failed"] = dict(units.failed)
    out["torch"] = torch.__version__
    return out


def _stats(vals) -> tuple[float, float, int] | None:
    v = [float(x) for x in vals if x is not None and math.isfinite(float(x))]
    if not v:
        return None
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, sd, len(v)


def _pm(vals, pct: bool = True, digits: int = 1) -> str:
    """mean ± std over seeds ("failed" when no seed has a value; n/N when some failed)."""
    s = _stats(vals)
    if s is None:
        return "failed"
    m, sd, n = s
    f = 100.0 if pct else 1.0
    txt = f"{f * m:.{digits}f} ± {f * sd:.{digits}f}"
    if n < len(vals):
        txt += f" ({n}/{len(vals)} seeds)"
    return txt


def tables(r: dict) -> str:
    """The results as Markdown tables (mean ± std over the seeds)."""
    md = []
    n = len(r["seeds"])
    sub = r["eval_subset"]["n"]
    if "worst_case" in r:
        w = r["worst_case"]
        md += [
            f"### Table I: worst case of the vanilla model at th_g = {w['th_g']:g} "
            f"({n} seeds, {sub} test images)",
            "",
            "| method | accuracy (%) | time (s) |",
            "|---|---|---|",
            f"| clean | {_pm(w['clean'], digits=2)} | |",
            f"| Monte Carlo minimum of {_pm(w['mc_n'], pct=False, digits=0).split(' ±')[0]} "
            f"write-verified instances | {_pm(w['mc_min'], digits=2)} | "
            f"{_pm(w['seconds']['mc'], pct=False)} |",
        ]
        for m, label in (
            ("pgd", "weight PGD"),
            ("flwc", "F-LWC"),
            ("lwc", "LWC"),
            ("auto", f"ensemble (worst_case, budget {w['budget']})"),
        ):
            md.append(f"| {label} | {_pm(w[m], digits=2)} | {_pm(w['seconds'][m], pct=False)} |")
        fl, lw = _stats(w["seconds"]["flwc"]), _stats(w["seconds"]["lwc"])
        md += [
            "",
            "### Table IV: F-LWC vs LWC",
            "",
            "| | F-LWC | LWC |",
            "|---|---|---|",
            f"| accuracy (%) | {_pm(w['flwc'], digits=2)} | {_pm(w['lwc'], digits=2)} |",
            f"| time (s) | {_pm(w['seconds']['flwc'], pct=False)} | "
            f"{_pm(w['seconds']['lwc'], pct=False)} |",
        ]
        if fl and lw and fl[0] > 0:
            md.append(f"| LWC time / F-LWC time | | {lw[0] / fl[0]:.1f}x |")
        md.append("")
    if "training" in r:
        t = r["training"]
        ths = t["th_g"]
        md += [
            f"### Tables V/VI, Fig. 8: training methods, clean (whole test set) and worst case "
            f"(worst_case, budget {t['budget']}, {sub} test images), {n} seeds",
            "",
            "| training | clean (%) | " + " | ".join(f"worst @ {x:g} (%)" for x in ths) + " |",
            "|---|---|" + "---|" * len(ths),
        ]
        for m in METHODS:
            if m not in t:
                continue
            cols = []
            for i in range(len(ths)):
                cols.append(_pm([None if w is None else w[i] for w in t[m]["worst"]]))
            md.append(
                f"| {LABELS[m]} | {_pm(t[m]['clean'], digits=2)} | " + " | ".join(cols) + " |"
            )
        hp = t["hyper_parameters"]["atrice"]
        md += [
            "",
            "A-TRICE: "
            + ", ".join(f"{k} = {v}" for k, v in hp.items())
            + " (chosen on the validation split); adversarial: "
            + ", ".join(f"{k} = {v}" for k, v in t["hyper_parameters"]["adv"].items()),
            "",
        ]
    if "write_verify" in r:
        w = r["write_verify"]
        meths = [k[: -len("_speedup")] for k in w if k.endswith("_speedup")]
        for kind, rec in (
            ("non-uniform level sigma " + str(w["level_sigma"]), w),
            ("uniform", w["uniform"]),
        ):
            md += [
                f"### Selective write-verify, {kind}: pulses saved at <= 0.5 point loss",
                "",
                "| σ | acc. unverified / full (%) | " + " | ".join(meths) + " |",
                "|---|---|" + "---|" * len(meths),
            ]
            for i, s in enumerate(w["sigma"]):

                def col(k, i=i, rec=rec):
                    return [None if v is None else v[i] for v in rec[k]]

                row = f"| {s:g} | {_pm(col('unverified'))} / {_pm(col('full'))} | "
                row += " | ".join(_pm(col(f"{m}_speedup"), pct=False) + "x" for m in meths)
                md.append(row + " |")
            md.append("")
    if "bitflip" in r:
        b = r["bitflip"]
        md += [
            "### Bit-flip midpoints (flip probability at half the accuracy drop)",
            "",
            "| storage | midpoint p, geometric mean over seeds | per seed |",
            "|---|---|---|",
        ]
        for c, vals in b["midpoint"].items():
            v = [x for x in vals if x is not None and x > 0]
            g = "failed" if not v else f"{10 ** (sum(math.log10(x) for x in v) / len(v)):.3g}"
            if not v and any(b["above_max_p"][c]):
                g = "> 0.5 (accuracy holds up to p = 0.5)"
            vals = [">0.5" if a else x for x, a in zip(vals, b["above_max_p"][c], strict=True)]
            md.append(
                f"| {c} | {g} | "
                + ", ".join(
                    x if isinstance(x, str) else "n/a" if x is None else f"{x:.3g}" for x in vals
                )
                + " |"
            )
        md.append("")
    if r.get("failed"):
        md += ["### Failed units", ""] + [f"- {k}: {v}" for k, v in r["failed"].items()] + [""]
    return "\n".join(md)


def write(root: Path, results: dict) -> list[Path]:
    """results.json, results.md and the figures into ``root``; the paths written."""
    root = Path(root)
    files = [root / "results.json", root / "results.md"]
    atomic_write(files[0], json.dumps(results, indent=1, allow_nan=True))
    atomic_write(files[1], tables(results) + "\n")
    try:
        files += plot(results, root)
    except Exception as e:  # a figure must not lose the numbers
        results.setdefault("failed", {})["plots"] = f"{type(e).__name__}: {e}"
    return files


def plot(r: dict, root: Path) -> list[Path]:
    """fig8.png (worst case vs th_g per training method) and write_verify.png (speedups vs σ)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    if "training" in r:
        t = r["training"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for m in METHODS:
            ys, es = [], []
            for i in range(len(t["th_g"])):
                s = _stats([None if w is None else w[i] for w in t[m]["worst"]])
                ys.append(float("nan") if s is None else 100 * s[0])
                es.append(0.0 if s is None else 100 * s[1])
            ax.errorbar(t["th_g"], ys, yerr=es, marker="o", capsize=3, label=LABELS[m])
        ax.set_xlabel("th_g")
        ax.set_ylabel("worst-case accuracy (%)")
        ax.set_title(f"{r['model']} on {r['dataset']}, {len(r['seeds'])} seeds")
        ax.legend(fontsize=8)
        fig.tight_layout()
        files.append(root / "fig8.png")
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)
    if "write_verify" in r:
        w = r["write_verify"]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
        meths = [k[: -len("_speedup")] for k in w if k.endswith("_speedup")]
        for ax, (title, rec) in zip(
            axes, (("non-uniform", w), ("uniform", w["uniform"])), strict=True
        ):
            for m in meths:
                ys = []
                for i in range(len(w["sigma"])):
                    s = _stats([None if v is None else v[i] for v in rec[f"{m}_speedup"]])
                    ys.append(float("nan") if s is None else s[0])
                ax.plot(w["sigma"], ys, marker="o", label=m)
            ax.axhline(5, color="grey", lw=0.8, ls="--")
            ax.set_xlabel("device σ")
            ax.set_title(title)
        axes[0].set_ylabel("speedup over full write-verify")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        files.append(root / "write_verify.png")
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)
    return files
