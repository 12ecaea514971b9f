"""The direct mask decoder: a mask is the dot product of the prompt with prompt-modulated
per-pixel features.

Why (issue 13): in the SAM-style decoder the prompt reaches the mask through a two-way
transformer and a hypernetwork, all learned from scratch, and the project's experiments found the
decoder learning a question-blind "where are the objects" mask while the prompt stayed unused.
Here the prompt acts on the mask in two short steps: it scales and shifts every feature channel
(FiLM) and its [SEG] / [REF] query vectors are dotted with each pixel's features, so the mask loss
reaches the prompt (and the LLM behind it) directly. A small convolution stack gives each pixel
its neighbourhood and one self-attention block over a pooled grid gives it the whole image
(relations such as "left-most" or "left of instance 1" compare objects across the image).
With ``ref_prior`` the mask a round refers to enters as well (where the referent is, and what its
features look like), so mask memory reaches the mask directly and not only through the LLM.

With ``refine_stride`` a refinement stage (:mod:`.refine`) brings the masks from the feature grid
to a finer output grid along the image's edges.

Shapes: B images, N prompts, K tokens per prompt (the first ``num_ref_tokens`` [REF]), D prompt
width (``dim``), F ``fuse_dim``, g = image_size / stride feature grid side, c ``context_grid``,
G = the output side (g, or image_size / refine_stride with refinement), P the refinement's
packed full-resolution channels (0 without it), T the attribute classes of all groups (0 without
attribute matching).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segllm.config import PromptHeadConfig
from segllm.decoders.base import REF, SEG, DecoderOutput, MaskDecoder, MeanStdInput, check_decoder_inputs
from segllm.decoders.convnet import ConvBackbone, ResidualBlock
from segllm.decoders.direct.config import DirectDecoderConfig
from segllm.decoders.direct.refine import MaskRefiner
from segllm.decoders.layers import MLP
from segllm.decoders.sam.decoder import EncoderBlock
from segllm.errors import ConfigError

__all__ = ["DirectMaskDecoder", "build_direct_decoder"]


class DirectMaskDecoder(MeanStdInput, MaskDecoder):
    """Image + N prompts of K tokens -> [N, 2, G, G] mask logits ([REF], [SEG]) and [N, 2] IoU.

    Parameters under ``image_encoder.`` form the image encoder (the "decoder_encoder" part);
    the rest is the decoder.
    """

    def __init__(self, config: DirectDecoderConfig, *, num_prompt_tokens: int, num_ref_tokens: int) -> None:
        super().__init__()
        _check_config(config, num_prompt_tokens, num_ref_tokens)
        self.config = config
        self.image_size = config.image_size
        self.num_prompt_tokens = num_prompt_tokens
        self.num_ref_tokens = num_ref_tokens
        self.prompt_dim = config.dim
        self.grid_size = config.image_size // config.stride
        d, f = config.dim, config.fuse_dim

        self.image_encoder = ConvBackbone(config.image_size, config.stride, config.encoder_width, config.encoder_depth, d)
        self.prompt_norm = nn.LayerNorm(2 * d)
        self.film = nn.Linear(2 * d, 2 * f)  # [REF; SEG] summary -> per-channel scale and shift
        self.in_proj = nn.Conv2d(d, f, 1)
        self.local = nn.Sequential(*(ResidualBlock(f) for _ in range(config.fuse_depth)))
        if config.context_grid:
            self.context_pos = nn.Parameter(torch.zeros(config.context_grid**2, f))
            self.context = EncoderBlock(f, config.heads)
            # further blocks apart from the first, so that a one-block checkpoint's keys stay as they were
            self.context_more = nn.ModuleList(EncoderBlock(f, config.heads) for _ in range(config.context_depth - 1))
            self.context_out = nn.Conv2d(f, f, 1)
        self.out_norm = nn.GroupNorm(1, f)
        self.queries = nn.ModuleList(nn.Linear(d, f) for _ in range(2))  # REF, SEG
        self.mask_bias = nn.Parameter(torch.zeros(2))
        self.iou_head = MLP(2 * d, d, 2, 2)
        if config.attributes:
            total = sum(config.attributes.values())
            self.pixel_attributes = nn.Conv2d(d, total, 1)
            self.prompt_attributes = nn.Linear(d, total)
            self.match_scale = nn.Parameter(torch.ones(()))
        self.takes_ref_masks = config.ref_prior
        if config.ref_prior:
            # no biases: a prompt whose round refers to nothing is decoded as without the option
            self.ref_map = nn.Conv2d(1, f, 3, padding=1, bias=False)  # where the referent is
            self.ref_norm = nn.LayerNorm(d)
            self.ref_film = nn.Linear(d, 2 * f, bias=False)  # what it looks like -> modulation
            self.ref_query = nn.Linear(d, f, bias=False)  # ... and -> the [SEG] query
        self.refiner = None
        if config.refine_stride:
            self.refiner = MaskRefiner(config.image_size, config.stride, config.refine_stride, config.refine_width)
        self._init_weights()

    def _init_weights(self) -> None:
        # the modulation starts as the identity, so at first the masks read the encoder's features
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        if self.config.context_grid:
            nn.init.trunc_normal_(self.context_pos, std=0.02)
            nn.init.zeros_(self.context_out.weight)  # the global branch starts switched off
            nn.init.zeros_(self.context_out.bias)
            for block in self.context_more:  # residual blocks that add nothing at first
                for layer in (block.proj, block.mlp[-1]):
                    nn.init.zeros_(layer.weight)
                    nn.init.zeros_(layer.bias)
        if self.config.ref_prior:
            # switched off at first: turning the option on for a trained model changes nothing
            for layer in (self.ref_map, self.ref_film, self.ref_query):
                nn.init.zeros_(layer.weight)

    @property
    def output_size(self) -> int:
        return self.refiner.out_size if self.refiner is not None else self.grid_size

    @property
    def packed_channels(self) -> int:
        """P: the refinement's full-resolution channels in :meth:`encode_image`'s output (0 without)."""
        return self.refiner.packed_channels if self.refiner is not None else 0

    @property
    def feature_channels(self) -> int:
        """Channels of :meth:`encode_image`'s output: D + P + F (+ T with attribute matching)."""
        attrs = sum(self.config.attributes.values()) if self.config.attributes else 0
        return self.prompt_dim + self.packed_channels + self.config.fuse_dim + attrs

    def encode_image(self, pixels: Tensor) -> Tensor:
        """[B, 3, S, S] preprocessed images -> features [B, D + P + F (+ T), g, g]: the encoder's
        D channels; with refinement, the full-resolution features folded onto the grid (P); then
        the decoding steps that do not depend on the prompt, done here once per image rather than
        once per prompt and round (a session keeps these features for all its rounds): the input
        projection (F) and, with attribute matching, the pixels' class logits (T)."""
        feats = self.image_encoder(pixels)
        parts = [feats]
        if self.refiner is not None:
            parts.append(self.refiner.encode(pixels).to(feats.dtype))
        parts.append(self.in_proj(feats))
        if self.config.attributes:
            parts.append(self.pixel_attributes(feats))
        return torch.cat(parts, dim=1)

    def forward(self, image_features: Tensor, prompts: Tensor, batch_index: Tensor, ref_masks: Tensor | None = None) -> DecoderOutput:
        """Decode N prompts.

        Args:
            image_features: [B, D + P + F (+ T), g, g] from :meth:`encode_image`.
            prompts: [N, K, dim] prompt tokens.
            batch_index: [N] integer, which image each prompt belongs to (in [0, B)).
            ref_masks: [N, G, G] float in [0, 1], the earlier mask each prompt's round refers
                to, in the output frame (zeros: none); used with ``ref_prior`` (area-averaged
                to the feature grid) and by the refinement, else ignored.

        Returns:
            DecoderOutput with mask_logits [N, 2, G, G] and iou_scores [N, 2].

        Raises:
            ValueError: naming the mismatch if a shape, dtype or index is wrong.
        """
        check_decoder_inputs(image_features, prompts, batch_index, width=self.prompt_dim, grid=self.grid_size,
                             tokens=self.num_prompt_tokens, channels=self.feature_channels)
        dtype = self.film.weight.dtype
        d, p, f = self.prompt_dim, self.packed_channels, self.config.fuse_dim
        # what each prompt needs of its image, every channel: [N, D + P + F (+ T), g, g]
        n = batch_index.shape[0]
        if _leading(batch_index, image_features.shape[0]):
            rows = image_features[:n].to(dtype)
        else:
            rows = image_features.index_select(0, batch_index.long()).to(dtype)
        prompts = prompts.to(dtype)
        c = _CPU_PROMPT_CHUNK
        if image_features.device.type != "cpu" or n <= c + c // 2:
            masks, iou, named = self._decode(rows, prompts, ref_masks)
        else:
            # each prompt is decoded on its own, so chunks give the same masks (up to the float
            # rounding of another batch size in the convolutions); split, the chunks' gradients
            # meet in one tensor, where a gather per chunk would give each a full-size one
            refs = ref_masks.split(c) if ref_masks is not None else [None] * -(-n // c)
            outs = [self._decode(*a) for a in zip(rows.split(c), prompts.split(c), refs)]
            masks, iou = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
            named = torch.cat([o[2] for o in outs]) if self.config.attributes else None
        attributes = None
        if self.config.attributes:  # every pixel's classes, per image (from encode_image)
            attributes = (image_features[:, d + p + f :].to(dtype).permute(0, 2, 3, 1), named)
        return DecoderOutput(mask_logits=masks, iou_scores=iou, attributes=attributes)

    def _decode(self, rows: Tensor, prompts: Tensor, ref_masks: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """:meth:`forward`'s decoding of N prompts at once, from their images' features ``rows``
        [N, D + P + F (+ T), g, g] (in the decoder's dtype, as ``prompts``): (mask logits
        [N, 2, G, G], IoU scores [N, 2], named classes [N, T] or None)."""
        d, g = self.prompt_dim, self.grid_size
        dtype = self.film.weight.dtype
        p, f = self.packed_channels, self.config.fuse_dim
        feats, packed, projected, pixels = rows.split([d, p, f, rows.shape[1] - d - p - f], dim=1)
        fine_refs = None
        if self.refiner is not None and ref_masks is not None and self.config.ref_prior:
            out = self.output_size
            if tuple(ref_masks.shape) != (feats.shape[0], out, out):
                raise ValueError(f"ref_masks must be [{feats.shape[0]}, {out}, {out}] (one map per prompt, in the output frame), got {list(ref_masks.shape)}")
            fine_refs = ref_masks.to(dtype)
            ref_masks = F.adaptive_avg_pool2d(fine_refs[:, None], g)[:, 0]  # area-averaged to the feature grid
        r = self.num_ref_tokens
        summary = torch.stack([prompts[:, :r].mean(1), prompts[:, r:].mean(1)], dim=1)  # [N, 2, D]: REF, SEG
        both = self.prompt_norm(summary.flatten(1))  # [N, 2D]
        film = self.film(both)  # [N, 2F]
        ref_map = ref_query = None
        if self.config.ref_prior and ref_masks is not None:
            ref_map, ref_film, ref_query = self._ref_prior(feats, ref_masks.to(dtype))
            film = film + ref_film
        scale, shift = film.chunk(2, dim=-1)  # [N, F] each

        x = projected * (1 + scale[:, :, None, None]) + shift[:, :, None, None]  # [N, F, g, g]
        if ref_map is not None:
            x = x + ref_map
        # channels-last: the per-prompt convolutions' layout in oneDNN (and on tensor cores), so
        # they run without reordering every input (about 1.3x faster on the CPU at 32 prompts)
        x = self.local(x.contiguous(memory_format=torch.channels_last))
        if self.config.context_grid:
            x = x + self._global(x)
        x = self.out_norm(x)
        q_seg = self.queries[SEG](summary[:, SEG])
        if ref_query is not None:
            q_seg = q_seg + ref_query
        q = torch.stack([self.queries[REF](summary[:, REF]), q_seg], dim=1)  # [N, 2, F]
        n, f, g, _ = x.shape
        masks = (q @ x.flatten(2)).view(n, 2, g, g) / math.sqrt(f) + self.mask_bias.view(1, 2, 1, 1)
        named = None
        if self.config.attributes:
            named = self.prompt_attributes(summary[:, SEG])  # [N, T]
            match = self.match_scale * self._match(pixels, named)  # [N, g, g]
            masks = torch.stack([masks[:, REF], masks[:, SEG] + match], dim=1)
        if self.refiner is not None:
            masks = self.refiner(packed, masks, fine_refs)
        return masks, self.iou_head(both), named

    def _ref_prior(self, feats: Tensor, ref_masks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The referred mask's contributions: map [N, F, g, g], modulation [N, 2F], [SEG] query
        shift [N, F], from the prompts' image features [N, D, g, g] and ``ref_masks`` [N, g, g]."""
        if ref_masks.shape != (feats.shape[0], *feats.shape[2:]):
            raise ValueError(f"ref_masks must be [{feats.shape[0]}, {feats.shape[2]}, {feats.shape[3]}] (one map per prompt, in the output frame), got {list(ref_masks.shape)}")
        m = ref_masks[:, None]  # [N, 1, g, g]
        area = m.sum(dim=(2, 3))  # [N, 1]; 0 for a prompt whose round refers to nothing
        pooled = (feats * m).sum(dim=(2, 3)) / area.clamp(min=1e-6)  # mean feature under the mask, [N, D]
        look = self.ref_norm(pooled) * (area > 0).to(pooled.dtype)  # no referent: no appearance
        return self.ref_map(m), self.ref_film(look), self.ref_query(look)

    def _match(self, pixels: Tensor, named: Tensor) -> Tensor:
        """How well each pixel's classes agree with what each prompt names.

        Args:
            pixels: [N, T, g, g] class logits of each prompt's image.
            named: [N, T] class logits of what each prompt names (class 0: names none).

        Returns:
            [N, g, g]: the sum over the groups of E_{c ~ named, c >= 1}[log p(c | pixel)]; a
            group the prompt names nothing of (its mass on class 0) adds about 0, a named class
            adds its log-probability at the pixel.
        """
        total = pixels.new_zeros(named.shape[0], *pixels.shape[2:])
        start = 0
        for n in self.config.attributes.values():
            logp = F.log_softmax(pixels[:, start : start + n].float(), dim=1)[:, 1:]  # [N, n-1, g, g]
            p = F.softmax(named[:, start : start + n].float(), dim=-1)[:, 1:]  # [N, n-1]
            total = total + torch.einsum("nc,nchw->nhw", p, logp).to(total.dtype)
            start += n
        return total

    def _global(self, x: Tensor) -> Tensor:
        """[N, F, g, g] -> [N, F, g, g]: ``context_depth`` self-attention blocks over the c x c
        average-pooled map, brought back to g x g (nearest)."""
        c = self.config.context_grid
        n, f, g, _ = x.shape
        pooled = F.adaptive_avg_pool2d(x, c).flatten(2).transpose(1, 2) + self.context_pos  # [N, c*c, F]
        mixed = self.context(pooled)
        for block in self.context_more:
            mixed = block(mixed)
        # context_out, a 1x1 convolution, applied as the linear map it is on the c*c tokens: a
        # convolution on the channels-last view of the tokens would give its weight a gradient
        # with strides other than the parameter's, which DDP warns about on every step
        mixed = F.linear(mixed, self.context_out.weight.flatten(1), self.context_out.bias)  # [N, c*c, F]
        mixed = mixed.transpose(1, 2).reshape(n, f, c, c)
        # the projection on the c x c map, then the copies: the same values as projecting the
        # g x g copies, at (c / g)^2 of the work
        return F.interpolate(mixed, size=(g, g), mode="nearest")


# Prompts decoded at once on the CPU. A chunk's per-prompt maps ([32, 64, 32, 32] and [32, 16, 64, 64]
# float32, 8 MiB each) stay in the last-level cache and below glibc's mmap threshold; a training
# batch's hundreds of prompts at once make each map a fresh ~100 MB allocation streamed through
# memory (380 prompts without gradient: 1.24 s at once, 0.52 s in chunks of 32, 2 threads). Not on
# an accelerator, where a chunk would only add kernel launches.
_CPU_PROMPT_CHUNK = 32


def _leading(batch_index: Tensor, images: int) -> bool:
    """Is ``batch_index`` [N] exactly 0, 1, ..., N - 1 with N <= images (one prompt for each of the
    first N images, in order, as batch segmentation's rounds usually are: its batches put the
    longest conversations first, so the rows still asking are the leading ones)? Then the
    per-prompt gather of the image features would only copy them (about 1 MB a prompt), and the
    first N images' features serve as they are. Checked only for a host tensor: on an
    accelerator reading the values back would stall the queue, and the copy is cheap there."""
    n = batch_index.shape[0]
    if batch_index.device.type != "cpu" or n > images:
        return False
    return bool(torch.equal(batch_index, torch.arange(n, dtype=batch_index.dtype)))


def build_direct_decoder(config: DirectDecoderConfig, prompt_head: PromptHeadConfig, *, load_weights: bool = True) -> DirectMaskDecoder:
    """The decoder kind "direct" (see :mod:`segllm.decoders.registry`): random weights (there are
    no pretrained ones, so ``load_weights`` changes nothing); the prompts must be ``dim`` wide."""
    if prompt_head.dim != config.dim:
        raise ConfigError(f"prompt_head.dim ({prompt_head.dim}) must equal decoder.dim ({config.dim})")
    return DirectMaskDecoder(config, num_prompt_tokens=prompt_head.num_tokens, num_ref_tokens=prompt_head.num_ref_tokens)


def _check_config(config: DirectDecoderConfig, num_prompt_tokens: int, num_ref_tokens: int) -> None:
    if config.stride not in (4, 8, 16):
        raise ConfigError(f"decoder.stride must be 4, 8 or 16, got {config.stride}")
    if config.refine_stride not in (0, 1, 2):
        raise ConfigError(f"decoder.refine_stride must be 0 (off), 1 or 2, got {config.refine_stride}")
    if config.refine_stride and config.refine_width < 1:
        raise ConfigError(f"decoder.refine_width must be >= 1, got {config.refine_width}")
    if config.image_size % config.stride:
        raise ConfigError(f"decoder.image_size {config.image_size} is not a multiple of stride {config.stride}")
    g = config.image_size // config.stride
    if config.context_grid and g % config.context_grid:
        raise ConfigError(f"decoder.context_grid {config.context_grid} must divide the feature grid ({g})")
    if config.context_depth < 1:
        raise ConfigError(f"decoder.context_depth must be >= 1, got {config.context_depth}")
    if config.context_grid and config.fuse_dim % config.heads:
        raise ConfigError(f"decoder.fuse_dim {config.fuse_dim} is not divisible by decoder.heads {config.heads}")
    for name, n in config.attributes.items():
        if not isinstance(n, int) or n < 2:
            raise ConfigError(f"decoder.attributes[{name!r}] must be a class count >= 2, got {n!r}")
    if not 0 < num_ref_tokens < num_prompt_tokens:
        raise ConfigError(f"the direct decoder needs [REF] and [SEG] tokens: num_ref_tokens {num_ref_tokens} of {num_prompt_tokens}")
