"""The samplers as pure functions: one step each, over a per-step coefficient table planned up front.

A `Sampler` has `plan(steps, eta, use_karras) -> Plan` (per step: the UNet's timestep, its input scaling, the
update's coefficients; the initial noise scale) and `update(x, eps, c, noise, prev) -> (x, prev)`: one step from
the noise prediction `eps`, with `c` the step's coefficient row, `noise` its fresh Gaussian noise (ancestral, DDIM
with eta > 0) and `prev` the state carried between steps (DPM-Solver++(2M)'s previous data prediction; the others
pass it through). Nothing counts steps, so the same step runs eagerly and in a CUDA graph (sampling.py). The
schedules are diffusers' for SD's config (schedule.py); all math is float32. Latents are x_VP for DDIM and
DPM-Solver++ (as in their papers), x_VE = x_VP sqrt(1 + sigma^2) for the Euler samplers (as in Karras et al.).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .schedule import TRAIN_STEPS, alphas_cumprod, noise_levels, timesteps


@dataclass(frozen=True)
class Plan:
    """One run's per-step values on the host; row i belongs to step i (noisiest first)."""
    t: torch.Tensor       # (steps,) float32 timesteps the UNet sees, on the 0..999 training scale
    c_in: torch.Tensor    # (steps,) float32: the UNet's input is x / c_in
    c: torch.Tensor       # (steps, K) float32 coefficients of the sampler's update
    init: torch.Tensor    # () float32: the initial latents are unit Gaussian noise times this
    noisy: bool           # draws fresh noise at every step


@dataclass(frozen=True)
class Sampler:
    name: str             # AUTOMATIC1111's name, for the PNG's parameters
    plan: Callable        # (steps, eta, use_karras) -> Plan
    update: Callable      # (x, eps, c, noise, prev) -> (x, prev)
    karras: bool = False  # has a Karras-sigma variant (as diffusers has)


def ddim_plan(steps: int, eta: float, use_karras: bool = False) -> Plan:
    """Song et al. 2021: abar_t, abar of the step landed on (abar_0 after the last: `set_alpha_to_one=False`), and
    eq. 16's sigma_t(eta) = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)."""
    ac = alphas_cumprod()
    t = timesteps(steps)
    t_prev = t - TRAIN_STEPS // steps
    a = ac[t]
    a_prev = torch.where(t_prev >= 0, ac[t_prev.clamp(min=0)], ac[0])
    sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
    return Plan(t.float(), torch.ones(steps), torch.stack([a, a_prev, sigma], 1), torch.tensor(1.0), eta > 0)


def ddim(x, eps, c, noise, prev):
    """DDIM (Song et al., "Denoising Diffusion Implicit Models", ICLR 2021), eq. 12, with eq. 16's sigma:
    x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z."""
    a, a_prev, sigma = c.unbind()
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    out = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).sqrt() * eps
    return (out if noise is None else out + sigma * noise), prev


def euler_plan(steps: int, eta: float = 0.0, use_karras: bool = False) -> Plan:
    t, s = noise_levels(steps, use_karras)
    return Plan(t, (s[:-1] ** 2 + 1) ** 0.5, torch.stack([s[:-1], s[1:]], 1), (s.max() ** 2 + 1) ** 0.5, False)


def euler(x, eps, c, noise, prev):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x)) / sigma (Karras et al. 2022, Alg. 2
    without churn), D(x) = x - sigma eps the denoised latents: x_next = x + (x - D) / sigma (sigma_next - sigma)."""
    sigma, sigma_next = c.unbind()
    denoised = x - sigma * eps
    return x + (x - denoised) / sigma * (sigma_next - sigma), prev


def euler_ancestral_plan(steps: int, eta: float = 0.0, use_karras: bool = False) -> Plan:
    """sigma_up = sqrt(s'^2 (s^2 - s'^2) / s^2), sigma_down = sqrt(s'^2 - sigma_up^2) from s to s'."""
    t, s = noise_levels(steps, False)
    s0, s1 = s[:-1], s[1:]
    up = (s1 ** 2 * (s0 ** 2 - s1 ** 2) / s0 ** 2) ** 0.5
    c = torch.stack([s0, (s1 ** 2 - up ** 2) ** 0.5, up], 1)
    return Plan(t, (s0 ** 2 + 1) ** 0.5, c, (s.max() ** 2 + 1) ** 0.5, True)


def euler_ancestral(x, eps, c, noise, prev):
    """Ancestral Euler (k-diffusion's `sample_euler_ancestral`): an Euler step down to sigma_down, then fresh
    noise of std sigma_up, so the step lands at sigma_next with part of its noise new (DDPM-like)."""
    sigma, sigma_down, sigma_up = c.unbind()
    denoised = x - sigma * eps
    return x + (x - denoised) / sigma * (sigma_down - sigma) + noise * sigma_up, prev


def dpmpp_2m_plan(steps: int, eta: float = 0.0, use_karras: bool = False) -> Plan:
    """In VP terms alpha = 1 / sqrt(1 + sigma^2), s = sigma alpha, lambda = log(alpha / s); h = lambda' - lambda.
    Columns: alpha, s (this step's), s'/s, alpha' (e^-h - 1), and the weight 1 / (2 r) of the second-order term
    (r = h_prev / h), 0 on the first and the last step, which are first order (diffusers' `lower_order_final`)."""
    t, sigma = noise_levels(steps, use_karras, skip=1)
    alpha = 1 / (sigma ** 2 + 1) ** 0.5
    s = sigma * alpha
    lam = alpha.log() - s.log()
    h = lam[1:] - lam[:-1]
    w = torch.zeros(steps)
    w[1:-1] = 0.5 * (1.0 / ((lam[1:-2] - lam[:-3]) / h[1:-1]))
    c = torch.stack([alpha[:-1], s[:-1], s[1:] / s[:-1], alpha[1:] * (torch.exp(-h) - 1.0), w], 1)
    return Plan(t, torch.ones(steps), c, torch.tensor(1.0), False)


def dpmpp_2m(x, eps, c, noise, prev):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
    Models", arXiv 2211.01095, Alg. 2, midpoint form): with the data prediction x0 = (x - s eps) / alpha,
    x' = (s'/s) x - alpha' (e^-h - 1) (x0 + (x0 - x0_prev) / (2 r)). Returns x0 as the next step's x0_prev."""
    alpha, s, ratio, phi, w = c.unbind()
    x0 = (x - s * eps) / alpha
    return ratio * x - phi * x0 - phi * w * (x0 - prev), x0


DDIM = Sampler("DDIM", ddim_plan, ddim)
EULER = Sampler("Euler", euler_plan, euler, karras=True)
EULER_A = Sampler("Euler a", euler_ancestral_plan, euler_ancestral)
DPMPP_2M = Sampler("DPM++ 2M", dpmpp_2m_plan, dpmpp_2m, karras=True)
SAMPLERS = {"ddim": DDIM, "dpmpp-2m": DPMPP_2M, "euler": EULER, "euler-a": EULER_A}  # the CLI's names
