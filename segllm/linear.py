"""Linear layers through oneDNN for float32 on the CPU (inference and training).

Why: torch's float32 ``F.linear`` on the CPU is MKL's ``sgemm``, which on some processors runs far
below what the cores can do (on the AMD EPYC this project is developed on, MKL does not use its
AVX-512 kernels there: 150-200 GFLOP/s at 2 threads where oneDNN's matrix product, the library
torch's own convolutions already use, reaches 340-450 GFLOP/s on the same shapes; measured by
``scripts/bench_linear.py``; on an AVX2-only EPYC it is the other way round, MKL 176-182
against oneDNN's 146-161 GFLOP/s on the large shapes, but oneDNN stays: its rows do not depend
on the batch (below), and batch segmentation end to end was no faster with MKL). So every ``nn.Linear`` of a SegLLM runs its inference products
through oneDNN (``torch.ops.mkldnn._linear_pointwise``, the kernel TorchInductor itself emits for
linear layers), and falls back to ``F.linear`` wherever that does not apply: another device or
dtype, autocast, a torch without oneDNN or a processor other than x86-64 (where it was not
measured), or the block is inside :func:`plain_linears` (a reference mode that must compute as
the original does). Where a gradient is needed, the backward
products go through oneDNN as well (the kernel has no backward of its own: :class:`_Linear`
computes the input's and the weight's gradients as two more of its products, 1.2-2.4x faster
than MKL's here).

Small products stay with ``F.linear``: oneDNN's fixed cost per call (~20 us here) exceeds
what it saves below about 2M multiply-adds (rows x in x out; measured: 8 rows of 256 -> 768
take 39 us with ``F.linear`` and 50 us with oneDNN, 16 rows tie, and one row of a 7B LLaMA's
4096 -> 4096 takes 3.2 ms against 2.3 ms).

The values equal ``F.linear``'s up to float32 rounding (another summation order), and through
oneDNN a row's result does not depend on how many other rows are computed with it, so a batch
gives each of its members the values a single one gets.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import platform
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segllm.precision import emulated

__all__ = ["OneDNNLinear", "available", "is_plain_linear", "linear", "plain_linears", "set_enabled", "use_onednn_linears"]


def _probe():
    """oneDNN's linear kernel, if this torch has it, this is an x86-64 processor (where it was
    measured; elsewhere torch's default stays), the environment does not say
    ``SEGLLM_ONEDNN_LINEAR=0`` and one small product through it equals ``F.linear``'s; else None.
    A few milliseconds, once per process."""
    if os.environ.get("SEGLLM_ONEDNN_LINEAR", "1").strip() == "0":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*shape, generator=g) for shape in ((16, 64), (32, 64), (32,)))
        ok = torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), rtol=1e-4, atol=1e-4)
    except (AttributeError, RuntimeError):
        return None
    return op if ok else None


_OP = _probe()
_enabled = True
MIN_MACS = 2**21  # rows x in x out below which F.linear is faster (see above)
_plain: contextvars.ContextVar[bool] = contextvars.ContextVar("segllm_plain_linears", default=False)


def available() -> bool:
    """Whether this torch has oneDNN's linear kernel (and it is not switched off by :func:`set_enabled`)."""
    return _OP is not None and _enabled


def set_enabled(enabled: bool) -> bool:
    """Switch the oneDNN path on or off for the whole process (e.g. to time both in one run);
    returns the previous setting."""
    global _enabled
    before, _enabled = _enabled, bool(enabled)
    return before


@contextlib.contextmanager
def plain_linears() -> Iterator[None]:
    """Inside the block (this thread or task only), every :class:`OneDNNLinear` computes with
    ``F.linear``: what a reference mode timing the original's arithmetic needs."""
    token = _plain.set(True)
    try:
        yield
    finally:
        _plain.reset(token)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, relu: bool = False) -> Tensor:
    """``F.linear(x, weight, bias)``: x [..., in] -> [..., out], through oneDNN where it applies
    (float32 CPU tensors, products of 2M multiply-adds or more; see the module's docstring).
    ``relu``: followed by a ReLU, which oneDNN applies as the product's results are written (bit
    for bit the same values, one pass over the output fewer). bfloat16 on a CPU without native
    bfloat16 is computed in float32 and rounded back (:mod:`segllm.precision`: ~6x faster there)."""
    if weight.dtype == torch.bfloat16 and emulated(x):
        return _emulated_bfloat16(x, weight, bias, relu)
    if (
        _OP is None
        or not _enabled
        # (dynamo cannot trace a ContextVar; compiled code never runs in a reference mode)
        or (not torch.compiler.is_compiling() and _plain.get())
        or x.device.type != "cpu"
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or (bias is not None and bias.dtype != torch.float32)
        or x.dim() < 2
        or x.numel() * weight.shape[0] < MIN_MACS  # also no rows at all
        or torch.is_autocast_enabled("cpu")  # autocast decides the dtype of F.linear's product
    ):
        y = F.linear(x, weight, bias)
        return F.relu(y, inplace=True) if relu else y  # in place on a fresh output (autograd keeps the result)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        # rows flattened outside the Function: its output must not be a view (callers modify
        # products in place, which autograd forbids on a view made inside a custom Function)
        y = _Linear.apply(x.reshape(-1, x.shape[-1]), weight, bias, relu)
        return y.view(*x.shape[:-1], weight.shape[0])
    if torch.compiler.is_compiling():
        # an opaque call for TorchInductor, which would otherwise lower the kernel its own way
        return torch.ops.segllm.onednn_linear(x, weight, bias, relu)
    return _OP(x, weight, bias, "relu" if relu else "none", [], "")


# bfloat16 weights of this many elements or more are brought to float32 a block of output rows
# at a time on a CPU without native bfloat16 (see _emulated_bfloat16)
_BLOCK_ELEMENTS = 2**20
_BLOCKS = threading.local()  # each thread's float32 block (batch segmentation's lanes run at once)


def _emulated_bfloat16(x: Tensor, weight: Tensor, bias: Tensor | None, relu: bool) -> Tensor:
    """:func:`linear` of bfloat16 ``x`` [..., in] and ``weight`` [out, in] on a CPU without native
    bfloat16: float32 products, the result rounded to bfloat16 [..., out].

    A large weight (a 7B LLaMA's 11008 x 4096) is not converted whole: that would write a fresh
    180 MB float32 copy per call, every page of it faulted in anew (above glibc's mmap
    threshold), for a product that, over a round's ~20 rows, is over before the copy is. Instead
    blocks of about 2**20 weights (4 MB) are converted into one reused float32 buffer and
    multiplied in turn, each block's outputs rounded as they are written: ~3x faster for 20
    rows of the 7B's shapes on an AVX2 EPYC at 2 threads (30 against 108 ms for 11008 x 4096),
    ~1.3x for a 290-token prefix. The values are the whole product's up to float32 summation
    order. Where a gradient is needed (training), or the weight is small, the whole copy stays.
    """
    out_f, in_f = weight.shape
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    if grad or weight.numel() < _BLOCK_ELEMENTS or x.dim() < 2 or x.numel() == 0:
        return linear(x.float(), weight.float(), None if bias is None else bias.float(), relu=relu).to(torch.bfloat16)
    rows = max(1, _BLOCK_ELEMENTS // in_f)  # output rows a block
    buf = getattr(_BLOCKS, "buf", None)
    if buf is None or buf.numel() < rows * in_f:
        buf = _BLOCKS.buf = torch.empty(max(rows * in_f, _BLOCK_ELEMENTS))
    x32 = x.reshape(-1, in_f).float()
    out = torch.empty(x32.shape[0], out_f, dtype=torch.bfloat16)
    for j in range(0, out_f, rows):
        k = min(rows, out_f - j)
        w32 = buf[: k * in_f].view(k, in_f).copy_(weight[j : j + k])
        b32 = None if bias is None else bias[j : j + k].float()
        out[:, j : j + k] = linear(x32, w32, b32, relu=relu)
    return out.view(*x.shape[:-1], out_f)


class _Linear(torch.autograd.Function):
    """oneDNN's product with a backward: the input's gradient is gy @ W and the weight's gy^T @ x,
    each one more oneDNN product (x [rows, in], W [out, in], gy [rows, out])."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, relu: bool) -> Tensor:
        y = _OP(x, weight, bias, "relu" if relu else "none", [], "")
        ctx.save_for_backward(x, weight, y if relu else None)
        ctx.has_bias, ctx.relu = bias is not None, relu
        return y

    @staticmethod
    def backward(ctx, gy: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, weight, y = ctx.saved_tensors
        if ctx.relu:
            gy = gy.masked_fill(y <= 0, 0)  # ReLU's gradient: 0 where the output is 0
        g = gy.contiguous()  # [rows, out]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _OP(g, weight.t(), None, "none", [], "")  # [rows, in]
        if ctx.needs_input_grad[1]:
            gw = _OP(g.t(), x.t(), None, "none", [], "")  # [out, in]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb, None


@torch.library.custom_op("segllm::onednn_linear", mutates_args=())
def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None, relu: bool) -> Tensor:
    return _OP(x, weight, bias, "relu" if relu else "none", [], "")


@_onednn_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, relu: bool) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` whose forward is :func:`linear` (same parameters, same state dict)."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (nn.Linear's own argument name)
        return linear(input, self.weight, self.bias)


def is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` that is only that (or :class:`OneDNNLinear`, the same layer computing
    another way), not a library's subclass: what quantization may replace."""
    return type(module) in (nn.Linear, OneDNNLinear)


def use_onednn_linears(module: nn.Module) -> int:
    """Make every plain ``nn.Linear`` inside ``module`` an :class:`OneDNNLinear` in place (its
    class changes; parameters, hooks and state-dict keys stay). Subclasses of ``nn.Linear``
    (quantized layers, LoRA wrappers) are left as they are. Returns how many were changed."""
    changed = 0
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = OneDNNLinear
            changed += 1
    return changed
