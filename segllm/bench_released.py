"""``segllm bench --released-shape``: the released SegLLM's architecture at full size, random
weights, one conversation timed part by part.

The released model is a LLaMA-7B (LLaVA-1.5 shape: width 4096, 32 layers, 32 heads, FFN 11008),
the CLIP ViT-L/14 vision tower at 224 px (256 image tokens) and the HIPIE-R50 mask decoder,
configured as :func:`segllm.model.released.released_like_config` configures a loaded released
checkpoint. Nothing is downloaded: the model is built on the meta device (no memory, no
initialisation) and its parameters are then filled in the target dtype from one block of
normal random numbers (a 7B float32 copy, 27 GB, would not fit a 24 GB machine, and drawing 7B
normal numbers takes minutes; speed and memory do not depend on the values). Buffers (rotary
frequencies, normalisation statistics) are built as usual.

Each setting (bfloat16; bfloat16 with 8-bit or 4-bit LLM layers through
:func:`segllm.model.quantize.quantize_llm`) runs in its own process, so its peak memory is its
own. The conversation goes through :class:`segllm.session.Session` as a user's would: the image
(CLIP tokens, HIPIE image features, the prompt's key/value cache), then rounds answered
``"<seg>"`` (teacher-forced, one mask a round, so the work per round does not depend on what a
random model would write), each round after the first referring to the latest earlier round
whose mask can be referred to (not empty), so the mask memory (crop, CLIP, box) runs.

Per part, wall time: the LLM over the prefix (system prompt and image tokens) and over each
round's tokens (incremental, on the cache), CLIP on the image, HIPIE's image encoding, the mask
memory (crop + CLIP on the crop + projector + box encoder) and HIPIE's prompt-dependent decoding.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import resource
import time
import zlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from segllm.config import RELEASED_SHAPE_SETTINGS, HipieDecoderConfig
from segllm.conversation import load_image
from segllm.default import DEFAULT_MODEL, EXAMPLES
from segllm.errors import ConfigError
from segllm.eval.metrics import mask_scores
from segllm.linear import is_plain_linear
from segllm.model.builder import build_segllm
from segllm.model.quantize import QUANTIZE_MODES, llm_weight_bytes, quantize_llm
from segllm.model.released import _KNOWN_VISION, CLIP_MEAN, CLIP_STD, clip_vision_config, released_like_config
from segllm.model.segllm import SegLLM
from segllm.session import Session
from segllm.tokenizer import add_segllm_tokens

__all__ = [
    "SETTINGS", "BuildInfo", "OpenTiming", "ReleasedBenchResult", "ReleasedShape", "RoundTiming",
    "build_released_shape", "mask_agreement", "run_released", "released_table",
]

# setting name -> (dtype, LLM quantization)
SETTINGS: dict[str, tuple[torch.dtype, str | None]] = {
    name: (torch.bfloat16, name) if name in QUANTIZE_MODES else (getattr(torch, name), None) for name in RELEASED_SHAPE_SETTINGS}

QUESTIONS = (
    "Segment the person on the left.",
    "Segment the bag this person is carrying.",
    "Segment the table next to it.",
    "Segment the cup on this table.",
    "Segment the chair closest to it.",
    "Segment the plant behind it.",
)

POOL_SIZE = (1 << 24) + 4099  # random values every parameter is filled from (odd size: rows do not line up)


@dataclass(frozen=True)
class ReleasedShape:
    """Sizes of the released architecture (defaults: the released SegLLM's).

    Attributes:
        llm_width, llm_layers, llm_heads, llm_ffn: the LLaMA's hidden size, layers, attention
            heads and MLP width (LLaVA-1.5-7B: 4096, 32, 32, 11008).
        context: the LLaMA's context length in tokens.
        vision: the CLIP vision config (transformers' keys; default ViT-L/14, 24 layers of 1024).
        vision_size: CLIP's input side in pixels (224: 16 x 16 = 256 image tokens of patch 14).
        hipie: the mask decoder's config (default the full HIPIE-R50 at 1024 px).
    """

    llm_width: int = 4096
    llm_layers: int = 32
    llm_heads: int = 32
    llm_ffn: int = 11008
    context: int = 4096
    vision: dict = field(default_factory=lambda: {k: v for k, v in _KNOWN_VISION["openai/clip-vit-large-patch14"].items() if k != "model_type"})
    vision_size: int = 224
    hipie: HipieDecoderConfig = field(default_factory=HipieDecoderConfig)

    @classmethod
    def tiny(cls) -> ReleasedShape:
        """The same module tree at toy size, for tests (a conversation takes seconds on a CPU):
        LLaMA 64 wide, 2 layers; CLIP 32 wide, 2 layers at 56 px (16 tokens); the reduced HIPIE of
        the golden fixture at 128 px."""
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 56,
                  "patch_size": 14, "projection_dim": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
        hipie = dataclasses.replace(HipieDecoderConfig.reduced(), image_size=128)
        return cls(llm_width=64, llm_layers=2, llm_heads=4, llm_ffn=172, context=1024, vision=vision, vision_size=56, hipie=hipie)

    def with_llm(self, *, width: int | None = None, layers: int | None = None) -> ReleasedShape:
        """This shape with another LLM width (heads and FFN scaled with it) or depth."""
        out = self
        if width is not None and width != self.llm_width:
            if width % self.llm_heads:
                raise ConfigError(f"the LLM width {width} must be a multiple of its {self.llm_heads} heads")
            out = dataclasses.replace(out, llm_width=width, llm_ffn=max(1, round(self.llm_ffn * width / self.llm_width)))
        if layers is not None:
            if layers < 1:
                raise ConfigError(f"the LLM needs at least one layer, got {layers}")
            out = dataclasses.replace(out, llm_layers=layers)
        return out

    def summary(self) -> dict:
        """The shape as plain JSON data."""
        return {"llm_width": self.llm_width, "llm_layers": self.llm_layers, "llm_heads": self.llm_heads, "llm_ffn": self.llm_ffn,
                "context": self.context, "vision_width": self.vision["hidden_size"], "vision_layers": self.vision["num_hidden_layers"],
                "vision_size": self.vision_size, "hipie_image_size": self.hipie.image_size, "hipie_enc_layers": self.hipie.enc_layers,
                "hipie_dec_layers": self.hipie.dec_layers, "hipie_hidden_dim": self.hipie.hidden_dim}


# -- building ----------------------------------------------------------------------------------


def build_released_shape(
    shape: ReleasedShape, tokenizer: PreTrainedTokenizerBase, *, dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu", quantize: str | None = None, seed: int = 0,
) -> SegLLM:
    """The released architecture of ``shape`` with random weights, in ``dtype`` on ``device``
    (eval mode, no gradients); with ``quantize`` ("8bit", "4bit") its LLM layers through
    :func:`segllm.model.quantize.quantize_llm`.

    Built on the meta device, then every parameter is allocated once, directly in ``dtype``, and
    filled from a pool of normal random numbers (``seed``) at an offset given by its name:
    matrices with standard deviation 1/sqrt(fan in), normalisation weights 1, biases 0, other
    vectors 0.02. The same seed and shape give the same weights in any process and setting. With
    ``quantize`` the LLM's linear weights are made one layer at a time as they are quantized, so
    the float LLM is never in memory whole (loading a checkpoint with ``quantize`` does hold it).
    """
    cfg = released_like_config(
        clip_vision_config(dict(shape.vision), shape.vision_size, CLIP_MEAN, CLIP_STD),
        {"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": shape.llm_width, "intermediate_size": shape.llm_ffn,
         "num_hidden_layers": shape.llm_layers, "num_attention_heads": shape.llm_heads, "num_key_value_heads": shape.llm_heads,
         "max_position_embeddings": shape.context, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
        dataclasses.replace(shape.hipie),
    )
    add_segllm_tokens(tokenizer, cfg.template)
    cfg.llm.hf_config["vocab_size"] = len(tokenizer)  # so that nothing is resized on the meta device
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers real (computed as usual)
        model = build_segllm(cfg, tokenizer, load_weights=False)
    device = torch.device(device)
    filler = _Filler(seed, dtype, device)
    decoder = model.llm.get_decoder()
    prefix = next(n for n, m in model.named_modules() if m is decoder) + "."
    later = {id(m.weight) for m in decoder.modules() if is_plain_linear(m)} if quantize else set()
    filler.materialise(model, skip=later)
    for module in model.modules():  # the buffers, as model.to(device, dtype) would move them
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = b.to(device=device, dtype=dtype if b.is_floating_point() else b.dtype)
    if quantize:
        quantize_llm(model, quantize, weights=lambda name, lin: filler.make(prefix + name + ".weight", lin.weight))
    return model.eval()


class _Filler:
    """Random parameters from one pool of normal numbers: each parameter reads the pool from an
    offset given by its name (so the order in which parameters are made does not matter)."""

    def __init__(self, seed: int, dtype: torch.dtype, device: torch.device) -> None:
        self.seed, self.dtype, self.device = seed, dtype, device
        gen = torch.Generator().manual_seed(seed)
        self.pool = torch.empty(POOL_SIZE, dtype=torch.float32).normal_(generator=gen).to(device=device, dtype=dtype)

    @torch.no_grad()
    def make(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """A new tensor of ``like``'s shape for the parameter called ``name`` (its last part tells
        a bias or a normalisation weight)."""
        t = torch.empty(like.shape, dtype=self.dtype, device=self.device)
        leaf = name.rpartition(".")[2]
        if like.dim() >= 2:
            self._fill(t, name, 1.0 / max(1, like[0].numel()) ** 0.5)
        elif leaf == "bias":
            t.zero_()
        elif leaf == "weight":  # a normalisation layer's scale
            t.fill_(1.0)
        else:
            self._fill(t, name, 0.02)
        return t

    def materialise(self, model: nn.Module, *, skip: set[int] = frozenset()) -> None:
        """Allocate and fill every meta parameter of ``model`` but those whose id is in ``skip``."""
        done: dict[int, nn.Parameter] = {}
        for mod_name, module in model.named_modules():
            for name, p in list(module._parameters.items()):
                if p is None or not p.is_meta or id(p) in skip:
                    continue
                if id(p) not in done:  # a parameter shared by two modules stays shared
                    done[id(p)] = nn.Parameter(self.make(f"{mod_name}.{name}", p), requires_grad=False)
                module._parameters[name] = done[id(p)]

    def _fill(self, t: torch.Tensor, name: str, std: float) -> None:
        """``t`` = ``std`` x consecutive pool values from the name's offset, wrapping around (one
        pass over ``t``'s memory: memory-bound, unlike drawing each number)."""
        flat, n, size = t.view(-1), t.numel(), self.pool.numel()
        start, i = zlib.crc32(f"{self.seed}:{name}".encode()) % size, 0
        while i < n:
            k = min(n - i, size - start)
            torch.mul(self.pool[start : start + k], std, out=flat[i : i + k])
            i, start = i + k, 0


def load_tokenizer(path: str | Path | None) -> PreTrainedTokenizerBase:
    """The tokenizer in folder ``path`` (a LLaMA one gives the released token counts; a released
    or LLaVA checkpoint folder has one), or the bundled model's (byte-level BPE, 1k tokens)."""
    folder = Path(path) if path is not None else DEFAULT_MODEL
    if not (folder / "tokenizer_config.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"{folder} holds no tokenizer (tokenizer_config.json / tokenizer.json)")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, use_fast=True)


# -- timing ------------------------------------------------------------------------------------


@dataclass
class OpenTiming:
    """Setting the image: CLIP on the image, HIPIE's image encoding and the LLM over the prefix
    (the template's system prompt and the image tokens) into the cache. Milliseconds."""

    prefix_tokens: int
    total_ms: float
    clip_image_ms: float
    hipie_image_ms: float
    llm_prefix_ms: float
    other_ms: float


@dataclass
class RoundTiming:
    """One incremental round (``Session.ask``). Milliseconds.

    Attributes:
        round: 1-indexed.
        refs: the earlier rounds it refers to (their masks go through the mask memory).
        tokens: tokens the LLM ran this round (question, memory placeholders, answer).
        llm_ms: the LLM over those tokens on top of the cache.
        memory_ms: the mask memory: crop of the earlier mask, CLIP on it, projector, box encoder.
        hipie_ms: HIPIE's prompt-dependent decoding of the round's ``<seg>`` (prompt head excluded).
        other_ms: the rest (tokenising, prompt head, mask resizing, bookkeeping).
        mask_pixels: pixels of the round's mask at the image's resolution.
    """

    round: int
    refs: list[int]
    tokens: int
    total_ms: float
    llm_ms: float
    memory_ms: float
    hipie_ms: float
    other_ms: float
    mask_pixels: int


@dataclass
class BuildInfo:
    """Building the model (quantizing included): seconds, sizes and memory (MB of resident memory)."""

    build_s: float
    params_m: float
    llm_params_m: float
    llm_weight_mb: float
    vocab_size: int
    rss_after_build_mb: float
    peak_rss_build_mb: float


@dataclass
class ReleasedBenchResult:
    """One setting's run.

    Attributes:
        setting: "bfloat16", "8bit", ... (see :data:`SETTINGS`), with "+compiled" when HIPIE ran
            compiled (``compile``).
        peak_rss_conversation_mb: the process's peak resident memory from the end of the build
            to the end of the conversation (None where the peak cannot be reset); peak_rss_mb:
            the whole process's.
        finite: every LLM state, score and box was finite.
        weights_checksum: a sum over a sample of the LLM's token embeddings, equal across settings
            of one shape and seed (every weight is made the same way from its name, so their masks
            come from the same random model).
        warmup: untimed conversations run before the timed one (in the same process).
        peak_gpu_mb: on a GPU, the most memory torch held on it during the timed conversation
            (weights included); None on a CPU.
    """

    setting: str
    dtype: str
    quantize: str | None
    device: str
    threads: int
    shape: dict
    build: BuildInfo
    open: OpenTiming
    rounds: list[RoundTiming]
    peak_rss_conversation_mb: float | None
    peak_rss_mb: float
    finite: bool
    weights_checksum: float
    warmup: int = 0
    peak_gpu_mb: float | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class _PartTimer:
    """Wall time per part of one model, summed per phase (``phase`` is set by the caller).

    Modules are timed with forward hooks (the LLM's decoder, HIPIE's prompt-dependent forward);
    the model's per-image and memory steps, which are methods rather than modules, by wrapping
    them on this model instance only (undone by :meth:`remove`).
    """

    def __init__(self, model: SegLLM) -> None:
        self.phase = "open"
        self.ms: dict[tuple[str, str], float] = defaultdict(float)
        self.tokens: dict[str, int] = defaultdict(int)
        self.finite = True
        self._sync = (lambda: torch.cuda.synchronize(model.device)) if model.device.type == "cuda" else (lambda: None)
        self._starts: dict[str, float] = {}
        self._handles = []
        self._wrapped: list[tuple[object, str]] = []
        self._hook(model.llm.get_decoder(), "llm")
        self._hook(model.decoder, "hipie_decode")
        self._wrap(model, "image_features", "clip_image")
        self._wrap(model, "encode_decoder_image", "hipie_image")
        self._wrap(model.memory, "inputs", "memory")
        self._wrap(model.memory, "tokens", "memory")

    def now(self) -> float:
        self._sync()
        return time.perf_counter()

    def _hook(self, module: nn.Module, part: str) -> None:
        def pre(_mod, args, kwargs):
            if part == "llm":
                embeds = kwargs.get("inputs_embeds")
                self.tokens[self.phase] += int(embeds.shape[1]) if embeds is not None else 0
            self._starts[part] = self.now()

        def post(_mod, _args, _kwargs, output):
            self.ms[self.phase, part] += (self.now() - self._starts.pop(part)) * 1000
            hidden = getattr(output, "last_hidden_state", None)
            if hidden is not None and not torch.isfinite(hidden).all():
                self.finite = False

        self._handles += [module.register_forward_pre_hook(pre, with_kwargs=True),
                          module.register_forward_hook(post, with_kwargs=True)]

    def _wrap(self, owner: object, name: str, part: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            t = self.now()
            try:
                return original(*args, **kwargs)
            finally:
                self.ms[self.phase, part] += (self.now() - t) * 1000

        setattr(owner, name, timed)  # an instance attribute: the class's method is untouched
        self._wrapped.append((owner, name))

    def get(self, part: str) -> float:
        return self.ms.get((self.phase, part), 0.0)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for owner, name in self._wrapped:
            delattr(owner, name)


def _rss_mb(key: str) -> float | None:
    """VmRSS (now) or VmHWM (peak) of this process in MB, from /proc (None where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Start a new peak of resident memory (Linux: ``5`` to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _conversation(session: Session, timer: _PartTimer, image: np.ndarray, rounds: int) -> tuple[OpenTiming, list[RoundTiming], list[np.ndarray]]:
    """Set the image and ask ``rounds`` rounds, timing each part."""
    timer.phase = "open"
    t = timer.now()
    session.set_image(image)
    total = (timer.now() - t) * 1000
    parts = {p: timer.get(p) for p in ("clip_image", "hipie_image", "llm")}
    opened = OpenTiming(timer.tokens["open"], total, parts["clip_image"], parts["hipie_image"], parts["llm"], total - sum(parts.values()))
    timings, masks = [], []
    for k in range(1, rounds + 1):
        timer.phase = f"round{k}"
        referable = [j for j in range(1, k) if session.referable(j)]
        refs = referable[-1:]  # the latest earlier mask that can be referred to
        t = timer.now()
        reply = session.ask(QUESTIONS[(k - 1) % len(QUESTIONS)], refs=refs, answer="<seg>", exact_refs=True)
        total = (timer.now() - t) * 1000
        if not (np.isfinite(reply.scores).all() and np.isfinite(reply.boxes).all()):
            timer.finite = False
        parts = {p: timer.get(p) for p in ("llm", "memory", "hipie_decode")}
        timings.append(RoundTiming(k, refs, timer.tokens[timer.phase], total, parts["llm"], parts["memory"], parts["hipie_decode"],
                                   total - sum(parts.values()), int(reply.masks[0].sum())))
        masks.append(reply.masks[0])
    return opened, timings, masks


def _checksum(model: SegLLM) -> float:
    """A sum over a sample of LLM weights that every setting keeps in float (token embeddings)."""
    w = model.llm.get_input_embeddings().weight
    return float(w.reshape(-1)[:4096].double().sum())


def _run_setting(job: tuple) -> tuple[dict, list[np.ndarray]]:
    """One setting in this process: build, (quantize), converse. Returns the result's JSON data
    and the masks (kept out of the JSON)."""
    setting, shape, rounds, threads, device, tokenizer_path, image_path, seed, warmup, compile_ = job
    if threads:
        torch.set_num_threads(threads)
    dtype, quantize = SETTINGS[setting]
    tokenizer = load_tokenizer(tokenizer_path)
    t = time.perf_counter()
    model = build_released_shape(shape, tokenizer, dtype=dtype, device=device, quantize=quantize, seed=seed)
    build_s = time.perf_counter() - t
    if compile_:
        model.set_compiled(True)  # HIPIE's compiled CPU steps; its first forward compiles (warm up to leave that out)
    checksum = _checksum(model)
    build = BuildInfo(
        build_s=round(build_s, 2),
        params_m=sum(p.numel() for p in model.parameters()) / 1e6, llm_params_m=sum(p.numel() for p in model.llm.parameters()) / 1e6,
        llm_weight_mb=llm_weight_bytes(model) / 2**20, vocab_size=len(tokenizer),
        rss_after_build_mb=_rss_mb("VmRSS") or 0.0, peak_rss_build_mb=_rss_mb("VmHWM") or 0.0,
    )
    image = load_image(image_path)
    for _ in range(warmup):  # untimed: a GPU's first calls pay CUDA's start-up (kernels, cuBLAS handles)
        timer = _PartTimer(model)
        try:
            _conversation(Session(model), timer, image, rounds)
        finally:
            timer.remove()
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    session = Session(model)
    timer = _PartTimer(model)
    reset = _reset_peak_rss()
    try:
        opened, timings, masks = _conversation(session, timer, image, rounds)
    finally:
        timer.remove()
    peak_conv = _rss_mb("VmHWM") if reset else None
    result = ReleasedBenchResult(
        setting=setting + ("+compiled" if compile_ else ""), dtype=str(dtype).removeprefix("torch."), quantize=quantize, device=str(device), threads=torch.get_num_threads(),
        shape=shape.summary(), build=build, open=opened, rounds=timings, peak_rss_conversation_mb=peak_conv,
        peak_rss_mb=max(_rss_mb("VmHWM") or 0.0, build.peak_rss_build_mb, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        finite=timer.finite, weights_checksum=checksum, warmup=warmup,
        peak_gpu_mb=torch.cuda.max_memory_allocated(device) / 2**20 if on_cuda else None,
    )
    return result.to_json(), masks


def mask_agreement(masks: dict[str, list[np.ndarray]], reference: str = "bfloat16") -> dict[str, list[float]]:
    """Per setting (other than ``reference``), the IoU of each round's mask with the reference
    setting's mask of the same round (two empty masks agree: 1.0)."""
    if reference not in masks:
        return {}
    return {s: [mask_scores(b, a)[2] for a, b in zip(masks[reference], m)] for s, m in masks.items() if s != reference}


def run_released(
    *, settings: tuple[str, ...] = ("bfloat16", "8bit"), shape: ReleasedShape | None = None, rounds: int = 4, threads: int = 0,
    device: str = "cpu", tokenizer: str | Path | None = None, image: str | Path | None = None, seed: int = 0, isolate: bool = True,
    on_result: Callable[[dict], None] | None = None, masks_dir: str | Path | None = None, warmup: int = 0,
    compile: bool = False,
) -> dict:
    """Run each setting (see :data:`SETTINGS`) on the released shape, each in a fresh process
    (``isolate``; else in this one, for tests), and compare their masks with bfloat16's.

    Returns ``{"results": [per setting], "mask_iou_vs_bfloat16": {setting: [per round]}}``;
    ``on_result`` is called with each setting's result as it finishes. With ``masks_dir`` each
    setting's masks are saved there (``{setting}.npz``, with the shape, seed and weights
    checksum), and a setting run earlier with the same ones is compared too: the settings of a
    7B model can then run one at a time, when the machine has the memory for each. ``warmup``
    conversations run untimed before the timed one (1 on a GPU, whose first calls pay CUDA's
    start-up). ``compile``: HIPIE with :meth:`HipieDecoder.set_compiled` (its results are named
    "SETTING+compiled", so that their masks compare with an earlier uncompiled run's in
    ``masks_dir``); give ``warmup`` 1 to leave the compilation out of the timed conversation.
    """
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}: choose from {', '.join(SETTINGS)}")
    if rounds < 1:
        raise ConfigError(f"rounds must be at least 1, got {rounds}")
    if warmup < 0:
        raise ConfigError(f"warmup must be 0 or more conversations, got {warmup}")
    shape = shape or ReleasedShape()
    image = str(image or EXAMPLES / "shapes.png")
    tok = str(tokenizer) if tokenizer is not None else None
    results, masks = [], {}
    for setting in settings:
        job = (setting, shape, rounds, threads, device, tok, image, seed, warmup, compile)
        if isolate:
            with mp.get_context("spawn").Pool(1) as pool:
                data, m = pool.apply(_run_setting, (job,))
        else:
            data, m = _run_setting(job)
        results.append(data)
        masks[data["setting"]] = m
        if masks_dir is not None:
            Path(masks_dir).mkdir(parents=True, exist_ok=True)
            np.savez_compressed(Path(masks_dir) / f"{data['setting']}.npz", masks=np.stack(m), key=np.array(_masks_key(data)))
        if on_result is not None:
            on_result(data)
    if masks_dir is not None and results:
        key = _masks_key(results[0])
        for f in sorted(Path(masks_dir).glob("*.npz")):
            if f.stem not in masks:
                with np.load(f) as saved:
                    if str(saved["key"]) == key:  # the same random model and conversation
                        masks[f.stem] = list(saved["masks"][:rounds])
    return {"results": results, "mask_iou_vs_bfloat16": mask_agreement(masks)}


def _masks_key(result: dict) -> str:
    """What must match for two settings' masks to be compared: shape, weights, rounds."""
    return json.dumps([result["shape"], result["weights_checksum"], len(result["rounds"])], sort_keys=True)


def released_table(report: dict) -> str:
    """The report of :func:`run_released` as Markdown: one row per setting (seconds; rounds
    after the first averaged), then per round."""
    ious = report.get("mask_iou_vs_bfloat16", {})
    lines = [
        "| setting | LLM weights GB | peak RSS GB (build / conversation) | LLM prefix s | CLIP image s | HIPIE image s "
        "| LLM round s | CLIP + crop s | HIPIE decode s | round total s | mask IoU vs bfloat16 (mean / min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        rounds, o = r["rounds"], r["open"]

        def mean(key, rs):
            return float(np.mean([x[key] for x in rs])) / 1000 if rs else float("nan")

        later = rounds[1:] or rounds
        iou = ious.get(r["setting"])
        conv = r["peak_rss_conversation_mb"]
        lines.append(
            f"| {r['setting']} | {r['build']['llm_weight_mb'] / 1024:.2f} | {r['build']['peak_rss_build_mb'] / 1024:.1f} / "
            f"{'-' if conv is None else f'{conv / 1024:.1f}'} | {o['llm_prefix_ms'] / 1000:.2f} | {o['clip_image_ms'] / 1000:.2f} "
            f"| {o['hipie_image_ms'] / 1000:.2f} | {mean('llm_ms', rounds):.2f} | {mean('memory_ms', later):.2f} "
            f"| {mean('hipie_ms', rounds):.2f} | {mean('total_ms', rounds):.2f} "
            f"| {'(reference)' if r['setting'] == 'bfloat16' else '-' if iou is None else f'{np.mean(iou):.3f} / {np.min(iou):.3f}'} |"
        )
    lines += ["", "| setting | round | refs | LLM tokens | LLM s | CLIP + crop s | HIPIE decode s | other s | total s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        o = r["open"]
        lines.append(f"| {r['setting']} | image | - | {o['prefix_tokens']} | {o['llm_prefix_ms'] / 1000:.2f} | {o['clip_image_ms'] / 1000:.2f} (image) "
                     f"| {o['hipie_image_ms'] / 1000:.2f} (image) | {o['other_ms'] / 1000:.2f} | {o['total_ms'] / 1000:.2f} |")
        for x in r["rounds"]:
            lines.append(f"| {r['setting']} | {x['round']} | {','.join(map(str, x['refs'])) or '-'} | {x['tokens']} | {x['llm_ms'] / 1000:.2f} "
                         f"| {x['memory_ms'] / 1000:.2f} | {x['hipie_ms'] / 1000:.2f} | {x['other_ms'] / 1000:.2f} | {x['total_ms'] / 1000:.2f} |")
    return "\n".join(lines)

