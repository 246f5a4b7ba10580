"""Switches of the correction engine (one per component, for ablations) and sampler kinds."""

from __future__ import annotations

from dataclasses import dataclass, fields

# How the engine can treat a sampler (see engine.py): "first_order" and "ancestral" samplers make
# one model call per step at σ_n and take a first-order step, so the Euler-equivalent denoised is
# exact; "multistep" samplers make one call per step but combine denoised values across steps
# (approximate); "other" samplers evaluate extra σ's (Heun, DPM-2, SDE...) and only get the
# σ-interpolated output corrections.
SAMPLER_KINDS = {
    "euler": "first_order", "ddim": "first_order",
    "euler_ancestral": "ancestral",
    "dpmpp_2m": "multistep", "lms": "multistep", "ipndm": "multistep", "ipndm_v": "multistep",
    "deis": "multistep", "res_multistep": "multistep",
}
CANONICAL = {"ddim": "euler"}


def sampler_kind(name: str) -> str:
    return SAMPLER_KINDS.get(canonical_sampler(name), "other")


def canonical_sampler(name: str) -> str:
    name = name[len("sample_"):] if name.startswith("sample_") else name
    return CANONICAL.get(name, name)


@dataclass(frozen=True)
class EngineConfig:
    """Which corrections run, and their hyper-parameters (ALGORITHMS.md §8.1–8.3).

    Output-affine corrections (pick one, §8.2): PTQD ``ptqd_cnc``/``ptqd_bc``, TAC ``tac_ner``,
    ``tcec``. Latent-mean corrections (pick one): StepbaQ ``stepbaq_la`` or TAC ``tac_ibc``.
    StepbaQ's ``stepbaq_tia`` (call the model at σ_τ) and ``stepbaq_ssa`` (step from σ_τ) are
    separate switches, as in the paper's ablation. ``ptqd_vsc`` shrinks ancestral noise (§2c.2).
    ``out_of_range``: for σ outside the calibrated range, "clamp" uses the nearest calibrated row
    (and warns once per run), "identity" applies no ε-space correction there.
    """

    ptqd_cnc: bool = False
    ptqd_bc: bool = False
    ptqd_vsc: bool = False
    tac_ner: bool = False
    tac_ibc: bool = False
    tcec: bool = False
    tcec_window: bool = False
    stepbaq_la: bool = False
    stepbaq_tia: bool = False
    stepbaq_ssa: bool = False
    tac_lambda1: float = 0.5
    tac_lambda2: float = 0.1
    tcec_ridge: float = 1e-4
    tcec_lambda1: float = 0.5
    out_of_range: str = "clamp"

    def __post_init__(self):
        outs = [m for m, on in (("ptqd", self.ptqd_cnc or self.ptqd_bc), ("tac", self.tac_ner), ("tcec", self.tcec)) if on]
        if len(outs) > 1:
            raise ValueError(f"pick one output correction (ALGORITHMS.md §8.2), got {outs}")
        if self.stepbaq_la and self.tac_ibc:
            raise ValueError("pick one latent-mean correction: StepbaQ LA or TAC IBC (ALGORITHMS.md §8.2)")
        if self.ptqd_vsc and (self.stepbaq_la or self.stepbaq_tia or self.stepbaq_ssa):
            raise ValueError("pick one variance handling: StepbaQ's stepback or PTQD VSC (ALGORITHMS.md §8.2)")
        if self.tcec_window and not self.tcec:
            raise ValueError("tcec_window needs tcec")
        if self.out_of_range not in ("clamp", "identity"):
            raise ValueError("out_of_range must be 'clamp' or 'identity'")

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides) -> "EngineConfig":
        """``none``, ``ptqd``, ``ptqd_vsc``, ``tac``, ``tcec``, ``stepbaq``, ``ptqd_stepbaq``, ``tac_ner``."""
        table = {
            "none": {},
            "ptqd": dict(ptqd_cnc=True, ptqd_bc=True),
            "ptqd_vsc": dict(ptqd_cnc=True, ptqd_bc=True, ptqd_vsc=True),
            "tac": dict(tac_ner=True, tac_ibc=True),
            "tac_ner": dict(tac_ner=True),
            "tcec": dict(tcec=True),
            "stepbaq": dict(stepbaq_la=True, stepbaq_tia=True, stepbaq_ssa=True),
            "ptqd_stepbaq": dict(ptqd_cnc=True, ptqd_bc=True, stepbaq_la=True, stepbaq_tia=True, stepbaq_ssa=True),
        }
        if name not in table:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(table)}")
        return cls(**{**table[name], **overrides})

    # ------------------------------------------------------------------ summaries
    @property
    def output_method(self) -> str:
        if self.ptqd_cnc or self.ptqd_bc:
            return "ptqd"
        return "tac" if self.tac_ner else ("tcec" if self.tcec else "none")

    @property
    def latent_method(self) -> str:
        if self.stepbaq_la or self.stepbaq_tia or self.stepbaq_ssa:
            return "stepbaq"
        return "ibc" if self.tac_ibc else "none"

    @property
    def uses_steps(self) -> bool:
        """Whether a component needs to know the schedule step (latent shift, σ rewrite, VSC)."""
        return self.stepbaq_la or self.stepbaq_tia or self.stepbaq_ssa or self.tac_ibc or self.ptqd_vsc

    @property
    def any_enabled(self) -> bool:
        return self.output_method != "none" or self.uses_steps

    def methods(self) -> tuple:
        return tuple(f.name for f in fields(self) if f.type in (bool, "bool") and getattr(self, f.name))
