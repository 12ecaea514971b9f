"""Evaluate the bundled default model on the fixed test slice and write the figures that
``tests/test_default_model.py`` pins and the README states.

    python scripts/bundled_slice.py            # writes docs/results/bundled_slice.json
"""

from __future__ import annotations

import json
from pathlib import Path

from segllm.data.records import WorldConversations
from segllm.default import load_model
from segllm.eval.evaluate import evaluate

OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "bundled_slice.json"
SLICE = {"world_seed": 0, "split": "test", "conversations": 40}


def main() -> None:
    model = load_model()
    data = WorldConversations(SLICE["split"], SLICE["conversations"], seed=SLICE["world_seed"])
    figures = {}
    for protocol in ("oracle", "own"):
        result = evaluate(model, data, protocol=protocol, batch_size=16)
        figures[protocol] = round(result.metrics["all"]["cIoU"], 2)
    OUT.write_text(json.dumps({"slice": SLICE, "cIoU_all_rounds": figures}, indent=2) + "\n")
    print(f"{OUT}: {figures}")


if __name__ == "__main__":
    main()
