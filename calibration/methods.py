"""Correction methods by name: the benchmarks' and the nodes' one table.

A *method* is an engine configuration plus the calibration's ACC switch. Single methods are the
engine presets; combinations follow ALGORITHMS.md §8.2 (one output correction, at most one latent
correction, StepbaQ or VSC for the variance); the ``stepbaq_*`` entries are the cumulative ablation
of StepbaQ's Table 2 (none → +TIA → +LA → +SSA → +ACC, ACC off until the last). ``auto`` is the
default: TCEC (``validate.AUTO_PREFERRED``) kept only where a cross-fitted end-to-end check shows a
gain (``validate.auto_config``); its engine comes from ``EngineConfig.preset(AUTO_PREFERRED)``.
"""

from __future__ import annotations

from .config import EngineConfig
from .validate import AUTO_PREFERRED, auto_config

_SBQ = dict(stepbaq_tia=True, stepbaq_la=True, stepbaq_ssa=True)
_PTQD = dict(ptqd_cnc=True, ptqd_bc=True)

METHODS: dict[str, tuple[dict, bool]] = {
    "none": ({}, True),
    "ptqd": (_PTQD, True),
    "ptqd_vsc": ({**_PTQD, "ptqd_vsc": True}, True),
    "tac_ner": (dict(tac_ner=True), True),
    "tac": (dict(tac_ner=True, tac_ibc=True), True),
    "tcec": (dict(tcec=True), True),
    "stepbaq": (_SBQ, True),
    "ptqd_ibc": ({**_PTQD, "tac_ibc": True}, True),
    "ptqd_stepbaq": ({**_PTQD, **_SBQ}, True),
    "tac_ner_stepbaq": ({"tac_ner": True, **_SBQ}, True),
    "tcec_stepbaq": ({"tcec": True, **_SBQ}, True),
    "auto": ({}, True),
    "stepbaq_tia": (dict(stepbaq_tia=True), False),
    "stepbaq_tia_la": (dict(stepbaq_tia=True, stepbaq_la=True), False),
    "stepbaq_tia_la_ssa": (_SBQ, False),
}
#: what a user picks from (the ablation steps are for the benchmarks)
USER_METHODS = ["auto", "none", "ptqd", "ptqd_vsc", "tac_ner", "tac", "tcec", "stepbaq", "ptqd_ibc", "ptqd_stepbaq",
                "tac_ner_stepbaq", "tcec_stepbaq"]


def calibration_engine(method: str) -> tuple[EngineConfig, bool]:
    """The engine a calibration for ``method`` runs with (auto: TCEC) and its ACC switch."""
    try:
        kwargs, acc = METHODS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}") from None
    return (EngineConfig.preset(AUTO_PREFERRED) if method == "auto" else EngineConfig(**kwargs)), acc


def sampling_engine(method: str, stats=None) -> tuple[EngineConfig, str]:
    """The engine a sampler runs with for ``method`` and a one-line reason (auto: its decision)."""
    if method == "auto":
        if stats is None:
            raise ValueError("'auto' needs the statistics (its end-to-end check decides)")
        return auto_config(stats)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    cfg = EngineConfig(**METHODS[method][0])
    return cfg, (f"{method}: applied as chosen" if cfg.any_enabled else "none: sampling uncorrected, as chosen")
