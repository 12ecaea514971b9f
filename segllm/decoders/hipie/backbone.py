"""ResNet-50 with frozen batch norm (detectron2 layout) and the sine position encoding.

Parameter names follow detectron2's ``ResNet`` (``stem.conv1``, ``res2.0.shortcut``,
``res2.0.conv1.norm``, ...), so released checkpoints load as they are. The bottleneck puts the
stride in the 3x3 convolution (``STRIDE_IN_1X1 = False``) and uses no dilation.

Inference has a second path, :meth:`ResNet.forward_folded`: every frozen norm folded into its
convolution's weight and bias, on the CPU the activations channels-last (the layout oneDNN's
convolutions compute in, so no reorder of a 1024 px image's large maps before and after every
convolution), and each block's residual sum and ReLU written into its identity by the last
convolution. The same maps up to float rounding, about 3x faster at 1024 px on 2 CPU threads
(session 25); what the compiled mode's TorchInductor does (it folds, re-lays out and fuses the
same way), without its compilation.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segllm.decoders.hipie.config import HipieDecoderConfig
from segllm.precision import Float32Conv2d, cpu_bfloat16_is_native, emulated

__all__ = [
    "Backbone",
    "BackboneWithPosition",
    "Bottleneck",
    "ConvNorm",
    "FrozenBatchNorm2d",
    "ResNet",
    "SinePositionEncoding",
    "Stem",
]


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters (all buffers): [B, C, H, W] -> same."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels) - eps)

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=self.eps
        )


class ConvNorm(Float32Conv2d):
    """A bias-free convolution followed by its frozen batch norm (kept as the ``norm`` child)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, padding: int = 0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.norm = FrozenBatchNorm2d(out_channels)
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(super().forward(x))

    def folded(self) -> tuple[Tensor, Tensor]:
        """The convolution with its norm folded in: weight [O, I, k, k] and bias [O], computed in
        float32 and returned in the weight's dtype (``conv(x, w * s) + (beta - mean * s)`` with
        ``s = gamma / sqrt(var + eps)`` is ``norm(conv(x, w))``)."""
        n = self.norm
        scale = n.weight.float() * torch.rsqrt(n.running_var.float() + n.eps)
        weight = self.weight.float() * scale.view(-1, 1, 1, 1)
        bias = n.bias.float() - n.running_mean.float() * scale
        return weight.to(self.weight.dtype), bias.to(self.weight.dtype)

    def forward_folded(self, x: Tensor, weights: dict[ConvNorm, tuple[Tensor, Tensor]], relu: bool = False) -> Tensor:
        """:meth:`forward` (then ReLU, with ``relu``) from ``weights[self]`` (:meth:`folded`)."""
        y = self._conv_folded(x, weights)
        return y.relu_() if relu else y

    def _conv_folded(self, x: Tensor, weights: dict[ConvNorm, tuple[Tensor, Tensor]]) -> Tensor:
        """The folded convolution of ``x``; bfloat16 on a CPU without native bfloat16 computed in
        float32 and rounded back (:mod:`segllm.precision`)."""
        w, b = weights[self]
        if emulated(x):
            return F.conv2d(x.float(), w.float(), b.float(), self.stride, self.padding).to(x.dtype)
        return F.conv2d(x, w, b, self.stride, self.padding)

    def add_relu_folded_(self, other: Tensor, x: Tensor, weights: dict[ConvNorm, tuple[Tensor, Tensor]]) -> Tensor:
        """``relu(other + self(x))`` written into ``other`` (returned), from ``weights[self]``.

        On the CPU in float32 (and in bfloat16 where the CPU computes it natively: oneDNN has no
        bfloat16 kernel for this on an AVX2-only CPU and raises) one oneDNN call adds the
        convolution's output to ``other`` and applies the ReLU as it writes (the kernel
        TorchInductor emits for this pattern): no new tensor for the block's output, whose fresh
        pages (a 1024 px image's res2 maps are 64 MiB, above glibc's largest mmap threshold, so
        each is faulted in anew) cost more than the addition; elsewhere the same three steps."""
        w, b = weights[self]
        if (other.device.type == "cpu" and torch.backends.mkldnn.is_available()
                and (other.dtype == torch.float32 or (other.dtype == torch.bfloat16 and cpu_bfloat16_is_native()))):
            return torch.ops.mkldnn._convolution_pointwise_.binary(
                other, x, w, b, list(self.padding), list(self.stride), list(self.dilation), self.groups, "add", None, "relu", [], None)
        return other.add_(self._conv_folded(x, weights)).relu_()


class Stem(nn.Module):
    """7x7/2 convolution, ReLU, 3x3/2 max-pool: [B, 3, H, W] -> [B, C, H/4, W/4]."""

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        self.conv1 = ConvNorm(3, out_channels, 7, stride=2, padding=3)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)

    def forward_folded(self, x: Tensor, weights: dict[ConvNorm, tuple[Tensor, Tensor]]) -> Tensor:
        """:meth:`forward` with folded norms (:meth:`ResNet.forward_folded`)."""
        return F.max_pool2d(self.conv1.forward_folded(x, weights, relu=True), kernel_size=3, stride=2, padding=1)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 residual block: [B, C_in, H, W] -> [B, C_out, H/s, W/s]."""

    def __init__(self, in_channels: int, out_channels: int, width: int, *, stride: int = 1) -> None:
        super().__init__()
        self.shortcut = ConvNorm(in_channels, out_channels, 1, stride=stride) if in_channels != out_channels else None
        self.conv1 = ConvNorm(in_channels, width, 1)
        self.conv2 = ConvNorm(width, width, 3, stride=stride, padding=1)
        self.conv3 = ConvNorm(width, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + identity)

    def forward_folded_(self, x: Tensor, weights: dict[ConvNorm, tuple[Tensor, Tensor]]) -> Tensor:
        """:meth:`forward` with folded norms (:meth:`ResNet.forward_folded`). Overwrites ``x``
        with the block's output when the block has no shortcut (the identity is ``x``): the
        residual sum and ReLU are written into the identity (:meth:`ConvNorm.add_relu_folded_`)."""
        out = self.conv1.forward_folded(x, weights, relu=True)
        out = self.conv2.forward_folded(out, weights, relu=True)
        identity = x if self.shortcut is None else self.shortcut.forward_folded(x, weights)
        return self.conv3.add_relu_folded_(identity, out, weights)


class ResNet(nn.Module):
    """ResNet-50 returning res3, res4, res5 (strides 8, 16, 32).

    Input [B, 3, H, W] normalised pixels; output a dict of [B, C_k, H/s_k, W/s_k] maps with
    C = ``config.backbone_channels``.
    """

    stage_names = ("res2", "res3", "res4", "res5")

    def __init__(self, config: HipieDecoderConfig) -> None:
        super().__init__()
        self.stem = Stem(config.stem_out_channels)
        in_channels = config.stem_out_channels
        out_channels = config.res2_out_channels
        width = config.num_groups * config.width_per_group
        for index, (name, count) in enumerate(zip(self.stage_names, config.block_counts)):
            first_stride = 1 if index == 0 else 2
            blocks = []
            for b in range(count):
                blocks.append(Bottleneck(in_channels, out_channels, width, stride=first_stride if b == 0 else 1))
                in_channels = out_channels
            self.add_module(name, nn.Sequential(*blocks))
            out_channels *= 2
            width *= 2

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.stem(x)
        out: dict[str, Tensor] = {}
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name != "res2":
                out[name] = x
        return out

    @torch.no_grad()
    def forward_folded(self, x: Tensor) -> dict[str, Tensor]:
        """:meth:`forward` for inference, each frozen norm folded into its convolution and, on the
        CPU, the activations channels-last (module docstring); the maps returned channels-last
        there. Equal to :meth:`forward` up to float rounding (a few 1e-6 of the maps' scale;
        ``tests/decoders/test_hipie.py``). No gradient flows: the folded weights are copies.

        The folded weights are kept (about the backbone's own size again) and made anew when a
        weight or norm buffer changed since (storage or version counter: an optimizer step,
        ``load_state_dict``, ``.to()``)."""
        weights = self._folded_weights(x.device.type == "cpu")
        if x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem.forward_folded(x, weights)
        out: dict[str, Tensor] = {}
        for name in self.stage_names:
            # a block without a shortcut overwrites its input: never one kept in ``out`` (every
            # stage's first block has a shortcut) nor the caller's ``x`` (the stem's output is new)
            for block in getattr(self, name):
                x = block.forward_folded_(x, weights)
            if name != "res2":
                out[name] = x
        return out

    def _folded_weights(self, channels_last: bool) -> dict[ConvNorm, tuple[Tensor, Tensor]]:
        convs = [m for m in self.modules() if isinstance(m, ConvNorm)]
        key = (channels_last,) + tuple(
            (t.data_ptr(), t._version) for m in convs for t in itertools.chain(m.parameters(recurse=False), m.norm.buffers()))
        cached = self.__dict__.get("_folded")
        if cached is None or cached[0] != key:
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            weights = {}
            for m in convs:
                w, b = m.folded()
                weights[m] = (w.contiguous(memory_format=fmt), b)
            # a plain attribute: not in the state dict; a deep copy's key differs (new storage)
            self.__dict__["_folded"] = cached = (key, weights)
        return cached[1]


class Backbone(nn.Module):
    """Holds the ResNet under the name ``backbone`` (the released checkpoint's layout)."""

    def __init__(self, config: HipieDecoderConfig) -> None:
        super().__init__()
        self.backbone = ResNet(config)

    def forward(self, x: Tensor, *, folded: bool = False) -> list[Tensor]:
        """[B, 3, H, W] -> [res3, res4, res5]; ``folded``: through :meth:`ResNet.forward_folded`
        (inference only)."""
        features = self.backbone.forward_folded(x) if folded else self.backbone(x)
        return [features["res3"], features["res4"], features["res5"]]


class SinePositionEncoding(nn.Module):
    """DETR's normalised sine encoding of a padding-free feature map: [B, C, H, W] -> [1, D, H, W].

    Half of the ``D`` channels encode y, half x (y first), each as interleaved sin/cos at
    geometric frequencies. Without a padding mask it does not depend on the batch.
    """

    def __init__(self, dim: int = 256, temperature: float = 10000.0) -> None:
        super().__init__()
        self.num_feats = dim // 2
        self.temperature = temperature

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        scale, eps = 2 * math.pi, 1e-6
        y = torch.arange(1, h + 1, dtype=torch.float32, device=x.device)
        xs = torch.arange(1, w + 1, dtype=torch.float32, device=x.device)
        y = (y - 0.5) / (h + eps) * scale
        xs = (xs - 0.5) / (w + eps) * scale
        dim_t = torch.arange(self.num_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_feats)
        pos_y = _interleave_sin_cos(y[:, None] / dim_t)  # [H, F]
        pos_x = _interleave_sin_cos(xs[:, None] / dim_t)  # [W, F]
        pos = torch.cat((pos_y[:, None, :].expand(h, w, -1), pos_x[None, :, :].expand(h, w, -1)), dim=-1)
        return pos.permute(2, 0, 1)[None].to(x.dtype)


def _interleave_sin_cos(t: Tensor) -> Tensor:
    """[..., F] angles -> [..., F]: sin of even entries and cos of odd ones, interleaved."""
    return torch.stack((t[..., 0::2].sin(), t[..., 1::2].cos()), dim=-1).flatten(-2)


class BackboneWithPosition(nn.Sequential):
    """``[0]`` the ResNet holder, ``[1]`` the position encoding (the released ``backbone`` module)."""

    def __init__(self, config: HipieDecoderConfig) -> None:
        super().__init__(Backbone(config), SinePositionEncoding(config.hidden_dim))

    def forward(self, x: Tensor, *, folded: bool = False) -> list[Tensor]:  # type: ignore[override]
        """[B, 3, H, W] -> [res3, res4, res5] (position encodings come from ``self[1]``);
        ``folded``: see :meth:`Backbone.forward`."""
        return self[0](x, folded=folded)
