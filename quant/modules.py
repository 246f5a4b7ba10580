"""``QuantLinear`` and ``QuantConv2d``: layers whose weights are *stored* quantized.

Only the integer codes, the fp16 scales (and zero points) and the bias stay resident; the weight
is dequantized into the input's dtype (fp32, fp16 or bf16) at each call and the input goes through
the layer's activation quantizer first. Moving the model to another dtype (``.half()``,
``.to(torch.bfloat16)``) converts the bias but never the storage: scales stay fp16, codes stay int.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .activations import ActQuantizer
from .context import QuantContext
from .errors import QuantizationError
from .qtypes import QType, weight_qtype
from .weights import dequantize_weight, quantize_weight, storage_shapes

STORAGE = ("qweight", "scale", "zero")


class _QuantLayer(nn.Module):
    """Shared storage, dtype handling and description for the quantized layer types."""

    layer_type = "?"

    def _init_storage(self, qt: QType, weight_shape: tuple, bias: torch.Tensor | None, layer: str) -> None:
        self.wqtype = qt
        self.weight_shape = tuple(weight_shape)
        self.layer = layer
        out = weight_shape[0]
        k = 1
        for d in weight_shape[1:]:
            k *= d
        if qt.group_size and k % qt.group_size:
            raise QuantizationError(
                f"layer {layer!r}: group size {qt.group_size} does not divide its input size {k} "
                f"(weight shape {tuple(weight_shape)}); choose another group size or exclude the layer"
            )
        if qt.packed and k % 2:
            raise QuantizationError(
                f"layer {layer!r}: int4 codes are packed two per byte, and its input size {k} is odd "
                f"(weight shape {tuple(weight_shape)}); exclude the layer or keep it at 8 bits"
            )
        for name, (shape, dtype) in storage_shapes(qt, out, k).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype))
        if bias is None:
            self.bias = None
        else:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    def _load_weight(self, weight: torch.Tensor) -> None:
        storage = quantize_weight(weight, self.wqtype, self.layer)
        for name, t in storage.items():
            getattr(self, name).copy_(t)

    def _storage(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in STORAGE if n in self._buffers}

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight(self._storage(), self.wqtype, self.weight_shape, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (fp32), for code that inspects ``layer.weight``; not stored."""
        return self.dequantized_weight(torch.float32)

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)

    def _apply(self, fn, recurse=True):
        # Let .to()/.cuda()/.half() move the storage between devices but never change its dtype.
        kept = {n: self._buffers[n] for n in STORAGE if n in self._buffers}
        for n in kept:
            del self._buffers[n]
        try:
            super()._apply(fn, recurse)
        finally:
            for n, t in kept.items():
                moved = fn(t)
                self._buffers[n] = moved if moved.dtype == t.dtype else t.to(moved.device)
        return self

    def describe(self) -> dict:
        return {"type": self.layer_type, "weight": self.wqtype.name, **self.act.describe(), **self._extra()}

    def _extra(self) -> dict:
        return {}


class QuantLinear(_QuantLayer):
    layer_type = "linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: torch.Tensor | None,
        wqtype: QType | str,
        act: ActQuantizer,
        layer: str = "?",
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._init_storage(weight_qtype(wqtype), (out_features, in_features), bias, layer)
        self.act = act

    @classmethod
    def from_float(cls, linear: nn.Linear, wqtype, act: ActQuantizer, layer: str) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias, wqtype, act, layer)
        q._load_weight(linear.weight)
        return q.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(x)
        return F.linear(x, self.dequantized_weight(x.dtype), self._bias(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, weight={self.wqtype.name}"


class QuantConv2d(_QuantLayer):
    layer_type = "conv2d"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride,
        padding,
        dilation,
        groups: int,
        bias: torch.Tensor | None,
        wqtype: QType | str,
        act: ActQuantizer,
        layer: str = "?",
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride) if isinstance(stride, (tuple, list)) else stride
        self.padding = tuple(padding) if isinstance(padding, (tuple, list)) else padding
        self.dilation = tuple(dilation) if isinstance(dilation, (tuple, list)) else dilation
        self.groups = groups
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._init_storage(weight_qtype(wqtype), shape, bias, layer)
        self.act = act

    @classmethod
    def from_float(cls, conv: nn.Conv2d, wqtype, act: ActQuantizer, layer: str) -> "QuantConv2d":
        if conv.padding_mode != "zeros":
            raise QuantizationError(
                f"layer {layer!r}: Conv2d padding_mode={conv.padding_mode!r} is not supported (only 'zeros')"
            )
        q = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.bias, wqtype, act, layer,
        )
        q._load_weight(conv.weight)
        return q.to(conv.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(x)
        w = self.dequantized_weight(x.dtype)
        return F.conv2d(x, w, self._bias(x.dtype), self.stride, self.padding, self.dilation, self.groups)

    def _extra(self) -> dict:
        return {
            "kernel_size": list(self.kernel_size),
            "stride": _jsonable(self.stride),
            "padding": _jsonable(self.padding),
            "dilation": _jsonable(self.dilation),
            "groups": self.groups,
        }

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, weight={self.wqtype.name}"
        )


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


QUANT_LAYERS = (QuantLinear, QuantConv2d)
