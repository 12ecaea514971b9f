"""Optimizer and trainer state as safetensors + JSON (no pickle)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from segllm.errors import CheckpointError


def save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Tensors of the optimizer state into ``path`` (safetensors); everything else into its metadata."""
    save_optimizer_state(optimizer.state_dict(), path)


def save_optimizer_state(sd: dict[str, Any], path: Path) -> None:
    """An optimizer state dict (``state`` keyed by parameter index, ``param_groups``) into ``path``."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            key = f"{idx}/{name}"
            if isinstance(v, torch.Tensor):
                tensors[key] = v.detach().contiguous().cpu()
            else:
                scalars[key] = v
    meta = {"param_groups": json.dumps(sd["param_groups"]), "scalars": json.dumps(scalars)}
    save_file(tensors, str(path), metadata=meta)


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    sd = read_optimizer_state(path)
    own = optimizer.state_dict()["param_groups"]
    if [len(g["params"]) for g in own] != [len(g["params"]) for g in sd["param_groups"]]:
        raise CheckpointError(f"{path}: the optimizer state is for other trainable parameters than this model's")
    optimizer.load_state_dict(sd)


def read_optimizer_state(path: Path) -> dict[str, Any]:
    """The optimizer state dict written by :func:`save_optimizer_state` (``state`` keyed by index)."""
    try:
        tensors = load_file(str(path))
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            meta = json.loads(f.read(n)).get("__metadata__", {})
        groups = json.loads(meta["param_groups"])
        scalars = json.loads(meta["scalars"])
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot read optimizer state {path}: {e}") from e
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(scalars.items()):
        idx, name = key.split("/", 1)
        state.setdefault(int(idx), {})[name] = v
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}
