"""HIPIE's opt-in compiled CPU inference (``HipieDecoder.set_compiled``,
``segllm/decoders/hipie/compiled.py``).

The fast tests replace ``torch.compile`` by a stand-in that counts its calls, so they check the
plumbing (chunk padding, one image at a time, recompiling when weights change, falling back when
compiling fails) in milliseconds; the slow test compiles for real with TorchInductor (~30 s on
2 cores) and compares with the uncompiled fast mode.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from segllm.decoders.hipie import HipieDecoder, HipieDecoderConfig
from segllm.decoders.hipie import compiled as compiled_mod
from segllm.decoders.hipie.compiled import FrozenCompiled
from segllm.decoders.hipie.transformer import CHUNK, EncoderLayer, compiled_chunk_size, encoder_reference_points
from tests.helpers import HAS_CXX
from tests.tolerance import assert_close_scaled


class _FakeCompile:
    """Stands in for ``torch.compile``: returns the function itself (or one that raises), and
    counts compilations and ``torch._dynamo.reset`` calls."""

    def __init__(self, monkeypatch, fail: bool = False) -> None:
        self.calls, self.resets, self.fail = 0, 0, fail
        monkeypatch.setattr(compiled_mod.torch, "compile", self)
        monkeypatch.setattr(compiled_mod.torch._dynamo, "reset", self._reset)

    def __call__(self, fn, **kwargs):
        self.calls += 1
        if not self.fail:
            return fn

        def broken(*args):
            raise RuntimeError("no C++ compiler")

        return broken

    def _reset(self) -> None:
        self.resets += 1


def _layer_inputs(batch: int, shapes: list[tuple[int, int]]):
    s = sum(h * w for h, w in shapes)
    src, pos = torch.randn(batch, s, 32), torch.randn(batch, s, 32)
    reference = encoder_reference_points(shapes, src.device)[:, :, None].expand(-1, -1, len(shapes), -1)
    return src, pos, reference


def test_compiled_chunk_size():
    # the released size: 21,760 tokens in 22 chunks of 992 (64 tokens of padding, not 768)
    assert compiled_chunk_size(21760) == 992 and 22 * 992 - 21760 == 64
    for tokens in (1, 15, 16, 1000, 1024, 1025, 2530, 4096, 21760, 87296):
        size = compiled_chunk_size(tokens)
        chunks = -(-tokens // size)
        assert size % 16 == 0 and size <= CHUNK and chunks == -(-tokens // CHUNK)
        assert chunks * size - tokens < 16 * chunks  # at most the rounding to 16 per chunk


def test_compiled_chunks_equal_the_uncompiled_chunks():
    """The compiled path's plumbing: every image (prompt) on its own, every chunk exactly
    compiled_chunk_size(S) tokens with the last one zero-padded, the padding dropped: the same
    values as the plain chunks, for a position embedding per image and one shared by all."""
    torch.manual_seed(5)
    shapes = [(40, 50), (20, 25), (5, 6)]
    s = sum(h * w for h, w in shapes)
    size = compiled_chunk_size(s)  # 2,530 tokens: 3 chunks of 848 (the last one 14 tokens short)
    assert s % size and size == 848
    layer = EncoderLayer(dim=32, ffn_dim=64, num_levels=len(shapes), num_heads=4, num_points=2).eval()
    src, pos, reference = _layer_inputs(2, shapes)
    seen = []

    def chunk(x, *rest):
        seen.append(tuple(x.shape))
        return layer.chunk(x, *rest)

    with torch.no_grad():
        for p in (pos, pos[:1]):
            plain = layer(src, p, reference, shapes)
            layer.compiled_chunk = chunk
            got = layer(src, p, reference, shapes)
            layer.compiled_chunk = None
            assert_close_scaled(got, plain)
    assert set(seen) == {(1, size, 32)}  # one shape only: one compilation per layer


def test_frozen_compiled_compiles_once_recompiles_after_a_weight_change_and_falls_back(monkeypatch):
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    fake = _FakeCompile(monkeypatch)
    fc = FrozenCompiled(layer.forward, layer, "test layer")
    with torch.no_grad():
        fc(x), fc(x)
        assert (fake.calls, fake.resets, fc.compilations) == (1, 0, 1)
        layer.weight.add_(1.0)  # in place, as an optimizer step: the baked-in copy would be stale
        torch.testing.assert_close(fc(x), layer(x))
        assert (fake.calls, fake.resets, fc.compilations) == (2, 1, 2)
        layer.load_state_dict({"weight": torch.zeros(3, 4), "bias": torch.ones(3)})
        torch.testing.assert_close(fc(x), torch.ones(2, 3))
        assert fc.compilations == 3

    # compiling fails: a warning, then the uncompiled function, from then on without trying again
    fake.fail = True
    broken = FrozenCompiled(layer.forward, layer, "test layer")
    with pytest.warns(RuntimeWarning, match="test layer failed .*no C\\+\\+ compiler.*uncompiled"):
        out = broken(x)
    torch.testing.assert_close(out, layer(x))
    assert broken.failed and broken(x).shape == (2, 3) and fake.calls == 4  # no second attempt

    # once it has run, an error is the input's and is raised, not hidden by a fallback; but the
    # compiler failing later (a recompilation for a new shape) still falls back
    fake.fail = False
    ok = FrozenCompiled(layer.forward, layer, "test layer")
    ok(x)
    with pytest.raises(RuntimeError):
        ok(torch.randn(2, 5))
    assert not ok.failed

    def compiler_fails(*args):
        raise torch._dynamo.exc.BackendCompilerFailed(lambda *a: None, RuntimeError("inductor crashed"), None)

    ok._compiled = compiler_fails
    with pytest.warns(RuntimeWarning, match="inductor crashed"):
        torch.testing.assert_close(ok(x), layer(x))
    assert ok.failed


def test_set_compiled_is_off_in_reference_mode_with_gradients_and_in_copies(monkeypatch):
    fake = _FakeCompile(monkeypatch)
    model = HipieDecoder(replace(HipieDecoderConfig.reduced(), image_size=128)).eval()
    assert not model.compiled
    names = set(model.state_dict())
    model.set_compiled(True)
    assert model.compiled and set(model.state_dict()) == names  # nothing new in the checkpoint
    pixels = model.preprocess(torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8))[0][None]
    with torch.no_grad():
        model.encode_image(pixels)
        assert fake.calls == 1  # the image step
        with model.reference_mode():
            model.encode_image(pixels)
    model.encode_image(pixels)  # with gradients: training's path, uncompiled
    assert fake.calls == 1
    assert not copy.deepcopy(model).compiled
    assert not model.set_compiled(False).compiled
    assert all(layer.compiled_chunk is None for layer in model.detr.detr.transformer.encoder.layers)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler for torch.compile")
def test_compiled_decoder_equals_the_fast_mode_and_follows_weight_changes():
    """For real (TorchInductor, weights frozen): the reduced decoder at 256 px, two prompts on
    one image, the compiled forward == the uncompiled fast mode to float32 rounding of the
    scale; after a weight changes in place, the compiled forward follows it."""
    torch.manual_seed(0)
    model = HipieDecoder(replace(HipieDecoderConfig.reduced(), image_size=256)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    pixels = model.preprocess(torch.randint(0, 256, (3, 192, 256), dtype=torch.uint8))[0][None]
    prompts = torch.randn(2, 8, 768) * 0.5
    batch_index = torch.zeros(2, dtype=torch.long)
    compiled = copy.deepcopy(model).set_compiled(True)
    with torch.no_grad():
        for _ in range(2):  # the second call runs what the first compiled
            want = model.forward_raw(model.encode_image(pixels), prompts, batch_index)
            got = compiled.forward_raw(compiled.encode_image(pixels), prompts, batch_index)
            assert_close_scaled(got.transformer.memory, want.transformer.memory)
            assert_close_scaled(got.pred_masks, want.pred_masks)
        layers = compiled.detr.detr.transformer.encoder.layers
        assert not compiled.compiled_image.failed and not any(x.compiled_chunk.failed for x in layers)
        for m in (model, compiled):
            m.detr.detr.transformer.encoder.layers[0].linear2.bias.add_(0.5)
        want = model.forward_raw(model.encode_image(pixels), prompts, batch_index)
        got = compiled.forward_raw(compiled.encode_image(pixels), prompts, batch_index)
    assert_close_scaled(got.transformer.memory, want.transformer.memory)
    assert layers[0].compiled_chunk.compilations == 2
