"""The scaled float comparison of tests/tolerance.py: loose where values are large, still able to fail."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.tolerance import assert_close_scaled, max_scaled_diff, scaled_atol


def test_tolerance_scales_with_the_expected_values():
    expected = torch.tensor([50.0, -0.001, 3.0])
    assert scaled_atol(expected, 1e-5) == pytest.approx(5e-4)
    # float32 rounding on logits of ~50 (3e-5 off, even on the near-zero element) passes ...
    assert_close_scaled(expected + 3e-5, expected, rel=1e-5)
    # ... where an absolute 1e-5 fails
    with pytest.raises(AssertionError):
        torch.testing.assert_close(expected + 3e-5, expected, rtol=0, atol=1e-5)


def test_a_real_difference_still_fails():
    expected = torch.tensor([50.0, -0.001, 3.0])
    with pytest.raises(AssertionError):
        assert_close_scaled(expected + torch.tensor([0.0, 0.01, 0.0]), expected, rel=1e-5)
    # the tolerance comes from the expected values only: a huge wrong answer does not widen it
    with pytest.raises(AssertionError):
        assert_close_scaled(torch.tensor([1e6, 0.0, 3.0]), expected, rel=1e-5)
    with pytest.raises(AssertionError):  # all-zero expected values must match exactly
        assert_close_scaled(torch.tensor([1e-9]), torch.tensor([0.0]))


def test_numpy_arrays_and_scaled_difference():
    a = np.array([[100.0, 0.0]], np.float32)
    assert_close_scaled(a + np.float32(1e-4), a, rel=1e-5)
    with pytest.raises(AssertionError):
        assert_close_scaled(a + np.float32(1e-2), a, rel=1e-5)
    assert max_scaled_diff(torch.tensor([101.0, 0.0]), torch.tensor([100.0, 0.0])) == pytest.approx(0.01)
