"""DDIM sampling (Song et al., "Denoising Diffusion Implicit Models", ICLR 2021) as pure functions.

`schedule()` precomputes, for every step of a run, the timestep and the alpha products it needs; `ddim_step()`
is one update. No object keeps a step counter: the caller indexes the schedule, which is also what lets the
CUDA-graph path keep the whole table on the device (see `pipeline.py` and `graph.py`).

Stable Diffusion 1.x settings, as its scheduler config ships them: 1000 training steps, "scaled_linear"
betas from 0.00085 to 0.012, "leading" timestep spacing with offset 1, and the final step's previous alpha
product taken as alphas_cumprod[0] (`set_alpha_to_one=False`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

TRAIN_STEPS = 1000


def alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s), with betas linear in sqrt space (float32, as SD was trained)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, TRAIN_STEPS, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def timesteps(steps: int, offset: int = 1) -> torch.Tensor:
    """"Leading" spacing: t = k * (1000 // steps) + offset for k = steps-1 .. 0 (int64, descending).

    With steps > 500 the ratio is 1 and the first t would be 1000, outside the 0..999 training range (the
    reference scheduler then fails on an index error); such a t is clamped to 999.
    """
    if not 1 <= steps <= TRAIN_STEPS:
        raise ValueError(f"steps must be in 1..{TRAIN_STEPS}, got {steps}")
    ratio = TRAIN_STEPS // steps
    return (torch.arange(steps - 1, -1, -1, dtype=torch.int64) * ratio + offset).clamp(max=TRAIN_STEPS - 1)


@dataclass(frozen=True)
class Schedule:
    """Per-step tables for one run; row i belongs to step i (first step = noisiest)."""
    t: torch.Tensor           # (steps,) int64 timesteps on the 0..999 scale
    alpha: torch.Tensor       # (steps,) abar_t
    alpha_prev: torch.Tensor  # (steps,) abar of the timestep the step lands on
    sigma: torch.Tensor       # (steps,) eta-scaled noise std of the step (eq. 16)


def schedule(steps: int, eta: float = 0.0) -> Schedule:
    ac = alphas_cumprod()
    t = timesteps(steps)
    prev = t - TRAIN_STEPS // steps
    a = ac[t]
    a_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], ac[0])
    # eq. 16: sigma_t(eta) = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)
    sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
    return Schedule(t, a, a_prev, sigma)


def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, alpha_prev: torch.Tensor,
              sigma: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM update x_t -> x_prev (eq. 12), computed in float32 and returned in x's dtype.

    x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z
    """
    xf, ef = x.float(), eps.float()
    x0 = (xf - (1 - alpha).sqrt() * ef) / alpha.sqrt()
    out = alpha_prev.sqrt() * x0 + (1 - alpha_prev - sigma ** 2).sqrt() * ef
    if noise is not None:
        out = out + sigma * noise.float()
    return out.to(x.dtype)
