"""Mask decoders by kind: each kind names its config dataclass and the function that builds it.

A decoder config is a dataclass whose ``kind`` field (a string with a default) is its tag:
``SegLLMConfig.decoder`` is read as the registered class that ``decoder.kind`` names, and
:func:`segllm.model.builder.build_decoder` calls that kind's build function. The four built-in
kinds ("sam", "litemedsam", "hipie", "direct") are registered here, so they need no import by the user.

Adding a decoder::

    @dataclass
    class MyDecoderConfig:
        kind: Literal["mine"] = "mine"
        dim: int = 256

    def build_mine(config: MyDecoderConfig, prompt_head: PromptHeadConfig, *, load_weights: bool) -> MaskDecoder:
        ...

    register_decoder("mine", MyDecoderConfig, build_mine)

This module imports only the decoders' config modules (dataclasses, no torch): a built-in's
build function is named by ``"module:function"`` and imported when a model is built.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from segllm.decoders.direct.config import DirectDecoderConfig
from segllm.decoders.hipie.config import HipieDecoderConfig
from segllm.decoders.litemedsam.config import LiteMedSamDecoderConfig
from segllm.decoders.sam.config import SamDecoderConfig
from segllm.errors import ConfigError

if TYPE_CHECKING:  # annotations only: segllm.config imports this module
    from segllm.config import PromptHeadConfig
    from segllm.decoders.base import MaskDecoder

__all__ = ["DEFAULT_KIND", "DecoderConfig", "DecoderKind", "decoder_kind", "decoder_kinds", "register_decoder"]

DEFAULT_KIND = "sam"  # a config.json whose decoder has no "kind" (written before HIPIE existed)

BuildFn = Callable[..., "MaskDecoder"]


class DecoderConfig(Protocol):
    """Any registered decoder's config: a dataclass tagged by its ``kind``."""

    kind: str


@dataclass(frozen=True)
class DecoderKind:
    """One registered decoder.

    Attributes:
        kind: the tag (``decoder.kind`` in config.json).
        config_cls: the config dataclass; its ``kind`` field defaults to ``kind``.
        build: ``build(config, prompt_head, *, load_weights) -> MaskDecoder``: a decoder for
            ``config`` whose prompts are ``prompt_head`` (a :class:`segllm.config.PromptHeadConfig`),
            raising :class:`~segllm.errors.ConfigError` where they do not fit; ``load_weights``
            False means a checkpoint loader will fill every weight (read no pretrained file).
            Or ``"module:function"``, imported on first use.
    """

    kind: str
    config_cls: type
    build: BuildFn | str

    def builder(self) -> BuildFn:
        """The build function (importing it if it was registered by name)."""
        if callable(self.build):
            return self.build
        module, _, name = self.build.partition(":")
        return getattr(importlib.import_module(module), name)

    def build_decoder(self, config: Any, prompt_head: PromptHeadConfig, *, load_weights: bool = True) -> MaskDecoder:
        return self.builder()(config, prompt_head, load_weights=load_weights)


_KINDS: dict[str, DecoderKind] = {}


def register_decoder(kind: str, config_cls: type, build: BuildFn | str, *, replace: bool = False) -> DecoderKind:
    """Make the decoder ``kind`` available to configs and the model builder.

    Args:
        kind: the tag; must equal the default of ``config_cls``'s ``kind`` field.
        config_cls: a dataclass with a ``kind: str`` field (read strictly by
            :func:`segllm.config.from_dict`, like every config).
        build: see :class:`DecoderKind`.
        replace: allow re-registering an existing kind (otherwise an error).

    Raises:
        ConfigError: ``config_cls`` is not such a dataclass, or ``kind`` is taken.
    """
    if not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
        raise ConfigError(f"decoder {kind!r}: config_cls must be a dataclass, got {config_cls!r}")
    tag = {f.name: f.default for f in dataclasses.fields(config_cls)}.get("kind")
    if tag != kind:
        raise ConfigError(f"decoder {kind!r}: {config_cls.__name__}.kind must default to {kind!r}, got {tag!r}")
    if kind in _KINDS and not replace and _KINDS[kind].config_cls is not config_cls:
        raise ConfigError(f"decoder kind {kind!r} is already registered (by {_KINDS[kind].config_cls.__name__})")
    entry = DecoderKind(kind, config_cls, build)
    _KINDS[kind] = entry
    return entry


def decoder_kind(kind: str) -> DecoderKind:
    """The registered decoder ``kind``; a :class:`ConfigError` naming the known kinds otherwise."""
    try:
        return _KINDS[kind]
    except (KeyError, TypeError):
        raise ConfigError(f"{kind!r} is not one of {decoder_kinds()}") from None


def decoder_kinds() -> list[str]:
    """The registered kinds, built-ins first."""
    return list(_KINDS)


register_decoder("sam", SamDecoderConfig, "segllm.decoders.sam.decoder:build_sam_decoder")
register_decoder("litemedsam", LiteMedSamDecoderConfig, "segllm.decoders.litemedsam.decoder:build_litemedsam_decoder")
register_decoder("hipie", HipieDecoderConfig, "segllm.decoders.hipie.decoder:build_hipie_decoder")
register_decoder("direct", DirectDecoderConfig, "segllm.decoders.direct.decoder:build_direct_decoder")
