"""Per-round segmentation metrics.

- cIoU: sum of intersections / sum of unions over all masks of a round (the paper's number);
- mIoU: mean of per-mask IoU (an empty union counts as IoU 1);
- P@0.5: share of masks whose predicted box has IoU > 0.5 with the ground-truth mask's box.
Boxes are (x0, y0, x1, y1) pixels with exclusive x1, y1 (the tight box of the mask).

Empty against empty (an empty ground truth, correctly predicted empty, with an empty box) is a
perfect answer under the default rule: IoU 1 and a P@0.5 hit. Under the released code's rule
(``eps`` > 0) its IoU is 0, and it is a miss, so the two metrics never disagree on it.

By default masks are compared at the original image resolution. :func:`released_frame_gt` and
``RoundMetrics(eps=1e-4)`` give the released code's variant instead: the ground truth resized
(longest side 1024, bilinear on the 0/1 mask) and zero-padded to 1024x1024, the prediction in
the same frame with the padding included, and IoU = I / (U + 1e-4) per mask. Pixels of an
``ignore`` mask (ReasonSeg's ignore regions, as LISA scores them) count in neither I nor U.

Several targets in one round ("segment all the red objects": one ground-truth mask per target,
one ``<seg>`` per mask in the answer) are scored two ways (:func:`score_targets`):

- *matched*: each target is paired with one predicted mask, one to one, maximising the summed
  IoU (:func:`match_targets`: exact search over the pairings up to 8 masks a side, greedy by IoU
  beyond); a target left without a prediction (the answer had fewer ``<seg>``) is scored against
  an empty mask (IoU 0), a prediction left without a target counts as ``extra``. The pairs enter
  cIoU, mIoU and P@0.5 like any other mask, so the order of the answer's masks does not matter.
- *union*: the union of the round's predicted masks against the union of its targets, one I and
  U per round (``union cIoU``), the rule of the paper's benchmarks: their rounds each have one
  ground-truth mask, and where a question names several objects (ReasonSeg's several "target"
  polygons, ADE20K's and COCO-Stuff's class masks) that mask is their union, scored against the
  one predicted mask. The released evaluation has no several-mask round: it groups its per-mask
  numbers by mask order in a conversation (its "round i" is the i-th mask).

Grounding diagnostics (:func:`grounding`, :class:`Diagnostics`): whether a prediction picks
out its target rather than another object of the scene (the grounded rate), and how well the
grounded ones fit (IoU given grounded), by round, by question family and by whether the
questions' text alone determines the answer.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight (x0, y0, x1, y1) box of a [H, W] bool mask, exclusive end; zeros when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return np.zeros(4, np.float64)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two (x0, y0, x1, y1) boxes; 0 when either is empty."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area = lambda x: max(0.0, x[2] - x[0]) * max(0.0, x[3] - x[1])  # noqa: E731
    union = area(a) + area(b) - inter
    return float(inter / union) if union > 0 else 0.0


@dataclass
class RoundStats:
    inter: int = 0
    union: int = 0
    ious: list[float] = field(default_factory=list)
    box_hits: int = 0

    @property
    def n(self) -> int:
        return len(self.ious)

    def summary(self) -> dict[str, float]:
        return {
            "cIoU": 100.0 * self.inter / self.union if self.union else float("nan"),
            "mIoU": 100.0 * float(np.mean(self.ious)) if self.ious else float("nan"),
            "P@0.5": 100.0 * self.box_hits / self.n if self.n else float("nan"),
            "n": self.n,
        }


def mask_scores(
    pred: np.ndarray, gt: np.ndarray, pred_box: np.ndarray | None = None, *, ignore: np.ndarray | None = None, eps: float = 0.0
) -> tuple[int, int, float, bool]:
    """(I, U, IoU, box hit) of one predicted mask against its ground truth ([H, W] bool each).

    See :class:`RoundMetrics` for ``eps``, ``pred_box`` and ``ignore``.
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
    keep = np.ones_like(gt) if ignore is None else ~np.asarray(ignore, bool)
    inter = int(np.count_nonzero(pred & gt & keep))
    union = int(np.count_nonzero((pred | gt) & keep))
    if eps:
        iou = inter / (union + eps)
    else:
        iou = inter / union if union else 1.0
    box, gt_box = mask_box(pred) if pred_box is None else np.asarray(pred_box, np.float64), mask_box(gt)
    if _box_area(box) == 0 and _box_area(gt_box) == 0:
        hit = iou > 0.5  # empty against empty: as the IoU says (a hit by default; see the module doc)
    else:
        hit = box_iou(box, gt_box) > 0.5
    return inter, union, iou, bool(hit)


def _box_area(box: np.ndarray) -> float:
    return max(0.0, float(box[2] - box[0])) * max(0.0, float(box[3] - box[1]))


def released_frame_gt(gt: np.ndarray, size: int = 1024) -> np.ndarray:
    """A ground-truth mask [H, W] in the released code's evaluation frame: [size, size] bool.

    The 0/1 mask is resized with PIL's bilinear filter as uint8 (longest side ``size``; values
    round to 0 or 1, so in effect a 0.5 threshold) and zero-padded at the bottom/right.
    """
    h, w = gt.shape
    scale = size / max(h, w)
    nh, nw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
    resized = np.asarray(Image.fromarray(np.asarray(gt, np.uint8)).resize((nw, nh), Image.Resampling.BILINEAR)) > 0
    out = np.zeros((size, size), bool)
    out[:nh, :nw] = resized
    return out


_EXACT_MATCH_MAX = 8  # masks a side up to which match_targets searches every pairing


def _iou_matrix(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], ignore: np.ndarray | None = None) -> np.ndarray:
    """[G, P] IoU of every target against every prediction ([H, W] bool each; an empty union
    counts 0 here: an empty pair is no better a match than another)."""
    keep = None if ignore is None else ~np.asarray(ignore, bool)
    out = np.zeros((len(gts), len(preds)), np.float64)
    for i, g in enumerate(gts):
        g = np.asarray(g, bool) if keep is None else np.asarray(g, bool) & keep
        for j, p in enumerate(preds):
            p = np.asarray(p, bool) if keep is None else np.asarray(p, bool) & keep
            union = np.count_nonzero(p | g)
            out[i, j] = np.count_nonzero(p & g) / union if union else 0.0
    return out


def _best_assignment(iou: np.ndarray) -> list[int]:
    """For a [R, C] score matrix with R <= C, the distinct column of each row that maximises the
    summed score, by searching every assignment (permutations start from the identity, so among
    equal totals the first found, closest to row r -> column r, wins)."""
    best, best_total = None, -1.0
    for perm in itertools.permutations(range(iou.shape[1]), iou.shape[0]):
        total = float(sum(iou[r, c] for r, c in enumerate(perm)))
        if total > best_total + 1e-12:
            best, best_total = list(perm), total
    return best


def match_targets(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], *, ignore: np.ndarray | None = None) -> list[int | None]:
    """Pair each target with one prediction, one to one, maximising the summed IoU.

    Args:
        preds: P predicted masks, [H, W] bool each.
        gts: G ground-truth masks, [H, W] bool each.
        ignore: [H, W] bool pixels left out of the IoU, or None.
    Returns:
        per target, the index of its prediction, or None: min(G, P) targets get one. Exact (every
        pairing searched) up to 8 masks a side; greedy beyond (the best remaining IoU first). Among
        pairings of equal total the one closest to the answer's order wins (target j, mask j).
    """
    g, p = len(gts), len(preds)
    if g == 0 or p == 0:
        return [None] * g
    iou = _iou_matrix(preds, gts, ignore)
    if max(g, p) <= _EXACT_MATCH_MAX:
        if g <= p:  # each target one distinct prediction
            return _best_assignment(iou)
        out: list[int | None] = [None] * g
        for j, i in enumerate(_best_assignment(iou.T)):  # each prediction one distinct target
            out[i] = j
        return out
    out = [None] * g
    used_g, used_p = set(), set()
    for flat in np.argsort(-iou, axis=None, kind="stable"):
        i, j = divmod(int(flat), p)
        if i not in used_g and j not in used_p:
            out[i] = j
            used_g.add(i)
            used_p.add(j)
    return out


@dataclass
class TargetScores:
    """A several-target round scored (:func:`score_targets`).

    Attributes:
        match: per target, the index of its predicted mask (None: none left for it).
        per_target: per target, (I, U, IoU, box hit) against its prediction (an empty mask
            where none).
        union_inter, union_union: I and U of the predictions' union against the targets' union.
        missing: targets without a prediction; extra: predictions without a target.
    """

    match: list[int | None]
    per_target: list[tuple[int, int, float, bool]]
    union_inter: int
    union_union: int
    missing: int
    extra: int


def score_targets(
    preds: Sequence[np.ndarray] | np.ndarray,
    gts: Sequence[np.ndarray],
    pred_boxes: Sequence[np.ndarray] | np.ndarray | None = None,
    *,
    ignore: np.ndarray | None = None,
    eps: float = 0.0,
) -> TargetScores:
    """Score a round with several targets, matched and as a union (see the module docstring).

    Args:
        preds: P predicted masks, [H, W] bool each (P may differ from G).
        gts: G ground-truth masks, [H, W] bool each.
        pred_boxes: P predicted (x0, y0, x1, y1) boxes, pixels (default: the masks' tight boxes).
        ignore: [H, W] bool pixels left out of every I and U, or None.
        eps: as :class:`RoundMetrics`.
    """
    if not len(gts):
        raise ValueError("score_targets needs at least one ground-truth mask")
    shape = np.shape(gts[0])
    preds = [np.asarray(m, bool) for m in preds]
    match = match_targets(preds, gts, ignore=ignore)
    empty = np.zeros(shape, bool)
    per = []
    for gt, j in zip(gts, match):
        pred = preds[j] if j is not None else empty
        box = None if pred_boxes is None or j is None else pred_boxes[j]
        per.append(mask_scores(pred, gt, box, ignore=ignore, eps=eps))
    pu, gu = empty.copy(), empty.copy()
    for m in preds:
        pu |= m
    for m in gts:
        gu |= np.asarray(m, bool)
    inter, union, _, _ = mask_scores(pu, gu, ignore=ignore, eps=eps)
    n = sum(j is not None for j in match)
    return TargetScores(match, per, inter, union, len(gts) - n, len(preds) - n)


@dataclass
class MultiTargetStats:
    """Rounds with several targets: the matched scores of their targets and their unions."""

    rounds: int = 0
    targets: int = 0
    inter: int = 0
    union: int = 0
    ious: list[float] = field(default_factory=list)
    union_inter: int = 0
    union_union: int = 0
    union_ious: list[float] = field(default_factory=list)
    missing: int = 0
    extra: int = 0

    def add(self, target_scores: Sequence[tuple[int, int, float]], union_inter: int, union_union: int,
            missing: int, extra: int) -> None:
        """One round: (I, U, IoU) per target as matched, then the union's I and U."""
        self.rounds += 1
        for inter, union, iou in target_scores:
            self.targets += 1
            self.inter += inter
            self.union += union
            self.ious.append(iou)
        self.union_inter += union_inter
        self.union_union += union_union
        self.union_ious.append(union_inter / union_union if union_union else 1.0)
        self.missing += missing
        self.extra += extra

    def summary(self) -> dict[str, float]:
        """Percent: ``matched cIoU``/``matched mIoU`` over the targets (each paired with one
        predicted mask), ``union cIoU``/``union mIoU`` over the rounds (all predicted masks'
        union against all targets' union); counts: rounds, targets, missing (targets without
        a predicted mask), extra (predicted masks without a target)."""
        nan = float("nan")
        return {
            "matched cIoU": 100.0 * self.inter / self.union if self.union else nan,
            "matched mIoU": 100.0 * float(np.mean(self.ious)) if self.ious else nan,
            "union cIoU": 100.0 * self.union_inter / self.union_union if self.union_union else nan,
            "union mIoU": 100.0 * float(np.mean(self.union_ious)) if self.union_ious else nan,
            "rounds": self.rounds,
            "targets": self.targets,
            "missing": self.missing,
            "extra": self.extra,
        }


class RoundMetrics:
    """Accumulates cIoU, mIoU and P@0.5 per round (1-indexed) and over all rounds, and
    (``multi``) the several-target rounds' matched and union scores.

    Args:
        eps: per-mask IoU = I / (U + eps); 0 (the default) counts an empty union as IoU 1 (and
            empty against empty as a P@0.5 hit), the released code uses 1e-4 (an empty union then
            counts as 0, and a miss).
    """

    def __init__(self, eps: float = 0.0) -> None:
        self.eps = eps
        self.rounds: dict[int, RoundStats] = {}
        self.total = RoundStats()
        self.multi = MultiTargetStats()

    def add(
        self,
        round_number: int,
        pred: np.ndarray,
        gt: np.ndarray,
        pred_box: np.ndarray | None = None,
        *,
        ignore: np.ndarray | None = None,
    ) -> float:
        """Add one predicted mask against its ground truth ([H, W] bool each); returns its IoU.

        ``pred_box``: the predicted box (default: the prediction's tight box); ``ignore``: [H, W]
        bool pixels left out of I and U.
        """
        inter, union, iou, hit = mask_scores(pred, gt, pred_box, ignore=ignore, eps=self.eps)
        self.add_counts(round_number, inter, union, iou, hit)
        return iou

    def add_counts(self, round_number: int, inter: int, union: int, iou: float, hit: bool) -> None:
        """Add one mask's already computed numbers (used to restore a resumed evaluation)."""
        for s in (self.rounds.setdefault(round_number, RoundStats()), self.total):
            s.inter += inter
            s.union += union
            s.ious.append(iou)
            s.box_hits += int(hit)

    def summary(self) -> dict[str, dict[str, float]]:
        """{"1": {...}, "2": {...}, ..., "all": {...}} with cIoU, mIoU, P@0.5 in percent and n."""
        out = {str(k): self.rounds[k].summary() for k in sorted(self.rounds)}
        out["all"] = self.total.summary()
        return out


# -- grounding diagnostics ---------------------------------------------------------------------


def grounding(pred: np.ndarray, target: int, objects: Sequence[np.ndarray]) -> tuple[bool, int, int]:
    """Whether a predicted mask picks out its target rather than something else in the scene.

    The prediction is *grounded* when it overlaps the target (intersection pixel count) more
    than it overlaps any other object or part of the scene, and overlaps the target at all.
    Another object's overlap counts only its pixels outside the target, so wholes and their
    parts compete fairly: predicting a house's roof is grounded on the roof (the house's
    pixels outside the roof are not hit), predicting the whole house is not (its wall and door
    outweigh the roof), and predicting the house is grounded on the house. Background pixels
    compete with nothing (how well the mask fits is what IoU measures).

    Args:
        pred: predicted mask, [H, W] bool.
        target: index into ``objects`` of the ground-truth object.
        objects: every object's and part's mask of the image, [H, W] bool each.
    Returns:
        (grounded, pixels of the target hit, most pixels of another object hit outside the
        target).
    Raises:
        ValueError: ``target`` out of range, or masks of different sizes.
    """
    if not 0 <= target < len(objects):
        raise ValueError(f"target index {target} is not among the {len(objects)} object masks")
    pred = np.asarray(pred, bool)
    tgt = np.asarray(objects[target], bool)
    for m in objects:
        if np.shape(m) != pred.shape:
            raise ValueError(f"object mask {np.shape(m)} and prediction {pred.shape} differ in size")
    on_target = int(np.count_nonzero(pred & tgt))
    outside = pred & ~tgt
    other = max((int(np.count_nonzero(outside & np.asarray(m, bool))) for j, m in enumerate(objects) if j != target), default=0)
    return on_target > 0 and on_target > other, on_target, other


def grounded(pred: np.ndarray, target: int, objects: Sequence[np.ndarray]) -> bool:
    """Whether ``pred`` ([H, W] bool) is grounded on ``objects[target]`` (see :func:`grounding`)."""
    return grounding(pred, target, objects)[0]


@dataclass
class GroupStats:
    """Masks of one slice (a round, a family, text-resolvable or not): I, U, IoU per mask, and
    whether each was grounded (None where the scene's object masks are unknown)."""

    inter: int = 0
    union: int = 0
    ious: list[float] = field(default_factory=list)
    grounded: list[bool] = field(default_factory=list)
    grounded_ious: list[float] = field(default_factory=list)

    def add(self, inter: int, union: int, iou: float, is_grounded: bool | None) -> None:
        self.inter += inter
        self.union += union
        self.ious.append(iou)
        if is_grounded is not None:
            self.grounded.append(is_grounded)
            if is_grounded:
                self.grounded_ious.append(iou)

    def summary(self) -> dict[str, float]:
        """cIoU, mIoU, grounded (share of grounded predictions) and IoU|grounded (mean IoU of
        the grounded ones), in percent (NaN without masks); n masks, n_grounding of them with
        object masks."""
        nan = float("nan")
        return {
            "cIoU": 100.0 * self.inter / self.union if self.union else nan,
            "mIoU": 100.0 * float(np.mean(self.ious)) if self.ious else nan,
            "grounded": 100.0 * float(np.mean(self.grounded)) if self.grounded else nan,
            "IoU|grounded": 100.0 * float(np.mean(self.grounded_ious)) if self.grounded_ious else nan,
            "n": len(self.ious),
            "n_grounding": len(self.grounded),
        }


class Diagnostics:
    """Grounding diagnostics by round, by question family and by text-resolvability.

    ``add(round, inter, union, iou, grounded, family, text_resolvable)`` per scored mask;
    :meth:`summary` gives ``{"per_round": {"1": ..., "all": ...}, "per_family": {...},
    "text_resolvable": {"true": ..., "false": ...}, "text_resolvable_late": {...}}`` of
    :meth:`GroupStats.summary` (``text_resolvable_late``: rounds >= ``late_round`` only).
    Masks whose family or text-resolvability is unknown are left out of those slices.
    """

    def __init__(self, late_round: int = 4) -> None:
        self.late_round = late_round
        self.groups: dict[str, dict[str, GroupStats]] = {
            "per_round": {}, "per_family": {}, "text_resolvable": {}, "text_resolvable_late": {}}

    def add(self, round_number: int, inter: int, union: int, iou: float, is_grounded: bool | None,
            family: str | None = None, text_resolvable: bool | None = None) -> None:
        keys = [("per_round", str(round_number)), ("per_round", "all")]
        if family is not None:
            keys.append(("per_family", family))
        if text_resolvable is not None:
            tr = "true" if text_resolvable else "false"
            keys.append(("text_resolvable", tr))
            if round_number >= self.late_round:
                keys.append(("text_resolvable_late", tr))
        for g, k in keys:
            self.groups[g].setdefault(k, GroupStats()).add(inter, union, iou, is_grounded)

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        def order(k: str):
            return (k == "all", int(k) if k.isdigit() else 0, k)

        return {g: {k: s[k].summary() for k in sorted(s, key=order)} for g, s in self.groups.items()}
