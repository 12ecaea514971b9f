"""Float comparisons whose tolerance scales with the values compared.

Float32 rounding grows with the magnitude of what is summed and varies with the number of threads
and the summation order the kernels pick under load: an absolute tolerance of 1e-5 on logits of
size ~50 fails on some machines and not others. Here the tolerance is ``rel`` times the largest
magnitude of the expected values, so a test states "agree to N significant digits of the
tensor's scale" and still fails on any difference that is large at that scale.
"""

from __future__ import annotations

import numpy as np
import torch


def scaled_atol(expected: torch.Tensor | np.ndarray, rel: float) -> float:
    """``rel`` times max |expected| (the expected values only, so a wildly wrong ``actual`` can
    never widen its own tolerance); 0 for an all-zero ``expected``, which then must match exactly."""
    values = torch.as_tensor(np.asarray(expected) if not isinstance(expected, torch.Tensor) else expected)
    if values.numel() == 0:
        return 0.0
    return rel * float(values.detach().double().abs().max())


def assert_close_scaled(actual, expected, *, rel: float = 1e-5, rtol: float = 0.0, msg: str | None = None) -> None:
    """Assert ``|actual - expected| <= rel * max|expected| + rtol * |expected|`` elementwise (shapes
    and dtypes as ``torch.testing.assert_close`` checks them; numpy arrays are compared as tensors)."""
    a = actual if isinstance(actual, torch.Tensor) else torch.as_tensor(np.asarray(actual))
    e = expected if isinstance(expected, torch.Tensor) else torch.as_tensor(np.asarray(expected))
    torch.testing.assert_close(a, e, rtol=rtol, atol=scaled_atol(e, rel), msg=msg)


def max_scaled_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: the difference in units of the tensor's scale."""
    scale = float(expected.detach().double().abs().max())
    diff = float((actual.detach().double() - expected.detach().double()).abs().max())
    return diff / scale if scale else diff
