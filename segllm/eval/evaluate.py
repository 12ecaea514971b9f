"""Per-round evaluation under two history protocols.

- ``oracle``: later rounds see the ground-truth masks and answers of earlier rounds (as most of
  the released evaluations do); answers are teacher-forced, so one pass per batch suffices.
- ``own``: later rounds see the model's own earlier answers and masks, as a user experiences
  it; each round is generated in turn. Where the model answers without ``<seg>``, one mask is
  forced (the released demo always asks for one). Where a round refers to an earlier round
  whose own mask is empty, that reference cannot be encoded: the round keeps the text only and
  the event is counted (``empty_refs``).
Metrics are computed at the original image resolution, or (``frame="released"``) exactly as
the released code computes them.

Datasets that offer ``scene(i)`` (:class:`segllm.data.records.SceneAnnotations`: the world, and
folders of this package's format) also get grounding diagnostics (:class:`Diagnostics`): per
round, per question family and for text-resolvable rounds vs the others, the grounded rate
and IoU given grounded (see :func:`segllm.eval.metrics.grounding`). A *pick* round ("Segment
one of the red objects.") is scored against the best-matching valid alternative (the one with
the highest IoU). Under the ``own`` protocol, a pick round's history entry for later rounds is
the recorded target's ground-truth mask, not the model's own: later rounds' ground truth
assumes that choice, so a model that picked another (equally valid) object is not penalised
twice. A round with several targets ("Segment all the red objects.": one ground-truth mask
per target) is scored matched and as a union (:func:`segllm.eval.metrics.score_targets`): each
target paired one to one with a predicted mask (the pairs enter the per-round numbers; a target
without one scores IoU 0), and the union of the predicted masks against the union of the targets
(the paper's benchmarks' rule, one mask per round), both reported under ``multi_target``. Under
the ``own`` protocol such a round keeps the answer the model gave, however many ``<seg>`` it has
(a round with one target and no ``<seg>`` is asked again with one forced, as before).
:func:`evaluate_baseline` scores the question-blind baseline (the union of all
top-level objects as every round's prediction) the same way. Each finished conversation is appended to a log, so an
interrupted evaluation resumes where it stopped, and several processes can share the work.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from segllm.config import MAX_NEW_TOKENS
from segllm.conversation import Conversation, Round
from segllm.errors import SegLLMError
from segllm.eval.metrics import (
    Diagnostics,
    RoundMetrics,
    grounding,
    mask_box,
    mask_scores,
    released_frame_gt,
    score_targets,
)
from segllm.lanes import default_lanes, lane_pool
from segllm.model.rounds import RoundEngine, masks_referable
from segllm.session import Reply, Session

log = logging.getLogger(__name__)

Protocol = Literal["oracle", "own"]


@dataclass
class EvalResult:
    protocol: str
    metrics: dict[str, dict[str, float]]
    conversations: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    empty_refs: int = 0
    no_seg_answers: int = 0
    frame: str = "original"
    diagnostics: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    # rounds with several targets: MultiTargetStats.summary() (empty without such rounds)
    multi_target: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "frame": self.frame,
            "conversations": self.conversations,
            "skipped": len(self.skipped),
            "skipped_records": [{"where": w, "reason": r} for w, r in self.skipped],
            "empty_refs": self.empty_refs,
            "no_seg_answers": self.no_seg_answers,
            "per_round": self.metrics,
            "diagnostics": self.diagnostics,
            "multi_target": self.multi_target,
        }


Frame = Literal["original", "released"]


@dataclass
class _Log:
    """One conversation's outcome, as written to (and read back from) an evaluation log.

    ``masks``: (round, I, U, IoU, box hit, grounded, family, text-resolvable) per ground-truth
    mask; the last three are None where unknown (and absent from older logs). ``multi``: per
    round with several targets, (round, union I, union U, missing, extra) (see
    :func:`segllm.eval.metrics.score_targets`); its targets' matched scores are in ``masks``.
    """

    index: int
    masks: list[tuple] = field(default_factory=list)
    skipped: tuple[str, str] | None = None
    empty_refs: int = 0
    no_seg_answers: int = 0
    multi: list[tuple] = field(default_factory=list)

    def to_json(self) -> str:
        d: dict[str, Any] = {"index": self.index}
        if self.skipped is not None:
            d["skipped"] = list(self.skipped)
        else:
            d["masks"] = [list(m) for m in self.masks]
            d["empty_refs"], d["no_seg_answers"] = self.empty_refs, self.no_seg_answers
            if self.multi:
                d["multi"] = [list(m) for m in self.multi]
        return json.dumps(d)

    @classmethod
    def from_json(cls, line: str) -> _Log:
        d = json.loads(line)
        if "skipped" in d:
            return cls(int(d["index"]), skipped=tuple(d["skipped"]))
        masks = []
        for m in d["masks"]:
            r, i, u, iou, hit, *extra = m
            g, fam, tr = (list(extra) + [None, None, None])[:3]
            masks.append((int(r), int(i), int(u), float(iou), bool(hit), None if g is None else bool(g), fam,
                          None if tr is None else bool(tr)))
        multi = [(int(r), int(i), int(u), int(mi), int(ex)) for r, i, u, mi, ex in d.get("multi", [])]
        return cls(int(d["index"]), masks, None, int(d.get("empty_refs", 0)), int(d.get("no_seg_answers", 0)), multi)


def log_rows(paths) -> dict[int, list[tuple]]:
    """The scored conversations of evaluation logs (``segllm eval``'s ``NAME.PROTOCOL.rankR.jsonl``;
    several processes' files together), for analyses of single rounds.

    Returns:
        conversation index -> its rows, one per ground-truth mask: (round, intersection,
        union (pixels), IoU, box hit, grounded, family, text-resolvable), the last three None
        where the log does not hold them. Unusable records and lines a run killed mid-write cut
        short are left out; a conversation logged twice keeps its first line.

    Raises:
        FileNotFoundError: a path that is not a file.
    """
    rows: dict[int, list[tuple]] = {}
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no evaluation log at {path}")
        for entry in _read_log(Path(path)):
            if entry.skipped is None:
                rows.setdefault(entry.index, entry.masks)
    return rows


def read_logs(paths, *, protocol: str, frame: Frame = "original", dataset=None) -> EvalResult:
    """An :class:`EvalResult` from evaluation logs (one or several processes' files).

    Lines that cannot be parsed (a run killed mid-write) are ignored; a conversation logged
    twice counts once. ``dataset``: the one evaluated; the records it dropped while reading its
    files (which no log line holds) count as skipped, first, as :func:`evaluate` counts them.
    """
    metrics, diag = RoundMetrics(), Diagnostics()
    result = EvalResult(protocol, {}, 0, frame=frame)
    if dataset is not None:
        result.skipped.extend(_unreadable(dataset))
    seen: set[int] = set()
    for path in paths:
        for entry in _read_log(Path(path)):
            if entry.index in seen:
                continue
            seen.add(entry.index)
            _account(entry, metrics, result, diag)
    _finish(result, metrics, diag)
    return result


def _unreadable(dataset) -> list[tuple[str, str]]:
    """The records ``dataset`` dropped while reading its files (see :func:`evaluate`)."""
    return [tuple(item) for item in getattr(dataset, "unreadable", ())]


def _finish(result: EvalResult, metrics: RoundMetrics, diag: Diagnostics) -> None:
    result.metrics = metrics.summary()
    result.multi_target = metrics.multi.summary() if metrics.multi.rounds else {}
    # only where some mask could be checked for grounding (datasets with scene annotations)
    result.diagnostics = diag.summary() if diag.groups["per_round"].get("all") and diag.groups["per_round"]["all"].grounded else {}


def _read_log(path: Path) -> list[_Log]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(_Log.from_json(line))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by an interruption: that conversation is redone
    return out


def _account(entry: _Log, metrics: RoundMetrics, result: EvalResult, diag: Diagnostics) -> None:
    if entry.skipped is not None:
        result.skipped.append(entry.skipped)
        return
    for m in entry.masks:
        r, inter, union, iou, hit, g, fam, tr = (tuple(m) + (None, None, None))[:8]
        metrics.add_counts(r, inter, union, iou, hit)
        diag.add(r, inter, union, iou, g, fam, tr)
    for r, inter, union, missing, extra in entry.multi:
        targets = [(m[1], m[2], m[3]) for m in entry.masks if m[0] == r]
        metrics.multi.add(targets, inter, union, missing, extra)
    result.conversations += 1
    result.empty_refs += entry.empty_refs
    result.no_seg_answers += entry.no_seg_answers


@torch.no_grad()
def evaluate(
    model,
    dataset,
    *,
    protocol: Protocol = "oracle",
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: bool = False,
    frame: Frame = "original",
    log_path: str | Path | None = None,
    resume: bool = False,
    rank: int = 0,
    world_size: int = 1,
    session_factory=None,
    lanes: int = 1,
) -> EvalResult:
    """Evaluate ``model`` on ``dataset`` (anything with ``len`` and ``get(i) -> Conversation | None``).

    Args:
        protocol: "oracle" or "own" (see the module docstring).
        limit: evaluate the first ``limit`` conversations.
        batch_size: conversations evaluated together: one teacher-forced pass (oracle protocol),
            or one batch of :meth:`segllm.model.rounds.RoundEngine.extend_batch` rounds (own
            protocol; the same rounds, answers and masks as one ``Session`` per conversation).
        frame: "original" (metrics at the image's resolution) or "released" (the released
            code's 1024 frame, padding included, IoU = I / (U + 1e-4); see
            :mod:`segllm.eval.metrics`).
        log_path: append one line per finished conversation here (I, U, IoU and box hit per
            mask), so an interrupted run can resume.
        resume: skip the conversations already in ``log_path``.
        rank, world_size: this process evaluates conversations ``i`` with
            ``i % world_size == rank`` (several processes, each with its own log).
        session_factory: builds the :class:`segllm.session.Session` that plays a conversation
            under the own protocol, one conversation at a time (default: none: conversations
            are played ``batch_size`` at a time, as ``Session`` plays them).
        lanes: batches evaluated at once, each on its own thread, the torch threads shared out
            among them (:mod:`segllm.lanes`; 0: its default, 2 on a CPU with 2 or more threads
            for a model under a billion parameters). The logs are the same line for line: the
            batches are the same, each computed as alone, and recorded in order. Not with
            ``session_factory``. The dataset is read on the calling thread only.

    A dataset may also offer ``ignore(i)``: per round, per mask, a [H, W] bool mask of pixels
    left out of the metrics (or None); ReasonSeg's ignore regions, scored as LISA does; and
    ``unreadable``: (where, reason) of records it dropped while reading its files (malformed lines
    of a conversations file), which no index reaches; they count as skipped (on rank 0 only).
    Returns the metrics of the conversations this process evaluated (resumed ones included).
    """
    if protocol not in ("oracle", "own"):
        raise ValueError(f"unknown protocol {protocol!r} (oracle or own)")
    if frame not in ("original", "released"):
        raise ValueError(f"unknown frame {frame!r} (original or released)")
    was_training = model.training
    model.eval()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    metrics, diag = RoundMetrics(), Diagnostics()
    result = EvalResult(protocol, {}, 0, frame=frame)
    if rank == 0:
        result.skipped.extend(_unreadable(dataset))
    done: set[int] = set()
    log_file = None
    if log_path is not None:
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if resume:
            kept = []
            for entry in _read_log(log_path):
                if entry.index not in done and entry.index < n:
                    done.add(entry.index)
                    kept.append(entry)
                    _account(entry, metrics, result, diag)
            # rewrite the log without a line an interruption cut short, so appending stays clean
            tmp = log_path.with_suffix(".tmp")
            tmp.write_text("".join(e.to_json() + "\n" for e in kept), encoding="utf-8")
            tmp.replace(log_path)
        elif log_path.exists():
            log_path.unlink()
        log_file = open(log_path, "a", encoding="utf-8")
    todo = [i for i in range(n) if i % world_size == rank and i not in done]
    bar = tqdm(total=len(todo), desc=f"eval ({protocol})", disable=not progress, unit="conv")
    scorer = _Scorer(model, dataset, frame, session_factory)
    one_by_one = protocol == "own" and session_factory is not None
    n_lanes = 1 if one_by_one else min(default_lanes(model, lanes), max(1, -(-len(todo) // batch_size)))

    def record(entry: _Log) -> None:
        _account(entry, metrics, result, diag)
        if log_file is not None:
            log_file.write(entry.to_json() + "\n")
            log_file.flush()
        bar.update(1)

    # outputs in the order of the conversations: a batch's entries, or the future of a batch a
    # lane is scoring, with the indices read ahead for it and the unusable records read among
    # its conversations; recorded in index order, so the log is the same line for line with or
    # without lanes
    in_flight: collections.deque = collections.deque()
    pool = None
    # with lanes, a batch waits for a free lane while the others are scored: two per lane
    window = 2 * n_lanes - 1 if n_lanes > 1 else 0

    def settle(keep: int) -> None:
        """Record the oldest outputs until at most ``keep`` remain in flight."""
        while len(in_flight) > keep:
            out, indices, skips = in_flight.popleft()
            entries = out.result() if isinstance(out, Future) else out
            scorer.forget(indices)
            for entry in sorted([*entries, *skips], key=lambda e: e.index):
                record(entry)

    def submit(batch: list[tuple[int, Conversation]], skips: list[_Log]) -> None:
        """Score ``batch``; ``skips`` (records read among its conversations and unusable) are
        logged with it, each at its index's place."""
        if not batch:
            in_flight.append(([], (), skips))
        elif pool is None:
            in_flight.append((scorer.batch(batch, protocol, max_new_tokens), (), skips))
        else:
            indices = [i for i, _ in batch]
            scorer.prefetch(indices)  # the dataset is read on this thread only
            in_flight.append((pool.submit(scorer.batch, batch, protocol, max_new_tokens), indices, skips))
        settle(window)

    try:
        with lane_pool(n_lanes) if n_lanes > 1 else contextlib.nullcontext() as pool:
            pending: list[tuple[int, Conversation]] = []
            skips: list[_Log] = []  # unusable records read since the last batch went out
            try:
                for i in todo:
                    conv = dataset.get(i)
                    if conv is None:
                        skips.append(_Log(i, skipped=tuple(dataset.skipped.items[-1])))
                        if not pending:  # nothing before it waits to be scored
                            submit([], skips)
                            skips = []
                        continue
                    if one_by_one:
                        record(scorer.own(i, conv, max_new_tokens))
                        continue
                    pending.append((i, conv))
                    if len(pending) == batch_size:
                        submit(pending, skips)
                        pending, skips = [], []
                if pending or skips:
                    submit(pending, skips)
                settle(0)
            except BaseException:
                for out, *_ in in_flight:  # a lane failed or the run was interrupted: start no more
                    if isinstance(out, Future):
                        out.cancel()
                raise
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
        model.train(was_training)
    _finish(result, metrics, diag)
    return result


def evaluate_baseline(dataset, *, limit: int | None = None, name: str = "baseline-union") -> EvalResult:
    """The question-blind baseline: every round predicts the union of all top-level objects'
    masks of its image, scored as :func:`evaluate` scores a model (original resolution, pick
    rounds against their best alternative, grounding diagnostics).

    Needs a dataset with ``scene(i)`` (the world, or a folder of this package's format);
    raises :class:`segllm.errors.SegLLMError` otherwise. ``name`` is the result's protocol label.
    """
    from segllm.errors import SegLLMError

    if getattr(dataset, "scene", None) is None:
        raise SegLLMError("the union baseline needs object annotations (the world, or a dataset folder of this package's format)")
    n = len(dataset) if limit is None else min(limit, len(dataset))
    metrics, diag = RoundMetrics(), Diagnostics()
    result = EvalResult(name, {}, 0)
    result.skipped.extend(_unreadable(dataset))
    scorer = _Scorer(None, dataset, "original")
    for i in range(n):
        conv = dataset.get(i)
        if conv is None:
            _account(_Log(i, skipped=tuple(dataset.skipped.items[-1])), metrics, result, diag)
            continue
        scene = scorer.scene(i)
        union = np.zeros(conv.image.shape[:2], bool)
        for k in scene.top_level:
            union |= scene.masks[k]
        per_round = [(np.stack([union] * len(r.masks)), None, None, None) for r in conv.rounds]
        rows, multi = scorer._score(i, conv, per_round, scene)
        _account(_Log(i, rows, multi=multi), metrics, result, diag)
    _finish(result, metrics, diag)
    return result


class _Scorer:
    """Runs the model on conversations and scores every ground-truth mask."""

    def __init__(self, model, dataset, frame: Frame, session_factory=None) -> None:
        self.model, self.dataset, self.frame = model, dataset, frame
        self.eps = 1e-4 if frame == "released" else 0.0
        self.session_factory = session_factory or Session
        self._fetched: dict[int, tuple] = {}  # index -> (scene, ignore), read ahead for the lanes

    def prefetch(self, indices: list[int]) -> None:
        """Read the scenes and ignore regions of ``indices`` now (on the calling thread), for a
        :meth:`batch` call on another thread: a dataset need not be thread-safe (the world keeps
        its last sample)."""
        for i in indices:
            self._fetched[i] = (self._read_scene(i), self._read_ignore(i))

    def forget(self, indices) -> None:
        """Drop what :meth:`prefetch` read for ``indices``."""
        for i in indices:
            self._fetched.pop(i, None)

    def _ignore(self, index: int) -> list[list[np.ndarray | None]] | None:
        got = self._fetched.get(index)
        return got[1] if got is not None else self._read_ignore(index)

    def scene(self, index: int):
        """The dataset's :class:`segllm.data.records.SceneAnnotations` of ``index``, or None."""
        got = self._fetched.get(index)
        return got[0] if got is not None else self._read_scene(index)

    def _read_ignore(self, index: int):
        fn = getattr(self.dataset, "ignore", None)
        return fn(index) if fn is not None else None

    def _read_scene(self, index: int):
        fn = getattr(self.dataset, "scene", None)
        return fn(index) if fn is not None else None

    def _score(self, index: int, conv: Conversation, per_round, scene=None) -> tuple[list[tuple], list[tuple]]:
        """per_round: per round, (image masks [k, H, W], image boxes or None, frame masks, frame boxes).

        With ``scene`` (round metadata and every object's mask), each mask is also checked for
        grounding, and a pick round is scored against its best-matching valid alternative.
        Returns ``_Log.masks`` and ``_Log.multi`` (rounds with several targets, matched and as a
        union: :meth:`_score_targets`)."""
        ignore = self._ignore(index)
        size = self.model.decoder.image_size if self.frame == "released" else 0
        ids = list(scene.masks) if scene is not None else []
        objects = [scene.masks[k] for k in ids] if scene is not None else []
        out, multi = [], []
        for n, (rnd, (masks, boxes, fmasks, fboxes)) in enumerate(zip(conv.rounds, per_round), start=1):
            meta = scene.rounds[n - 1] if scene is not None and n <= len(scene.rounds) else None
            if len(rnd.masks) > 1:
                rows, union = self._score_targets(n, rnd.masks, (masks, boxes, fmasks, fboxes), ignore, size, meta,
                                                  scene, ids, objects)
                out += rows
                multi.append(union)
                continue
            for j, gt in enumerate(rnd.masks):
                ign = ignore[n - 1][j] if ignore is not None else None
                # (ground truth, its object id): a pick round's alternatives compete, the best counts
                cands = [(gt, scene.mask_ids[n - 1][j] if scene is not None else None)]
                if meta is not None and meta.kind == "pick" and len(rnd.masks) == 1:
                    cands = [(scene.masks[a], a) for a in meta.alternatives if a in scene.masks] or cands
                best = None
                for cand, cid in cands:
                    if self.frame == "released":
                        gt_f = released_frame_gt(cand, size)
                        ign_f = released_frame_gt(ign, size) if ign is not None else None
                        scores = mask_scores(fmasks[j], gt_f, fboxes[j], ignore=ign_f, eps=self.eps)
                    else:
                        scores = mask_scores(masks[j], cand, None if boxes is None else boxes[j], ignore=ign, eps=self.eps)
                    if best is None or scores[2] > best[0][2]:
                        best = (scores, cid)
                scores, cid = best
                is_grounded = None
                if cid is not None and cid in scene.masks:
                    is_grounded = grounding(masks[j], ids.index(cid), objects)[0]
                family = meta.relation if meta is not None else None
                tr = meta.text_resolvable if meta is not None else None
                out.append((n, *scores, is_grounded, family, tr))
        return out, multi

    def _score_targets(self, n: int, gts: list[np.ndarray], predicted, ignore, size: int, meta, scene, ids, objects):
        """Round n with several targets ``gts`` ([H, W] bool each): each target against the
        predicted mask matched to it, and the unions (:func:`score_targets`, in the metric
        frame); returns (its ``_Log.masks`` rows, its ``_Log.multi`` row)."""
        masks, boxes, fmasks, fboxes = predicted
        # one ignore region for the round: the targets' regions together
        regions = [r for r in (ignore[n - 1] if ignore is not None else []) if r is not None]
        ign = np.logical_or.reduce(regions) if regions else None
        if self.frame == "released":
            gts_m = [released_frame_gt(g, size) for g in gts]
            ign = released_frame_gt(ign, size) if ign is not None else None
            res = score_targets(list(fmasks), gts_m, fboxes, ignore=ign, eps=self.eps)
        else:
            res = score_targets(list(masks), gts, boxes, ignore=ign, eps=self.eps)
        family = meta.relation if meta is not None else None
        tr = meta.text_resolvable if meta is not None else None
        rows = []
        for j, (scores, k) in enumerate(zip(res.per_target, res.match)):
            is_grounded = None
            cid = scene.mask_ids[n - 1][j] if scene is not None else None
            if cid is not None and cid in scene.masks:
                pred = masks[k] if k is not None else np.zeros_like(gts[j], dtype=bool)
                is_grounded = grounding(pred, ids.index(cid), objects)[0]
            rows.append((n, *scores, is_grounded, family, tr))
        return rows, (n, res.union_inter, res.union_union, res.missing, res.extra)

    def batch(self, items: list[tuple[int, Conversation]], protocol: str, max_new_tokens: int) -> list[_Log]:
        return self.oracle(items) if protocol == "oracle" else self.own_batch(items, max_new_tokens)

    def oracle(self, items: list[tuple[int, Conversation]]) -> list[_Log]:
        convs = [c for _, c in items]
        results = self.model.segment(convs, frame=self.frame == "released")
        entries = []
        for (i, conv), rounds in zip(items, results):
            per_round = [(r[0], None, r[2] if len(r) > 2 else None, r[3] if len(r) > 2 else None) for r in rounds]
            rows, multi = self._score(i, conv, per_round, self.scene(i))
            entries.append(_Log(i, rows, multi=multi))
        return entries

    def own(self, index: int, conv: Conversation, max_new_tokens: int) -> _Log:
        entry = _Log(index)
        scene = self.scene(index)
        session = self.session_factory(self.model, conv.image, max_new_tokens=max_new_tokens)
        per_round = []
        for n, rnd in enumerate(conv.rounds, start=1):
            # a reference to a round whose own mask came out empty cannot be encoded: text only
            refs = tuple(k for k in rnd.refs if session.referable(k))
            if refs != rnd.refs:
                entry.empty_refs += 1
            reply = session.ask(rnd.question, refs, exact_refs=True)
            # a several-target round is scored as answered (a target without a mask scores 0)
            if len(rnd.masks) == 1 and reply.masks.shape[0] < 1:
                entry.no_seg_answers += 1
                session.undo()
                reply = session.ask(rnd.question, refs, answer=rnd.answer, exact_refs=True)
            per_round.append((reply.masks, reply.boxes, reply.frame_masks, self._frame_boxes(conv, reply)))
            if scene is not None and n <= len(scene.rounds) and scene.rounds[n - 1].kind == "pick":
                _assume_recorded(session.history, rnd.masks)
        entry.masks, entry.multi = self._score(index, conv, per_round, scene)
        return entry

    def own_batch(self, items: list[tuple[int, Conversation]], max_new_tokens: int) -> list[_Log]:
        """:meth:`own` for several conversations at once: each round of every conversation in
        one :meth:`RoundEngine.extend_batch` (answers generated, one mask forced where an answer
        has none, as ``Session`` does), with the same rules round by round as :meth:`own`:
        references to empty masks dropped, a one-target round without a mask asked again with
        its recorded answer, a pick round's history holding its recorded masks."""
        engine = RoundEngine(self.model)
        convs = [c for _, c in items]
        entries = [_Log(i) for i, _ in items]
        scenes = [self.scene(i) for i, _ in items]
        history: list[list[Reply]] = [[] for _ in items]
        per_round: list[list[tuple]] = [[] for _ in items]
        dialogue = engine.open_batch([c.image for c in convs])
        frame_memory = engine.frame_memory

        def referable(b: int, k: int) -> bool:  # as Session.referable
            return masks_referable(history[b][k - 1].memory_masks(frame_memory))

        def memory_mask(b: int, k: int, j: int):  # as Session._memory_mask
            return history[b][k - 1].memory_input(j, frame_memory)

        for n in range(1, max(len(c.rounds) for c in convs) + 1):
            asked, refs_of = {}, {}
            for b, conv in enumerate(convs):
                if n > len(conv.rounds):
                    continue
                rnd = conv.rounds[n - 1]
                refs = tuple(k for k in rnd.refs if referable(b, k))
                if refs != rnd.refs:
                    entries[b].empty_refs += 1
                refs_of[b] = refs
                asked[b] = self._so_far(conv, history[b], Round(rnd.question.strip(), refs))
            got = engine.extend_batch(dialogue, asked, memory_mask, answers={b: None for b in asked},
                                      max_new_tokens=max_new_tokens, force_mask=True)
            retry = [b for b, r in got.items() if not isinstance(r, SegLLMError) and len(convs[b].rounds[n - 1].masks) == 1 and r.masks.shape[0] < 1]
            if retry:
                dialogue.undo(retry)
                for b in retry:
                    entries[b].no_seg_answers += 1
                got.update(engine.extend_batch(dialogue, {b: asked[b] for b in retry}, memory_mask,
                                               answers={b: convs[b].rounds[n - 1].answer for b in retry},
                                               max_new_tokens=max_new_tokens, force_mask=True))
            for b, r in got.items():
                if isinstance(r, SegLLMError):
                    raise r  # as Session.ask raises it in own()
                conv, rnd = convs[b], convs[b].rounds[n - 1]
                history[b].append(Reply(r.round, rnd.question.strip(), refs_of[b], r.text, r.masks, r.boxes, r.scores,
                                        forced=r.forced, frame_masks=r.frame_masks))
                per_round[b].append((r.masks, r.boxes, r.frame_masks, self._frame_boxes(conv, r)))
                scene = scenes[b]
                if scene is not None and n <= len(scene.rounds) and scene.rounds[n - 1].kind == "pick":
                    _assume_recorded(history[b], rnd.masks)
            dialogue.end({b for b, c in enumerate(convs) if n >= len(c.rounds)})
        for b, (i, conv) in enumerate(items):
            entries[b].masks, entries[b].multi = self._score(i, conv, per_round[b], scenes[b])
        return entries

    @staticmethod
    def _so_far(conv: Conversation, history: list[Reply], ask: Round) -> Conversation:
        """The conversation a session holds after ``history``, with ``ask`` open."""
        return Conversation(conv.image, [Round(r.question, r.refs, r.text, list(r.masks)) for r in history] + [ask])

    def _frame_boxes(self, conv: Conversation, reply) -> np.ndarray | None:
        """A reply's boxes in the released frame (for ``frame="released"``; else None)."""
        if self.frame != "released":
            return None
        if self.model.config.memory.box_source == "decoder":  # the decoder's own box, back in the frame
            return reply.boxes * (self.model.decoder.image_size / max(conv.image.shape[:2]))
        return np.stack([mask_box(m) for m in reply.frame_masks]).reshape(-1, 4)


def _assume_recorded(history: list[Reply], gts: list[np.ndarray]) -> None:
    """Make a session's last round (``history[-1]``, replaced in the list) hold the recorded ground-truth masks ``gts`` ([H, W] bool
    each) instead of the model's own, so later rounds refer to the object their ground truth
    assumes (pick rounds). Where the model answered one target with several masks, the one
    closest to it is replaced and the others kept, so the answer and its masks still agree. Its masks in the decoder frame, where the session keeps them, are the
    ground truth resized into that frame; its boxes are the masks' tight boxes. Memory tokens
    are computed from the history when a later round first refers to a round, so none exist
    yet for the replaced one."""
    import dataclasses

    last = history[-1]
    gts = [np.asarray(g, bool) for g in gts]
    own = np.asarray(last.masks, bool)
    if len(gts) == 1 and own.shape[0] > 1:
        # the model answered the one-target round with several masks ("From left to right: <seg>,
        # <seg>"): its answer keeps that many, the one closest to the target becoming the target
        ious = [float((m & gts[0]).sum() / max(1, (m | gts[0]).sum())) for m in own]
        j = int(np.argmax(ious))
        masks = own.copy()
        masks[j] = gts[0]
    else:
        masks = np.stack(gts)
    frame = None
    if last.frame_masks is not None:
        size = last.frame_masks.shape[-1]
        if masks.shape[0] == len(gts):
            frame = np.stack([released_frame_gt(g, size) for g in gts])
        else:
            frame = np.array(last.frame_masks, copy=True)
            frame[j] = released_frame_gt(gts[0], size)
    boxes = np.stack([mask_box(g) for g in masks]).astype(np.asarray(last.boxes).dtype)
    history[-1] = dataclasses.replace(last, masks=masks, boxes=boxes, frame_masks=frame)


def format_table(results: list[EvalResult], *, title: str = "") -> str:
    """A per-round table: one column group per result (protocol); with grounding diagnostics, a
    grounded-rate column (``grnd``, percent) per group, and lines for text-resolvable rounds vs
    the others."""
    rounds = sorted({k for r in results for k in r.metrics if k != "all"}, key=int) + ["all"]
    diag = any(r.diagnostics for r in results)
    g_head, g_blank = (f" {'grnd':>6}", " " * 7) if diag else ("", "")
    head = f"{'round':>5} " + " ".join(f"| {r.protocol + ' cIoU':>11} {'mIoU':>6} {'P@0.5':>6}{g_head} {'n':>5} " for r in results)
    lines = ([title] if title else []) + [head, "-" * len(head)]
    for k in rounds:
        row = f"{k:>5} "
        for r in results:
            m = r.metrics.get(k)
            g = ""
            if diag:
                d = r.diagnostics.get("per_round", {}).get(k)
                g = f" {d['grounded']:>6.1f}" if d else g_blank
            row += "| " + (f"{m['cIoU']:>11.1f} {m['mIoU']:>6.1f} {m['P@0.5']:>6.1f}{g} {m['n']:>5d} " if m else " " * (33 + len(g_blank)))
        lines.append(row)
    for r in results:
        parts = []
        for key, label in (("text_resolvable", "all rounds"), ("text_resolvable_late", "rounds >= 4")):
            tr = r.diagnostics.get(key, {})
            if tr:
                parts.append(label + ": " + ", ".join(
                    f"{'text-resolvable' if v == 'true' else 'not text-resolvable'} grounded {tr[v]['grounded']:.1f}% "
                    f"(IoU|grounded {tr[v]['IoU|grounded']:.1f}, n {tr[v]['n']})" for v in ("true", "false") if v in tr))
        if parts:
            lines.append(f"{r.protocol}: " + "; ".join(parts))
    for r in results:
        if r.multi_target:
            lines.append(multi_target_line(r))
    return "\n".join(lines)


def multi_target_line(result: EvalResult) -> str:
    """One line on the rounds with several targets: matched and union scores (percent)."""
    m = result.multi_target
    return (f"{result.protocol}: {m['rounds']} rounds with several targets ({m['targets']} targets): "
            f"matched cIoU {m['matched cIoU']:.1f}, mIoU {m['matched mIoU']:.1f} (each target paired with one mask); "
            f"union cIoU {m['union cIoU']:.1f}, mIoU {m['union mIoU']:.1f} (all masks against all targets); "
            f"{m['missing']} targets without a mask, {m['extra']} masks without a target")
