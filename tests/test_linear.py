"""segllm.linear: inference products through oneDNN, the same values as F.linear up to rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segllm import linear as lin
from segllm.linear import OneDNNLinear, linear, plain_linears, use_onednn_linears

needs_onednn = pytest.mark.skipif(not lin.available(), reason="this torch has no oneDNN linear kernel")


class _Counting:
    """Wraps the oneDNN kernel, counting its calls."""

    def __init__(self, op):
        self.op, self.calls = op, 0

    def __call__(self, *args):
        self.calls += 1
        return self.op(*args)


@pytest.fixture
def counted(monkeypatch):
    spy = _Counting(lin._OP)
    monkeypatch.setattr(lin, "_OP", spy)
    return spy


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    # float32 rounding of a 256-long sum, relative to the values' scale
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()


@needs_onednn
@pytest.mark.parametrize("shape, onednn", [((16, 256), True), ((3, 21, 256), True), ((1, 4096), True), ((8, 256), False), ((2, 3, 256), False)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_equals_f_linear_and_runs_through_onednn_where_large_enough(counted, shape, onednn, with_bias):
    torch.manual_seed(0)
    out = 1024 if shape[-1] == 4096 else 768
    x, w = torch.randn(shape), torch.randn(out, shape[-1])
    b = torch.randn(out) if with_bias else None
    y = linear(x, w, b)
    # rows x in x out against MIN_MACS: 16 x 256 x 768 and 4096 x 1024 above it, 8 x 256 x 768 below
    assert counted.calls == int(onednn)
    assert y.shape == (*shape[:-1], out)
    _close(y, F.linear(x, w, b))


@needs_onednn
def test_a_row_gets_the_same_values_whatever_else_is_in_the_batch():
    # what lets a batch of conversations give each the values it gets alone
    torch.manual_seed(1)
    x, w, b = torch.randn(64, 256), torch.randn(768, 256), torch.randn(768)
    whole = linear(x, w, b)
    for rows in (11, 16, 37):  # from 11 rows, 11 x 256 x 768 reaches MIN_MACS
        assert torch.equal(linear(x[:rows], w, b), whole[:rows])


@needs_onednn
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape, with_bias, weight_trains", [((32, 256), True, True), ((2, 21, 256), False, True), ((32, 256), True, False)])
def test_training_products_and_gradients_through_onednn(counted, relu, shape, with_bias, weight_trains):
    torch.manual_seed(2)
    w = torch.randn(512, 256, requires_grad=weight_trains)
    b = torch.randn(512, requires_grad=True) if with_bias else None
    x = torch.randn(shape, requires_grad=True)
    upstream = torch.randn(*shape[:-1], 512)
    y = linear(x, w, b, relu=relu)
    (y * upstream).sum().backward()
    assert counted.calls == 2 + int(weight_trains)  # the product, the input's gradient, the weight's
    got = [y.detach(), x.grad] + ([w.grad] if weight_trains else []) + ([b.grad] if with_bias else [])
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(weight_trains)
    b2 = b.detach().clone().requires_grad_(True) if with_bias else None
    y2 = F.linear(x2, w2, b2)
    y2 = F.relu(y2) if relu else y2
    (y2 * upstream).sum().backward()
    expected = [y2.detach(), x2.grad] + ([w2.grad] if weight_trains else []) + ([b2.grad] if with_bias else [])
    for a, e in zip(got, expected, strict=True):
        _close(a, e)


@needs_onednn
def test_falls_back_where_onednn_does_not_apply(counted):
    torch.manual_seed(2)
    layer = OneDNNLinear(256, 512)
    x = torch.randn(32, 256)
    with torch.no_grad():
        layer(x)  # float32, large enough: oneDNN
        assert counted.calls == 1
        layer(x[:8])  # 8 x 256 x 512 multiply-adds: under MIN_MACS
        assert counted.calls == 1
        layer.double()(x.double())  # another dtype
        assert counted.calls == 1
        layer.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast chooses F.linear's dtype
            assert layer(x).dtype == torch.bfloat16
        assert counted.calls == 1
        with plain_linears():
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        assert counted.calls == 1
        before = lin.set_enabled(False)
        try:
            layer(x)
        finally:
            lin.set_enabled(before)
        assert counted.calls == 1
        layer(torch.empty(0, 256))  # no rows
        assert counted.calls == 1


def test_use_onednn_linears_swaps_plain_linears_only():
    class Quantized(nn.Linear):  # stands for a library's subclass (8-bit layers, LoRA)
        pass

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 3), Quantized(3, 2)))
    keys = list(model.state_dict())
    assert use_onednn_linears(model) == 2
    assert type(model[0]) is OneDNNLinear and type(model[2][0]) is OneDNNLinear and type(model[2][1]) is Quantized
    assert list(model.state_dict()) == keys
    assert use_onednn_linears(model) == 0  # already done


def test_built_models_use_it(make_model):
    model = make_model()
    assert not [m for m in model.modules() if type(m) is nn.Linear]
    assert any(isinstance(m, OneDNNLinear) for m in model.llm.modules())


@needs_onednn
def test_hipie_reference_mode_computes_with_f_linear(counted):
    from dataclasses import replace

    from segllm.decoders.hipie import HipieDecoder, HipieDecoderConfig

    torch.manual_seed(3)
    config = replace(HipieDecoderConfig.reduced(), image_size=64)
    decoder = HipieDecoder(config).eval()
    use_onednn_linears(decoder)
    pixels = decoder.preprocess(torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8))[0][None]
    prompts = torch.randn(1, config.num_prompt_tokens, config.lang_dim)
    index = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        with decoder.reference_mode():
            ref = decoder(decoder.encode_image(pixels), prompts, index)
        assert counted.calls == 0
        fast = decoder(decoder.encode_image(pixels), prompts, index)
        assert counted.calls > 0
    _close(fast.mask_logits, ref.mask_logits)


def test_the_kernel_is_used_only_where_it_was_checked(monkeypatch):
    monkeypatch.setattr(lin.platform, "machine", lambda: "aarch64")  # not measured there: torch's default
    assert lin._probe() is None
    monkeypatch.setattr(lin.platform, "machine", lambda: "x86_64")
    assert (lin._probe() is None) == (not torch.backends.mkldnn.is_available())
    monkeypatch.setenv("SEGLLM_ONEDNN_LINEAR", "0")  # the user's switch
    assert lin._probe() is None
