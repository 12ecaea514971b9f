"""Training recipes: typed config files (TOML) read strictly before anything starts."""

from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from segllm import presets
from segllm.checkpoint import load_config
from segllm.config import PART_NAMES, LoraConfig, LossConfig, SegLLMConfig, from_dict
from segllm.data.released.configs import read_annotation_config, read_conversation_config
from segllm.data.released.masks import DATASETS, EVAL_SUFFIX
from segllm.decoders.hipie import HipieDecoderConfig
from segllm.errors import ConfigError
from segllm.hub import resolve_folder

# experiment trackers that log_with may name -> the importable packages that provide one (any of them)
TRACKERS: dict[str, tuple[str, ...]] = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


@dataclass
class LlavaInit:
    """Start from a LLaVA-1.5 checkpoint folder, as the released recipes do (see
    :func:`segllm.model.llava.segllm_from_llava15`).

    Attributes:
        path: the LLaVA-1.5 folder (the original layout or transformers' llava-hf one), or a hub
            id (``liuhaotian/llava-v1.5-7b``, ``org/name/subfolder``, ``...@revision``) fetched
            into the hub cache (see :mod:`segllm.hub`).
        vision_tower: a CLIP ViT-L/14 folder (224 px, as released) or a hub id
            (``openai/clip-vit-large-patch14``).
        hipie_weights: HIPIE-R50's starting weights as a safetensors file (None: random).
        hipie: changes to the decoder's configuration (:class:`HipieDecoderConfig` fields, e.g.
            a smaller HIPIE for trials); empty: the released HIPIE-R50.
    """

    path: str | None = None
    vision_tower: str | None = None
    hipie_weights: str | None = None
    hipie: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelRecipe:
    """Which model to train.

    Attributes:
        preset: "tiny", "small", "grounded" or "direct" (see :mod:`segllm.presets`), used unless ``config``
            is set.
        config: path to a SegLLM config.json to use instead of a preset.
        memory: feed earlier masks back into the LLM (False: text-only history baseline).
        init: a checkpoint folder (or hub id, see :mod:`segllm.hub`) to start from instead of
            random weights.
        lora: LoRA adapters on the LLM (``lora.r`` > 0): then only the adapters of the LLM
            train; fold them in afterwards with ``segllm merge-lora``.
        llava: start from a LLaVA-1.5 folder (``llava.path``) instead of a preset.
        max_length: the longest conversation in tokens (0: the LLM's context); a longer one
            is an error naming its length, as at inference.
        loss: overrides of the model's loss weights (:class:`segllm.config.LossConfig` keys,
            e.g. ``{select_weight = 1.0}``), applied to a new model's config.
        decoder: overrides of the decoder's options (its config's keys, e.g. ``{ref_prior =
            true}``), for a new model or one started from ``init``; weights the change adds
            start from their initialisation, the rest come from the checkpoint.
        trainable: the parts that train (:data:`segllm.config.PART_NAMES`), in place of the
            model's own ``trainable`` (empty: the model's), e.g. ``["decoder", "prompt_head"]``
            to train the decoder alone on a frozen LLM and image encoders: each step then skips
            the frozen parts' weight gradients. Recorded in the checkpoints' config.
    """

    preset: Literal["tiny", "small", "grounded", "direct"] = "small"
    config: str | None = None
    memory: bool = True
    init: str | None = None
    lora: LoraConfig = field(default_factory=LoraConfig)
    llava: LlavaInit = field(default_factory=LlavaInit)
    max_length: int = 0
    loss: dict[str, Any] = field(default_factory=dict)
    decoder: dict[str, Any] = field(default_factory=dict)
    trainable: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.trainable = tuple(self.trainable)
        unknown = [p for p in self.trainable if p not in PART_NAMES]
        if unknown:
            raise ConfigError(f"model.trainable names unknown part(s) {unknown}; parts are {list(PART_NAMES)}")
        try:
            from_dict(LossConfig, self.loss)
        except ConfigError as e:
            raise ConfigError(f"model.loss: {e}") from e
        if self.llava.path and (self.init or self.config):
            raise ConfigError("model.llava.path cannot be combined with model.init or model.config")
        if self.llava.path and not self.llava.vision_tower:
            raise ConfigError("model.llava.path needs model.llava.vision_tower (a CLIP folder or hub id)")
        if self.llava.hipie:
            try:
                from_dict(HipieDecoderConfig, self.llava.hipie)
            except ConfigError as e:
                raise ConfigError(f"model.llava.hipie: {e}") from e


@dataclass
class TokenizerRecipe:
    """A byte-level BPE tokenizer trained on the training data's text, or an existing one."""

    vocab_size: int = 1024
    corpus_conversations: int = 3000
    path: str | None = None


@dataclass
class DataRecipe:
    """Where conversations come from.

    ``train``/``val``: "world" (the procedural world, generated on the fly, deterministic by
    index), a dataset folder (annotations.json + conversations.jsonl), or a released conversation
    JSON file (its images and masks under ``images`` and ``annotations``, the released layout's
    ``images_folder`` and ``annotations_folder``).
    ``mix``: several such sources for training instead of ``train``: as in the released recipes,
    each global batch draws one source uniformly, then samples from it with replacement.
    ``conversation_config``: the original's conversation config (YAML, as it ships in
    ``conversation_configs/train/``) instead of ``mix``: the files it lists, in the folder
    ``conversations`` (the original's ``--conversation_folder``), are the mix.
    ``annotation_config``: the original's annotation config (YAML, ``annotation_configs/``): where
    each dataset's masks are under ``annotations`` (``path``; ``path_eval`` for validation);
    ``annotation_paths`` overrides single datasets on top of it (``{lvis = "lvis/mine.json"}``;
    a name with ``_eval`` for validation's file). Unlisted datasets keep the released layout's files.
    ``start``: the training position a new run (not a resumed one) begins at. Every run reads its
    training set from position ``start`` on (then wraps around ``train_size``), so a stage that
    continues another's weights (``model.init``) with ``start`` = 0 reads the same conversations
    again; give it the earlier stages' conversation count to read fresh ones.
    """

    train: str = "world"
    val: str = "world"
    mix: tuple[str, ...] = ()
    conversation_config: str | None = None
    conversations: str | None = None
    images: str | None = None
    annotations: str | None = None
    annotation_config: str | None = None
    annotation_paths: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    train_size: int = 1_000_000
    val_size: int = 200
    max_rounds: int = 8
    world: dict[str, Any] = field(default_factory=dict)
    start: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.start, int) or self.start < 0:
            raise ConfigError(f"data.start must be an integer >= 0 (a training position), got {self.start!r}")
        if self.conversation_config and self.mix:
            raise ConfigError("data.conversation_config and data.mix both name the training mix: give one")
        if self.conversation_config and not self.conversations:
            raise ConfigError("data.conversation_config needs data.conversations, the folder its files are in "
                              "(the original's --conversation_folder, e.g. conversations_folder/all_data_mix_train)")
        for name in self.annotation_paths:
            if name.removesuffix(EVAL_SUFFIX) not in DATASETS:
                raise ConfigError(f"data.annotation_paths: unknown dataset {name!r} (known: {', '.join(DATASETS)}, or with '_eval')")

    def train_sources(self) -> tuple[str, ...]:
        """The training sources: the conversation config's files, ``mix``, or ``train`` alone.

        Raises:
            ConfigError: an unreadable conversation config (naming the file and the problem).
        """
        if self.conversation_config:
            names = read_conversation_config(self.conversation_config)
            return tuple(str(Path(self.conversations) / n) for n in names)
        return tuple(self.mix) or (self.train,)

    def annotation_overrides(self) -> dict[str, str]:
        """Dataset name -> annotation file or folder (relative to ``annotations``): the annotation
        config's entries, then ``annotation_paths`` over them."""
        listed = read_annotation_config(self.annotation_config) if self.annotation_config else {}
        return {**listed, **self.annotation_paths}


@dataclass
class OptimRecipe:
    """AdamW with a linear warm-up and a cosine decay to ``min_lr_ratio`` x ``lr``.

    ``warmup_ratio`` > 0 sets the warm-up as a share of the run's steps instead of
    ``warmup_steps`` (the released recipes warm up over 3%).
    ``clip_mode``: "global" clips the gradient norm of all parameters together; "per_part"
    clips each model part (``SegLLMConfig.trainable`` names) to ``grad_clip`` on its own, so a
    large language-model gradient early in training does not shrink the mask path's (issue 13:
    LM 12.9 vs mask 0.13 at the start shrank every mask gradient ~13-fold under global clipping).
    """

    lr: float = 5e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    clip_mode: Literal["global", "per_part"] = "global"

    def __post_init__(self) -> None:
        # a value out of range would only surface mid-run (a ZeroDivisionError, a NaN loss or a
        # schedule that never warms up): refuse it when the recipe is read, naming the key
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        for name in ("weight_decay", "warmup_steps", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("warmup_ratio", "min_lr_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"optim.{name} must be between 0 and 1, got {getattr(self, name)}")


@dataclass
class TrainRecipe:
    """A whole training run.

    Attributes:
        steps: optimizer steps.
        epochs: when > 0, the run's length in passes over the training data instead of
            ``steps``: steps = ceil(epochs x conversations / global batch), where a mix counts
            the conversations of all its sources (as the released recipes' epochs do).
        batch_size: conversations per process per micro-step.
        grad_accum: micro-steps per optimizer step.
        mixed_precision: "no", "bf16" or "fp16" (accelerate).
        gradient_checkpointing: recompute the LLM's layer activations in the backward pass
            instead of keeping them (less memory, about a third more compute), as released.
        parallel: with several processes, "ddp" (every process holds the whole model) or
            "fsdp" (parameters, gradients and optimizer state sharded across processes).
        log_every, eval_every, save_every: in optimizer steps (0 disables eval/save).
        eval_size: validation conversations per evaluation.
        output_dir: where checkpoints and logs go.
        threads: torch CPU threads per process (0: torch's default).
        workers: data-loader processes per training process that generate and preprocess the
            coming batches while the model trains (0: in the training process). Worth it on a
            GPU, where building batches would otherwise leave the GPU waiting.
        time_limit_s: a time budget (seconds of training, resumed runs included): training
            stops with a checkpoint once it is spent, and the cosine schedule runs on the
            elapsed share of it instead of on steps (``steps`` is then only an upper bound).
            0: off, the schedule runs on steps.
        keep_checkpoints: besides ``checkpoint-last``, keep a numbered copy
            ``checkpoint-<step>`` of each save, the newest ``keep_checkpoints`` of them (older
            ones are deleted); 0: none. ``--resume`` still reads ``checkpoint-last``.
        log_with: experiment trackers that also receive ``log.jsonl``'s entries and the
            validation cIoU, through accelerate: ``["tensorboard"]`` (event files under
            ``output_dir/trackers``), ``["wandb"]``, or both; each needs its package installed
            (``pip install 'segllm[tensorboard]'`` / ``'segllm[wandb]'``). Empty: ``log.jsonl`` only.
    """

    model: ModelRecipe = field(default_factory=ModelRecipe)
    tokenizer: TokenizerRecipe = field(default_factory=TokenizerRecipe)
    data: DataRecipe = field(default_factory=DataRecipe)
    optim: OptimRecipe = field(default_factory=OptimRecipe)
    steps: int = 5000
    epochs: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    parallel: Literal["ddp", "fsdp"] = "ddp"
    gradient_checkpointing: bool = False
    log_every: int = 10
    eval_every: int = 500
    save_every: int = 250
    eval_size: int = 200
    output_dir: str = "runs/default"
    threads: int = 0
    workers: int = 0
    time_limit_s: float = 0.0
    keep_checkpoints: int = 0
    log_with: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("workers", "time_limit_s", "epochs", "eval_every", "save_every", "eval_size", "threads", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        unknown = [t for t in self.log_with if t not in TRACKERS]
        if unknown:
            raise ConfigError(f"log_with: unknown tracker(s) {unknown}; choose from {sorted(TRACKERS)}")

    def resolved(self, conversations: int, processes: int) -> TrainRecipe:
        """This recipe with ``epochs`` and ``optim.warmup_ratio`` turned into step counts, for
        ``conversations`` training conversations and ``processes`` training processes."""
        r = copy.deepcopy(self)
        if r.epochs:
            global_batch = r.batch_size * processes * r.grad_accum
            r.steps = max(1, math.ceil(r.epochs * conversations / global_batch))
        if r.optim.warmup_ratio:
            r.optim.warmup_steps = max(1, round(r.optim.warmup_ratio * r.steps))
        return r

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainRecipe:
        return from_dict(cls, data)

    @classmethod
    def load(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainRecipe:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read recipe {path}: {e}") from e
        for key, value in (overrides or {}).items():
            _set(data, key, value)
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e

    def model_loss(self, loss: LossConfig) -> LossConfig:
        """``loss`` with the recipe's ``model.loss`` overrides applied."""
        return from_dict(LossConfig, {**dataclasses.asdict(loss), **self.model.loss})

    def model_config(self, vocab_size: int) -> SegLLMConfig:
        if self.model.config:
            cfg = SegLLMConfig.load(self.model.config)
        elif self.model.init:
            cfg = load_config(resolve_folder(self.model.init))
        else:
            cfg = presets.PRESETS[self.model.preset](vocab_size)
        cfg = copy.deepcopy(cfg)
        if self.model.decoder:
            try:
                cfg.decoder = from_dict(type(cfg.decoder), {**dataclasses.asdict(cfg.decoder), **self.model.decoder})
            except ConfigError as e:
                raise ConfigError(f"model.decoder: {e}") from e
        cfg.memory.enabled = self.model.memory
        cfg.loss = self.model_loss(cfg.loss)
        if self.model.lora.r:
            cfg.llm.lora = copy.deepcopy(self.model.lora)
        return cfg


def _set(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        data = data.setdefault(k, {})
    data[keys[-1]] = value
