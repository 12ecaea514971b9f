"""The ``segllm`` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from segllm.errors import SegLLMError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segllm", description="Multi-round reasoning segmentation with mask memory.")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="segment objects in an image, round by round (interactive, --ask or --script)")
    chat.add_argument("image", nargs="?", help="image file (default: the bundled example image and its conversation)")
    chat.add_argument("--ask", action="append", default=[], metavar="QUESTION",
                      help="a round's question; repeat for more rounds; '[REF:k]' or 'instance k' refers to round k")
    chat.add_argument("--script", metavar="FILE",
                      help="a prepared conversation: one question per line ('undo' and 'clear' allowed, '#' comments), "
                           "or a JSON file {\"questions\": [...]}")
    chat.add_argument("--checkpoint", help="model folder (default: the bundled model)")
    chat.add_argument("--out", default="segllm-out", help="folder for overlays, masks and session.json (default: %(default)s)")
    chat.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: %(default)s)")
    chat.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    chat.add_argument("--max-new-tokens", type=int, default=32)
    chat.add_argument("--full-recompute", action="store_true",
                      help="recompute the whole conversation every round (the released demo's way; slower)")
    chat.set_defaults(func=_chat)

    world = sub.add_parser("world", help="write splits of the procedural multi-round world to a folder")
    world.add_argument("out", help="output folder (one subfolder per split)")
    for split, n in (("train", 10000), ("val", 500), ("test", 500), ("heldout", 500)):
        world.add_argument(f"--{split}", type=int, default=n, help=f"conversations in the {split} split (default: %(default)s)")
    world.add_argument("--seed", type=int, default=0)
    world.add_argument("--workers", type=int, default=1)
    world.set_defaults(func=_world)

    tr = sub.add_parser("train", help="train a model from a recipe (a TOML file, e.g. configs/default.toml)")
    tr.add_argument("recipe", help="recipe file")
    tr.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint-last")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe value, e.g. --set steps=100 --set output_dir=runs/x (VALUE is TOML)")
    tr.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="per-round cIoU / mIoU / P@0.5 under the oracle and own history protocols")
    ev.add_argument("--checkpoint", help="model folder (default: the bundled model)")
    ev.add_argument("--data", default="world", help="'world' or a dataset folder (default: %(default)s)")
    ev.add_argument("--split", default="test", help="world split: train, val, test, heldout (default: %(default)s)")
    ev.add_argument("--size", type=int, default=500, help="conversations (default: %(default)s)")
    ev.add_argument("--seed", type=int, default=0, help="world seed (default: %(default)s)")
    ev.add_argument("--protocol", nargs="+", default=["oracle", "own"], choices=["oracle", "own"])
    ev.add_argument("--out", default="segllm-eval", help="folder for JSON, CSV and the plot (default: %(default)s)")
    ev.add_argument("--name", default="eval", help="base name of the report files (default: %(default)s)")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.set_defaults(func=_eval)

    dm = sub.add_parser("demo", help="a web demo (Gradio) on localhost")
    dm.add_argument("--checkpoint", help="model folder (default: the bundled model)")
    dm.add_argument("--host", default="127.0.0.1", help="address to serve on (default: %(default)s)")
    dm.add_argument("--port", type=int, default=7860)
    dm.add_argument("--device", default="cpu")
    dm.add_argument("--max-side", type=int, default=4096, help="largest image side accepted, pixels (default: %(default)s)")
    dm.set_defaults(func=_demo)

    bn = sub.add_parser("bench", help="per-round latency, incremental vs full recompute (bundled and a large-LLM model)")
    bn.add_argument("--rounds", type=int, default=8)
    bn.add_argument("--repeats", type=int, default=3)
    bn.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    bn.add_argument("--no-large", action="store_true", help="skip the large-LLM configuration")
    bn.add_argument("--width", type=int, default=4096, help="LLM width of the large configuration")
    bn.add_argument("--layers", type=int, default=2, help="LLM layers of the large configuration")
    bn.add_argument("--json", help="also write the raw results here")
    bn.set_defaults(func=_bench)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        return args.func(args)
    except SegLLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _script_lines(path: Path) -> list[str]:
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
        return list(data["questions"] if isinstance(data, dict) else data)
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _chat(args: argparse.Namespace) -> int:
    import torch

    from segllm.default import EXAMPLES
    from segllm.session import Session

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
        args.checkpoint, image_path, device=args.device, dtype=getattr(torch, args.dtype),
        incremental=not args.full_recompute, max_new_tokens=args.max_new_tokens,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if interactive:
        print("Ask a question per round; '[REF:k]' or 'instance k' refers to round k. Commands: undo, clear, exit.")
        lines = _prompt_lines(session)
    elif lines is None:
        lines = (line.strip() for line in sys.stdin if line.strip())
    errors = 0
    for line in lines:
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
            r = session.ask(line)
        except SegLLMError as e:
            errors += 1
            print(f"error: {e}", file=sys.stderr)
            continue
        session.overlay().save(out / f"round{r.round}_overlay.png")
        boxes = ", ".join(f"[{', '.join(f'{v:.0f}' for v in b)}] score {s:.2f}" for b, s in zip(r.boxes, r.scores))
        ref_note = f" (refers to {', '.join(map(str, r.refs))})" if r.refs else ""
        print(f"round {r.round}{ref_note}: {r.question}\n  -> {r.text!r}{' (forced)' if r.forced else ''}  {boxes}")
    session.save_masks(out)
    (out / "session.json").write_text(json.dumps(session.to_coco(file_name=Path(image_path).name), indent=1) + "\n")
    print(f"overlays, masks and session.json written to {out}/")
    return 1 if errors and not interactive else 0


def _prompt_lines(session):
    while True:
        try:
            yield input(f"round {len(session.history) + 1}> ").strip()
        except EOFError:
            print()
            return


def _world(args: argparse.Namespace) -> int:
    from segllm.data.world import WorldConfig, generate

    counts = {k: getattr(args, k) for k in ("train", "val", "test", "heldout") if getattr(args, k) > 0}
    generate(args.out, counts, seed=args.seed, config=WorldConfig(), workers=args.workers)
    print(f"wrote {', '.join(f'{k}: {v}' for k, v in counts.items())} conversations to {args.out}/")
    return 0


def _train(args: argparse.Namespace) -> int:
    import tomllib

    from segllm.train.recipe import TrainRecipe
    from segllm.train.trainer import train

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
    recipe = TrainRecipe.load(args.recipe, overrides)
    summary = train(recipe, resume=args.resume)
    print(f"trained to step {summary.steps}; checkpoint in {recipe.output_dir}/checkpoint-last/model")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from segllm.data.records import ConversationFolder, WorldConversations
    from segllm.default import load_model
    from segllm.eval.evaluate import evaluate, format_table
    from segllm.eval.report import write_reports

    model = load_model(args.checkpoint, device=args.device)
    if args.data == "world":
        data = WorldConversations(args.split, args.size, seed=args.seed)
        where = f"world seed {args.seed}, {args.split} split, {args.size} conversations"
    else:
        data = ConversationFolder(args.data)
        where = f"{args.data} ({min(args.size, len(data))} conversations)"
    results = [evaluate(model, data, protocol=p, limit=args.size, batch_size=args.batch_size, progress=True) for p in args.protocol]
    print(format_table(results, title=f"{args.checkpoint or 'bundled model'} on {where} (metrics at original resolution)"))
    skipped = max(len(r.skipped) for r in results)
    if skipped:
        print(f"skipped {skipped} unusable record(s) (listed in the JSON report)")
    paths = write_reports(results, args.out, name=args.name, meta={"checkpoint": args.checkpoint or "bundled", "data": where})
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _demo(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: the web demo needs gradio: pip install 'segllm[demo]'", file=sys.stderr)
        return 2
    from segllm.demo import launch

    launch(args.checkpoint, host=args.host, port=args.port, device=args.device, max_side=args.max_side)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from segllm.bench import main as bench_main

    return bench_main(args)


if __name__ == "__main__":
    sys.exit(main())
