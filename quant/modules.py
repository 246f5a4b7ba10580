"""``QuantLinear`` and ``QuantConv2d``: layers whose weights are *stored* quantized.

The storage is one ``nn.Parameter`` named ``weight``: a 1-D uint8 blob holding the integer codes,
the fp16 scales and (asymmetric types) the fp16 zero points (layout in ``weights.blob_layout``);
``qweight``, ``scale`` and ``zero`` are read-only views into it. Only the blob and the bias stay
resident; the weight is dequantized into the input's dtype (fp32, fp16 or bf16) at each call and
the input goes through the layer's activation quantizer first. ``.half()`` / ``.to(torch.bfloat16)``
convert the bias but never the blob (it is not floating point).

The layers speak the weight-patching protocol ComfyUI's ModelPatcher uses (no ComfyUI import):
``convert_weight`` turns a (float-cast) copy of the blob into the float weight a LoRA is added to,
``set_weight`` re-quantizes the patched float weight into a new blob, and ``weight_function`` /
``bias_function`` are float→float callables applied at each call (low-VRAM patches). Backing up and
restoring ``<layer>.weight`` therefore restores codes, scales and zero points together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .activations import ActQuantizer
from .errors import QuantizationError
from .qtypes import QType, weight_qtype
from .weights import blob_nbytes, check_fits, decode_blob, dequantize_blob, quantize_to_blob


class _QuantLayer(nn.Module):
    """Shared storage, weight-patching protocol and description for the quantized layer types."""

    layer_type = "?"

    def _init_storage(self, qt: QType, weight_shape: tuple, bias: torch.Tensor | None, layer: str) -> None:
        self.wqtype = qt
        self.weight_shape = tuple(weight_shape)
        self.layer = layer
        self.fallback: str | None = None  # why the plan chose another type than asked, if it did
        check_fits(qt, self.weight_shape, layer)
        nbytes = blob_nbytes(qt, self.weight_shape)
        self.weight = nn.Parameter(torch.zeros(nbytes, dtype=torch.uint8), requires_grad=False)
        if bias is None:
            self.bias = None
        else:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        # ModelPatcher's per-module switches; instance lists, never shared between layers
        self.comfy_cast_weights = False
        self.weight_function: list = []
        self.bias_function: list = []

    def _load_weight(self, weight: torch.Tensor) -> None:
        self.weight = nn.Parameter(quantize_to_blob(weight, self.wqtype, self.layer), requires_grad=False)

    # read-only views into the blob -----------------------------------------------------------
    def _storage(self) -> dict[str, torch.Tensor]:
        return decode_blob(self.weight, self.wqtype, self.weight_shape)

    @property
    def qweight(self) -> torch.Tensor:
        """Integer codes: int8 ``[out, K]``, or int4 packed two per byte, uint8 ``[out, K/2]``."""
        return self._storage()["qweight"]

    @property
    def scale(self) -> torch.Tensor:
        """fp16 scales ``[out, groups]`` (``[out, 1]`` per channel)."""
        return self._storage()["scale"]

    @property
    def zero(self) -> torch.Tensor | None:
        """fp16 zero points ``[out, groups]`` of asymmetric types; ``None`` for symmetric ones."""
        return self._storage().get("zero")

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight of ``weight_shape`` in ``dtype``, on the blob's device (never stored)."""
        return dequantize_blob(self.weight, self.wqtype, self.weight_shape, dtype)

    # the weight-patching protocol ComfyUI's ModelPatcher uses ---------------------------------
    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **kwargs) -> torch.Tensor:
        """A copy of the blob (possibly cast to fp32/fp16/bf16, on any device) → the float weight.

        Byte values 0..255 are exact in all three float types, so rounding recovers the blob.
        The result has ``weight_shape``, the given dtype if floating (else fp32), the given device.
        """
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        if weight.dtype != torch.uint8:
            weight = torch.round(weight).clamp_(0, 255).to(torch.uint8)
        try:
            return dequantize_blob(weight, self.wqtype, self.weight_shape, dtype)
        except QuantizationError as exc:
            raise QuantizationError(f"layer {self.layer!r}: convert_weight: {exc}") from None

    def set_weight(
        self,
        weight: torch.Tensor,
        inplace_update: bool = False,
        seed: int | None = None,
        return_weight: bool = False,
        **kwargs,
    ) -> torch.Tensor | None:
        """Quantize a float weight (e.g. W + a LoRA delta) with fresh scales into a new blob.

        ``return_weight=True`` returns the blob; otherwise it replaces ``self.weight`` (copied into
        the current blob with ``inplace_update``, else a new Parameter), on the current blob's
        device. ``seed`` (stochastic rounding in ComfyUI) is unused: rounding is to nearest.

        A weight equal to what :meth:`convert_weight` makes of the current blob keeps the blob:
        re-quantizing a dequantized weight is not exactly idempotent, and ModelPatcher sends
        unpatched weights through this round trip too (``force_cast``).
        """
        if tuple(weight.shape) != self.weight_shape:
            raise QuantizationError(
                f"layer {self.layer!r}: set_weight got shape {tuple(weight.shape)}, the layer's weight "
                f"is {self.weight_shape}"
            )
        if weight.is_floating_point() and torch.equal(
            weight, dequantize_blob(self.weight.to(weight.device), self.wqtype, self.weight_shape, weight.dtype)
        ):
            blob = self.weight.detach()
            return blob.clone() if return_weight else None
        blob = quantize_to_blob(weight, self.wqtype, self.layer).to(self.weight.device)
        if return_weight:
            return blob
        if inplace_update:
            with torch.no_grad():
                self.weight.copy_(blob)
        else:
            self.weight = nn.Parameter(blob, requires_grad=False)
        return None

    def _weight_and_bias(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Dequantized weight and bias in ``x``'s dtype on ``x``'s device, patches applied.

        ``weight_lowvram_function`` (one callable or ``None``, set by ComfyUI's dynamic-VRAM
        patcher) runs first, then every callable of ``weight_function``; likewise for the bias.
        """
        blob = self.weight
        if blob.device != x.device:  # offloaded: bring the packed bytes, not a float copy
            blob = blob.to(x.device, non_blocking=True)
        w = _patched(self, "weight", dequantize_blob(blob, self.wqtype, self.weight_shape, x.dtype))
        b = self.bias
        if b is not None:
            b = _patched(self, "bias", b.to(device=x.device, dtype=x.dtype, non_blocking=True))
        return w, b

    def describe(self) -> dict:
        d = {"type": self.layer_type, "weight": self.wqtype.name, **self.act.describe(), **self._extra()}
        if self.fallback:
            d["fallback"] = self.fallback
        return d

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
        w, b = self._weight_and_bias(x)
        return F.linear(self.act(x), w, b)

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
        w, b = self._weight_and_bias(x)
        return F.conv2d(self.act(x), w, b, self.stride, self.padding, self.dilation, self.groups)

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


def _patched(layer: _QuantLayer, name: str, t: torch.Tensor) -> torch.Tensor:
    lowvram = layer.__dict__.get(f"{name}_lowvram_function")
    if lowvram is not None:
        t = lowvram(t)
    for f in layer.__dict__.get(f"{name}_function", ()):
        t = f(t)
    return t


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


QUANT_LAYERS = (QuantLinear, QuantConv2d)
