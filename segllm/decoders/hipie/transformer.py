"""HIPIE's deformable vision-language transformer (DINO-style, two-stage, box refinement).

Shapes: B = prompts (each prompt is one "image" for the transformer), S = flattened tokens of
all feature levels (level-major, row-major), T = prompt tokens, Q = queries (background first,
then foreground), C = hidden width, L = feature levels.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segllm.decoders.hipie.common import MLP, FeatureResizer, inverse_sigmoid, sine_box_embedding
from segllm.decoders.hipie.config import HipieDecoderConfig
from segllm.decoders.hipie.deform_attn import MultiScaleDeformableAttention, ValueTable
from segllm.decoders.hipie.fusion import BiMultiHeadAttention, VLFusion
from segllm.linear import linear

__all__ = [
    "DecoderLayer",
    "DeformableDecoder",
    "DenoisingStates",
    "DeformableTransformer",
    "EncoderLayer",
    "FusionEncoder",
    "TransformerOutput",
    "encoder_reference_points",
    "encoder_proposals",
]


class EncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then an FFN (post-norm)."""

    def __init__(self, dim: int, ffn_dim: int, num_levels: int, num_heads: int, num_points: int) -> None:
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(dim, num_levels, num_heads, num_points)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, src: Tensor, pos: Tensor, reference: Tensor, spatial_shapes: list[tuple[int, int]]) -> Tensor:
        """src, pos: [B, S, C]; reference: [B or 1, S, L, 2] -> [B, S, C]."""
        if src.device.type == "cpu" and not torch.is_grad_enabled() and not self.self_attn.reference:
            return self._in_chunks(src, pos, reference, spatial_shapes)
        return self._after_attention(src, self.self_attn(src + pos, reference, src, spatial_shapes))

    def _after_attention(self, src: Tensor, attended: Tensor) -> Tensor:
        """The residual, norms and FFN of tokens ``src`` [B, n, C] given their attention output
        ``attended`` [B, n, C] (a fresh tensor: the sum goes into it). The sums into the fresh
        outputs and the ReLU applied as the first product is written (by oneDNN, or in place
        after ``F.linear``: :func:`segllm.linear.linear`): the same values without a further
        [B, n, C] or [B, n, ffn_dim] tensor each (about 0.1 s a layer at 21,760 tokens on a CPU)."""
        x = self.norm1(attended.add_(src))
        hidden = linear(x, self.linear1.weight, self.linear1.bias, relu=True)  # the ReLU fused where it can be
        return self.norm2(self.linear2(hidden).add_(x))

    # set by HipieDecoder.set_compiled: the compiled form of :meth:`chunk` (a FrozenCompiled)
    compiled_chunk = None

    def chunk(self, x: Tensor, pos: Tensor, reference: Tensor, table: ValueTable, spatial_shapes: list[tuple[int, int]]) -> Tensor:
        """The layer after its values are projected, for tokens ``x`` [B, n, C] (their position
        embeddings ``pos`` [B, n, C] and reference points [B, n, L, 2]) -> [B, n, C]."""
        return self._after_attention(x, self.self_attn.attend(x + pos, reference, table, spatial_shapes))

    def _in_chunks(self, src: Tensor, pos: Tensor, reference: Tensor, spatial_shapes: list[tuple[int, int]]) -> Tensor:
        """:meth:`forward` for CPU inference: the values projected once, then everything after
        them (sampling points, sampling, output projection, norms, FFN) :data:`CHUNK` tokens at
        a time.

        Why: at 1024 px every per-token intermediate covers 21,760 tokens (the FFN's hidden state
        178 MB, the sampler's coordinates and corner rows 11-89 MB each), so each step streams it
        through memory; a chunk's stay in cache. Measured at 2 threads: the FFN alone about
        200 ms against 240-315 ms a layer. The same arithmetic per token (matrix products may
        block, and so round, differently: ~5e-7)."""
        out = torch.empty_like(src)
        if self.compiled_chunk is not None:
            self._compiled_chunks(src, pos, reference, spatial_shapes, out)
            return out
        table = self.self_attn.value_table(src, spatial_shapes)
        for i in range(0, src.shape[1], CHUNK):
            out[:, i : i + CHUNK] = self.chunk(src[:, i : i + CHUNK], pos[:, i : i + CHUNK], reference[:, i : i + CHUNK], table, spatial_shapes)
        return out

    def _compiled_chunks(self, src: Tensor, pos: Tensor, reference: Tensor, spatial_shapes: list[tuple[int, int]], out: Tensor) -> None:
        """:meth:`_in_chunks` through the compiled :meth:`chunk`, into ``out`` [B, S, C]: one image
        (prompt) at a time and every chunk exactly :func:`compiled_chunk_size` tokens (the last one
        zero-padded, its padding dropped), so that the compiled code sees one shape and compiles
        once. (The value table compiled as well measured no faster: 1.84 against 1.94 s for the 6
        layers.)"""
        b, s, _ = src.shape
        size = compiled_chunk_size(s)
        for i in range(b):
            one = self.self_attn.value_table(src[i : i + 1], spatial_shapes)
            p = pos[i : i + 1] if pos.shape[0] > 1 else pos
            r = reference[i : i + 1] if reference.shape[0] > 1 else reference
            for j in range(0, s, size):
                n = min(size, s - j)
                x, pj, rj = src[i : i + 1, j : j + n], p[:, j : j + n], r[:, j : j + n]
                if n < size:  # zeros after the last token: finite through every step, then dropped
                    x, pj = F.pad(x, (0, 0, 0, size - n)), F.pad(pj, (0, 0, 0, size - n))
                    rj = F.pad(rj, (0, 0, 0, 0, 0, size - n))
                out[i : i + 1, j : j + n] = self.compiled_chunk(x, pj, rj, one, spatial_shapes)[:, :n]


# tokens per chunk of an encoder layer in CPU inference (see EncoderLayer._in_chunks)
CHUNK = 1024


def compiled_chunk_size(tokens: int) -> int:
    """Tokens per chunk of the compiled encoder layers for ``tokens`` in all: as many chunks as
    :data:`CHUNK`-token ones would need, of equal size rounded up to a multiple of 16, so that the
    zero padding of the last one is small. At 1024 px (21,760 tokens) 22 chunks of 992 tokens pad
    64 where chunks of 1,024 padded 768 (3.4% of the encoder's work spent on zeros)."""
    chunks = -(-tokens // CHUNK)  # ceiling divisions
    even = -(-tokens // chunks)
    return -(-even // 16) * 16


class DecoderLayer(nn.Module):
    """Query self-attention, deformable cross-attention to the memory, FFN (post-norm each)."""

    def __init__(self, dim: int, ffn_dim: int, num_levels: int, num_heads: int, num_points: int) -> None:
        super().__init__()
        self.cross_attn = MultiScaleDeformableAttention(dim, num_levels, num_heads, num_points)
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference: Tensor,
        memory: Tensor,
        spatial_shapes: list[tuple[int, int]],
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """tgt, query_pos: [B, Q, C]; reference: [B, Q, L, 4]; memory: [B, S, C] -> [B, Q, C].

        ``attn_mask``: optional [Q, Q] bool, True where query i may not attend to query j.
        """
        qk = tgt + query_pos
        tgt = self.norm2(tgt + self.self_attn(qk, qk, tgt, attn_mask=attn_mask, need_weights=False)[0])
        tgt = self.norm1(tgt + self.cross_attn(tgt + query_pos, reference, memory, spatial_shapes))
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


def encoder_reference_points(spatial_shapes: list[tuple[int, int]], device: torch.device) -> Tensor:
    """Pixel centres of every level, normalised: -> [1, S, 2] as (x, y) in (0, 1)."""
    points = []
    for h, w in spatial_shapes:
        ys = torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device) / h
        xs = torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device) / w
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), -1))
    return torch.cat(points, 0)[None]


def encoder_proposals(spatial_shapes: list[tuple[int, int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """One proposal box per encoder token, in logit space.

    A token at (x, y) of level l proposes the box centred on its pixel with side 0.05 * 2^l.

    Returns:
        proposals: [1, S, 4] logit(cx, cy, w, h); ``inf`` where the box is not strictly inside
            (0.01, 0.99).
        valid: [1, S, 1] bool, whether the proposal is usable.
    """
    boxes = []
    for level, (h, w) in enumerate(spatial_shapes):
        ys = torch.linspace(0, h - 1, h, dtype=torch.float32, device=device)
        xs = torch.linspace(0, w - 1, w, dtype=torch.float32, device=device)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        scale = torch.tensor([w, h], dtype=torch.float32, device=device)
        centres = (torch.stack((grid_x, grid_y), -1) + 0.5) / scale
        sizes = torch.ones_like(centres) * 0.05 * (2.0**level)
        boxes.append(torch.cat((centres, sizes), -1).view(-1, 4))
    proposals = torch.cat(boxes, 0)[None]
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals)).masked_fill(~valid, float("inf"))
    return proposals, valid


class FusionEncoder(nn.Module):
    """Encoder layers, the first ``num_vl_layers`` of them preceded by a VL fusion layer."""

    def __init__(self, config: HipieDecoderConfig) -> None:
        super().__init__()
        c = config
        self.vl_layers = nn.ModuleList(
            VLFusion(c.hidden_dim, c.lang_dim, c.vl_hidden_dim, c.num_heads, c.vl_gamma_init, c.vl_dropout)
            for _ in range(c.num_vl_layers)
        )
        self.layers = nn.ModuleList(
            EncoderLayer(c.hidden_dim, c.dim_feedforward, c.num_levels, c.num_heads, c.enc_points)
            for _ in range(c.enc_layers)
        )

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        lang: Tensor,
        spatial_shapes: list[tuple[int, int]],
        lang_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Fuse and encode.

        Args:
            src, pos: [B, S, C] tokens and their position (+ level) embeddings.
            lang: [B, T, D] prompt tokens.
            spatial_shapes: (H_l, W_l) per level.
            lang_mask: [B, T] bool, valid prompt tokens (None = all).

        Returns:
            (memory [B, S, C], fused prompt tokens [B, T, D]).
        """
        num_levels = len(spatial_shapes)
        reference = encoder_reference_points(spatial_shapes, src.device).to(src.dtype)
        reference = reference[:, :, None].expand(-1, -1, num_levels, -1)
        for i, layer in enumerate(self.layers):
            if i < len(self.vl_layers):
                src, lang = self.vl_layers[i](src, lang, lang_mask)
            src = layer(src, pos, reference, spatial_shapes)
        return src, lang


class DeformableDecoder(nn.Module):
    """Decoder layers with per-layer box refinement ("look forward twice").

    ``bbox_embed`` and ``class_embed`` are the detector's prediction heads, attached by
    :class:`~segllm.decoders.hipie.decoder.DeformableDetr` (one per decoder layer plus one for
    the encoder proposals, the last entry).
    """

    bbox_embed: nn.ModuleList
    class_embed: nn.ModuleList

    def __init__(self, config: HipieDecoderConfig) -> None:
        super().__init__()
        c = config
        self.layers = nn.ModuleList(
            DecoderLayer(c.hidden_dim, c.dim_feedforward, c.num_levels, c.num_heads, c.dec_points)
            for _ in range(c.dec_layers)
        )
        self.ref_point_head = MLP(2 * c.hidden_dim, c.hidden_dim, c.hidden_dim, 2)
        self.num_levels = c.num_levels

    def forward(
        self,
        tgt: Tensor,
        reference: Tensor,
        memory: Tensor,
        spatial_shapes: list[tuple[int, int]],
        attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Refine queries and boxes layer by layer.

        Args:
            tgt: [B, Q, C] initial query content.
            reference: [B, Q, 4] initial boxes (cx, cy, w, h), normalised.
            memory: [B, S, C] encoder output.
            attn_mask: optional [Q, Q] bool self-attention mask (True = blocked).

        Returns:
            hs: [num_layers, B, Q, C] query states after each layer.
            references: [num_layers, B, Q, 4] boxes predicted by each layer (sigmoid space).
        """
        hs, refs = [], []
        output = tgt
        for lid, layer in enumerate(self.layers):
            reference_input = reference[:, :, None].expand(-1, -1, self.num_levels, -1)
            query_pos = self.ref_point_head(sine_box_embedding(reference))
            output = layer(output, query_pos, reference_input, memory, spatial_shapes, attn_mask)
            new_reference = (self.bbox_embed[lid](output) + inverse_sigmoid(reference)).sigmoid()
            hs.append(output)
            refs.append(new_reference)
            reference = new_reference.detach()
        return torch.stack(hs), torch.stack(refs)


@dataclass
class DenoisingStates:
    """Decoder results of P denoising queries (training only; HIPIE's DINO-style "GT" queries).

    Attributes:
        hs: [D, B, P, C] states after each decoder layer.
        init_reference: [B, P, 4] the noised boxes fed to the first layer (cx, cy, w, h).
        references: [D, B, P, 4] boxes after each layer.
    """

    hs: Tensor
    init_reference: Tensor
    references: Tensor


@dataclass
class TransformerOutput:
    """Everything the transformer computes for B prompts.

    Attributes:
        hs: [D, B, Q, C] decoder states per layer (D decoder layers).
        init_reference: [B, Q, 4] the boxes fed to the first decoder layer (background query
            boxes are raw learned values, foreground ones are the selected proposals).
        references: [D, B, Q, 4] boxes after each decoder layer.
        memory: [B, S, C] encoder output.
        lang: [B, T, D_lang] prompt tokens after the fusion layers.
        enc_class: [B, S, 1] proposal objectness logits.
        enc_coord_unact: [B, S, 4] proposal boxes in logit space.
        topk_indices: [B, num_queries] selected proposal tokens.
        denoising: the denoising queries' results when some were given (they are not part of
            ``hs``/``references``, which hold the matching queries only).
    """

    hs: Tensor
    init_reference: Tensor
    references: Tensor
    memory: Tensor
    lang: Tensor
    enc_class: Tensor
    enc_coord_unact: Tensor
    topk_indices: Tensor
    denoising: DenoisingStates | None = None

    @staticmethod
    def cat(parts: list[TransformerOutput]) -> TransformerOutput:
        """The outputs of several calls (without denoising queries) as one, prompts in order."""
        if any(p.denoising is not None for p in parts):
            raise ValueError("TransformerOutput.cat joins outputs without denoising queries only")
        per_layer = ("hs", "references")  # [D, B, ...]: prompts along dimension 1
        return TransformerOutput(**{f.name: torch.cat([getattr(p, f.name) for p in parts], 1 if f.name in per_layer else 0)
                                    for f in fields(TransformerOutput) if f.name != "denoising"})


class DeformableTransformer(nn.Module):
    """Fusion encoder, two-stage query selection and the refining decoder."""

    def __init__(self, config: HipieDecoderConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.level_embed = nn.Parameter(torch.empty(c.num_levels, c.hidden_dim))
        self.encoder = FusionEncoder(c)
        self.decoder = DeformableDecoder(c)
        self.tgt_embed = nn.Embedding(c.num_queries, c.hidden_dim)
        self.tgt_embed_bg = nn.Embedding(c.num_bg_queries, c.hidden_dim)
        self.bg_query_refs = nn.Embedding(c.num_bg_queries, 4)
        self.enc_output = nn.Linear(c.hidden_dim, c.hidden_dim)
        self.enc_output_norm = nn.LayerNorm(c.hidden_dim)
        # Present in the released checkpoint; its output only enters as "+ 0 * x" upstream.
        self.resizer = FeatureResizer(c.lang_dim, c.hidden_dim)
        self._reset_parameters()

    def _reference(self) -> bool:
        """Whether the decoder computes as the original (``HipieDecoder.set_reference``)."""
        return self.encoder.layers[0].self_attn.reference

    def _reset_parameters(self) -> None:
        """Deformable DETR's init: xavier for every matrix, then the attention modules' own."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention | BiMultiHeadAttention):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(
        self,
        srcs: list[Tensor],
        pos: list[Tensor],
        lang: Tensor,
        lang_mask: Tensor | None = None,
        denoising: tuple[Tensor, Tensor] | None = None,
    ) -> TransformerOutput:
        """Run the transformer for B prompts.

        Args:
            srcs: per level [B, C, H_l, W_l] projected image features (one row per prompt).
            pos: per level [1 or B, C, H_l, W_l] sine position encodings.
            lang: [B, T, D_lang] prompt tokens.
            lang_mask: [B, T] bool, valid tokens (None = all valid).
            denoising: training only: (content [B, P, C], boxes [B, P, 4] (cx, cy, w, h)
                normalised) of P denoising queries, placed before the matching queries.
        """
        b = srcs[0].shape[0]
        if b > 1 and denoising is None and not torch.is_grad_enabled() and srcs[0].device.type == "cpu" and not self._reference():
            # CPU inference in the fast mode: one prompt at a time. Each prompt's tokens are
            # its own (the fusion is early), so batching shares no work, and a 1024 px image's
            # [B, 21,760, 256] tensors pass glibc's 32 MiB mmap threshold from B = 2 on, so that
            # every one of them is faulted in afresh (two prompts' decoder stage 0.40 s against
            # 2 x 0.12 s for one)
            return TransformerOutput.cat([
                self(srcs=[x[i : i + 1] for x in srcs], pos=pos if pos[0].shape[0] == 1 else [p[i : i + 1] for p in pos],
                     lang=lang[i : i + 1], lang_mask=None if lang_mask is None else lang_mask[i : i + 1])
                for i in range(b)])
        spatial_shapes = [(s.shape[-2], s.shape[-1]) for s in srcs]
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos_flat = torch.cat(
            [
                (p.flatten(2).transpose(1, 2) + self.level_embed[i].view(1, 1, -1)).expand(b, -1, -1)
                for i, p in enumerate(pos)
            ],
            1,
        )
        memory, lang = self.encoder(src_flat, pos_flat, lang, spatial_shapes, lang_mask)

        # Two-stage: score every encoder token as a box proposal, keep the top num_queries.
        proposals, valid = encoder_proposals(spatial_shapes, memory.device)
        proposals = proposals.to(memory.dtype)
        out_memory = self.enc_output_norm(self.enc_output(memory.masked_fill(~valid, 0.0)))
        num_layers = len(self.decoder.layers)
        enc_class = self.decoder.class_embed[num_layers](out_memory)
        enc_coord_unact = self.decoder.bbox_embed[num_layers](out_memory) + proposals
        topk_indices = torch.topk(enc_class[..., 0], self.config.num_queries, dim=1)[1]
        topk_coords = torch.gather(enc_coord_unact, 1, topk_indices[..., None].expand(-1, -1, 4))
        reference = torch.cat([self.bg_query_refs.weight[None].expand(b, -1, -1), topk_coords.sigmoid()], 1)
        tgt = torch.cat([self.tgt_embed_bg.weight, self.tgt_embed.weight], 0)[None].expand(b, -1, -1)

        num_dn, attn_mask = 0, None
        if denoising is not None:
            dn_content, dn_boxes = denoising
            num_dn = dn_content.shape[1]
            tgt = torch.cat([dn_content.to(tgt.dtype), tgt], 1)
            reference = torch.cat([dn_boxes.to(reference.dtype), reference], 1)
            # The denoising queries carry (noised) ground-truth boxes: the matching queries must
            # not see them, so that they behave as at inference. With HIPIE's single denoising
            # group the denoising queries themselves see every query.
            attn_mask = torch.zeros(tgt.shape[1], tgt.shape[1], dtype=torch.bool, device=tgt.device)
            attn_mask[num_dn:, :num_dn] = True

        hs, references = self.decoder(tgt, reference, memory, spatial_shapes, attn_mask)
        dn_states = None
        if denoising is not None:
            dn_states = DenoisingStates(hs[:, :, :num_dn], reference[:, :num_dn], references[:, :, :num_dn])
        return TransformerOutput(
            hs=hs[:, :, num_dn:],
            init_reference=reference[:, num_dn:],
            references=references[:, :, num_dn:],
            memory=memory,
            lang=lang,
            enc_class=enc_class,
            enc_coord_unact=enc_coord_unact,
            topk_indices=topk_indices,
            denoising=dn_states,
        )
