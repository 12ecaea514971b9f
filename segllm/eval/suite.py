"""Every evaluation of the paper in one run (``segllm eval --suite paper``).

:data:`PAPER_SUITE` lists them as the original's evaluation scripts run them: which released
conversation file (under ``conversations_folder/``), which released checkpoint
(``mr_refcoco_checkpoint``, ``mr_paco_checkpoint`` or ``all_data_checkpoint``), which history
protocol and, for ReasonSeg test, which annotation folder. :func:`run_suite` runs them grouped
by checkpoint (each model is loaded once, and not at all when its evaluations are done or
their data are missing), measured in the released frame unless told otherwise, and rewrites one
report after each evaluation (:func:`write_suite_report`: Markdown table, JSON and a per-round
plot, the published figures of each setting beside ours).

Resuming: each evaluation appends its finished conversations to ``OUT/logs/KEY.PROTOCOL.jsonl``
(:func:`segllm.eval.evaluate.evaluate`'s log) and, once done, writes ``OUT/evals/KEY.json``; with
``resume`` a finished evaluation run under the same settings is read back, an unfinished one
continues from its log (unless that log was measured in another frame or with another
checkpoint: then it starts afresh), and a killed suite redoes at most the batch it was in.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from segllm.data.records import RecordError
from segllm.data.released.convert import ReleasedConversations
from segllm.errors import SegLLMError
from segllm.eval.benchmarks import Roots, published, setting_label

RELEASED_CHECKPOINTS = ("mr_refcoco_checkpoint", "mr_paco_checkpoint", "all_data_checkpoint")


@dataclass(frozen=True)
class SuiteEval:
    """One evaluation of the paper.

    ``benchmark``, ``split`` and ``template`` name the setting whose published figures sit beside
    the result (see :func:`segllm.eval.benchmarks.published`); ``conversations`` is the released
    conversation file, relative to ``conversations_folder/``; ``checkpoint`` the released
    checkpoint's subfolder; ``annotations``: (dataset name, folder under ``annotations_folder/``)
    pairs that replace the default annotation paths.
    """

    key: str
    benchmark: str
    split: str
    conversations: str
    checkpoint: str
    protocol: str
    template: str = "segllm"
    annotations: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        return setting_label(self.benchmark, self.split, self.template)


def _paper_suite() -> tuple[SuiteEval, ...]:
    # as scripts/eval/*.sh of the original (upstream 4593a06) run them
    evals = [SuiteEval(f"mr-{d}", f"mr-{d}", "val", f"all_data_mix_val/mr_{d}_val.json", "mr_refcoco_checkpoint", "own")
             for d in ("refcoco", "refcoco+", "refcocog")]
    for d, splits in (("refcoco", ("val", "testA", "testB")), ("refcoco+", ("val", "testA", "testB")), ("refcocog", ("val", "test"))):
        evals += [SuiteEval(f"{d}-{s}", d, s, f"refcoco_single_round_val/{d}_{s}.json", "mr_refcoco_checkpoint", "oracle")
                  for s in splits]
    for d in ("refcoco", "refcoco+", "refcocog"):
        evals += [SuiteEval(f"{d}-val-{t}", d, "val", f"refcoco_single_round_val/{d}_val_{t}_templates.json",
                            "mr_refcoco_checkpoint", "oracle", template=t) for t in ("lisa", "sesame")]
    evals.append(SuiteEval("mr-paco", "mr-paco", "val", "all_data_mix_val/mr_paco_val.json", "mr_paco_checkpoint", "oracle"))
    evals += [SuiteEval(f"reasonseg-{s}", "reasonseg", s, f"all_data_mix_val/reason_seg_{s}.json", "all_data_checkpoint", "oracle",
                        annotations=(("reason_seg_eval", f"reason_seg/annotations/{s}"),)) for s in ("val", "test")]
    return tuple(evals)


PAPER_SUITE: tuple[SuiteEval, ...] = _paper_suite()
SUITES: dict[str, tuple[SuiteEval, ...]] = {"paper": PAPER_SUITE}


def checkpoint_path(name: str, *, root: str | None = None, single: str | None = None) -> str:
    """Where released checkpoint ``name`` is: ``single`` for every evaluation when given (one
    model through the whole suite), else ``root/name`` (a folder holding the three checkpoint
    folders, or a hub id such as ``Marlo-Z/SegLLM``, resolved only when the model loads).

    Raises:
        SegLLMError: neither given.
    """
    if single:
        return single
    if not root:
        raise SegLLMError("the suite needs its checkpoints: --checkpoints ROOT (a folder holding "
                          f"{', '.join(RELEASED_CHECKPOINTS)}, or the hub id Marlo-Z/SegLLM) or --checkpoint for all")
    return f"{root.rstrip('/')}/{name}"


@dataclass
class SuiteEntry:
    """What became of one evaluation: ``status`` "done", "not run" (``reason`` says why) or
    "pending"; ``result`` is :meth:`EvalResult.to_dict` of a done one."""

    eval: SuiteEval
    checkpoint: str
    status: str = "pending"
    reason: str = ""
    data: str = ""
    result: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self.eval), "label": self.eval.label, "checkpoint_path": self.checkpoint, "status": self.status,
                "reason": self.reason, "data": self.data, "published": published(self.eval.benchmark, self.eval.split, self.eval.template),
                "result": self.result}


def run_suite(
    evals: Sequence[SuiteEval],
    roots: Roots,
    out: str | Path,
    *,
    checkpoints: Callable[[str], str],
    load: Callable[[str], Any],
    frame: str = "released",
    size: int | None = None,
    batch_size: int = 16,
    resume: bool = False,
    progress: bool = False,
    meta: dict | None = None,
    echo: Callable[[str], None] = lambda line: None,
) -> list[SuiteEntry]:
    """Run ``evals`` and write the report to ``out`` (see the module docstring).

    Args:
        checkpoints: released checkpoint name -> folder or hub id (see :func:`checkpoint_path`).
        load: folder or hub id -> model (loaded once per checkpoint, dropped before the next).
        frame: "released" (the paper's measurement) or "original".
        size: at most this many conversations per evaluation.
        resume: keep finished evaluations and continue unfinished ones from their logs.
        echo: receives one line per event (loading, finished, not run).
    Returns the entries in ``evals``' order. Missing or unreadable data and a checkpoint that
    cannot be loaded (:class:`SegLLMError`) leave their evaluations "not run"; the others run.
    """
    out = Path(out)
    (out / "evals").mkdir(parents=True, exist_ok=True)
    if not resume:
        for stale in (out / "evals").glob("*.json"):
            stale.unlink()
    entries = [SuiteEntry(e, checkpoints(e.checkpoint)) for e in evals]
    settings = {"frame": frame, "size": size}
    meta = {**(meta or {}), **settings}
    for ckpt in dict.fromkeys(e.checkpoint for e in entries):
        todo = []
        for entry in (e for e in entries if e.checkpoint == ckpt):
            done = _finished(out, entry, settings) if resume else None
            if done is not None:
                entry.status, entry.data, entry.result = "done", done["data"], done["result"]
                echo(f"{entry.eval.key}: done in an earlier run")
                continue
            try:
                data = _open(entry.eval, roots)
            except (RecordError, SegLLMError, ValueError) as err:  # missing or unreadable data: the others still run
                entry.status, entry.reason = "not run", str(err)
                echo(f"{entry.eval.key}: not run: {err}")
                continue
            entry.data = f"{data.json_path} ({len(data)} conversations)"
            todo.append((entry, data))
        write_suite_report(entries, out, meta=meta)
        if not todo:
            continue
        echo(f"loading {ckpt}")
        try:
            model = load(ckpt)
        except SegLLMError as err:  # not downloaded, say: the other checkpoints' evaluations still run
            for entry, _ in todo:
                entry.status, entry.reason = "not run", f"checkpoint {ckpt}: {err}"
            echo(f"not run: {', '.join(en.eval.key for en, _ in todo)}: checkpoint {ckpt}: {err}")
            continue
        for entry, data in todo:
            e = entry.eval
            # a log measured in another frame or of another checkpoint cannot be continued
            stamp = out / "logs" / f"{e.key}.{e.protocol}.settings.json"
            stamped = {"eval": asdict(e), "checkpoint": ckpt, "frame": frame}
            prior = _read_json(stamp)
            same = resume and prior == json.loads(json.dumps(stamped))
            if resume and prior is not None and not same:
                echo(f"{e.key}: its log was run under other settings; starting it afresh")
            stamp.parent.mkdir(parents=True, exist_ok=True)
            stamp.write_text(json.dumps(stamped) + "\n")
            res = evaluate(model, data, protocol=e.protocol, limit=size, batch_size=batch_size, frame=frame, progress=progress,
                           log_path=out / "logs" / f"{e.key}.{e.protocol}.jsonl", resume=same)
            entry.status, entry.result = "done", res.to_dict()
            (out / "evals" / f"{e.key}.json").write_text(json.dumps(
                {"eval": asdict(e), "checkpoint": ckpt, "settings": settings, "data": entry.data, "result": entry.result}) + "\n")
            echo(f"{e.key}: done ({res.conversations} conversations, cIoU {res.metrics.get('all', {}).get('cIoU', float('nan')):.1f})")
            write_suite_report(entries, out, meta=meta)
        del model  # a 7B model per checkpoint: free it before loading the next
        gc.collect()
    write_suite_report(entries, out, meta=meta)
    return entries


def evaluate(*args, **kwargs):
    """:func:`segllm.eval.evaluate.evaluate`, imported when a suite runs: it loads torch, and this
    module's :data:`SUITES` is read by the command line's parser, which starts without torch."""
    from segllm.eval.evaluate import evaluate as run

    return run(*args, **kwargs)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _finished(out: Path, entry: SuiteEntry, settings: dict) -> dict | None:
    """The saved outcome of ``entry`` if an earlier run finished it with the same evaluation,
    checkpoint and settings, else None (it is then run again, resuming from its log where that
    was run in the same frame with the same checkpoint)."""
    saved = _read_json(out / "evals" / f"{entry.eval.key}.json")
    if not isinstance(saved, dict):
        return None
    same = saved.get("eval") == json.loads(json.dumps(asdict(entry.eval))) and saved.get("checkpoint") == entry.checkpoint
    return saved if same and saved.get("settings") == settings else None


def _open(e: SuiteEval, roots: Roots) -> ReleasedConversations:
    path = roots.get("conversations") / e.conversations
    if not path.is_file():
        raise RecordError(f"missing conversations_folder/{e.conversations}")
    return ReleasedConversations(path, roots.get("images"), roots.get("annotations"), is_eval=True,
                                 overrides=dict(e.annotations) or None)


# ------------------------------------------------------------------------------------ report


def _ours(entry: SuiteEntry) -> str:
    if entry.status != "done":
        return f"{entry.status}: {entry.reason}" if entry.reason else entry.status
    m = entry.result["per_round"].get("all")
    if not m:
        return "no masks scored"
    if entry.eval.benchmark == "reasonseg":
        return f"gIoU {m['mIoU']:.1f}, cIoU {m['cIoU']:.1f}"
    return f"cIoU {m['cIoU']:.1f}"


def _paper(entry: SuiteEntry) -> str:
    fig = published(entry.eval.benchmark, entry.eval.split, entry.eval.template)
    if fig is None:
        return "no published figure"
    if "rounds" in fig:
        return "per round, below"
    return ", ".join(f"{k} {v}" for k, v in fig["SegLLM"].items())


def suite_markdown(entries: Sequence[SuiteEntry], *, meta: dict | None = None) -> str:
    """The report as Markdown: one row per evaluation (ours beside the published SegLLM figure of
    the same setting), then per-round cIoU of the multi-round evaluations (ours / paper)."""
    meta = meta or {}
    frame = meta.get("frame", "released")
    lines = ["# SegLLM: the paper's evaluations", "",
             f"Metrics {'in the released code frame (the paper measurement)' if frame == 'released' else 'at the original image resolution (not the paper measurement)'}"
             + (f"; at most {meta['size']} conversations per evaluation" if meta.get("size") else "") + ".", "",
             "| evaluation | checkpoint | protocol | conversations | ours | paper (SegLLM) |",
             "| --- | --- | --- | ---: | --- | --- |"]
    for en in entries:
        n = en.result["conversations"] if en.result else "-"
        lines.append(f"| {en.eval.label} | {en.eval.checkpoint} | {en.eval.protocol} | {n} | {_ours(en)} | {_paper(en)} |")
    multi = [en for en in entries if en.eval.benchmark.startswith("mr-")]
    if multi:
        rounds = sorted({int(k) for en in multi if en.result for k in en.result["per_round"] if k != "all"}
                        | {k for en in multi for k in (published(en.eval.benchmark, en.eval.split) or {}).get("rounds", {})})
        lines += ["", "Per-round cIoU, ours / paper (SegLLM):", "",
                  "| round | " + " | ".join(en.eval.label for en in multi) + " |",
                  "| ---: | " + " | ".join("---" for _ in multi) + " |"]
        for k in rounds:
            cells = []
            for en in multi:
                m = en.result["per_round"].get(str(k)) if en.result else None
                fig = (published(en.eval.benchmark, en.eval.split) or {}).get("rounds", {}).get(k)
                paper = f"{fig['SegLLM']}" if fig else ("no published figure" if published(en.eval.benchmark, en.eval.split) is None else "-")
                cells.append(f"{m['cIoU']:.1f} / {paper}" if m else f"- / {paper}")
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_suite_report(entries: Sequence[SuiteEntry], out: str | Path, *, meta: dict | None = None) -> list[Path]:
    """Write ``paper.md``, ``paper.json`` and ``paper_rounds.png`` (per-round cIoU of the
    multi-round evaluations: ours solid, the published SegLLM figures dashed) to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md, js, png = out / "paper.md", out / "paper.json", out / "paper_rounds.png"
    md.write_text(suite_markdown(entries, meta=meta))
    js.write_text(json.dumps({"meta": meta or {}, "evaluations": [en.to_dict() for en in entries]}, indent=2) + "\n")
    series, dashed = {}, set()
    for en in entries:
        if not en.eval.benchmark.startswith("mr-"):
            continue
        if en.result:
            series[en.eval.key] = {int(k): m["cIoU"] for k, m in en.result["per_round"].items() if k != "all"}
        fig = published(en.eval.benchmark, en.eval.split)
        if fig:
            label = f"{en.eval.key} (paper)"
            series[label] = {k: v["SegLLM"] for k, v in fig["rounds"].items()}
            dashed.add(label)
    from segllm.eval.report import plot_series  # imported here: it loads torch (see evaluate)

    plot_series(series, png, title="paper suite: cIoU", dashed=dashed)
    return [md, js, png]
