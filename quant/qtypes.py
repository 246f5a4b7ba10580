"""Registry of quantized types by name, looked up like torch dtypes.

A :class:`QType` says how a tensor is represented: bit-width, integer range, granularity (one scale
per output channel, per group of input elements, or per tensor) and whether it is symmetric.
Weight types store real integers (int8, int4 packed two per byte, or uint3 packed eight per three
bytes, a precision the byte budget can give insensitive layers); activation types describe a
fake-quantization grid applied on the fly. Activation types exist for every bit-width from 4 to 16
because PCR's relaxed steps (ALGORITHMS.md §6) run chosen σ ranges at 10 or 16 bits.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import QuantizationError

WEIGHT = "weight"
ACTIVATION = "activation"

PER_CHANNEL = "per_channel"
PER_GROUP = "per_group"
PER_TENSOR = "per_tensor"

ACT_MIN_BITS = 4
ACT_MAX_BITS = 16
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QType:
    """One quantized representation.

    ``qmin``/``qmax`` are the integer codes' range: symmetric types use ``[-(2^(b-1)-1), 2^(b-1)-1]``
    (a zero-centred grid, so +x and −x quantize alike), asymmetric ones ``[0, 2^b − 1]`` with a
    zero point.
    """

    name: str
    kind: str
    bits: int
    granularity: str
    symmetric: bool
    group_size: int | None = None

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def packed(self) -> bool:
        """Weights narrower than a byte are stored packed: int4 two codes per byte, uint3 eight codes
        per three bytes (``weights.pack_codes``)."""
        return self.kind == WEIGHT and self.bits < 8


def _weight_types() -> dict[str, QType]:
    types = {"int8": QType("int8", WEIGHT, 8, PER_CHANNEL, True),
             # per-output-channel int4 (one scale per row), the granularity of Q-Diffusion's and
             # PTQD's W4 results; coarser than the group types, so a larger error
             "int4": QType("int4", WEIGHT, 4, PER_CHANNEL, True),
             "uint4": QType("uint4", WEIGHT, 4, PER_CHANNEL, False)}
    for g in GROUP_SIZES:
        types[f"int4_g{g}"] = QType(f"int4_g{g}", WEIGHT, 4, PER_GROUP, True, g)
        types[f"uint4_g{g}"] = QType(f"uint4_g{g}", WEIGHT, 4, PER_GROUP, False, g)
        # 3-bit, asymmetric only: what the byte budget may store a layer at whose share of the
        # end-to-end error is small, to spend the bytes it frees on sensitive layers (``budget.py``);
        # not a preset (3.5 bits per weight with group 64)
        types[f"uint3_g{g}"] = QType(f"uint3_g{g}", WEIGHT, 3, PER_GROUP, False, g)
    return types


def _activation_types() -> dict[str, QType]:
    types = {}
    for b in range(ACT_MIN_BITS, ACT_MAX_BITS + 1):
        types[f"a{b}"] = QType(f"a{b}", ACTIVATION, b, PER_TENSOR, True)
        types[f"a{b}_asym"] = QType(f"a{b}_asym", ACTIVATION, b, PER_TENSOR, False)
    return types


QTYPES: dict[str, QType] = {**_weight_types(), **_activation_types()}


def qtype(name: str | QType) -> QType:
    """Look a type up by name (``"int8"``, ``"uint4"``, ``"int4_g32"``, ``"uint4_g64"``, ``"uint3_g64"``, ``"a8"``,
    ``"a10_asym"`` …)."""
    if isinstance(name, QType):
        return name
    try:
        return QTYPES[name]
    except KeyError:
        raise QuantizationError(
            f"unknown quantized type {name!r}; known: {', '.join(sorted(QTYPES))}"
        ) from None


def activation_qtype(bits: int, symmetric: bool = True) -> QType:
    """The activation type of a given bit-width (4–16), e.g. for a relaxed PCR step."""
    if not isinstance(bits, int) or not ACT_MIN_BITS <= bits <= ACT_MAX_BITS:
        raise QuantizationError(
            f"activation bit-width {bits!r} is outside the registry ({ACT_MIN_BITS}..{ACT_MAX_BITS})"
        )
    return QTYPES[f"a{bits}" if symmetric else f"a{bits}_asym"]


def weight_qtype(name: str | QType) -> QType:
    t = qtype(name)
    if t.kind != WEIGHT:
        raise QuantizationError(f"{t.name!r} is an activation type, not a weight type")
    return t
