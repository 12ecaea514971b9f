"""numpy's random draws (``Generator`` over ``PCG64``), value for value, at Python speed.

Building one conversation makes several hundred small draws (``random()``, ``integers(n)``,
``permutation(4)``); through numpy's ``Generator`` each costs 1-5 microseconds of argument
handling around a few nanoseconds of generating. :class:`Draws` takes the same generator's raw
64-bit outputs in blocks (``bit_generator.random_raw``) and turns them into draws with numpy's
own algorithms (``numpy/random/src/distributions``: ``next_double``, Lemire's bounded integers,
the masked rejection of ``random_interval`` in ``shuffle``, Floyd's sampling in ``choice``), so
every draw equals what the numpy call would have given and the sequence of draws is the same
(tests/data/test_world_draws.py checks them against numpy call by call).

The 32-bit draws share numpy's buffer semantics: a raw 64-bit output serves two 32-bit draws
(low half first), and 64-bit draws (doubles) leave a buffered half in place.
"""

from __future__ import annotations

import numpy as np

_TWO_M53 = 1.0 / 9007199254740992.0  # numpy's next_double: (raw >> 11) * 2**-53
_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_BLOCK = 256  # raw outputs taken from the bit generator at a time
_MASKS = [(1 << i.bit_length()) - 1 for i in range(64)]  # random_interval's mask for max i


class Draws:
    """Draws of a ``numpy.random.Generator`` whose bit generator is ``PCG64``, from its state on.

    Supports what the world generator draws: :meth:`random`, :meth:`integers`, :meth:`uniform`,
    :meth:`permutation` (and :meth:`perm`, the same as a list), and :meth:`choice_indices`
    (``choice(n, size=k, replace=False)``). The raw outputs are taken from ``bit_generator``
    ahead of use; :meth:`sync` winds a generator back to exactly the state the numpy calls would
    have left it in.
    """

    __slots__ = ("_bg", "_gen", "_buf", "_raw", "_i", "_n", "_has32", "_u32")

    def __init__(self, bit_generator: np.random.PCG64, *, fresh: bool = False) -> None:
        if not isinstance(bit_generator, np.random.PCG64):
            raise TypeError(f"Draws needs a PCG64 bit generator, got {type(bit_generator).__name__}")
        self._bg = bit_generator
        self._gen: np.random.Generator | None = None  # over the same bit generator, for bulk draws
        if fresh:  # a newly seeded PCG64 holds no buffered half (reading .state builds a dict)
            self._has32, self._u32 = False, 0
        else:
            state = bit_generator.state
            self._has32 = bool(state["has_uint32"])
            self._u32 = int(state["uinteger"])
        self._buf: list[int] = []
        # the same raw outputs as a uint64 array, for bulk doubles (a list of Python ints above
        # 2**63 converts back to numpy slowly)
        self._raw = np.empty(0, dtype=np.uint64)
        self._i = self._n = 0

    @classmethod
    def from_seed(cls, seed) -> Draws:
        """The draws of ``np.random.default_rng(seed)``."""
        return cls(np.random.PCG64(seed), fresh=True)

    @classmethod
    def of(cls, rng: np.random.Generator | Draws) -> Draws:
        """rng itself if it is Draws, else draws of the numpy generator (call :meth:`sync` with
        it afterwards to leave it where its own calls would have)."""
        return rng if isinstance(rng, Draws) else cls(rng.bit_generator)

    def sync(self, rng: np.random.Generator | Draws) -> None:
        """Set rng's bit generator (the one these draws read) to the state the numpy calls would
        have left it in: the raw outputs taken ahead but not used are given back."""
        if rng is self:
            return
        bg = rng.bit_generator
        if bg is not self._bg:
            raise ValueError("sync: not the generator these draws were taken from")
        unused = self._n - self._i
        bg.advance((1 << 128) - unused if unused else 0)  # a full period back = unused draws
        state = bg.state
        state["has_uint32"] = int(self._has32)
        state["uinteger"] = self._u32  # numpy keeps a used half there too
        bg.state = state
        self._buf, self._i, self._n = [], 0, 0
        self._raw = np.empty(0, dtype=np.uint64)

    def _refill(self) -> None:
        self._raw = self._bg.random_raw(_BLOCK)
        self._buf = self._raw.tolist()
        self._i, self._n = 0, _BLOCK

    def _next64(self) -> int:
        i = self._i
        if i == self._n:
            self._refill()
            i = 0
        self._i = i + 1
        return self._buf[i]

    def _next32(self) -> int:
        if self._has32:
            self._has32 = False
            return self._u32
        i = self._i
        if i == self._n:
            self._refill()
            i = 0
        self._i = i + 1
        v = self._buf[i]
        self._has32 = True
        self._u32 = v >> 32
        return v & _M32

    # -- numpy's draws -----------------------------------------------------------------------------

    def random(self) -> float:
        """``Generator.random()``."""
        i = self._i
        if i == self._n:
            self._refill()
            i = 0
        self._i = i + 1
        return (self._buf[i] >> 11) * _TWO_M53

    def _bounded32(self, rng: int) -> int:
        """numpy's buffered_bounded_lemire_uint32: uniform in [0, rng], 0 < rng < 2**32 - 1."""
        excl = rng + 1
        m = self._next32() * excl
        left = m & _M32
        if left < excl:
            threshold = (_M32 - rng) % excl
            while left < threshold:
                m = self._next32() * excl
                left = m & _M32
        return m >> 32

    def _bounded64(self, rng: int) -> int:
        """numpy's random_bounded_uint64 (Lemire, unmasked): uniform in [0, rng]."""
        if rng == 0:
            return 0
        if rng <= _M32:
            if rng == _M32:
                return self._next32()
            return self._bounded32(rng)
        if rng == _M64:
            return self._next64()
        excl = rng + 1
        m = self._next64() * excl
        left = m & _M64
        if left < excl:
            threshold = (_M64 - rng) % excl
            while left < threshold:
                m = self._next64() * excl
                left = m & _M64
        return m >> 64

    def integers(self, low: int, high: int | None = None) -> int:
        """``int(Generator.integers(low, high))`` (one int64 draw in [low, high))."""
        if high is None:
            low, high = 0, low
        excl = high - low  # ints here; numpy's own arguments would be converted
        if excl <= 0:
            raise ValueError("high <= low")
        if excl == 1:
            return low
        if excl > _M32:
            return int(low) + self._bounded64(excl - 1)
        # _bounded32(excl - 1) with _next32 inlined (the most common draw)
        if self._has32:
            self._has32 = False
            v = self._u32
        else:
            i = self._i
            if i == self._n:
                self._refill()
                i = 0
            self._i = i + 1
            raw = self._buf[i]
            self._has32 = True
            self._u32 = raw >> 32
            v = raw & _M32
        m = v * excl
        if (m & _M32) < excl:
            threshold = (_M32 - excl + 1) % excl
            while (m & _M32) < threshold:
                m = self._next32() * excl
        return low + (m >> 32)

    def doubles_into(self, out: np.ndarray) -> np.ndarray:
        """Fill a C-contiguous float64 array with ``Generator.random()`` draws, in its order
        (``Generator.random(out=out)``); returns out."""
        if out.dtype != np.float64 or not out.flags.c_contiguous:
            raise ValueError("doubles_into needs a C-contiguous float64 array")
        flat = out.reshape(-1)
        m = min(self._n - self._i, flat.size)
        if m:
            head = self._raw[self._i:self._i + m] >> np.uint64(11)
            np.multiply(head, _TWO_M53, out=flat[:m])  # exact: 53-bit integers times 2**-53
            self._i += m
        if m < flat.size:  # the buffer is used up: the bit generator is where the draws are
            if self._gen is None:
                self._gen = np.random.Generator(self._bg)
            self._gen.random(out=flat[m:])
        return out

    def uniform(self, low: float = 0.0, high: float = 1.0, size=None):
        """``Generator.uniform(low, high, size)`` for scalar bounds: a float, or a float64 array
        of shape ``size``."""
        low, high = float(low), float(high)
        span = high - low
        if size is None:
            return low + span * self.random()
        d = self.doubles_into(np.empty(size, dtype=np.float64))
        d *= span  # low + span * double, as numpy's random_uniform
        d += low
        return d

    def perm(self, n: int) -> list[int]:
        """``Generator.permutation(n).tolist()``: numpy's shuffle of ``arange(n)`` (masked
        rejection, ``random_interval``, from the last position down)."""
        return self.shuffled(range(n))

    def shuffled(self, seq) -> list:
        """``[seq[i] for i in Generator.permutation(len(seq))]``, with the same draws: numpy's
        swaps applied to the items themselves."""
        a = list(seq)
        return a if len(a) < 2 else self.shuffled_levels((a,))[0]

    def shuffled_levels(self, levels, *, keep: bool = True) -> list | None:
        """``[seq if len(seq) < 2 else self.shuffled(seq) for seq in levels]`` (the same draws,
        level after level) in one call: the world draws a permutation of every level of a
        candidate's heads at once, most of them of 2 to 6 items, where a call per level costs
        as much as its draws. With ``keep=False`` only the draws are made (None is returned): a
        caller that needs just the generator's state after them builds no lists."""
        buf, j, end, has, u32 = self._buf, self._i, self._n, self._has32, self._u32
        out = [] if keep else None
        for seq in levels:
            n = len(seq)
            if n < 2:
                if keep:
                    out.append(seq)
                continue
            a = list(seq) if keep else None
            for i in range(n - 1, 0, -1):
                mask = _MASKS[i] if i < 64 else (1 << i.bit_length()) - 1
                while True:
                    if has:
                        has = False
                        v = u32 & mask
                    else:
                        if j == end:
                            self._refill()
                            buf, j, end = self._buf, 0, self._n
                        raw = buf[j]
                        j += 1
                        has = True
                        u32 = raw >> 32
                        v = raw & mask
                    if v <= i:
                        break
                if keep:
                    a[i], a[v] = a[v], a[i]
            if keep:
                out.append(a)
        self._i, self._has32, self._u32 = j, has, u32
        return out

    def permutation(self, n: int) -> np.ndarray:
        """``Generator.permutation(n)`` for an int n."""
        return np.array(self.perm(n), dtype=np.int64)

    def choice_indices(self, n: int, k: int) -> list[int]:
        """``Generator.choice(n, size=k, replace=False).tolist()`` for n <= 10000 (Floyd's
        sampling, then a shuffle of the k picks)."""
        if not 0 <= k <= n:
            raise ValueError(f"cannot take {k} of {n} without replacement")
        if n > 10000:
            raise ValueError("choice_indices follows numpy only for n <= 10000")
        picked: list[int] = []
        seen: set[int] = set()
        for j in range(n - k, n):
            v = self._bounded64(j)
            if v in seen:
                v = j
            seen.add(v)
            picked.append(v)
        for i in range(k - 1, 0, -1):  # numpy's _shuffle_int: bounded draws, not masked
            j = self._bounded64(i)
            picked[i], picked[j] = picked[j], picked[i]
        return picked
