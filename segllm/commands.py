"""What each ``segllm`` command that loads a model does (:mod:`segllm.cli` parses the command line
and calls these; the data commands are in :mod:`segllm.data_commands`)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState

from segllm import SegLLM
from segllm.batch_segment import merge_results, read_items, segment_items
from segllm.bench import main as bench_main
from segllm.config import DTYPE_NAMES
from segllm.conversation import load_image
from segllm.convert_weights import pickle_to_safetensors
from segllm.data.benchmark_readers import read_templates
from segllm.data.check import DataMissingError
from segllm.data.records import ConversationFolder, WorldConversations
from segllm.data.released.configs import parse_annotation_overrides
from segllm.data.world import WorldConfig
from segllm.data_commands import annotation_overrides, eval_conversations
from segllm.default import EXAMPLES, load_model
from segllm.errors import ConversationError, SegLLMError
from segllm.eval.benchmarks import BENCHMARKS, Roots, check_benchmark, default_frame, open_benchmark, paper_lines
from segllm.eval.evaluate import evaluate, evaluate_baseline, format_table, read_logs
from segllm.eval.report import write_reports
from segllm.eval.suite import RELEASED_CHECKPOINTS, SUITES, checkpoint_path, run_suite, suite_markdown
from segllm.model.parts import write_parts
from segllm.session import Session
from segllm.train.recipe import TrainRecipe
from segllm.train.trainer import train
from segllm.viz import mask_labels

# --dtype's names -> torch dtypes
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}


def set_threads(n: int) -> None:
    """--threads: torch's CPU threads for the command."""
    torch.set_num_threads(n)


def _edge_filter(args: argparse.Namespace) -> bool | None:
    """--edge-filter on/off -> True/False; not given -> None (the checkpoint's setting)."""
    return None if args.edge_filter is None else args.edge_filter == "on"


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
                            generate=args.generate, max_new_tokens=args.max_new_tokens, lanes=args.lanes)
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
            rank=state.process_index, world_size=state.num_processes, lanes=args.lanes, max_new_tokens=args.max_new_tokens,
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
    conversations = eval_conversations(args, roots)
    overrides = annotation_overrides(args)
    # the data check first: a missing image set or annotation file stops here, before any model loads
    check = check_benchmark(args.benchmark, roots, split=split, conversations=conversations, overrides=overrides)
    if not check.runnable:
        raise DataMissingError(check)
    data, where = open_benchmark(args.benchmark, roots, split=split, conversations=conversations,
                                 templates=templates, max_rounds=args.max_rounds, overrides=overrides)
    return data, where, args.protocol or [BENCHMARKS[args.benchmark].protocol], split


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


# `segllm <command>` -> its implementation, for the commands that load torch (segllm/cli.py
# dispatches the data commands to segllm/data_commands.py)
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "chat": _chat,
    "segment": _segment,
    "train": _train,
    "eval": _eval,
    "parts": _parts,
    "merge-lora": _merge_lora,
    "convert-weights": _convert_weights,
    "demo": _demo,
    "bench": _bench,
}
