"""Opt-in ``torch.compile`` of HIPIE's two heaviest steps of CPU inference (see
:meth:`~segllm.decoders.hipie.decoder.HipieDecoder.set_compiled`).

What is compiled: the image encoder's ResNet-50 and input projections (prompt-independent, once
per image; float32 weights only, bfloat16 runs the eager folded path, which is faster) and one chunk of an encoder layer (sampling points, deformable sampling, output
projection, norms and FFN over about 1,024 tokens). TorchInductor compiles them with the weights
frozen as constants, which lets it fold the frozen batch norms into the convolutions, pre-pack the
convolution weights for oneDNN and fuse the elementwise steps; the linear layers are oneDNN calls
it leaves as they are (:mod:`segllm.linear`). Measured at 2 threads
(``scripts/bench_released_parts.py``): the image step about 2.8x faster, the encoder layers about
1.1x; the outputs equal the eager fast mode's to a few 1e-6 of their scale.

Why only these: they are most of a forward's time, and their shapes are fixed for a 1024-pixel
canvas (an encoder chunk is always [1, 992, C] there, ``transformer.compiled_chunk_size``: the
last chunk is padded, prompts go one by one),
so each compiles once per layer and never again; the rest (the decoder, heads, post-processing)
changes shape with the prompts and the selected queries.

Frozen weights are copies baked into the compiled code, so a change of the weights after a
compilation (an optimizer step, ``load_state_dict``, ``.to()``) would go unnoticed by the compiled
code; every call therefore checks each weight's storage and version counter and compiles anew when
one changed. A compilation that fails (no C++ compiler, an unsupported operation; at the first
call, or later when the compiler itself fails) warns once and leaves that step uncompiled.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# compiled code objects per function: one per encoder layer (6) of one or two decoders, plus the
# image step; above torch's default of 8, dynamo would silently run the rest uncompiled
_RECOMPILE_LIMIT = 64


class FrozenCompiled:
    """``fn`` compiled by TorchInductor with ``module``'s weights frozen, for inference.

    Args:
        fn: the function (typically a bound method of ``module``); called with the same arguments.
        module: the module whose parameters and buffers ``fn`` reads (the weights checked).
        what: its name in the warning of a failed compilation.
    """

    def __init__(self, fn: Callable[..., Any], module: nn.Module, what: str) -> None:
        self.fn, self.module, self.what = fn, module, what
        self.failed = False  # compilation failed: fn runs uncompiled from now on
        self.compilations = 0  # how many times the weights were (re)compiled in
        self._compiled: Callable[..., Any] | None = None
        self._key: tuple | None = None
        self._ran = False

    def __deepcopy__(self, memo: dict) -> None:
        # a copy of the model is not compiled (its weights are other tensors): compile it anew
        return None

    def _weights_key(self) -> tuple:
        # storage and version counter of every weight: an in-place update (optimizer step,
        # load_state_dict's copy_) bumps the version; .to() or a new tensor changes the storage
        return tuple((t.data_ptr(), t._version) for t in itertools.chain(self.module.parameters(), self.module.buffers()))

    def __call__(self, *args: Any) -> Any:
        if self.failed:
            return self.fn(*args)
        key = self._weights_key()
        if key != self._key:
            if self._key is not None:
                # the compiled code holds the old weights as constants, and dynamo's guards do
                # not look at values: drop every compiled graph so that nothing stale is reused
                torch._dynamo.reset()
            self._compiled = torch.compile(self.fn, dynamic=False)
            self._key, self._ran = key, False
            self.compilations += 1
        try:
            with torch._inductor.config.patch(freezing=True), torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
                out = self._compiled(*args)
        except Exception as e:
            # it compiled and ran before, and this is not the compiler failing (on a new shape, say):
            # an error of the inputs, which the uncompiled function would raise as well
            if self._ran and not isinstance(e, torch._dynamo.exc.BackendCompilerFailed):
                raise
            warnings.warn(f"torch.compile of HIPIE's {self.what} failed ({type(e).__name__}: {e}); it runs uncompiled",
                          RuntimeWarning, stacklevel=2)
            self.failed = True
            return self.fn(*args)
        self._ran = True
        return out
