"""The released recipes' data mix: one source per global batch, drawn uniformly, with replacement."""

import numpy as np
import pytest

from segllm.data.mix import MixedConversations
from segllm.data.records import Skipped


class Source:
    def __init__(self, name, n, bad=()):
        self.name, self.n, self.bad, self.skipped = name, n, set(bad), Skipped()

    def __len__(self):
        return self.n

    def get(self, i):
        if i in self.bad:
            self.skipped.add(f"{self.name}[{i}]", "broken")
            return None
        return (self.name, i)


def test_one_source_per_global_batch_uniformly_and_deterministically():
    mix = MixedConversations([Source("a", 5), Source("b", 1000), Source("c", 3)], global_batch=4, seed=1)
    steps = [[mix.get(s * 4 + k) for k in range(4)] for s in range(600)]
    for batch in steps:
        assert len({name for name, _ in batch}) == 1  # every draw of a step from one source
    counts = {n: sum(b[0][0] == n for b in steps) for n in "abc"}
    assert all(150 < c < 250 for c in counts.values())  # uniform over sources, not over their sizes
    again = MixedConversations([Source("a", 5), Source("b", 1000), Source("c", 3)], global_batch=4, seed=1)
    assert [again.get(i) for i in range(40)] == [x for b in steps[:10] for x in b]
    other = MixedConversations([Source("a", 5), Source("b", 1000), Source("c", 3)], global_batch=4, seed=2)
    assert [other.get(i) for i in range(40)] != [again.get(i) for i in range(40)]
    # with replacement: a 3-conversation source serves whole batches
    c_batches = [b for b in steps if b[0][0] == "c"]
    assert any(len({i for _, i in b}) < 4 for b in c_batches)


def test_skips_are_counted_and_bad_mixes_refused():
    mix = MixedConversations([Source("a", 2, bad={0, 1})], global_batch=2)
    assert mix.get(0) is None and len(mix.skipped) == 1
    with pytest.raises(ValueError, match="no conversations"):
        MixedConversations([Source("a", 0)], global_batch=2)
    with pytest.raises(ValueError, match="at least one"):
        MixedConversations([], global_batch=2)


def test_a_recipe_with_a_mix_trains(tmp_path):
    from pathlib import Path

    from segllm.cli import main
    from segllm.data.world import write_split

    folder = write_split(tmp_path / "w", "train", 6, seed=3)
    recipe = Path(__file__).resolve().parents[2] / "configs" / "test_tiny.toml"
    args = ["train", str(recipe), "--set", f'output_dir="{tmp_path / "run"}"', "--set", "steps=2", "--set", "save_every=2",
            "--set", f'data.mix=["world", "{folder}"]']
    assert main(args) == 0
    import json

    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and np.isfinite(losses).all()
    assert (tmp_path / "run" / "checkpoint-last" / "model" / "model.safetensors").is_file()
