"""Small helpers shared by the library and the command line: one progress bar, one DeviceModel
to JSON, one atomic file write. Nothing here imports the command line."""

from __future__ import annotations

import json
import numbers
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch


class _NoBar:
    """The do-nothing stand-in for a disabled progress bar (same methods as tqdm's)."""

    def __init__(self, it=None):
        self._it = it

    def __iter__(self):
        return iter(self._it if self._it is not None else ())

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *a, **k) -> None:
        pass

    def set_postfix_str(self, *a, **k) -> None:
        pass

    def close(self) -> None:
        pass


def progress(
    it: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    enabled: bool = True,
    leave: bool = False,
):
    """A tqdm bar over ``it`` (a manual bar when ``it`` is None), or a do-nothing stand-in with
    the same methods (iterating yields ``it``) when ``enabled`` is false or tqdm is missing."""
    if enabled:
        try:
            from tqdm.auto import tqdm  # optional at import time: only bars need it
        except ImportError:  # pragma: no cover - tqdm is a dependency
            enabled = False
    if not enabled:
        return _NoBar(it)
    return tqdm(it, total=total, desc=desc, leave=leave, dynamic_ncols=True)


def device_dict(device) -> dict:
    """A DeviceModel as a JSON-able dict (level_sigma as a list)."""
    d = asdict(device)
    if d.get("level_sigma") is not None:
        d["level_sigma"] = list(d["level_sigma"])
    return d


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it onto ``path``, so
    a reader (or a run killed at any moment) sees the old file or the new one, never a half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it private; a written file is not
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def umask() -> int:
    """The process's file mode creation mask."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=1))


def check_seed(seed, name: str = "seed") -> int:
    """``seed`` as an int in [0, 2**64): a bool or a non-integer raises TypeError, one out of
    range ValueError (a seed is never wrapped around)."""

    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int in [0, 2**64), got {seed!r}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"{name} must be an int in [0, 2**64), got {seed}")
    return int(seed)


def check_finite_weights(model, what: str) -> None:
    """Refuse a model whose parameters hold NaN or inf: raises ValueError naming the layer (an
    analysis or training of such a model gives meaningless numbers)."""

    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p.detach()).all()):
            layer, _, kind = name.rpartition(".")
            raise ValueError(
                f"{what}: layer {layer or name!r} has NaN or inf in its {kind or 'values'}; "
                "refusing to run on it (load or train finite weights first)"
            )
