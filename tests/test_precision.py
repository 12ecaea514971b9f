import logging

import pytest
import torch

from segllm import precision
from segllm.model.loading import load_pretrained


@pytest.fixture
def emulated(monkeypatch):
    """A CPU whose oneDNN reports no bfloat16 kernels (an AVX2 machine), with no warning given yet."""
    monkeypatch.setattr(precision, "cpu_bfloat16_is_native", lambda: False)
    monkeypatch.setattr(precision, "_warned", set())


def test_emulated_bfloat16_warns_once_naming_the_setting(emulated, caplog):
    with caplog.at_level(logging.WARNING, logger="segllm.precision"):
        assert precision.warn_if_slow_bfloat16("cpu", 'mixed_precision = "bf16"', "use float32")
        assert precision.warn_if_slow_bfloat16(None, 'mixed_precision = "bf16"', "use float32")  # None: the CPU
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert 'mixed_precision = "bf16"' in warnings[0] and warnings[0].endswith(": use float32")
    assert torch.backends.cpu.get_cpu_capability() in warnings[0]


def test_no_warning_where_bfloat16_is_native_or_not_on_the_cpu(monkeypatch, caplog):
    monkeypatch.setattr(precision, "_warned", set())
    monkeypatch.setattr(precision, "cpu_bfloat16_is_native", lambda: True)
    with caplog.at_level(logging.WARNING, logger="segllm.precision"):
        assert not precision.warn_if_slow_bfloat16("cpu", "dtype bfloat16", "")
        monkeypatch.setattr(precision, "cpu_bfloat16_is_native", lambda: False)
        assert not precision.warn_if_slow_bfloat16("meta", "dtype bfloat16", "")  # not the CPU's arithmetic
    assert not caplog.records


def test_native_query_follows_torch(monkeypatch):
    query = precision.cpu_bfloat16_is_native.__wrapped__  # the uncached question (asked once a process)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert query() is False
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert query() is True

    def broken():
        raise RuntimeError("no oneDNN")

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", broken)
    assert query() is True  # cannot tell: no claim, no warning


def test_loading_in_bfloat16_on_an_emulating_cpu_warns(emulated, make_model, tmp_path, caplog):
    make_model().save_pretrained(tmp_path / "ck")
    with caplog.at_level(logging.WARNING, logger="segllm.precision"):
        load_pretrained(tmp_path / "ck")  # float32: nothing to say
        assert not caplog.records
        m = load_pretrained(tmp_path / "ck", dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16  # it still does what it was asked
    assert ["dtype bfloat16" in r.getMessage() for r in caplog.records] == [True]


def test_guarded_convolutions_compute_emulated_bfloat16_in_float32(monkeypatch):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.ConvTranspose2d(8, 4, 2, stride=2), torch.nn.Conv2d(4, 2, 1, padding_mode="zeros"))
    assert precision.guard_convolutions(net) == 3
    assert [type(m).__name__ for m in net] == ["Float32Conv2d", "ReLU", "Float32ConvTranspose2d", "Float32Conv2d"]
    assert precision.guard_convolutions(net) == 0  # already guarded
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = net(x)  # float32: the plain layers' own arithmetic
        half = net.to(torch.bfloat16)
        xb = x.bfloat16()
        monkeypatch.setattr(precision, "cpu_bfloat16_is_native", lambda: False)
        seen = []
        monkeypatch.setattr(torch.nn.functional, "conv2d", lambda *a, **k: seen.append(a[0].dtype) or _CONV2D(*a, **k))
        got = half(xb)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 2, 32, 32)
    assert seen == [torch.float32, torch.float32]  # both convolutions ran on float32 inputs
    # float32 arithmetic on bfloat16 weights: within bfloat16's rounding of the weights and input
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05 * want.abs().max().item())
    # where bfloat16 is native, the layers compute in bfloat16 as nn.Conv2d does
    monkeypatch.setattr(precision, "cpu_bfloat16_is_native", lambda: True)
    seen.clear()
    with torch.no_grad():
        half(xb)
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert set(half.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias", "3.weight", "3.bias"}


_CONV2D = torch.nn.functional.conv2d


def test_linear_computes_emulated_bfloat16_in_float32(monkeypatch):
    from segllm import linear as lin

    torch.manual_seed(0)
    x, w, b = torch.randn(5, 64), torch.randn(32, 64), torch.randn(32)
    want = torch.nn.functional.linear(x.bfloat16().float(), w.bfloat16().float(), b.bfloat16().float())
    monkeypatch.setattr(precision, "cpu_bfloat16_is_native", lambda: False)
    got = lin.linear(x.bfloat16(), w.bfloat16(), b.bfloat16(), relu=True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want.relu().bfloat16())  # float32 products, rounded once
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast picks its own dtypes: not ours to change
        assert not precision.emulated(x.bfloat16())


def test_built_models_guard_their_convolutions(make_model):
    model = make_model()
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert convs and all(type(m) in (precision.Float32Conv2d, precision.Float32ConvTranspose2d) for m in convs)


def test_large_emulated_bfloat16_weights_are_multiplied_block_by_block(monkeypatch):
    from segllm import linear as lin

    torch.manual_seed(0)
    x, w, b = torch.randn(2, 7, 48), torch.randn(100, 48) * 0.1, torch.randn(100)
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    want = torch.nn.functional.linear(xb.float(), wb.float(), bb.float()).relu().bfloat16()
    monkeypatch.setattr(precision, "cpu_bfloat16_is_native", lambda: False)
    monkeypatch.setattr(lin, "_BLOCK_ELEMENTS", 48 * 16)  # blocks of 16 output rows: 7 blocks, the last of 4
    copies = []
    real_copy = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, *a, **k: copies.append(tuple(src.shape)) or real_copy(self, src, *a, **k))
    got = lin.linear(xb, wb, bb, relu=True)
    monkeypatch.setattr(torch.Tensor, "copy_", real_copy)
    assert copies == [(16, 48)] * 6 + [(4, 48)]  # the weight converted a block at a time
    assert got.dtype == torch.bfloat16 and got.shape == (2, 7, 100)
    torch.testing.assert_close(got, want)  # float32 products, rounded once (up to summation order)
    # a product that needs gradients converts the whole weight, as before
    wg = wb.clone().requires_grad_(True)
    out = lin.linear(xb, wg, bb)
    out.float().sum().backward()
    assert wg.grad is not None and wg.grad.shape == wg.shape
