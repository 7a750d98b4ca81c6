"""Prompt -> pixels: text encoding, the DDIM loop with classifier-free guidance (and SNB when fusing), decoding.

`generate` samples with one model; `fuse` runs MagicFusion over a general model and one or more experts. Both
go through `sample`, whose step is `fused_step`: with one model it is plain guided DDIM, with several it blends
their noises by saliency. The step reads everything step-dependent from per-step tables indexed by `i`, so the
eager loop (i an int) and the CUDA graph (i a device counter, see `graph.py`) run the same math.

Randomness matches diffusers' StableDiffusionPipeline with a CPU generator: the initial latents, then (for
eta > 0) one noise tensor per step, drawn in float32 on the CPU from `torch.Generator("cpu").manual_seed(seed)`,
so a seed gives the same image on every device.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import ddim
from .clip import CLIPTextModel
from .errors import InputError
from .prompt import encode_prompt
from .snb import guidance, snb
from .tokenizer import CLIPTokenizer
from .unet import UNetModel
from .vae import VAEDecoder

LATENT_FACTOR = 8  # the VAE turns each latent pixel into 8x8 image pixels


@dataclass(eq=False)
class Model:
    """One Stable Diffusion 1.x model, ready to sample. Made by `magicfusion.load`."""
    unet: UNetModel
    text_encoder: CLIPTextModel
    vae: VAEDecoder
    tokenizer: CLIPTokenizer
    name: str = "model"
    graphs: dict = field(default_factory=dict, repr=False)  # captured CUDA graphs of sampling steps (graph.py)

    def release_graphs(self) -> None:
        """Free the captured step graphs (they live on the general model of a fusion) and their memory pools."""
        for runner in self.graphs.values():
            runner.close()
        self.graphs.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # a freed graph pool goes back to the driver only through the cache

    @property
    def device(self) -> torch.device:
        return self.unet.out[2].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.out[2].weight.dtype


@dataclass(frozen=True)
class FuseOptions:
    """How several models' noises become one (see snb.py). Defaults reproduce the authors' code."""
    ks: tuple = (1.0,)               # softmax temperature per model: kg, then each expert's ke
    blur: bool = True
    reference: str = "general"       # "general": r_E = s (c_E - u_G); "own": r_E = s (c_E - u_E)
    blend: str = "argmax"            # "argmax": SNB; "average": the plain mean (the paper's Fig. 9 baseline)
    outside: int = 0                 # model whose noise is used outside the fusion window (0 = general)


@dataclass
class Tables:
    """Everything a step needs that changes from step to step, one row per step (kept on the device)."""
    t: torch.Tensor                  # (steps,) int64 timesteps
    alpha: torch.Tensor              # (steps,) float32
    alpha_prev: torch.Tensor
    sigma: torch.Tensor
    window: torch.Tensor             # (steps,) bool: SNB runs at this step
    noise: torch.Tensor | None       # (steps, B, 4, h, w) float32 eta noise, None when eta == 0
    in_window: tuple = ()            # the window again, on the host: the eager loop reads it without a sync

    def tensors(self) -> tuple:
        """The device tables, (t, alpha, alpha_prev, sigma, window, noise): what a step reads, and a graph copies."""
        return self.t, self.alpha, self.alpha_prev, self.sigma, self.window, self.noise

    def row(self, i) -> list:
        """Step i's (t, alpha, alpha_prev, sigma, window, noise). `i` is an int (eager loop) or a (1,) int64 device
        tensor (graph): `index_select`, unlike indexing with a tensor, never reads the index back to the host."""
        def pick(v):
            return None if v is None else v[i] if isinstance(i, int) else v.index_select(0, i).squeeze(0)
        return [pick(v) for v in self.tensors()]


@dataclass
class FuseResult:
    """`fused`: the PIL images. `masks`: per step, a (B, h, w) uint8 map of whose noise each latent pixel used:
    0 the general model (the paper's M = 1), i expert i, 255 where `average` mixed them. `seed`: the seed used."""
    fused: list
    masks: list = field(default_factory=list)
    seed: int = 0


def validate(steps, guidance_scale, eta, seed, height, width, batch) -> int:
    """Check the sampling options; returns the seed to use (-1 draws one)."""
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v <= 0 or v % LATENT_FACTOR:
            raise InputError(f"{name} must be a positive multiple of 8, got {v}; use e.g. 512")
    if not isinstance(steps, int) or not 1 <= steps <= ddim.TRAIN_STEPS:
        raise InputError(f"steps must be an integer in 1..1000, got {steps}; 50 is typical")
    if not np.isfinite(guidance_scale):
        raise InputError(f"guidance must be a finite number, got {guidance_scale}; 7.5 is typical")
    if not np.isfinite(eta) or eta < 0:
        raise InputError(f"eta must be a finite number >= 0, got {eta}; 0 is deterministic DDIM")
    if not isinstance(batch, int) or batch < 1:
        raise InputError(f"batch must be an integer >= 1, got {batch}")
    if not isinstance(seed, int) or not (seed == -1 or 0 <= seed < 2 ** 64):
        raise InputError(f"seed must be an integer in 0..2**64-1, or -1 for a random one; got {seed}")
    return random.randrange(2 ** 63) if seed == -1 else seed


def make_tables(steps: int, eta: float, fuse_from: int, fuse_until: int, generator: torch.Generator,
                shape: tuple, device) -> Tables:
    s = ddim.schedule(steps, eta)
    window = (s.t > fuse_until) & (s.t <= fuse_from)
    # one draw per step, in step order, exactly as the reference scheduler consumes the generator
    noise = torch.stack([torch.randn(shape, generator=generator) for _ in range(steps)]) if eta > 0 else None
    on_device = (x.to(device) if x is not None else None for x in (s.t, s.alpha, s.alpha_prev, s.sigma, window, noise))
    return Tables(*on_device, in_window=tuple(window.tolist()))


def predict(unet: UNetModel, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor):
    """Unconditional and conditional noise predictions in one batched UNet pass, as float32."""
    u, c = unet(torch.cat([x, x]).to(context.dtype), t, context).float().chunk(2)
    return u, c


def predict_all(unets: list, contexts: list, x: torch.Tensor, t: torch.Tensor, streams=None) -> list:
    """Every model's (u, c); with CUDA `streams` (one per model) the passes are issued on their own streams,
    forked from and joined back into the current one, so independent kernels can run side by side."""
    if streams is None:
        return [predict(unet, x, t, ctx) for unet, ctx in zip(unets, contexts)]
    main, out = torch.cuda.current_stream(), []
    for unet, ctx, stream in zip(unets, contexts, streams):
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            out.append(predict(unet, x, t, ctx))
    for stream in streams:
        main.wait_stream(stream)
    return out


def fused_step(unets: list, contexts: list, x: torch.Tensor, i, tab: Tables, scale: float, opts: FuseOptions,
               streams=None):
    """One sampling step for one or more models -> (next latents, (B, h, w) winner index).

    `i` is the step number: a Python int in the eager loop, a (1,) device tensor inside the CUDA graph. An int
    lets the eager loop skip the models whose noise goes unused; the graph cannot branch on the host, so it runs
    every model and selects with `torch.where`.
    """
    t, alpha, alpha_prev, sigma, in_window, noise = tab.row(i)
    n = len(unets)
    if n == 1 or (isinstance(i, int) and not tab.in_window[i]):
        u, c = predict(unets[opts.outside], x, t, contexts[opts.outside])
        eps, index = guidance(u, c, scale), torch.full_like(x[:, 0], opts.outside, dtype=torch.int64)
    else:
        pairs = predict_all(unets, contexts, x, t, streams)
        uncond, cond = [p[0] for p in pairs], [p[1] for p in pairs]
        if opts.blend == "average":
            eps = sum(guidance(u, c, scale) for u, c in pairs) / n
            index = torch.full_like(x[:, 0], 255, dtype=torch.int64)
        else:
            eps, index = snb(uncond, cond, scale, list(opts.ks), opts.blur, opts.reference)
        outside = guidance(uncond[opts.outside], cond[opts.outside], scale)
        eps = torch.where(in_window, eps, outside)
        index = torch.where(in_window, index, torch.full_like(index, opts.outside))
    return ddim.ddim_step(x, eps, alpha, alpha_prev, sigma, noise), index


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


@torch.no_grad()
def sample(models: list, prompts: list, negative_prompt: str = "", steps: int = 50, guidance_scale: float = 7.5,
           eta: float = 0.0, seed: int = 0, height: int = 512, width: int = 512, batch: int = 1,
           opts: FuseOptions = FuseOptions(), fuse_from: int = 1000, fuse_until: int = -1, clip_skip: int = 0,
           graph: bool | None = None, progress: bool = True):
    """Run the DDIM loop over `models` (one, or a general model and experts) -> (latents, masks, seed)."""
    seed = validate(steps, guidance_scale, eta, seed, height, width, batch)
    device = models[0].device
    contexts = [encode_prompt(m, p, negative_prompt, batch, clip_skip) for m, p in zip(models, prompts)]
    gen = torch.Generator("cpu").manual_seed(seed)
    shape = (batch, models[0].unet.cfg.in_channels, height // LATENT_FACTOR, width // LATENT_FACTOR)
    x = torch.randn(shape, generator=gen, dtype=torch.float32).to(device)
    tab = make_tables(steps, eta, fuse_from, fuse_until, gen, shape, device)
    if len(models) > 1 and not any(tab.in_window):
        raise InputError(f"no step of this run has fuse_until < t <= fuse_from ({fuse_until} < t <= {fuse_from}; "
                         f"its timesteps run from {int(tab.t[0])} down to {int(tab.t[-1])}); widen the window")
    unets = [m.unet for m in models]
    if graph is None:
        graph = device.type == "cuda"
    bar = tqdm(total=steps, disable=None if progress else True, desc="sampling", unit="step", leave=False)
    if graph:  # on CPU the same runner steps without capture (that is how the tests check it)
        from .graph import graph_for
        runner = graph_for(models, contexts, x, tab, guidance_scale, opts)
        x, masks = runner.run(x, contexts, tab, guidance_scale, opts.ks, bar)
    else:
        masks = []
        for i in range(steps):
            x, index = fused_step(unets, contexts, x, i, tab, guidance_scale, opts)
            masks.append(index.to(torch.uint8))
            bar.update()
        masks = torch.stack(masks)
    bar.close()
    if not torch.isfinite(x).all():
        raise InputError("the model produced NaN/inf latents: its weights are broken, or it overflows in "
                         f"{models[0].dtype}; try --dtype float32 or another checkpoint")
    return x, masks.cpu(), seed


def generate(model: Model, prompt: str, negative_prompt: str = "", steps: int = 50, guidance: float = 7.5,
             eta: float = 0.0, seed: int = 0, height: int = 512, width: int = 512, batch: int = 1,
             clip_skip: int = 0, graph: bool | None = None, progress: bool = True, return_seed: bool = False):
    """Text -> `batch` PIL images with one model (DDIM + classifier-free guidance)."""
    latents, _, seed = sample([model], [prompt], negative_prompt, steps, guidance, eta, seed, height, width, batch,
                              clip_skip=clip_skip, graph=graph, progress=progress)
    images = decode(model, latents)
    return (images, seed) if return_seed else images


def fuse(general: Model, expert, prompt: str, expert_prompt=None, negative_prompt: str = "", steps: int = 50,
         guidance: float = 7.5, eta: float = 0.0, seed: int = 0, height: int = 512, width: int = 512, batch: int = 1,
         kg: float = 1.0, ke=1.0, blur: bool = True, fuse_from: int = 1000, fuse_until: int = -1,
         outside: str = "general", saliency_reference: str = "general", blend: str = "argmax", clip_skip: int = 0,
         graph: bool | None = None, progress: bool = True) -> FuseResult:
    """MagicFusion: sample with `general` and `expert` (a Model or a list of them) blended by saliency.

    `expert_prompt` (a string, or one per expert) defaults to `prompt`; `ke` likewise. SNB runs at the steps
    whose timestep t satisfies fuse_until < t <= fuse_from; elsewhere the `outside` model's noise is used
    ("general", or "expert": the first expert).
    The fused latents are decoded by the general model's VAE.
    """
    experts = list(expert) if isinstance(expert, (list, tuple)) else [expert]
    if not experts:
        raise InputError("fuse needs at least one expert model; for one model alone use generate")
    eprompts = per_expert(prompt if expert_prompt is None else expert_prompt, len(experts), "expert prompts")
    kes = per_expert(ke, len(experts), "ke values")
    check_compatible([general] + experts)
    if blur and min(height, width) < 2 * LATENT_FACTOR:
        raise InputError(f"the saliency blur needs images of at least 16 px a side, got {width}x{height}; "
                         "use a larger size or blur=False (--no-blur)")
    if outside not in ("general", "expert"):
        raise InputError(f"outside must be 'general' or 'expert', got {outside!r}")
    if saliency_reference not in ("general", "own"):
        raise InputError(f"saliency_reference must be 'general' or 'own', got {saliency_reference!r}")
    if blend not in ("argmax", "average"):
        raise InputError(f"blend must be 'argmax' or 'average', got {blend!r}")
    for name, k in [("kg", kg)] + [("ke", k) for k in kes]:
        if not np.isfinite(k):
            raise InputError(f"{name} must be a finite number, got {k}; 1.0 is the default")
    opts = FuseOptions(tuple([kg] + kes), blur, saliency_reference, blend, 0 if outside == "general" else 1)
    latents, masks, seed = sample([general] + experts, [prompt] + eprompts, negative_prompt, steps, guidance, eta,
                                  seed, height, width, batch, opts, fuse_from, fuse_until, clip_skip, graph, progress)
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
