"""The prompt head: an LLM hidden state at a ``<seg>`` -> K prompt tokens for the mask decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segllm.config import PromptHeadConfig
from segllm.errors import ConfigError


class PromptHead(nn.Module):
    """Linear -> GELU -> Linear, reshaped to ``num_tokens`` tokens of width ``dim``.

    The first ``num_ref_tokens`` tokens are [REF] (they describe the referenced earlier mask),
    the rest [SEG] (the target).

    With ``config.attend_round``, the state before ``<seg>`` first attends (multi-head, its own
    projections) over the LLM states of its round's tokens, and what it reads is added to it.
    Why: a from-scratch LLM's attention starts near uniform over the whole conversation (the
    image tokens included), so the few words that name the object reach the ``<seg>`` state
    diluted; reading the round's ~15-30 tokens directly gives the mask decoder the question's
    words from the first step (issue 13's diagnosis: the slow part is linking words to the image).
    """

    def __init__(self, config: PromptHeadConfig, in_dim: int) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_dim or in_dim
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, config.num_tokens * config.dim))
        self.norm = nn.LayerNorm(config.dim) if config.norm else nn.Identity()
        if config.attend_round:
            if in_dim % config.attend_heads:
                raise ConfigError(f"prompt_head.attend_heads ({config.attend_heads}) must divide the LLM width ({in_dim})")
            self.ctx_norm = nn.LayerNorm(in_dim)
            self.q = nn.Linear(in_dim, in_dim)
            self.kv = nn.Linear(in_dim, 2 * in_dim)
            self.out = nn.Linear(in_dim, in_dim)

    def forward(self, hidden: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        """[N, D_llm] -> [N, num_tokens, dim].

        Args:
            hidden: the LLM states that predicted each ``<seg>``.
            context: [N, T, D_llm] the LLM states of each ``<seg>``'s round up to it (needed with
                ``attend_round``); ``context_mask``: [N, T] bool, True where a state is real.
        """
        if self.config.attend_round:
            if context is None:
                raise ValueError("this prompt head attends over its round's tokens (prompt_head.attend_round): pass context")
            hidden = hidden + self._read(hidden, context, context_mask)
        return self.norm(self.mlp(hidden).view(hidden.shape[0], self.config.num_tokens, self.config.dim))

    def _read(self, hidden: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        n, t, d = context.shape
        h = self.config.attend_heads
        q = self.q(self.ctx_norm(hidden)).view(n, h, 1, d // h)
        k, v = self.kv(self.ctx_norm(context)).view(n, t, 2, h, d // h).permute(2, 0, 3, 1, 4)  # 2 x [N, h, T, d/h]
        bias = None if mask is None else torch.zeros(n, 1, 1, t, dtype=q.dtype, device=q.device).masked_fill(~mask[:, None, None, :], float("-inf"))
        read = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [N, h, 1, d/h]
        return self.out(read.reshape(n, d))
