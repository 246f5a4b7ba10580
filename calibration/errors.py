"""Errors of the correction engine. Every message says what is wrong and what to do about it."""


class CalibrationError(ValueError):
    """A calibration cannot run as asked (empty set, mismatched shapes, unknown sampler…)."""


class StatsError(ValueError):
    """A statistics object or file cannot be used as asked; nothing was changed."""


class StatsFileError(StatsError):
    """A statistics file is truncated, corrupt, non-finite, or from an unknown format version."""


class IncompatibleStatsError(StatsError):
    """Statistics from another model, prediction type or channel count than the one at hand."""
