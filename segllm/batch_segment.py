"""Batch segmentation: many images, each with its own conversation, answered in batches.

Each image gets a conversation (the same questions for every image, or its own from a JSONL
file); round k of every conversation in a batch is answered at once (the answer is forced to
``"<seg>"``, as the released demo asks, so a round is one batched LLM pass over the round's own
tokens on top of one key/value cache shared by the batch:
:meth:`segllm.model.rounds.RoundEngine.extend_batch`; with ``generate`` the model writes its
answers, as ``segllm chat`` does, all rows at once, and may answer with several masks), with the model's own earlier
masks fed back where a question refers to an earlier round (each encoded once). The images'
vision tokens and decoder features are computed once per batch.

Results go to ``OUT/results.rank{r}.jsonl`` as each batch finishes (one line per image), so an
interrupted run resumes where it stopped; the main process then writes ``OUT/results.json``
(COCO style: the images and one annotation per mask, RLE) and, on request, per-image mask PNGs.
Several processes (``torchrun`` / ``accelerate launch``) each take every n-th image.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from segllm.config import MAX_NEW_TOKENS
from segllm.conversation import Conversation, Round, load_image, parse_refs
from segllm.errors import ConversationError, SegLLMError
from segllm.export import from_rle, to_rle
from segllm.lanes import default_lanes, lane_pool
from segllm.model.rounds import RoundEngine, masks_referable

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class Item:
    """One image and its questions (one round each; "instance k" or ``[REF:k]`` refers to round k)."""

    key: str
    image: str
    questions: list[str]


@dataclass
class SegmentSummary:
    """What a run did: images and rounds answered here (this process, this run), seconds spent,
    images skipped because an earlier run had done them, and errors (key, message)."""

    images: int = 0
    rounds: int = 0
    seconds: float = 0.0
    resumed: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)


def read_items(images: str | Path | None, questions: str | Path) -> list[Item]:
    """The work list.

    Args:
        images: a folder (its image files, sorted by name), or a text file with one image path
            per line (relative paths are relative to that file); None when ``questions`` is a
            JSONL file that names each image.
        questions: a text file with one question per line (every image gets those rounds;
            ``#`` starts a comment), or a JSONL file of ``{"image": path, "questions": [...]}``
            (optionally ``"id"``; relative image paths are relative to the JSONL file).

    Raises:
        ConversationError: a missing file, a malformed JSONL line (named by its number), no
            questions, or no images.
    """
    qpath = Path(questions)
    if not qpath.is_file():
        raise ConversationError(f"questions file not found: {qpath}")
    if qpath.suffix == ".jsonl":
        items = []
        for n, line in enumerate(qpath.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                image, qs = rec["image"], rec["questions"]
                if not isinstance(image, str) or not isinstance(qs, list) or not qs or not all(isinstance(q, str) and q.strip() for q in qs):
                    raise TypeError("'image' must be a path and 'questions' a non-empty list of questions")
            except (ValueError, KeyError, TypeError) as e:
                raise ConversationError(f"{qpath}, line {n}: not a record of image and questions ({e})") from e
            path = Path(image) if Path(image).is_absolute() else qpath.parent / image
            items.append(Item(str(rec.get("id", n)), str(path), [q.strip() for q in qs]))
        if not items:
            raise ConversationError(f"{qpath} holds no records")
        return items
    qs = [line.strip() for line in qpath.read_text().splitlines() if line.strip() and not line.strip().startswith("#")]
    if not qs:
        raise ConversationError(f"{qpath} holds no questions")
    if images is None:
        raise ConversationError("give --images (a folder or a list of image paths) with a plain questions file")
    ipath = Path(images)
    if ipath.is_dir():
        paths = sorted(p for p in ipath.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    elif ipath.is_file():
        lines = [line.strip() for line in ipath.read_text().splitlines() if line.strip()]
        paths = [Path(p) if Path(p).is_absolute() else ipath.parent / p for p in lines]
    else:
        raise ConversationError(f"images not found: {ipath}")
    if not paths:
        raise ConversationError(f"no images in {ipath}")
    return [Item(str(i + 1), str(p), list(qs)) for i, p in enumerate(paths)]


def segment_items(
    model, items: Sequence[Item], out: str | Path, *, batch_size: int = 16, resume: bool = False, rank: int = 0,
    world_size: int = 1, progress: bool = True, generate: bool = False, max_new_tokens: int = MAX_NEW_TOKENS, lanes: int = 0,
) -> SegmentSummary:
    """Answer every item's questions; append one JSON line per image to ``OUT/results.rank{rank}.jsonl``.

    Each line: ``{"id", "image", "height", "width", "rounds": [{"round", "question", "refs",
    "answer", "masks": [RLE], "boxes": [[x0, y0, x1, y1]], "scores"}]}``, plus ``"error"`` when
    the image or a round could not be done (the rounds before it are kept). With ``resume`` the
    images already in the file are skipped. With ``generate`` each answer is the model's own
    (greedy, at most ``max_new_tokens`` tokens, one mask asked for where it has none: what a
    ``Session`` answers); otherwise ``"<seg>"``.

    ``lanes``: batches answered at once on as many Python threads, the torch threads shared
    out among them (``torch.get_num_threads() // lanes`` each, restored afterwards); each lane
    takes every ``lanes``-th image of the work list. 0 (default): 2 on a CPU with 2 or more
    torch threads, else 1. Why: this model's operations are small (a round's LLM pass over ~20
    tokens a row, convolutions on 32 x 32 maps), and two of them at once on one thread each use
    two cores better than one at a time on two threads (README, "Batch segmentation"). The
    results do not depend on it (each row is computed as alone). A model of a billion parameters
    or more (a released 7B SegLLM) and a compiled HIPIE decoder (``compile``: its compilation is
    not made for several threads at once) keep one lane by default.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"results.rank{rank}.jsonl"
    mine = [it for i, it in enumerate(items) if i % world_size == rank]
    done = _done_keys(path) if resume else set()
    if not resume and path.exists():
        path.unlink()
    todo = batch_order([it for it in mine if it.key not in done])
    summary = SegmentSummary(resumed=len(mine) - len(todo))
    engine = RoundEngine(model.eval())
    n_lanes = min(default_lanes(model, lanes), max(1, len(todo)))
    bar = tqdm(total=len(todo), disable=not progress, unit="img", desc="segment")
    t0 = time.perf_counter()
    lock, stop = threading.Lock(), threading.Event()
    with path.open("a") as f:

        def finish(records: list[dict]) -> None:
            with lock:  # the lanes' lines, counts and progress one batch at a time
                for rec in records:
                    f.write(json.dumps(rec) + "\n")
                    summary.images += 1
                    summary.rounds += len(rec["rounds"])
                    if "error" in rec:
                        summary.errors.append((rec["id"], rec["error"]))
                f.flush()  # a kill loses at most the batches in flight
                summary.seconds = time.perf_counter() - t0
                bar.update(len(records))
                bar.set_postfix(img_s=f"{summary.images / max(summary.seconds, 1e-9):.1f}")

        def run(work: list[Item]) -> None:
            for start in range(0, len(work), batch_size):
                if stop.is_set():  # another lane failed
                    return
                finish(_segment_batch(model, engine, work[start : start + batch_size], generate, max_new_tokens))

        if n_lanes == 1:
            run(todo)
        else:
            with lane_pool(n_lanes) as pool:
                # every n-th item of the batch order: each lane gets conversations of every length
                futures = [pool.submit(run, todo[i::n_lanes]) for i in range(n_lanes)]
                try:
                    wait(futures, return_when=FIRST_EXCEPTION)
                    for fut in futures:
                        fut.result()  # raises a lane's error
                except BaseException:
                    # a lane failed, or the run was interrupted (Ctrl-C): the other lanes end
                    # after their batch in flight, whose lines are written
                    stop.set()
                    raise
    bar.close()
    return summary


def batch_order(items: Sequence[Item]) -> list[Item]:
    """``items`` in the order they are batched: most rounds first, then longest questions first
    (stable, so equal items keep the list's order).

    Why: a batch runs as many LLM passes as its longest conversation has rounds, and every pass
    covers every row of the shared cache, each row's round padded to the round's longest; a
    conversation that has finished (or a short question) rides along as padding. Batching
    conversations of one length together removes most of that padding (64 world conversations
    of 2-8 rounds in batches of 16: 1.75 padded tokens per real token before). The results do
    not depend on the order: each row is computed as alone (the batch test compares them with
    one Session per image), and the result lines carry their ids.
    """
    return sorted(items, key=lambda it: (-len(it.questions), -sum(len(q) for q in it.questions)))


def _done_keys(path: Path) -> set[str]:
    """Ids of the complete lines of an earlier run's results (a line cut by a kill is dropped)."""
    if not path.exists():
        return set()
    keys, good = set(), []
    for line in path.read_text().splitlines():
        try:
            keys.add(json.loads(line)["id"])
            good.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    path.write_text("".join(line + "\n" for line in good))
    return keys


@torch.no_grad()
def _segment_batch(model, engine: RoundEngine, items: Sequence[Item], generate: bool = False, max_new_tokens: int = MAX_NEW_TOKENS) -> list[dict]:
    """Every round of a batch of items, round by round over one shared cache; one result record
    per item, in order."""
    records, convs, live = [], [], []
    for it in items:
        rec = {"id": it.key, "image": it.image, "rounds": []}
        records.append(rec)
        try:
            image = load_image(it.image)
        except SegLLMError as e:
            rec["error"] = str(e)
            continue
        rec["height"], rec["width"] = int(image.shape[0]), int(image.shape[1])
        convs.append(Conversation(image, []))
        live.append(len(records) - 1)
    if not live:
        return records
    dialogue = engine.open_batch([c.image for c in convs])
    frame_masks: dict[tuple[int, int], np.ndarray] = {}  # (row, round) -> masks in the decoder frame
    boxes: dict[tuple[int, int], np.ndarray] = {}  # (row, round) -> the masks' boxes, image pixels

    def memory_mask(row: int, k: int, j: int):
        # as a Session reads them: in the decoder frame for the released memory path
        res = convs[row].rounds[k - 1]
        mask = frame_masks[row, k][j] if engine.frame_memory else res.masks[j]
        return torch.tensor(mask), torch.as_tensor(boxes[row, k][j])

    going = set(range(len(convs)))
    for r in range(max(len(items[i].questions) for i in live)):
        asked = {}
        for row in sorted(going):
            it, rec, conv = items[live[row]], records[live[row]], convs[row]
            if r >= len(it.questions):
                continue
            text, refs = parse_refs(it.questions[r])
            trial = Conversation(conv.image, conv.rounds + [Round(text, refs)])
            try:
                if not text:
                    raise ConversationError(f"round {r + 1}: the question is empty once [REF:k] is removed")
                trial.validate(allow_open_last=True, check_refs=not engine.frame_memory)
                for k in refs if engine.frame_memory else ():
                    if not masks_referable(frame_masks[row, k]):
                        raise ConversationError(f"round {r + 1} refers to round {k}, whose mask is empty (zero area)")
            except SegLLMError as e:
                rec["error"] = str(e)  # this conversation stops here; its earlier rounds stay
                going.discard(row)
                continue
            asked[row] = trial
        if not asked:
            break
        options = dict(answers=dict.fromkeys(asked), max_new_tokens=max_new_tokens, force_mask=True) if generate else {}
        for row, res in engine.extend_batch(dialogue, asked, memory_mask, **options).items():
            rec = records[live[row]]
            if isinstance(res, SegLLMError):
                rec["error"] = str(res)
                going.discard(row)
                continue
            conv = convs[row] = asked[row]
            last = conv.rounds[-1]
            conv.rounds[-1] = Round(last.question, last.refs, res.text, list(res.masks))
            frame_masks[row, res.round], boxes[row, res.round] = res.frame_masks, res.boxes
            rec["rounds"].append({
                "round": res.round, "question": last.question, "refs": list(last.refs), "answer": res.text,
                "masks": [to_rle(m) for m in res.masks], "boxes": res.boxes.round(2).tolist(),
                "scores": [float(s) for s in res.scores],
            })
        finished = {row for row in going if r + 1 >= len(items[live[row]].questions)}
        going -= finished
        dialogue.end(set(range(len(convs))) - going)  # finished or stopped by an error
    return records


def merge_results(out: str | Path, world_size: int = 1, *, png: bool = False) -> Path:
    """Merge the ranks' result lines into ``OUT/results.json`` (COCO style: ``images``, one
    ``annotation`` per mask with its round, question, answer, refs and score, RLE
    ``segmentation``, and the ``errors``); with ``png`` also ``OUT/masks/<id>/round{k}_mask{j}.png``."""
    out = Path(out)
    recs = []
    for r in range(world_size):
        p = out / f"results.rank{r}.jsonl"
        if p.exists():
            recs += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    recs.sort(key=lambda rec: _sort_key(rec["id"]))
    images, anns, errors = [], [], []
    for rec in recs:
        if "error" in rec:
            errors.append({"id": rec["id"], "image": rec["image"], "error": rec["error"]})
        if "height" not in rec:  # the image could not be read
            continue
        n = len(images) + 1
        images.append({"id": n, "file_name": rec["image"], "height": rec["height"], "width": rec["width"], "key": rec["id"]})
        for rnd in rec["rounds"]:
            for j, (rle, box, score) in enumerate(zip(rnd["masks"], rnd["boxes"], rnd["scores"])):
                x0, y0, x1, y1 = box
                anns.append({
                    "id": len(anns) + 1, "image_id": n, "category_id": 1, "segmentation": rle, "area": int(from_rle(rle).sum()),
                    "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0, "score": score, "round": rnd["round"],
                    "mask": j + 1, "question": rnd["question"], "refs": rnd["refs"], "answer": rnd["answer"],
                })
                if png:
                    folder = out / "masks" / _safe(rec["id"])
                    folder.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(from_rle(rle).astype(np.uint8) * 255).save(folder / f"round{rnd['round']}_mask{j + 1}.png")
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object", "supercategory": "object"}], "errors": errors}
    target = out / "results.json"
    target.write_text(json.dumps(data) + "\n")
    return target


def _sort_key(key: str):
    return (0, int(key), "") if key.isdigit() else (1, 0, key)


def _safe(key: str) -> str:
    """An id as a folder name (path separators and odd characters replaced)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key) or "_"
