"""Load a released SegLLM checkpoint folder (Hugging Face Marlo-Z/SegLLM layout) into a SegLLM.

A released folder is what the original ``LlavaLlamaForCausalLM.save_pretrained`` wrote:
``config.json`` (``model_type`` "llava", ``segmentator`` "hipie"), ``model.safetensors`` or
shards listed in ``model.safetensors.index.json``, and the tokenizer files. It becomes this
package's composed model: LLaMA LLM, CLIP vision tower, ``mlp2x_gelu`` projector, box encoder,
prompt head and the HIPIE-R50 decoder, configured to behave exactly as the original inference
code does (see SEGLLM_FACTS section 2): the Vicuna v1 template with ``<video>`` for every injected
feature, features added to the placeholder embeddings, mask and box features scaled by 0.5, the
mask crop cut in HIPIE's 1024 frame with the predicted box, boxes as (y0, x0, y1, x1) / 1024.

Every checkpoint key is either loaded or on :data:`IGNORED` with its reason; anything else is an
error naming the key. Saving the loaded model with ``save_pretrained`` gives a segllm checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoTokenizer

from segllm.config import (
    HipieDecoderConfig,
    LLMConfig,
    LossConfig,
    MemoryConfig,
    ProjectorConfig,
    PromptHeadConfig,
    SegLLMConfig,
    TemplateConfig,
    VisionConfig,
)
from segllm.decoders.hipie import HipieDecoder, load_released_hipie
from segllm.errors import CheckpointError
from segllm.hub import resolve_folder
from segllm.model.builder import build_segllm

__all__ = ["IGNORED", "VICUNA_V1", "is_released_checkpoint", "llama_config", "load_released", "released_config", "released_like_config"]

# key prefixes of a released checkpoint that are deliberately not loaded, with the reason
IGNORED: dict[str, str] = {
    "model.segmentator.hipie.text_encoder.": "HIPIE's BERT text encoder: SegLLM's prompt tokens replace its output, it never runs",
    "model.vision_tower.vision_tower.visual_projection.": "CLIP's contrastive projection: SegLLM reads hidden states, not the projected embedding",
}

# checkpoint prefix -> this package's module prefix
_RENAMES: tuple[tuple[str, str], ...] = (
    ("lm_head.", "llm.lm_head."),
    ("model.vision_tower.vision_tower.", "vision.model."),
    ("model.mm_projector.", "projector."),
    ("model.mask_enc_head.", "memory.box_head."),
    ("model.segmentator_predictor.", "prompt_head.mlp."),
    ("model.segmentator.hipie.", "decoder."),
    ("model.", "llm.model."),  # the LLaMA body: embed_tokens, layers, norm (last: the catch-all)
)

VICUNA_V1 = TemplateConfig(
    name="vicuna_v1",
    system=(
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
    image_prefix=" USER: ",
    image_suffix="",
    first_user_prefix=" ",
    user_prefix="USER: ",
    assistant_prefix=" ASSISTANT: ",
    round_separator="",
    image_token="<video>",
    mask_token="<video>",
    box_token="<video>",
    seg_token="<seg>",
    merge_text=True,
    fixed_answer="<seg>",
)

# Configs of vision towers that released checkpoints name by hub id. Their weights are inside
# the checkpoint, so only the architecture is needed: nothing is downloaded.
_KNOWN_VISION = {
    "openai/clip-vit-large-patch14": {
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    },
}

_LLAMA_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
    "attention_bias", "attention_dropout", "mlp_bias", "head_dim", "hidden_act", "pretraining_tp",
    "bos_token_id", "eos_token_id", "pad_token_id",
)


def is_released_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a folder whose config.json is a released SegLLM (llava + segmentator) config."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("model_type") == "llava" and "segmentator" in data


def released_config(path: str | Path, *, vision_tower: str | Path | None = None, shapes: dict[str, tuple] | None = None) -> SegLLMConfig:
    """This package's config for the released folder ``path``.

    Args:
        path: the released checkpoint folder (or a hub id, see :func:`segllm.hub.resolve_folder`).
        vision_tower: a CLIP folder (config.json) or a hub id naming one (only its JSON files are
            fetched) overriding the config's ``mm_vision_tower``; needed only when that names
            neither a folder nor a known hub id (the config's own id is never fetched).
        shapes: checkpoint key -> shape, to size the HIPIE decoder (default: read from the folder).
    """
    path = resolve_folder(path)
    data = json.loads((path / "config.json").read_text())
    if data.get("segmentator") != "hipie":
        raise CheckpointError(f"{path}/config.json: segmentator {data.get('segmentator')!r} is not supported (only 'hipie')")
    if data.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise CheckpointError(f"{path}/config.json: mm_projector_type {data.get('mm_projector_type')!r} is not supported")
    shapes = shapes if shapes is not None else _shapes(path)
    return released_like_config(
        _vision_config(path, data, vision_tower),
        llama_config(data),
        _hipie_config(shapes),
        use_box=bool(data.get("mm_use_bbox_encode", True)),
    )


def llama_config(data: dict[str, Any]) -> dict[str, Any]:
    """The LLaMA part of a LLaVA-style config.json, as a transformers config dict."""
    return {"model_type": "llama", **{k: data[k] for k in _LLAMA_KEYS if k in data}, "tie_word_embeddings": False}


def released_like_config(vision: VisionConfig, hf_llm: dict[str, Any], decoder: HipieDecoderConfig, *, use_box: bool = True) -> SegLLMConfig:
    """A SegLLM configured as the released model behaves (see the module docstring), with the
    given vision tower, LLaMA config and HIPIE size."""
    return SegLLMConfig(
        vision=vision,
        projector=ProjectorConfig(kind="mlp2x_gelu"),
        llm=LLMConfig(hf_config=hf_llm),
        memory=MemoryConfig(
            enabled=True,
            use_box=use_box,
            box_order="yxyx",
            box_norm=1024.0,
            feature_dropout=0.5,
            inference_scale=0.5,
            crop_frame="decoder",
            box_source="decoder",
        ),
        prompt_head=PromptHeadConfig(num_tokens=8, num_ref_tokens=4, dim=768, hidden_dim=int(hf_llm["hidden_size"]), norm=False),
        decoder=decoder,
        template=VICUNA_V1,
        inject="add",
        # the released recipe: vision tower, token embeddings and LM head stay frozen
        trainable=("llm", "projector", "memory", "prompt_head", "decoder_encoder", "decoder"),
        # the released losses: token cross-entropy + HIPIE's set-prediction losses on at most 2
        # <seg> per conversation (its segmentator's max_rounds) + 1e-3 * mean(prompt^2)
        loss=LossConfig(set_prediction=True, set_max_rounds=2, prompt_l2=1e-3),
    )


def load_released(
    path: str | Path,
    *,
    vision_tower: str | Path | None = None,
    gamma: str = "released",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
):
    """Read a released SegLLM checkpoint folder into a :class:`segllm.SegLLM` (eval mode).

    Args:
        path: the folder (config.json, safetensors weights, tokenizer files), or a hub id
            (``Marlo-Z/SegLLM/all_data_checkpoint``, see :func:`segllm.hub.resolve_folder`).
        vision_tower: see :func:`released_config`.
        gamma: HIPIE's fusion scales: "released" (what the original loader ends up using) or
            "stored" (the trained values in the checkpoint); see
            :func:`segllm.decoders.hipie.load_released_hipie`.
        device, dtype: where and in which precision to put the model (default: CPU, float32).

    Raises:
        CheckpointError: naming the file or key: not a released folder, a missing shard, an
            unknown key, a tensor of the wrong shape, a tokenizer without SegLLM's tokens.
    """
    path = resolve_folder(path)
    if not is_released_checkpoint(path):
        raise CheckpointError(f"{path} is not a released SegLLM checkpoint (no config.json with model_type 'llava' and a segmentator)")
    files = _weight_files(path)
    state = _read(files)
    config = released_config(path, vision_tower=vision_tower, shapes={k: tuple(v.shape) for k, v in state.items()})
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the tokenizer from {path}: {e}") from e
    vocab = tokenizer.get_vocab()
    missing_tokens = [t for t in ("<video>", "<seg>") if t not in vocab]
    if missing_tokens:
        raise CheckpointError(f"the tokenizer in {path} lacks SegLLM's added token(s) {missing_tokens}: wrong tokenizer files?")
    if len(tokenizer) != int(config.llm.hf_config["vocab_size"]):
        raise CheckpointError(
            f"the tokenizer in {path} has {len(tokenizer)} tokens but the model's vocabulary is {config.llm.hf_config['vocab_size']}"
        )
    # no random initialisation: every parameter is loaded below (the non-decoder ones checked
    # here, the decoder's strictly by load_released_hipie)
    model = build_segllm(config, tokenizer, load_weights=False, init_weights=False)

    hipie = {k: v for k, v in state.items() if k.startswith("model.segmentator.hipie.")}
    rules = [(p, None) for p in IGNORED] + [("model.segmentator.hipie.", None), *_RENAMES]
    ours = rename_keys(state, rules, path)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("decoder.")}
    missing = sorted(set(own) - set(ours))
    extra = sorted(set(ours) - set(own))
    if missing or extra:
        raise CheckpointError(f"{path}: missing weight(s) {missing[:5]}; unexpected weight(s) {extra[:5]}")
    for k, v in own.items():
        if tuple(ours[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{path}: weight {_original_key(k)} has shape {tuple(ours[k].shape)}, the model expects {tuple(v.shape)}")
    model.load_state_dict(ours, strict=False)
    load_released_hipie(model.decoder, hipie, gamma=gamma)
    model.eval()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


# -- helpers ---------------------------------------------------------------------------------


def rename_keys(state: dict[str, torch.Tensor], rules, path: Path) -> dict[str, torch.Tensor]:
    """Checkpoint keys -> this package's: the first rule ``(prefix, new prefix or None)`` whose
    prefix a key starts with renames it (None: the key is deliberately not loaded); a key no
    rule matches is an error naming it."""
    out, unknown = {}, []
    for key, value in state.items():
        for src, dst in rules:
            if key.startswith(src):
                if dst is not None:
                    out[dst + key[len(src):]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{path}: unexpected weight(s) {unknown[:5]} ({len(unknown)} in all)")
    return out


def _original_key(ours: str) -> str:
    for src, dst in _RENAMES:
        if ours.startswith(dst):
            return src + ours[len(dst):]
    return ours


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"cannot read {index}: {e}") from e
        files = [path / n for n in names]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"missing weight shard(s) listed in {index}: {absent}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    if any(path.glob("*.bin")):
        raise CheckpointError(f"{path} holds pickled .bin weights; convert them to safetensors (this package never unpickles weights)")
    raise CheckpointError(f"{path} has no model.safetensors nor model.safetensors.index.json")


def _read(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    state[k] = fh.get_tensor(k)  # stored dtype: load_state_dict casts into the model's
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read weights {f}: {e}") from e
    return state


def _shapes(path: Path) -> dict[str, tuple]:
    shapes = {}
    for f in _weight_files(path):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                shapes[k] = tuple(fh.get_slice(k).get_shape())
    return shapes


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def read_clip_folder(folder: Path) -> tuple[dict[str, Any], int, tuple, tuple] | None:
    """(vision config dict, input size, mean, std) of a local CLIP folder (a whole CLIP or its
    vision half, with an optional preprocessor_config.json); None when it has no config.json."""
    if not (folder / "config.json").is_file():
        return None
    hf = json.loads((folder / "config.json").read_text())
    hf = hf.get("vision_config", hf) if hf.get("model_type") == "clip" else hf
    image_size, mean, std = int(hf.get("image_size", 224)), CLIP_MEAN, CLIP_STD
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        p = json.loads(pre.read_text())
        crop = p.get("crop_size", image_size)
        image_size = int(crop.get("height", image_size) if isinstance(crop, dict) else crop)
        mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
    return hf, image_size, mean, std


def clip_vision_config(
    hf: dict[str, Any], image_size: int, mean: tuple, std: tuple, *, select_layer: int = -2, drop_cls: bool = True,
    pretrained_path: str | None = None,
) -> VisionConfig:
    """A CLIP vision tower read as the released model reads it: hidden states of ``select_layer``,
    the CLS token for a mask crop, transformers' CLIP preprocessing (centre crop)."""
    hf = {k: v for k, v in hf.items() if k not in ("model_type", "architectures", "torch_dtype", "transformers_version", "_name_or_path")}
    return VisionConfig(
        hf_config={"model_type": "clip_vision_model", **hf},
        pretrained_path=pretrained_path,
        select_layer=select_layer,
        drop_cls=drop_cls,
        pool="cls",
        image_size=image_size,
        resize="center_crop",
        resample="pil",
        mean=mean,
        std=std,
    )


def _vision_config(path: Path, data: dict[str, Any], override: str | Path | None) -> VisionConfig:
    name = override if override is not None else data.get("mm_vision_tower")
    if not name:
        raise CheckpointError(f"{path}/config.json names no mm_vision_tower; pass vision_tower=FOLDER")
    if override is not None and str(override) not in _KNOWN_VISION:
        # a folder or hub id the caller named (only its JSON files are needed: the weights are in
        # the checkpoint); a known id needs no fetch, and the config's own id is never fetched
        folder = resolve_folder(override, patterns=("*.json",), what="vision tower")
    else:
        folder = Path(name) if Path(name).is_absolute() else path / name
    found = read_clip_folder(folder)
    if found is None and str(name) in _KNOWN_VISION:
        found = dict(_KNOWN_VISION[str(name)]), 224, CLIP_MEAN, CLIP_STD
    if found is None:
        raise CheckpointError(
            f"{path}/config.json names the vision tower {str(name)!r}, which is neither a local folder nor a known "
            "hub id; pass vision_tower=FOLDER (a CLIP vision config folder)"
        )
    return clip_vision_config(
        *found,
        select_layer=int(data.get("mm_vision_select_layer", -2)),
        drop_cls=data.get("mm_vision_select_feature", "patch") == "patch",
    )


def _hipie_config(shapes: dict[str, tuple]) -> HipieDecoderConfig:
    """The HIPIE configuration (standard or reduced) whose parameter shapes the checkpoint has."""
    prefix = "model.segmentator.hipie."
    theirs = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix) and ".text_encoder." not in "." + k[len(prefix):]}
    if not theirs:
        raise CheckpointError("the checkpoint has no model.segmentator.hipie.* weights")
    for candidate in (HipieDecoderConfig(), HipieDecoderConfig.reduced()):
        with torch.device("meta"):
            own = {k: tuple(v.shape) for k, v in HipieDecoder(candidate).state_dict().items()}
        if own == theirs:
            return candidate
    raise CheckpointError("the checkpoint's HIPIE weights match neither the standard HIPIE-R50 nor the reduced test configuration")
