"""The prompt head: an LLM hidden state at a ``<seg>`` -> K prompt tokens for the mask decoder."""

from __future__ import annotations

from torch import Tensor, nn

from segllm.config import PromptHeadConfig


class PromptHead(nn.Module):
    """Linear -> GELU -> Linear, reshaped to ``num_tokens`` tokens of width ``dim``.

    The first ``num_ref_tokens`` tokens are [REF] (they describe the referenced earlier mask),
    the rest [SEG] (the target).
    """

    def __init__(self, config: PromptHeadConfig, in_dim: int) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_dim or in_dim
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, config.num_tokens * config.dim))
        self.norm = nn.LayerNorm(config.dim) if config.norm else nn.Identity()

    def forward(self, hidden: Tensor) -> Tensor:
        """[N, D_llm] -> [N, num_tokens, dim]."""
        return self.norm(self.mlp(hidden).view(hidden.shape[0], self.config.num_tokens, self.config.dim))
