"""Checks of tensor values that do not stall an accelerator.

Reading a value of a tensor on a GPU back to the host (``int(t)``, ``bool(t)``, ``t.item()``)
makes the host wait until the device has finished everything queued before it; in a training
step that leaves the device idle while the host prepares what comes next. Input checks that are
cheap on the CPU therefore read values only there, and on an accelerator queue an assertion that
the device evaluates in order (it fails at the next synchronisation, naming the message).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["on_host", "require"]


def on_host(t: Tensor) -> bool:
    """Is ``t`` in host memory, where reading its values costs no synchronisation?"""
    return t.device.type == "cpu"


def require(ok: Tensor, message: str, error: type[Exception] = ValueError) -> None:
    """``ok`` (a bool tensor, one element) must be true: on the host, raise ``error(message)`` at
    once; on an accelerator, queue the check (``torch._assert_async``) without waiting for it."""
    if on_host(ok):
        if not bool(ok):
            raise error(message)
    else:
        torch._assert_async(ok, message)
