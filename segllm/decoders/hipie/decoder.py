"""The HIPIE-R50 mask decoder of the released SegLLM, as a :class:`MaskDecoder`.

Module tree (names = the released ``model.segmentator.hipie.*`` keys, BERT excluded)::

    HipieDecoder
    ├── detr: HipieSegmenter
    │   ├── detr: DeformableDetr
    │   │   ├── transformer: DeformableTransformer (encoder with VL fusion, two-stage, decoder)
    │   │   ├── class_embed: [TokenAlignHead] * dec_layers + [BinaryClassifier]   (shared with
    │   │   ├── bbox_embed: [MLP] * (dec_layers + 1)                               transformer.decoder)
    │   │   ├── iou_head: [Linear] * dec_layers
    │   │   ├── input_proj: 4 x (conv, GroupNorm(32))
    │   │   └── backbone: [0] ResNet-50 holder, [1] sine position encoding
    │   ├── controller: MLP -> dynamic mask-head parameters
    │   ├── mask_head: MaskFeatureHead
    │   └── resizer: FeatureResizer (used only by HIPIE's denoising training)
    └── criterion: holds the ``_iter`` buffer of HIPIE's loss module

The LLM's 8 prompt tokens stand in for HIPIE's text features: tokens 0-3 are class 1 ([REF]),
tokens 4-7 class 2 ([SEG], the target). Shapes: B = images, N = prompts, Q = queries
(``num_bg_queries`` background ones first), T = prompt tokens.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from segllm.config import PromptHeadConfig
from segllm.decoders.base import REF, SEG, DecoderOutput, Frame, MaskDecoder, image_to_frame
from segllm.decoders.hipie.backbone import BackboneWithPosition
from segllm.decoders.hipie.common import MLP, FeatureResizer, inverse_sigmoid
from segllm.decoders.hipie.compiled import FrozenCompiled
from segllm.decoders.hipie.config import HipieDecoderConfig
from segllm.decoders.hipie.deform_attn import MultiScaleDeformableAttention
from segllm.decoders.hipie.fusion import BiMultiHeadAttention
from segllm.decoders.hipie.heads import (
    BinaryClassifier,
    MaskFeatureHead,
    TokenAlignHead,
    aligned_bilinear,
    dynamic_mask_logits,
    dynamic_param_sizes,
)
from segllm.decoders.hipie.postprocess import Instances, postprocess, select_best
from segllm.decoders.hipie.transformer import DeformableTransformer, TransformerOutput
from segllm.errors import CheckpointError, ConfigError, ImageError
from segllm.linear import plain_linears

__all__ = [
    "DeformableDetr",
    "DenoisingQueries",
    "HipieDecoder",
    "HipieImageEncoder",
    "HipieImageFeatures",
    "HipieRawOutput",
    "HipieSegmenter",
    "HipieSetOutputs",
    "LayerPredictions",
    "build_hipie_decoder",
    "load_released_hipie",
]

_MASK_FEATURE_STRIDE = 8  # the dynamic mask head runs on level 0 (res3, stride 8)


@dataclass
class HipieImageFeatures:
    """Prompt-independent image features (one entry per image).

    Attributes:
        srcs: 4 levels of projected features [B, C, H_l, W_l] (strides 8, 16, 32, 64).
        pos: 4 levels of sine position encodings [1, C, H_l, W_l].
        backbone: res3, res4, res5 backbone maps (only with ``keep_backbone=True``).
    """

    srcs: list[Tensor]
    pos: list[Tensor]
    backbone: list[Tensor] = field(default_factory=list)

    @property
    def dtype(self) -> torch.dtype:
        return self.srcs[0].dtype

    @property
    def device(self) -> torch.device:
        return self.srcs[0].device

    def __len__(self) -> int:
        return self.srcs[0].shape[0]

    def __getitem__(self, index: slice) -> HipieImageFeatures:
        """The features of images ``index`` (a slice), as a batch of their own (the position
        encodings are shared)."""
        if not isinstance(index, slice):
            raise TypeError(f"HipieImageFeatures takes a slice of its images, not {type(index).__name__}")
        return HipieImageFeatures([s[index] for s in self.srcs], self.pos, [b[index] for b in self.backbone])


@dataclass
class DenoisingQueries:
    """Training only: P denoising queries per prompt (HIPIE's DINO-style "GT" queries).

    Each holds a noised ground-truth box; its content is the prompt's pooled tokens through
    ``detr.resizer`` (the same for every target of a prompt). Slots that hold no target (a
    prompt with fewer targets than the batch's most) have zero content and box logits 0.

    Attributes:
        boxes: [N, P, 4] (cx, cy, w, h) normalised to the input frame; 0.5 in empty slots.
        filled: [N, P] bool, whether the slot holds a target.
    """

    boxes: Tensor
    filled: Tensor


@dataclass
class LayerPredictions:
    """Predictions of a set of Q queries after each of L decoder layers (for the losses).

    Attributes:
        logits: [L, N, Q, T] query x prompt-token logits.
        boxes: [L, N, Q, 4] (cx, cy, w, h) normalised.
        ious: [L, N, Q, 1] IoU-branch logits.
        hs: [L, N, Q, C] query states (the dynamic mask head's input).
        centres: [L, N, Q, 2] (x, y) normalised centres of the boxes each layer started from
            (where the mask head centres its relative coordinates).
    """

    logits: Tensor
    boxes: Tensor
    ious: Tensor
    hs: Tensor
    centres: Tensor


@dataclass
class HipieSetOutputs:
    """What the set-prediction criterion needs (see :mod:`segllm.decoders.hipie.criterion`).

    Attributes:
        queries: every decoder layer's predictions of all Q queries (``num_bg_queries``
            background ones first).
        denoising: the same for the denoising queries, when some were given.
        mask_features: [N, C/32, S/8, S/8] input of the dynamic mask head.
        enc_logits: [N, S_tok, 1] two-stage proposal objectness logits, one per encoder token.
        enc_boxes: [N, S_tok, 4] proposal boxes (cx, cy, w, h) normalised; 1.0 everywhere for
            the tokens whose anchor box is unusable (their logit-space box is +inf).
        num_bg_queries: background queries at the front of ``queries``.
    """

    queries: LayerPredictions
    denoising: LayerPredictions | None
    mask_features: Tensor
    enc_logits: Tensor
    enc_boxes: Tensor
    num_bg_queries: int


@dataclass
class HipieRawOutput:
    """Per-query predictions for N prompts (all Q queries, background ones first).

    Attributes:
        pred_logits: [N, Q, T] query x prompt-token logits.
        pred_boxes: [N, Q, 4] (cx, cy, w, h) normalised to the input frame.
        pred_ious: [N, Q, 1] IoU logits.
        pred_masks: [N, Q, S/4, S/4] mask logits, or None when only the selected queries'
            masks are made (``forward_raw(..., all_masks=False)``; :meth:`HipieDecoder.select`
            makes those from ``mask_features``).
        reference_points: [N, Q, 2] query centres (normalised) used by the mask head.
        instances: per prompt, the post-processed foreground detections.
        transformer: the transformer's intermediate results.
        set_outputs: every layer's predictions for the training losses (when asked for).
        mask_features: [N, C/32, H_0, W_0] the dynamic mask head's shared input (with the last
            decoder layer's query states, ``transformer.hs``, it makes each query's mask).
    """

    pred_logits: Tensor
    pred_boxes: Tensor
    pred_ious: Tensor
    pred_masks: Tensor | None
    reference_points: Tensor
    instances: list[Instances]
    transformer: TransformerOutput
    set_outputs: HipieSetOutputs | None = None
    mask_features: Tensor | None = None


class DeformableDetr(nn.Module):
    """Backbone, input projections, transformer and the per-layer prediction heads."""

    def __init__(self, config: HipieDecoderConfig) -> None:
        super().__init__()
        c = config
        self.transformer = DeformableTransformer(c)
        self.class_embed = nn.ModuleList(
            [TokenAlignHead(c.hidden_dim, c.lang_dim) for _ in range(c.dec_layers)] + [BinaryClassifier(c.hidden_dim)]
        )
        self.bbox_embed = nn.ModuleList(MLP(c.hidden_dim, c.hidden_dim, 4, 3) for _ in range(c.dec_layers + 1))
        self.iou_head = nn.ModuleList(nn.Linear(c.hidden_dim, 1) for _ in range(c.dec_layers))
        in_channels = c.backbone_channels
        projections = [
            nn.Sequential(nn.Conv2d(ch, c.hidden_dim, 1), nn.GroupNorm(32, c.hidden_dim)) for ch in in_channels
        ]
        projections.append(
            nn.Sequential(
                nn.Conv2d(in_channels[-1], c.hidden_dim, 3, stride=2, padding=1), nn.GroupNorm(32, c.hidden_dim)
            )
        )
        self.input_proj = nn.ModuleList(projections)
        self.backbone = BackboneWithPosition(c)
        # The decoder refines boxes with these heads and scores proposals with the last ones;
        # they are the same modules (the released checkpoint stores them under both names).
        self.transformer.decoder.bbox_embed = self.bbox_embed
        self.transformer.decoder.class_embed = self.class_embed
        self._init_heads()

    def _init_heads(self) -> None:
        bias = -math.log((1 - 0.01) / 0.01)
        for head in self.iou_head:
            nn.init.constant_(head.bias, bias)
        for mlp in self.bbox_embed:
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)


class HipieSegmenter(nn.Module):
    """The detector plus the CondInst dynamic mask head."""

    def __init__(self, config: HipieDecoderConfig) -> None:
        super().__init__()
        c = config
        self.detr = DeformableDetr(c)
        weights, biases = dynamic_param_sizes(c.hidden_dim // 32, c.dynamic_mask_channels, c.controller_layers)
        self.controller = MLP(c.hidden_dim, c.hidden_dim, sum(weights) + sum(biases), 3)
        for layer in self.controller.layers:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.mask_head = MaskFeatureHead(c.hidden_dim)
        self.resizer = FeatureResizer(c.lang_dim, c.hidden_dim)


class _Criterion(nn.Module):
    """Placeholder for HIPIE's loss module: only its ``_iter`` buffer is in the checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_iter", torch.zeros(1))


class HipieImageEncoder(nn.Module):
    """View of the prompt-independent part (backbone + input projections); not registered.

    It only references modules owned by :class:`HipieDecoder`, so freezing or moving it acts on
    the decoder's own parameters, and its names never appear in the decoder's state dict.
    """

    def __init__(self, backbone: BackboneWithPosition, input_proj: nn.ModuleList) -> None:
        super().__init__()
        self.backbone = backbone
        self.input_proj = input_proj

    def forward(self, pixels: Tensor, *, keep_backbone: bool = False, maps: Callable[[Tensor], tuple] | None = None) -> HipieImageFeatures:
        """[B, 3, S, S] normalised pixels -> :class:`HipieImageFeatures`. ``maps``: computes what
        :meth:`maps` does (its compiled or folded form, see :meth:`HipieDecoder.encode_image`)."""
        feats, srcs = (maps or self.maps)(pixels)
        pos = [self.backbone[1](s) for s in srcs]
        return HipieImageFeatures(srcs=srcs, pos=pos, backbone=feats if keep_backbone else [])

    def maps(self, pixels: Tensor, *, folded: bool = False) -> tuple[list[Tensor], list[Tensor]]:
        """[B, 3, S, S] -> (res3-res5 maps, the L input levels [B, C, H_l, W_l]); ``folded``:
        the backbone through ``ResNet.forward_folded`` (use :meth:`maps_folded`)."""
        feats = self.backbone(pixels, folded=folded)
        srcs = [proj(f) for proj, f in zip(self.input_proj, feats)]
        srcs.append(self.input_proj[len(feats)](feats[-1]))
        return feats, srcs

    @torch.no_grad()
    def maps_folded(self, pixels: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """:meth:`maps` for inference through :meth:`~segllm.decoders.hipie.backbone.ResNet.forward_folded`
        (the frozen norms folded into the convolutions, channels-last on the CPU); the input
        levels returned contiguous, as :meth:`maps` returns them.

        Several images go one at a time: oneDNN's channels-last convolutions may sum in another
        order for another batch size, and an image's features should not depend on which images
        share its batch (batch segmentation and evaluation compare with one Session per image);
        at 1024 px one image already fills the CPU's kernels, and its maps stay smaller."""
        if pixels.shape[0] > 1:
            parts = [self.maps_folded(pixels[i : i + 1]) for i in range(pixels.shape[0])]
            return ([torch.cat(level) for level in zip(*(f for f, _ in parts))],
                    [torch.cat(level) for level in zip(*(s for _, s in parts))])
        feats, srcs = self.maps(pixels, folded=True)
        return feats, [s.contiguous() for s in srcs]


def _mode_linears(method: Callable) -> Callable:
    """Run a :class:`HipieDecoder` method under its mode's linear layers (``_linears``)."""

    @functools.wraps(method)
    def run(self: HipieDecoder, *args, **kwargs):
        with self._linears():
            return method(self, *args, **kwargs)

    return run


class HipieDecoder(MaskDecoder):
    """HIPIE-R50 as SegLLM uses it: prompt tokens in, [REF]/[SEG] masks, scores and boxes out."""

    supports_set_prediction = True  # trains with HIPIE's own set-prediction losses
    # set by set_compiled: the compiled form of the image encoder's maps (a FrozenCompiled)
    compiled_image = None

    def __init__(self, config: HipieDecoderConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or HipieDecoderConfig()
        self.image_size = config.image_size
        self.num_prompt_tokens = config.num_prompt_tokens
        self.num_ref_tokens = config.num_ref_tokens
        self.prompt_dim = config.lang_dim
        self.detr = HipieSegmenter(config)
        self.criterion = _Criterion()

    # -- computation mode -----------------------------------------------------------------
    @property
    def reference(self) -> bool:
        """Whether the decoder computes as the original does (see :meth:`set_reference`)."""
        return all(m.reference for m in self._mode_modules())

    def set_reference(self, reference: bool) -> HipieDecoder:
        """Compute as the original does (``True``) or the fast way (``False``, the default).

        The reference mode is the baseline the fast mode is timed against
        (``scripts/bench_released_parts.py``): float32 as given, the deformable sampling of the
        original's pure-PyTorch fallback (every level's samples stacked, then weighted and
        summed) and the vision-language fusion's full-width projections of every image token.
        The fast mode gives the same values up to float rounding (``tests/decoders/test_hipie.py``).
        Neither mode caches anything across prompts inside the decoder; the reference timing
        encodes the image again for every prompt, as the original does. Returns ``self``.
        """
        for module in self._mode_modules():
            module.reference = reference
        return self

    def set_compiled(self, compiled: bool = True) -> HipieDecoder:
        """Compile (``True``) or stop compiling (``False``) the two heaviest steps of CPU
        inference with ``torch.compile``: the image encoding (ResNet-50 and input projections)
        and every encoder layer's chunk of about 1,024 tokens (:mod:`segllm.decoders.hipie.compiled`).

        Opt-in: the first forward compiles them (tens of seconds on a small CPU; once per process
        and weights), later forwards are faster (measured in ``scripts/bench_released_parts.py``).
        Used only where the fast CPU inference path runs (CPU tensors, no gradient, not the
        reference mode); training, GPUs and the reference mode run as before. The image step is
        compiled for float32 weights only: in bfloat16 the folded path (:meth:`encode_image`) is
        faster. The outputs equal the uncompiled fast mode's to float rounding. A copy of the
        decoder is not compiled.
        Returns ``self``.
        """
        view = self.image_encoder
        # plain attributes (FrozenCompiled is not a module): nothing new in the state dict
        self.compiled_image = FrozenCompiled(view.maps, view, "image encoder") if compiled else None
        for layer in self.detr.detr.transformer.encoder.layers:
            layer.compiled_chunk = FrozenCompiled(layer.chunk, layer, "encoder layer") if compiled else None
        return self

    @property
    def compiled(self) -> bool:
        """Whether :meth:`set_compiled` is on."""
        return self.compiled_image is not None

    @contextmanager
    def reference_mode(self) -> Iterator[HipieDecoder]:
        """``with decoder.reference_mode():`` computes as the original inside the block."""
        before = self.reference
        self.set_reference(True)
        try:
            yield self
        finally:
            self.set_reference(before)

    def _mode_modules(self) -> list[MultiScaleDeformableAttention | BiMultiHeadAttention]:
        return [m for m in self.modules() if isinstance(m, MultiScaleDeformableAttention | BiMultiHeadAttention)]

    # -- MaskDecoder interface ------------------------------------------------------------
    @property
    def output_size(self) -> int:
        return self.config.image_size // self.config.mask_out_stride

    @property
    def image_encoder(self) -> HipieImageEncoder:
        """The backbone and input projections (a fresh unregistered view of the owned modules)."""
        return HipieImageEncoder(self.detr.detr.backbone, self.detr.detr.input_proj)

    def preprocess(self, image: Tensor) -> tuple[Tensor, Frame]:
        """uint8 [3, H, W] -> normalised float32 [3, S, S] and its :class:`Frame`.

        As released: PIL bilinear resize of the uint8 image (longest side S), zero padding at
        the bottom/right in uint8, then ``(x - mean) / std`` over the whole padded canvas (so
        the padding is *not* zero after normalisation; HIPIE treats it as image content).
        """
        if not isinstance(image, Tensor) or image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ImageError("image must be a uint8 tensor of shape [3, H, W]")
        height, width = image.shape[1:]
        if height < 1 or width < 1:
            raise ImageError(f"image is empty: {height}x{width} pixels")
        frame = Frame.fit(height, width, self.image_size)
        x = image_to_frame(image, frame)
        return self.normalize(x.to(image.device)), frame

    def normalize(self, padded: Tensor) -> Tensor:
        """uint8 or float 0..255 [..., 3, S, S] (already padded) -> normalised float32."""
        mean = torch.tensor(self.config.pixel_mean, dtype=torch.float32, device=padded.device).view(3, 1, 1)
        std = torch.tensor(self.config.pixel_std, dtype=torch.float32, device=padded.device).view(3, 1, 1)
        return (padded.float() - mean) / std

    @_mode_linears
    def encode_image(self, pixels: Tensor, *, keep_backbone: bool = False) -> HipieImageFeatures:  # type: ignore[override]
        """[B, 3, S, S] normalised pixels -> :class:`HipieImageFeatures` (not a single tensor).

        Runs the backbone and the 4 input projections, the part that does not depend on the
        prompt; cache it per image. ``keep_backbone`` also returns the raw res3-res5 maps.
        """
        view = self.image_encoder
        maps = None
        if not torch.is_grad_enabled() and not self.reference:
            # inference in the fast mode: in float32 the compiled maps where set_compiled asked
            # for them (CPU), else the frozen norms folded into the convolutions (about 3x faster
            # at 1024 px on the CPU); in bfloat16 on the CPU the folded path too, compiled or not
            # (0.35 s against 1.03 s unfolded and about 1.1 s compiled at 1024 px, 2 threads; its
            # error against float32 is bfloat16's own, 1.8e-2 of the maps' scale either way). The
            # reference mode, training and other precisions keep the original's separate norms.
            cpu = pixels.device.type == "cpu"
            dtype = view.backbone[0].backbone.stem.conv1.weight.dtype
            compiled = self.compiled_image
            if compiled is not None and cpu and dtype == torch.float32:
                maps = compiled
            elif dtype == torch.float32 or (cpu and dtype == torch.bfloat16):
                maps = view.maps_folded
        return view(pixels, keep_backbone=keep_backbone, maps=maps)

    def _linears(self) -> AbstractContextManager:
        """The reference mode's linear layers compute with ``F.linear`` as the original's do
        (:func:`segllm.linear.plain_linears`); the fast mode's through oneDNN on the CPU."""
        return plain_linears() if self.reference else nullcontext()

    def forward(  # type: ignore[override]
        self,
        image_features: HipieImageFeatures,
        prompts: Tensor,
        batch_index: Tensor,
        *,
        denoising: DenoisingQueries | None = None,
        set_outputs: bool = False,
    ) -> DecoderOutput:
        """Decode N prompts.

        Args:
            image_features: from :meth:`encode_image`.
            prompts: [N, 8, 768] prompt tokens.
            batch_index: [N] long, image of each prompt.
            denoising: training only: denoising queries to run alongside (they never change
                the other outputs).
            set_outputs: also return every layer's per-query predictions for the
                set-prediction losses, in ``DecoderOutput.set_outputs`` (a :class:`HipieSetOutputs`).

        Returns:
            :class:`DecoderOutput` with ``mask_logits`` [N, 2, S/4, S/4] (channel SEG = the best
            target-class instance, REF = the best [REF]-class instance), ``iou_scores`` [N, 2]
            their instance scores ``sqrt(sigmoid(class) * sigmoid(iou))`` in [0, 1], and ``boxes``
            [N, 2, 4] xyxy in input pixels.
        """
        # the original makes all Q queries' masks and keeps two per prompt; each query's mask is
        # its own (dynamic convolutions from its state), so the fast mode makes only the two
        # (on the released size 0.16-0.39 s of a 1024 px forward, against 3 ms)
        raw = self.forward_raw(image_features, prompts, batch_index, denoising=denoising, set_outputs=set_outputs,
                               all_masks=self.reference)
        out = self.select(raw)
        out.set_outputs = raw.set_outputs
        return out

    # -- HIPIE specifics ------------------------------------------------------------------
    @_mode_linears
    def forward_raw(
        self,
        features: HipieImageFeatures,
        prompts: Tensor,
        batch_index: Tensor,
        *,
        denoising: DenoisingQueries | None = None,
        set_outputs: bool = False,
        all_masks: bool = True,
    ) -> HipieRawOutput:
        """All per-query outputs and the post-processed instances (see :class:`HipieRawOutput`).

        Args:
            features: from :meth:`encode_image`.
            prompts: [N, T, D] prompt tokens.
            batch_index: [N] long, image of each prompt.
            denoising: see :meth:`forward`.
            set_outputs: fill ``set_outputs`` (see :meth:`forward`).
            all_masks: make every query's mask (``pred_masks``); False leaves it None and
                :meth:`select` makes only the selected queries' masks.
        """
        c = self.config
        if prompts.ndim != 3 or prompts.shape[1:] != (c.num_prompt_tokens, c.lang_dim):
            raise ValueError(f"prompts must be [N, {c.num_prompt_tokens}, {c.lang_dim}], got {list(prompts.shape)}")
        detr = self.detr.detr
        srcs = [s[batch_index] for s in features.srcs]
        prompts = prompts.to(srcs[0].dtype)
        dn = None
        if denoising is not None:
            # HIPIE's dynamic label encoding: the mean prompt token, resized, for every target
            label = self.detr.resizer(prompts.mean(1))[:, None]
            dn = (torch.where(denoising.filled[..., None], label, torch.zeros_like(label)), denoising.boxes)
        out = detr.transformer(srcs, features.pos, prompts, denoising=dn)

        last = c.dec_layers - 1
        layers = range(c.dec_layers) if set_outputs else range(last, last + 1)
        preds = self._predict(out.hs, out.init_reference, out.references, out.lang, layers)
        hs = out.hs[last]
        pred_logits, pred_boxes, pred_ious = preds.logits[-1], preds.boxes[-1], preds.ious[-1]
        reference_points = preds.centres[-1]

        mask_features = self.mask_features(out.memory, [s.shape[-2:] for s in srcs])
        pred_masks = self.query_masks(mask_features, hs, reference_points * c.image_size) if all_masks else None

        fg = slice(c.num_bg_queries, None)
        instances = [
            postprocess(
                pred_logits[i, fg].detach(),
                pred_ious[i, fg].detach(),
                pred_boxes[i, fg].detach(),
                num_ref_tokens=c.num_ref_tokens,
                image_size=c.image_size,
                nms_threshold=c.nms_threshold,
                max_instances=c.max_instances,
            )
            for i in range(prompts.shape[0])
        ]
        set_out = None
        if set_outputs:
            dn_preds = None
            if out.denoising is not None:
                d = out.denoising
                dn_preds = self._predict(d.hs, d.init_reference, d.references, out.lang, layers)
            set_out = HipieSetOutputs(
                queries=preds,
                denoising=dn_preds,
                mask_features=mask_features,
                enc_logits=out.enc_class,
                enc_boxes=out.enc_coord_unact.sigmoid(),
                num_bg_queries=c.num_bg_queries,
            )
        return HipieRawOutput(
            pred_logits=pred_logits,
            pred_boxes=pred_boxes,
            pred_ious=pred_ious,
            pred_masks=pred_masks,
            reference_points=reference_points,
            instances=instances,
            transformer=out,
            set_outputs=set_out,
            mask_features=mask_features,
        )

    def _predict(
        self, hs: Tensor, init_reference: Tensor, references: Tensor, lang: Tensor, layers: range
    ) -> LayerPredictions:
        """The heads of the given decoder layers.

        Args:
            hs: [D, N, Q, C] states after each layer; references: [D, N, Q, 4] boxes after each
                layer; init_reference: [N, Q, 4] boxes fed to the first; lang: [N, T, D_lang].

        Layer l refines the box layer l-1 produced (not detached: "look forward twice").
        """
        detr = self.detr.detr
        logits, boxes, ious, centres = [], [], [], []
        for layer in layers:
            start = references[layer - 1] if layer > 0 else init_reference
            logits.append(detr.class_embed[layer](hs[layer], lang))
            boxes.append((detr.bbox_embed[layer](hs[layer]) + inverse_sigmoid(start)).sigmoid())
            ious.append(detr.iou_head[layer](hs[layer]))
            centres.append(start[..., :2])
        return LayerPredictions(
            logits=torch.stack(logits),
            boxes=torch.stack(boxes),
            ious=torch.stack(ious),
            hs=hs[layers.start : layers.stop],
            centres=torch.stack(centres),
        )

    def mask_features(self, memory: Tensor, shapes: list[torch.Size]) -> Tensor:
        """Shared input of the dynamic mask head: memory [N, S, C] -> [N, C/32, H_0, W_0] (stride 8)."""
        n, _, dim = memory.shape
        maps, start = [], 0
        for h, w in shapes[:3]:
            maps.append(memory[:, start : start + h * w].transpose(1, 2).reshape(n, dim, h, w))
            start += h * w
        return self.detr.mask_head(maps)

    def query_masks(self, mask_features: Tensor, hs: Tensor, centres: Tensor) -> Tensor:
        """CondInst masks of K queries per row.

        Args:
            mask_features: [N, C/32, H_0, W_0] from :meth:`mask_features`.
            hs: [N, K, C] query states (they generate the dynamic convolutions).
            centres: [N, K, 2] (x, y) in input pixels, the origin of the relative coordinates.

        Returns:
            [N, K, S/4, S/4] mask logits.
        """
        c = self.config
        logits = dynamic_mask_logits(
            mask_features,
            self.detr.controller(hs),
            centres,
            stride=_MASK_FEATURE_STRIDE,
            channels=c.dynamic_mask_channels,
            num_layers=c.controller_layers,
        )
        return aligned_bilinear(logits, _MASK_FEATURE_STRIDE // c.mask_out_stride)

    @_mode_linears
    def select(self, raw: HipieRawOutput) -> DecoderOutput:
        """Pick the best [REF]- and [SEG]-class instance of every prompt (see :meth:`forward`)."""
        n = raw.pred_logits.shape[0]
        device = raw.pred_logits.device
        query = torch.zeros(n, 2, dtype=torch.long, device=device)
        scores = raw.pred_logits.new_zeros(n, 2)
        boxes = raw.pred_logits.new_zeros(n, 2, 4)
        for i, inst in enumerate(raw.instances):
            for channel, label in ((REF, 0), (SEG, 1)):
                k = select_best(inst, label)
                query[i, channel] = inst.query_index[k] + self.config.num_bg_queries
                scores[i, channel] = inst.scores[k]
                boxes[i, channel] = inst.boxes[k]
        rows = torch.arange(n, device=device)[:, None]
        if raw.pred_masks is not None:
            masks = raw.pred_masks[rows, query]
        else:  # only the selected queries' masks: the same dynamic convolutions, 2 of Q per prompt
            hs = raw.transformer.hs[self.config.dec_layers - 1]  # the states forward_raw's masks come from
            masks = self.query_masks(raw.mask_features, hs[rows, query],
                                     raw.reference_points[rows, query] * self.config.image_size)
        return DecoderOutput(mask_logits=masks, iou_scores=scores, boxes=boxes)


def build_hipie_decoder(config: HipieDecoderConfig, prompt_head: PromptHeadConfig, *, load_weights: bool = True) -> HipieDecoder:
    """The decoder kind "hipie" (see :mod:`segllm.decoders.registry`), random weights (the released
    ones come with a released checkpoint, :func:`load_released_hipie`, so ``load_weights`` changes
    nothing). The prompt head must give the decoder's ``num_prompt_tokens`` / ``num_ref_tokens``,
    ``lang_dim`` wide."""
    tokens, ref = config.num_prompt_tokens, config.num_ref_tokens
    if (prompt_head.num_tokens, prompt_head.num_ref_tokens) != (tokens, ref):
        raise ConfigError(
            f"prompt_head gives {prompt_head.num_tokens} tokens ({prompt_head.num_ref_tokens} [REF]) but the HIPIE decoder takes {tokens} ({ref} [REF])"
        )
    if prompt_head.dim != config.lang_dim:
        raise ConfigError(f"prompt_head.dim ({prompt_head.dim}) must equal decoder.lang_dim ({config.lang_dim})")
    return HipieDecoder(config)


def load_released_hipie(
    decoder: HipieDecoder,
    state_dict: Mapping[str, Tensor],
    *,
    prefix: str = "model.segmentator.hipie.",
    gamma: str = "released",
) -> HipieDecoder:
    """Load released HIPIE weights (strict) into ``decoder``.

    Args:
        decoder: the module to fill (its config must match the checkpoint).
        state_dict: keys starting with ``prefix`` are used (``text_encoder.*``, the unused
            BERT, is skipped); others are ignored.
        prefix: ``"model.segmentator.hipie."`` for a released SegLLM checkpoint,
            ``"hipie."`` for the fixture's ``weights.safetensors``.
        gamma: ``"released"`` resets the VL fusion scales ``gamma_v``/``gamma_l`` to
            1 / enc_layers after loading, reproducing the released loader (transformers renames
            keys containing "gamma", so the trained values were silently dropped);
            ``"stored"`` keeps the values in the checkpoint.

    Raises:
        CheckpointError: on missing or unexpected keys or shape mismatches.
    """
    if gamma not in ("released", "stored"):
        raise ValueError(f"gamma must be 'released' or 'stored', got {gamma!r}")
    own = decoder.state_dict()
    picked = {
        k[len(prefix) :]: v
        for k, v in state_dict.items()
        if k.startswith(prefix) and not k[len(prefix) :].startswith("text_encoder.")
    }
    missing = sorted(set(own) - set(picked))
    unexpected = sorted(set(picked) - set(own))
    wrong = sorted(k for k in set(own) & set(picked) if tuple(own[k].shape) != tuple(picked[k].shape))
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"HIPIE weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {wrong[:5]} ({len(missing)}/{len(unexpected)}/{len(wrong)} in all)"
        )
    decoder.load_state_dict(picked, strict=True)
    if gamma == "released":
        with torch.no_grad():
            for layer in decoder.detr.detr.transformer.encoder.vl_layers:
                layer.b_attn.gamma_v.fill_(decoder.config.vl_gamma_init)
                layer.b_attn.gamma_l.fill_(decoder.config.vl_gamma_init)
    return decoder
