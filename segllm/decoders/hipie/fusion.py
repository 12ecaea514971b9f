"""Bidirectional vision-language fusion (GLIP-style early fusion, HIPIE's ``VLFuse``).

Image tokens attend to the prompt tokens and the prompt tokens attend to the image tokens in
one shared attention map; both updates are scaled by learned per-channel factors
(``gamma_v``, ``gamma_l``) and added to the layer-normed inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BiAttentionBlock", "BiMultiHeadAttention", "VLFusion"]

_CLAMP = 50000.0  # the original clamps attention logits to +-5e4 (fp16 safety); kept for parity


class BiMultiHeadAttention(nn.Module):
    """One attention map used in both directions.

    Image queries against prompt keys give the image update; the transposed map (softmax over
    image tokens) gives the prompt update.

    ``reference = True`` computes it as the original does: every image token projected to the
    ``embed_dim``-wide query and value spaces and the image update projected back, three
    [S, v_dim] x [v_dim, embed_dim] products (about 68 GFLOP for S = 21,760 tokens at 1024 px).
    The default fast way reassociates the same products around the few prompt tokens: the
    prompt's keys are folded into the query weights, the prompt's values into the output weights,
    and the image values are taken after the attention sums; the costs then scale with S x T x
    heads instead of S x embed_dim (about 2 GFLOP). Same values up to float rounding.
    """

    reference: bool = False

    def __init__(self, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = dropout
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim**-0.5
        self.v_proj = nn.Linear(v_dim, embed_dim)
        self.l_proj = nn.Linear(l_dim, embed_dim)
        self.values_v_proj = nn.Linear(v_dim, embed_dim)
        self.values_l_proj = nn.Linear(l_dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, v_dim)
        self.out_l_proj = nn.Linear(embed_dim, l_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weights, zero biases."""
        for layer in (
            self.v_proj,
            self.l_proj,
            self.values_v_proj,
            self.values_l_proj,
            self.out_v_proj,
            self.out_l_proj,
        ):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _heads(self, x: Tensor) -> Tensor:
        """[B, T, E] -> [B, M, T, E/M]."""
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, v: Tensor, lang: Tensor, lang_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Cross-attend image and prompt tokens.

        Args:
            v: [B, S, v_dim] image tokens.
            lang: [B, T, l_dim] prompt tokens.
            lang_mask: [B, T] bool, True for valid prompt tokens (None = all valid).

        Returns:
            (delta_v [B, S, v_dim], delta_l [B, T, l_dim]).
        """
        if not self.reference:
            return self._forward_reassociated(v, lang, lang_mask)
        b, s, _ = v.shape
        t = lang.shape[1]
        query = self._heads(self.v_proj(v) * self.scale)  # [B, M, S, Dh]
        key = self._heads(self.l_proj(lang))  # [B, M, T, Dh]
        value_v = self._heads(self.values_v_proj(v))
        value_l = self._heads(self.values_l_proj(lang))

        logits = (query @ key.transpose(-1, -2)).clamp(-_CLAMP, _CLAMP)  # [B, M, S, T]
        logits_l = logits.transpose(-1, -2)  # [B, M, T, S]
        logits_l = (logits_l - logits_l.max(dim=-1, keepdim=True)[0]).clamp(-_CLAMP, _CLAMP)
        attn_l = logits_l.softmax(dim=-1)
        if lang_mask is not None:
            logits = logits.masked_fill(~lang_mask[:, None, None, :], -9e15)
        attn_v = F.dropout(logits.softmax(dim=-1), self.dropout, self.training)
        attn_l = F.dropout(attn_l, self.dropout, self.training)

        out_v = (attn_v @ value_l).transpose(1, 2).reshape(b, s, self.embed_dim)
        out_l = (attn_l @ value_v).transpose(1, 2).reshape(b, t, self.embed_dim)
        return self.out_v_proj(out_v), self.out_l_proj(out_l)

    def _forward_reassociated(self, v: Tensor, lang: Tensor, lang_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """:meth:`forward` with the products taken in the cheap order (see the class docstring)."""
        b, s, v_dim = v.shape
        t = lang.shape[1]
        m, dh = self.num_heads, self.head_dim
        key = self._heads(self.l_proj(lang))  # [B, M, T, Dh]
        value_l = self._heads(self.values_l_proj(lang))  # [B, M, T, Dh]
        w_query = self.v_proj.weight.view(m, dh, v_dim) * self.scale
        b_query = self.v_proj.bias.view(m, dh) * self.scale
        # logits[b, s, m, t] = <v[b, s] W_q,m^T + b_q,m, key[b, m, t]>, with the key folded in
        w_logits = torch.einsum("mdc,bmtd->bcmt", w_query, key).reshape(b, v_dim, m * t)
        b_logits = torch.einsum("md,bmtd->bmt", b_query, key).reshape(b, 1, m * t)
        logits = torch.baddbmm(b_logits, v, w_logits).view(b, s, m, t).clamp(-_CLAMP, _CLAMP)

        # softmax over image tokens (dim 1) for the prompt update, over prompt tokens for the image's
        logits_l = (logits - logits.max(dim=1, keepdim=True)[0]).clamp(-_CLAMP, _CLAMP)
        attn_l = F.dropout(logits_l.softmax(dim=1), self.dropout, self.training)
        if lang_mask is not None:
            logits = logits.masked_fill(~lang_mask[:, None, None, :], -9e15)
        attn_v = F.dropout(logits.softmax(dim=-1), self.dropout, self.training)

        # image update: the prompt's values pushed through out_v_proj first ([B, M*T, v_dim])
        w_out = self.out_v_proj.weight.view(v_dim, m, dh)
        value_out = torch.einsum("bmtd,cmd->bmtc", value_l, w_out).reshape(b, m * t, v_dim)
        delta_v = torch.baddbmm(self.out_v_proj.bias.view(1, 1, v_dim), attn_v.reshape(b, s, m * t), value_out)

        # prompt update: attention-weighted image tokens, then values_v_proj per head
        pooled = (attn_l.reshape(b, s, m * t).transpose(1, 2) @ v).view(b, m, t, v_dim)
        w_value = self.values_v_proj.weight.view(m, dh, v_dim)
        mass = attn_l.sum(1)  # [B, M, T]: 1 without dropout
        b_value = self.values_v_proj.bias.view(m, 1, dh)
        out_l = torch.einsum("bmtc,mdc->bmtd", pooled, w_value) + mass[..., None] * b_value
        out_l = out_l.transpose(1, 2).reshape(b, t, self.embed_dim)
        return delta_v, self.out_l_proj(out_l)


class BiAttentionBlock(nn.Module):
    """Pre-norm bidirectional attention with layer scale.

    ``v' = LN(v) + gamma_v * delta_v`` and ``l' = LN(l) + gamma_l * delta_l`` (the residual is
    taken on the normalised inputs, as in the original).
    """

    def __init__(
        self, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, init_gamma: float, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.gamma_v = nn.Parameter(torch.full((v_dim,), init_gamma))
        self.gamma_l = nn.Parameter(torch.full((l_dim,), init_gamma))
        self.layer_norm_v = nn.LayerNorm(v_dim)
        self.layer_norm_l = nn.LayerNorm(l_dim)
        self.attn = BiMultiHeadAttention(v_dim, l_dim, embed_dim, num_heads, dropout)

    def forward(self, v: Tensor, lang: Tensor, lang_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """[B, S, v_dim], [B, T, l_dim] -> updated (v, lang), same shapes."""
        v = self.layer_norm_v(v)
        lang = self.layer_norm_l(lang)
        delta_v, delta_l = self.attn(v, lang, lang_mask)
        return v + self.gamma_v * delta_v, lang + self.gamma_l * delta_l


class VLFusion(nn.Module):
    """The early-fusion layer placed before an encoder layer (holds ``b_attn``)."""

    def __init__(
        self, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, init_gamma: float, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.b_attn = BiAttentionBlock(v_dim, l_dim, embed_dim, num_heads, init_gamma, dropout)

    def forward(self, v: Tensor, lang: Tensor, lang_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """[B, S, v_dim], [B, T, l_dim] -> fused (v, lang)."""
        return self.b_attn(v, lang, lang_mask)
