"""Upper bounds on options, and the memory a run will need, estimated before anything is allocated.

A run that cannot fit should be refused in a millisecond with the largest batch or size that would fit, not
die minutes later with an allocator traceback (or take the machine down with it). The estimate counts what
stays alive together: the latents and per-step tables, one UNet pass at the widest level (its activations, the
skip connections it keeps, the feed-forward's 8x-wide hidden layer), the VAE decoding one image at full size,
and the images themselves; UNet and VAE are never live at once. It assumes fused attention kernels (PyTorch's
`scaled_dot_product_attention` without the full score matrix, which is what it uses on CPU and CUDA). It is
deliberately generous, and only refuses what would need more than the device has free.
"""
from __future__ import annotations

import math

import torch

from .errors import InputError

MAX_SIDE = 8192       # pixels; SD 1.x was trained at 512 and a 8192 side is already 256x its area
MAX_BATCH = 1024      # images per run
MAX_GUIDANCE = 1000.0  # |classifier-free guidance|; 7.5 is typical, past ~30 images saturate
MAX_K = 1000.0         # |kg|, |ke|: softmax scales of the saliency
MAX_EXPERTS = 16       # models fused at once (the paper fuses two); each is loaded whole
LATENT_FACTOR = 8


def unet_pass_bytes(cfg, n: int, h: int, w: int, itemsize: int) -> int:
    """One UNet pass over `n` latents of h x w: the skips it keeps plus its widest level's working set."""
    skips = peak = 0
    for level, mult in enumerate(cfg.channel_mult):
        ch, px = cfg.model_channels * mult, h * w
        skips += (cfg.num_res_blocks + 1) * ch * px
        # a transformer block's feed-forward holds an 8x-wide GEGLU projection; a ResBlock a few activations,
        # and the decoder side concatenates a skip (2x wide)
        peak = max(peak, (16 if level in cfg.attention_levels else 6) * ch * px)
        h, w = (h + 1) // 2, (w + 1) // 2
    return n * itemsize * (skips + peak)


def vae_decode_bytes(cfg, height: int, width: int, itemsize: int) -> int:
    """Decoding one image: the full-resolution level's activations (GroupNorm, convolution in and out, residual,
    the 2x upsampled input) and the float32 pixels."""
    widest = max(cfg.ch * m * (height * width) // 4 ** i for i, m in enumerate(cfg.ch_mult))
    return 6 * widest * itemsize + 3 * height * width * 4 * 2


def estimate_bytes(models: list, height: int, width: int, batch: int, steps: int, noisy: bool,
                   concurrent: bool) -> int:
    """Bytes a run of `models` (one, or a general model and experts) needs beyond their weights. `noisy`: the
    sampler draws fresh noise for every step (DDIM with eta > 0, ancestral samplers), kept as one table."""
    ref = models[0]
    itemsize = ref.unet.out[2].weight.dtype.itemsize
    h, w = math.ceil(height / LATENT_FACTOR), math.ceil(width / LATENT_FACTOR)
    latents = batch * ref.unet.cfg.in_channels * h * w * 4
    tables = 8 * latents + (steps * latents if noisy else 0) + steps * batch * h * w * 8  # noise, masks
    unet = max(unet_pass_bytes(m.unet.cfg, 2 * batch, h, w, itemsize) for m in models)
    unet *= len(models) if concurrent else 1  # a CUDA graph keeps every model's activations
    vae = max(vae_decode_bytes(m.vae.cfg, height, width, itemsize) for m in models)
    images = (len(models) + 1) * batch * height * width * 3
    return tables + max(unet, vae) + images


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2 ** 60:
            return max(int(limit) - usage, 0)
    return None


def _address_space_available() -> int | None:
    """Room left under RLIMIT_AS (`ulimit -v`), which caps the process's virtual size."""
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        return max(soft - vm, 0)
    except (ImportError, OSError, ValueError, StopIteration):
        return None


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a run on `device` (None when it cannot be told)."""
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    known = [v for v in (_meminfo_available(), _cgroup_available(), _address_space_available()) if v is not None]
    return min(known) if known else None


def gib(n: int) -> str:
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{max(n, 0) / 2 ** 20:.0f} MiB"


def check_memory(models: list, height: int, width: int, batch: int, steps: int, noisy: bool, concurrent: bool) -> None:
    """Refuse a run whose estimate exceeds the free memory of its device, saying what would fit."""
    device = models[0].unet.out[2].weight.device
    free = available_bytes(device)
    if free is None:
        return
    need = estimate_bytes(models, height, width, batch, steps, noisy, concurrent)
    if need <= free:
        return
    fits = _largest(batch - 1, lambda b: estimate_bytes(models, height, width, b, steps, noisy, concurrent) <= free)
    side = max((s for s in range(64, max(height, width) + 1, 64)
                if estimate_bytes(models, s, s, 1, steps, noisy, concurrent) <= free), default=0)
    what = (f"{fits} image(s) fit at {width}x{height}" if fits else
            f"one image fits at {side}x{side}" if side else "not even one 64x64 image fits; free some memory")
    raise InputError(f"this run ({batch} x {width}x{height}, {steps} steps) needs about {gib(need)} of {device.type} "
                     f"memory beyond the weights but about {gib(free)} is free; at most {what}")


def _largest(top: int, ok) -> int:
    """The largest n in 1..top with ok(n), for ok true up to some n and false after (0 when none)."""
    lo, hi = 0, top
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo
