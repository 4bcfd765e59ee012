"""What the subcommands share: the error type, the argument parser that reports on one line,
option groups, argument parsers for lists and seeds, the model builder, weights in and out, and
the output folder that holds exactly one run."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from safetensors.torch import load_file, save_file

from .. import data, models, zoo
from .._util import atomic_write, check_finite_weights, umask, write_json, write_text
from ..device import DeviceModel

__all__ = [
    "CLIError",
    "Parser",
    "add_data_options",
    "add_output_options",
    "build_model",
    "device_model",
    "floats",
    "ints",
    "load_init",
    "output_folder",
    "quant",
    "save_weights",
    "seed",
    "write_json",
    "write_text",
]

#: The marker a cimext output folder holds: only such a folder (or an empty one) is replaced.
MARKER = ".cimext-run"
#: The record files of the commands: a folder holding one was written by an earlier cimext
#: (before the marker existed) and may be replaced too.
RESULT_FILES = (
    "train.json",
    "report.json",
    "montecarlo.json",
    "compare.json",
    "write_verify.json",
    "bitflip.json",
    "results.json",
)


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (a CLIError) instead of usage + error."""

    def error(self, message: str):  # argparse's hook: must not return
        raise CLIError(f"{self.prog}: {message} (see {self.prog} --help)")


# ------------------------------------------------------------------------------ argument types
def seed(text: str) -> int:
    """An argparse type: an integer seed in [0, 2**64)."""
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be an integer in [0, 2**64), got {text!r}"
        ) from None
    if not 0 <= v < 2**64:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64), got {text}")
    return v


def quant(text: str | None) -> tuple | None:
    """--quant "W" or "W,A" (bits; "none" for float) as a (W, A) tuple, or None."""
    if text is None:
        return None
    msg = f"--quant must be W or W,A bit counts from 1 to 16 like 4,4; got {text!r}"
    try:
        parts = [int(v) if v.strip().lower() not in ("", "none") else None for v in text.split(",")]
    except ValueError:
        raise CLIError(msg) from None
    if len(parts) == 1:
        parts.append(None)
    if len(parts) != 2 or any(b is not None and not 1 <= b <= 16 for b in parts):
        raise CLIError(msg)
    return tuple(parts)


def floats(text: str, flag: str, *, positive: bool = False, increasing: bool = False) -> list:
    """Comma-separated finite numbers (each > 0 with ``positive``; strictly increasing with
    ``increasing``)."""
    try:
        vals = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not vals or any(not math.isfinite(v) for v in vals):
        raise CLIError(f"{flag} must be comma-separated finite numbers, got {text!r}")
    if positive and any(v <= 0 for v in vals):
        raise CLIError(f"{flag} must be comma-separated numbers > 0, got {text!r}")
    if increasing and any(b <= a for a, b in zip(vals, vals[1:], strict=False)):
        raise CLIError(f"{flag} must be strictly increasing, got {text!r}")
    return vals


def ints(text: str, flag: str, *, seeds: bool = False) -> list[int]:
    """Distinct comma-separated integers (seeds: each in [0, 2**64))."""
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not vals or len(set(vals)) != len(vals):
        raise CLIError(f"{flag} must be distinct comma-separated integers, got {text!r}")
    if seeds and any(not 0 <= v < 2**64 for v in vals):
        raise CLIError(f"{flag} must be integers in [0, 2**64), got {text!r}")
    return vals


def at_least(a: argparse.Namespace, minimum: int, *names: str) -> None:
    """Each option in ``names`` (attribute names; None is allowed) must be >= ``minimum``."""
    for name in names:
        v = getattr(a, name)
        if v is not None and v < minimum:
            raise CLIError(f"--{name.replace('_', '-')} must be >= {minimum}, got {v}")


def finite_positive(a: argparse.Namespace, *names: str) -> None:
    """Each float option in ``names`` (None is allowed) must be finite and > 0."""
    for name in names:
        v = getattr(a, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise CLIError(f"--{name.replace('_', '-')} must be a finite number > 0, got {v}")


# ------------------------------------------------------------------------------ option groups
def add_data_options(p: argparse.ArgumentParser, *, model: bool = True) -> None:
    """--dataset, --root and (with ``model``) --model."""
    p.add_argument("--dataset", default="digits", choices=list(data.DATASETS))
    p.add_argument("--root", default=None, help="dataset folder (default: the dataset's own)")
    if model:
        p.add_argument("--model", default="lenet", choices=list(models.MODELS))


def add_output_options(p: argparse.ArgumentParser, default: str, what: str = "JSON, PNG") -> None:
    """--out (the run's folder) and --quiet."""
    p.add_argument(
        "--out",
        default=default,
        help=f"output folder ({what}); it holds exactly this run: replaced whole at the end",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# ------------------------------------------------------------------------------ models
def device_model(**kw):
    """A DeviceModel from options; bad values raise CLIError with the model's own message."""

    try:
        return DeviceModel(**kw)
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None


def device_model_verified(th_g: float, **kw):
    """DeviceModel.verified(th_g, ...); bad values raise CLIError with the model's message."""

    try:
        return DeviceModel.verified(th_g, **kw)
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None


def build_model(
    dataset: str,
    model: str,
    root: str | None = None,
    width: float | None = None,
    *,
    quant=None,
    device=None,
    seed: int = 0,
    input_size: int | None = None,
):
    """A fresh converted ``model`` sized from the ``dataset`` found under ``root`` (channels,
    image size, classes; see cimext.zoo.build); a model that cannot take those images raises
    CLIError before any training."""
    if width is not None and not (math.isfinite(width) and width > 0):
        raise CLIError(f"--width must be a finite number > 0, got {width}")
    try:
        return zoo.build(
            dataset,
            model,
            quant,
            device,
            seed,
            root=root,
            width=width,
            input_size=input_size,
        )
    except ValueError as e:
        raise CLIError(f"--model {model}: {one_line(e)}") from None


def load_init(model, path: str, what: str) -> None:
    """Load the --init weights ``path`` (a safetensors file) into ``model``; a missing file, a
    bad file or weights of another model raise CLIError naming the file (``what`` names the
    expected model)."""

    if not Path(path).is_file():
        raise CLIError(f"--init {path}: no such file")
    try:
        state = load_file(path)
    except Exception as e:  # safetensors raises its own error type for a bad file
        raise CLIError(f"--init {path}: not a safetensors file ({one_line(e)})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CLIError(f"--init {path}: not weights of {what} ({one_line(e)})") from None
    try:
        check_finite_weights(model, "the weights")
    except ValueError as e:
        raise CLIError(f"--init {path}: {e}") from None


def save_weights(model, path) -> None:
    """Write ``model``'s state dict to ``path`` (safetensors, atomically)."""

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))


def one_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name if it has none)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


# ------------------------------------------------------------------------------ output folder
def check_out(out: str) -> Path:
    """--out as a Path: not empty, not a file, and either missing, empty or an earlier cimext
    run (only such a folder is replaced)."""
    if not out or not out.strip():
        raise CLIError("--out must name a folder, got an empty string")
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise CLIError(f"--out {out}: is a file, not a folder")
    anc = p.absolute()
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise CLIError(f"--out {out}: not writable ({anc} is a file)")
    if not os.access(anc if anc != p.absolute() else anc.parent, os.W_OK | os.X_OK):
        raise CLIError(f"--out {out}: not writable (permission denied)")
    if p.is_dir():
        try:
            resolved, cwd = p.resolve(), Path.cwd().resolve()
        except OSError as e:
            raise CLIError(f"--out {out}: {e.strerror or e}") from None
        if resolved == cwd or resolved in cwd.parents:
            raise CLIError(f"--out {out}: is the current folder or above it; name a new folder")
        try:
            earlier = (p / MARKER).is_file() or any((p / f).is_file() for f in RESULT_FILES)
            if not earlier and any(p.iterdir()):
                raise CLIError(
                    f"--out {out}: holds files of something other than a cimext run (no "
                    f"{MARKER}); name a new or empty folder"
                )
        except PermissionError as e:
            raise CLIError(f"--out {out}: not readable ({e.strerror})") from None
    return p


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def _swap_in(tmp: Path, final: Path) -> None:
    """Put folder ``tmp`` in place of ``final`` (which may exist), then drop the old one."""
    if final.exists():
        if not _exchange(tmp, final):
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            tmp = old
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, final)


def partial_dir(final: Path) -> Path:
    """The fixed folder beside ``final`` where a resumable command keeps an unfinished run."""
    return final.with_name(f".{final.name}.partial")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C with a message saying what was kept (printed by main instead of the default)."""


@contextlib.contextmanager
def output_folder(out: str, *, resumable: bool = False, keep: str | None = None) -> Iterator[Path]:
    """The folder a command writes its run into; swapped in place of ``out`` whole when the
    block ends without an error, so ``out`` holds exactly one run and an interrupted or failed
    run leaves the previous one as it was. An ``Interrupted`` raised in the block (Ctrl-C after
    a part worth keeping, e.g. a trained model with its record) swaps in what was written.

    Resumable commands (``resumable``) write into a fixed ``.<name>.partial`` folder beside
    ``out`` that survives a failure or Ctrl-C, so running the command again resumes there; on
    its first start it takes a copy of the ``keep`` subfolder of the previous run (e.g. its
    checkpoints, so a finished run can be extended)."""
    final = check_out(out)
    if os.environ.get("RANK", "0") != "0":
        # Under torchrun only rank 0 writes: the others see the same folder and touch nothing.
        tmp = partial_dir(final) if resumable else Path(tempfile.mkdtemp(prefix=".cimext-rank-"))
        try:
            yield tmp
        finally:
            if not resumable:
                shutil.rmtree(tmp, ignore_errors=True)
        return
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if resumable:
            tmp = partial_dir(final)
            fresh = not tmp.is_dir()
            tmp.mkdir(exist_ok=True)
            if fresh and keep and (final / keep).is_dir():
                shutil.copytree(final / keep, tmp / keep, dirs_exist_ok=True)
        else:
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
            os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private; the run folder is not
        (tmp / MARKER).write_text("")
    except OSError as e:
        raise CLIError(f"--out {out}: not writable ({e.strerror or e})") from None
    commit = False
    try:
        yield tmp
        commit = True
    except Interrupted:
        commit = True
        raise
    finally:
        if commit:
            _swap_in(tmp, final)
        elif not resumable:
            shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: Path) -> dict | None:
    """A JSON file's content, or None when it is missing or damaged."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
