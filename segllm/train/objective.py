"""The training objective: the losses of one batch, for any composed :class:`SegLLM`.

:func:`training_loss` is what the trainer optimises: the LM loss on answer tokens, the mask
losses of every ``<seg>`` (:mod:`segllm.losses`; or, for a decoder with set prediction such as
HIPIE, its set-prediction criterion), and the optional terms the procedural world makes
possible (dense attributes, object selection). The model itself only embeds, runs the LLM and
decodes; it imports nothing from here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from segllm.batch import Batch
from segllm.decoders.base import REF, SEG, DecoderOutput
from segllm.decoders.hipie.criterion import (
    REF_LABEL,
    SEG_LABEL,
    HipieSetCriterion,
    SetTarget,
    make_denoising_queries,
)
from segllm.errors import ConfigError
from segllm.losses import bce_loss, box_loss, dice_loss, focal_loss, mask_iou
from segllm.model.dense_head import cell_labels, group_loss
from segllm.model.memory import mask_boxes
from segllm.model.segllm import SegLLM
from segllm.processor import IGNORE


@dataclass
class LossOutput:
    """The training losses of a batch. Every ``*_loss`` is a scalar tensor (zero when not applicable).

    ``mask_logits``: [S, 2, h, w] decoder logits per decoded ``<seg>`` ([REF], [SEG] channels);
    ``iou_scores``: [S, 2]. ``set_terms``: with ``loss.set_prediction``, every weighted term
    (``class``, ``l1``, ``giou``, ``mask``, ``dice``, ``box_iou``, ``prompt_l2``).
    """

    loss: Tensor
    lm_loss: Tensor
    mask_loss: Tensor
    dice_loss: Tensor
    ref_loss: Tensor
    iou_loss: Tensor
    mask_logits: Tensor
    iou_scores: Tensor
    box_loss: Tensor | None = None
    set_terms: dict[str, Tensor] | None = None
    dense_loss: Tensor | None = None
    select_loss: Tensor | None = None


def training_loss(model: SegLLM, batch: Batch) -> LossOutput:
    """The training losses of a batch: token cross-entropy on answers plus mask losses for every
    ``<seg>`` (and the optional dense-attribute and selection terms).

    The trainer runs it as ``model(batch, objective=training_loss)``, inside the model's
    ``forward``, so a distributed wrapper sees the whole step.

    With ``config.loss.set_prediction`` (HIPIE decoder) the mask losses are HIPIE's
    set-prediction losses plus ``prompt_l2`` times the mean square of the prompt tokens, as
    the released model was trained; with ``set_max_rounds`` only the chosen ``<seg>`` are
    decoded, and ``mask_logits``/``iou_scores`` hold those rows (in ``<seg>`` order).
    """
    cfg = model.config.loss
    dense = model.dense_head is not None and batch.dense_vision is not None
    image_tokens = decoder_feats = dense_loss = None
    if dense:
        image_tokens, decoder_feats, dense_loss = _image_dense_terms(model, batch)
    hidden = model.hidden_states(batch, image_tokens=image_tokens)
    labels = batch.labels[:, 1:]
    zero = hidden.sum() * 0
    # the supervised positions (labels != IGNORE, row-major), found on the CPU when the batch was
    # built, so selecting them reads nothing back from the device; derived here for a batch without
    index = batch.lm_index if batch.lm_index is not None else (labels != IGNORE).reshape(-1).nonzero().view(-1)
    if index.numel():
        index = index.to(hidden.device)
        logits = model.llm.get_output_embeddings()(hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, index))
        lm_loss = F.cross_entropy(logits.float(), labels.reshape(-1).index_select(0, index))
    else:
        lm_loss = zero
    if cfg.set_prediction:
        return _set_prediction_loss(model, hidden, batch, lm_loss, zero)
    if cfg.own_ref_prob and batch.ref_masks is not None and model.training:
        if decoder_feats is None:  # computed once here, for both decodings
            decoder_feats = model.encode_decoder_image(batch.decoder_input())
        batch = own_ref_masks(model, hidden, batch, decoder_feats, cfg.own_ref_prob)
    decoded, prompts = model.decode_segs(hidden, batch, feats=decoder_feats)
    if dense:
        dense_loss = _add(dense_loss, _prompt_dense_terms(model, batch, decoded, prompts))
    mask_logits, iou, boxes = decoded.mask_logits, decoded.iou_scores, decoded.boxes
    select_loss = None
    if mask_logits.shape[0] and batch.seg_targets is not None:
        tgt = batch.seg_targets.to(mask_logits.device)
        seg_l = mask_logits[:, SEG]
        if batch.seg_pool is not None and cfg.select_weight:
            select_loss, tgt = selection_loss(seg_l, tgt, batch)
        m_loss, d_loss, ref_loss, iou_loss, b_loss = _mask_terms(model, batch, mask_logits, iou, boxes, tgt, zero)
    else:
        m_loss = d_loss = ref_loss = iou_loss = b_loss = zero
    loss = (
        cfg.lm * lm_loss
        + cfg.mask_weight * m_loss
        + cfg.dice_weight * d_loss
        + cfg.ref_weight * ref_loss
        + cfg.iou_weight * iou_loss
        + cfg.box_weight * b_loss
    )
    if dense_loss is not None:
        loss = loss + cfg.dense_weight * dense_loss
    if select_loss is not None:
        loss = loss + cfg.select_weight * select_loss
    return LossOutput(loss, lm_loss, m_loss, d_loss, ref_loss, iou_loss, mask_logits, iou, b_loss, dense_loss=dense_loss, select_loss=select_loss)


def referenced_seg_rows(encoded: list) -> Tensor:
    """[S] for each ``<seg>`` of a batch (in ``Batch.seg_pos`` order), the row of the ``<seg>``
    of the same conversation that answered the mask it refers to; -1 where it refers to none or
    to a mask no ``<seg>`` answered (``encoded``: the batch's :class:`segllm.processor.Encoded`)."""
    rows, base = [], 0
    for e in encoded:
        answered = {(s.round_index + 1, s.index): base + k for k, s in enumerate(e.segs)}  # (1-indexed round, mask index)
        rows += [answered.get(tuple(s.ref), -1) if s.ref is not None else -1 for s in e.segs]
        base += len(e.segs)
    return torch.tensor(rows, dtype=torch.long)


def own_ref_masks(model: SegLLM, hidden: Tensor, batch: Batch, feats: Tensor, prob: float) -> Batch:
    """``batch`` with a share ``prob`` of its referenced masks (``Batch.ref_masks``, [S, h, w] in
    the decoder's output frame) replaced by the model's own prediction of them: the [SEG] masks
    (logit > 0) of a gradient-free decoding of the same LLM states, which read the ground
    truth's earlier masks (see ``LossConfig.own_ref_prob``). Which rows are replaced is drawn
    from torch's generator, which the trainer seeds per step. A row that refers to a pick round
    (``Batch.ref_pick``) keeps the ground truth: its later rounds' targets assume the recorded
    pick, and the model's own mask may be another, equally valid object (evaluation's own
    history feeds such rounds back from the ground truth too)."""
    # chosen on the host (the rows, the draw and Batch.ref_pick live there), reading nothing back
    # from the device
    rows = referenced_seg_rows(batch.encoded)
    use = (rows >= 0) & (torch.rand(len(rows)) < prob)
    if batch.ref_pick is not None:
        use &= ~batch.ref_pick
    chosen = [(i, r) for i, (r, u) in enumerate(zip(rows.tolist(), use.tolist())) if u]  # (row replaced, row it refers to)
    if not chosen:
        return batch
    # only the answers referred to are decoded (about an eighth of a batch's <seg>s at
    # own_ref_prob 0.5); each <seg> is decoded on its own, so their masks are those of decoding all
    needed = sorted({r for _, r in chosen})
    at = {r: k for k, r in enumerate(needed)}
    with torch.no_grad():
        own = model.decode_segs(hidden.detach(), batch, index=torch.tensor(needed), feats=feats.detach())[0].mask_logits[:, SEG] > 0
    refs = batch.ref_masks.clone()
    idx, where = torch.tensor([i for i, _ in chosen]), torch.tensor([at[r] for _, r in chosen])
    refs[idx.to(refs.device)] = own[where.to(own.device)].to(device=refs.device, dtype=refs.dtype)
    return dataclasses.replace(batch, ref_masks=refs)


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """a + b, where None is "no term"."""
    return b if a is None else a if b is None else a + b


def _image_dense_terms(model: SegLLM, batch: Batch) -> tuple[Tensor, Tensor, Tensor | None]:
    """The image features, computed once for the dense heads and for the LLM and decoder, and
    the dense heads' loss on them (``dense.on``: "vision" and/or "decoder").

    Returns:
        (image tokens [B, N, D], decoder features [B, C, h, w], the mean of the dense terms or None)
    """
    patches = model.vision(batch.vision_input())
    image_tokens = model.projector(patches.to(model.dtype))
    decoder_feats = model.encode_decoder_image(batch.decoder_input())
    terms = []
    if "vision" in model.config.dense.on:
        g = int(round(patches.shape[1] ** 0.5))
        terms.append(model.dense_head.loss("vision", patches.reshape(patches.shape[0], g, g, -1), batch.dense_vision.to(patches.device)))
    if "decoder" in model.config.dense.on:
        # the decoder's own features: its first prompt_dim channels (a refining direct decoder
        # appends full-resolution ones after them)
        feats = decoder_feats[:, : model.decoder.prompt_dim]
        terms.append(model.dense_head.loss("decoder", feats.permute(0, 2, 3, 1), batch.dense_decoder.to(feats.device)))
    return image_tokens, decoder_feats, (sum(terms) / len(terms) if terms else None)


def _prompt_dense_terms(model: SegLLM, batch: Batch, decoded: DecoderOutput, prompts: Tensor) -> Tensor | None:
    """The dense terms on the prompts: the classes of each target ("target" head), and the
    direct decoder's attribute matching (its pixel classes learn the dense maps, its prompt
    classes what each question names). None where neither applies."""
    out = None
    if batch.seg_attrs is not None and len(prompts):
        r = model.config.prompt_head.num_ref_tokens
        out = model.dense_head.target_loss(prompts[:, r:].mean(1), batch.seg_attrs)
    if decoded.attributes is not None:
        pixels, named = decoded.attributes
        groups = model.config.dense.groups
        terms = [group_loss(groups, pixels, cell_labels(batch.dense_decoder.to(pixels.device), pixels.shape[1]))]
        if batch.seg_named is not None and len(named):
            terms.append(group_loss(groups, named, batch.seg_named.to(named.device)))
        out = _add(out, sum(terms) / len(terms))
    return out


def _mask_terms(
    model: SegLLM, batch: Batch, mask_logits: Tensor, iou: Tensor, boxes: Tensor | None, tgt: Tensor, zero: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The [SEG] mask loss (BCE or focal) and Dice against ``tgt`` [S, h, w], the [REF] loss
    where a round refers to an earlier mask, the IoU head's MSE against the true IoU, and the box
    loss where the decoder predicts boxes (in the decoder's frame pixels)."""
    cfg = model.config.loss
    seg_l = mask_logits[:, SEG]
    m_loss = focal_loss(seg_l, tgt, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma) if cfg.mask == "focal" else bce_loss(seg_l, tgt)
    d_loss = dice_loss(seg_l, tgt)
    ref_loss = zero
    # the rows whose [REF] half is supervised: found on the CPU when the batch was built (no read
    # back from the device), derived from has_ref for a batch without
    rows = batch.ref_index if batch.ref_index is not None else batch.has_ref.nonzero().view(-1)
    if rows.numel():
        rows = rows.to(mask_logits.device)
        rl, rt = mask_logits[:, REF].index_select(0, rows), batch.ref_targets.to(mask_logits.device).index_select(0, rows)
        ref_loss = (focal_loss(rl, rt, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma) if cfg.mask == "focal" else bce_loss(rl, rt)) + dice_loss(rl, rt)
    with torch.no_grad():
        true_iou = mask_iou(seg_l, tgt)
    iou_loss = F.mse_loss(iou[:, SEG].float(), true_iou)
    b_loss = zero
    if boxes is not None and cfg.box_weight:
        frame_size = model.decoder.image_size
        target_boxes = mask_boxes(tgt > 0.5).to(boxes.device) * (frame_size / tgt.shape[-1])
        b_loss = box_loss(boxes[:, SEG], target_boxes, frame_size)
    return m_loss, d_loss, ref_loss, iou_loss, b_loss


def selection_loss(seg_logits: Tensor, targets: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
    """Which object did each ``<seg>`` pick? Each candidate's score is the mean [SEG] logit over
    its pixels; the loss is the cross-entropy of the right candidates among those of the same
    image and group (-log of their summed probability where several are right).

    Why: BCE and Dice on pixels can be lowered a long way by a question-blind "every object"
    mask, the shortcut the project's from-scratch models took (issue 13); a score per object,
    normalised across the image's objects, is only lowered by telling the asked object from
    the others. Where several answers are right (pick rounds) the pixel losses then target the
    right candidate the model scores highest, so it is not taught to blur them together.

    Args:
        seg_logits: [S, h, w]; targets: [S, h, w] soft target masks.

    Returns:
        (scalar loss, targets with each multi-answer row replaced by its chosen candidate)
    """
    cand = batch.cand_masks.to(seg_logits.device, seg_logits.dtype).flatten(1)  # [C, h*w]
    pool = batch.seg_pool.to(seg_logits.device)
    valid = batch.seg_valid.to(seg_logits.device)
    scores = (seg_logits.flatten(1) @ cand.T) / cand.sum(dim=1).clamp(min=1.0)  # [S, C] mean logit per object
    scores = scores.float().masked_fill(~pool, float("-inf"))
    usable = pool.sum(dim=1) >= 2  # nothing to choose among one candidate
    usable &= valid.any(dim=1)
    if not usable.any():
        return seg_logits.sum() * 0, targets
    logp = scores[usable].log_softmax(dim=1)
    loss = -torch.logsumexp(logp.masked_fill(~valid[usable], float("-inf")), dim=1).mean()
    several = valid.sum(dim=1) > 1
    if several.any():
        pick = scores.detach().masked_fill(~valid, float("-inf")).argmax(dim=1)
        targets = targets.clone()
        targets[several] = batch.cand_masks.to(targets.device, targets.dtype)[pick[several]]
    return loss, targets


def _set_prediction_loss(model: SegLLM, hidden: Tensor, batch: Batch, lm_loss: Tensor, zero: Tensor) -> LossOutput:
    """The loss section with HIPIE's set-prediction losses (see :func:`training_loss`)."""
    cfg = model.config.loss
    if not model.decoder.supports_set_prediction:
        raise ConfigError(f"loss.set_prediction needs a decoder with set prediction (HIPIE), not {type(model.decoder).__name__}")
    keep = _pick_rounds(batch.seg_batch, cfg.set_max_rounds)
    targets = None
    if keep.numel() and batch.seg_targets is not None:
        targets = _set_targets(batch, keep, next(model.decoder.parameters()).device)
    if targets is None:
        out, prompts = model.decode_segs(hidden, batch, keep)
    else:
        # the image features before the denoising noise: the random draws stay in the order the
        # released training makes them
        feats = model.encode_decoder_image(batch.decoder_input())
        denoising = make_denoising_queries(targets) if cfg.set_denoising else None
        out, prompts = model.decode_segs(hidden, batch, keep, feats=feats, denoising=denoising, set_outputs=True)
    terms = dict.fromkeys(("class", "l1", "giou", "mask", "dice", "box_iou", "prompt_l2"), zero)
    if targets is not None:
        criterion = HipieSetCriterion(
            num_ref_tokens=model.decoder.num_ref_tokens,
            class_weight=cfg.set_class,
            l1_weight=cfg.set_l1,
            giou_weight=cfg.set_giou,
            mask_weight=cfg.set_mask,
            dice_weight=cfg.set_dice,
            box_iou_weight=cfg.set_box_iou,
            matcher=cfg.set_matcher,
            focal_alpha=cfg.focal_alpha,
            focal_gamma=cfg.focal_gamma,
        )
        terms.update(criterion(model.decoder, out.set_outputs, targets).terms)
        terms["prompt_l2"] = cfg.prompt_l2 * prompts.float().square().mean()
    loss = cfg.lm * lm_loss + sum(terms.values())
    return LossOutput(
        loss=loss,
        lm_loss=lm_loss,
        mask_loss=terms["mask"],
        dice_loss=terms["dice"],
        ref_loss=zero,  # [REF] is one of the set's classes here, inside the other terms
        iou_loss=terms["box_iou"],
        mask_logits=out.mask_logits,
        iou_scores=out.iou_scores,
        box_loss=terms["l1"] + terms["giou"],
        set_terms=terms,
    )


def _pick_rounds(seg_batch: Tensor, most: int) -> Tensor:
    """Indices of the ``<seg>`` rows to decode, ascending: all of them, or (``most`` > 0) at most
    ``most`` per conversation drawn at random, as the release limits HIPIE's training inputs."""
    rows = torch.arange(seg_batch.numel())
    if most <= 0 or not rows.numel():
        return rows
    conv = seg_batch.cpu()
    keep = []
    for b in conv.unique():
        mine = rows[conv == b]
        keep.append(mine[torch.randperm(mine.numel())[:most]] if mine.numel() > most else mine)
    return torch.cat(keep).sort().values


def _set_targets(batch: Batch, index: Tensor, device: torch.device) -> list[SetTarget]:
    """The set-prediction targets of the ``<seg>`` rows ``index``: [REF] (when the round refers
    to an earlier mask) then [SEG], from the soft masks in the decoder's output frame."""
    seg = batch.seg_targets[index].to(device)
    ref = batch.ref_targets[index].to(device)
    out = []
    for s, r, has_ref in zip(seg, ref, batch.has_ref[index].tolist()):
        if has_ref:
            out.append(SetTarget.from_masks([REF_LABEL, SEG_LABEL], torch.stack([r, s])))
        else:
            out.append(SetTarget.from_masks([SEG_LABEL], s[None]))
    return out
