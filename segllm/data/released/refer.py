"""RefCOCO / RefCOCO+ / RefCOCOg annotations as the REFER zips ship them, read safely.

A REFER folder (``refcoco/``, ``refcoco+/``, ``refcocog/``) holds ``instances.json`` (COCO)
and ``refs(<split_by>).p``: a pickle of a list of dicts (ref_id, ann_id, image_id, split,
category_id, sent_ids, file_name, sentences [{tokens, raw, sent_id, sent}]).

A pickle can run code when loaded. :func:`load_refs` reads it with :class:`RestrictedUnpickler`,
which refuses every global (function, class, module attribute): plain dicts, lists, tuples,
strings and numbers need none, so a genuine refs file loads and a crafted one fails.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

from segllm.data.records import RecordError
from segllm.data.released.masks import _quiet_coco

# the split-by variants of each dataset's refs file; the first is the default
SPLIT_BY = {"refcoco": ("unc", "google"), "refcoco+": ("unc",), "refcocog": ("umd", "google")}
SPLITS = {"unc": ("train", "val", "testA", "testB"), "umd": ("train", "val", "test"), "google": ("train", "val")}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that admits no globals at all: only containers and scalars can be built."""

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        raise pickle.UnpicklingError(
            f"refused to load global {module}.{name}: this pickle references code, "
            "and only plain data (dicts, lists, strings, numbers) is allowed"
        )

    def persistent_load(self, pid: Any):
        raise pickle.UnpicklingError("refused a persistent id: only plain data is allowed")


def restricted_loads(data: bytes) -> Any:
    """Unpickle plain data only (see :class:`RestrictedUnpickler`). Python 2 strings decode as UTF-8, else Latin-1."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="utf-8").load()
    except UnicodeDecodeError:
        return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


def load_refs(path: str | Path) -> list[dict[str, Any]]:
    """Read a REFER ``refs(*).p`` file; raises :class:`RecordError` naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"refs file not found: {path}")
    try:
        data = restricted_loads(path.read_bytes())
    except pickle.UnpicklingError as e:
        raise RecordError(f"{path}: {e}") from e
    except Exception as e:  # truncated or corrupt pickles raise EOFError, ValueError, ...
        raise RecordError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise RecordError(f"{path}: expected a list of ref dicts, got {type(data).__name__}")
    for i, r in enumerate(data):
        missing = [k for k in ("ref_id", "ann_id", "image_id", "split", "sentences") if k not in r]
        if missing:
            raise RecordError(f"{path}: ref {i} lacks {', '.join(missing)}")
    return data


def load_instances(path: str | Path) -> dict[str, Any]:
    """Read a COCO ``instances.json`` (images, annotations, categories)."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"instances file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise RecordError(f"cannot read {path}: {e}") from e
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("annotations"), list)
        or not isinstance(data.get("images"), list)
    ):
        raise RecordError(f"{path}: not a COCO instances file (needs 'images' and 'annotations' lists)")
    return data


class Refer:
    """One REFER dataset: refs by split, their sentences, annotations and masks.

    Args:
        folder: the dataset folder (holding ``instances.json`` and ``refs(<split_by>).p``).
        dataset: ``refcoco``, ``refcoco+`` or ``refcocog`` (picks the default ``split_by``);
            defaults to the folder's name.
        split_by: ``unc``, ``umd`` or ``google``.
    """

    def __init__(self, folder: str | Path, dataset: str | None = None, split_by: str | None = None) -> None:
        self.folder = Path(folder)
        self.dataset = dataset or self.folder.name
        if split_by is None:
            if self.dataset not in SPLIT_BY:
                raise RecordError(f"unknown REFER dataset {self.dataset!r}; give split_by (unc, umd or google)")
            split_by = SPLIT_BY[self.dataset][0]
        self.split_by = split_by
        self.refs_path = self.folder / f"refs({split_by}).p"
        self._refs = load_refs(self.refs_path)
        self.refs_by_id = {r["ref_id"]: r for r in self._refs}
        self._instances: dict[str, Any] | None = None
        self._coco = None

    def __len__(self) -> int:
        return len(self._refs)

    @property
    def splits(self) -> list[str]:
        return sorted({str(r["split"]) for r in self._refs})

    def refs(self, split: str | None = None) -> list[dict[str, Any]]:
        """Refs of one split (``train``, ``val``, ``testA``, ...), or all of them."""
        if split is None:
            return list(self._refs)
        out = [r for r in self._refs if r["split"] == split]
        if not out and split not in self.splits:
            raise RecordError(f"{self.refs_path}: no split {split!r}; splits are {', '.join(self.splits)}")
        return out

    def ref(self, ref_id: int) -> dict[str, Any]:
        try:
            return self.refs_by_id[ref_id]
        except KeyError:
            raise RecordError(f"{self.refs_path}: no ref id {ref_id}") from None

    def _as_ref(self, ref: dict[str, Any] | int) -> dict[str, Any]:
        return ref if isinstance(ref, dict) else self.ref(ref)

    def sentences(self, ref: dict[str, Any] | int) -> list[str]:
        """The referring expressions of a ref (its ``sent`` strings, else ``raw``)."""
        return [str(s.get("sent", s.get("raw", ""))) for s in self._as_ref(ref)["sentences"]]

    def ann_id(self, ref: dict[str, Any] | int) -> int:
        """The COCO annotation id of a ref (the mask id the conversations use)."""
        return int(self._as_ref(ref)["ann_id"])

    @property
    def instances(self) -> dict[str, Any]:
        if self._instances is None:
            self._instances = load_instances(self.folder / "instances.json")
        return self._instances

    @property
    def coco(self):
        """A pycocotools ``COCO`` over ``instances.json`` (built on first use)."""
        if self._coco is None:
            self._coco = _quiet_coco(self.instances)
        return self._coco

    def annotation(self, ref: dict[str, Any] | int) -> dict[str, Any]:
        ann_id = self.ann_id(ref)
        if ann_id not in self.coco.anns:
            raise RecordError(f"annotation {ann_id} is not in {self.folder / 'instances.json'}")
        return self.coco.anns[ann_id]

    def image_file(self, ref: dict[str, Any] | int) -> str:
        """The COCO file name of a ref's image (from instances.json; the ref's own file_name is not it)."""
        image_id = self._as_ref(ref)["image_id"]
        img = self.coco.imgs.get(image_id)
        if img is None:
            raise RecordError(f"image {image_id} is not in {self.folder / 'instances.json'}")
        return str(img["file_name"])

    def mask(self, ref: dict[str, Any] | int):
        """The ref's mask, bool [H, W]."""
        return self.coco.annToMask(self.annotation(ref)).astype(bool)
