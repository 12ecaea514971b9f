"""The ``segllm`` command."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tomllib
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState

from segllm import SegLLM
from segllm.batch_segment import merge_results, read_items, segment_items
from segllm.bench import main as bench_main
from segllm.bench_released import SETTINGS as RELEASED_SETTINGS
from segllm.config import MASK_REGIONS
from segllm.conversation import load_image
from segllm.convert_weights import pickle_to_safetensors
from segllm.data.benchmark_readers import read_templates
from segllm.data.check import MIXES, DataCheck, DataMissingError, check_mix, check_released_mix, format_checks
from segllm.data.generate import PLAIN_ANSWERS, VARIED_ANSWERS, generate_from_coco
from segllm.data.records import ConversationFolder, WorldConversations
from segllm.data.released.configs import parse_annotation_overrides, read_annotation_config, read_conversation_config
from segllm.data.world import WorldConfig, generate
from segllm.default import EXAMPLES, load_model
from segllm.errors import ConfigError, ConversationError, SegLLMError
from segllm.eval.benchmarks import BENCHMARKS, Roots, check_benchmark, default_frame, open_benchmark, paper_lines
from segllm.eval.evaluate import evaluate, evaluate_baseline, format_table, read_logs
from segllm.eval.report import write_reports
from segllm.eval.suite import RELEASED_CHECKPOINTS, SUITES, checkpoint_path, run_suite, suite_markdown
from segllm.model.parts import write_parts
from segllm.model.quantize import QUANTIZE_MODES
from segllm.session import Session
from segllm.train.recipe import TrainRecipe
from segllm.train.trainer import check_data, train
from segllm.viz import mask_labels


def build_parser() -> argparse.ArgumentParser:
    """The ``segllm`` command's parser (every subcommand and its options)."""
    parser = argparse.ArgumentParser(prog="segllm", description="Multi-round reasoning segmentation with mask memory.")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="segment objects in an image, round by round (interactive, --ask or --script)")
    chat.add_argument("image", nargs="?", help="image file (default: the bundled example image and its conversation)")
    chat.add_argument("--ask", action="append", default=[], metavar="QUESTION",
                      help="a round's question; repeat for more rounds; '[REF:k]' or 'instance k' refers to round k")
    chat.add_argument("--script", metavar="FILE",
                      help="a prepared conversation: one question per line ('undo' and 'clear' allowed, '#' comments), "
                           "or a JSON file {\"questions\": [...]}")
    for flag, meta, what in (("--region", "MASK_PNG", "a mask image (any non-zero pixel is in the region)"),
                             ("--box", "X0,Y0,X1,Y1", "a box in image pixels"), ("--point", "X,Y", "a point in image pixels")):
        chat.add_argument(flag, action=_RegionAction, dest="regions", default=[], metavar=f"{meta}[:LABEL]",
                          help=f"a round whose region you give: {what}; rounds are numbered in the order given, "
                               "before the questions; a question refers to it as 'instance k'")
    chat.add_argument("--out", default="segllm-out", help="folder for overlays, masks and session.json (default: %(default)s)")
    _model_args(chat, device="cpu")
    chat.add_argument("--max-new-tokens", type=int, default=32)
    chat.add_argument("--full-recompute", action="store_true",
                      help="recompute the whole conversation every round (the released demo's way; slower)")
    chat.set_defaults(func=_chat)

    sg = sub.add_parser("segment", help="batch segmentation: every image's questions answered in batches; COCO results JSON")
    sg.add_argument("--images", help="a folder of images, or a text file with one image path per line")
    sg.add_argument("--questions", required=True,
                    help="a text file, one question per line (the rounds every image gets), or a JSONL file of "
                         "{\"image\": path, \"questions\": [...]} (then --images is not needed)")
    sg.add_argument("--out", required=True, help="folder for results.json (COCO style, RLE masks) and the resumable logs")
    sg.add_argument("--batch-size", type=int, default=16, help="images per batch (default: %(default)s)")
    sg.add_argument("--png", action="store_true", help="also write OUT/masks/<id>/round{k}_mask{j}.png")
    sg.add_argument("--resume", action="store_true", help="skip the images an interrupted run already wrote")
    sg.add_argument("--generate", action="store_true",
                    help="the model writes its answers (as segllm chat does; several masks where it answers with several) "
                         "instead of every answer being '<seg>' (one mask)")
    sg.add_argument("--max-new-tokens", type=int, default=32, help="longest generated answer, with --generate (default: %(default)s)")
    _model_args(sg, device=None)
    sg.set_defaults(func=_segment)

    world = sub.add_parser("world", help="write splits of the procedural multi-round world to a folder")
    world.add_argument("out", help="output folder (one subfolder per split)")
    for split, n in (("train", 10000), ("val", 500), ("test", 500), ("heldout", 500)):
        world.add_argument(f"--{split}", type=int, default=n, help=f"conversations in the {split} split (default: %(default)s)")
    world.add_argument("--seed", type=int, default=0)
    world.add_argument("--workers", type=int, default=1)
    world.add_argument("--multi-target-prob", type=float, default=0.0,
                       help="chance of a several-target round ('Segment all the red objects.', one <seg> per "
                            "object, left to right) (default: %(default)s: none, the pinned world)")
    world.set_defaults(func=_world)

    tr = sub.add_parser("train", help="train a model from a recipe (a TOML file, e.g. configs/default.toml)")
    tr.add_argument("recipe", help="recipe file")
    tr.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint-last")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe value, e.g. --set steps=100 --set output_dir=runs/x (VALUE is TOML)")
    tr.add_argument("--conversation-config", metavar="YAML",
                    help="the original's conversation config (conversation_configs/train/*.yaml): its files are the "
                         "training mix (instead of the recipe's data.mix)")
    tr.add_argument("--conversation-folder", metavar="DIR",
                    help="the folder the conversation config's files are in (the original's --conversation_folder, "
                         "e.g. conversations_folder/all_data_mix_train)")
    _annotation_args(tr)
    tr.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="per-round cIoU / mIoU / P@0.5 under the oracle and own history protocols")
    _model_args(ev, device=None)
    ev.add_argument("--benchmark", default=None,
                    help="world (default), a dataset folder via --data, or one of the paper's: mr-refcoco, mr-refcoco+, "
                         "mr-refcocog, mr-paco, released, refcoco, refcoco+, refcocog, reasonseg")
    ev.add_argument("--data", default="world", help="'world' or a dataset folder of this package's format (default: %(default)s)")
    ev.add_argument("--split", default=None, help="world: train, val, test, heldout (default test); refcoco: val, testA, "
                                                  "testB, test (default val); reasonseg: val, test (default val)")
    ev.add_argument("--size", type=int, default=None, help="at most this many conversations (default: world 500, else all)")
    ev.add_argument("--seed", type=int, default=0, help="world seed (default: %(default)s)")
    ev.add_argument("--multi-target-prob", type=float, default=0.0,
                    help="world: chance of a several-target round, scored matched and as a union (default: %(default)s)")
    ev.add_argument("--protocol", nargs="+", default=None, choices=["oracle", "own"],
                    help="history protocols (default: world both; a paper benchmark its own)")
    ev.add_argument("--frame", default=None, choices=["original", "released"],
                    help="metrics as the released code computes them (its 1024 decoder frame: the paper's measurement; "
                         "default for the paper's benchmarks) or at the image's resolution (default for world and "
                         "dataset folders)")
    ev.add_argument("--data-root", default=None, help="folder with the released layout: images_folder/, annotations_folder/, "
                                                     "conversations_folder/")
    ev.add_argument("--images", default=None, help="images root (overrides DATA_ROOT/images_folder)")
    ev.add_argument("--annotations", default=None, help="annotations root (overrides DATA_ROOT/annotations_folder)")
    ev.add_argument("--conversations", default=None,
                    help="a released conversation JSON (mr-* and released benchmarks; default for mr-*: its usual file "
                         "under conversations_folder/all_data_mix_val/), or the original's conversation config (YAML): "
                         "its files are evaluated together")
    ev.add_argument("--conversation-folder", metavar="DIR", default=None,
                    help="the folder a conversation config's files are in (default: DATA_ROOT/conversations_folder/"
                         "all_data_mix_val, the original's validation folder)")
    _annotation_args(ev)
    ev.add_argument("--template", default="segllm", help="refcoco question templates: segllm, lisa, or a file with one "
                                                        "'{sent}' template per line (e.g. SESAME's) (default: %(default)s)")
    ev.add_argument("--max-rounds", type=int, default=None, help="cut conversations to this many rounds")
    ev.add_argument("--out", default="segllm-eval", help="folder for JSON, CSV, the plot and the resumable logs (default: %(default)s)")
    ev.add_argument("--name", default="eval", help="base name of the report files (default: %(default)s)")
    ev.add_argument("--resume", action="store_true", help="continue an interrupted run from its logs in --out")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--baseline", choices=["union"], default=None,
                    help="also score a question-blind baseline on the same conversations: 'union' predicts the union of "
                         "all top-level objects every round (world data and dataset folders)")
    ev.add_argument("--suite", choices=sorted(SUITES), default=None,
                    help="every evaluation of the paper in one run, each with the released checkpoint and conversation "
                         "file the original's scripts use; resumable with --resume; report OUT/paper.{md,json} and "
                         "OUT/paper_rounds.png (needs --data-root and --checkpoints or --checkpoint)")
    ev.add_argument("--checkpoints", default=None, metavar="ROOT",
                    help="--suite: a folder holding mr_refcoco_checkpoint/, mr_paco_checkpoint/ and all_data_checkpoint/, "
                         "or the hub id Marlo-Z/SegLLM (downloads what is not in the cache)")
    ev.set_defaults(func=_eval)

    da = sub.add_parser("data", help="data tools: 'segllm data check DATA' says what a data root can run")
    da_sub = da.add_subparsers(dest="data_command", required=True)
    dc = da_sub.add_parser("check", help="which of the paper's benchmarks and the released training mixes a data root "
                                         "can run, what is missing and where to get it (loads no model)")
    dc.add_argument("root", metavar="DATA", help="the data root (the released layout: images_folder/, annotations_folder/, "
                                                 "conversations_folder/)")
    dc.add_argument("--benchmark", action="append", default=[], choices=sorted(BENCHMARKS),
                    help="check this benchmark only (repeatable; default: every benchmark and mix)")
    dc.add_argument("--mix", action="append", default=[],
                    help="check this training mix only (repeatable): a released recipe's (" + ", ".join(MIXES)
                         + "), a recipe file (.toml: its data as `segllm train` reads it) or the original's conversation "
                           "config (.yaml: files under DATA/conversations_folder/all_data_mix_train)")
    dc.add_argument("--split", default="val", help="split of the refcoco and reasonseg benchmarks (default: %(default)s)")
    dc.add_argument("--conversations", default=None,
                    help="conversation file of the mr-* and released benchmarks (default for mr-*: the usual one), or "
                         "the original's conversation config (YAML), as segllm eval takes it")
    dc.add_argument("--conversation-folder", metavar="DIR", default=None,
                    help="the folder a conversation config's files are in (default: DATA/conversations_folder/all_data_mix_val)")
    _annotation_args(dc)
    dc.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    dc.set_defaults(func=_data_check)

    pa = sub.add_parser("parts", help="write the real pretrained parts (SmolLM2 LLM, DINOv2 vision tower, LiteMedSAM decoder) into a folder")
    pa.add_argument("out", help="folder to write llm/, vision/ and decoder/ into (the real-parts recipe expects parts/)")
    pa.set_defaults(func=_parts)

    ml = sub.add_parser("merge-lora", help="fold a checkpoint's LoRA adapters into plain LLM weights")
    ml.add_argument("checkpoint", help="a checkpoint folder (or hub id) trained with LoRA")
    ml.add_argument("out", help="folder for the merged checkpoint")
    _model_args(ml, device="cpu", checkpoint=False, quantize=False)
    ml.set_defaults(func=_merge_lora)

    cv = sub.add_parser("convert-weights", help="a PyTorch pickle of weights (.pth) -> safetensors (read with the restricted unpickler)")
    cv.add_argument("src", help="the .pth/.pt/.bin file, e.g. HIPIE-R50's r50_parts.pth")
    cv.add_argument("dst", help="the safetensors file to write")
    cv.add_argument("--key", default=None, help="the entry holding the weights (default: 'model' or 'state_dict' if present)")
    cv.set_defaults(func=_convert_weights)

    dm = sub.add_parser("demo", help="a web demo (Gradio) on localhost")
    _model_args(dm, device="cpu")
    dm.add_argument("--host", default="127.0.0.1", help="address to serve on (default: %(default)s)")
    dm.add_argument("--port", type=int, default=7860)
    dm.add_argument("--max-side", type=int, default=4096, help="largest image side accepted, pixels (default: %(default)s)")
    dm.add_argument("--max-sessions", type=int, default=32,
                    help="live conversations at most; the least recently used is dropped beyond it (default: %(default)s)")
    dm.add_argument("--idle-timeout", type=float, default=900,
                    help="seconds after which an idle conversation and its files are dropped (default: %(default)s)")
    dm.add_argument("--max-upload-mb", type=float, default=20,
                    help="uploads over this many MB are refused before they are stored (default: %(default)s)")
    dm.set_defaults(func=_demo)

    bn = sub.add_parser("bench", help="per-round latency, incremental vs full recompute (bundled and a large-LLM model); "
                                      "with --released-shape, the released 7B architecture part by part")
    bn.add_argument("--rounds", type=int, default=None, help="rounds of the conversation (default: 8; 4 with --released-shape)")
    bn.add_argument("--repeats", type=int, default=3)
    bn.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    bn.add_argument("--no-large", action="store_true", help="skip the large-LLM configuration")
    bn.add_argument("--width", type=int, default=4096, help="LLM width of the large configuration (and of --released-shape)")
    bn.add_argument("--layers", type=int, default=None,
                    help="LLM layers of the large configuration (default 2) or of --released-shape (default 32: the 7B)")
    bn.add_argument("--json", help="also write the raw results here")
    bn.add_argument("--released-shape", action="store_true",
                    help="build the released SegLLM's architecture at full size (LLaMA-7B, CLIP ViT-L/14, HIPIE-R50) with random "
                         "weights, no download, and time a conversation part by part, each --setting in its own process")
    bn.add_argument("--setting", action="append", default=None, choices=list(RELEASED_SETTINGS),
                    help="with --released-shape: a precision to run (repeatable; default: bfloat16 and 8bit)")
    bn.add_argument("--tokenizer", default=None, metavar="FOLDER",
                    help="with --released-shape: a tokenizer folder (a LLaMA one, e.g. a released checkpoint's, gives the "
                         "released token counts; default: the bundled model's)")
    bn.add_argument("--image", default=None, help="with --released-shape: the image (default: the bundled shapes.png)")
    bn.add_argument("--warmup", type=int, default=0,
                    help="with --released-shape: untimed conversations before the timed one (default 0; 1 on a GPU, whose "
                         "first calls pay CUDA's start-up)")
    bn.add_argument("--masks-dir", default=None, metavar="DIR",
                    help="with --released-shape: save each setting's masks here and compare with those saved by an earlier "
                         "run of the same shape (so the settings can run one at a time)")
    bn.add_argument("--compile", action="store_true",
                    help="with --released-shape: HIPIE's heaviest CPU steps through torch.compile (HipieDecoder.set_compiled); "
                         "give --warmup 1 to leave the compilation out of the timed conversation")
    _model_args(bn, device="cpu", checkpoint=False, revision=False, quantize=False, threads=False)  # its own --threads
    bn.set_defaults(func=_bench)

    gen = sub.add_parser("generate", help="multi-round conversations from COCO-style annotations (RefCOCO, PACO-LVIS, any COCO)")
    gen.add_argument("instances", metavar="INSTANCES_JSON", help="COCO instances file (RefCOCO instances.json, PACO-LVIS json, ...)")
    gen.add_argument("--images", required=True, help="folder the images' file_name entries are relative to")
    gen.add_argument("--out", required=True, help="output folder (annotations.json, conversations.jsonl, released.json, meta.json)")
    gen.add_argument("--refs", help="REFER refs pickle, e.g. refcoco/refs(unc).p (kind refcoco only)")
    gen.add_argument("--split", help="refs split to use, e.g. val, testA (kind refcoco only)")
    gen.add_argument("--kind", default=None, choices=["coco", "refcoco", "paco"],
                     help="annotation source (default: refcoco when --refs is given, else coco)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--max-rounds", type=int, default=6)
    gen.add_argument("--min-rounds", type=int, default=2)
    gen.add_argument("--min-area", type=float, default=256.0, help="smallest target mask, pixels (default: %(default)s)")
    gen.add_argument("--limit", type=int, help="stop after this many conversations")
    gen.add_argument("--dataset-name", help="dataset name of the released records' masks (default: by kind)")
    gen.add_argument("--images-prefix", default="", help="prefix of the released image paths, e.g. coco/train2014")
    gen.add_argument("--varied-answers", action="store_true", help="vary the answer text around <seg>")
    gen.add_argument("--copy-images", action="store_true", help="copy the used images into OUT/images/")
    gen.add_argument("--per-image", type=int, default=1, help="conversations per image (default: %(default)s)")
    gen.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if getattr(args, "threads", 0) < 0:
        print(f"error: --threads must be 0 (torch's default) or more, got {args.threads}", file=sys.stderr)
        return 2
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (SegLLMError, ValueError) as e:  # bad input or arguments: a message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _model_args(p: argparse.ArgumentParser, *, device: str | None, checkpoint: bool = True, revision: bool = True, quantize: bool = True,
                threads: bool = True) -> None:
    """The options of every command that loads a model: which one (``--checkpoint``, ``--revision``)
    and where and in which precision it runs (``--device``, ``--dtype``, ``--quantize``, ``--threads``,
    and for the commands that run it, ``--compile``)."""
    if checkpoint:
        p.add_argument("--checkpoint", help="model folder, or a Hugging Face hub id org/name[/subfolder][@revision], "
                                            "e.g. Marlo-Z/SegLLM/all_data_checkpoint (default: the bundled model)")
    if revision:
        p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of a hub id checkpoint")
    p.add_argument("--device", default=device, help="torch device, e.g. cpu, cuda, cuda:1 (default: "
                                                    + (device or "cuda when available, else cpu") + ")")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="precision of the model's weights and compute (default: %(default)s; bfloat16 halves the memory)")
    if threads:  # main() applies it before the command runs
        p.add_argument("--threads", type=int, default=0,
                       help="CPU threads for torch (default 0: torch's default, every core; give 1 to each of several "
                            "runs side by side, which otherwise slow each other down many times over)")
    if quantize:
        p.add_argument("--quantize", default=None, choices=list(QUANTIZE_MODES),
                       help="weight-only 8-bit or 4-bit LLM layers through bitsandbytes (pip install 'segllm[quant]'); "
                            "the rest of the model stays in --dtype")
    if checkpoint:
        p.add_argument("--compile", action="store_true",
                       help="compile the mask decoder's heaviest CPU steps with torch.compile (the released HIPIE decoder: "
                            "about 1.5x faster a forward after a first one that compiles for about a minute; others: no effect)")
        p.add_argument("--mask-region", default=None, choices=list(MASK_REGIONS),
                       help="which part of each mask to keep: every pixel the model marks (all), or only its connected "
                            "region with the most probability mass (most_confident; the bundled model's setting); "
                            "default: the checkpoint's")
        p.add_argument("--edge-filter", default=None, choices=("on", "off"),
                       help="each mask's edges filtered along the image's colours (on: the bundled model's setting) "
                            "or left as the decoder made them (off); default: the checkpoint's")


def _edge_filter(args: argparse.Namespace) -> bool | None:
    """--edge-filter on/off -> True/False; not given -> None (the checkpoint's setting)."""
    return None if args.edge_filter is None else args.edge_filter == "on"


def _annotation_args(p: argparse.ArgumentParser) -> None:
    """Where the released datasets' masks are: the original's annotation config and single overrides."""
    p.add_argument("--annotation-config", metavar="YAML", default=None,
                   help="the original's annotation config (annotation_configs/*.yaml): each dataset's annotation "
                        "file under the annotations root (path; path_eval for evaluation)")
    p.add_argument("--annotation", action="append", default=[], metavar="NAME=PATH",
                   help="a dataset's annotation file or folder (relative to the annotations root, or absolute), over "
                        "the config; NAME_eval for evaluation's, e.g. reason_seg_eval=reason_seg/annotations/test (repeatable)")


def _annotation_overrides(args: argparse.Namespace) -> dict[str, str]:
    listed = read_annotation_config(args.annotation_config) if args.annotation_config else {}
    return {**listed, **parse_annotation_overrides(args.annotation)}


class _RegionAction(argparse.Action):
    """Collects --region/--box/--point in the order given (their rounds are numbered so)."""

    def __call__(self, parser, namespace, values, option_string=None):
        getattr(namespace, self.dest).append(f"region {option_string.lstrip('-').replace('region', 'mask')} {values}")


def _region_line(session: Session, line: str):
    """Run a ``region mask FILE[:LABEL]`` / ``region box X0,Y0,X1,Y1[:LABEL]`` / ``region point
    X,Y[:LABEL]`` line (command line options and script lines alike)."""
    parts = line.split(None, 2)
    if len(parts) < 3 or parts[1] not in ("mask", "box", "point"):
        raise SegLLMError(f"a region line is 'region mask FILE', 'region box X0,Y0,X1,Y1' or 'region point X,Y' (optionally ':LABEL'), not {line!r}")
    kind, value = parts[1], parts[2].strip()
    label = None
    if kind == "mask":
        if not Path(value).exists() and ":" in value:
            value, label = value.rsplit(":", 1)
        return session.add_region(mask=np.asarray(load_image(value)), label=label)
    if ":" in value:
        value, label = value.split(":", 1)
    try:
        numbers = [float(v) for v in value.split(",")]
    except ValueError:
        numbers = []
    want = 4 if kind == "box" else 2
    if len(numbers) != want:
        raise SegLLMError(f"--{kind} takes {want} comma-separated numbers, not {value!r}")
    return session.add_region(**{kind: numbers}, label=label)


def _script_lines(path: Path) -> list[str]:
    """The questions of a ``--script`` file: one per line, or a JSON list / ``{"questions": [...]}``.

    Raises:
        ConversationError: naming the file, for a missing or unreadable file or a JSON file of
            another shape (a raw KeyError or decode error would say neither which file nor what
            was expected).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConversationError(f"cannot read the script {path}: {e}") from e
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConversationError(f"script {path} is not valid JSON: {e}") from e
        questions = data.get("questions") if isinstance(data, dict) else data
        if not isinstance(questions, list) or not all(isinstance(q, str) for q in questions):
            raise ConversationError(f'script {path}: expected a JSON list of questions or {{"questions": [...]}} of text')
        return [q.strip() for q in questions]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _chat(args: argparse.Namespace) -> int:
    lines: list[str] | None = None
    if args.script:
        lines = _script_lines(Path(args.script))
    elif args.ask:
        lines = list(args.ask)
    image_path = args.image
    if image_path is None:
        image_path = EXAMPLES / "shapes.png"
        if lines is None:
            lines = _script_lines(EXAMPLES / "shapes.json")
    interactive = lines is None and sys.stdin.isatty()
    session = Session.from_pretrained(
        args.checkpoint, image_path, revision=args.revision, device=args.device, dtype=DTYPES[args.dtype], quantize=args.quantize, mask_region=args.mask_region,
        compile=args.compile, edge_filter=_edge_filter(args), incremental=not args.full_recompute, max_new_tokens=args.max_new_tokens,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if interactive:
        print("Ask a question per round; '[REF:k]' or 'instance k' refers to round k. Commands: undo, clear, exit, "
              "'region box X0,Y0,X1,Y1[:LABEL]', 'region point X,Y[:LABEL]', 'region mask FILE[:LABEL]'.")
        lines = _prompt_lines(session)
    elif lines is None:
        lines = (line.strip() for line in sys.stdin if line.strip())
    errors = 0
    for line in _chain(args.regions, lines):
        command = line.lower()
        if command in ("exit", "quit"):
            break
        if command == "undo":
            r = session.undo()
            print(f"undid round {r.round}" if r else "nothing to undo")
            continue
        if command in ("clear", "reset"):
            session.reset()
            print("cleared the conversation")
            continue
        try:
            r = _region_line(session, line) if command.startswith("region ") else session.ask(line)
        except SegLLMError as e:
            errors += 1
            print(f"error: {e}", file=sys.stderr)
            continue
        session.overlay().save(out / f"round{r.round}_overlay.png")
        boxes = _boxes_line(r)
        ref_note = f" (refers to {', '.join(map(str, r.refs))})" if r.refs else ""
        note = " (your region)" if r.user else " (forced)" if r.forced else ""
        print(f"round {r.round}{ref_note}: {r.question}\n  -> {r.text!r}{note}  {boxes}")
    session.save_masks(out)
    (out / "session.json").write_text(json.dumps(session.to_coco(file_name=Path(image_path).name), indent=1) + "\n")
    print(f"overlays, masks and session.json written to {out}/")
    return 1 if errors and not interactive else 0


def _boxes_line(reply) -> str:
    """Each mask's box and score; a round with several masks labels them k.1, k.2, ... as the
    overlay does (and as ``round{k}_mask{j}.png`` numbers them). A mask without pixels says so
    (its box would read [0, 0, 0, 0]), since a later round cannot refer to it."""
    labels = mask_labels(reply.round, len(reply.boxes))
    several = len(labels) > 1
    return ", ".join(f"{f'mask {lab} ' if several else ''}"
                     f"{'empty' if not m.any() else '[' + ', '.join(f'{v:.0f}' for v in b) + ']'} score {s:.2f}"
                     for lab, m, b, s in zip(labels, reply.masks, reply.boxes, reply.scores))


def _chain(first, rest):
    yield from first
    yield from rest


def _prompt_lines(session):
    while True:
        try:
            yield input(f"round {len(session.history) + 1}> ").strip()
        except EOFError:
            print()
            return


def _segment(args: argparse.Namespace) -> int:
    """Runs under ``torchrun`` (or ``accelerate launch``) too: each process takes every n-th image and
    writes its own results file; the main process merges them into ``results.json``."""
    items = read_items(args.images, args.questions)  # bad paths or records: an error before the model loads
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    model = load_model(args.checkpoint, revision=args.revision, device=args.device or str(state.device), dtype=DTYPES[args.dtype], quantize=args.quantize,
                       mask_region=args.mask_region, compile=args.compile, edge_filter=_edge_filter(args))
    summary = segment_items(model, items, args.out, batch_size=args.batch_size, resume=args.resume,
                            rank=state.process_index, world_size=state.num_processes, progress=state.is_main_process,
                            generate=args.generate, max_new_tokens=args.max_new_tokens)
    state.wait_for_everyone()
    if not state.is_main_process:
        return 0
    path = merge_results(args.out, state.num_processes, png=args.png)
    rate = summary.images / max(summary.seconds, 1e-9)
    print(f"{summary.images} image(s), {summary.rounds} round(s) in {summary.seconds:.1f} s ({rate:.2f} images/s on this process)"
          + (f"; {summary.resumed} done by an earlier run" if summary.resumed else ""))
    for key, message in summary.errors[:5]:
        print(f"  {key}: {message}", file=sys.stderr)
    if summary.errors:
        print(f"{len(summary.errors)} image(s) with an error (listed in results.json)", file=sys.stderr)
    print(f"results in {path}")
    return 1 if summary.errors else 0


def _world(args: argparse.Namespace) -> int:
    counts = {k: getattr(args, k) for k in ("train", "val", "test", "heldout") if getattr(args, k) > 0}
    try:
        config = WorldConfig(multi_target_prob=args.multi_target_prob)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shares = generate(args.out, counts, seed=args.seed, config=config, workers=args.workers)
    print(f"wrote {', '.join(f'{k}: {v}' for k, v in counts.items())} conversations to {args.out}/")
    # how much of each split a text-only model could answer (the rest needs the masks)
    for split, sh in shares.items():
        if sh["rounds"]:
            late = (f"{100 * sh['late_share']:.1f}% of {sh['late_rounds']} rounds >= {sh['late_round']}"
                    if sh["late_rounds"] else f"no rounds >= {sh['late_round']}")
            print(f"{split}: text-resolvable {100 * sh['share']:.1f}% of {sh['rounds']} rounds, {late}")
    return 0


def _train(args: argparse.Namespace) -> int:
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"error: --set wants KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        try:
            overrides[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key] = value  # a bare string
    if args.conversation_config:
        overrides.update({"data.conversation_config": args.conversation_config, "data.mix": []})
    if args.conversation_folder:
        overrides["data.conversations"] = args.conversation_folder
    if args.annotation_config:
        overrides["data.annotation_config"] = args.annotation_config
    for name, path in parse_annotation_overrides(args.annotation).items():
        overrides[f"data.annotation_paths.{name}"] = path
    recipe = TrainRecipe.load(args.recipe, overrides)
    summary = train(recipe, resume=args.resume)
    print(f"trained to step {summary.steps}; checkpoint in {recipe.output_dir}/checkpoint-last/model")
    return 0


def _convert_weights(args: argparse.Namespace) -> int:
    shapes = pickle_to_safetensors(args.src, args.dst, key=args.key)
    print(f"wrote {len(shapes)} tensors ({sum(math.prod(s) for s in shapes.values()):,} values) to {args.dst}")
    return 0


def _parts(args: argparse.Namespace) -> int:
    paths = write_parts(args.out)
    print(f"wrote the LLM to {paths['llm']}, the vision tower to {paths['vision']} and the decoder to {paths['decoder']}")
    return 0


def _merge_lora(args: argparse.Namespace) -> int:
    model = SegLLM.from_pretrained(args.checkpoint, revision=args.revision, device=args.device, dtype=DTYPES[args.dtype])
    if not model.config.llm.lora.r:
        print(f"error: {args.checkpoint} has no LoRA adapters", file=sys.stderr)
        return 2
    n = model.merge_lora()
    model.save_pretrained(args.out)
    print(f"merged the adapters of {n} layers; plain checkpoint in {args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    """Runs under ``torchrun`` (or ``accelerate launch``) too: each process takes every n-th conversation and
    writes its own log; the main process merges the logs into the report."""
    if args.suite:
        return _eval_suite(args)
    args.frame = args.frame or default_frame(args.benchmark)
    if args.baseline and args.frame != "original":
        print("error: --baseline is scored at the original resolution only (leave --frame as is)", file=sys.stderr)
        return 2
    # accelerate runs several CPU processes as one distributed (gloo) job only when told it is on CPU
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    device = args.device or str(state.device)
    data, where, protocols, split = _eval_data(args)
    if args.baseline and getattr(data, "scene", None) is None:
        print("error: --baseline needs object annotations (world data or a dataset folder of this package's format)",
              file=sys.stderr)
        return 2
    model = load_model(args.checkpoint, revision=args.revision, device=device, dtype=DTYPES[args.dtype], quantize=args.quantize,
                       mask_region=args.mask_region, compile=args.compile, edge_filter=_edge_filter(args))
    out = Path(args.out)
    logs = {p: [out / f"{args.name}.{p}.rank{r}.jsonl" for r in range(state.num_processes)] for p in protocols}
    results = []
    for p in protocols:
        res = evaluate(
            model, data, protocol=p, limit=args.size, batch_size=args.batch_size, progress=state.is_main_process,
            frame=args.frame, log_path=logs[p][state.process_index], resume=args.resume,
            rank=state.process_index, world_size=state.num_processes,
        )
        results.append(res)
    state.wait_for_everyone()
    if not state.is_main_process:
        return 0
    if state.num_processes > 1:
        results = [read_logs(logs[p], protocol=p, frame=args.frame, dataset=data) for p in protocols]
    if args.baseline == "union":
        results.append(evaluate_baseline(data, limit=args.size))
    size = model.decoder.image_size
    frame = f"the released code's way: {size}x{size} decoder frame, padding included" if args.frame == "released" else "original resolution"
    print(format_table(results, title=f"{args.checkpoint or 'bundled model'} on {where} (metrics at {frame})"))
    if args.benchmark:
        for line in paper_lines(args.benchmark, split, results, template=args.template):
            print(line)
    skipped = max(len(r.skipped) for r in results)
    if skipped:
        print(f"skipped {skipped} unusable record(s) (listed in the JSON report)")
        for w, reason in results[0].skipped[:5]:
            print(f"  {w}: {reason}")
    meta = {"checkpoint": args.checkpoint or "bundled", "revision": args.revision, "data": where, "frame": args.frame,
            "dtype": args.dtype}
    paths = write_reports(results, args.out, name=args.name, meta=meta)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _eval_suite(args: argparse.Namespace) -> int:
    """``segllm eval --suite paper``: one process; each released checkpoint loads once."""
    if not args.data_root:
        print("error: --suite needs --data-root (the released layout)", file=sys.stderr)
        return 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every process would run and write the whole suite
        print("error: --suite runs in one process (not under torchrun / accelerate launch)", file=sys.stderr)
        return 2
    roots = Roots(Path(args.data_root), Path(args.images) if args.images else None, Path(args.annotations) if args.annotations else None)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    checkpoints = {name: checkpoint_path(name, root=args.checkpoints, single=args.checkpoint) for name in RELEASED_CHECKPOINTS}
    frame = args.frame or "released"
    entries = run_suite(
        SUITES[args.suite], roots, args.out, checkpoints=checkpoints.__getitem__,
        load=lambda ckpt: load_model(ckpt, revision=args.revision, device=device, dtype=DTYPES[args.dtype], compile=args.compile),
        frame=frame, size=args.size, batch_size=args.batch_size, resume=args.resume, progress=True,
        meta={"suite": args.suite, "checkpoints": checkpoints, "data_root": args.data_root, "dtype": args.dtype},
        echo=print,
    )
    print(suite_markdown(entries, meta={"frame": frame, "size": args.size}))
    print(f"wrote {Path(args.out) / 'paper.md'}, {Path(args.out) / 'paper.json'}, {Path(args.out) / 'paper_rounds.png'}")
    return 0 if any(e.status == "done" for e in entries) else 1


def _eval_data(args: argparse.Namespace):
    """(dataset, description, protocols, split) for ``segllm eval``'s arguments."""
    if args.benchmark in (None, "world") and args.data == "world":
        split = args.split or "test"
        args.size = 500 if args.size is None else args.size
        config = WorldConfig(multi_target_prob=args.multi_target_prob)
        data = WorldConversations(split, args.size, seed=args.seed, config=config, max_rounds=args.max_rounds)
        multi = f", several-target rounds {args.multi_target_prob:g}" if args.multi_target_prob else ""
        return data, f"world seed {args.seed}, {split} split, {args.size} conversations{multi}", args.protocol or ["oracle", "own"], split
    if args.benchmark in (None, "world", "folder"):
        data = ConversationFolder(args.data, max_rounds=args.max_rounds)
        n = len(data) if args.size is None else min(args.size, len(data))
        return data, f"{args.data} ({n} conversations)", args.protocol or ["oracle", "own"], ""

    if args.benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {args.benchmark!r}: world or one of {sorted(BENCHMARKS)}")
    split = args.split or "val"
    roots = Roots(
        Path(args.data_root) if args.data_root else None,
        Path(args.images) if args.images else None,
        Path(args.annotations) if args.annotations else None,
    )
    templates = read_templates(args.template) if BENCHMARKS[args.benchmark].kind == "refcoco" else None
    conversations = _eval_conversations(args, roots)
    overrides = _annotation_overrides(args)
    # the data check first: a missing image set or annotation file stops here, before any model loads
    check = check_benchmark(args.benchmark, roots, split=split, conversations=conversations, overrides=overrides)
    if not check.runnable:
        raise DataMissingError(check)
    data, where = open_benchmark(args.benchmark, roots, split=split, conversations=conversations,
                                 templates=templates, max_rounds=args.max_rounds, overrides=overrides)
    return data, where, args.protocol or [BENCHMARKS[args.benchmark].protocol], split


def _eval_conversations(args: argparse.Namespace, roots: Roots) -> str | list[str] | None:
    """``--conversations``: a conversation file, or the files a conversation config (YAML) lists."""
    given = args.conversations
    if given is None or Path(given).suffix.lower() not in (".yaml", ".yml"):
        return given
    folder = Path(args.conversation_folder) if args.conversation_folder else roots.get("conversations") / "all_data_mix_val"
    return [str(folder / name) for name in read_conversation_config(given)]


def _data_check(args: argparse.Namespace) -> int:
    roots = Roots(Path(args.root))
    overrides = _annotation_overrides(args)
    checks = []
    benchmarks = args.benchmark if args.benchmark or args.mix else [
        b for b in BENCHMARKS if BENCHMARKS[b].kind != "released" or BENCHMARKS[b].conversations or args.conversations]
    for name in benchmarks:
        # --conversations is the file of the benchmarks named; checking them all, it is the 'released' one's
        named = bool(args.benchmark) or name == "released"
        conversations = _eval_conversations(args, roots) if BENCHMARKS[name].kind == "released" and named else None
        checks.append(check_benchmark(name, roots, split=args.split, conversations=conversations, overrides=overrides))
    for mix in args.mix if args.benchmark or args.mix else list(MIXES):
        checks.append(_mix_check(mix, roots, overrides))
    if args.json:
        print(json.dumps({"root": str(roots.root), "runnable": all(c.runnable for c in checks),
                          "checks": [c.to_dict() for c in checks]}, indent=1))
    else:
        print(format_checks(checks, root=roots.root))
    return 0 if all(c.runnable for c in checks) else 1


def _mix_check(mix: str, roots: Roots, overrides: dict[str, str]) -> DataCheck:
    """The data check of a training mix given to ``segllm data check --mix``."""
    suffix = Path(mix).suffix.lower()
    if suffix == ".toml":
        recipe = TrainRecipe.load(mix)
        check = check_data(recipe) or DataCheck(mix, "mix", notes=["reads no released conversation files"])
        check.name = mix
        return check
    if suffix in (".yaml", ".yml"):
        folder = roots.get("conversations") / "all_data_mix_train"
        files = [folder / name for name in read_conversation_config(mix)]
        return check_mix(mix, files, None, roots.get("images"), roots.get("annotations"), overrides=overrides)
    return check_released_mix(mix, roots.get("conversations"), roots.get("images"), roots.get("annotations"),
                              overrides=overrides)

def _demo(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: the web demo needs gradio: pip install 'segllm[demo]'", file=sys.stderr)
        return 2
    from segllm.demo import launch  # imports gradio, an optional extra (segllm[demo])

    launch(args.checkpoint, revision=args.revision, host=args.host, port=args.port, device=args.device,
           dtype=DTYPES[args.dtype], quantize=args.quantize, mask_region=args.mask_region, compile=args.compile,
           edge_filter=_edge_filter(args), max_side=args.max_side,
           max_sessions=args.max_sessions, idle_timeout=args.idle_timeout, max_upload_mb=args.max_upload_mb)
    return 0


def _bench(args: argparse.Namespace) -> int:
    return bench_main(args)


def _generate(args: argparse.Namespace) -> int:
    kind = args.kind or ("refcoco" if args.refs else "coco")
    out = generate_from_coco(
        args.instances, args.images, args.out, refs=args.refs, split=args.split, kind=kind, seed=args.seed,
        max_rounds=args.max_rounds, min_rounds=args.min_rounds, limit=args.limit, min_area=args.min_area,
        dataset_name=args.dataset_name, images_prefix=args.images_prefix,
        answers=VARIED_ANSWERS if args.varied_answers else PLAIN_ANSWERS, copy_images=args.copy_images,
        per_image=args.per_image,
    )
    meta = json.loads((out / "meta.json").read_text())
    counts = meta["counts"]
    print(f"wrote {counts['conversations']} conversations ({counts['rounds']} rounds) from "
          f"{counts['images_used']} of {counts['images_considered']} images to {out}/")
    for scope, reasons in meta["skipped"].items():
        if reasons:
            print(f"skipped {sum(reasons.values())} {scope}: " + ", ".join(f"{r}: {n}" for r, n in reasons.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
