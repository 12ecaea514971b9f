"""The original release's YAML configs, read as they ship (PyYAML's safe loader: a config is data,
never code).

- A conversation config (``conversation_configs/train/*.yaml``) lists conversation files::

      datasets:
        - name: mr_refcoco_train.json

  The names are relative to the folder the original passes as ``--conversation_folder``
  (``conversations_folder/all_data_mix_train`` for training).
- An annotation config (``annotation_configs/{train,val}/*.yaml``) says where each dataset's masks
  are, relative to ``annotations_folder``; ``path_eval`` is the file evaluation reads instead::

      datasets:
        - name: reason_seg
          path: reason_seg/annotations/train
          path_eval: reason_seg/annotations/test

  :func:`read_annotation_config` turns it into the ``overrides`` of
  :class:`segllm.data.released.masks.MaskLookup`; :func:`parse_annotation_overrides` reads the
  command line's ``NAME=PATH`` items into the same form.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

from segllm.data.released.masks import DATASETS, EVAL_SUFFIX
from segllm.errors import ConfigError

__all__ = ["parse_annotation_overrides", "read_annotation_config", "read_conversation_config"]


def _entries(path: str | Path, allowed: tuple[str, ...], required: tuple[str, ...]) -> list[dict[str, str]]:
    """The checked ``datasets`` entries of a config file (each a mapping of text values)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with a 'datasets' list")
    unknown = sorted(set(data) - {"datasets"})
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (known: ['datasets'])")
    if "datasets" not in data:
        raise ConfigError(f"{path}: expected a mapping with a 'datasets' list")
    items = data["datasets"]
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{path}: 'datasets' must be a non-empty list")
    out = []
    for i, item in enumerate(items):
        where = f"{path}: datasets[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(item).__name__}")
        bad = sorted(set(item) - set(allowed))
        if bad:
            raise ConfigError(f"{where}: unknown key {bad[0]!r} (known: {list(allowed)})")
        for key in required:
            if key not in item:
                raise ConfigError(f"{where}: missing key {key!r}")
        for key, value in item.items():
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{where}.{key}: expected a file name, got {value!r}")
        out.append({k: v.strip() for k, v in item.items()})
    return out


def read_conversation_config(path: str | Path) -> list[str]:
    """The conversation file names a conversation config lists, in its order.

    Raises:
        ConfigError: a missing file, an unknown key, or an entry that is not ``{name: FILE}``.
    """
    return [e["name"] for e in _entries(path, ("name",), ("name",))]


def read_annotation_config(path: str | Path) -> dict[str, str]:
    """An annotation config as ``MaskLookup`` overrides: ``name -> path`` and ``name_eval ->
    path_eval``; a dataset without ``path_eval`` also evaluates with ``path``, as the original
    (which registers no ``_eval`` name for it) does.

    Raises:
        ConfigError: a missing file, an unknown key or dataset name, or a dataset listed twice.
    """
    out: dict[str, str] = {}
    for e in _entries(path, ("name", "path", "path_eval"), ("name", "path")):
        name = e["name"]
        if name not in DATASETS:
            raise ConfigError(f"{path}: unknown dataset {name!r} (known: {', '.join(DATASETS)})")
        if name in out:
            raise ConfigError(f"{path}: dataset {name!r} is listed twice")
        out[name] = e["path"]
        out[name + EVAL_SUFFIX] = e.get("path_eval", e["path"])
    return out


def parse_annotation_overrides(items: Sequence[str]) -> dict[str, str]:
    """``NAME=PATH`` items (``--annotation``) as ``MaskLookup`` overrides. NAME is a dataset name,
    or one with ``_eval`` for the file evaluation reads; PATH is relative to the annotations root
    (or absolute).

    Raises:
        ConfigError: an item without ``=`` or an unknown dataset name.
    """
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ConfigError(f"--annotation wants NAME=PATH, got {item!r}")
        base = name[: -len(EVAL_SUFFIX)] if name.endswith(EVAL_SUFFIX) else name
        if base not in DATASETS:
            raise ConfigError(f"--annotation {item!r}: unknown dataset {name!r} (known: {', '.join(DATASETS)}, or with '_eval')")
        out[name] = path
    return out

