"""bfloat16 on CPUs that do not compute it natively.

On an x86 CPU with AVX2 but without AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT, oneDNN has no
bfloat16 kernels and torch falls back to slow generic ones. Measured on such a machine (session
30, 2 threads): a 3x3 convolution 256 -> 256 on a 64 x 64 map took 17.6 s in bfloat16 (NCHW)
against 45 ms in float32, 0.30 s channels-last; a 1,024 x 256 x 2,048 linear layer 92 ms against
15 ms; a training step of ``configs/direct_refine.toml`` (batches of 16) 78.5 s in bf16 autocast
against 8.4 s in float32 (``docs/results/bench_train_s30_avx2_{bf16,float32}.json``).

So, on such a CPU, a model whose weights are bfloat16 (``--dtype bfloat16``: the memory it
saves is kept) computes its convolutions (:class:`Float32Conv2d`, :class:`Float32ConvTranspose2d`,
which :func:`guard_convolutions` puts in place of every plain ``nn.Conv2d`` and
``nn.ConvTranspose2d`` when a model is built) and its linear layers (:func:`segllm.linear.linear`)
in float32 and rounds the results to bfloat16: more precise than bfloat16 arithmetic, and
hundreds of times faster here. Autocast (``mixed_precision = "bf16"`` in training) decides its
own dtypes and is left alone; the trainer, and loading in bfloat16, warn once
(:func:`warn_if_slow_bfloat16`). Where the CPU computes bfloat16 natively, nothing changes.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

_warned: set[str] = set()


@functools.cache
def cpu_bfloat16_is_native() -> bool:
    """Whether torch's CPU kernels compute bfloat16 natively here (oneDNN's own test: AVX-512
    BW/VL/DQ or AVX-NE-CONVERT; an AVX2-only x86 CPU has neither). True where torch cannot tell
    (no oneDNN query), so that nothing is claimed without evidence. Asked once a process."""
    query = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if query is None:
        return True
    try:
        return bool(query())
    except RuntimeError:
        return True


def warn_if_slow_bfloat16(device: str | torch.device | None, what: str, advice: str) -> bool:
    """Log a warning (once per ``what``) when bfloat16 work on ``device`` would run emulated.

    Args:
        device: where the work runs (None: the CPU).
        what: the setting that asked for bfloat16, as the user wrote it (e.g.
            ``mixed_precision = "bf16"``), named in the message.
        advice: what it means here and what to do instead, the message's second half.

    Returns:
        True when the warning applies (whether or not it was logged before).
    """
    kind = torch.device(device).type if device is not None else "cpu"
    if kind != "cpu" or cpu_bfloat16_is_native():
        return False
    if what not in _warned:
        _warned.add(what)
        log.warning("%s on a CPU without native bfloat16 (torch reports %s): %s",
                    what, torch.backends.cpu.get_cpu_capability(), advice)
    return True


def emulated(x: Tensor) -> bool:
    """Whether ``x`` is a bfloat16 CPU tensor that this CPU would compute on emulated, outside
    autocast (which picks its own dtypes) and outside compiled code (TorchInductor emits its own
    kernels)."""
    return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled("cpu") and not cpu_bfloat16_is_native())


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.float()


class Float32Conv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (same parameters, same state dict) that computes a bfloat16 input in
    float32 on a CPU without native bfloat16 (:func:`emulated`), its output rounded back to
    bfloat16; otherwise ``nn.Conv2d`` itself."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # noqa: A002
        if emulated(input):
            return super()._conv_forward(input.float(), weight.float(), _f32(bias)).to(input.dtype)
        return super()._conv_forward(input, weight, bias)


class Float32ConvTranspose2d(nn.ConvTranspose2d):
    """:class:`Float32Conv2d`'s rule for ``nn.ConvTranspose2d``."""

    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:  # noqa: A002
        if not emulated(input):
            return super().forward(input, output_size)
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation)
        y = F.conv_transpose2d(input.float(), self.weight.float(), _f32(self.bias), self.stride, self.padding,
                               output_padding, self.groups, self.dilation)
        return y.to(input.dtype)


_GUARDED = {nn.Conv2d: Float32Conv2d, nn.ConvTranspose2d: Float32ConvTranspose2d}


def guard_convolutions(module: nn.Module) -> int:
    """Make every plain ``nn.Conv2d`` / ``nn.ConvTranspose2d`` inside ``module`` its
    ``Float32...`` counterpart in place (the class changes; parameters, hooks and state-dict keys
    stay; subclasses are left as they are). Returns how many were changed."""
    changed = 0
    for m in module.modules():
        new = _GUARDED.get(type(m))
        if new is not None:
            m.__class__ = new
            changed += 1
    return changed
