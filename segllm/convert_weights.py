"""Turning a PyTorch pickle of weights (``.pth``/``.pt``/``.bin``) into a safetensors file.

Starting weights sometimes ship only as a pickle (HIPIE-R50's ``r50_parts.pth``, the released
recipes' decoder initialisation). segllm reads weights only from safetensors, so such a file is
converted once. It is read with ``torch.load(weights_only=True)``: PyTorch's restricted
unpickler, which rebuilds tensors and plain containers and scalars and refuses anything else (a
pickle cannot run code through it).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from segllm.errors import CheckpointError


def _tensors(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _tensors(v, f"{prefix}.{k}" if prefix else str(k), out)


def pickle_to_safetensors(src: str | Path, dst: str | Path, *, key: str | None = None) -> dict[str, tuple[int, ...]]:
    """Convert the tensors of a PyTorch pickle into a safetensors file.

    Args:
        src: the pickle. Checkpoints that wrap their weights (``{"model": {...}, "iteration":
            ...}``, as detectron2 and many trainers save them) are unwrapped: ``key`` names the
            entry to take, default "model" or "state_dict" when present, else the whole file.
        dst: the safetensors file to write; nested dicts become dotted key names.

    Returns:
        The written tensors' shapes by name.

    Raises:
        CheckpointError: the file is missing, not a PyTorch pickle, holds objects other than
            tensors and plain containers (refused unread), or holds no tensors.
    """

    src = Path(src)
    if not src.is_file():
        raise CheckpointError(f"{src}: no such file")
    try:
        data = torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _refusal_reason(str(e))
        if reason is not None:
            raise CheckpointError(
                f"{src}: refused: it holds objects other than tensors and plain containers (nothing was run); "
                f"torch: {reason}"
            ) from e
        raise CheckpointError(f"{src}: not a PyTorch weights file (unreadable pickle: {_torch_reason(str(e))})") from e
    except Exception as e:  # zip/pickle format errors surface as several exception types
        raise CheckpointError(f"{src}: not a PyTorch weights file ({type(e).__name__}: {e})") from e
    if isinstance(data, dict):
        if key is not None:
            if key not in data:
                raise CheckpointError(f"{src}: no entry {key!r} (entries: {sorted(map(str, data))[:10]})")
            data = data[key]
        else:
            for candidate in ("model", "state_dict"):
                if isinstance(data.get(candidate), dict):
                    data = data[candidate]
                    break
    tensors: dict[str, torch.Tensor] = {}
    _tensors(data, "", tensors)
    if not tensors:
        raise CheckpointError(f"{src}: no tensors found")
    # safetensors wants contiguous tensors that share no storage
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(dst))
    return {k: tuple(v.shape) for k, v in tensors.items()}


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# what a refusal names: a global, class or function the restricted unpickler would not load
_NAMES_CODE = re.compile(r"global|class|function|reduce|allowlist|not an allowed", re.IGNORECASE)


def _torch_reason(message: str) -> str:
    """The line of torch's ``weights_only`` error that says what went wrong.

    The wording differs between torch versions ("WeightsUnpickler error: Unsupported global:
    GLOBAL x", "Unsupported class x", "Trying to call reduce for unrecognized function x"), so
    the line is reported as torch wrote it, not parsed.
    """
    text = _ANSI.sub("", message)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        found = re.search(r"Weights\s*Unpickler error:\s*(.+)", line, re.IGNORECASE)
        if found:
            return found.group(1)
    named = [line for line in lines if re.search(r"unsupported|unrecognized|not allowed", line, re.IGNORECASE)]
    return (named or lines or [text.strip()])[-1]


def _refusal_reason(message: str) -> str | None:
    """torch's reason when it refused code in the pickle (a global, class or function), else None
    (the file is then no pickle of weights at all, e.g. "Unsupported operand")."""
    reason = _torch_reason(message)
    return reason if _NAMES_CODE.search(reason) else None
