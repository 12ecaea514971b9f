"""Per-round evaluation under two history protocols.

- ``oracle``: later rounds see the ground-truth masks and answers of earlier rounds (as most of
  the released evaluations do); answers are teacher-forced, so one pass per batch suffices.
- ``own``: later rounds see the model's own earlier answers and masks, as a user experiences
  it; each round is generated in turn. Where the model answers without ``<seg>``, one mask is
  forced (the released demo always asks for one). Where a round refers to an earlier round
  whose own mask is empty, that reference cannot be encoded: the round keeps the text only and
  the event is counted (``empty_refs``).
Metrics are computed at the original image resolution.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from segllm.conversation import Conversation, Round
from segllm.eval.metrics import RoundMetrics

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "conversations": self.conversations,
            "skipped": len(self.skipped),
            "skipped_records": [{"where": w, "reason": r} for w, r in self.skipped],
            "empty_refs": self.empty_refs,
            "no_seg_answers": self.no_seg_answers,
            "per_round": self.metrics,
        }


def _iterate(dataset, indices, skipped):
    for i in indices:
        conv = dataset.get(i)
        if conv is None:
            skipped.append(dataset.skipped.items[-1])
            continue
        yield conv


@torch.no_grad()
def evaluate(
    model,
    dataset,
    *,
    protocol: Protocol = "oracle",
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    progress: bool = False,
) -> EvalResult:
    """Evaluate ``model`` on ``dataset`` (anything with ``len`` and ``get(i) -> Conversation | None``)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    metrics = RoundMetrics()
    result = EvalResult(protocol, {}, 0)
    bar = tqdm(total=n, desc=f"eval ({protocol})", disable=not progress, unit="conv")
    convs = _iterate(dataset, range(n), result.skipped)
    try:
        if protocol == "oracle":
            pending: list[Conversation] = []
            for conv in convs:
                pending.append(conv)
                if len(pending) == batch_size:
                    _oracle(model, pending, metrics)
                    result.conversations += len(pending)
                    bar.update(len(pending))
                    pending = []
            if pending:
                _oracle(model, pending, metrics)
                result.conversations += len(pending)
                bar.update(len(pending))
        elif protocol == "own":
            for conv in convs:
                _own(model, conv, metrics, result, max_new_tokens)
                result.conversations += 1
                bar.update(1)
        else:
            raise ValueError(f"unknown protocol {protocol!r} (oracle or own)")
    finally:
        bar.close()
        model.train(was_training)
    result.metrics = metrics.summary()
    return result


def _oracle(model, convs: list[Conversation], metrics: RoundMetrics) -> None:
    for conv, rounds in zip(convs, model.segment(convs)):
        for n, (rnd, (masks, _)) in enumerate(zip(conv.rounds, rounds), start=1):
            for pred, gt in zip(masks, rnd.masks):
                metrics.add(n, pred, gt)


def _own(model, conv: Conversation, metrics: RoundMetrics, result: EvalResult, max_new_tokens: int) -> None:
    history: list[Round] = []
    for n, rnd in enumerate(conv.rounds, start=1):
        refs = tuple(k for k in rnd.refs if any(m.any() for m in history[k - 1].masks))
        if refs != rnd.refs:
            result.empty_refs += 1
        ask = Conversation(conv.image, history + [Round(rnd.question, refs)])
        pred = model.predict(ask, max_new_tokens=max_new_tokens)
        if pred.masks.shape[0] < len(rnd.masks):
            result.no_seg_answers += 1
            pred = model.predict(ask, answer=rnd.answer)
        for j, gt in enumerate(rnd.masks):
            metrics.add(n, pred.masks[j], gt, pred.boxes[j])
        history.append(Round(rnd.question, refs, pred.text, list(pred.masks)))


def format_table(results: list[EvalResult], *, title: str = "") -> str:
    """A per-round table: one column group per result (protocol)."""
    rounds = sorted({k for r in results for k in r.metrics if k != "all"}, key=int) + ["all"]
    head = f"{'round':>5} " + " ".join(f"| {r.protocol + ' cIoU':>11} {'mIoU':>6} {'P@0.5':>6} {'n':>5} " for r in results)
    lines = ([title] if title else []) + [head, "-" * len(head)]
    for k in rounds:
        row = f"{k:>5} "
        for r in results:
            m = r.metrics.get(k)
            row += "| " + (f"{m['cIoU']:>11.1f} {m['mIoU']:>6.1f} {m['P@0.5']:>6.1f} {m['n']:>5d} " if m else " " * 33)
        lines.append(row)
    return "\n".join(lines)


def mean_ciou(result: EvalResult) -> float:
    return float(np.nan_to_num(result.metrics.get("all", {}).get("cIoU", float("nan"))))
