"""Batch assembly: conversations -> a model's input :class:`Batch` (tokens, pixels, memory crops,
``<seg>`` slots and, for training, the mask, dense and selection targets).

Beside :mod:`segllm.processor`, which renders one conversation into tokens and slots, this
module pads B of them into tensors and preprocesses what goes with them (the image for the
vision tower and the mask decoder, each referenced earlier mask's crop). Training batches and
whole-conversation inference (:meth:`segllm.model.segllm.SegLLM.prepare`, which calls
:func:`build_batch`) share it; a session's rounds need no batch
(:class:`segllm.model.rounds.RoundEngine`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from segllm.conversation import Conversation
from segllm.decoders.base import Frame, masks_to_frame
from segllm.errors import ConversationError
from segllm.model.dense_head import IGNORE_LABEL, target_labels
from segllm.model.rounds import seg_context
from segllm.processor import IGNORE, Encoded

if TYPE_CHECKING:  # the model imports this module; batches are only made for a built model
    from segllm.model.segllm import SegLLM


@dataclass
class Batch:
    """Model input for B conversations (one image each), padded on the right to length L.

    Attributes:
        input_ids, attention_mask, labels: [B, L].
        image_pixels: [B, 3, S, S] vision-tower input.
        image_pos: [B, N] positions of the N image placeholders.
        decoder_pixels: [B, 3, Sd, Sd] mask-decoder input; ``frames`` says where each image sits.
        images, image_norms: [B, 3, S, S] uint8 the images themselves, and ((mean, std) of the
            vision tower, (mean, std) of the decoder), when every image is already at both
            inputs' size and each input is only normalised: then ``image_pixels`` and
            ``decoder_pixels`` are ``None`` and the inputs are made on the model's device; read
            either way through :meth:`vision_input` and :meth:`decoder_input`.
        memory_pixels: [M, 3, S, S] masked crops of the M earlier masks fed back, preprocessed for
            the vision tower; or ``None`` when ``memory_crops`` holds them (read both through
            :meth:`memory_inputs`).
        memory_crops, memory_sides: [M, 3, c, c] uint8 the same crops before preprocessing, each
            ``memory_crops[i, :, :s_i, :s_i]`` (zero-padded to the largest side c), and [M] their
            sides s_i (kept on the host by :meth:`to`, where the preprocessing reads them without
            waiting on the device); the crops are preprocessed on the model's device. ``None`` where the vision tower's
            preprocessing cannot batch them (the released CLIP's, on the host): then
            ``memory_pixels`` is given.
        memory_boxes: [M, 4] their normalised boxes.
        memory_batch, memory_pos, box_pos: [M] conversation index, mask placeholder position
            and box placeholder position (-1 when boxes are off) of each.
        seg_batch, seg_pos: [S] conversation index and position of each ``<seg>`` token.
        seg_targets, ref_targets: [S, h, w] soft masks in the decoder's output frame
            (``None`` at inference); ``has_ref``: [S] bool, whether the [REF] half is supervised;
            ``ref_index``: [R] long, the rows where it is (``has_ref``'s True positions).
        lm_index: [T] long, the positions (flattened over [B, L-1]) whose next token the LM loss
            supervises (``labels[:, 1:] != IGNORE``). ``ref_index`` and ``lm_index`` are computed
            here, on the CPU, so that the loss selects those rows without reading a mask back
            from the device in the middle of a step.
        ref_masks: [S, h, w] the earlier mask each ``<seg>``'s round refers to (the one [REF]
            describes), soft, in the decoder's output frame, zeros where none: the decoder's
            input for a model whose decoder takes them (``SegLLM.uses_ref_masks``), else ``None``.
        ref_pick: [S] bool, the round each ``<seg>`` refers to is a pick round (the conversation's
            ``alternatives`` has it: several objects were valid answers and the ground truth's
            later rounds assume the recorded one), for training with ``loss.own_ref_prob``; with
            targets, else ``None``. It stays on the host in :meth:`to` (see ``HOST_FIELDS``).
        dense_vision, dense_decoder: [B, G, S, S] / [B, G, Sd, Sd] int16 per-pixel class maps in
            the vision tower's and the decoder's input frames, for the dense auxiliary loss
            (``None`` unless the model has dense heads and every conversation has ``dense``;
            ``dense_decoder`` also unless a loss reads it: ``dense.on`` has "decoder" or the
            decoder matches attributes). int16, not long: a quarter of the bytes that data-loader
            workers hand over each step; the loss widens the few labels it samples.
        seg_attrs: [S, G] long classes of each ``<seg>``'s target object per dense label group
            (``dense.on`` has "target"; ``IGNORE_LABEL`` where unknown), else ``None``.
        seg_named: [S, G] long classes each ``<seg>``'s question names per dense label group (0:
            none; from ``Conversation.named``), for a decoder with attribute matching, else ``None``.
        seg_context: [S, T] long positions of each ``<seg>``'s round tokens before it (the
            user turn and the answer so far), -1 padded; for ``prompt_head.attend_round``.
        cand_masks: [C, h, w] soft masks of every conversation's candidate objects in the
            decoder's output frame; ``seg_pool``, ``seg_valid``: [S, C] bool, the candidates each
            ``<seg>`` chooses among (same image, same group) and the right ones (``None`` unless
            every conversation has ``candidates`` and ``loss.select_weight`` > 0).
        encoded: the processor's output per conversation.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    image_pixels: Tensor | None
    image_pos: Tensor
    decoder_pixels: Tensor | None
    frames: list[Frame]
    memory_pixels: Tensor | None
    memory_boxes: Tensor
    memory_batch: Tensor
    memory_pos: Tensor
    box_pos: Tensor
    seg_batch: Tensor
    seg_pos: Tensor
    seg_targets: Tensor | None = None
    ref_targets: Tensor | None = None
    has_ref: Tensor | None = None
    ref_index: Tensor | None = None
    lm_index: Tensor | None = None
    ref_masks: Tensor | None = None
    memory_crops: Tensor | None = None
    memory_sides: Tensor | None = None
    images: Tensor | None = None
    image_norms: tuple | None = None
    ref_pick: Tensor | None = None
    dense_vision: Tensor | None = None
    dense_decoder: Tensor | None = None
    seg_attrs: Tensor | None = None
    seg_named: Tensor | None = None
    seg_context: Tensor | None = None
    cand_masks: Tensor | None = None
    seg_pool: Tensor | None = None
    seg_valid: Tensor | None = None
    encoded: list[Encoded] = field(default_factory=list)

    # read on the host during a training step (which rows take the model's own masks), so kept
    # there: a copy back from a GPU would wait for all the work queued before it
    HOST_FIELDS = frozenset({"ref_pick", "memory_sides"})

    def vision_input(self) -> Tensor:
        """[B, 3, S, S] the vision tower's input: ``image_pixels``, or ``images`` normalised."""
        return self.image_pixels if self.image_pixels is not None else _normalised(self.images, *self.image_norms[0])

    def decoder_input(self) -> Tensor:
        """[B, 3, Sd, Sd] the mask decoder's input: ``decoder_pixels``, or ``images`` normalised."""
        return self.decoder_pixels if self.decoder_pixels is not None else _normalised(self.images, *self.image_norms[1])

    def memory_inputs(self, vision) -> Tensor:
        """The vision input of the memory crops, [M, 3, S, S]: ``memory_pixels``, or
        ``memory_crops`` preprocessed by ``vision`` (the model's
        :class:`~segllm.model.vision.VisionTower`) on their device."""
        if self.memory_pixels is not None:
            return self.memory_pixels
        return vision.preprocess_crops(self.memory_crops, self.memory_sides)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The batch on ``device`` (its host fields stay); a tensor two fields share (the dense
        maps when both frames hold the image as it is) is copied once and stays shared.
        ``non_blocking``: copies from page-locked memory (:meth:`pin_memory`) do not wait."""
        return self._map(lambda v: v.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """The batch with its device-bound tensors in page-locked host memory (a CUDA machine's
        data loader calls this with ``pin_memory=True``), so that :meth:`to` can copy them to the
        GPU without the host waiting for the work queued before."""
        return self._map(lambda v: v.pin_memory())

    def _map(self, fn) -> Batch:
        """A copy with ``fn`` applied to every tensor field but the host ones, once per tensor."""
        out, moved = {}, {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor) and f.name not in self.HOST_FIELDS:
                if id(v) not in moved:
                    moved[id(v)] = fn(v)
                v = moved[id(v)]
            out[f.name] = v
        return Batch(**out)


def _normalised(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 [B, 3, H, W] -> float32 (images / 255 - mean) / std, the same operations in the same
    order as the vision tower's and the decoder's preprocessing (so the same values)."""
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return images.float().div_(255.0).sub_(m).div_(s)


def build_batch(model: SegLLM, conversations: Sequence[Conversation], *, open_last: bool = False, targets: bool = True) -> Batch:
    """Render and preprocess conversations into a :class:`Batch` for ``model`` (on the CPU).

    Args:
        model: the :class:`segllm.model.segllm.SegLLM` whose processor, preprocessing, memory
            crops, decoder frame and options (dense heads, selection loss, attend_round) the
            batch is made for.
        conversations: B conversations (validated here).
        open_last: each conversation's last round is to be answered by the model.
        targets: build ground-truth mask targets for the losses.
    """
    encs = [model.processor.encode(c, open_last=open_last) for c in conversations]
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.processor.eos_id
    L = max(len(e) for e in encs)
    B = len(encs)
    ids = torch.full((B, L), pad, dtype=torch.long)
    att = torch.zeros(B, L, dtype=torch.long)
    lab = torch.full((B, L), IGNORE, dtype=torch.long)
    for b, e in enumerate(encs):
        ids[b, : len(e)] = torch.tensor(e.input_ids)
        lab[b, : len(e)] = torch.tensor(e.labels)
        att[b, : len(e)] = 1
    images = [torch.tensor(c.image).permute(2, 0, 1) for c in conversations]  # a copy: inputs may be read-only
    s = model.config.vision.image_size
    norms = (model.vision.input_normalization(), model.decoder.input_normalization())
    image_pixels = decoder_pixels = images_u8 = None
    if None not in norms and s == model.decoder.image_size and all(im.dtype == torch.uint8 and im.shape[1:] == (s, s) for im in images):
        # every image already at both inputs' size (the world's): they go uint8 and are only
        # normalised, on the model's device (Batch.vision_input / decoder_input): a quarter of
        # the bytes a data-loader worker hands over, and no float copies made here
        images_u8 = torch.stack(images)
        frames = [Frame.fit(s, s, s)] * B
    else:
        image_pixels = torch.stack([model.vision.preprocess(im) for im in images])
        dec = [model.decoder.preprocess(im) for im in images]
        decoder_pixels = torch.stack([d[0] for d in dec])
        frames = [d[1] for d in dec]
        norms = None

    crops, boxes, mb, mp, bp = [], [], [], [], []
    for b, (c, e) in enumerate(zip(conversations, encs)):
        for item in e.memory:
            mask = torch.tensor(np.asarray(c.rounds[item.ref_round - 1].masks[item.mask_index], dtype=bool))
            crop, box = model.memory.crop_inputs(images[b], mask)
            crops.append(crop)
            boxes.append(box)
            mb.append(b)
            mp.append(item.mask_pos)
            bp.append(item.box_pos)
    side = max((cr.shape[-1] for cr in crops), default=0)
    memory_crops = memory_sides = None
    if crops and model.vision.batches_crops(side):
        # the small uint8 crops, preprocessed on the model's device (Batch.memory_inputs): a
        # data-loader worker then hands over ~1/10 of the bytes and skips the resizing
        memory_crops = torch.zeros(len(crops), 3, side, side, dtype=torch.uint8)
        for i, cr in enumerate(crops):
            memory_crops[i, :, : cr.shape[1], : cr.shape[2]] = cr
        memory_sides = torch.tensor([cr.shape[-1] for cr in crops], dtype=torch.long)
        memory_pixels = None
    elif crops:
        memory_pixels = torch.stack([model.vision.preprocess(cr) for cr in crops])
    else:
        memory_pixels = torch.zeros(0, 3, s, s)
    batch = Batch(
        input_ids=ids,
        attention_mask=att,
        labels=lab,
        image_pixels=image_pixels,
        image_pos=torch.tensor([e.image_pos for e in encs], dtype=torch.long).view(B, -1),
        decoder_pixels=decoder_pixels,
        frames=frames,
        memory_pixels=memory_pixels,
        memory_crops=memory_crops,
        memory_sides=memory_sides,
        images=images_u8,
        image_norms=norms,
        memory_boxes=torch.stack(boxes) if boxes else torch.zeros(0, 4),
        memory_batch=torch.tensor(mb, dtype=torch.long),
        memory_pos=torch.tensor(mp, dtype=torch.long),
        box_pos=torch.tensor(bp, dtype=torch.long),
        seg_batch=torch.tensor([b for b, e in enumerate(encs) for _ in e.segs], dtype=torch.long),
        seg_pos=torch.tensor([s.pos for e in encs for s in e.segs], dtype=torch.long),
        seg_context=seg_context(encs) if model.config.prompt_head.attend_round else None,
        encoded=encs,
    )
    out = model.decoder.output_size
    refs = None
    if targets or model.uses_ref_masks:
        # every mask a <seg> is trained on or refers to, in the decoder's output frame, computed
        # once per conversation (a round's target is usually a later round's reference too)
        framed = _round_masks_in_frame(conversations, encs, frames, out, targets=targets)
        # each <seg>'s referenced earlier mask (zeros where none)
        has_ref, ref_pick, ref_rows = [], [], []
        zeros = torch.zeros(out, out)
        for (c, e), (maps, row) in zip(zip(conversations, encs), framed):
            for item in e.segs:
                has_ref.append(item.ref is not None)
                ref_pick.append(item.ref is not None and (item.ref[0] - 1) in (c.alternatives or {}))
                ref_rows.append(maps[row[item.ref[0] - 1, item.ref[1]]] if item.ref is not None else zeros)
        refs = torch.stack(ref_rows) if ref_rows else torch.zeros(0, out, out)
        if model.uses_ref_masks:
            batch.ref_masks = refs
    if targets:
        seg_rows = [maps[row[item.round_index, item.index]] for e, (maps, row) in zip(encs, framed) for item in e.segs]
        batch.seg_targets = torch.stack(seg_rows) if seg_rows else torch.zeros(0, out, out)
        batch.ref_targets = refs
        batch.has_ref = torch.tensor(has_ref, dtype=torch.bool)
        batch.ref_index = torch.nonzero(batch.has_ref).view(-1)
        batch.lm_index = torch.nonzero((lab[:, 1:] != IGNORE).reshape(-1)).view(-1)
        batch.ref_pick = torch.tensor(ref_pick, dtype=torch.bool)
        if model.dense_head is not None and conversations and all(c.dense is not None for c in conversations):
            need_decoder = "decoder" in model.config.dense.on or bool(getattr(model.config.decoder, "attributes", None))
            batch.dense_vision, batch.dense_decoder = _dense_targets(model, conversations, frames, decoder=need_decoder)
            groups = list(model.config.dense.groups)
            if getattr(model.config.decoder, "attributes", None) and all(c.named is not None for c in conversations):
                rows = [[c.named[i.round_index].get(g, 0) for g in groups] for c, e in zip(conversations, encs) for i in e.segs]
                batch.seg_named = torch.tensor(rows, dtype=torch.long).view(len(rows), len(groups))
            if "target" in model.config.dense.on:
                rows = [target_labels(c.dense, [c.rounds[i.round_index].masks[i.index] for i in e.segs], groups) for c, e in zip(conversations, encs)]
                batch.seg_attrs = torch.cat(rows) if rows else torch.zeros(0, len(groups), dtype=torch.long)
        if model.config.loss.select_weight and conversations and all(c.candidates is not None for c in conversations):
            batch.cand_masks, batch.seg_pool, batch.seg_valid = _selection_targets(model, conversations, encs, frames)
    return batch


def _selection_targets(model: SegLLM, conversations: Sequence[Conversation], encs: list[Encoded], frames: list[Frame]) -> tuple[Tensor, Tensor, Tensor]:
    """Candidates and, per ``<seg>``, which of them it chooses among and which are right (see
    :class:`Batch`). A ``<seg>`` whose target matches no candidate (IoU < 0.5) chooses among none."""
    out = model.decoder.output_size
    cands, groups, owner = [], [], []
    for b, (c, fr) in enumerate(zip(conversations, frames)):
        m = torch.from_numpy(np.asarray(c.candidates, dtype=bool))
        cands.append(masks_to_frame(m, fr, out))
        groups.append(torch.as_tensor(np.asarray(c.candidate_groups if c.candidate_groups is not None else np.zeros(len(m)), dtype=np.int64)))
        owner.append(torch.full((len(m),), b, dtype=torch.long))
    cand, group, owner_t = torch.cat(cands), torch.cat(groups), torch.cat(owner)
    offsets = np.cumsum([0] + [len(x) for x in cands])
    rows_pool, rows_valid = [], []
    for b, (c, e) in enumerate(zip(conversations, encs)):
        flat = np.asarray(c.candidates, dtype=bool).reshape(len(c.candidates), -1)
        for item in e.segs:
            pool = torch.zeros(len(cand), dtype=torch.bool)
            valid = torch.zeros(len(cand), dtype=torch.bool)
            alts = (c.alternatives or {}).get(item.round_index)
            if alts is None:
                target = np.asarray(c.rounds[item.round_index].masks[item.index], dtype=bool).reshape(-1)
                inter = flat[:, target].sum(axis=1)
                union = flat.sum(axis=1) + target.sum() - inter
                best = int(np.argmax(inter / np.maximum(union, 1)))
                alts = [best] if inter[best] / max(union[best], 1) >= 0.5 else []
            if alts:
                idx = torch.tensor([offsets[b] + a for a in alts])
                valid[idx] = True
                pool = (owner_t == b) & (group == group[idx[0]])
            rows_pool.append(pool)
            rows_valid.append(valid & pool)
    return cand, torch.stack(rows_pool), torch.stack(rows_valid)


def _dense_targets(model: SegLLM, conversations: Sequence[Conversation], frames: list[Frame], *,
                   decoder: bool = True) -> tuple[Tensor, Tensor | None]:
    """Each conversation's ``dense`` maps placed in the vision tower's and (with ``decoder``) the
    decoder's input frames (nearest neighbour; padding is IGNORE_LABEL): int16 [B, G, S, S] and
    [B, G, Sd, Sd] (None without ``decoder``)."""
    groups = list(model.config.dense.groups)
    vis, dec = [], []
    s = model.config.vision.image_size
    for c, fr in zip(conversations, frames):
        try:
            maps = torch.from_numpy(np.stack([np.asarray(c.dense[g], dtype=np.int16) for g in groups]))
        except KeyError as e:
            raise ConversationError(f"conversation's dense maps lack the label group {e}; the model needs {groups}") from e
        h, w = maps.shape[-2:]
        # the maps themselves where a frame takes the image at its own size (the world's square
        # images); else resized, as floats (class ids are exact in float32)
        vis.append(maps if (h, w) == (s, s) else _square_labels(maps[None].float(), s, model.config.vision.resize))
        if decoder:
            if (h, w) == (fr.resized_height, fr.resized_width) == (fr.size, fr.size):
                dec.append(maps)
                continue
            y = _nearest(maps[None].float(), fr.resized_height, fr.resized_width)
            dec.append(F.pad(y, (0, fr.size - fr.resized_width, 0, fr.size - fr.resized_height), value=IGNORE_LABEL)[0].to(torch.int16))
    vision_maps = torch.stack(vis)
    if decoder and all(v is d for v, d in zip(vis, dec)):
        return vision_maps, vision_maps  # both frames hold every image as it is (the world's): one copy, read-only
    return vision_maps, (torch.stack(dec) if decoder else None)


def _nearest(x: Tensor, h: int, w: int) -> Tensor:
    """[1, G, H, W] -> [1, G, h, w] nearest-neighbour (the maps themselves at their own size)."""
    return x if tuple(x.shape[-2:]) == (h, w) else F.interpolate(x, size=(h, w), mode="nearest")


def _square_labels(maps: Tensor, s: int, resize: str) -> Tensor:
    """[1, G, H, W] float class maps -> [G, s, s] int16, placed as the vision tower places the
    image (``VisionConfig.resize``), nearest neighbour, IGNORE_LABEL where no pixel lies."""
    h, w = maps.shape[-2:]
    if resize == "squash":
        return _nearest(maps, s, s)[0].to(torch.int16)
    if resize == "center_crop":
        scale = s / min(h, w)
        nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
        x = _nearest(maps, nh, nw)
        top, left = (nh - s) // 2, (nw - s) // 2
        return x[0, :, top : top + s, left : left + s].to(torch.int16)
    scale = s / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    x = _nearest(maps, nh, nw)
    return F.pad(x, (0, s - nw, 0, s - nh), value=IGNORE_LABEL)[0].to(torch.int16)


def _round_masks_in_frame(conversations: Sequence[Conversation], encs: list[Encoded], frames: list[Frame], out: int, *,
                          targets: bool) -> list[tuple[Tensor, dict[tuple[int, int], int]]]:
    """Per conversation: the masks its ``<seg>`` tokens refer to (and, with ``targets``, are
    trained on) as soft [M, out, out] maps in the decoder's output frame
    (:func:`masks_to_frame`), and the row of each (round index, mask index), 0-based."""
    res = []
    for c, e, fr in zip(conversations, encs, frames):
        keys = {(item.ref[0] - 1, item.ref[1]) for item in e.segs if item.ref is not None}
        if targets:
            keys |= {(item.round_index, item.index) for item in e.segs}
        keys = sorted(keys)
        row = {k: n for n, k in enumerate(keys)}
        if keys:
            masks = torch.stack([torch.tensor(np.asarray(c.rounds[r].masks[j], dtype=bool)) for r, j in keys])
            maps = masks_to_frame(masks, fr, out)
        else:
            maps = torch.zeros(0, out, out)
        res.append((maps, row))
    return res


__all__ = ["Batch", "build_batch"]
