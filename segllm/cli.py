"""The ``segllm`` command: its parser and the dispatch to :mod:`segllm.commands` (the commands
that load a model) and :mod:`segllm.data_commands` (``world``, ``data check``, ``generate``).

This module imports neither torch nor the model code, so that ``segllm --help``, a command's
``--help`` and argument errors answer at once; a command's implementation is imported when it
runs, and the data commands never load torch.
"""

from __future__ import annotations

import argparse
import logging
import sys

from segllm import __version__
from segllm.config import DTYPE_NAMES, MASK_REGIONS, MAX_NEW_TOKENS, QUANTIZE_MODES, RELEASED_SHAPE_SETTINGS
from segllm.data.check import MIXES
from segllm.errors import SegLLMError
from segllm.eval.benchmarks import BENCHMARKS
from segllm.eval.suite import SUITES


def build_parser() -> argparse.ArgumentParser:
    """The ``segllm`` command's parser (every subcommand and its options)."""
    parser = argparse.ArgumentParser(prog="segllm", description="Multi-round reasoning segmentation with mask memory.")
    parser.add_argument("--version", action="version", version=f"segllm {__version__}")
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
    chat.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    chat.add_argument("--full-recompute", action="store_true",
                      help="recompute the whole conversation every round (the released demo's way; slower)")
    chat.set_defaults(func="chat")

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
    sg.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="longest generated answer, with --generate (default: %(default)s)")
    sg.add_argument("--lanes", type=int, default=0,
                    help="batches answered at once in this process, on as many threads, the torch threads shared out among "
                         "them (default 0: 2 on a CPU with 2 or more threads for a model under a billion parameters, else 1)")
    _model_args(sg, device=None)
    sg.set_defaults(func="segment")

    world = sub.add_parser("world", help="write splits of the procedural multi-round world to a folder")
    world.add_argument("out", help="output folder (one subfolder per split)")
    for split, n in (("train", 10000), ("val", 500), ("test", 500), ("heldout", 500)):
        world.add_argument(f"--{split}", type=int, default=n, help=f"conversations in the {split} split (default: %(default)s)")
    world.add_argument("--seed", type=int, default=0)
    world.add_argument("--workers", type=int, default=1)
    world.add_argument("--multi-target-prob", type=float, default=0.0,
                       help="chance of a several-target round ('Segment all the red objects.', one <seg> per "
                            "object, left to right) (default: %(default)s: none, the pinned world)")
    world.set_defaults(func="world")

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
    tr.set_defaults(func="train")

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
    ev.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS,
                    help="longest answer the model writes under the own protocol (default: %(default)s, as segllm chat)")
    ev.add_argument("--lanes", type=int, default=0,
                    help="batches evaluated at once in this process, on as many threads, the torch threads shared out among "
                         "them (default 0: 2 on a CPU with 2 or more threads for a model under a billion parameters, else 1); "
                         "the results do not depend on it")
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
    ev.set_defaults(func="eval")

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
    dc.set_defaults(func="data check")

    pa = sub.add_parser("parts", help="write the real pretrained parts (SmolLM2 LLM, DINOv2 vision tower, LiteMedSAM decoder) into a folder")
    pa.add_argument("out", help="folder to write llm/, vision/ and decoder/ into (the real-parts recipe expects parts/)")
    pa.set_defaults(func="parts")

    ml = sub.add_parser("merge-lora", help="fold a checkpoint's LoRA adapters into plain LLM weights")
    ml.add_argument("checkpoint", help="a checkpoint folder (or hub id) trained with LoRA")
    ml.add_argument("out", help="folder for the merged checkpoint")
    _model_args(ml, device="cpu", checkpoint=False, quantize=False)
    ml.set_defaults(func="merge-lora")

    cv = sub.add_parser("convert-weights", help="a PyTorch pickle of weights (.pth) -> safetensors (read with the restricted unpickler)")
    cv.add_argument("src", help="the .pth/.pt/.bin file, e.g. HIPIE-R50's r50_parts.pth")
    cv.add_argument("dst", help="the safetensors file to write")
    cv.add_argument("--key", default=None, help="the entry holding the weights (default: 'model' or 'state_dict' if present)")
    cv.set_defaults(func="convert-weights")

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
    dm.set_defaults(func="demo")

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
    bn.add_argument("--setting", action="append", default=None, choices=list(RELEASED_SHAPE_SETTINGS),
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
    bn.set_defaults(func="bench")

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
    gen.set_defaults(func="generate")
    return parser



def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if getattr(args, "threads", 0) < 0:
        print(f"error: --threads must be 0 (torch's default) or more, got {args.threads}", file=sys.stderr)
        return 2
    # a command's implementation is imported when it runs: the data commands' module loads no
    # torch, the others' (segllm/commands.py) loads torch and the model code
    from segllm.data_commands import COMMANDS as DATA_COMMANDS

    try:
        if args.func in DATA_COMMANDS:
            return DATA_COMMANDS[args.func](args)
        from segllm.commands import COMMANDS, set_threads

        if getattr(args, "threads", 0):
            set_threads(args.threads)
        return COMMANDS[args.func](args)
    except (SegLLMError, ValueError) as e:  # bad input or arguments: a message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


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
    p.add_argument("--dtype", default="float32", choices=list(DTYPE_NAMES),
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
                            "a few percent faster a forward than without, after a first one that compiles for 20-60 s; others: no effect)")
        p.add_argument("--mask-region", default=None, choices=list(MASK_REGIONS),
                       help="which part of each mask to keep: every pixel the model marks (all), or only its connected "
                            "region with the most probability mass (most_confident; the bundled model's setting); "
                            "default: the checkpoint's")
        p.add_argument("--edge-filter", default=None, choices=("on", "off"),
                       help="each mask's edges filtered along the image's colours (on: the bundled model's setting) "
                            "or left as the decoder made them (off); default: the checkpoint's")


def _annotation_args(p: argparse.ArgumentParser) -> None:
    """Where the released datasets' masks are: the original's annotation config and single overrides."""
    p.add_argument("--annotation-config", metavar="YAML", default=None,
                   help="the original's annotation config (annotation_configs/*.yaml): each dataset's annotation "
                        "file under the annotations root (path; path_eval for evaluation)")
    p.add_argument("--annotation", action="append", default=[], metavar="NAME=PATH",
                   help="a dataset's annotation file or folder (relative to the annotations root, or absolute), over "
                        "the config; NAME_eval for evaluation's, e.g. reason_seg_eval=reason_seg/annotations/test (repeatable)")


class _RegionAction(argparse.Action):
    """Collects --region/--box/--point in the order given (their rounds are numbered so)."""

    def __call__(self, parser, namespace, values, option_string=None):
        getattr(namespace, self.dest).append(f"region {option_string.lstrip('-').replace('region', 'mask')} {values}")


if __name__ == "__main__":
    sys.exit(main())
