"""Stable Diffusion's noise schedule and the timesteps / noise levels a sampler walks down.

SD 1.x settings, as its scheduler config ships them and as diffusers builds any scheduler from it with
`from_config`: 1000 training steps, "scaled_linear" betas from 0.00085 to 0.012, "leading" timestep spacing with
steps_offset 1. Notation: abar_t = prod_{s<=t} (1 - beta_s); the noise level of training step t in the
variance-exploding view of Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative
Models", arXiv 2206.00364) is sigma_t = sqrt((1 - abar_t) / abar_t), and x_VE = x_VP * sqrt(1 + sigma^2).
Karras sigmas are their eq. 5 with rho = 7, between the schedule's smallest and largest sigma.
"""
from __future__ import annotations

import numpy as np
import torch

TRAIN_STEPS = 1000


def alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s), with betas linear in sqrt space (float32, as SD was trained)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, TRAIN_STEPS, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def sigmas() -> torch.Tensor:
    """(1000,) float32 sigma_t of every training step, increasing with t."""
    ac = alphas_cumprod()
    return ((1 - ac) / ac) ** 0.5


def timesteps(steps: int, skip: int = 0) -> torch.Tensor:
    """"Leading" spacing: ratio = 1000 // (steps + skip), t = k * ratio + 1 for k = steps - 1 + skip .. skip
    (int64, descending). DDIM and Euler use skip = 0; DPM-Solver spaces steps + 1 points and drops k = 0 (skip = 1).

    With steps > 500 the ratio is 1 and the first t would be 1000, outside the 0..999 training range (the
    reference DDIM scheduler then fails on an index error); such a t is clamped to 999.
    """
    ratio = TRAIN_STEPS // (steps + skip)
    return (torch.arange(steps - 1 + skip, skip - 1, -1, dtype=torch.int64) * ratio + 1).clamp(max=TRAIN_STEPS - 1)


def karras(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho, float64."""
    ramp = np.linspace(0, 1, steps)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def sigma_to_t(sigma: np.ndarray, table: np.ndarray) -> np.ndarray:
    """The (fractional) training step of each sigma: linear in log sigma between its two neighbouring steps."""
    logs = np.log(table).astype(np.float64)  # increasing with t
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    low = (np.searchsorted(logs, log_sigma, side="right") - 1).clip(0, len(logs) - 2)
    w = np.clip((logs[low] - log_sigma) / (logs[low] - logs[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def noise_levels(steps: int, use_karras: bool, skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (t (steps,) float32, sigma (steps + 1,) float32 ending in 0) as diffusers' sigma schedulers build them.

    Without Karras: the leading timesteps and their own sigmas. With Karras: rho-7 sigmas between the
    smallest and largest sigma of the leading timesteps (Euler, skip 0) or of all 1000 steps (DPM-Solver,
    skip 1, which also rounds t to whole steps), each with the t its sigma corresponds to.
    """
    table = sigmas().numpy()
    t = timesteps(steps, skip)
    if not use_karras:
        return t.float(), torch.cat([torch.from_numpy(table)[t], torch.zeros(1)])
    lo, hi = (table[0], table[-1]) if skip else (table[int(t[-1])], table[int(t[0])])
    sigma = karras(float(lo), float(hi), steps)
    t = sigma_to_t(sigma, table)
    t = t.round() if skip else t
    return torch.from_numpy(t.astype(np.float32)), torch.cat([torch.from_numpy(sigma).float(), torch.zeros(1)])
