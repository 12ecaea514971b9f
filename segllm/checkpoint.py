"""Checkpoints: a folder with config.json (nested dataclasses), model.safetensors and the tokenizer.

This module reads and writes the files only; it imports no model code (building the model a
checkpoint describes is :func:`segllm.model.loading.load_pretrained`'s job).

Loading is strict: a missing or unexpected weight, or one of the wrong shape, is an error
naming it. Nothing is unpickled. Saving is atomic: the folder is written beside the target
and renamed into place, so an interrupted save never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from segllm.config import CONFIG_FORMAT, SegLLMConfig
from segllm.errors import CheckpointError, ConfigError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_pretrained(
    model, path: str | Path, *, extra: dict | None = None, dtype: torch.dtype | None = None, state_dict: dict | None = None
) -> Path:
    """Write ``model`` (a :class:`segllm.SegLLM`) to the folder ``path`` atomically.

    Args:
        dtype: store floating-point weights in this dtype (e.g. ``torch.float16`` halves the
            file); loading casts them back to the model's dtype.
        extra: JSON-serialisable facts stored in ``segllm.json`` beside the weights (e.g. the
            training step); not needed to load the model.
        state_dict: the weights to write instead of ``model.state_dict()`` (a sharded model's
            gathered full state).
    """
    if getattr(model, "quantized", None):
        raise CheckpointError(f"a model with {model.quantized} LLM weights cannot be saved: save the unquantized model and quantize it after loading")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.config.save(tmp / CONFIG_NAME)
        state, aliases = _dedupe(model.state_dict() if state_dict is None else state_dict)
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": CONFIG_FORMAT, "aliases": json.dumps(aliases)})
        model.tokenizer.save_pretrained(str(tmp))
        if extra is not None:
            (tmp / "segllm.json").write_text(json.dumps(extra, indent=2) + "\n")
        usual_permissions(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_config(path: str | Path) -> SegLLMConfig:
    """The config of the checkpoint folder ``path``; a clear error if it is not a SegLLM checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {path}")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} is not a segllm checkpoint: it has no {CONFIG_NAME}")
    try:
        data = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {cfg_file}: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{cfg_file} is not a segllm checkpoint config: expected a JSON object, got a {type(data).__name__}")
    if data.get("format") != CONFIG_FORMAT:
        kind = data.get("model_type") or data.get("format") or "unknown"
        raise CheckpointError(
            f"{cfg_file} is not a segllm checkpoint config (format {data.get('format')!r}, model type {kind!r})"
        )
    try:
        return SegLLMConfig.from_dict(data)
    except ConfigError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from e


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in the checkpoint folder ``path``; a :class:`CheckpointError` if unreadable."""
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # the tokenizers library reports a corrupt tokenizer.json as a bare Exception
        raise CheckpointError(f"cannot load the tokenizer from {path}: {type(e).__name__}: {e}") from e


def load_weights(model: torch.nn.Module, weights: str | Path, *, new: frozenset[str] = frozenset()) -> None:
    """Load a safetensors file into ``model`` strictly, naming any missing, unexpected or misshapen key.

    ``new``: weights the model has and the file may lack (layers a config change added); they
    keep their initial values.
    """
    try:
        state = load_file(str(weights))
        with open(weights, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            meta = json.loads(f.read(header_len)).get("__metadata__", {}) or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read weights {weights}: {e}") from e
    for alias, kept in json.loads(meta.get("aliases", "{}")).items():
        if kept in state:
            state[alias] = state[kept]
    own = model.state_dict()
    missing = sorted(set(own) - set(state) - new)
    unexpected = sorted(set(state) - set(own))
    if missing:
        raise CheckpointError(f"{weights}: missing weight(s) {_few(missing)}")
    if unexpected:
        raise CheckpointError(f"{weights}: unexpected weight(s) {_few(unexpected)}")
    for k, v in own.items():
        if k in state and tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{weights}: weight {k} has shape {tuple(state[k].shape)}, the model expects {tuple(v.shape)}")
    state.update({k: own[k] for k in new if k not in state})
    model.load_state_dict(state, strict=True)


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share memory with an earlier one (tied weights); return the aliases."""
    seen: dict[tuple, str] = {}
    out, aliases = {}, {}
    for k, v in state.items():
        key = (v.device, v.data_ptr(), v.dtype, tuple(v.shape), v.stride()) if v.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        out[k] = v.detach().contiguous().cpu()
    return out, aliases


def usual_permissions(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; give it and its files the permissions of a plain mkdir/open."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)


def _few(keys: list[str], n: int = 5) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more
