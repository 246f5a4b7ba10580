"""Per-step divergence of a sampling trajectory from the full-precision one.

``TrajectoryRecorder`` is a sampler callback (``callback({"x", "i", "sigma", "sigma_hat",
"denoised"})``, docs/INTERFACES.md) that keeps a copy of each step's latent. Run the FP and the
quantized model with the same seeds and sampler, then ``step_divergence(rec_q, rec_fp)`` gives the
per-step MSE ``E‖x̂_i − x_i‖²/dim`` — the accumulated latent error δ_i of ALGORITHMS.md §0.3.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

__all__ = ["TrajectoryRecorder", "step_divergence"]


class TrajectoryRecorder:
    """Sampler callback recording ``x`` (and ``denoised``, σ) at every step, detached on ``device``.

    ``chain``: another callback to forward each payload to. After sampling, ``finish(x_out)``
    optionally appends the sampler's output so the last entry is the final latent.
    """

    def __init__(self, device: str = "cpu", keep_denoised: bool = True, chain: Optional[Callable] = None):
        self.device = device
        self.keep_denoised = keep_denoised
        self.chain = chain
        self.reset()

    def reset(self) -> None:
        self.xs: list[torch.Tensor] = []
        self.denoised: list[torch.Tensor] = []
        self.sigmas: list[float] = []
        self.steps: list[int] = []

    def __call__(self, payload: dict) -> None:
        self.xs.append(payload["x"].detach().to(self.device, copy=True))
        if self.keep_denoised:
            self.denoised.append(payload["denoised"].detach().to(self.device, copy=True))
        self.sigmas.append(float(payload["sigma"]))
        self.steps.append(int(payload["i"]))
        if self.chain is not None:
            self.chain(payload)

    def finish(self, x_out: torch.Tensor) -> None:
        """Append the final sample (σ = 0) after the sampler returns."""
        self.xs.append(x_out.detach().to(self.device, copy=True))
        self.sigmas.append(0.0)
        self.steps.append(len(self.steps))

    def __len__(self) -> int:
        return len(self.xs)

    def stack(self, key: str = "x") -> torch.Tensor:
        """Recorded tensors as ``[steps, B, ...]``; ``key`` is ``"x"`` or ``"denoised"``."""
        items = {"x": self.xs, "denoised": self.denoised}[key]
        if not items:
            raise ValueError(f"no {key!r} recorded")
        return torch.stack(items)


Trajectory = Union[TrajectoryRecorder, Sequence[torch.Tensor], torch.Tensor]


def _as_stack(traj: Trajectory, key: str) -> torch.Tensor:
    if isinstance(traj, TrajectoryRecorder):
        return traj.stack(key)
    if isinstance(traj, torch.Tensor):
        return traj
    return torch.stack(list(traj))


def step_divergence(traj_q: Trajectory, traj_fp: Trajectory, key: str = "x", per_sample: bool = False) -> torch.Tensor:
    """Per-step MSE between two trajectories ``[steps, B, ...]`` → ``[steps]`` (float64).

    ``per_sample=True`` keeps the batch axis (``[steps, B]``) for bootstrap intervals.
    """
    q, fp = _as_stack(traj_q, key).double(), _as_stack(traj_fp, key).double()
    if q.shape != fp.shape:
        raise ValueError(f"trajectories differ in shape: {tuple(q.shape)} vs {tuple(fp.shape)}")
    err = (q - fp).square().reshape(q.shape[0], q.shape[1], -1).mean(dim=2)
    return err if per_sample else err.mean(dim=1)
