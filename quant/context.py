"""The per-model quantization context: how the current σ reaches the activation quantizers.

Static activation ranges and PCR's bit-width schedules depend on the noise level of the current
model call. ComfyUI runs several models in one process, so the σ cannot live in a global: each
quantized model owns one :class:`QuantContext`, created by ``quantize_model`` and shared by the
quantizers of that model only (a deep copy of the model copies its context along with it).
Whoever calls the model sets the σ once per call with :func:`sigma_scope` (or wraps a denoiser in
:class:`SigmaScopedDenoiser`); the quantizers read it with tensor ops only, so no host sync.

The same scope can say how many distinct latents the call carries (``latents``). Classifier-free
guidance runs each latent through the network more than once in one batch (ComfyUI concatenates
the cond and uncond passes chunk by chunk; the reference denoiser does ``cat([x, x])``), and the
dynamic activation quantizers use it to give the passes of one latent one shared range
(``activations.ActQuantizer``, ``act_ranges="per_latent"``). A plain Python int: no host sync.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn

CONTEXT_ATTR = "qcorrect_quant_context"


class QuantContext:
    """Holds the σ of the model call in progress (a tensor, or ``None`` outside sampling) and the
    number of distinct latents in it (``None``: unknown, every sample is its own latent)."""

    def __init__(self) -> None:
        self.sigma: torch.Tensor | None = None
        self.latents: int | None = None

    def __repr__(self) -> str:
        return (f"QuantContext(sigma={'unset' if self.sigma is None else 'set'}, "
                f"latents={'unset' if self.latents is None else self.latents})")


def attach_context(module: nn.Module) -> QuantContext:
    """Return the module's context, creating it on first use (stored as a plain attribute)."""
    ctx = module.__dict__.get(CONTEXT_ATTR)
    if ctx is None:
        ctx = QuantContext()
        module.__dict__[CONTEXT_ATTR] = ctx
    return ctx


def get_context(module: nn.Module) -> QuantContext | None:
    return module.__dict__.get(CONTEXT_ATTR)


@contextlib.contextmanager
def sigma_scope(module: nn.Module, sigma: torch.Tensor | float | None, latents: int | None = None) -> Iterator[None]:
    """Set the σ seen by ``module``'s quantizers for the duration of one model call, and the number
    of distinct latents the call's batch carries (``None``: unknown; see :class:`QuantContext`)."""
    ctx = get_context(module)
    if ctx is None:  # not a quantized model: nothing reads σ
        yield
        return
    if sigma is not None and not torch.is_tensor(sigma):
        sigma = torch.tensor([float(sigma)])
    if latents is not None and (isinstance(latents, bool) or int(latents) < 1):
        raise ValueError(f"latents must be a positive number of latents or None, got {latents!r}")
    previous = ctx.sigma, ctx.latents
    ctx.sigma, ctx.latents = sigma, None if latents is None else int(latents)
    try:
        yield
    finally:
        ctx.sigma, ctx.latents = previous


class SigmaScopedDenoiser:
    """Denoiser-protocol wrapper (``model(x, sigma, **extra)``) that publishes σ to ``quantized``.

    ``quantized`` is the module ``quantize_model`` was applied to (e.g. the denoiser's UNet). Other
    attribute reads pass through to the wrapped denoiser so samplers see the same object. The batch of
    ``x`` is the number of distinct latents: a denoiser that runs them more than once (CFG's cond and
    uncond passes, concatenated pass by pass) lets the quantizers share each latent's ranges.
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], quantized: nn.Module) -> None:
        self.inner = denoiser
        self.quantized = quantized

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra: Any) -> torch.Tensor:
        with sigma_scope(self.quantized, sigma, latents=int(x.shape[0]) if x.ndim else None):
            return self.inner(x, sigma, **extra)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)
