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

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from segllm.decoders.base import REF, SEG, DecoderOutput, Frame, MaskDecoder, image_to_frame
from segllm.decoders.hipie.backbone import BackboneWithPosition
from segllm.decoders.hipie.common import MLP, FeatureResizer, inverse_sigmoid
from segllm.decoders.hipie.config import HipieDecoderConfig
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
from segllm.errors import CheckpointError, ImageError

__all__ = [
    "DeformableDetr",
    "HipieDecoder",
    "HipieImageEncoder",
    "HipieImageFeatures",
    "HipieRawOutput",
    "HipieSegmenter",
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


@dataclass
class HipieRawOutput:
    """Per-query predictions for N prompts (all Q queries, background ones first).

    Attributes:
        pred_logits: [N, Q, T] query x prompt-token logits.
        pred_boxes: [N, Q, 4] (cx, cy, w, h) normalised to the input frame.
        pred_ious: [N, Q, 1] IoU logits.
        pred_masks: [N, Q, S/4, S/4] mask logits.
        reference_points: [N, Q, 2] query centres (normalised) used by the mask head.
        instances: per prompt, the post-processed foreground detections.
        transformer: the transformer's intermediate results.
    """

    pred_logits: Tensor
    pred_boxes: Tensor
    pred_ious: Tensor
    pred_masks: Tensor
    reference_points: Tensor
    instances: list[Instances]
    transformer: TransformerOutput


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

    def forward(self, pixels: Tensor, *, keep_backbone: bool = False) -> HipieImageFeatures:
        """[B, 3, S, S] normalised pixels -> :class:`HipieImageFeatures`."""
        feats = self.backbone(pixels)
        srcs = [proj(f) for proj, f in zip(self.input_proj, feats)]
        srcs.append(self.input_proj[len(feats)](feats[-1]))
        pos = [self.backbone[1](s) for s in srcs]
        return HipieImageFeatures(srcs=srcs, pos=pos, backbone=feats if keep_backbone else [])


class HipieDecoder(MaskDecoder):
    """HIPIE-R50 as SegLLM uses it: prompt tokens in, [REF]/[SEG] masks, scores and boxes out."""

    def __init__(self, config: HipieDecoderConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or HipieDecoderConfig()
        self.image_size = config.image_size
        self.num_prompt_tokens = config.num_prompt_tokens
        self.num_ref_tokens = config.num_ref_tokens
        self.prompt_dim = config.lang_dim
        self.detr = HipieSegmenter(config)
        self.criterion = _Criterion()

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

    def encode_image(self, pixels: Tensor, *, keep_backbone: bool = False) -> HipieImageFeatures:  # type: ignore[override]
        """[B, 3, S, S] normalised pixels -> :class:`HipieImageFeatures` (not a single tensor).

        Runs the backbone and the 4 input projections, the part that does not depend on the
        prompt; cache it per image. ``keep_backbone`` also returns the raw res3-res5 maps.
        """
        return self.image_encoder(pixels, keep_backbone=keep_backbone)

    def forward(self, image_features: HipieImageFeatures, prompts: Tensor, batch_index: Tensor) -> DecoderOutput:  # type: ignore[override]
        """Decode N prompts.

        Args:
            image_features: from :meth:`encode_image`.
            prompts: [N, 8, 768] prompt tokens.
            batch_index: [N] long, image of each prompt.

        Returns:
            :class:`DecoderOutput` with ``mask_logits`` [N, 2, S/4, S/4] (channel SEG = the best
            target-class instance, REF = the best [REF]-class instance), ``iou_scores`` [N, 2]
            their instance scores ``sqrt(sigmoid(class) * sigmoid(iou))`` in [0, 1], and ``boxes``
            [N, 2, 4] xyxy in input pixels.
        """
        raw = self.forward_raw(image_features, prompts, batch_index)
        return self.select(raw)

    # -- HIPIE specifics ------------------------------------------------------------------
    def forward_raw(
        self, features: HipieImageFeatures, prompts: Tensor, batch_index: Tensor, *, keep_trace: bool = False
    ) -> HipieRawOutput:
        """All per-query outputs and the post-processed instances (see :class:`HipieRawOutput`).

        Args:
            features: from :meth:`encode_image`.
            prompts: [N, T, D] prompt tokens.
            batch_index: [N] long, image of each prompt.
            keep_trace: keep encoder intermediates in ``transformer.trace``.
        """
        c = self.config
        if prompts.ndim != 3 or prompts.shape[1:] != (c.num_prompt_tokens, c.lang_dim):
            raise ValueError(f"prompts must be [N, {c.num_prompt_tokens}, {c.lang_dim}], got {list(prompts.shape)}")
        detr = self.detr.detr
        srcs = [s[batch_index] for s in features.srcs]
        out = detr.transformer(srcs, features.pos, prompts.to(srcs[0].dtype), keep_trace=keep_trace)

        last = c.dec_layers - 1
        hs = out.hs[last]
        reference = out.references[last - 1] if last > 0 else out.init_reference
        pred_logits = detr.class_embed[last](hs, out.lang)
        pred_boxes = (detr.bbox_embed[last](hs) + inverse_sigmoid(reference)).sigmoid()
        pred_ious = detr.iou_head[last](hs)

        pred_masks = self._masks(out.memory, [s.shape[-2:] for s in srcs], hs, reference[..., :2])

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
        return HipieRawOutput(
            pred_logits=pred_logits,
            pred_boxes=pred_boxes,
            pred_ious=pred_ious,
            pred_masks=pred_masks,
            reference_points=reference[..., :2],
            instances=instances,
            transformer=out,
        )

    def _masks(self, memory: Tensor, shapes: list[torch.Size], hs: Tensor, centres: Tensor) -> Tensor:
        """CondInst masks: memory [N, S, C], hs [N, Q, C], centres [N, Q, 2] -> [N, Q, S/4, S/4]."""
        c = self.config
        n, _, dim = memory.shape
        maps, start = [], 0
        for h, w in shapes[:3]:
            maps.append(memory[:, start : start + h * w].transpose(1, 2).reshape(n, dim, h, w))
            start += h * w
        mask_feats = self.detr.mask_head(maps)
        params = self.detr.controller(hs)
        logits = dynamic_mask_logits(
            mask_feats,
            params,
            centres * c.image_size,
            stride=_MASK_FEATURE_STRIDE,
            channels=c.dynamic_mask_channels,
            num_layers=c.controller_layers,
        )
        return aligned_bilinear(logits, _MASK_FEATURE_STRIDE // c.mask_out_stride)

    def select(self, raw: HipieRawOutput) -> DecoderOutput:
        """Pick the best [REF]- and [SEG]-class instance of every prompt (see :meth:`forward`)."""
        n = raw.pred_masks.shape[0]
        device = raw.pred_masks.device
        query = torch.zeros(n, 2, dtype=torch.long, device=device)
        scores = raw.pred_logits.new_zeros(n, 2)
        boxes = raw.pred_logits.new_zeros(n, 2, 4)
        for i, inst in enumerate(raw.instances):
            for channel, label in ((REF, 0), (SEG, 1)):
                k = select_best(inst, label)
                query[i, channel] = inst.query_index[k] + self.config.num_bg_queries
                scores[i, channel] = inst.scores[k]
                boxes[i, channel] = inst.boxes[k]
        masks = raw.pred_masks[torch.arange(n, device=device)[:, None], query]
        return DecoderOutput(mask_logits=masks, iou_scores=scores, boxes=boxes)


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
