"""HIPIE's set-prediction training losses, as the released SegLLM trains its decoder.

Each prompt has at most two targets: the referenced earlier mask (class [REF], prompt tokens
``0 .. num_ref_tokens-1``) and the answer (class [SEG], the other tokens); a prompt without a
reference has only the [SEG] target. Queries are matched to targets, then the matched pairs are
supervised and every other query is pushed to background. Three sets of outputs are supervised:

- the matching queries of every decoder layer (deep supervision; the background queries are
  left out): token focal loss, box L1 and GIoU, sigmoid-focal and Dice mask losses, and, for
  every layer but the last, the IoU branch (binary cross-entropy against the matched box IoU);
- the denoising queries of every layer (noised ground-truth boxes; the positive ones are
  matched to their own target by construction): the same terms without the IoU branch;
- the two-stage encoder proposals: class-agnostic focal loss, L1 and GIoU, no masks.

Each output's terms are divided by its number of matched (query, target) pairs over the
batch. Released weights: class 2, L1 5, GIoU 2, mask 5, Dice 5, IoU branch 1; focal alpha 0.25,
gamma 2. Decoder layers are matched with simOTA-style dynamic-k assignment (several queries may
take one target), the encoder proposals with an optimal one-to-one assignment (class 2 + L1 5 +
GIoU 2). Mask losses are taken on 112 x 112 points per mask, three quarters of them where the
prediction is most uncertain.

Shapes: N = prompts, Q = queries, T = prompt tokens, G = targets of a prompt (<= 2),
K = matched pairs, h x w = the decoder's mask resolution (S/4 for an S x S input).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from segllm.decoders.hipie.common import box_cxcywh_to_xyxy, inverse_sigmoid
from segllm.decoders.hipie.decoder import DenoisingQueries, HipieDecoder, HipieSetOutputs, LayerPredictions
from segllm.losses import sigmoid_focal

__all__ = [
    "HipieSetCriterion",
    "SetLoss",
    "SetTarget",
    "class_cost",
    "dice_loss",
    "generalized_box_iou",
    "giou_loss",
    "make_denoising_queries",
    "mask_focal_loss",
    "match_hungarian",
    "match_ota",
    "ota_cost",
    "point_sample",
    "sample_uncertain_points",
    "sigmoid_focal",
]

REF_LABEL, SEG_LABEL = 0, 1


@dataclass
class SetTarget:
    """The targets of one prompt.

    Attributes:
        labels: [G] long, 0 = [REF] (the referenced earlier mask), 1 = [SEG] (the answer).
        boxes: [G, 4] (cx, cy, w, h) normalised to the decoder's square input frame.
        masks: [G, h, w] float 0/1 in that frame at the decoder's mask resolution.
    """

    labels: Tensor
    boxes: Tensor
    masks: Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    @classmethod
    def from_masks(cls, labels: list[int], masks: Tensor) -> SetTarget:
        """Targets from soft masks ([G, h, w] in [0, 1], e.g. area-averaged into the output frame).

        A mask is made binary at 0.5 (or at half its peak when it never reaches 0.5, so a
        target thinner than a mask cell is still supervised); its box is the binary mask's
        tight box with exclusive far edges, as detectron2's ``BitMasks.get_bounding_boxes``.
        Empty masks are dropped (the release asserts that none is empty).
        """
        if masks.shape[0] == 0:
            return cls(torch.zeros(0, dtype=torch.long), torch.zeros(0, 4), masks.float())
        peak = masks.flatten(1).amax(1)
        keep = peak > 0
        masks, peak = masks[keep].float(), peak[keep].float()
        binary = (masks >= torch.clamp(peak / 2, max=0.5)[:, None, None]).float()
        h, w = masks.shape[-2:]
        rows, cols = binary.any(2), binary.any(1)
        ar_h = torch.arange(h, device=masks.device)
        ar_w = torch.arange(w, device=masks.device)
        y0 = torch.where(rows, ar_h, h).amin(1)
        y1 = torch.where(rows, ar_h + 1, 0).amax(1)
        x0 = torch.where(cols, ar_w, w).amin(1)
        x1 = torch.where(cols, ar_w + 1, 0).amax(1)
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=masks.device)
        xyxy = torch.stack([x0, y0, x1, y1], 1).float() / scale
        boxes = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)
        kept = torch.tensor(labels, dtype=torch.long, device=masks.device)[keep]
        return cls(kept, boxes, binary)


@dataclass
class SetLoss:
    """The criterion's result.

    Attributes:
        total: scalar, the weighted sum of every term.
        terms: weighted totals by kind (``class``, ``l1``, ``giou``, ``mask``, ``dice``,
            ``box_iou``), each summed over every supervised output.
        parts: unweighted terms by output and kind: ``layer{l}.*`` (matching queries after
            decoder layer l), ``denoise{l}.*`` (denoising queries) and ``enc.*`` (proposals).
    """

    total: Tensor
    terms: dict[str, Tensor]
    parts: dict[str, Tensor] = field(default_factory=dict)


# -- boxes ---------------------------------------------------------------------------------
def _box_area(b: Tensor) -> Tensor:
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def generalized_box_iou(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU and generalised IoU of xyxy boxes: a [A, 4], b [B, 4] -> ([A, B], [A, B])."""
    inter = (
        (torch.min(a[:, None, 2:], b[None, :, 2:]) - torch.max(a[:, None, :2], b[None, :, :2])).clamp(min=0).prod(-1)
    )
    union = _box_area(a)[:, None] + _box_area(b)[None, :] - inter
    iou = inter / union
    hull = (torch.max(a[:, None, 2:], b[None, :, 2:]) - torch.min(a[:, None, :2], b[None, :, :2])).clamp(min=0).prod(-1)
    return iou, iou - (hull - union) / hull


def giou_loss(a: Tensor, b: Tensor, eps: float = 1e-7) -> Tensor:
    """1 - GIoU of paired xyxy boxes (fvcore's formula, with its ``eps``): [K, 4], [K, 4] -> [K]."""
    inter = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0).prod(-1)
    union = _box_area(a) + _box_area(b) - inter
    iou = inter / (union + eps)
    hull = (torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).prod(-1)
    return 1 - (iou - (hull - union) / (hull + eps))


# -- elementwise losses and costs ----------------------------------------------------------
def class_cost(logits: Tensor, token_map: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Matching cost of classifying each query as each target.

    The focal loss of calling a token positive minus that of calling it negative
    (probabilities offset by 1e-8 inside the logs), averaged over the target's positive tokens.

    Args:
        logits: [Q, T] query x token logits.
        token_map: [G, T] bool, the tokens of each target's class.

    Returns:
        [Q, G].
    """
    p = logits.sigmoid()
    neg = (1 - alpha) * p**gamma * -(1 - p + 1e-8).log()
    pos = alpha * (1 - p) ** gamma * -(p + 1e-8).log()
    m = token_map.to(logits.dtype)
    return (pos - neg) @ m.T / m.sum(1).clamp(min=1)


def dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Sum over K masks of ``1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)``: logits, targets [K, P]."""
    p = logits.sigmoid()
    return (1 - (2 * (p * targets).sum(1) + 1) / (p.sum(1) + targets.sum(1) + 1)).sum()


def mask_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss, mean over each mask's P points, summed over K masks: [K, P] -> scalar."""
    return sigmoid_focal(logits, targets, alpha, gamma).mean(1).sum()


# -- point sampling ------------------------------------------------------------------------
def point_sample(maps: Tensor, coords: Tensor) -> Tensor:
    """Bilinear values of maps [K, h, w] at coords [K, P, 2] ((x, y) in [0, 1]) -> [K, P]."""
    grid = 2 * coords[:, :, None, :] - 1
    return F.grid_sample(maps[:, None], grid.to(maps.dtype), mode="bilinear", align_corners=False)[:, 0, :, 0]


def sample_uncertain_points(
    logits: Tensor,
    num_points: int,
    *,
    oversample: float = 3.0,
    importance: float = 0.75,
    generator: torch.Generator | None = None,
) -> Tensor:
    """PointRend's training points: of ``oversample * num_points`` uniform candidates keep the
    ``importance * num_points`` with logits closest to 0, add uniform points up to ``num_points``.

    Args:
        logits: [K, h, w] mask logits.

    Returns:
        [K, num_points, 2] (x, y) in [0, 1].
    """
    k = logits.shape[0]
    kw = {"device": logits.device, "generator": generator}
    candidates = torch.rand(k, int(num_points * oversample), 2, **kw)
    uncertainty = -point_sample(logits.detach(), candidates).abs()
    num_uncertain = int(importance * num_points)
    idx = uncertainty.topk(num_uncertain, dim=1).indices
    chosen = candidates.gather(1, idx[..., None].expand(-1, -1, 2))
    return torch.cat([chosen, torch.rand(k, num_points - num_uncertain, 2, **kw)], 1)


# -- matching ------------------------------------------------------------------------------
def match_hungarian(cost: Tensor) -> tuple[Tensor, Tensor]:
    """Optimal one-to-one assignment of G <= 2 targets to Q >= G queries (exact, no scipy).

    Args:
        cost: [Q, G].

    Returns:
        (query indices [G], target indices [G]), by increasing query index.
    """
    q, g = cost.shape
    if g > 2 or g > q:
        raise ValueError(
            f"match_hungarian handles at most 2 targets and at least as many queries, got cost {list(cost.shape)}"
        )
    if g == 0:
        empty = torch.zeros(0, dtype=torch.long, device=cost.device)
        return empty, empty
    if g == 1:
        queries, targets = cost[:, 0].argmin().view(1), torch.zeros(1, dtype=torch.long, device=cost.device)
    else:
        best = cost.topk(2, dim=0, largest=False).indices  # [2, 2]: two cheapest queries per target
        a, b = best[0, 0], best[0, 1]
        if a != b:
            pair = torch.stack([a, b])
        else:
            # both prefer the same query: one of them takes it, the other its second best
            first = cost[a, 0] + cost[best[1, 1], 1]
            second = cost[best[1, 0], 0] + cost[b, 1]
            pair = torch.stack([a, best[1, 1]]) if first <= second else torch.stack([best[1, 0], b])
        targets = torch.arange(2, device=cost.device)
        queries = pair
    order = queries.argsort()
    return queries[order], targets[order]


def ota_cost(
    logits: Tensor, boxes: Tensor, target: SetTarget, token_map: Tensor, *, radius: float = 2.5 / 32
) -> tuple[Tensor, Tensor]:
    """HIPIE's simOTA cost and the box IoUs it ranks candidates by.

    ``cost = class + 3 * (-GIoU) + 100`` unless the query's centre lies both inside the target's
    box and within ``radius`` (normalised; 2.5 strides of 32 px on a 1024 frame) of its centre,
    ``+ 10000`` for a query whose centre is near no target at all.

    Args:
        logits: [Q, T]; boxes: [Q, 4] (cx, cy, w, h); token_map: [G, T] bool.

    Returns:
        cost [Q, G], IoU [Q, G].
    """
    pred, gt = box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(target.boxes)
    cx, cy = boxes[:, 0:1], boxes[:, 1:2]
    in_box = (cx > gt[:, 0]) & (cx < gt[:, 2]) & (cy > gt[:, 1]) & (cy < gt[:, 3])
    gcx, gcy = target.boxes[:, 0], target.boxes[:, 1]
    in_centre = (cx > gcx - radius) & (cx < gcx + radius) & (cy > gcy - radius) & (cy < gcy + radius)
    candidate = (in_box | in_centre).any(1)
    iou, giou = generalized_box_iou(pred, gt)
    cost = class_cost(logits, token_map) - 3.0 * giou + 100.0 * (~(in_box & in_centre)).to(logits.dtype)
    return cost + 10000.0 * (~candidate).to(logits.dtype)[:, None], iou


def match_ota(cost: Tensor, iou: Tensor, *, candidates: int = 10) -> tuple[Tensor, Tensor]:
    """simOTA dynamic-k assignment (HIPIE's decoder-layer matcher).

    Each target takes its ``k`` cheapest queries, ``k`` = the integer part of the sum of its
    ``candidates`` best IoUs (at least 1); a query taken by several targets keeps the cheapest;
    a target left without queries then takes its cheapest free query. This is the release's
    procedure exactly for up to 2 targets (for more it resolves one left-out target at a time).

    Args:
        cost, iou: [Q, G].

    Returns:
        (query indices [K], target indices [K]), by increasing query index; K >= G.
    """
    q, g = cost.shape
    taken = torch.zeros(q, g, dtype=torch.bool, device=cost.device)
    if g == 0:
        return taken.nonzero()[:, 0], taken.nonzero()[:, 1]
    ks = iou.topk(min(q, candidates), dim=0).values.sum(0).int().clamp(min=1)
    for j in range(g):
        taken[cost[:, j].topk(int(ks[j]), largest=False).indices, j] = True
    shared = taken.sum(1) > 1
    if shared.any():
        rows = shared.nonzero()[:, 0]
        taken[rows] = False
        taken[rows, cost[rows].argmin(1)] = True
    for j in range(g):
        if not taken[:, j].any():
            busy = taken.any(1)
            taken[(cost[:, j] + 1e5 * busy.to(cost.dtype)).argmin(), j] = True
    queries = taken.any(1).nonzero()[:, 0]
    return queries, taken[queries].to(torch.uint8).argmax(1)


# -- denoising queries ---------------------------------------------------------------------
def make_denoising_queries(
    targets: list[SetTarget], *, noise_scale: float = 1.0, generator: torch.Generator | None = None
) -> DenoisingQueries | None:
    """HIPIE's single contrastive denoising group for a batch of prompts.

    With M = the most targets any prompt has, each prompt gets 2M slots: slot g holds target g's
    box moved by less than ``noise_scale`` times half its size on each edge (positive), slot
    M + g the same box moved by between one and two times that (negative: to be classified as
    background). Noised corners are clamped to the frame.

    Returns:
        :class:`DenoisingQueries` ([N, 2M]), or None when no prompt has a target.
    """
    m = max((len(t) for t in targets), default=0)
    if m == 0:
        return None
    device = targets[0].boxes.device
    n = len(targets)
    boxes = torch.full((n, 2 * m, 4), 0.5, device=device)
    filled = torch.zeros(n, 2 * m, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        g = len(t)
        if g == 0:
            continue
        xyxy = box_cxcywh_to_xyxy(t.boxes.float())
        half = t.boxes[:, 2:].float().repeat(1, 2) / 2
        for start, shift in ((0, 0.0), (m, 1.0)):
            sign = torch.randint(0, 2, (g, 4), device=device, generator=generator).float() * 2 - 1
            amount = torch.rand(g, 4, device=device, generator=generator) + shift
            noised = (xyxy + sign * amount * half * noise_scale).clamp(0, 1)
            cxcywh = torch.cat([(noised[:, :2] + noised[:, 2:]) / 2, noised[:, 2:] - noised[:, :2]], 1)
            # the release feeds boxes as logits: a degenerate side becomes sigmoid(logit(1e-5))
            boxes[i, start : start + g] = inverse_sigmoid(cxcywh).sigmoid()
            filled[i, start : start + g] = True
    return DenoisingQueries(boxes=boxes, filled=filled)


# -- the criterion -------------------------------------------------------------------------
class HipieSetCriterion:
    """HIPIE's losses on :class:`~segllm.decoders.hipie.decoder.HipieSetOutputs` (see the module docstring).

    Args:
        num_ref_tokens: prompt tokens of class [REF] (the first ones); the rest are [SEG].
        class_weight, l1_weight, giou_weight, mask_weight, dice_weight, box_iou_weight: loss weights.
        matcher: "ota" (HIPIE as SegLLM trains it) or "hungarian" (one query per target, the
            cost ``class_cost_weight * class + l1_cost_weight * L1 + giou_cost_weight * -GIoU``)
            for the decoder layers; the encoder proposals are always matched one-to-one.
        mask_points: points sampled per mask for the mask losses; None: every pixel.
        focal_alpha, focal_gamma: of the class and mask focal losses.
        generator: random source of the point sampling (default: torch's global one).
    """

    def __init__(
        self,
        *,
        num_ref_tokens: int,
        class_weight: float = 2.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        box_iou_weight: float = 1.0,
        matcher: Literal["ota", "hungarian"] = "ota",
        class_cost_weight: float = 2.0,
        l1_cost_weight: float = 5.0,
        giou_cost_weight: float = 2.0,
        mask_points: int | None = 112 * 112,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        generator: torch.Generator | None = None,
    ) -> None:
        if matcher not in ("ota", "hungarian"):
            raise ValueError(f"matcher must be 'ota' or 'hungarian', got {matcher!r}")
        self.num_ref_tokens = num_ref_tokens
        self.weights = {
            "class": class_weight,
            "l1": l1_weight,
            "giou": giou_weight,
            "mask": mask_weight,
            "dice": dice_weight,
            "box_iou": box_iou_weight,
        }
        self.matcher = matcher
        self.cost_weights = (class_cost_weight, l1_cost_weight, giou_cost_weight)
        self.mask_points = mask_points
        self.alpha, self.gamma = focal_alpha, focal_gamma
        self.generator = generator

    def token_map(self, labels: Tensor, num_tokens: int) -> Tensor:
        """[G] labels -> [G, T] bool: [REF] owns the first ``num_ref_tokens`` tokens, [SEG] the rest."""
        is_ref = torch.arange(num_tokens, device=labels.device) < self.num_ref_tokens
        return torch.where((labels == REF_LABEL)[:, None], is_ref, ~is_ref)

    def assignment_cost(self, logits: Tensor, boxes: Tensor, target: SetTarget, token_map: Tensor) -> Tensor:
        """The one-to-one matching cost [Q, G]: weighted class + L1 (cxcywh) + -GIoU."""
        w_class, w_l1, w_giou = self.cost_weights
        _, giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(target.boxes))
        l1 = torch.cdist(boxes, target.boxes.to(boxes.dtype), p=1)
        return w_class * class_cost(logits, token_map, self.alpha, self.gamma) + w_l1 * l1 - w_giou * giou

    def __call__(self, decoder: HipieDecoder, outputs: HipieSetOutputs, targets: list[SetTarget]) -> SetLoss:
        """Losses of N prompts.

        Args:
            decoder: the decoder that produced ``outputs`` (its mask head decodes the matched queries).
            outputs: from ``decoder(..., set_outputs=True)``.
            targets: one :class:`SetTarget` per prompt, in the decoder frame of ``decoder``.
        """
        q = outputs.queries
        if len(targets) != q.logits.shape[1]:
            raise ValueError(f"{len(targets)} targets for {q.logits.shape[1]} prompts")
        num_tokens = q.logits.shape[-1]
        maps = [self.token_map(t.labels, num_tokens) for t in targets]
        bg = outputs.num_bg_queries
        size = decoder.config.image_size
        num_layers = q.logits.shape[0]
        parts: dict[str, Tensor] = {}

        for layer in range(num_layers):
            logits, boxes = q.logits[layer, :, bg:].float(), q.boxes[layer, :, bg:].float()
            pairs = [self._match(logits[i].detach(), boxes[i].detach(), t, maps[i]) for i, t in enumerate(targets)]

            def masks(prompt: Tensor, query: Tensor, layer: int = layer) -> Tensor:
                centres = q.centres[layer, prompt, bg + query] * size
                return self._query_masks(decoder, outputs, prompt, q.hs[layer, prompt, bg + query], centres)

            ious = q.ious[layer, :, bg:] if layer < num_layers - 1 else None  # the release skips the last layer's
            parts.update(self._terms(f"layer{layer}", logits, boxes, pairs, targets, maps, masks, ious))

        if outputs.denoising is not None:
            parts.update(self._denoising_terms(decoder, outputs, outputs.denoising, targets, maps))

        ones = [torch.ones(len(t), 1, dtype=torch.bool, device=t.labels.device) for t in targets]
        enc_logits, enc_boxes = outputs.enc_logits.float(), outputs.enc_boxes.float()
        pairs = [
            match_hungarian(self.assignment_cost(enc_logits[i].detach(), enc_boxes[i].detach(), t, ones[i]))
            for i, t in enumerate(targets)
        ]
        parts.update(self._terms("enc", enc_logits, enc_boxes, pairs, targets, ones, None, None))

        terms = {}
        for kind, weight in self.weights.items():
            found = [v for name, v in parts.items() if name.rsplit(".", 1)[1] == kind]
            if found:
                terms[kind] = weight * torch.stack(found).sum()
        return SetLoss(total=torch.stack(list(terms.values())).sum(), terms=terms, parts=parts)

    # -- internals ------------------------------------------------------------------------
    def _match(self, logits: Tensor, boxes: Tensor, target: SetTarget, token_map: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            if self.matcher == "ota":
                return match_ota(*ota_cost(logits, boxes, target, token_map))
            return match_hungarian(self.assignment_cost(logits, boxes, target, token_map))

    def _query_masks(
        self, decoder: HipieDecoder, outputs: HipieSetOutputs, prompt: Tensor, hs: Tensor, centres: Tensor
    ) -> Tensor:
        """Mask logits [K, h, w] of K (prompt, query) pairs: hs [K, C], centres [K, 2] in pixels."""
        feats = outputs.mask_features[prompt]
        return decoder.query_masks(feats, hs[:, None], centres[:, None])[:, 0]

    def _denoising_terms(
        self,
        decoder: HipieDecoder,
        outputs: HipieSetOutputs,
        dn: LayerPredictions,
        targets: list[SetTarget],
        maps: list[Tensor],
    ) -> dict[str, Tensor]:
        """Slot g of each prompt is target g's positive denoising query."""
        device = dn.logits.device
        pairs = [(torch.arange(len(t), device=device), torch.arange(len(t), device=device)) for t in targets]
        q, bg = outputs.queries, outputs.num_bg_queries
        parts: dict[str, Tensor] = {}
        for layer in range(dn.logits.shape[0]):

            def masks(prompt: Tensor, slot: Tensor, layer: int = layer) -> Tensor:
                # QUIRK (released training): a denoising query's mask is centred on the *logit*
                # of matching query `slot`'s reference centre, not on its own box in pixels
                # (HIPIE slices its references twice and skips the sigmoid and the scaling).
                centres = inverse_sigmoid(q.centres[layer, prompt, bg + slot])
                return self._query_masks(decoder, outputs, prompt, dn.hs[layer, prompt, slot], centres)

            logits, boxes = dn.logits[layer].float(), dn.boxes[layer].float()
            parts.update(self._terms(f"denoise{layer}", logits, boxes, pairs, targets, maps, masks, None))
        return parts

    def _terms(
        self,
        name: str,
        logits: Tensor,
        boxes: Tensor,
        pairs: list[tuple[Tensor, Tensor]],
        targets: list[SetTarget],
        maps: list[Tensor],
        masks: Callable[[Tensor, Tensor], Tensor] | None,
        ious: Tensor | None,
    ) -> dict[str, Tensor]:
        """Unweighted terms of one output.

        Args:
            name: prefix of the keys.
            logits: [N, Q, T]; boxes: [N, Q, 4] (cx, cy, w, h).
            pairs: per prompt (query indices [K_i], target indices [K_i]).
            targets, maps: per prompt, its targets and their [G, T] token maps.
            masks: (prompt [K], query [K]) -> mask logits [K, h, w], or None for no mask terms.
            ious: [N, Q, 1] IoU-branch logits, or None for no IoU term.
        """
        device = logits.device
        prompt = torch.cat([torch.full_like(qi, i) for i, (qi, _) in enumerate(pairs)])
        query = torch.cat([qi for qi, _ in pairs])
        n = prompt.numel()
        out: dict[str, Tensor] = {}
        if n == 0:
            zero = logits.sum() * 0 + boxes.sum() * 0
            for k in (
                ("class", "l1", "giou")
                + (("mask", "dice") if masks is not None else ())
                + (("box_iou",) if ious is not None else ())
            ):
                out[f"{name}.{k}"] = zero
            return out

        onehot = torch.zeros_like(logits)
        onehot[prompt, query] = torch.cat([maps[i][gi].to(logits.dtype) for i, (_, gi) in enumerate(pairs)])
        out[f"{name}.class"] = sigmoid_focal(logits, onehot, self.alpha, self.gamma).sum() / n

        src = boxes[prompt, query]
        tgt = torch.cat([t.boxes[gi] for t, (_, gi) in zip(targets, pairs)]).to(device=device, dtype=src.dtype)
        out[f"{name}.l1"] = (src - tgt).abs().sum() / n
        out[f"{name}.giou"] = giou_loss(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)).sum() / n

        if masks is not None:
            pred = masks(prompt, query).float()
            true = torch.cat([t.masks[gi] for t, (_, gi) in zip(targets, pairs)]).to(device=device, dtype=pred.dtype)
            if self.mask_points is None:
                pred_p, true_p = pred.flatten(1), true.flatten(1)
            else:
                with torch.no_grad():
                    coords = sample_uncertain_points(pred, self.mask_points, generator=self.generator)
                    true_p = point_sample(true, coords)
                pred_p = point_sample(pred, coords)
            out[f"{name}.mask"] = mask_focal_loss(pred_p, true_p, self.alpha, self.gamma) / n
            out[f"{name}.dice"] = dice_loss(pred_p, true_p) / n

        if ious is not None:
            with torch.no_grad():
                iou, _ = generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))
                iou = iou.diagonal()
            out[f"{name}.box_iou"] = F.binary_cross_entropy_with_logits(ious[prompt, query, 0].float(), iou)
        return out
