"""The paper's benchmarks: how each one's data is opened, its default protocol and metric frame,
and the published figures to print next to a result (SEGLLM_FACTS section 5).

Data paths default to the released folder layout under one root (``images_folder/``,
``annotations_folder/``, ``conversations_folder/``); each root can be given on its own.

Published figures are kept per setting (benchmark, split, question template): a setting the
paper's tables do not cover has none, and is reported as "no published figure", never with the
figure of a neighbouring setting (the default template's for another template, say). Every
benchmark here is measured by default as the paper measured it, in the released code's frame
(see :func:`default_frame`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segllm.data.benchmark_readers import REFS_FILE, ReasonSegData, RefcocoSentences
from segllm.data.check import DataCheck, check_conversation_files, image_need, path_need
from segllm.data.mix import ConcatConversations
from segllm.data.records import RecordError
from segllm.data.released.convert import ReleasedConversations
from segllm.data.released.masks import MaskLookup
from segllm.data.released.refer import load_refs

if TYPE_CHECKING:  # evaluate imports torch: this module stays light (the command line's choices)
    from segllm.eval.evaluate import EvalResult

# Published per-round cIoU on MR-RefCOCO/+/g and MR-PACO (val), LISA / GLaMM / SegLLM (None: no
# figure), with where each benchmark's come from and the history protocol their source states.
# MR-PACO's (rounds 2-5, no GLaMM) are those Table 2 of the SAMTok project page reports
# (zhouyiks.github.io, projects/SAMTok/figures/table2.png, commit 13ce066): the SegLLM paper's own
# MR-PACO table could not be read here; that Table 2's MR-RefCOCO/+/g columns are the round-by-round
# means of the figures below to 0.1, so it copies the paper's. It does not name a history protocol.
_MR = {
    "mr-refcoco": {2: (60.6, 59.5, 81.9), 3: (58.9, 61.6, 81.7), 4: (61.3, 59.3, 78.4), 5: (61.0, 62.6, 80.3),
                   6: (60.7, 62.6, 74.5), 7: (54.4, 52.1, 69.3), 8: (51.9, 50.7, 70.5)},
    "mr-refcoco+": {2: (51.4, 52.9, 78.0), 3: (51.2, 58.3, 78.5), 4: (49.0, 54.2, 74.3), 5: (48.5, 50.5, 76.5),
                    6: (45.6, 54.8, 73.4), 7: (42.8, 48.4, 64.0), 8: (36.9, 43.6, 59.0)},
    "mr-refcocog": {2: (61.3, 65.4, 79.2), 3: (52.1, 57.8, 76.0), 4: (56.0, 55.4, 77.1), 5: (47.5, 49.4, 66.9),
                    6: (39.9, 40.8, 68.9), 7: (55.1, 57.8, 71.0), 8: (36.3, 38.4, 54.9)},
    "mr-paco": {2: (15.5, None, 49.7), 3: (21.3, None, 40.9), 4: (18.7, None, 39.4), 5: (20.5, None, 41.9)},
}
_MR_SOURCES = {
    **dict.fromkeys(("mr-refcoco", "mr-refcoco+", "mr-refcocog"), ("SegLLM paper, MR-RefCOCO table (per-round cIoU)", "own-history protocol")),
    "mr-paco": ("SegLLM's MR-PACO figures as SAMTok's Table 2 reports them (per-round cIoU)", "history protocol not stated in the source"),
}
# SegLLM's single-round cIoU as reported by others, with SegLLM's own question ("Segment the X.");
# ReasonSeg (gIoU, cIoU).
_SINGLE = {
    "refcoco": {"val": 80.2, "testA": 81.5, "testB": 75.4},
    "refcoco+": {"val": 70.3, "testA": 73.0, "testB": 62.5},
    "refcocog": {"val": 72.6, "test": 73.6},
}
_REASONSEG = {"val": (57.2, 54.3), "test": (52.4, 48.4)}
# Not on file: the RefCOCO figures with LISA's and SESAME's question templates. The paper has a
# table for them, but its text could not be read where these figures were collected; until they
# are added here (with their table), those settings print "no published figure" rather than a
# figure of another setting.


@dataclass(frozen=True)
class Benchmark:
    """A benchmark of the paper. ``conversations``, ``annotations`` and ``images`` are what a
    released-kind benchmark reads besides what its records name: its usual conversation file
    (under ``conversations_folder/``), the datasets of the original's annotation config for it and
    its image sets; the data check lists them even when the conversation file is missing."""

    name: str
    kind: str  # "released" (a released conversation file), "refcoco" (REFER files), "reasonseg"
    protocol: str  # the paper's history protocol
    help: str
    conversations: str | None = None
    annotations: tuple[str, ...] = ()
    images: tuple[str, ...] = ()


def _mr(name: str, protocol: str, dataset: str, image_set: str, what: str) -> Benchmark:
    file = f"all_data_mix_val/{name.replace('-', '_')}_val.json"
    return Benchmark(name, "released", protocol, f"multi-round {what} (a released conversation file, usually {file})",
                     file, (dataset,), (image_set,))


BENCHMARKS: dict[str, Benchmark] = {
    "mr-refcoco": _mr("mr-refcoco", "own", "refcoco", "coco/train2014", "RefCOCO"),
    "mr-refcoco+": _mr("mr-refcoco+", "own", "refcoco+", "coco/train2014", "RefCOCO+"),
    "mr-refcocog": _mr("mr-refcocog", "own", "refcocog", "coco/train2014", "RefCOCOg"),
    "mr-paco": _mr("mr-paco", "oracle", "paco_lvis", "coco/train2017", "PACO"),
    "released": Benchmark("released", "released", "oracle", "any released conversation file"),
    "refcoco": Benchmark("refcoco", "refcoco", "oracle", "single-round RefCOCO from the REFER files"),
    "refcoco+": Benchmark("refcoco+", "refcoco", "oracle", "single-round RefCOCO+ from the REFER files"),
    "refcocog": Benchmark("refcocog", "refcoco", "oracle", "single-round RefCOCOg from the REFER files"),
    "reasonseg": Benchmark("reasonseg", "reasonseg", "oracle", "ReasonSeg (gIoU = mIoU, cIoU, ignore regions as LISA)"),
}


@dataclass
class Roots:
    """Where the data lies: the released layout under ``root`` unless a root is given."""

    root: Path | None = None
    images: Path | None = None
    annotations: Path | None = None
    conversations: Path | None = None

    def get(self, which: str) -> Path:
        given = getattr(self, which)
        if given is not None:
            return Path(given)
        if self.root is None:
            raise ValueError(f"give --data-root (the released layout) or --{which}")
        return Path(self.root) / f"{which}_folder"


def _conversation_paths(name: str, roots: Roots, conversations: str | Sequence[str] | None) -> list[Path]:
    """The conversation file(s) of a released-kind benchmark: those given (a relative path that
    is not there is looked for under the conversations root), else the benchmark's usual one."""
    if conversations is None:
        if BENCHMARKS[name].conversations is None:
            raise ValueError(f"{name}: pass --conversations FILE (a released conversation JSON, e.g. under conversations_folder/)")
        return [roots.get("conversations") / BENCHMARKS[name].conversations]
    out = []
    for c in [conversations] if isinstance(conversations, str | Path) else conversations:
        path = Path(c)
        if not path.is_absolute() and not path.exists() and (roots.root is not None or roots.conversations is not None):
            path = roots.get("conversations") / path
        out.append(path)
    return out


def _reasonseg_folders(roots: Roots, split: str) -> tuple[Path, Path]:
    """(images, annotations) folders of a ReasonSeg split."""
    if roots.images is not None and roots.annotations is None:  # LISA's layout: jpg and json side by side
        return Path(roots.images) / split, Path(roots.images) / split
    images = roots.get("images") / "reason_seg" / "images" / split if roots.images is None else Path(roots.images) / split
    return images, roots.get("annotations") / "reason_seg" / "annotations" / split


def _refcoco_images(roots: Roots) -> Path:
    return Path(roots.images) if roots.images is not None else roots.get("images") / "coco" / "train2014"


def open_benchmark(name: str, roots: Roots, *, split: str, conversations: str | Sequence[str] | None = None,
                   templates: list[str] | None = None, max_rounds: int | None = None,
                   overrides: Mapping[str, str] | None = None) -> tuple[Any, str]:
    """The dataset of benchmark ``name`` and a description of it.

    ``conversations``: a released-kind benchmark's conversation file, or several (read as one
    dataset, in order); ``overrides``: where datasets' masks are, as :class:`MaskLookup` takes them
    (from an annotation config and ``--annotation``), for released conversation files.

    Raises:
        ValueError: an unknown benchmark or missing paths (the message says what to pass).
        segllm.data.records.RecordError: unreadable data (the message names the file).
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}: one of {sorted(BENCHMARKS)}")
    bench = BENCHMARKS[name]
    if bench.kind == "released":
        paths = _conversation_paths(name, roots, conversations)
        lookup = MaskLookup(roots.get("annotations"), overrides=overrides, is_eval=True)
        parts = [ReleasedConversations(p, roots.get("images"), lookup.root, max_rounds=max_rounds, lookup=lookup) for p in paths]
        data = parts[0] if len(parts) == 1 else ConcatConversations(parts)
        return data, f"{name} ({', '.join(map(str, paths))}, {len(data)} conversations)"
    if bench.kind == "refcoco":
        data = RefcocoSentences(roots.get("annotations"), _refcoco_images(roots), dataset=name, split=split, templates=templates)
        return data, f"{name} {split} ({len(data)} sentences)"
    images, annotations = _reasonseg_folders(roots, split)
    data = ReasonSegData(images, annotations)
    return data, f"reasonseg {split} ({len(data)} images)"


def default_frame(benchmark: str | None) -> str:
    """The metric frame an evaluation uses unless told otherwise: "released" (the released code's
    1024 decoder frame, as the paper measured) for the paper's benchmarks and released
    conversation files, "original" (the image's resolution) for the world and dataset folders."""
    return "released" if benchmark in BENCHMARKS else "original"


def published(name: str, split: str = "val", template: str = "segllm") -> dict[str, Any] | None:
    """The published figures of one setting, or None where the paper's tables give none.

    Returns ``{"source": str, "protocol": str, "rounds": {round: {"LISA": v, "GLaMM": v, "SegLLM": v}}}``
    (per-round cIoU, percent; ``None`` where a method has no figure; ``protocol``: the history
    protocol the figures were measured with, as their source says) for the multi-round benchmarks, else ``{"source": str, "SegLLM": {metric: v}}``
    (cIoU; ReasonSeg also gIoU). ``template`` is the question template of a single-round RefCOCO
    run: only SegLLM's own ("segllm") has figures on file.
    """
    if name in _MR and split == "val":
        rounds = {k: dict(zip(("LISA", "GLaMM", "SegLLM"), v)) for k, v in _MR[name].items()}
        source, protocol = _MR_SOURCES[name]
        return {"source": source, "protocol": protocol, "rounds": rounds}
    if name in _SINGLE and template == "segllm" and split in _SINGLE[name]:
        return {"source": "SegLLM's single-round cIoU as reported", "SegLLM": {"cIoU": _SINGLE[name][split]}}
    if name == "reasonseg" and split in _REASONSEG:
        giou, ciou = _REASONSEG[split]
        return {"source": "SegLLM's ReasonSeg figures as reported", "SegLLM": {"gIoU": giou, "cIoU": ciou}}
    return None


def setting_label(name: str, split: str, template: str = "segllm") -> str:
    """How a setting is named in printed lines and reports, e.g. "refcoco val (lisa template)"."""
    label = f"{name} {split}" if split else name
    return label + (f" ({template} template)" if template != "segllm" else "")


def frame_label(frame: str) -> str:
    """Which measurement a result is, for printed lines next to published figures."""
    return "released frame, as the paper" if frame == "released" else "original resolution, not the paper's measurement"


def check_benchmark(name: str, roots: Roots, *, split: str = "val", conversations: str | Sequence[str] | None = None,
                    overrides: Mapping[str, str] | None = None) -> DataCheck:
    """What benchmark ``name`` needs from the data and whether it is there (no model, no masks
    decoded): the conversation file(s) with their record counts and the image sets and
    annotations their records use (released kind), the REFER files and the split's refs and
    sentences (refcoco kind), or the split's folders and files (reasonseg).

    Raises:
        ValueError: an unknown benchmark, or no data root where one is needed.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}: one of {sorted(BENCHMARKS)}")
    bench = BENCHMARKS[name]
    if bench.kind == "released":
        check = DataCheck(name, "benchmark")
        lookup = MaskLookup(roots.get("annotations"), overrides=overrides, is_eval=True)
        for d in bench.annotations:
            check.add(path_need("annotations", f"{d} ({lookup.path(d).relative_to(lookup.root)})", lookup.path(d), key=d))
        for s in bench.images:
            check.add(image_need(roots.get("images"), s))
        conv_root = roots.get("conversations") if roots.root is not None or roots.conversations is not None else None
        files = [(str(p.relative_to(conv_root)) if conv_root and p.is_relative_to(conv_root) else str(p), p)
                 for p in _conversation_paths(name, roots, conversations)]
        check_conversation_files(check, files, roots.get("images"), roots.get("annotations"), is_eval=True,
                                 overrides=overrides)
        for n in check.missing:
            if n.what == "conversations" and conversations is None and not n.detail:
                n.detail = "the benchmark's usual file; another with --conversations FILE"
        return check
    check = DataCheck(f"{name} {split}", "benchmark")
    if bench.kind == "refcoco":
        folder = roots.get("annotations") / name
        check.add(path_need("annotations", f"{name}/instances.json", folder / "instances.json", key=name))
        refs = path_need("annotations", f"{name}/{REFS_FILE[name]}", folder / REFS_FILE[name], key=name)
        if refs.present:
            try:
                mine = [r for r in load_refs(refs.path) if isinstance(r, dict) and r.get("split") == split]
            except RecordError as e:
                refs.present, refs.detail = False, f"unreadable: {e}"
            else:
                refs.records = sum(len(r.get("sentences") or ()) for r in mine)
                refs.detail = f"{len(mine)} refs, {refs.records} sentences in {split}"
                if not mine:
                    refs.present, refs.detail = False, f"no refs in split {split!r}"
        check.add(refs)
        images = _refcoco_images(roots)
        check.add(path_need("images", "coco/train2014" if roots.images is None else str(images), images, key="coco/train2014"))
        return check
    images, annotations = _reasonseg_folders(roots, split)
    check.add(path_need("images", f"reason_seg/images/{split}", images, key="reason_seg"))
    ann = path_need("annotations", f"reason_seg/annotations/{split}", annotations, key="reason_seg")
    if ann.present:
        ann.records = sum(1 for _ in annotations.glob("*.json"))
        if not ann.records:
            ann.present, ann.detail = False, "no .json files"
    check.add(ann)
    return check


def paper_lines(name: str, split: str, results: list[EvalResult], *, template: str = "segllm") -> list[str]:
    """Lines comparing ``results`` with the published figures of exactly this setting (benchmark,
    split, question template), or saying that there is no published figure; each names the
    frame the result was measured in. The generic ``released`` benchmark (any file) gets none."""
    if name not in BENCHMARKS or name == "released":
        return []
    label = setting_label(name, split, template)
    figures = published(name, split, template)
    lines: list[str] = []
    if figures is None:
        for r in results:
            m = r.metrics.get("all")
            ours = f"cIoU {m['cIoU']:.1f}" + (f" gIoU {m['mIoU']:.1f}" if name == "reasonseg" else "") if m else "no masks"
            lines.append(f"{label}: here ({r.protocol}, {frame_label(r.frame)}) {ours}   no published figure")
        return lines
    if "rounds" in figures:
        lines.append(f"published per-round cIoU on {label} (LISA / GLaMM / SegLLM; {figures['protocol']}; "
                     f"{figures['source']}):")
        for r in results:
            for k, fig in sorted(figures["rounds"].items()):
                m = r.metrics.get(str(k))
                ours = f"{m['cIoU']:.1f}" if m else "-"
                paper = " / ".join("-" if fig[w] is None else f"{fig[w]}" for w in ("LISA", "GLaMM", "SegLLM"))
                lines.append(f"  round {k}: here ({r.protocol}, {frame_label(r.frame)}) {ours:>5}   paper {paper}")
        return lines
    seg = figures["SegLLM"]
    for r in results:
        m = r.metrics["all"]
        if name == "reasonseg":
            lines.append(f"{label}: here ({r.protocol}, {frame_label(r.frame)}) gIoU {m['mIoU']:.1f} cIoU {m['cIoU']:.1f}"
                         f"   SegLLM (reported) gIoU {seg['gIoU']} cIoU {seg['cIoU']}")
        else:
            lines.append(f"{label} cIoU: here ({r.protocol}, {frame_label(r.frame)}) {m['cIoU']:.1f}   SegLLM (reported) {seg['cIoU']}")
    return lines
