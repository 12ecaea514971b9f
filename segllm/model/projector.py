"""The projector: vision width -> LLM width, shared by image patches and mask-memory tokens."""

from __future__ import annotations

from torch import nn

from segllm.config import ProjectorConfig


def build_projector(config: ProjectorConfig, in_dim: int, out_dim: int) -> nn.Module:
    """``linear``: one Linear; ``mlp2x_gelu``: Linear -> GELU -> Linear (LLaVA-1.5's, so released
    weights load under the same keys ``0.*`` and ``2.*``)."""
    if config.kind == "linear":
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
