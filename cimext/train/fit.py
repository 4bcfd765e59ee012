"""cimext.train.fit: train a (converted) model with vanilla, VA, TRICE, adversarial or A-TRICE
steps, keep the best epoch by a validation metric (clean, Monte Carlo quantile or F-LWC worst
case), checkpoint atomically every epoch and resume a killed run. Under ``torchrun`` the model is
trained with DistributedDataParallel (each rank takes its slice of every global batch)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as dist_
from .._util import check_finite_weights, check_seed
from .._util import progress as _progress
from ..device import DeviceModel
from ..nn import cim_layers, clean, require_cim_layers, sampling
from ..worstcase import flwc, monte_carlo
from . import checkpoint as ckpt

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class StepContext:
    """What a training step may use besides the batch: the run's settings, its position, and a
    generator for the noise seeds (reseeded per epoch so a resumed run draws the same noise)."""

    settings: dict
    epoch: int
    step: int
    generator: torch.Generator
    # The unwrapped model when ``model`` is a DistributedDataParallel wrapper (passes that must
    # not count as a DDP forward, such as the search for a worst-case perturbation, use it).
    module: nn.Module | None = None
    # What the step perturbed the weights with (adv / atrice: δ per CiM layer, weight units).
    last_deltas: list[torch.Tensor] | None = None


StepFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, StepContext], torch.Tensor]
METHODS: dict[str, StepFn] = {}


def register_method(
    name: str,
    needs_cim: bool = False,
    *,
    defaults: dict | None = None,
    check: Callable[[dict], dict] | None = None,
):
    """Decorator registering a per-batch training step ``fn(model, x, y, ctx) -> loss``.

    ``defaults``: the method's own settings (fit() keywords) with their defaults; a method that
    declares them refuses other keywords. ``check(settings) -> settings`` validates and completes
    them before training starts (bad input fails before the first step)."""

    def deco(fn: StepFn) -> StepFn:
        fn.needs_cim = needs_cim  # type: ignore[attr-defined]
        fn.defaults = dict(defaults) if defaults is not None else None  # type: ignore[attr-defined]
        fn.check = check  # type: ignore[attr-defined]
        METHODS[name] = fn
        return fn

    return deco


@register_method("vanilla")
def _vanilla_step(model, x, y, ctx):
    return F.cross_entropy(model(x), y)


@register_method("va", needs_cim=True)
def _va_step(model, x, y, ctx):
    """Variation-aware training: a fresh device-noise instance (the layers' DeviceModel, or the
    ``device`` setting) on the weights of every forward; gradients reach the clean weights."""

    kw = {"device": ctx.settings["device"]} if ctx.settings.get("device") is not None else {}
    with sampling(model, noise="device", generator=ctx.generator, **kw):
        return F.cross_entropy(model(x), y)


@register_method("trice", needs_cim=True)
def _trice_step(model, x, y, ctx):
    """TRICE: right-censored Gaussian noise s·σ_t·min(ε, th) (eq. 11) on every forward."""

    with sampling(
        model,
        noise="rcg",
        sigma=ctx.settings["sigma_t"],
        th=ctx.settings["th_rcg"],
        generator=ctx.generator,
    ):
        return F.cross_entropy(model(x), y)


@dataclass
class FitResult:
    """Outcome of fit(): per-epoch history, the best epoch (whose weights the model now holds)."""

    method: str
    metric: str
    best_epoch: int
    best_value: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)
    checkpoint_dir: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def accuracy(model: nn.Module, data: Iterable[Batch]) -> float:
    """Top-1 accuracy (in [0, 1]) of ``model`` in eval mode over ``data``, as it is configured
    now (clean, or inside a noise context)."""
    was_training = model.training
    model.eval()
    dev = _model_device(model)
    correct = total = 0
    try:
        for x, y in data:
            x, y = x.to(dev), y.to(dev)
            out = model(x)
            correct += (out.argmax(-1) == y).sum().item()
            total += y.numel()
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("accuracy: the data yielded no samples")
    return correct / total


METRICS = ("clean", "mc", "flwc")

#: Default Adam learning rate per dataset (cimext.data names), used when fit() gets no ``lr`` and
#: its ``train`` loader comes from cimext.data (which names its datasets), and by ``cimext train``.
#: Chosen on each dataset's validation split with scripts/choose_lr.py (LeNet, vanilla):
#: digits, 10 epochs, mean best val accuracy over batch sizes 64 / 128 / 256 and seeds 0, 1:
#: 1e-3 78.0%, 3e-3 89.5%, 1e-2 94.4%, 3e-2 81.4%; fashion-mnist, 5 epochs, batch 128: 1e-3
#: 88.8%, 3e-3 90.4%, 1e-2 90.2%. mnist (no files here to measure) takes fashion-mnist's value
#: (same images and model); "default" serves every other dataset.
DEFAULT_LR: dict[str, float] = {
    "digits": 1e-2,
    "fashion-mnist": 3e-3,
    "mnist": 3e-3,
    "default": 1e-3,
}


def default_lr(train) -> float:
    """DEFAULT_LR of the dataset behind a cimext.data loader (its "default" for any other)."""
    name = getattr(getattr(train, "dataset", None), "name", None)
    return (
        DEFAULT_LR.get(name, DEFAULT_LR["default"])
        if isinstance(name, str)
        else DEFAULT_LR["default"]
    )


_METRIC_OPTIONS = {
    "clean": {},
    # Monte Carlo: the q-quantile of n device instances (seed fixed, so epochs are compared on
    # the same instances); device: a DeviceModel (default: fit's ``device``, else the layers').
    "mc": dict(n=100, q=0.05, seed=0, device=None),
    # F-LWC worst-case accuracy under |δ_l| <= th_g·s_l (default th_g: the method's, or 0.03).
    "flwc": dict(th_g=None, eta=None, steps=None),
}


def _metric_fn(
    metric, options: dict | None, settings: dict
) -> tuple[str, dict, Callable[[nn.Module, Any], float]]:
    """(name, completed options, fn(model, val) -> float) of a validation metric."""
    if callable(metric):
        if options:
            raise TypeError("metric_options apply to the named metrics only, not to a callable")
        return getattr(metric, "__name__", "custom"), {}, metric
    if not isinstance(metric, str) or metric not in METRICS:
        raise ValueError(
            f"metric must be one of {', '.join(map(repr, METRICS))} or a callable(model, val) -> "
            f"float, got {metric!r}"
        )
    options = dict(options or {})
    unknown = sorted(set(options) - set(_METRIC_OPTIONS[metric]))
    if unknown:
        raise TypeError(
            f"metric {metric!r} got unexpected option(s) {unknown}; it takes "
            f"{sorted(_METRIC_OPTIONS[metric])}"
        )
    opts = {**_METRIC_OPTIONS[metric], **options}
    if metric == "clean":

        def clean_accuracy(model, data):

            if cim_layers(model):
                with clean(model):
                    return accuracy(model, data)
            return accuracy(model, data)

        return "clean", opts, clean_accuracy
    if metric == "mc":
        n = opts["n"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"metric_options n must be an int >= 1, got {n!r}")
        q = opts["q"]
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 <= q <= 1.0:
            raise ValueError(f"metric_options q must be in [0, 1], got {q!r}")
        if opts["device"] is None:
            opts["device"] = settings.get("device")
        if opts["device"] is not None and not isinstance(opts["device"], DeviceModel):
            raise TypeError(
                f"metric_options device must be a cimext.DeviceModel, got "
                f"{type(opts['device']).__name__}"
            )

        def mc_quantile(model, data):

            layers = require_cim_layers(model, "metric 'mc'")
            device = opts["device"] if opts["device"] is not None else layers[0][1].device
            res = monte_carlo(model, data, device, n, seed=opts["seed"], progress=False)
            return res.quantile(q)

        return "mc", opts, mc_quantile

    if opts["th_g"] is None:
        opts["th_g"] = settings.get("th_g", 0.03)
    _check_positive("metric_options th_g", opts["th_g"])

    def flwc_accuracy(model, data):

        kw = {k: opts[k] for k in ("eta", "steps") if opts[k] is not None}
        return flwc(model, data, opts["th_g"], progress=False, **kw).accuracy

    return "flwc", opts, flwc_accuracy


def _derive(seed: int, *parts: int) -> int:
    """A 63-bit seed from (seed, parts): independent streams per epoch and purpose."""
    x = seed & 0xFFFFFFFFFFFFFFFF
    for p in parts:
        x = (x * 6364136223846793005 + 1442695040888963407 + p) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x & 0x7FFFFFFFFFFFFFFF


def _make_optimizer(name: str, params, lr: float, weight_decay: float, momentum: float):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {name!r}")


def _check_positive(name: str, v, kind=float) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    if kind is int and int(v) != v:
        raise ValueError(f"{name} must be an integer, got {v!r}")


def fit(
    model: nn.Module,
    train: Iterable[Batch],
    val: Iterable[Batch],
    method: str = "vanilla",
    *,
    epochs: int = 10,
    lr: float | None = None,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    schedule: str | None = "cosine",
    device=None,
    sigma_t: float = 0.1,
    th_rcg: float = 1.0,
    metric="clean",
    metric_options: dict | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    seed: int = 0,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    distributed: bool | None = None,
    **method_settings,
) -> FitResult:
    """Train ``model`` on ``train`` with ``method`` ("vanilla", "va", "trice", "adv", "atrice",
    or one added with register_method) for ``epochs``, evaluating ``metric`` on ``val`` after
    each epoch; the model ends holding the weights of the best epoch.
    ``lr`` defaults to DEFAULT_LR of the dataset behind ``train`` (a cimext.data loader), chosen
    on that dataset's validation split, else 1e-3.

    va injects device noise (the layers' DeviceModel, or ``device``) in every forward; trice
    injects right-censored Gaussian noise with ``sigma_t`` and ``th_rcg``. adv (Algorithm 2 of
    the paper) trains under the one-step F-LWC perturbation |δ_l| <= ``th_g``·s_l of the current
    weights (``step_size``, default th_g; ``adv_steps`` sign steps, default 1; margin confidence
    ``kappa``; ``random_start``: start each search from δ uniform inside the bound); atrice
    (Algorithm 3) minimizes (1 − ``alpha``)·loss under RCG noise + alpha·loss under that
    perturbation (alpha = 1: adv; alpha = 0: trice), plus ``clean_weight``·loss of the clean
    weights (default 0); ``adv_loss="trades"`` makes the perturbed term KL(f(W) ‖ f(W + δ)).
    See cimext.train.adversarial.

    ``metric``: "clean" (accuracy without noise), "mc" (the q-quantile of a Monte Carlo run;
    ``metric_options`` n=100, q=0.05, seed=0, device=``device`` or the layers' DeviceModel),
    "flwc" (F-LWC worst-case accuracy; options th_g (the method's, else 0.03), eta, steps), or a
    callable(model, val) -> float; higher is better. With ``checkpoint_dir`` every epoch is
    checkpointed atomically (safetensors + JSON) and a later call with the same directory resumes
    after the last finished epoch, giving the same weights as an uninterrupted run.

    Under ``torchrun`` (``distributed=None`` detects it; True requires it, False ignores it) the
    model is wrapped in DistributedDataParallel: every rank iterates the same ``train`` batches
    and takes its slice of each, the gradients are averaged, and the result equals a single
    process on the same global batches (up to float rounding); rank 0 prints and checkpoints.
    Returns a FitResult.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    _check_positive("epochs", epochs, int)
    seed = check_seed(seed)
    check_finite_weights(model, f"fit(method={method!r})")
    if lr is None:
        lr = default_lr(train)
    _check_positive("lr", lr)
    if schedule not in (None, "cosine"):
        raise ValueError(f"schedule must be None or 'cosine', got {schedule!r}")
    step_fn = METHODS[method]
    defaults = getattr(step_fn, "defaults", None)
    if defaults is not None:
        unknown = sorted(set(method_settings) - set(defaults))
        if unknown:
            raise TypeError(
                f"fit(method={method!r}) got unexpected setting(s) {unknown}; it takes "
                f"{sorted(defaults)} besides fit's own keywords"
            )
        method_settings = {**defaults, **method_settings}
    if getattr(step_fn, "check", None) is not None:
        method_settings = step_fn.check(method_settings)
    if getattr(step_fn, "needs_cim", False):
        if not cim_layers(model):
            raise TypeError(
                f"method {method!r} injects device noise and needs a converted model: "
                "call cimext.convert(model) first"
            )
    metric_name, metric_opts, metric_fn = _metric_fn(
        metric, metric_options, dict(method_settings, device=device)
    )
    use_ddp = _setup_distributed(distributed)
    rank, world = (dist_.rank(), dist_.world_size()) if use_ddp else (0, 1)
    if use_ddp and isinstance(
        getattr(train, "sampler", None), torch.utils.data.distributed.DistributedSampler
    ):
        raise ValueError(
            "fit under torchrun slices every global batch itself: give every rank the same "
            "loader, without a DistributedSampler"
        )
    progress = progress and rank == 0
    settings = dict(
        method=method,
        epochs=int(epochs),
        lr=lr,
        optimizer=optimizer,
        weight_decay=weight_decay,
        momentum=momentum,
        schedule=schedule,
        sigma_t=sigma_t,
        th_rcg=th_rcg,
        seed=seed,
        metric=metric_name,
        **method_settings,
    )
    if metric_opts:
        settings["metric_options"] = {k: v for k, v in metric_opts.items() if v is not None}
    json_settings = {k: _jsonable(v) for k, v in settings.items()}
    settings["device"] = device

    dev = _model_device(model)
    opt = _make_optimizer(optimizer, model.parameters(), lr, weight_decay, momentum)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(epochs))
        if schedule == "cosine"
        else None
    )
    history: list[dict] = []
    best_epoch, best_value, best_state = -1, -math.inf, None
    start_epoch = 0
    cdir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if cdir is not None and resume and (cdir / "last.json").exists():
        meta, tensors, best_state = _read_checkpoint(cdir)
        if meta["settings"] != json_settings:
            raise ValueError(
                f"checkpoint in {cdir} was written with other settings; use another "
                "checkpoint_dir or resume=False"
            )
        try:
            model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            opt.load_state_dict(ckpt.optimizer_join(tensors, meta["optimizer"], dev))
        except (RuntimeError, KeyError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(
                f"checkpoint in {cdir} holds the weights of another model ({first}); use "
                "another checkpoint_dir or resume=False"
            ) from None
        if sched is not None:
            sched.load_state_dict(meta["scheduler"])
        history = meta["history"]
        best_epoch, best_value = meta["best_epoch"], meta["best_value"]
        start_epoch = meta["epoch"] + 1

    run_model: nn.Module = model
    if use_ddp:
        from torch.nn.parallel import DistributedDataParallel

        run_model = DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None
        )
    module = model if use_ddp else None
    skipped = 0

    t_start = time.perf_counter()
    for epoch in range(start_epoch, int(epochs)):
        t0 = time.perf_counter()
        # Everything random in an epoch derives from (seed, epoch): a resumed run replays it.
        torch.manual_seed(_derive(seed, epoch, 0))
        if isinstance(getattr(train, "generator", None), torch.Generator):
            train.generator.manual_seed(_derive(seed, epoch, 1))
        gen = torch.Generator().manual_seed(_derive(seed, epoch, 2))
        model.train()
        total_loss = total_n = 0.0
        batches = _progress(train, enabled=progress, desc=f"epoch {epoch + 1}/{epochs} [{method}]")
        for step, (x, y) in enumerate(batches):
            scale = 1.0
            if world > 1:
                # Every rank sees the same global batch and keeps its slice. DDP averages the
                # ranks' gradients; weighting a slice's mean loss by its share of the batch
                # makes that average the global batch's mean also when it does not divide.
                n_global = y.shape[0]
                if n_global < world:
                    skipped += 1  # a slice would be empty on some rank
                    continue
                x, y = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
                scale = y.shape[0] * world / n_global
            x, y = x.to(dev), y.to(dev)
            loss = step_fn(run_model, x, y, StepContext(settings, epoch, step, gen, module))
            opt.zero_grad(set_to_none=True)
            (loss * scale if scale != 1.0 else loss).backward()
            opt.step()
            total_loss += loss.item() * y.numel()
            total_n += y.numel()
            if hasattr(batches, "set_postfix"):
                batches.set_postfix(loss=f"{total_loss / total_n:.4f}", refresh=False)
        if world > 1:
            sums = torch.tensor([total_loss, total_n], dtype=torch.float64)
            dist_.all_reduce_sum_([sums])
            total_loss, total_n = sums.tolist()
        if total_n == 0:
            raise ValueError("fit: the training data yielded no samples")
        if sched is not None:
            sched.step()
        # Every rank evaluates (monte_carlo shards its instances); rank 0's value decides.
        value = float(
            dist_.broadcast_object(float(metric_fn(model, val)))
            if world > 1
            else metric_fn(model, val)
        )
        row = dict(
            epoch=epoch,
            train_loss=total_loss / total_n,
            val_metric=value,
            lr=opt.param_groups[0]["lr"],
            seconds=time.perf_counter() - t0,
        )
        history.append(row)
        if value > best_value:
            best_epoch, best_value = epoch, value
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if cdir is not None and rank == 0:
            opt_tensors, opt_meta = ckpt.optimizer_split(opt)
            model_tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
            ckpt.save_tensors(cdir / "best.safetensors", best_state)
            ckpt.save_tensors(cdir / "last.safetensors", {**model_tensors, **opt_tensors})
            ckpt.save_json(
                cdir / "last.json",
                dict(
                    epoch=epoch,
                    settings=json_settings,
                    history=history,
                    best_epoch=best_epoch,
                    best_value=best_value,
                    optimizer=opt_meta,
                    scheduler=sched.state_dict() if sched is not None else None,
                ),
            )
        if world > 1:
            dist_.barrier()  # the checkpoint is complete before any rank goes on
        if progress:
            print(
                f"epoch {epoch + 1}/{epochs}: loss {row['train_loss']:.4f}, "
                f"{metric_name} {value:.4f}" + (" (best)" if best_epoch == epoch else ""),
                flush=True,
            )
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)

    if use_ddp:
        del run_model  # drops DDP's gradient hooks from the parameters
    if skipped:
        import warnings

        warnings.warn(
            f"fit: {skipped} batch(es) smaller than the {world} processes were skipped",
            RuntimeWarning,
            stacklevel=2,
        )
    if best_state is not None:
        model.load_state_dict({k: v.to(dev) for k, v in best_state.items()})
    result = FitResult(
        method=method,
        metric=metric_name,
        best_epoch=best_epoch,
        best_value=best_value,
        history=history,
        seconds=time.perf_counter() - t_start,
        settings=json_settings,
        checkpoint_dir=str(cdir) if cdir is not None else None,
    )
    if cdir is not None and rank == 0:
        ckpt.save_json(cdir / "result.json", json.loads(result.to_json()))
    return result


def _read_checkpoint(cdir: Path) -> tuple[dict, dict, dict]:
    """(last.json, last.safetensors, best.safetensors) of a checkpoint folder; a damaged or
    truncated file raises ValueError naming it."""
    path = cdir / "last.json"
    try:
        meta = json.loads(path.read_text())
        for key in ("settings", "optimizer", "history", "best_epoch", "best_value", "epoch"):
            meta[key]  # noqa: B018 - a KeyError here means a damaged record
        path = cdir / "last.safetensors"
        tensors = ckpt.load_tensors(path)
        path = cdir / "best.safetensors"
        best = ckpt.load_tensors(path)
    except Exception as e:  # safetensors raises its own error type for a bad file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"checkpoint {path} is damaged ({first}); delete {cdir} or pass resume=False"
        ) from None
    return meta, tensors, best


def _jsonable(v):
    if isinstance(v, (int, float, str, type(None))):
        return v
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return repr(v)


def _setup_distributed(flag: bool | None) -> bool:
    """Whether fit() runs DDP: detected from torchrun's environment unless ``flag`` says."""
    if flag is False:
        return False
    on = dist_.init_from_env()
    if flag and not on:
        raise ValueError(
            "distributed=True needs a process group of more than one process (run under "
            "torchrun, or call torch.distributed.init_process_group first)"
        )
    return on
