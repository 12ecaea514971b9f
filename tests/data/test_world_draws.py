"""Draws (segllm/data/world/draws.py) gives numpy's Generator draws value for value, in the same
order, and leaves a numpy generator where numpy's own calls would have left it."""

from __future__ import annotations

import random

import numpy as np
import pytest

from segllm.data.world.draws import Draws


def _ops(r: random.Random) -> list[tuple]:
    ops: list[tuple] = []
    for _ in range(r.randint(0, 50)):
        x = r.random()
        if x < 0.2:
            ops.append(("random",))
        elif x < 0.38:
            ops.append(("integers", (r.randint(1, 20),) if r.random() < 0.5 else (r.randint(-5, 5), r.randint(6, 300))))
        elif x < 0.41:  # the 32-bit edge and the 64-bit ranges
            ops.append(("integers", (r.choice([2**32 - 1, 2**32, 2**32 + 1, 2**40 + 7, 2**63 - 1]),)))
        elif x < 0.6:
            ops.append(("perm", r.randint(0, 14)))
        elif x < 0.68:
            ops.append(("shuffled", r.randint(0, 9)))
        elif x < 0.72:  # several levels in one call, sizes 0 to 7 (heads: 1, 4, 6, 4, 1), permuted or only drawn
            ops.append((r.choice(["levels", "skip"]), tuple(r.randint(0, 7) for _ in range(r.randint(0, 5)))))
        elif x < 0.76:
            ops.append(("uniform", r.uniform(-30, 30), r.uniform(30, 200)))
        elif x < 0.84:  # bulk doubles, crossing the buffered block (256 raw outputs)
            ops.append(("uniform_size", r.uniform(-30, 0), 12.0, r.choice([3, (4, 5, 1), (1,), 300, (20, 20, 3)])))
        else:
            n = r.randint(1, 12)
            ops.append(("choice", n, r.randint(0, n)))
    return ops


def _both(op: tuple, g: np.random.Generator, d: Draws):
    kind = op[0]
    if kind == "random":
        return g.random(), d.random()
    if kind == "integers":
        return int(g.integers(*op[1])), d.integers(*op[1])
    if kind == "perm":
        return g.permutation(op[1]).tolist(), d.perm(op[1])
    if kind == "shuffled":
        items = [f"x{i}" for i in range(op[1])]
        return [items[i] for i in g.permutation(op[1])], d.shuffled(items)
    if kind == "levels":
        levels = [tuple(f"h{k}.{i}" for i in range(n)) for k, n in enumerate(op[1])]
        want = [lv if len(lv) < 2 else [lv[i] for i in g.permutation(len(lv))] for lv in levels]
        return want, d.shuffled_levels(levels)
    if kind == "skip":  # the same draws, nothing returned
        for n in op[1]:
            g.permutation(n)
        return None, d.shuffled_levels([tuple(range(n)) for n in op[1]], keep=False)
    if kind == "uniform":
        return g.uniform(op[1], op[2]), d.uniform(op[1], op[2])
    if kind == "uniform_size":
        return g.uniform(op[1], op[2], size=op[3]), d.uniform(op[1], op[2], size=op[3])
    return g.choice(op[1], size=op[2], replace=False).tolist(), d.choice_indices(op[1], op[2])


def test_draws_equal_numpy_call_by_call_and_sync_restores_the_state() -> None:
    r = random.Random(0)
    for seed in range(400):
        g = np.random.default_rng([seed, 5])
        h = np.random.default_rng([seed, 5])
        d = Draws(h.bit_generator)
        for op in _ops(r):
            a, b = _both(op, g, d)
            if isinstance(a, np.ndarray):
                assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), (seed, op)
            else:
                assert a == b and type(a) is type(b), (seed, op, a, b)
        d.sync(h)
        assert h.bit_generator.state == g.bit_generator.state, seed
        assert h.random() == g.random() and h.integers(2**32) == g.integers(2**32)


def test_from_seed_is_default_rng() -> None:
    g = np.random.default_rng([3, 1, 17])
    d = Draws.from_seed([3, 1, 17])
    assert [d.integers(9) for _ in range(21)] == [int(g.integers(9)) for _ in range(21)]
    # bulk doubles from the buffered raw outputs (a half of one left over), then past them
    assert np.array_equal(d.uniform(-1, 1, size=(40, 30)), g.uniform(-1, 1, size=(40, 30)))
    assert d.random() == g.random()


def test_bad_input_is_refused() -> None:
    with pytest.raises(TypeError, match="PCG64"):
        Draws(np.random.MT19937(0))
    d = Draws.from_seed(0)
    with pytest.raises(ValueError, match="high <= low"):
        d.integers(3, 3)
    with pytest.raises(ValueError, match="without replacement"):
        d.choice_indices(3, 4)
    with pytest.raises(ValueError, match="C-contiguous float64"):
        d.doubles_into(np.empty((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="not the generator"):
        d.sync(np.random.default_rng(0))
