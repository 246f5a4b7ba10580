"""Layers whose input size K does not fit the plan's weight type get the nearest workable one (issue 11)."""

import pytest
import torch
from torch import nn

from qcorrect.quant import (
    ActQuantizer, QuantConv2d, QuantizationError, QuantLinear, fit_weight_type, load_quantized, plan_summary,
    preset, quantization_plan, quantize_model, quantized_layers, read_plan, resolve_plan, save_quantized,
)


@pytest.mark.parametrize("asked,k,want,note", [
    ("uint4_g64", 128, "uint4_g64", None),
    ("uint4_g64", 32, "uint4_g32", "K=32 not divisible by 64 → uint4_g32"),
    ("uint4_g64", 96, "uint4_g32", "K=96 not divisible by 64 → uint4_g32"),
    ("uint4_g64", 36, "uint4", "K=36 not divisible by 64 → uint4 per-channel"),
    ("int4_g64", 36, "int4", "K=36 not divisible by 64 → int4 per-channel"),
    ("int4_g128", 192, "int4_g64", "K=192 not divisible by 128 → int4_g64"),
    ("uint4_g64", 9, None, "K=9 not divisible by 64 and odd → kept 16-bit"),
    ("uint4", 9, None, "K=9 is odd (int4 packs two codes per byte) → kept 16-bit"),
    ("uint4", 36, "uint4", None),
    ("int8", 9, "int8", None),
])
def test_fit_weight_type(asked, k, want, note):
    assert fit_weight_type(asked, k) == (want, note)


class Mixed(nn.Module):
    """Linear and Conv2d layers with K = 32, 36, 96, an odd K, and one that fits group 64."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv_in = nn.Conv2d(4, 8, 3, padding=1)   # K = 36, kept by the plan (first conv)
        self.c36 = nn.Conv2d(4, 8, 3, padding=1)       # K = 36
        self.c32 = nn.Conv2d(32, 8, 1)                 # K = 32
        self.c9 = nn.Conv2d(1, 8, 3, padding=1)        # K = 9
        self.l32 = nn.Linear(32, 16)
        self.l36 = nn.Linear(36, 16)
        self.l96 = nn.Linear(96, 16)
        self.l9 = nn.Linear(9, 16)
        self.l128 = nn.Linear(128, 16)
        self.conv_out = nn.Conv2d(8, 4, 3, padding=1)  # K = 72, kept by the plan (last conv)

    def forward(self, x):
        img4, img32, img1 = x[:, :4], x[:, :32], x[:, :1]
        convs = self.conv_out(self.conv_in(img4) + self.c36(img4) + self.c32(img32) + self.c9(img1))
        v = x.mean(dim=(2, 3))
        lin = self.l32(v[:, :32]) + self.l36(v[:, :36]) + self.l96(v[:, :96]) + self.l9(v[:, :9]) + self.l128(v)
        return convs, lin


EXPECTED = {
    "c36": ("uint4", "K=36 not divisible by 64 → uint4 per-channel"),
    "c32": ("uint4_g32", "K=32 not divisible by 64 → uint4_g32"),
    "c9": (None, "K=9 not divisible by 64 and odd → kept 16-bit"),
    "l32": ("uint4_g32", "K=32 not divisible by 64 → uint4_g32"),
    "l36": ("uint4", "K=36 not divisible by 64 → uint4 per-channel"),
    "l96": ("uint4_g32", "K=96 not divisible by 64 → uint4_g32"),
    "l9": (None, "K=9 not divisible by 64 and odd → kept 16-bit"),
    "l128": ("uint4_g64", None),
    "conv_in": (None, None),
    "conv_out": (None, None),
}


def inputs():
    return torch.randn(2, 128, 6, 6, generator=torch.Generator().manual_seed(1))


def test_resolve_plan_records_each_fallback():
    d = resolve_plan(Mixed(), "W4A8")
    assert {n: (v["weight"], v["fallback"]) for n, v in d.items()} == EXPECTED
    assert d["l9"]["act"] is None and d["l9"]["act_mode"] == "none"
    assert d["l36"]["act"] == "a8_asym"


def test_a_model_mixing_them_quantizes_instead_of_raising():
    x = inputs()
    with torch.no_grad():
        ref = Mixed()(x)
    m = quantize_model(Mixed(), "W4A8")
    layers = quantized_layers(m)
    assert {n: l.wqtype.name for n, l in layers.items()} == {n: w for n, (w, _) in EXPECTED.items() if w}
    assert isinstance(layers["c36"], QuantConv2d) and isinstance(layers["l96"], QuantLinear)
    assert type(m.l9) is nn.Linear and type(m.c9) is nn.Conv2d
    with torch.no_grad():
        out = m(x)
    for got, want in zip(out, ref):
        assert float((got - want).pow(2).mean() / want.pow(2).mean()) < 0.05
    plan = quantization_plan(m)
    assert plan["layers"]["l96"]["fallback"] == "K=96 not divisible by 64 → uint4_g32"
    assert "fallback" not in plan["layers"]["l128"]
    assert plan["kept"] == {"conv_in": None, "conv_out": None,
                            "c9": EXPECTED["c9"][1], "l9": EXPECTED["l9"][1]}


def test_plan_summary():
    m = quantize_model(Mixed(), "W4A8")
    assert plan_summary(m) == (
        "W4A8: 6 layers quantized, 7 with a fallback (3 group 32, 2 per-channel, 2 kept 16-bit), "
        "2 kept 16-bit by the plan"
    )
    assert plan_summary(quantize_model(Mixed(), "W8A8")) == (
        "W8A8: 8 layers quantized, no fallback, 2 kept 16-bit by the plan"
    )
    custom = quantize_model(Mixed(), preset("W4A16", preset=None, weights="int4_g128"))
    assert plan_summary(custom).startswith("int4_g128/a16 none: 6 layers quantized, 7 with a fallback (")
    assert plan_summary(Mixed()) == "quantized model: no quantized layer"


def test_fallbacks_round_trip_through_a_file(tmp_path):
    m = quantize_model(Mixed(), "W4A8")
    path = str(tmp_path / "mixed.safetensors")
    save_quantized(m, path)
    assert read_plan(path)["kept"]["l9"] == EXPECTED["l9"][1]
    loaded = load_quantized(Mixed(), path)
    assert quantization_plan(loaded) == quantization_plan(m)
    assert plan_summary(loaded) == plan_summary(m)
    assert loaded.l36.fallback == EXPECTED["l36"][1]
    x = inputs()
    assert all(torch.equal(a, b) for a, b in zip(m(x), loaded(x)))


def test_explicit_type_on_a_single_layer_still_refused():
    act = ActQuantizer(None, "none")
    with pytest.raises(QuantizationError, match="'odd'.*group size 64 does not divide its input size 96"):
        QuantLinear.from_float(nn.Linear(96, 8), "uint4_g64", act, "odd")
    with pytest.raises(QuantizationError, match="'odd'.*input size 9 is odd"):
        QuantConv2d.from_float(nn.Conv2d(1, 8, 3), "uint4", act, "odd")


def test_only_unfit_layers_selected_names_the_reason():
    with pytest.raises(QuantizationError, match="fits no int4 storage"):
        quantize_model(Mixed(), preset("W4A8", include=("l9", "c9")))
