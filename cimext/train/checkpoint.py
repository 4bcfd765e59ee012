"""Atomic checkpoints: tensors in safetensors, everything else in JSON, both replaced atomically
so a run killed at any moment leaves either the previous checkpoint or the new one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .._util import atomic_write, write_json


def save_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    write_json(path, obj)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a flat dict of tensors with safetensors, atomically."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def optimizer_split(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict as (flat tensors for safetensors, JSON-able rest)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state_meta: dict[str, dict] = {}
    for pid, st in sd["state"].items():
        meta = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v
                meta[k] = "__tensor__"
            else:
                meta[k] = v
        state_meta[str(pid)] = meta
    return tensors, {"state": state_meta, "param_groups": sd["param_groups"]}


def optimizer_join(tensors: dict[str, torch.Tensor], meta: dict, device) -> dict:
    """Inverse of optimizer_split: an optimizer state_dict."""
    state = {}
    for pid, st in meta["state"].items():
        state[int(pid)] = {
            k: (tensors[f"optim.{pid}.{k}"].to(device) if v == "__tensor__" else v)
            for k, v in st.items()
        }
    return {"state": state, "param_groups": meta["param_groups"]}
