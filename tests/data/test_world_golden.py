"""The world generator's output is pinned: the same (seed, split, index, config) gives the same
conversation, image, masks, dense maps and candidates, byte for byte.

The digests below were computed from the generator before it was made fast (issue 18; commit
1f621ee of main), so any change to what it generates fails here. The ``multi`` case (several-target
rounds, ``multi_target_prob`` > 0; 111 all, 62 one-of and 36 pick rounds among its 300) was
computed from main's generator at 24fc536 (multi17, drawing through numpy's Generator), so it
also checks that the fast generator's ``Draws`` give those rounds the same draws. ``GENERATOR_VERSION`` names
these conversations: the bundled model and its published figures were trained and measured on
them.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest

from segllm.data.records import WorldConversations
from segllm.data.world import GENERATOR_VERSION, World, WorldConfig

# (name, seed, config overrides, max_rounds of the dataset, [(split, first index, count)])
CASES = [
    ("default", 0, {}, 8, [("train", 0, 60), ("val", 0, 25), ("test", 500, 25), ("heldout", 0, 25)]),
    ("varied", 7, {"image_size": 96, "max_objects": 6, "max_rounds": 10, "pick_prob": 0.5,
                   "composite_prob": 0.5, "ref_prob": 0.7}, None,
     [("train", 1000, 25), ("heldout", 40, 15)]),
    # several-target rounds (multi17) drawn through Draws: pinned from main's numpy generator
    ("multi", 3, {"multi_target_prob": 0.5, "pick_prob": 0.3}, None,
     [("train", 0, 30), ("test", 200, 15), ("heldout", 0, 15)]),
]

GOLDEN = {'default': {'heldout[0:25]': 'd3c1db5189a810c607605da9a3104d5f87fdaa22a95b72b6cd1c32fdcd0d6fd4',
             'test[500:525]': 'a64b99e484bcf61b64eafd08dd5f27d350dde88ac9ca436ed20079de9467d72d',
             'train[0:60]': '107f92ff31776a24fc3ef5f345e8d2a8072571b86717d8fff0c4502840bc5b86',
             'val[0:25]': '0d7fb76f813747641c33303292d7db6ffffcce93e88ed13a1e37c4ce5b4c1e7f'},
 'varied': {'heldout[40:55]': '878828c9bef5e287257f02ce5b42f0d8abe0b0475d4489f052b230d9bd4f4e79',
            'train[1000:1025]': '6f45d668f6647b05c6bfb632384960f9e4315513971ce158394cdbe68aa1c51e'},
 'multi': {'heldout[0:15]': 'c797ecde4bf42417c396068a53405d9991d375fd2f81c479546db752831cfbe0',
           'test[200:215]': '3518b52db8da31d9f34f2fad49ac482855b0dc86d7285626b001f7b6ef876d48',
           'train[0:30]': 'e3f9b3f91285286e77222f7cf849b4a11d35c29ae2ba86c7aa5f48f2fab73973'}}


def _feed(h, obj) -> None:
    """Feed a canonical byte form of obj (arrays, dataclasses, containers, scalars) to h."""
    if isinstance(obj, np.ndarray):
        h.update(f"nd{obj.dtype.str}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        h.update(f"dc{type(obj).__name__}".encode())
        for f in dataclasses.fields(obj):
            h.update(f.name.encode())
            _feed(h, getattr(obj, f.name))
    elif isinstance(obj, dict):
        h.update(f"d{len(obj)}".encode())
        for k in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    elif obj is None or isinstance(obj, (bool, int, float, str, np.generic)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(f"cannot digest {type(obj).__name__}")


def digests(name: str) -> dict[str, str]:
    """Per (split, range): one digest of every sample's fields and dataset item."""
    _, seed, overrides, max_rounds, ranges = next(c for c in CASES if c[0] == name)
    config = WorldConfig(**overrides)
    world = World(config, seed=seed)
    out = {}
    for split, start, count in ranges:
        data = WorldConversations(split, start + count, seed=seed, config=config, max_rounds=max_rounds)
        h = hashlib.sha256()
        for i in range(start, start + count):
            s = world.sample(split, i)
            _feed(h, [s.split, s.index, s.image, s.masks, s.objects, s.record, s.queries,
                      s.needs_memory, s.text_resolvable, s.alternatives])
            _feed(h, data[i])
        out[f"{split}[{start}:{start + count}]"] = h.hexdigest()
    return out


def test_generator_version_unchanged() -> None:
    assert GENERATOR_VERSION == "segllm-world/1"


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_world_output_matches_pinned_digests(name: str) -> None:
    assert digests(name) == GOLDEN[name]


if __name__ == "__main__":  # print the digests of the code in use (to pin them)
    import pprint

    pprint.pprint({c[0]: digests(c[0]) for c in CASES}, width=110)
