"""A SAM-style promptable mask decoder in pure PyTorch, with its own small ViT image encoder.

The design follows Segment Anything (Kirillov et al., 2023), written from scratch and shrunk:

* :class:`ImageEncoder`: a plain ViT (patch embedding, learned absolute position embedding,
  global-attention pre-norm blocks) and SAM's "neck" (1x1 conv, LayerNorm2d, 3x3 conv,
  LayerNorm2d) mapping the encoder width to the decoder width ``dim``.
* :class:`RandomFourierPositionEncoding`: dense positional encoding of the feature grid with a
  fixed random Gaussian projection (SAM's ``PositionEmbeddingRandom``).
* :class:`TwoWayTransformer`: tokens attend to the image and the image attends back to the tokens.
* :class:`SamMaskDecoder`: puts it together. The tokens are one IoU token, two mask tokens
  (channel ``REF`` = 0 and ``SEG`` = 1) and the K prompt tokens from the LLM, with a learned
  embedding added to each prompt half ([REF] = the first ``num_ref_tokens``, [SEG] = the rest).
  The image side is upscaled 4x with transposed convolutions and each mask token's hypernetwork
  output is dotted with it to give that channel's mask logits.

Shapes use B = images, N = prompts, K = prompt tokens per prompt, C = ``dim``,
g = ``image_size // patch_size`` (feature grid side).

Parameter names: everything under ``image_encoder.`` is the image encoder (the
"decoder_encoder" trainable part); everything else is the decoder proper.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segllm.config import PromptHeadConfig
from segllm.decoders.base import (
    REF,
    SEG,
    DecoderOutput,
    MaskDecoder,
    MeanStdInput,
    check_decoder_inputs,
)
from segllm.decoders.convnet import ConvBackbone
from segllm.decoders.layers import MLP
from segllm.decoders.sam.config import SamDecoderConfig
from segllm.errors import ConfigError

__all__ = [
    "MLP",
    "Attention",
    "EncoderBlock",
    "ImageEncoder",
    "LayerNorm2d",
    "RandomFourierPositionEncoding",
    "SamFamilyDecoder",
    "SamMaskDecoder",
    "TwoWayBlock",
    "TwoWayTransformer",
    "build_sam_decoder",
]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dimension of a feature map: [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # F.layer_norm normalises the trailing dim; autocast runs it in float32 where needed.
        x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """[N, L, H * d] -> [N, H, L, d]."""
    n, length, width = x.shape
    return x.view(n, length, heads, width // heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """[N, H, L, d] -> [N, L, H * d]."""
    n, heads, length, d = x.shape
    return x.transpose(1, 2).reshape(n, length, heads * d)


class EncoderBlock(nn.Module):
    """Pre-norm ViT block with global self-attention: [B, L, E] -> [B, L, E]."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        attn = F.scaled_dot_product_attention(
            _split_heads(q, self.heads), _split_heads(k, self.heads), _split_heads(v, self.heads)
        )
        x = x + self.proj(_merge_heads(attn))
        return x + self.mlp(self.norm2(x))


class ImageEncoder(nn.Module):
    """A small ViT with SAM's neck: pixels [B, 3, S, S] -> features [B, out_dim, g, g].

    g = S // patch_size. The position embedding is learned per grid cell ([1, g * g, E]).
    """

    def __init__(
        self, image_size: int, patch_size: int, dim: int, depth: int, heads: int, out_dim: int
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.grid_size = image_size // patch_size
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size**2, dim))
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads) for _ in range(depth))
        self.neck = nn.Sequential(
            nn.Conv2d(dim, out_dim, kernel_size=1, bias=False),
            LayerNorm2d(out_dim),
            nn.Conv2d(out_dim, out_dim, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_dim),
        )

    def forward(self, pixels: Tensor) -> Tensor:
        size = self.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"pixels must be [B, 3, {size}, {size}], got {list(pixels.shape)}")
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype))  # [B, E, g, g]
        b, e, g, _ = x.shape
        x = x.flatten(2).transpose(1, 2) + self.pos_embed  # [B, g*g, E]
        for block in self.blocks:
            x = block(x)
        x = x.transpose(1, 2).reshape(b, e, g, g)
        return self.neck(x)


class RandomFourierPositionEncoding(nn.Module):
    """Dense positional encoding with random Fourier features (SAM's PositionEmbeddingRandom).

    A fixed Gaussian matrix ``gaussian`` [2, dim / 2] (a persistent buffer, so it is saved in
    the state dict) projects cell-centre coordinates in [-1, 1]; the encoding is the sin and cos
    of 2 pi times that projection. ``forward(g)`` -> [dim, g, g] (float32).
    """

    def __init__(self, dim: int, scale: float = 1.0) -> None:
        super().__init__()
        if dim % 2:
            raise ConfigError(f"positional encoding width must be even, got {dim}")
        self.register_buffer("gaussian", scale * torch.randn(2, dim // 2), persistent=True)

    def forward(self, grid_size: int) -> Tensor:
        gauss = self.gaussian.float()
        coords = (torch.arange(grid_size, device=gauss.device, dtype=torch.float32) + 0.5) / grid_size
        coords = 2 * coords - 1
        y = coords[:, None, None]  # [g, 1, 1]
        x = coords[None, :, None]  # [1, g, 1]
        # Element-wise rather than a matmul, so autocast cannot lower the precision.
        proj = 2 * math.pi * (x * gauss[0] + y * gauss[1])  # [g, g, dim/2]
        return torch.cat([proj.sin(), proj.cos()], dim=-1).permute(2, 0, 1)


class Attention(nn.Module):
    """Multi-head attention with optional width downsampling (SAM's decoder attention).

    q [N, Lq, C], k [N, Lk, C], v [N, Lk, C] -> [N, Lq, C]; attention runs at width
    C / downsample.
    """

    def __init__(self, dim: int, heads: int, downsample: int = 1) -> None:
        super().__init__()
        inner = dim // downsample
        if inner % heads:
            raise ConfigError(f"attention width {inner} (dim {dim} / {downsample}) is not divisible by {heads} heads")
        self.heads = heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q = _split_heads(self.q_proj(q), self.heads)
        k = _split_heads(self.k_proj(k), self.heads)
        v = _split_heads(self.v_proj(v), self.heads)
        return self.out_proj(_merge_heads(F.scaled_dot_product_attention(q, k, v)))


class TwoWayBlock(nn.Module):
    """One two-way layer: token self-attention, tokens->image, token MLP, image->tokens.

    Post-norm (a LayerNorm after each residual). The original tokens (``query_pe``) and the image
    positional encoding (``key_pe``) are added to queries and keys before every attention.

    Args of forward:
        queries: [N, T, C] tokens. keys: [N, HW, C] image. query_pe: [N, T, C]. key_pe: [N, HW, C].
    Returns:
        (queries [N, T, C], keys [N, HW, C]).
    """

    def __init__(self, dim: int, heads: int, mlp_dim: int, *, skip_first_pe: bool, downsample: int = 2) -> None:
        super().__init__()
        self.skip_first_pe = skip_first_pe
        self.self_attn = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_token_to_image = Attention(dim, heads, downsample)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, dim))
        self.norm3 = nn.LayerNorm(dim)
        self.cross_image_to_token = Attention(dim, heads, downsample)
        self.norm4 = nn.LayerNorm(dim)

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
        if self.skip_first_pe:
            # First layer: the queries *are* the original tokens, so adding them again is redundant.
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))

        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """``depth`` two-way blocks and a final token->image attention.

    forward(image [N, C, g, g], image_pe [N, C, g, g], tokens [N, T, C]) ->
    (tokens [N, T, C], image [N, g*g, C]).
    """

    def __init__(self, dim: int, depth: int, heads: int, mlp_dim: int, downsample: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayBlock(dim, heads, mlp_dim, skip_first_pe=(i == 0), downsample=downsample) for i in range(depth)
        )
        self.final_attn = Attention(dim, heads, downsample)
        self.norm_final = nn.LayerNorm(dim)

    def forward(self, image: Tensor, image_pe: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        keys = image.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        q, k = queries + tokens, keys + key_pe
        queries = self.norm_final(queries + self.final_attn(q, k, keys))
        return queries, keys


class SamFamilyDecoder(MaskDecoder):
    """What SAM-style decoders share: an ``image_encoder`` giving [B, dim, g, g] features,
    SAM's random-Fourier positional encoding ``pe`` of the g x g grid, masks at 4g x 4g, and the
    input checks. Subclasses set ``grid_size``, ``image_encoder`` and ``pe``."""

    grid_size: int
    image_encoder: nn.Module
    pe: RandomFourierPositionEncoding

    @property
    def output_size(self) -> int:
        return 4 * self.grid_size

    def encode_image(self, pixels: Tensor) -> Tensor:
        """[B, 3, S, S] preprocessed images -> features [B, dim, g, g]."""
        return self.image_encoder(pixels)

    def dense_pe(self, dtype: torch.dtype | None = None) -> Tensor:
        """Positional encoding of the feature grid (SAM's ``get_dense_pe``), [dim, g, g]."""
        pe = self.pe(self.grid_size)
        return pe if dtype is None else pe.to(dtype)

    def check_inputs(self, image_features: Tensor, prompts: Tensor, batch_index: Tensor) -> None:
        """ValueError naming what is off (see :func:`check_decoder_inputs`)."""
        check_decoder_inputs(image_features, prompts, batch_index, width=self.prompt_dim, grid=self.grid_size, tokens=self.num_prompt_tokens)


class SamMaskDecoder(MeanStdInput, SamFamilyDecoder):
    """SAM-style decoder: image + N prompts of K tokens -> [N, 2, 4g, 4g] mask logits, [N, 2] IoU.

    Args:
        config: sizes of the encoder and decoder.
        num_prompt_tokens: K, tokens per prompt.
        num_ref_tokens: how many of them (the first ones) are [REF]; the rest are [SEG].

    The prompt width ``prompt_dim`` is ``config.dim``. Parameters under ``image_encoder.`` form
    the image encoder; the rest is the decoder.
    """

    def __init__(self, config: SamDecoderConfig, *, num_prompt_tokens: int, num_ref_tokens: int) -> None:
        super().__init__()
        _check_config(config, num_prompt_tokens, num_ref_tokens)
        self.config = config
        self.image_size = config.image_size
        self.num_prompt_tokens = num_prompt_tokens
        self.num_ref_tokens = num_ref_tokens
        self.prompt_dim = config.dim
        self.grid_size = config.image_size // config.patch_size
        dim = config.dim

        if config.encoder == "conv":
            self.image_encoder = ConvBackbone(config.image_size, config.patch_size, config.encoder_dim, config.encoder_depth, dim)
        else:
            self.image_encoder = ImageEncoder(
                config.image_size, config.patch_size, config.encoder_dim, config.encoder_depth, config.encoder_heads, dim
            )
        self.pe = RandomFourierPositionEncoding(dim)
        self.iou_token = nn.Parameter(torch.zeros(1, dim))  # [1, C]
        self.mask_tokens = nn.Parameter(torch.zeros(2, dim))  # [2, C]: REF, SEG
        self.half_embed = nn.Parameter(torch.zeros(2, dim))  # [2, C]: added to REF / SEG prompts
        self.transformer = TwoWayTransformer(dim, config.depth, config.heads, config.mlp_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.hypernets = nn.ModuleList(MLP(dim, dim, dim // 8, 3) for _ in range(2))
        self.iou_head = MLP(dim, dim, 2, 3)
        self.box_head = MLP(dim, dim, 4, 3) if config.box_head else None

        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, LayerNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.bias is not None:
                nn.init.zeros_(m.bias)  # weights keep PyTorch's fan-in (Kaiming uniform) init
        if isinstance(self.image_encoder, ImageEncoder):
            nn.init.trunc_normal_(self.image_encoder.pos_embed, std=0.02)
        # Output tokens and half embeddings are unit-scale, like nn.Embedding (and SAM).
        nn.init.normal_(self.iou_token)
        nn.init.normal_(self.mask_tokens)
        # small, so that what tells prompts apart (the LLM's content) is not drowned by what they share
        nn.init.normal_(self.half_embed, std=0.02)

    # ----------------------------------------------------------------- decoding

    def forward(self, image_features: Tensor, prompts: Tensor, batch_index: Tensor) -> DecoderOutput:
        """Decode N prompts.

        Args:
            image_features: [B, dim, g, g] from :meth:`encode_image`.
            prompts: [N, K, dim] prompt tokens.
            batch_index: [N] integer, which image each prompt belongs to (in [0, B)).

        Returns:
            DecoderOutput with mask_logits [N, 2, 4g, 4g] and iou_scores [N, 2].

        Raises:
            ValueError: naming the mismatch if a shape, dtype or index is wrong.
        """
        self.check_inputs(image_features, prompts, batch_index)
        dtype = self.iou_token.dtype
        feats = image_features.to(dtype).index_select(0, batch_index.long())  # [N, C, g, g]
        prompts = prompts.to(dtype)
        n, k, c = prompts.shape
        r = self.num_ref_tokens

        half = torch.cat([self.half_embed[REF].expand(r, c), self.half_embed[SEG].expand(k - r, c)])  # [K, C]
        out_tokens = torch.cat([self.iou_token, self.mask_tokens])  # [3, C]
        tokens = torch.cat([out_tokens.expand(n, -1, -1), prompts + half], dim=1)  # [N, 3 + K, C]

        pe = self.dense_pe(dtype).expand(n, -1, -1, -1)  # [N, C, g, g]
        tokens_out, image_out = self.transformer(feats, pe, tokens)
        iou_out = tokens_out[:, 0]  # [N, C]
        mask_out = tokens_out[:, 1:3]  # [N, 2, C]

        g = self.grid_size
        image_out = image_out.transpose(1, 2).reshape(n, c, g, g)
        upscaled = self.output_upscaling(image_out)  # [N, C/8, 4g, 4g]
        hyper = torch.stack([net(mask_out[:, i]) for i, net in enumerate(self.hypernets)], dim=1)  # [N, 2, C/8]
        h, w = upscaled.shape[-2:]
        masks = (hyper @ upscaled.flatten(2)).view(n, 2, h, w)
        iou = self.iou_head(iou_out)  # [N, 2]
        boxes = None
        if self.box_head is not None:
            cxcywh = self.box_head(mask_out).sigmoid()  # [N, 2, 4] normalised to the square frame
            half = cxcywh[..., 2:] / 2
            boxes = torch.cat([cxcywh[..., :2] - half, cxcywh[..., :2] + half], dim=-1) * self.image_size
        return DecoderOutput(mask_logits=masks, iou_scores=iou, boxes=boxes)


def build_sam_decoder(config: SamDecoderConfig, prompt_head: PromptHeadConfig, *, load_weights: bool = True) -> SamMaskDecoder:
    """The decoder kind "sam" (see :mod:`segllm.decoders.registry`): random weights (there are no
    pretrained ones, so ``load_weights`` changes nothing); the prompts must be ``dim`` wide."""
    if prompt_head.dim != config.dim:
        raise ConfigError(f"prompt_head.dim ({prompt_head.dim}) must equal decoder.dim ({config.dim})")
    return SamMaskDecoder(config, num_prompt_tokens=prompt_head.num_tokens, num_ref_tokens=prompt_head.num_ref_tokens)


def _check_config(config: SamDecoderConfig, num_prompt_tokens: int, num_ref_tokens: int) -> None:
    if config.image_size % config.patch_size:
        raise ConfigError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
    if config.encoder == "conv" and config.patch_size not in (4, 8, 16):
        raise ConfigError(f"a conv encoder's patch_size (its stride) must be 4, 8 or 16, got {config.patch_size}")
    if config.encoder == "vit" and config.encoder_dim % config.encoder_heads:
        raise ConfigError(f"encoder_dim {config.encoder_dim} is not divisible by encoder_heads {config.encoder_heads}")
    if config.dim % 8:
        raise ConfigError(f"dim {config.dim} must be a multiple of 8 (the upscaled mask features have dim / 8 channels)")
    if (config.dim // 2) % config.heads:
        raise ConfigError(f"dim / 2 = {config.dim // 2} must be divisible by heads {config.heads} (cross-attention width)")
    if num_prompt_tokens < 1:
        raise ConfigError(f"num_prompt_tokens must be >= 1, got {num_prompt_tokens}")
    if not 0 <= num_ref_tokens <= num_prompt_tokens:
        raise ConfigError(f"num_ref_tokens must be in [0, {num_prompt_tokens}], got {num_ref_tokens}")
