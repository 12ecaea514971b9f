"""SegLLM composed from injected parts.

Data flow of a round::

    image --> vision tower --> projector --> image tokens ----------------\
    earlier masks --> masked crops --> vision pool --> projector --> mask  +--> LLM --> hidden
                   \\-> boxes --> box encoder ---------------------> box   /           |
    image --> decoder image encoder --> image features                 hidden before <seg>
                                              |                              |
                                              +---- mask decoder <-- prompt head

Inference rounds are run by :class:`segllm.model.rounds.RoundEngine` (``predict`` delegates to
it) and batches are assembled in :mod:`segllm.batch` (``prepare`` delegates to it); this module
holds the composition, the embedding and the training forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from segllm.batch import Batch, build_batch
from segllm.checkpoint import save_pretrained
from segllm.config import LoraConfig, SegLLMConfig
from segllm.conversation import Conversation
from segllm.decoders.base import (
    REF,
    SEG,
    DecoderOutput,
    Frame,
    MaskDecoder,
    image_to_frame,
    mask_to_frame,
)
from segllm.decoders.hipie.criterion import (
    REF_LABEL,
    SEG_LABEL,
    HipieSetCriterion,
    SetTarget,
    make_denoising_queries,
)
from segllm.errors import ConfigError, PlaceholderMismatchError
from segllm.losses import bce_loss, box_loss, dice_loss, focal_loss, mask_iou
from segllm.model.dense_head import DenseHeads, cell_labels, group_loss
from segllm.model.lora import add_lora, is_lora_parameter, merge_lora
from segllm.model.memory import MaskMemoryEncoder, mask_boxes
from segllm.model.prompt_head import PromptHead
from segllm.model.rounds import RoundEngine, frame_and_image_masks, round_context, seg_prompts
from segllm.model.vision import VisionTower
from segllm.processor import IGNORE, Processor


@dataclass
class SegLLMOutput:
    """Training forward output. Every ``*_loss`` is a scalar tensor (zero when not applicable).

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


@dataclass
class Prediction:
    """The model's reply to one round.

    Attributes:
        round: 1-indexed round number.
        text: the answer text (with ``<seg>`` where masks were produced).
        masks: [S, H, W] bool, one per ``<seg>``, at the input image's resolution.
        boxes: [S, 4] float (x0, y0, x1, y1) pixels, x1/y1 exclusive; zeros for an empty mask.
        scores: [S] the decoder's predicted IoU (confidence) of each mask.
        token_ids: the answer's token ids (without the end-of-answer token).
    """

    round: int
    text: str
    masks: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    token_ids: list[int]


class SegLLM(nn.Module):
    """A multimodal LLM that segments, with earlier masks fed back into its input.

    All parts are injected (see :func:`segllm.model.builder.build_segllm`).

    Args:
        config: the whole model's configuration (saved with checkpoints).
        vision: vision tower (image patches and pooled crops).
        projector: vision width -> LLM width.
        llm: a transformers causal LM whose vocabulary has the template's added tokens.
        memory: mask-memory crop geometry and box encoder.
        prompt_head: LLM hidden -> K prompt tokens.
        decoder: the promptable mask decoder.
        processor: conversation rendering (holds the tokenizer).
        dense_head: training-only dense attribute classifiers (``config.dense``), or None.
    """

    def __init__(
        self,
        *,
        config: SegLLMConfig,
        vision: VisionTower,
        projector: nn.Module,
        llm: PreTrainedModel,
        memory: MaskMemoryEncoder,
        prompt_head: PromptHead,
        decoder: MaskDecoder,
        processor: Processor,
        dense_head: DenseHeads | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.vision = vision
        self.projector = projector
        self.llm = llm
        self.memory = memory
        self.prompt_head = prompt_head
        self.decoder = decoder
        self.processor = processor
        self.dense_head = dense_head

    # -- checkpoints -----------------------------------------------------------------------
    def save_pretrained(self, path, **kwargs):
        """Write config.json, model.safetensors and the tokenizer to the folder ``path``."""
        return save_pretrained(self, path, **kwargs)

    @classmethod
    def from_pretrained(cls, path, *, device=None, dtype=None) -> SegLLM:
        """Load a checkpoint folder strictly (see :func:`segllm.model.loading.load_pretrained`)."""
        # imported here, not at the top: loading builds a SegLLM, so it imports this module
        # (the one import cycle left; it goes when loading is no longer a method of the model)
        from segllm.model.loading import load_pretrained

        return load_pretrained(path, device=device, dtype=dtype)

    # -- bookkeeping -----------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    def part_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameters of each named part (see ``SegLLMConfig.trainable``), by module ownership."""
        emb = [self.llm.get_input_embeddings()]
        out_emb = self.llm.get_output_embeddings()
        if out_emb is not None:
            emb.append(out_emb)
        emb_ids = {id(p) for m in emb for p in m.parameters()}
        enc = self.decoder.image_encoder
        enc_ids = {id(p) for p in enc.parameters()}
        return {
            "vision": list(self.vision.parameters()),
            "projector": list(self.projector.parameters()),
            "llm": [p for p in self.llm.parameters() if id(p) not in emb_ids],
            "embeddings": _unique(p for m in emb for p in m.parameters()),
            "memory": list(self.memory.parameters()),
            "prompt_head": list(self.prompt_head.parameters()),
            "decoder_encoder": list(enc.parameters()),
            "decoder": [p for p in self.decoder.parameters() if id(p) not in enc_ids],
            "dense_head": list(self.dense_head.parameters()) if self.dense_head is not None else [],
        }

    def set_trainable(self, parts: Sequence[str] | None = None) -> None:
        """Give gradients to exactly the named parts (default: ``config.trainable``)."""
        parts = tuple(self.config.trainable if parts is None else parts)
        groups = self.part_parameters()
        unknown = [p for p in parts if p not in groups]
        if unknown:
            raise ValueError(f"unknown part(s) {unknown}; parts are {list(groups)}")
        for p in self.parameters():
            p.requires_grad_(False)
        for name in parts:
            for p in groups[name]:
                p.requires_grad_(True)
        if self.config.llm.lora.r and "llm" in parts:
            # with LoRA adapters, training the LLM means training the adapters only
            emb = {id(p) for p in groups["embeddings"]} if "embeddings" in parts else set()
            for n, p in self.llm.named_parameters():
                if not is_lora_parameter(n) and id(p) not in emb:
                    p.requires_grad_(False)

    def add_lora(self, config) -> None:
        """Put LoRA adapters (a :class:`segllm.config.LoraConfig`) on the LLM and record them in the config."""
        add_lora(self.llm, config)
        self.config.llm.lora = config
        self.set_trainable()

    def merge_lora(self) -> int:
        """Fold the LLM's LoRA adapters into its weights (the config then records none); returns
        how many layers were merged."""
        merged = merge_lora(self.llm)
        self.config.llm.lora = LoraConfig()
        return merged

    # -- inputs ----------------------------------------------------------------------------
    def prepare(self, conversations: Sequence[Conversation], *, open_last: bool = False, targets: bool = True) -> Batch:
        """Render and preprocess conversations into a :class:`segllm.batch.Batch` (on the CPU; see
        :func:`segllm.batch.build_batch`).

        Args:
            conversations: B conversations (validated here).
            open_last: each conversation's last round is to be answered by the model.
            targets: build ground-truth mask targets for the losses.
        """
        return build_batch(self, conversations, open_last=open_last, targets=targets)

    def image_features(self, image_pixels: Tensor) -> Tensor:
        """[B, 3, S, S] vision input -> [B, N, D] image tokens in the LLM's width."""
        grad = any(p.requires_grad for p in self.vision.parameters()) and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad):
            patches = self.vision(image_pixels)
        return self.projector(patches.to(self.dtype))

    def memory_inputs(self, image: Tensor, mask: Tensor, box: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One earlier mask's inputs for :meth:`memory_features`: the preprocessed masked crop
        [3, S, S] and the normalised box [4].

        Args:
            image: [3, H, W] uint8.
            mask: [H, W] bool; or, when ``memory.crop_frame == "decoder"``, the mask in the
                decoder's square frame ([Sd, Sd], as :meth:`segllm.model.rounds.RoundEngine.decode` gives it).
            box: the decoder's predicted box for this mask, [4] (x0, y0, x1, y1) float pixels of
                the image; used when ``memory.box_source == "decoder"``.
        """
        cfg = self.config.memory
        if cfg.crop_frame == "decoder":
            frame = Frame.fit(image.shape[1], image.shape[2], self.decoder.image_size)
            if box is not None:
                box = box * (frame.size / max(frame.height, frame.width))
            if tuple(mask.shape) != (frame.size, frame.size):  # else it already is a frame mask
                mask = mask_to_frame(mask, frame)
            image = image_to_frame(image, frame)
        predicted = box if cfg.box_source == "decoder" else None
        used = self.memory.box_of(mask, predicted)  # the box both the crop and the box token use
        crop = self.memory.cut(image, mask, used)
        return self.vision.preprocess(crop), self.memory.normalised_boxes(mask[None], used[None])[0]

    def memory_features(self, memory_pixels: Tensor, memory_boxes: Tensor) -> tuple[Tensor, Tensor]:
        """Earlier masks -> LLM tokens.

        Args:
            memory_pixels: [M, 3, S, S] preprocessed masked crops.
            memory_boxes: [M, 4] normalised boxes.

        Returns:
            (mask tokens [M, D], box tokens [M, D]), already scaled for training (feature
            dropout) or inference (``memory.inference_scale``).
        """
        M = memory_pixels.shape[0]
        grad = any(p.requires_grad for p in self.vision.parameters()) and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad):
            pooled = self.vision.pool(memory_pixels)
        mask_feats = self.projector(pooled.to(self.dtype))
        box_feats = self.memory.encode_boxes(memory_boxes.to(mask_feats.device)).to(mask_feats.dtype)
        scale = self._memory_scale(M, mask_feats)
        return mask_feats * scale, box_feats * scale

    def inject(self, input_ids: Tensor, slots: list[tuple[int, Tensor, Tensor, Tensor]], attention_mask: Tensor | None = None) -> Tensor:
        """Token embeddings [B, L, D] with features put into their placeholder slots.

        Args:
            input_ids: [B, L].
            slots: (placeholder token id, rows [n], cols [n], features [n, D]) per kind of feature.
            attention_mask: [B, L]; padding is not checked for placeholders.

        Raises:
            PlaceholderMismatchError: the placeholders in ``input_ids`` and the features differ
                in number, or a slot does not hold a placeholder token of its kind.
        """
        embeds = self.llm.get_input_embeddings()(input_ids)
        slots = [s for s in slots if s[1].numel()]
        att = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        rows = torch.cat([s[1] for s in slots]) if slots else input_ids.new_zeros(0)
        cols = torch.cat([s[2] for s in slots]) if slots else input_ids.new_zeros(0)
        self._check_placeholders(input_ids, att, rows, cols, [(s[0], s[1].numel()) for s in slots])
        if not slots:
            return embeds
        feats = torch.cat([s[3] for s in slots]).to(embeds.dtype)
        if self.config.inject == "add":
            return embeds.index_put((rows, cols), feats, accumulate=True)
        return embeds.index_put((rows, cols), feats)

    def embed(self, batch: Batch, image_tokens: Tensor | None = None) -> Tensor:
        """Token embeddings with image, mask and box features injected: [B, L, D].

        ``image_tokens``: the projected image features [B, N, D] when already computed.

        Raises:
            PlaceholderMismatchError: see :meth:`inject`.
        """
        ids = batch.input_ids
        B, N = batch.image_pos.shape
        proc = self.processor
        img = self.image_features(batch.image_pixels) if image_tokens is None else image_tokens
        if img.shape[1] != N:
            raise PlaceholderMismatchError(f"the image gives {img.shape[1]} features but has {N} placeholders")
        slots = [(proc.image_id, torch.arange(B, device=ids.device).repeat_interleave(N), batch.image_pos.reshape(-1), img.reshape(B * N, -1))]
        if batch.memory_pos.numel():
            mask_feats, box_feats = self.memory_features(batch.memory_pixels, batch.memory_boxes)
            slots.append((proc.mask_id, batch.memory_batch, batch.memory_pos, mask_feats))
            has_box = batch.box_pos >= 0
            slots.append((proc.box_id, batch.memory_batch[has_box], batch.box_pos[has_box], box_feats[has_box]))
        embeds = self.inject(ids, slots, batch.attention_mask)
        if not batch.memory_pos.numel() and self.training and torch.is_grad_enabled():
            # a batch without earlier masks still gives the box encoder a (zero) gradient: sharded
            # training (FSDP) reduces every parameter's gradient on every process, and processes
            # whose batches differ in this would exchange different sizes and fail
            embeds = embeds + 0.0 * self.memory.encode_boxes(embeds.new_zeros(0, 4)).sum()
        return embeds

    def _memory_scale(self, M: int, like: Tensor) -> Tensor:
        cfg = self.config.memory
        if self.training and cfg.feature_dropout > 0:
            keep = torch.rand(M, 1, device=like.device) >= cfg.feature_dropout
            return keep.to(like.dtype)
        return torch.full((M, 1), cfg.inference_scale if not self.training else 1.0, device=like.device, dtype=like.dtype)

    def _check_placeholders(self, ids: Tensor, att: Tensor, rows: Tensor, cols: Tensor, expected: list[tuple[int, int]]) -> None:
        placeholder_ids = {tid for tid, _ in expected} | {self.processor.image_id}
        if self.config.memory.enabled:
            placeholder_ids |= {self.processor.mask_id}
            if self.config.memory.use_box:
                placeholder_ids |= {self.processor.box_id}
        is_ph = torch.zeros_like(ids, dtype=torch.bool)
        for tid in placeholder_ids:
            is_ph |= ids == tid
        is_ph &= att.bool()
        n_tokens, n_feats = int(is_ph.sum()), rows.numel()
        if n_tokens != n_feats:
            raise PlaceholderMismatchError(
                f"{n_tokens} placeholder token(s) in the input but {n_feats} feature(s) to inject "
                f"({', '.join(f'{n} for token {t}' for t, n in expected)})"
            )
        if not n_feats:
            return
        want = torch.cat([torch.full((n,), tid, dtype=ids.dtype, device=ids.device) for tid, n in expected])
        if not bool((ids[rows, cols] == want).all()):
            raise PlaceholderMismatchError("a feature slot points at a position that holds no placeholder token of its kind")
        flat = rows * ids.shape[1] + cols
        if flat.unique().numel() != flat.numel():
            raise PlaceholderMismatchError("two features point at the same placeholder token")

    # -- training --------------------------------------------------------------------------
    def forward(self, batch: Batch) -> SegLLMOutput:
        """Training forward: token cross-entropy on answers plus mask losses for every ``<seg>``.

        With ``config.loss.set_prediction`` (HIPIE decoder) the mask losses are HIPIE's
        set-prediction losses plus ``prompt_l2`` times the mean square of the prompt tokens, as
        the released model was trained; with ``set_max_rounds`` only the chosen ``<seg>`` are
        decoded, and ``mask_logits``/``iou_scores`` hold those rows (in ``<seg>`` order).
        """
        cfg = self.config.loss
        dense = self.dense_head is not None and batch.dense_vision is not None
        image_tokens = decoder_feats = None
        dense_loss = None
        if dense:
            # the features are computed here once, for the dense heads and for the LLM/decoder
            patches = self.vision(batch.image_pixels)
            image_tokens = self.projector(patches.to(self.dtype))
            decoder_feats = self.encode_decoder_image(batch.decoder_pixels)
            terms = []
            if "vision" in self.config.dense.on:
                g = int(round(patches.shape[1] ** 0.5))
                terms.append(self.dense_head.loss("vision", patches.reshape(patches.shape[0], g, g, -1), batch.dense_vision.to(patches.device)))
            if "decoder" in self.config.dense.on:
                terms.append(self.dense_head.loss("decoder", decoder_feats.permute(0, 2, 3, 1), batch.dense_decoder.to(decoder_feats.device)))
            dense_loss = sum(terms) / len(terms) if terms else None
        embeds = self.embed(batch, image_tokens=image_tokens)
        hidden = self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
        labels = batch.labels[:, 1:]
        sel = labels != IGNORE
        zero = hidden.sum() * 0
        if sel.any():
            logits = self.llm.get_output_embeddings()(hidden[:, :-1][sel])
            lm_loss = F.cross_entropy(logits.float(), labels[sel])
        else:
            lm_loss = zero
        if cfg.set_prediction:
            return self._set_prediction_forward(hidden, batch, lm_loss, zero)
        decoded, prompts = self._run_decoder(hidden, batch, feats=decoder_feats)
        mask_logits, iou, boxes = decoded.mask_logits, decoded.iou_scores, decoded.boxes
        if dense and batch.seg_attrs is not None and len(prompts):
            # the prompt learns what its target is (the image terms above: what each pixel is)
            r = self.config.prompt_head.num_ref_tokens
            target_term = self.dense_head.target_loss(prompts[:, r:].mean(1), batch.seg_attrs)
            dense_loss = target_term if dense_loss is None else dense_loss + target_term
        if dense and decoded.attributes is not None:
            # the direct decoder's attribute matching: its pixel classes learn the dense maps and
            # its prompt classes what each question names
            pixels, named = decoded.attributes
            groups = self.config.dense.groups
            terms = [group_loss(groups, pixels, cell_labels(batch.dense_decoder.to(pixels.device), pixels.shape[1]))]
            if batch.seg_named is not None and len(named):
                terms.append(group_loss(groups, named, batch.seg_named.to(named.device)))
            attr_term = sum(terms) / len(terms)
            dense_loss = attr_term if dense_loss is None else dense_loss + attr_term
        S = mask_logits.shape[0]
        select_loss = None
        if S and batch.seg_targets is not None:
            tgt = batch.seg_targets.to(mask_logits.device)
            seg_l = mask_logits[:, SEG]
            if batch.seg_pool is not None and cfg.select_weight:
                select_loss, tgt = self._selection_loss(seg_l, tgt, batch)
            if cfg.mask == "focal":
                m_loss = focal_loss(seg_l, tgt, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma)
            else:
                m_loss = bce_loss(seg_l, tgt)
            d_loss = dice_loss(seg_l, tgt)
            ref_loss = zero
            has_ref = batch.has_ref.to(mask_logits.device)
            if has_ref.any():
                rl, rt = mask_logits[has_ref, REF], batch.ref_targets.to(mask_logits.device)[has_ref]
                ref_loss = (focal_loss(rl, rt, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma) if cfg.mask == "focal" else bce_loss(rl, rt)) + dice_loss(rl, rt)
            with torch.no_grad():
                true_iou = mask_iou(seg_l, tgt)
            iou_loss = F.mse_loss(iou[:, SEG].float(), true_iou)
            b_loss = zero
            if boxes is not None and cfg.box_weight:
                frame_size = self.decoder.image_size
                target_boxes = mask_boxes(tgt > 0.5).to(boxes.device) * (frame_size / tgt.shape[-1])
                b_loss = box_loss(boxes[:, SEG], target_boxes, frame_size)
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
        return SegLLMOutput(loss, lm_loss, m_loss, d_loss, ref_loss, iou_loss, mask_logits, iou, b_loss, dense_loss=dense_loss, select_loss=select_loss)

    def _selection_loss(self, seg_logits: Tensor, targets: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
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

    def _set_prediction_forward(self, hidden: Tensor, batch: Batch, lm_loss: Tensor, zero: Tensor) -> SegLLMOutput:
        """The loss section with HIPIE's set-prediction losses (see :meth:`forward`)."""
        cfg = self.config.loss
        if not self.decoder.supports_set_prediction:
            raise ConfigError(f"loss.set_prediction needs a decoder with set prediction (HIPIE), not {type(self.decoder).__name__}")
        keep = _pick_rounds(batch.seg_batch, cfg.set_max_rounds)
        targets = None
        if keep.numel() and batch.seg_targets is not None:
            targets = _set_targets(batch, keep, next(self.decoder.parameters()).device)
        out, prompts = self._run_decoder(hidden, batch, keep, targets)
        terms = dict.fromkeys(("class", "l1", "giou", "mask", "dice", "box_iou", "prompt_l2"), zero)
        if targets is not None:
            criterion = HipieSetCriterion(
                num_ref_tokens=self.decoder.num_ref_tokens,
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
            terms.update(criterion(self.decoder, out.set_outputs, targets).terms)
            terms["prompt_l2"] = cfg.prompt_l2 * prompts.float().square().mean()
        loss = cfg.lm * lm_loss + sum(terms.values())
        return SegLLMOutput(
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

    def _decode(self, hidden: Tensor, batch: Batch, feats: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Mask logits [S, 2, h, w], IoU scores [S, 2] and boxes [S, 2, 4] or None for every
        ``<seg>``; ``feats``: the decoder's image features when already computed."""
        out, _ = self._run_decoder(hidden, batch, feats=feats)
        return out.mask_logits, out.iou_scores, out.boxes

    def _run_decoder(
        self, hidden: Tensor, batch: Batch, index: Tensor | None = None, targets: list[SetTarget] | None = None,
        feats: Tensor | None = None,
    ) -> tuple[DecoderOutput, Tensor]:
        """Decode the ``<seg>`` rows ``index`` (default: every one).

        Returns the decoder's output (mask logits [S, 2, h, w], IoU scores [S, 2], boxes
        [S, 2, 4] or None) and the prompt tokens [S, K, D]. With set-prediction ``targets`` (one
        per decoded row; HIPIE) it also runs the denoising queries (``loss.set_denoising``) and
        returns every layer's predictions in ``set_outputs``.
        """
        seg_batch = batch.seg_batch if index is None else batch.seg_batch[index]
        seg_pos = batch.seg_pos if index is None else batch.seg_pos[index]
        seg_hidden = hidden[seg_batch, seg_pos - 1]  # the state that predicts <seg>
        context = None
        if batch.seg_context is not None:
            positions = batch.seg_context.to(hidden.device)
            context = round_context(hidden, seg_batch, positions if index is None else positions[index])
        prompts = seg_prompts(self.prompt_head, seg_hidden, *(context or ()))
        if feats is None:
            feats = self.encode_decoder_image(batch.decoder_pixels)
        if targets is None:
            return self.decoder(feats, prompts.to(feats.dtype), seg_batch), prompts
        denoising = make_denoising_queries(targets) if self.config.loss.set_denoising else None
        out = self.decoder(feats, prompts.to(feats.dtype), seg_batch, denoising=denoising, set_outputs=True)
        return out, prompts

    def encode_decoder_image(self, pixels: Tensor) -> Tensor:
        """[B, 3, Sd, Sd] -> the decoder's image features (computed once per image at inference)."""
        p = next(self.decoder.parameters())
        grad = any(q.requires_grad for q in self.decoder.image_encoder.parameters())
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return self.decoder.encode_image(pixels.to(device=p.device, dtype=p.dtype))

    # -- inference -------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, conversation: Conversation, *, max_new_tokens: int = 32, answer: str | None = None) -> Prediction:
        """Answer the last round of ``conversation``.

        Earlier rounds must have their answers and masks (ground truth or earlier predictions);
        the last round's answer is generated greedily, or taken from ``answer`` (teacher-forced,
        e.g. ``"<seg>"``, as the released demo does). Runs the whole conversation (no cache;
        :meth:`segllm.model.rounds.RoundEngine.recompute`); :class:`segllm.session.Session`
        reuses work across rounds.
        """
        r = RoundEngine(self).recompute(conversation, answer=answer, max_new_tokens=max_new_tokens)
        return Prediction(r.round, r.text, r.masks, r.boxes, r.scores, r.token_ids)

    @torch.no_grad()
    def segment(self, conversations: Sequence[Conversation], *, frame: bool = False) -> list[list[tuple]]:
        """Teacher-forced segmentation of every round at once (the oracle-history protocol).

        Each conversation's answers are given (their masks are used only where later rounds
        refer to them), so one LLM pass per batch yields every ``<seg>``'s mask.

        Args:
            conversations: the conversations (answers and masks given).
            frame: also return each mask in the decoder's square input frame and its box there.

        Returns:
            per conversation, per round: (masks [k, H, W] bool, scores [k]) for its k ``<seg>``;
            with ``frame``: (masks, scores, frame masks [k, Sd, Sd] bool, frame boxes [k, 4]
            xyxy in frame pixels: the decoder's own box where it predicts one, else the mask's).
        """
        if not conversations:
            return []
        batch = self.prepare(conversations, targets=False).to(self.device)
        hidden = self.llm.get_decoder()(inputs_embeds=self.embed(batch), attention_mask=batch.attention_mask).last_hidden_state
        logits, iou, boxes = self._decode(hidden, batch)
        result: list[list[tuple]] = []
        s = 0
        for b, (conv, enc) in enumerate(zip(conversations, batch.encoded)):
            fr = batch.frames[b]
            n = len(enc.segs)
            if n:  # every <seg> of the image at once: they share its frame
                frame_logits, masks = frame_and_image_masks(logits[s : s + n, SEG], fr)
            per_round: list[list[list]] = [[[], [], [], []] for _ in conv.rounds]
            for k, item in enumerate(enc.segs):
                entry = per_round[item.round_index]
                entry[0].append(masks[k].cpu().numpy())
                entry[1].append(float(iou[s + k, SEG]))
                if frame:
                    fm = frame_logits[k] > 0
                    entry[2].append(fm.cpu().numpy())
                    box = boxes[s + k, SEG].float().cpu() if boxes is not None else mask_boxes(fm[None].cpu())[0]
                    entry[3].append(box.numpy())
            s += n
            h, w, size = fr.height, fr.width, fr.size
            rounds = []
            for m, sc, fm, fb in per_round:
                item = (np.stack(m) if m else np.zeros((0, h, w), bool), np.asarray(sc, np.float32))
                if frame:
                    item += (np.stack(fm) if fm else np.zeros((0, size, size), bool), np.asarray(fb, np.float32).reshape(-1, 4))
                rounds.append(item)
            result.append(rounds)
        return result


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


def _unique(params) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
