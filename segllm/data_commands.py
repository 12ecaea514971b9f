"""The ``segllm`` commands that work on data and load no model (``world``, ``data check``,
``generate``), and the data options the model commands share: they import no torch, so they
start at once (:mod:`segllm.cli` dispatches them here; the others are in :mod:`segllm.commands`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from segllm.data.check import MIXES, DataCheck, check_mix, check_released_mix, format_checks
from segllm.data.generate import PLAIN_ANSWERS, VARIED_ANSWERS, generate_from_coco
from segllm.data.released.configs import parse_annotation_overrides, read_annotation_config, read_conversation_config
from segllm.data.world import WorldConfig
from segllm.data.world import generate as generate_world
from segllm.errors import ConfigError
from segllm.eval.benchmarks import BENCHMARKS, Roots, check_benchmark


def world(args: argparse.Namespace) -> int:
    """``segllm world OUT``: write splits of the procedural world, and say how much of each a
    text-only model could answer."""
    counts = {k: getattr(args, k) for k in ("train", "val", "test", "heldout") if getattr(args, k) > 0}
    try:
        config = WorldConfig(multi_target_prob=args.multi_target_prob)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shares = generate_world(args.out, counts, seed=args.seed, config=config, workers=args.workers)
    print(f"wrote {', '.join(f'{k}: {v}' for k, v in counts.items())} conversations to {args.out}/")
    # how much of each split a text-only model could answer (the rest needs the masks)
    for split, sh in shares.items():
        if sh["rounds"]:
            late = (f"{100 * sh['late_share']:.1f}% of {sh['late_rounds']} rounds >= {sh['late_round']}"
                    if sh["late_rounds"] else f"no rounds >= {sh['late_round']}")
            print(f"{split}: text-resolvable {100 * sh['share']:.1f}% of {sh['rounds']} rounds, {late}")
    return 0


def data_check(args: argparse.Namespace) -> int:
    """``segllm data check DATA``: which benchmarks and training mixes a data root can run (exit 1
    when one cannot)."""
    roots = Roots(Path(args.root))
    overrides = annotation_overrides(args)
    checks = []
    benchmarks = args.benchmark if args.benchmark or args.mix else [
        b for b in BENCHMARKS if BENCHMARKS[b].kind != "released" or BENCHMARKS[b].conversations or args.conversations]
    for name in benchmarks:
        # --conversations is the file of the benchmarks named; checking them all, it is the 'released' one's
        named = bool(args.benchmark) or name == "released"
        conversations = eval_conversations(args, roots) if BENCHMARKS[name].kind == "released" and named else None
        checks.append(check_benchmark(name, roots, split=args.split, conversations=conversations, overrides=overrides))
    for mix in args.mix if args.benchmark or args.mix else list(MIXES):
        checks.append(mix_check(mix, roots, overrides))
    if args.json:
        print(json.dumps({"root": str(roots.root), "runnable": all(c.runnable for c in checks),
                          "checks": [c.to_dict() for c in checks]}, indent=1))
    else:
        print(format_checks(checks, root=roots.root))
    return 0 if all(c.runnable for c in checks) else 1


def mix_check(mix: str, roots: Roots, overrides: dict[str, str]) -> DataCheck:
    """The data check of a training mix given to ``segllm data check --mix``."""
    suffix = Path(mix).suffix.lower()
    if suffix == ".toml":  # a recipe's data: read as the trainer reads it (which loads torch)
        from segllm.train.recipe import TrainRecipe
        from segllm.train.trainer import check_data

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


def generate(args: argparse.Namespace) -> int:
    """``segllm generate INSTANCES_JSON``: multi-round conversations from COCO-style annotations."""
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


def eval_conversations(args: argparse.Namespace, roots: Roots) -> str | list[str] | None:
    """``--conversations``: a conversation file, or the files a conversation config (YAML) lists."""
    given = args.conversations
    if given is None or Path(given).suffix.lower() not in (".yaml", ".yml"):
        return given
    folder = Path(args.conversation_folder) if args.conversation_folder else roots.get("conversations") / "all_data_mix_val"
    return [str(folder / name) for name in read_conversation_config(given)]


def annotation_overrides(args: argparse.Namespace) -> dict[str, str]:
    """``--annotation-config`` and ``--annotation NAME=PATH``: each dataset's annotation path."""
    listed = read_annotation_config(args.annotation_config) if args.annotation_config else {}
    return {**listed, **parse_annotation_overrides(args.annotation)}


# `segllm <command>` -> its implementation, for the commands that load no model
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"world": world, "data check": data_check, "generate": generate}
