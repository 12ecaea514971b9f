"""Typed, nested configuration of a SegLLM model, saved as config.json inside every checkpoint.

Every part of the model has its own dataclass; :class:`SegLLMConfig` nests them. Configs are
read back strictly: an unknown key or a value of the wrong type is an error naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

# the built-in decoders' configs live beside their decoders; re-exported here for old imports
from segllm.decoders.hipie.config import HipieDecoderConfig  # noqa: F401
from segllm.decoders.litemedsam.config import LiteMedSamDecoderConfig  # noqa: F401
from segllm.decoders.registry import DEFAULT_KIND, DecoderConfig, decoder_kind
from segllm.decoders.sam.config import SamDecoderConfig
from segllm.errors import ConfigError

CONFIG_FORMAT = "segllm/1"


@dataclass
class VisionConfig:
    """The vision tower: any transformers vision model, built from ``hf_config``.

    Attributes:
        hf_config: a transformers config as a dict (``model_type`` picks the class, e.g.
            "clip_vision_model", "siglip_vision_model", "dinov2").
        pretrained_path: a folder with pretrained weights, or a hub id naming one (fetched
            into the hub cache, see :mod:`segllm.hub`), read only when a model is *built* (a
            SegLLM checkpoint stores the tower's weights itself).
        select_layer: which hidden state to use (-2 = the second to last, as LLaVA does).
        drop_cls: drop the first token (CLS) from the patch tokens.
        pool: how one token summarises an image (for mask memory): "cls" (first token of
            ``select_layer``) or "mean" (mean of the patch tokens, for towers without CLS).
        image_size: side of the square input, pixels.
        resize: "squash" (resize to a square), "center_crop" (shortest side then crop, CLIP's
            processor) or "pad" (longest side then pad bottom/right).
        mean, std: normalisation on [0, 1] pixel values.
        resample: "torch" (bicubic with antialiasing on float pixels, the default) or "pil"
            (transformers' CLIPImageProcessor: PIL bicubic on uint8 pixels, the short side
            scaled with the long side truncated, as the released SegLLM preprocesses; only with
            ``resize`` "center_crop").
    """

    hf_config: dict[str, Any] = field(default_factory=dict)
    pretrained_path: str | None = None
    select_layer: int = -2
    drop_cls: bool = True
    pool: Literal["cls", "mean"] = "cls"
    image_size: int = 224
    resize: Literal["squash", "center_crop", "pad"] = "squash"
    resample: Literal["torch", "pil"] = "torch"
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ProjectorConfig:
    """Vision width -> LLM width. "mlp2x_gelu" is LLaVA-1.5's Linear-GELU-Linear."""

    kind: Literal["linear", "mlp2x_gelu"] = "mlp2x_gelu"


@dataclass
class LoraConfig:
    """LoRA adapters on the LLM's linear layers (peft); ``r`` 0 means none.

    With adapters, the "llm" trainable part means the adapters only (the LLM's own weights stay
    frozen); ``segllm merge-lora`` folds them into plain weights afterwards.

    Attributes:
        r: adapter rank.
        alpha: scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the adapter's input during training.
        targets: names of the linear layers that get adapters (LLaMA/Qwen names by default).
    """

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LLMConfig:
    """The language model: any transformers causal LM, built from ``hf_config``.

    ``pretrained_path`` is a folder (or a hub id, see :mod:`segllm.hub`) read only when a model
    is built.
    """

    hf_config: dict[str, Any] = field(default_factory=dict)
    pretrained_path: str | None = None
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class MemoryConfig:
    """How earlier masks come back into the LLM input (SegLLM's mask-aware memory).

    Attributes:
        enabled: when False, earlier rounds are kept as text only (the LISA/GLaMM baseline):
            referenced masks get no placeholders.
        use_box: also encode each referenced mask's box (one more token).
        box_order: "xyxy" or "yxyx" (the released model feeds (y0, x0, y1, x1)).
        box_norm: boxes are divided by this many pixels of the frame the mask lives in; 0 means
            by the image's longest side.
        feature_dropout: training-time probability of dropping a mask/box feature (the released
            recipe keeps each with probability 0.5, unscaled).
        inference_scale: multiply mask/box features by this at inference (released: 0.5).
        crop_frame: where the masked crop is cut: "image" (the original image and mask) or
            "decoder" (the image resized and padded into the mask decoder's square frame, as
            the released model does).
        box_source: "mask" (the mask's tight box) or "decoder" (the box the mask decoder
            predicted with the mask, truncated to whole pixels and at least 2 pixels wide, as
            released; falls back to the mask's box where no predicted box is known, e.g. for
            ground-truth masks).
    """

    enabled: bool = True
    use_box: bool = True
    box_order: Literal["xyxy", "yxyx"] = "xyxy"
    box_norm: float = 0.0
    feature_dropout: float = 0.0
    inference_scale: float = 1.0
    crop_frame: Literal["image", "decoder"] = "image"
    box_source: Literal["mask", "decoder"] = "mask"


@dataclass
class PromptHeadConfig:
    """LLM hidden state at a ``<seg>`` -> ``num_tokens`` prompt tokens of width ``dim``.

    The first ``num_ref_tokens`` are [REF] (the referenced mask), the rest [SEG] (the target).
    ``hidden_dim`` 0 means the LLM's width. ``norm`` puts a LayerNorm on each prompt token, so
    prompts arrive at the decoder at unit scale (the released head has none). ``attend_round``:
    the state also reads (``attend_heads`` heads) the LLM states of its round's tokens up to the
    ``<seg>`` (see :class:`segllm.model.prompt_head.PromptHead`).
    """

    num_tokens: int = 8
    num_ref_tokens: int = 4
    dim: int = 256
    hidden_dim: int = 0
    norm: bool = False
    attend_round: bool = False
    attend_heads: int = 4


@dataclass
class TemplateConfig:
    """How a conversation is rendered into tokens.

    A rendered conversation is ``bos + system + image_prefix + image placeholders +
    image_suffix`` then, per round, ``round_separator + user_prefix + [mask, box placeholders
    per reference] + question + assistant_prefix + answer + eos``. Only ``answer + eos`` carry
    labels. ``first_user_prefix`` (when not None) replaces ``user_prefix`` in round 1, for
    templates that open the first user turn before the image (Vicuna v1: "USER: <image> ...").

    ``merge_text``: tokenize each maximal run of text between placeholder/special tokens in one
    call, the way a whole rendered string is tokenized (needed to reproduce a model trained on
    whole-string tokenization, such as the released SegLLM); runs after the first are tokenized
    as mid-string text (no SentencePiece prefix space). When False every piece is tokenized on
    its own (the bundled model's rendering).
    ``fixed_answer``: when set, the model never generates text; every round's answer is this
    (the released SegLLM answers ``"<seg>"`` and is not trained to write text).
    """

    name: str = "segllm"
    system: str = ""
    image_prefix: str = ""
    image_suffix: str = "\n"
    user_prefix: str = "USER: "
    assistant_prefix: str = " ASSISTANT: "
    round_separator: str = ""
    image_token: str = "<image>"
    mask_token: str = "<mask>"
    box_token: str = "<box>"
    seg_token: str = "<seg>"
    max_length: int = 0  # 0 = the LLM's max_position_embeddings
    first_user_prefix: str | None = None
    merge_text: bool = False
    fixed_answer: str | None = None


@dataclass
class LossConfig:
    """Weights of the training loss terms.

    ``set_prediction`` (HIPIE decoder only) replaces the mask terms above by HIPIE's own
    set-prediction losses, as the released model was trained (see
    :mod:`segllm.decoders.hipie.criterion`): queries matched to the [REF] and [SEG] targets
    (``set_matcher``), then token focal loss ``set_class``, box L1 ``set_l1`` and GIoU
    ``set_giou``, mask focal ``set_mask`` and Dice ``set_dice`` on every decoder layer, the
    denoising queries (``set_denoising``) and the two-stage proposals (no mask terms there),
    and the IoU branch ``set_box_iou``. ``set_max_rounds`` > 0 decodes and supervises only that
    many randomly chosen ``<seg>`` per conversation (the release: 2). ``prompt_l2`` adds that
    times the mean square of the decoded prompt tokens (the release: 1e-3).

    ``own_ref_prob`` (a decoder that reads the referenced mask, ``ref_prior``): in training, that
    share of the ``<seg>`` whose referenced mask an earlier ``<seg>`` of the same conversation
    answered get, as the decoder's referenced-mask input, the model's own prediction of that mask
    (a gradient-free decoding of the same step, with the ground truth's history) instead of the
    ground truth. At inference a round reads the model's own earlier masks, wrong ones included;
    this teaches the decoder to meet them in training. The LLM's memory tokens keep the ground
    truth's masks, and so does a reference to a pick round (its later targets assume the
    recorded pick). 0: off (every run before it).
    """

    lm: float = 1.0
    mask: Literal["bce", "focal"] = "bce"
    mask_weight: float = 1.0
    dice_weight: float = 2.0  # objects are small: Dice keeps the masks from collapsing to background
    ref_weight: float = 0.5
    iou_weight: float = 1.0
    box_weight: float = 0.0  # L1 + GIoU on the decoder's boxes (needs decoder.box_head)
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    set_prediction: bool = False
    set_class: float = 2.0
    set_l1: float = 5.0
    set_giou: float = 2.0
    set_mask: float = 5.0
    set_dice: float = 5.0
    set_box_iou: float = 1.0
    set_matcher: Literal["ota", "hungarian"] = "ota"
    set_denoising: bool = True
    set_max_rounds: int = 0
    prompt_l2: float = 0.0
    dense_weight: float = 1.0  # the dense attribute heads' loss (only with SegLLMConfig.dense.groups)
    select_weight: float = 0.0  # the selection loss (conversations with candidates; see SegLLM.forward)
    own_ref_prob: float = 0.0  # share of referenced masks replaced by the model's own prediction in training

    def __post_init__(self) -> None:
        if not 0.0 <= self.own_ref_prob <= 1.0:
            raise ConfigError(f"loss.own_ref_prob must lie in [0, 1], got {self.own_ref_prob}")


DENSE_FEATURES = ("vision", "decoder", "target")  # what DenseConfig.on may name
_MAX_DENSE_CLASSES = 2**15  # class ids 0 .. 32,767 in int16


@dataclass
class DenseConfig:
    """Dense auxiliary supervision of image features (training only; see
    :mod:`segllm.model.dense_head`).

    Attributes:
        groups: label groups and their class counts (class 0 is background), e.g. the world's
            ``{"colour": 10, "category": 25, "texture": 5, "size": 4}``; empty: off (no heads).
            Training conversations must carry these maps (``Conversation.dense``).
        on: the features supervised: "vision" (the vision tower's patch tokens), "decoder"
            (the mask decoder's image features) and "target" (each ``<seg>``'s prompt, the mean
            of its [SEG] tokens, learns the classes of the object it asks for: the most common
            class under its target mask, per group).
    """

    groups: dict[str, int] = field(default_factory=dict)
    on: tuple[str, ...] = ("vision", "decoder")

    def __post_init__(self) -> None:
        bad = [o for o in self.on if o not in DENSE_FEATURES]
        if bad:
            raise ConfigError(f"dense.on names unknown feature(s) {bad}; known: {list(DENSE_FEATURES)}")
        for name, n in self.groups.items():
            if not isinstance(n, int) or n < 2:
                raise ConfigError(f"dense.groups[{name!r}] must be a class count >= 2, got {n!r}")
            if n > _MAX_DENSE_CLASSES:  # batches carry the class maps as int16 (segllm/batch.py)
                raise ConfigError(f"dense.groups[{name!r}] has {n} classes; at most {_MAX_DENSE_CLASSES} fit the int16 class maps")


PART_NAMES = ("vision", "projector", "llm", "embeddings", "memory", "prompt_head", "decoder_encoder", "decoder", "dense_head")


# SegLLMConfig.mask_region's values: what of each <seg>'s mask inference keeps
MaskRegion = Literal["all", "most_confident"]
MASK_REGIONS: tuple[str, ...] = typing.get_args(MaskRegion)

# Names the command line offers as choices, kept here (no torch import) so that building the
# parser, ``segllm --help`` and the data commands start without loading torch.
DTYPE_NAMES = ("float32", "float16", "bfloat16")  # --dtype: torch dtypes of these names
# the longest answer a model writes in a round, in tokens, wherever it generates (chat, sessions,
# evaluation's own protocol, batch segmentation, the demo): one figure, since an evaluation that
# allowed fewer cut the world's longest answers short (four targets: up to 26 tokens; session 43)
MAX_NEW_TOKENS = 32
QuantizeMode = Literal["8bit", "4bit"]
QUANTIZE_MODES: tuple[str, ...] = typing.get_args(QuantizeMode)  # weight-only LLM quantization
# `segllm bench --released-shape --setting`: a dtype for the whole model, or bfloat16 with an
# LLM quantization mode
RELEASED_SHAPE_SETTINGS: tuple[str, ...] = ("bfloat16", "float32", *QUANTIZE_MODES)


@dataclass
class EdgeFilterConfig:
    """Inference only: each ``<seg>``'s mask probabilities filtered along the image's colours
    (:func:`segllm.decoders.edge_filter.colour_guided_filter`: ``iterations`` passes of a joint
    bilateral filter within ``radius`` pixels, spatial scale ``sigma_space`` pixels, colour
    scale ``sigma_colour`` in RGB [0, 1], in the box around the mask grown by ``margin``
    pixels), after ``mask_region``, so that a mask a pixel or two off its object's edge settles
    onto it. ``iterations = 0`` (the default) leaves masks as the decoder made them."""

    iterations: int = 0
    radius: int = 4
    sigma_space: float = 3.5
    sigma_colour: float = 0.015
    margin: int = 6

    def __post_init__(self) -> None:
        if self.iterations < 0 or self.radius < 1 or self.margin < 0:
            raise ConfigError(f"edge_filter needs iterations >= 0, radius >= 1 and margin >= 0, got {self.iterations}, {self.radius}, {self.margin}")
        if not (self.sigma_space > 0 and self.sigma_colour > 0):
            raise ConfigError(f"edge_filter's sigma_space and sigma_colour must be > 0, got {self.sigma_space}, {self.sigma_colour}")

    @property
    def on(self) -> bool:
        return self.iterations > 0


@dataclass
class SegLLMConfig:
    """The whole model. ``trainable`` names the parts that receive gradients.

    Parts: vision, projector, llm (transformer blocks), embeddings (token embeddings and LM
    head), memory (box encoder), prompt_head, decoder_encoder (the mask decoder's image
    encoder), decoder (the rest of the mask decoder) and dense_head (the training-only dense
    attribute classifiers, when ``dense.groups`` is set).

    ``inject``: "replace" puts a feature in place of its placeholder's embedding; "add" adds
    it to the embedding (the released model does this).

    ``mask_region`` (inference only): "all" keeps every pixel of a ``<seg>``'s mask above the
    threshold; "most_confident" keeps only its 8-connected region with the most probability
    mass, for a model whose every ``<seg>`` denotes one connected object (the bundled model on
    the procedural world: where it is unsure between two objects it marks both, and the region
    it believes more is the better answer; :func:`segllm.decoders.base.most_confident_region`).

    ``edge_filter`` (inference only): see :class:`EdgeFilterConfig` (off by default).
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    prompt_head: PromptHeadConfig = field(default_factory=PromptHeadConfig)
    decoder: DecoderConfig = field(default_factory=SamDecoderConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    dense: DenseConfig = field(default_factory=DenseConfig)
    trainable: tuple[str, ...] = ("projector", "llm", "embeddings", "memory", "prompt_head", "decoder_encoder", "decoder", "dense_head")
    inject: Literal["replace", "add"] = "replace"
    mask_region: MaskRegion = "all"
    edge_filter: EdgeFilterConfig = field(default_factory=EdgeFilterConfig)

    def __post_init__(self) -> None:
        unknown = [p for p in self.trainable if p not in PART_NAMES]
        if unknown:
            raise ConfigError(f"trainable names unknown part(s) {unknown}; parts are {list(PART_NAMES)}")
        if not 0 <= self.prompt_head.num_ref_tokens < self.prompt_head.num_tokens:
            raise ConfigError("prompt_head.num_ref_tokens must be in [0, num_tokens)")

    def to_dict(self) -> dict[str, Any]:
        return {"format": CONFIG_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SegLLMConfig:
        data = dict(data)
        fmt = data.pop("format", CONFIG_FORMAT)
        if fmt != CONFIG_FORMAT:
            raise ConfigError(f"config format {fmt!r} is not {CONFIG_FORMAT!r}")
        return from_dict(cls, data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SegLLMConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        return cls.from_dict(data)


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, checking every key and type.

    Raises:
        ConfigError: naming the dotted key that is unknown or has the wrong type.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {_join(where, unknown[0])!r} (known: {sorted(names)})")
    kwargs = {k: _convert(hints[k], v, _join(where, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from e


def _kind(cls: type) -> str | None:
    """The default of a dataclass's ``kind`` field (its tag in a tagged union), if it has one."""
    for f in dataclasses.fields(cls):
        if f.name == "kind" and isinstance(f.default, str):
            return f.default
    return None


def _decoder_config(value: Any, where: str) -> Any:
    """A decoder config: ``kind`` picks the registered class (see :mod:`segllm.decoders.registry`)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    kind = value.get("kind", DEFAULT_KIND)
    try:
        cls = decoder_kind(kind).config_cls
    except ConfigError as e:
        raise ConfigError(f"{where}.kind: {e}") from None
    return from_dict(cls, value, where)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is DecoderConfig:
        return _decoder_config(value, where)
    if origin in (Union, types.UnionType):
        kinds = {_kind(a): a for a in args if dataclasses.is_dataclass(a) and _kind(a)}
        if kinds and isinstance(value, dict):
            # a tagged union: "kind" picks the class (the first one when absent), so errors name the key
            kind = value.get("kind", next(iter(kinds)))
            if kind not in kinds:
                raise ConfigError(f"{where}.kind: {kind!r} is not one of {list(kinds)}")
            return from_dict(kinds[kind], value, where)
        for arg in args:
            try:
                return _convert(arg, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} matches none of {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
