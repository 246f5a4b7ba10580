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

Calibrated quantizers (``calibrated.py``) can give a layer two optional extras, each a buffer that
exists only when set and is counted in its resident bytes:

* ``input_scale`` ``[C]`` fp16, AWQ-style per-input-channel scales ``s``: the blob stores
  ``W·diag(s)`` and the input is divided by ``s`` before the activation quantizer;
* ``lowrank_up`` ``[out, r]`` / ``lowrank_down`` ``[r, K]`` fp16, a low-rank branch ``A·B`` added to
  the output on the unquantized input (``lowrank.py``; for a conv ``B`` is a conv with the layer's
  kernel and ``A`` a 1×1 conv).

The layer's float weight is then ``W_eff = deq(blob)·diag(s)⁻¹ + A·B``: ``dequantized_weight`` and
``convert_weight`` return ``W_eff`` and ``set_weight`` stores ``(W − A·B)·diag(s)`` rounded to
nearest, so a LoRA patch is added to the weight the layer really computes with; the extras stay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .activations import ActQuantizer
from .errors import QuantizationError
from .qtypes import QType, weight_qtype
from .weights import (
    blob_nbytes, check_fits, decode_blob, dequantize_blob, encode_blob, input_size, quantize_to_blob,
)


class _QuantLayer(nn.Module):
    """Shared storage, weight-patching protocol and description for the quantized layer types."""

    layer_type = "?"

    def _init_storage(self, qt: QType, weight_shape: tuple, bias: torch.Tensor | None, layer: str) -> None:
        self.wqtype = qt
        self.weight_shape = tuple(weight_shape)
        self.layer = layer
        self.fallback: str | None = None  # why the plan chose another type than asked, if it did
        self.calib: dict | None = None  # what a calibrated quantizer chose for this layer (JSON-able)
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
        # set only while ``quant.tune`` tunes this layer's grid: ``grid_op(x)`` computes the main path
        # from the blob's codes and the grid being tuned (see ``_main``); None otherwise
        self.grid_op = None

    def _load_weight(self, weight: torch.Tensor) -> None:
        self.weight = nn.Parameter(quantize_to_blob(weight, self.wqtype, self.layer), requires_grad=False)

    def set_storage(self, storage: dict[str, torch.Tensor]) -> None:
        """Replace the blob by storage tensors of the layer's type (e.g. from ``gptq.gptq_quantize``)."""
        blob = encode_blob(storage, self.wqtype, self.weight_shape)
        self.weight = nn.Parameter(blob.to(self.weight.device), requires_grad=False)

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

    def stored_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight the blob holds (``W·diag(s)`` with input scales), on the blob's device."""
        return dequantize_blob(self.weight, self.wqtype, self.weight_shape, dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The layer's float weight ``W_eff`` of ``weight_shape`` in ``dtype`` (never stored): the blob's
        weight, with the input scales undone and the low-rank branch added when the layer has them."""
        return self._effective(self.stored_weight(dtype))

    # optional extras: input scales and a low-rank branch --------------------------------------
    @property
    def rank(self) -> int:
        up = self.__dict__.get("_buffers", {}).get("lowrank_up")
        return 0 if up is None else int(up.shape[1])

    @property
    def has_input_scale(self) -> bool:
        return self.__dict__.get("_buffers", {}).get("input_scale") is not None

    def in_channels_count(self) -> int:
        return self.weight_shape[1]

    def set_input_scale(self, scale: torch.Tensor | None) -> None:
        """Store per-input-channel scales (fp16, ``[C]``; the blob must already hold ``W·diag(s)``)."""
        if scale is None:
            self._buffers.pop("input_scale", None)
            return
        scale = scale.detach().reshape(-1)
        if scale.numel() != self.in_channels_count() or not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
            raise QuantizationError(f"layer {self.layer!r}: input scales must be {self.in_channels_count()} "
                                    "finite positive values")
        self.register_buffer("input_scale", scale.to(torch.float16, copy=True).to(self.weight.device))

    def set_lowrank(self, up: torch.Tensor | None, down: torch.Tensor | None) -> None:
        """Store a low-rank branch ``up`` ``[out, r]`` · ``down`` ``[r, K]`` (fp16); ``None`` removes it."""
        if up is None or down is None:
            self._buffers.pop("lowrank_up", None)
            self._buffers.pop("lowrank_down", None)
            return
        out, k = self.weight_shape[0], input_size(self.weight_shape)
        if up.ndim != 2 or down.ndim != 2 or up.shape[0] != out or down.shape[1] != k or up.shape[1] != down.shape[0]:
            raise QuantizationError(f"layer {self.layer!r}: a low-rank branch is [{out}, r] · [r, {k}], got "
                                    f"{tuple(up.shape)} · {tuple(down.shape)}")
        if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
            raise QuantizationError(f"layer {self.layer!r}: low-rank factors have NaN or inf")
        self.register_buffer("lowrank_up", up.detach().to(torch.float16, copy=True).to(self.weight.device))
        self.register_buffer("lowrank_down", down.detach().to(torch.float16, copy=True).to(self.weight.device))

    def init_extras(self, rank: int = 0, input_scale: bool = False) -> None:
        """Empty extras of the right shapes (``load_quantized`` fills them from the file)."""
        out, k = self.weight_shape[0], input_size(self.weight_shape)
        if input_scale:
            self.register_buffer("input_scale", torch.ones(self.in_channels_count(), dtype=torch.float16))
        if rank:
            self.register_buffer("lowrank_up", torch.zeros(out, rank, dtype=torch.float16))
            self.register_buffer("lowrank_down", torch.zeros(rank, k, dtype=torch.float16))

    def _scale_view(self, like: torch.Tensor) -> torch.Tensor:
        s = self.input_scale.to(device=like.device, dtype=like.dtype)
        # a Linear's input channel is the last dim (of its weight and of any [..., C] input)
        return s if self.layer_type == "linear" else s.reshape(1, -1, 1, 1)

    def _lowrank_weight(self, like: torch.Tensor) -> torch.Tensor:
        up = self.lowrank_up.to(device=like.device, dtype=like.dtype)
        down = self.lowrank_down.to(device=like.device, dtype=like.dtype)
        return (up @ down).reshape(like.shape)

    def _effective(self, stored: torch.Tensor) -> torch.Tensor:
        w = stored
        if self.has_input_scale:
            w = w / self._scale_view(w)
        if self.rank:
            w = w + self._lowrank_weight(w)
        return w

    def _stored(self, effective: torch.Tensor) -> torch.Tensor:
        w = effective
        if self.rank:
            w = w - self._lowrank_weight(w)
        if self.has_input_scale:
            w = w * self._scale_view(w)
        return w

    # the weight-patching protocol ComfyUI's ModelPatcher uses ---------------------------------
    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **kwargs) -> torch.Tensor:
        """A copy of the blob (possibly cast to fp32/fp16/bf16, on any device) → the float weight.

        Byte values 0..255 are exact in all three float types, so rounding recovers the blob.
        The result has ``weight_shape``, the given dtype if floating (else fp32), the given device;
        it is the layer's ``W_eff`` (input scales undone, low-rank branch added, if any).
        """
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        if weight.dtype != torch.uint8:
            weight = torch.round(weight).clamp_(0, 255).to(torch.uint8)
        try:
            return self._effective(dequantize_blob(weight, self.wqtype, self.weight_shape, dtype))
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
        device. ``seed`` (stochastic rounding in ComfyUI) is unused: rounding is to nearest. With
        extras, the blob gets ``(weight − A·B)·diag(s)`` and the extras stay as they are.

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
            weight, self._effective(dequantize_blob(self.weight.to(weight.device), self.wqtype, self.weight_shape,
                                                    weight.dtype))
        ):
            blob = self.weight.detach()
            return blob.clone() if return_weight else None
        if not torch.isfinite(weight).all():
            raise QuantizationError(f"layer {self.layer!r}: weight has NaN or inf values; refusing to quantize")
        target = self._stored(weight.float()) if (self.rank or self.has_input_scale) else weight
        blob = quantize_to_blob(target, self.wqtype, self.layer).to(self.weight.device)
        if return_weight:
            return blob
        if inplace_update:
            with torch.no_grad():
                self.weight.copy_(blob)
        else:
            self.weight = nn.Parameter(blob, requires_grad=False)
        return None

    def _weight_and_bias(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The blob's weight and the bias in ``x``'s dtype on ``x``'s device, patches applied.

        ``weight_lowvram_function`` (one callable or ``None``, set by ComfyUI's dynamic-VRAM
        patcher) runs first, then every callable of ``weight_function``; likewise for the bias.
        Patches apply to the layer's float weight ``W_eff``; the result is mapped back to what the
        main path multiplies (``W_eff − A·B``, times the input scales).
        """
        blob = self.weight
        if blob.device != x.device:  # offloaded: bring the packed bytes, not a float copy
            blob = blob.to(x.device, non_blocking=True)
        w = dequantize_blob(blob, self.wqtype, self.weight_shape, x.dtype)
        if _has_patches(self, "weight"):
            w = self._stored(_patched(self, "weight", self._effective(w)))
        b = self.bias
        if b is not None:
            b = _patched(self, "bias", b.to(device=x.device, dtype=x.dtype, non_blocking=True))
        return w, b

    def _main_input(self, x: torch.Tensor) -> torch.Tensor:
        return x / self._scale_view(x) if self.has_input_scale else x

    def _main(self, x: torch.Tensor) -> torch.Tensor:
        """The main path: quantized activations times the blob's weight (``_op``), or, while the grid is
        being tuned, ``grid_op`` on the same quantized activations (no dequantized blob is made then)."""
        xin = self.act(self._main_input(x))
        if self.grid_op is not None:
            return self.grid_op(xin)
        w, b = self._weight_and_bias(x)
        return self._op(xin, w, b)

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        d = {"type": self.layer_type, "weight": self.wqtype.name, **self.act.describe(), **self._extra()}
        if self.fallback:
            d["fallback"] = self.fallback
        if self.has_input_scale:
            d["input_scale"] = True
        if self.rank:
            d["rank"] = self.rank
        if self.calib:
            d["calib"] = self.calib
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
        y = self._main(x)
        if self.rank:
            down = self.lowrank_down.to(device=x.device, dtype=x.dtype)
            y = y + F.linear(F.linear(x, down), self.lowrank_up.to(device=x.device, dtype=x.dtype))
        return y

    def _op(self, x, w, b):
        return F.linear(x, w, b)

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

    def in_channels_count(self) -> int:
        return self.in_channels // self.groups

    def _op(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._main(x)
        if self.rank:
            r = self.rank
            down = self.lowrank_down.to(device=x.device, dtype=x.dtype).reshape(r, *self.weight_shape[1:])
            up = self.lowrank_up.to(device=x.device, dtype=x.dtype).reshape(self.out_channels, r, 1, 1)
            y = y + F.conv2d(F.conv2d(x, down, None, self.stride, self.padding, self.dilation), up)
        return y

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


def _has_patches(layer: _QuantLayer, name: str) -> bool:
    return layer.__dict__.get(f"{name}_lowvram_function") is not None or bool(layer.__dict__.get(f"{name}_function"))


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
