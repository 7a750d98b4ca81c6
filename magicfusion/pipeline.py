"""Prompt -> pixels, the public API: `generate` samples with one model, `fuse` runs MagicFusion over a general
model and one or more experts. Both check their options, encode the prompts (prompt.py), draw the seed's noise,
plan the sampler's steps (samplers.py), run the loop (sampling.py) and decode the latents with the VAE.

Randomness matches diffusers' StableDiffusionPipeline with a CPU generator: the initial latents, then (for the
ancestral sampler, or DDIM with eta > 0) one noise tensor per step, drawn in float32 on the CPU from
`torch.Generator("cpu").manual_seed(seed)`, so a seed gives the same image on every device.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .checks import check_fuse, check_generate
from .denoiser import FuseOptions
from .errors import InputError
from .model import Model
from .prompt import encode_prompt
from .samplers import SAMPLERS
from .sampling import make_tables, sample
from .schedule import TRAIN_STEPS

LATENT_FACTOR = 8  # the VAE turns each latent pixel into 8x8 image pixels


class Images(list):
    """The PIL images of `generate`, and `seed`: the seed that made them (drawn when -1 was asked for)."""
    seed: int = 0


@dataclass
class FuseResult:
    """`fused`: the PIL images. `masks`: per step, a (B, h, w) uint8 map of whose noise each latent pixel used:
    0 the general model (the paper's M = 1), i expert i, 255 where `average` mixed them. `seed`: the seed used."""
    fused: list
    masks: list = field(default_factory=list)
    seed: int = 0


def validate(sampler: str, karras: bool, steps: int, eta: float, seed: int) -> int:
    """The sampler's options (the others: checks.py); returns the seed to use (-1 draws one)."""
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    if karras and not SAMPLERS[sampler].karras:
        raise InputError(f"the {sampler} sampler has no Karras schedule; use --sampler dpmpp-2m or euler with it")
    if sampler == "dpmpp-2m" and not karras and steps > TRAIN_STEPS - 1:  # its spacing divides by steps + 1
        raise InputError(f"dpmpp-2m takes steps in 1..999, got {steps}; 20-25 is typical")
    if eta and sampler != "ddim":
        raise InputError(f"eta applies to the ddim sampler only, got eta {eta} with {sampler}; drop --eta")
    return random.randrange(2 ** 63) if seed == -1 else seed


@torch.no_grad()
def text_to_latents(models: list, prompts: list, negative_prompt: str, steps: int, guidance: float, eta: float,
                    seed: int, height: int, width: int, batch: int, sampler: str, karras: bool, ks: list,
                    opts: FuseOptions, fuse_from, fuse_until, clip_skip: int, graph: bool | None, progress: bool):
    """Sample with `models` (one, or a general model and experts) -> (latents, masks, seed)."""
    seed = validate(sampler, karras, steps, eta, seed)
    device = models[0].device
    contexts = [encode_prompt(m, p, negative_prompt, batch, clip_skip) for m, p in zip(models, prompts)]
    plan = SAMPLERS[sampler].plan(steps, eta, karras)
    window = (plan.t > fuse_until) & (plan.t <= fuse_from)
    if len(models) > 1 and not window.any():
        raise InputError(f"no step of this run has fuse_until < t <= fuse_from ({fuse_until} < t <= {fuse_from}; its "
                         f"timesteps run from {float(plan.t[0]):g} down to {float(plan.t[-1]):g}); widen the window")
    gen = torch.Generator("cpu").manual_seed(seed)
    shape = (batch, models[0].unet.cfg.in_channels, height // LATENT_FACTOR, width // LATENT_FACTOR)
    x = (torch.randn(shape, generator=gen, dtype=torch.float32) * plan.init).to(device)
    tables = make_tables(plan, window, gen, shape, device)
    scale = torch.tensor(float(guidance), device=device)
    ks = torch.tensor([float(k) for k in ks], device=device)
    bar = tqdm(total=steps, disable=None if progress else True, desc="sampling", unit="step", leave=False)
    callback = None if bar.disable else (lambda i, mask: bar.update())
    graph = device.type == "cuda" if graph is None else graph  # on CPU the runner steps without capture (tests)
    x, masks = sample([m.unet for m in models], contexts, SAMPLERS[sampler], x, tables, window.tolist(), scale, ks,
                      opts, graph, callback)
    bar.close()
    if not torch.isfinite(x).all():
        raise InputError("the model produced NaN/inf latents: its weights are broken, or it overflows in "
                         f"{models[0].dtype}; try --dtype float32 or another checkpoint")
    return x, masks.cpu(), seed


@torch.no_grad()
def decode(model: Model, latents: torch.Tensor) -> list:
    """Latents -> PIL images, rounding as the reference does ((x/2 + 0.5) clamped, times 255, rounded)."""
    images = []
    for z in latents.split(1):  # one at a time keeps the full-resolution decoder's memory bounded
        px = model.vae(z.to(model.device, model.dtype)).float()
        if not torch.isfinite(px).all():  # saving it would write a black image
            raise InputError(f"{model.name}'s VAE decoded NaN/inf pixels: its weights are broken, or it overflows in "
                             f"{model.dtype}; try --dtype float32 or bfloat16")
        px = (px / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        images.append(Image.fromarray((px[0] * 255).round().astype(np.uint8)))
    return images


def generate(model: Model, prompt: str, negative_prompt: str = "", steps: int = 50, guidance: float = 7.5,
             eta: float = 0.0, seed: int = 0, height: int = 512, width: int = 512, batch: int = 1,
             clip_skip: int = 0, graph: bool | None = None, progress: bool = True, sampler: str = "ddim",
             karras: bool = False) -> Images:
    """Text -> `batch` PIL images with one model and classifier-free guidance. `sampler`: ddim (eta >= 0),
    dpmpp-2m, euler or euler-a; `karras`: Karras sigmas (dpmpp-2m, euler). `.seed` of the result: the seed used."""
    check_generate(locals())  # types and ranges of every argument, and the run's memory (checks.py)
    latents, _, seed = text_to_latents([model], [prompt], negative_prompt, steps, guidance, eta, seed, height, width,
                                       batch, sampler, karras, [1.0], FuseOptions(), TRAIN_STEPS, -1, clip_skip, graph,
                                       progress)
    images = Images(decode(model, latents))
    images.seed = seed
    return images


def fuse(general: Model, expert, prompt: str, expert_prompt=None, negative_prompt: str = "", steps: int = 50,
         guidance: float = 7.5, eta: float = 0.0, seed: int = 0, height: int = 512, width: int = 512, batch: int = 1,
         kg: float = 1.0, ke=1.0, blur: bool = True, fuse_from: int = 1000, fuse_until: int = -1,
         outside: str = "general", saliency_reference: str = "general", blend: str = "argmax", clip_skip: int = 0,
         graph: bool | None = None, progress: bool = True, sampler: str = "ddim", karras: bool = False) -> FuseResult:
    """MagicFusion: sample with `general` and `expert` (a Model or a list of them) blended by saliency.

    `expert_prompt` (a string, or one per expert) defaults to `prompt`; `ke` likewise. SNB runs at the steps
    whose timestep t satisfies fuse_until < t <= fuse_from; elsewhere the `outside` model's noise is used
    ("general", or "expert": the first expert). The fused latents are decoded by the general model's VAE.
    """
    check_fuse(locals())  # types and ranges of every argument, and the run's memory (checks.py)
    experts = list(expert) if isinstance(expert, (list, tuple)) else [expert]
    if not experts:
        raise InputError("fuse needs at least one expert model; for one model alone use generate")
    eprompts = per_expert(prompt if expert_prompt is None else expert_prompt, len(experts), "expert prompts")
    kes = per_expert(ke, len(experts), "ke values")
    check_compatible([general] + experts)
    if blur and min(height, width) < 2 * LATENT_FACTOR:
        raise InputError(f"the saliency blur needs images of at least 16 px a side, got {width}x{height}; "
                         "use a larger size or blur=False (--no-blur)")
    for name, value, allowed in (("outside", outside, ("general", "expert")), ("blend", blend, ("argmax", "average")),
                                 ("saliency_reference", saliency_reference, ("general", "own"))):
        if value not in allowed:
            raise InputError(f"{name} must be {' or '.join(map(repr, allowed))}, got {value!r}")
    opts = FuseOptions(blur, saliency_reference, blend, outside)
    latents, masks, seed = text_to_latents([general] + experts, [prompt] + eprompts, negative_prompt, steps, guidance,
                                           eta, seed, height, width, batch, sampler, karras, [kg] + kes, opts,
                                           fuse_from, fuse_until, clip_skip, graph, progress)
    return FuseResult(decode(general, latents), list(masks.unbind(0)), seed)


def per_expert(value, n: int, what: str) -> list:
    """One value for every expert (a scalar or a one-item list), or a list of one per expert."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) == 1:
        values *= n
    if len(values) != n:
        raise InputError(f"got {n} experts but {len(values)} {what}; give one for all or one per expert")
    return values


def check_compatible(models: list) -> None:
    """Models can be fused only if they share the latent space's shape: channels and the VAE's scale."""
    ref = models[0]
    for m in models[1:]:
        if m.unet.cfg.in_channels != ref.unet.cfg.in_channels or m.vae.cfg.z_channels != ref.vae.cfg.z_channels:
            raise InputError(f"{m.name} has {m.unet.cfg.in_channels} latent channels but {ref.name} has "
                             f"{ref.unet.cfg.in_channels}; fuse models of the same family (SD 1.x)")
        if m.vae.cfg.factor != ref.vae.cfg.factor or m.vae.cfg.scale_factor != ref.vae.cfg.scale_factor:
            raise InputError(f"{m.name}'s VAE has a different downsampling factor or latent scale than "
                             f"{ref.name}'s; fuse models that share the SD 1.x VAE")
        if m.device != ref.device:
            raise InputError(f"{m.name} is on {m.device} but {ref.name} is on {ref.device}; load both on one device")
