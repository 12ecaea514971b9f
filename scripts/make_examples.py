"""Write the example images and conversations bundled in segllm/assets/examples/.

They come from the multi-round world's test split (seed 0), so the bundled model has seen
their kind but never these scenes. Run: python scripts/make_examples.py
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from segllm.data.world import World, WorldConfig

OUT = Path(__file__).resolve().parents[1] / "segllm" / "assets" / "examples"
NAMES = ("shapes", "scene2", "scene3")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    world = World(WorldConfig(), seed=0)
    index = 0
    for name in NAMES:
        # the first test scenes with 4+ rounds, at least two of which refer to earlier ones
        while True:
            s = world.sample("test", index)
            index += 1
            rounds = s.record["rounds"]
            if len(rounds) >= 4 and sum(bool(r["refs"]) for r in rounds) >= 2:
                break
        index_used = index - 1
        Image.fromarray(s.image).save(OUT / f"{name}.png")
        rounds = s.record["rounds"]
        questions = [r["question"] + "".join(f" [REF:{k}]" for k in r["refs"] if f"instance {k}" not in r["question"]) for r in rounds]
        (OUT / f"{name}.json").write_text(json.dumps({"source": f"world seed 0, test split, index {index_used}", "questions": questions}, indent=2) + "\n")
        print(name, len(rounds), "rounds")


if __name__ == "__main__":
    main()
