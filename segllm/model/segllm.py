"""SegLLM composed from injected parts.

Data flow of a round::

    image --> vision tower --> projector --> image tokens ----------------\
    earlier masks --> masked crops --> vision pool --> projector --> mask  +--> LLM --> hidden
                   \\-> boxes --> box encoder ---------------------> box   /           |
    image --> decoder image encoder --> image features                 hidden before <seg>
                                              |                              |
                                              +---- mask decoder <-- prompt head

Inference rounds are run by :class:`segllm.model.rounds.RoundEngine` (``predict`` and
``segment`` delegate to it), batches are assembled in :mod:`segllm.batch` (``prepare``), mask
memory is :mod:`segllm.model.memory`, the training losses are :mod:`segllm.train.objective`;
this module holds the composition, the embedding, the LLM pass and the decoding of ``<seg>``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from segllm.batch import Batch, build_batch
from segllm.checkpoint import save_pretrained
from segllm.config import MAX_NEW_TOKENS, LoraConfig, SegLLMConfig
from segllm.conversation import Conversation
from segllm.decoders.base import DecoderOutput, MaskDecoder
from segllm.errors import PlaceholderMismatchError
from segllm.model.dense_head import DenseHeads
from segllm.model.llm import attention_mask_for
from segllm.model.lora import add_lora, merge_lora
from segllm.model.memory import MaskMemoryEncoder
from segllm.model.prompt_head import PromptHead
from segllm.model.rounds import Prediction, RoundEngine, round_context, seg_prompts
from segllm.model.trainable import part_parameters, set_trainable
from segllm.model.vision import VisionTower
from segllm.processor import Processor


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
    def from_pretrained(cls, path, *, revision: str | None = None, device=None, dtype=None, quantize: str | None = None) -> SegLLM:
        """Load a checkpoint folder or hub id strictly (see :func:`segllm.model.loading.load_pretrained`)."""
        # imported here, not at the top: loading builds a SegLLM, so it imports this module
        # (the one import cycle left; it goes when loading is no longer a method of the model)
        from segllm.model.loading import load_pretrained

        return load_pretrained(path, revision=revision, device=device, dtype=dtype, quantize=quantize)

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

    @property
    def uses_ref_masks(self) -> bool:
        """The decoder reads the mask each round refers to (``decoder.takes_ref_masks``), and
        mask memory is on: a text-only model gets no earlier masks by any route."""
        return bool(self.decoder.takes_ref_masks and self.config.memory.enabled)

    def set_compiled(self, compiled: bool = True) -> bool:
        """Compile the mask decoder's heaviest steps of CPU inference with ``torch.compile``
        where the decoder has such a mode (HIPIE: :meth:`HipieDecoder.set_compiled`), or stop
        (``False``). Returns whether the decoder has one (the others run as they are)."""
        set_compiled = getattr(self.decoder, "set_compiled", None)
        if set_compiled is None:
            return False
        set_compiled(compiled)
        return True

    def part_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameters of each named part (see ``SegLLMConfig.trainable``), by module ownership."""
        return part_parameters(self)

    def set_trainable(self, parts: Sequence[str] | None = None) -> None:
        """Give gradients to exactly the named parts (default: ``config.trainable``)."""
        set_trainable(self, self.config.trainable if parts is None else parts)

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
        self.processor.check_placeholders(input_ids, att, rows, cols, [(s[0], s[1].numel()) for s in slots])
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
        img = self.image_features(batch.vision_input()) if image_tokens is None else image_tokens
        if img.shape[1] != N:
            raise PlaceholderMismatchError(f"the image gives {img.shape[1]} features but has {N} placeholders")
        slots = [(proc.image_id, torch.arange(B, device=ids.device).repeat_interleave(N), batch.image_pos.reshape(-1), img.reshape(B * N, -1))]
        if batch.memory_pos.numel():
            mask_feats, box_feats = self.memory.tokens(batch.memory_inputs(self.vision), batch.memory_boxes, vision=self.vision, projector=self.projector, dtype=self.dtype)
            slots.append((proc.mask_id, batch.memory_batch, batch.memory_pos, mask_feats))
            if proc.memory.use_box:
                # the processor gives every earlier mask a box token or none does (box_pos -1):
                # decided by the config, not by reading box_pos back from the device
                slots.append((proc.box_id, batch.memory_batch, batch.box_pos, box_feats))
        embeds = self.inject(ids, slots, batch.attention_mask)
        if not batch.memory_pos.numel() and self.training and torch.is_grad_enabled():
            # a batch without earlier masks still gives the box encoder a (zero) gradient: sharded
            # training (FSDP) reduces every parameter's gradient on every process, and processes
            # whose batches differ in this would exchange different sizes and fail
            embeds = embeds + 0.0 * self.memory.encode_boxes(embeds.new_zeros(0, 4)).sum()
        return embeds

    # -- training --------------------------------------------------------------------------
    def forward(self, batch: Batch, *, objective: Callable[[SegLLM, Batch], Any] | None = None) -> Any:
        """The LLM's last hidden states over a batch (:meth:`hidden_states`), or, with
        ``objective`` (a callable ``(model, batch) -> output``, such as
        :func:`segllm.train.objective.training_loss`), its output: computed inside ``forward`` so
        that a distributed wrapper around the model (DDP, FSDP) sees the whole training step."""
        if objective is not None:
            return objective(self, batch)
        return self.hidden_states(batch)

    def hidden_states(self, batch: Batch, image_tokens: Tensor | None = None) -> Tensor:
        """The LLM's last hidden states [B, L, D] over a batch, with the image, mask and box
        features injected (``image_tokens``: the projected image features [B, N, D] when
        already computed)."""
        embeds = self.embed(batch, image_tokens=image_tokens)
        attention = attention_mask_for(self.llm, batch.attention_mask, batch.attention_mask.shape[1])
        return self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=attention, use_cache=False).last_hidden_state

    def decode_segs(
        self, hidden: Tensor, batch: Batch, index: Tensor | None = None, feats: Tensor | None = None, **decoder_options
    ) -> tuple[DecoderOutput, Tensor]:
        """Decode the ``<seg>`` rows ``index`` of a batch (default: every one).

        Args:
            hidden: [B, L, D] the LLM's states (:meth:`forward`).
            batch: the batch they came from.
            index: [S] rows of ``batch.seg_pos`` to decode.
            feats: the decoder's image features, when already computed.
            decoder_options: passed to the decoder (HIPIE's training takes ``denoising`` and
                ``set_outputs``).

        Returns:
            the decoder's output (mask logits [S, 2, h, w], IoU scores [S, 2], boxes [S, 2, 4]
            or None) and the prompt tokens [S, K, D].
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
            feats = self.encode_decoder_image(batch.decoder_input())
        if batch.ref_masks is not None:
            refs = batch.ref_masks if index is None else batch.ref_masks[index]
            decoder_options["ref_masks"] = refs.to(device=feats.device, dtype=feats.dtype)
        return self.decoder(feats, prompts.to(feats.dtype), seg_batch, **decoder_options), prompts

    def encode_decoder_image(self, pixels: Tensor) -> Tensor:
        """[B, 3, Sd, Sd] -> the decoder's image features (computed once per image at inference)."""
        p = next(self.decoder.parameters())
        grad = any(q.requires_grad for q in self.decoder.image_encoder.parameters())
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return self.decoder.encode_image(pixels.to(device=p.device, dtype=p.dtype))

    # -- inference -------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, conversation: Conversation, *, max_new_tokens: int = MAX_NEW_TOKENS, answer: str | None = None) -> Prediction:
        """Answer the last round of ``conversation``.

        Earlier rounds must have their answers and masks (ground truth or earlier predictions);
        the last round's answer is generated greedily, or taken from ``answer`` (teacher-forced,
        e.g. ``"<seg>"``, as the released demo does). Runs the whole conversation (no cache;
        :meth:`segllm.model.rounds.RoundEngine.recompute`); :class:`segllm.session.Session`
        reuses work across rounds.
        """
        r = RoundEngine(self).recompute(conversation, answer=answer, max_new_tokens=max_new_tokens)
        return Prediction(r.round, r.text, r.masks, r.boxes, r.scores, r.token_ids)

    def segment(self, conversations: Sequence[Conversation], *, frame: bool = False) -> list[list[tuple]]:
        """Teacher-forced segmentation of every round at once (the oracle-history protocol; see
        :meth:`segllm.model.rounds.RoundEngine.segment`)."""
        return RoundEngine(self).segment(conversations, frame=frame)


