"""Benchmark: MagicFusion sampling in this project against the diffusers loop a user would write today.

One fused DDIM step (two SD 1.x models, classifier-free guidance, Saliency-aware Noise Blending at every step) is
run three (or four) ways, in ONE process, in interleaved rounds (a, b, c, d, a, b, ...) so clock and thermal drift
hit all alike:
  (a) ours, eager: the sampling loop's step (`sampling.Run.step`), and `magicfusion.fuse(graph=False)` end to end;
  (b) ours, CUDA graph: the same step captured once and replayed (`sampling.captured`); on a CPU the same runner
      steps without capture, so (b) is reported there but means nothing about graphs;
  (c) the baseline: two diffusers `UNet2DConditionModel`s called in a Python loop, the SNB math written out plainly
      below (`baseline_step`), diffusers' `DDIMScheduler` for the update, transformers' CLIP for the text and
      diffusers' `AutoencoderKL` for the pixels;
  (d) with `--compile-baseline`: (c) with both UNets channels_last and under `torch.compile(mode="max-autotune")`
      (Inductor's Triton kernels and its own CUDA graphs), the speed-up a diffusers user reaches for first; its
      compile time (the first calls) is reported on its own row, not in its step times.
Single-model rows time plain guided DDIM (one UNet, no SNB) the same ways.

Also reported: the matrix work of one step (convolutions, matmuls and attention, counted by
`torch.utils.flop_counter` on the meta device, so nothing is computed) and each variant's achieved TFLOP/s;
`--profile N` adds, per variant, the device time of N steps by kind of kernel (on a CPU: by operator), the top
kernels by device time (name, calls and milliseconds per step, kind), which say where a step's time goes and, set
against the step's wall time, how much of it overlaps or idles (CUPTI's timing of kernels inside CUDA graphs has had
a known problem, pytorch/kineto#1165: (a) runs the same kernels without a graph, so its breakdown is the one to
trust). The speed levers (magicfusion/layout.py) are flags: `--channels-last/--no-channels-last` (default: what
`magicfusion.load` does, on for CUDA; it applies to (c) too), `--nhwc-groupnorm`, `--split-geglu`. `--graph-text`
and `--graph-vae` time the text encoders and the VAE decode captured as CUDA graphs too (bench only: the library
does not graph them), in the (b) column of those rows.

Why the comparison is fair: (c)'s models are built from the very tensors (a) and (b) load (diffusers' own
single-file converters, tests/oracle.py), in the same dtype on the same device; attention is
`F.scaled_dot_product_attention` on both sides (diffusers' AttnProcessor2_0 and transformers' "sdpa", set
explicitly); the latents stay float32 and the UNet runs in the model dtype on both sides; and the math is the
same, which the script checks before timing: one step of (a) and (c) from the same latents must agree. Both sides
share our tokenizer (tokenization is not what is measured). The weights are random (`tools/random_weights.py`),
which changes nothing about speed.

    python tools/bench.py                                    # CUDA: sd15 shapes, 512x512, float16, 50 steps
    python tools/bench.py --device cpu --json bench.json     # CPU: tiny config, 64x64, float32, 5 steps
"""
from __future__ import annotations

import argparse
import collections
import copy
import datetime
import itertools
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import magicfusion
from magicfusion import sampling
from magicfusion.clip import CLIPTextModel
from magicfusion.denoiser import FuseOptions
from magicfusion.layout import configure, default_channels_last, set_channels_last
from magicfusion.pipeline import decode
from magicfusion.prompt import encode_prompt
from magicfusion.samplers import DDIM
from magicfusion.unet import UNetModel
from magicfusion.vae import VAEDecoder

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `tools.*` when run as a script
from tools.random_weights import write_checkpoint, write_tiny_vocab  # noqa: E402

PROMPT, SCALE = "a photo of a red fox in the snow", 7.5
FUSE_OPTS = FuseOptions()  # what fuse() builds by default
THRESHOLD = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 1e-1}   # sanity check: max |a - c| / max |c|
GIB = 2 ** 30
TOP = 15  # kernels listed per profiled variant
# Kinds of kernel (CUDA) or operator (CPU), by lowercased name, first match wins. Hopper's names: cuBLAS GEMMs are
# `nvjet_sm90_*` (or `sm90_xmma_gemm_*`, cutlass `*gemm*`), cuDNN convolutions `sm90_xmma_fprop_implicit_gemm_*`
# (an implicit GEMM: "fprop" tells it from a plain one) and `*conv*`, attention cuDNN's `*sdpa*`/`*flash*`
# or PyTorch's flash/memory-efficient kernels. "elementwise" is PyTorch's TensorIterator kernels (layout copies,
# adds, activations, casts), the glue a fused kernel would remove.
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "sdp_")),
    ("convolution", ("conv", "fprop", "dgrad", "wgrad", "implicit_gemm", "winograd")),
    ("matmul", ("nvjet", "gemm", "cutlass", "xmma", "matmul", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear",
                "aten::baddbmm", "cublas")),
    ("normalization", ("norm", "moments", "computefusedparams", "welford", "aten::var_mean", "aten::var")),
    ("elementwise", ("elementwise", "copy", "nchwtonhwc", "nhwctonchw", "aten::add", "aten::mul", "aten::silu",
                     "aten::gelu", "aten::cat", "aten::to", "aten::clone", "aten::contiguous", "aten::sum",
                     "aten::mean", "aten::where", "aten::div", "aten::sub", "reduce_kernel", "upsample", "catarray")))


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel or CPU operator, from its name (KERNEL_KINDS)."""
    name = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in name for k in keys)), "other")


def baseline_step(unets, contexts, x, t, sched, scale, ks=(1.0, 1.0)):
    """(c) One step as written over diffusers -> (next latents, (B, h, w) bool "the general model wins").

    MagicFusion (arXiv 2303.13126) eq. 5 with the authors' responses: r_X = s (c_X - u_G),
    S_X = softmax_hw(k_X mean_c blur|r_X|), blur = avg_pool(4, stride 1, pad 1) resized back bilinearly,
    eps = eps_G where S_G >= S_E else eps_E.
    """
    us, cs = [], []
    for unet, ctx in zip(unets, contexts):
        u, c = unet(torch.cat([x, x]).to(ctx.dtype), t, encoder_hidden_states=ctx).sample.float().chunk(2)
        us.append(u)
        cs.append(c)
    eps = [u + scale * (c - u) for u, c in zip(us, cs)]
    if len(unets) == 1:
        return sched.step(eps[0], t, x).prev_sample, None
    sal = []
    for c, k in zip(cs, ks):
        r = (scale * (c - us[0])).abs()
        r = F.interpolate(F.avg_pool2d(r, 4, stride=1, padding=1), size=r.shape[-2:], mode="bilinear",
                          align_corners=False)
        m = r.mean(dim=1)
        sal.append(torch.softmax(k * m.flatten(1), dim=1).view_as(m))
    general_wins = sal[0] >= sal[1]
    return sched.step(torch.where(general_wins[:, None], eps[0], eps[1]), t, x).prev_sample, general_wins


@torch.no_grad()
def baseline_fuse(ref, tokenizer, steps, height, width, batch, seed=0, unets=None):
    """(c) end to end: CLIP, the DDIM loop of `baseline_step` (over `unets`, default ref's), VAE decode, PIL."""
    from oracle import ddim_scheduler
    device = ref["vae"].device
    contexts = baseline_encode(ref, tokenizer, batch)
    sched = ddim_scheduler()
    sched.set_timesteps(steps, device=device)
    gen = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn((batch, 4, height // 8, width // 8), generator=gen).to(device)
    for t in sched.timesteps:
        x, _ = baseline_step(unets or ref["unets"], contexts, x, t, sched, SCALE)
    return baseline_decode(ref, x)


def baseline_encode(ref, tokenizer, batch):
    """(c) each model's [negative, prompt] embeddings with transformers' CLIP, repeated for the batch."""
    ids = tokenizer(["", PROMPT]).to(ref["vae"].device)
    return [clip(input_ids=ids).last_hidden_state.repeat_interleave(batch, 0) for clip in ref["clips"]]


def to_pil(px: torch.Tensor) -> list:
    """(B, 3, H, W) pixels in [-1, 1] -> PIL images, rounded as the reference pipeline does."""
    px = (px.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((p * 255).round().astype(np.uint8)) for p in px]


def baseline_decode(ref, x):
    """(c) latents -> PIL images with diffusers' AutoencoderKL."""
    return to_pil(ref["vae"].decode(x.to(ref["vae"].dtype) / ref["vae"].config.scaling_factor).sample)


def build_baseline(general, expert, device, dtype):
    """diffusers/transformers models from OUR loaded tensors (converted on the CPU, then moved and cast)."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.utils import logging
    from oracle import diffusers_unet, diffusers_vae, hf_clip
    logging.set_verbosity_error()  # .to(dtype) warns about an empty list of modules to keep in float32

    def cpu(module):
        return {k: v.cpu().contiguous() for k, v in module.state_dict().items()}
    unets, clips = [], []
    for m in (general, expert):
        unet = diffusers_unet(m.unet.cfg, cpu(m.unet)).to(device, dtype)
        unet.set_attn_processor(AttnProcessor2_0())
        clip = hf_clip(m.text_encoder.cfg, cpu(m.text_encoder)).to(device, dtype)
        if hasattr(clip, "set_attn_implementation"):  # older transformers: CLIP keeps its eager attention
            clip.set_attn_implementation("sdpa")
        unets.append(unet)
        clips.append(clip)
    return {"unets": unets, "clips": clips, "vae": diffusers_vae(general.vae.cfg, cpu(general.vae)).to(device, dtype)}


class Timer:
    """Milliseconds of one call. CUDA: events around the call, after a synchronize so every call starts on an idle
    device (launch overhead then counts, as it does in a real loop); CPU: perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn) -> float:
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def nbytes(*modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in itertools.chain(m.parameters(), m.buffers()))


def static_bytes(run) -> int:
    """A captured run's static buffers (latents, sampler state, embeddings, tables, masks), outside its pool."""
    buffers = [run.x, run.prev, *run.contexts, *(t for t in run.tables.tensors() if t is not None), run.masks,
               run.counter, run.scale, run.ks]
    return sum(t.numel() * t.element_size() for t in buffers)


def pool_bytes() -> collections.Counter:
    """Reserved bytes per CUDA memory pool; a captured graph keeps its activations in a private pool."""
    out = collections.Counter()
    for seg in torch.cuda.memory_snapshot():
        out[tuple(seg.get("segment_pool_id", (0, 0)))] += seg["total_size"]
    return out


def tables_for(steps: int, shape: tuple, device, gen=None) -> sampling.Tables:
    """A DDIM run's device tables (eta 0) with every step inside the fusion window."""
    plan = DDIM.plan(steps, 0.0)
    return sampling.make_tables(plan, torch.ones(steps, dtype=torch.bool), gen, shape, device)


def eager_run(unets, contexts, x, tab, ks) -> sampling.Run:
    """(a) a run's state and its step, run eagerly (the step `sampling.captured` records for (b))."""
    scale = torch.tensor(SCALE, device=x.device)
    return sampling.Run(unets, DDIM, x.clone(), tab, contexts, scale, torch.tensor(ks, device=x.device), FUSE_OPTS)


def rewind(run, x) -> None:
    run.x.copy_(x)
    run.prev.zero_()
    run.counter.zero_()


def work_tflop(g, e, x_shape, ctx_shape) -> dict:
    """TFLOP of matrix work (convolutions, matmuls, attention) in each part of a run, counted by running fresh
    copies of the models on the meta device: shapes only, nothing computed, nothing allocated."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        unets = [UNetModel(m.unet.cfg) for m in (g, e)]
        clip, vae = CLIPTextModel(g.text_encoder.cfg), VAEDecoder(g.vae.cfg)
        contexts, x = [torch.empty(ctx_shape) for _ in unets], torch.empty(x_shape)
        ids = torch.zeros((2, ctx_shape[1]), dtype=torch.int64)
        tab = tables_for(1, x_shape, "meta")
        fused = eager_run(unets, contexts, x, tab, [1.0, 1.0])
        single = eager_run(unets[:1], contexts[:1], x, tab, [1.0])
    parts = {"fused": fused.step, "single": single.step,
             "text": lambda: [clip(ids) for _ in unets],  # each model encodes its [negative, prompt] pair
             "vae": lambda: vae(x)}
    out = {}
    for name, run in parts.items():
        with FlopCounterMode(display=False) as count:
            run()
        out[name] = count.get_total_flops() / 1e12
    return out


def profile_steps(variants, x, steps: int, n: int, device: torch.device) -> tuple[dict, dict]:
    """Per variant: device milliseconds per step by kind of kernel, over n profiled steps, and the top kernels
    (name, calls per step, ms per step, kind). On a CPU the 'kernels' are the operators' self times."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    # CUPTI torn down and re-initialised between sessions crashed with CUDA graphs before CUDA 12.6 (pytorch#112507)
    os.environ.setdefault("TEARDOWN_CUPTI", "0")
    kinds_out, top_out = {}, {}
    for name, step, run in variants:
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for r in range(n):
                if run is not None and r % steps == 0:
                    rewind(run, x)
                step(r % steps)
            if cuda:
                torch.cuda.synchronize()
        kinds, rows = collections.Counter(), []
        for evt in prof.key_averages():
            if cuda and evt.device_type != DeviceType.CUDA:
                continue
            ms = (evt.self_device_time_total if cuda else evt.self_cpu_time_total) / 1e3 / n
            if ms > 0:
                kinds[kernel_kind(evt.key)] += ms
                rows.append((evt.key, evt.count / n, ms, kernel_kind(evt.key)))
        kinds_out[name] = dict(kinds, total=sum(kinds.values()))
        top_out[name] = [[k[:100], round(c, 2), round(ms, 4), kind] for k, c, ms, kind in
                         sorted(rows, key=lambda r: -r[2])[:TOP]]
    return kinds_out, top_out


def graphed(fn, device: torch.device):
    """fn() captured as a CUDA graph -> (replay, its static output, pool bytes); on a CPU (fn, None, 0)."""
    if device.type != "cuda":
        return fn, None, 0
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    before = pool_bytes()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    after = pool_bytes()
    return graph.replay, out, sum(after[k] for k in after if k not in before)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", choices=["tiny", "sd15"])
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--steps", type=int, help="steps of an end-to-end run (and rows of the per-step tables)")
    p.add_argument("--timed-steps", type=int, help="timed calls per variant for the per-step medians")
    p.add_argument("--warmup", type=int, help="untimed calls per variant first")
    p.add_argument("--runs", type=int, help="end-to-end runs per variant (median)")
    p.add_argument("--dtype", choices=list(THRESHOLD))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--skip-baseline", action="store_true", help="time (a) and (b) only; no diffusers")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="UNets and VAEs (ours and diffusers') in the channels_last memory format (default: as "
                        "magicfusion.load, on for CUDA)")
    p.add_argument("--nhwc-groupnorm", action="store_true", help="lever: GroupNorm computed in channels_last")
    p.add_argument("--split-geglu", action="store_true", help="lever: GEGLU as two contiguous products")
    p.add_argument("--compile-baseline", action="store_true",
                   help="add (d): the diffusers loop, UNets channels_last under torch.compile")
    p.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode of (d)")
    p.add_argument("--graph-text", action="store_true", help="also time the text encoders captured as a CUDA graph")
    p.add_argument("--graph-vae", action="store_true", help="also time the VAE decode captured as a CUDA graph")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile N steps per variant: device time by kind of kernel, and the top kernels")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    p.add_argument("--quiet", action="store_true", help="print only the table")
    a = p.parse_args(argv)
    a.device = torch.device(a.device)
    cuda = a.device.type == "cuda"
    for name, gpu, cpu in (("config", "sd15", "tiny"), ("height", 512, 64), ("width", 512, 64), ("steps", 50, 5),
                           ("timed_steps", 30, 3), ("warmup", 5, 1), ("runs", 3, 1), ("dtype", "float16", "float32")):
        if getattr(a, name) is None:
            setattr(a, name, gpu if cuda else cpu)
    if a.channels_last is None:
        a.channels_last = default_channels_last(a.device)
    if a.compile_baseline and a.skip_baseline:
        p.error("--compile-baseline needs the baseline; drop --skip-baseline")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    log = (lambda *s: None) if a.quiet else (lambda *s: print(*s, file=sys.stderr, flush=True))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # oracle.py: the reference models
    device, dtype, cuda = a.device, getattr(torch, a.dtype), a.device.type == "cuda"
    timer, baseline = Timer(device), not a.skip_baseline
    torch.set_grad_enabled(False)

    log(f"writing two random {a.config} checkpoints ({a.dtype}) ...")
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_vocab(tmp)
        g, e = (magicfusion.load(write_checkpoint(Path(tmp) / f"m{s}.safetensors", a.config, s, dtype), tokenizer=tmp,
                                 device=device, dtype=dtype, channels_last=a.channels_last) for s in (1, 2))
    for m in (g, e):
        for module in (m.unet, m.vae):
            configure(module, nhwc_groupnorm=a.nhwc_groupnorm, split_geglu=a.split_geglu)
    ref = build_baseline(g, e, device, dtype) if baseline else None
    if baseline:
        set_channels_last([*ref["unets"], ref["vae"]], a.channels_last)

    # fixed inputs of the per-step timings: latents, the run's tables, each side's own text encoding
    gen = torch.Generator("cpu").manual_seed(0)
    x = torch.randn((a.batch, 4, a.height // 8, a.width // 8), generator=gen).to(device)
    tab = tables_for(a.steps, x.shape, device, gen)
    def encode():  # ours: each model's [negative, prompt] embeddings
        return [encode_prompt(m, PROMPT, "", a.batch) for m in (g, e)]
    ctx = encode()
    if baseline:
        from oracle import ddim_scheduler
        sched = ddim_scheduler()
        sched.set_timesteps(a.steps, device=device)
        rctx = baseline_encode(ref, g.tokenizer, a.batch)

    fused = eager_run([g.unet, e.unet], ctx, x, tab, [1.0, 1.0])
    single = eager_run([g.unet], ctx[:1], x, tab, [1.0])
    # sanity: one fused step of (a) and (c) from the same latents; pixels where SNB picks differently (a near-tie
    # of the saliencies flipped by rounding) are counted, not compared
    fused.step()
    xa, index = fused.x.clone(), fused.masks[0]
    rewind(fused, x)
    sanity = None
    if baseline:
        xc, general_wins = baseline_step(ref["unets"], rctx, x, sched.timesteps[0], sched, SCALE)
        agree = (index == 0) == general_wins
        diff = (xa - xc).abs().amax(1)[agree].max() if agree.any() else torch.tensor(float("inf"))
        rel = (diff / xc.abs().max()).item()
        sanity = {"rel_diff": rel, "threshold": THRESHOLD[a.dtype], "mask_agreement": agree.float().mean().item()}
        sanity["ok"] = rel < sanity["threshold"] and sanity["mask_agreement"] >= 0.99
        log(f"sanity: one fused step, ours vs diffusers: max|diff|/max|x| = {rel:.2e} (threshold "
            f"{sanity['threshold']:g}), SNB masks agree on {100 * sanity['mask_agreement']:.2f}% of pixels")

    # captured runs: on CUDA, getting one is the warm-up plus the capture (and a private memory pool)
    sampling.release_graphs()
    graphs, capture_s, pools = {}, {}, {}
    for name, run in (("fused", fused), ("single", single)):
        unets = [ref_() for ref_ in run.denoise.unets]
        before = pool_bytes() if cuda else None
        timer.sync()
        t0 = time.perf_counter()
        graphs[name] = sampling.captured(unets, DDIM, x, tab, run.contexts, run.scale, run.ks, FUSE_OPTS)
        timer.sync()
        capture_s[name] = time.perf_counter() - t0 if cuda else None
        if cuda:
            after = pool_bytes()
            pools[name] = sum(after[k] for k in after if k not in before)

    variants = [  # (name, step i -> None, run to rewind at i == 0 or None), timed in this order every round
        ("fused/a", lambda i: fused.step(), fused),
        ("fused/b", lambda i: graphs["fused"][1](), graphs["fused"][0]),
        ("single/a", lambda i: single.step(), single),
        ("single/b", lambda i: graphs["single"][1](), graphs["single"][0])]
    compile_s = None
    if baseline:
        variants += [
            ("fused/c", lambda i: baseline_step(ref["unets"], rctx, x, sched.timesteps[i], sched, SCALE), None),
            ("single/c", lambda i: baseline_step(ref["unets"][:1], rctx[:1], x, sched.timesteps[i], sched, SCALE),
             None)]
    if a.compile_baseline:
        log(f"(d): compiling both diffusers UNets, channels_last, mode={a.compile_mode} ...")
        dunets = [torch.compile(copy.deepcopy(u).to(memory_format=torch.channels_last), mode=a.compile_mode)
                  for u in ref["unets"]]
        compile_s = {}
        for name, us, cs in (("fused", dunets, rctx), ("single", dunets[:1], rctx[:1])):
            timer.sync()
            t0 = time.perf_counter()
            for i in range(3):  # compiles on the first call; Inductor's CUDA graphs record on a later one
                baseline_step(us, cs, x, sched.timesteps[i % a.steps], sched, SCALE)
            timer.sync()
            compile_s[name] = time.perf_counter() - t0
            log(f"(d) {name}: first 3 calls (compile, autotune, graph recording) {compile_s[name]:.1f} s")
        # (d) computes (c)'s step: one step from the same latents, the same measure as the sanity check above
        xd, d_wins = baseline_step(dunets, rctx, x, sched.timesteps[0], sched, SCALE)
        agree = d_wins == general_wins
        diff = (xd - xc).abs().amax(1)[agree].max() if agree.any() else torch.tensor(float("inf"))
        sanity["compiled_rel_diff"] = (diff / xc.abs().max()).item()
        sanity["compiled_mask_agreement"] = agree.float().mean().item()
        log(f"(d) against (c), one fused step: max|diff|/max|x| = {sanity['compiled_rel_diff']:.2e}, masks agree on "
            f"{100 * sanity['compiled_mask_agreement']:.2f}% of pixels")
        variants += [
            ("fused/d", lambda i: baseline_step(dunets, rctx, x, sched.timesteps[i], sched, SCALE), None),
            ("single/d", lambda i: baseline_step(dunets[:1], rctx[:1], x, sched.timesteps[i], sched, SCALE), None)]
    log(f"timing {a.timed_steps} steps per variant after {a.warmup} warm-up, interleaved ...")
    times = collections.defaultdict(list)
    for r in range(a.warmup + a.timed_steps):
        i = r % a.steps
        for name, step, run in variants:
            if run is not None and i == 0:  # a run advances its own step counter: rewind it, untimed
                rewind(run, x)
            ms = timer(lambda: step(i))
            if r >= a.warmup:
                times[name].append(ms)
    step_ms = {k: statistics.median(v) for k, v in times.items()}
    tflop = work_tflop(g, e, tuple(x.shape), tuple(ctx[0].shape))

    # the parts that run once per image, outside the step graph: are they worth graphing too? (b) = captured
    parts = {"text": {"a": encode}, "vae": {"a": lambda: decode(g, x)}}
    part_pools = {}
    if a.graph_text:
        ids = g.tokenizer(["", PROMPT]).to(device)
        replay, _, part_pools["text"] = graphed(lambda: [m.text_encoder(ids).repeat_interleave(a.batch, 0)
                                                         for m in (g, e)], device)
        parts["text"]["b"] = lambda: (ids.copy_(g.tokenizer(["", PROMPT])), replay())
    if a.graph_vae:
        z = x[:1].to(dtype).clone()
        replay, px, part_pools["vae"] = graphed(lambda: g.vae(z), device)
        parts["vae"]["b"] = lambda: (z.copy_(x[:1]), replay(), to_pil(px if px is not None else g.vae(z)))
    if baseline:
        parts["text"]["c"] = lambda: baseline_encode(ref, g.tokenizer, a.batch)
        parts["vae"]["c"] = lambda: baseline_decode(ref, x)
    part_times = collections.defaultdict(list)
    for r in range(a.warmup + a.timed_steps):
        for part, sides in parts.items():
            for k, run in sides.items():
                ms = timer(run)
                if r >= a.warmup:
                    part_times[part, k].append(ms)
    prof = top = None
    if a.profile:
        log(f"profiling {a.profile} steps per variant ...")
        prof, top = profile_steps(variants, x, a.steps, a.profile, device)

    log(f"end to end: {a.runs} run(s) of {a.steps} steps per variant ...")
    kw = dict(steps=a.steps, height=a.height, width=a.width, batch=a.batch, progress=False)
    e2e = {"a": lambda: magicfusion.fuse(g, e, PROMPT, graph=False, **kw).fused,
           "b": lambda: magicfusion.fuse(g, e, PROMPT, graph=True, **kw).fused}
    weights = {"a": nbytes(g.unet, g.text_encoder, g.vae, e.unet, e.text_encoder)}
    weights["b"] = weights["a"] + pools.get("fused", 0) + static_bytes(graphs["fused"][0])
    if baseline:
        e2e["c"] = lambda: baseline_fuse(ref, g.tokenizer, a.steps, a.height, a.width, a.batch)
        weights["c"] = nbytes(*ref["unets"], *ref["clips"], ref["vae"].decoder, ref["vae"].post_quant_conv)
    if a.compile_baseline:
        e2e["d"] = lambda: baseline_fuse(ref, g.tokenizer, a.steps, a.height, a.width, a.batch, unets=dunets)
        weights["d"] = weights["c"] + nbytes(*dunets)  # (d)'s own UNets, beside (c)'s text encoders and VAE
    magicfusion.fuse(g, e, PROMPT, graph=False, **dict(kw, steps=1))  # warm the text encoders and VAEs once
    if baseline:
        baseline_fuse(ref, g.tokenizer, 1, a.height, a.width, a.batch)
    cached = set(sampling.CACHE)
    secs, peak = collections.defaultdict(list), {}
    for _ in range(a.runs):
        for k, run in e2e.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device)
            secs[k].append(timer(run) / 1e3)
            if cuda:
                peak[k] = (weights[k] + torch.cuda.max_memory_allocated(device) - resident) / GIB
    assert set(sampling.CACHE) == cached, "fuse(graph=True) captured a new graph: the e2e (b) time would include it"

    cols = "abcd"
    res = {
        "env": {"device": torch.cuda.get_device_name(device) if cuda else
                f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs)",
                "device_type": device.type, "config": a.config, "dtype": a.dtype, "height": a.height,
                "width": a.width, "batch": a.batch, "steps": a.steps, "timed_steps": a.timed_steps,
                "warmup": a.warmup, "runs": a.runs, "channels_last": a.channels_last,
                "nhwc_groupnorm": a.nhwc_groupnorm, "split_geglu": a.split_geglu,
                "compile_mode": a.compile_mode if a.compile_baseline else None, "torch": torch.__version__,
                "diffusers": __import__("diffusers").__version__ if baseline else None,
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "command": " ".join(shlex.quote(s) for s in ["python"] + sys.argv)},
        "sanity": sanity,
        "work_tflop": tflop,
        "profile_ms_per_step": prof,
        "top_kernels": top,
        "graph_capture_s": capture_s,
        "graph_pool_gib": {k: v / GIB for k, v in {**pools, **part_pools}.items()} if cuda else None,
        "compile_s": compile_s,
    }
    rows = [("fused_step_ms", {k: step_ms.get("fused/" + k) for k in cols}),
            ("single_step_ms", {k: step_ms.get("single/" + k) for k in cols}),
            ("text_ms", {k: statistics.median(part_times["text", k]) if ("text", k) in part_times else None
                         for k in cols}),
            ("vae_ms", {k: statistics.median(part_times["vae", k]) if ("vae", k) in part_times else None
                        for k in cols}),
            ("e2e_s", {k: statistics.median(secs[k]) if secs[k] else None for k in cols}),
            ("peak_gib", {k: peak.get(k) for k in cols} if cuda else None)]
    for key, row in rows:
        if row is not None:
            row.update({f"{n}/{k}": row[n] / row[k] if row[n] and row[k] else None
                        for n, k in (("c", "a"), ("c", "b"), ("d", "b"))})
        res[key] = row
    res["achieved_tflop_per_s"] = {kind: {k: tflop[kind] * 1e3 / step_ms[f"{kind}/{k}"] if f"{kind}/{k}" in step_ms
                                          else None for k in cols} for kind in ("fused", "single")}
    print(table(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    if sanity is not None and not sanity["ok"]:
        print("SANITY CHECK FAILED: (a) and (c) do not compute the same step; the timings compare different work",
              file=sys.stderr)
        return 1
    return 0


def table(res: dict) -> str:
    env, cuda = res["env"], res["env"]["device_type"] == "cuda"

    def f(v, unit=""):
        return "—" if v is None else f"{v:.2f}x" if unit == "x" else f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    b = "(b) ours, CUDA graph" if cuda else "(b) ours, graph runner (no capture on CPU)"
    levers = ", ".join(k for k in ("channels_last", "nhwc_groupnorm", "split_geglu") if env.get(k)) or "none"
    lines = [f"### MagicFusion benchmark: {env['device']}", "",
             f"- {env['config']} shapes, random weights, {env['dtype']}, {env['height']}x{env['width']}, batch "
             f"{env['batch']}, {env['steps']} steps end to end (median of {env['runs']}); per-step: median of "
             f"{env['timed_steps']} after {env['warmup']} warm-up, {'CUDA events' if cuda else 'perf_counter'}",
             f"- levers on: {levers}",
             f"- torch {env['torch']}, diffusers {env['diffusers'] or '(not run)'}, {env['date']}",
             f"- command: `{env['command']}`"]
    s = res["sanity"]
    if s is not None:
        lines.append(f"- sanity: one fused step, ours vs diffusers: max|diff|/max|x| = {s['rel_diff']:.1e} (limit "
                     f"{s['threshold']:g}), SNB masks agree on {100 * s['mask_agreement']:.2f}% of pixels: "
                     f"{'OK' if s['ok'] else 'FAILED'}")
        if "compiled_rel_diff" in s:
            lines.append(f"- (d) against (c), one fused step: max|diff|/max|x| = {s['compiled_rel_diff']:.1e}, SNB "
                         f"masks agree on {100 * s['compiled_mask_agreement']:.2f}% of pixels")
    d = res["compile_s"] is not None
    head = ["(a) ours, eager", b, "(c) diffusers loop"] + ([f"(d) diffusers, {env['compile_mode']}"] if d else [])
    ratios = ["c/a", "c/b"] + (["d/b"] if d else [])
    cols = "abcd" if d else "abc"
    lines += ["", "| | " + " | ".join(head + ratios) + " |", "|---" * (len(head) + len(ratios) + 1) + "|"]
    names = {"fused_step_ms": "fused step, 2 models (ms)", "single_step_ms": "single-model step (ms)",
             "text_ms": "text encoding, both models (ms)", "vae_ms": "VAE decode to PIL (ms)",
             "e2e_s": "end-to-end fuse, text to PIL (s)", "peak_gib": "peak GPU memory, weights + run (GiB)"}
    for key, label in names.items():
        row = res[key]
        if row is not None:
            lines.append(f"| {label} | " + " | ".join(f(row[k]) for k in cols) + " | " +
                         " | ".join(f(row[k], "x") for k in ratios) + " |")
    blank = " |" * len(ratios)
    for kind, label in (("fused", "fused step"), ("single", "single-model step")):
        row = res["achieved_tflop_per_s"][kind]
        lines.append(f"| {label}: achieved TFLOP/s ({f(res['work_tflop'][kind])} TFLOP of matrix work) | " +
                     " | ".join(f(row[k]) for k in cols) + f" |{blank}")
    cap = res["graph_capture_s"]
    lines.append("| graph build: 2 warm-up steps + capture, fused / single (s) | — | " +
                 (f"{f(cap['fused'])} / {f(cap['single'])}" if cuda else "(no capture on CPU)") + " | —" +
                 (f" | compile: {f(res['compile_s']['fused'])} / {f(res['compile_s']['single'])}" if d else "") +
                 f" |{blank}")
    if cuda:
        lines += ["", "Peak memory counts each variant's own weights (all variants are resident in this one process) "
                  "plus the peak of memory allocated during the run above what was allocated before it; (b) adds its "
                  f"static buffers and its graph's private memory pool ({f(res['graph_pool_gib'].get('fused'))} GiB) "
                  "at the pool's reserved size, which includes the allocator's rounding, so if anything (b) is "
                  "overstated."]
    if d:
        lines += ["", "(d)'s compile row: wall time of its first three calls (Dynamo, Inductor's autotuning, "
                  "the recording of its CUDA graphs), fused then single; not counted in its step times."]
    prof = res["profile_ms_per_step"]
    if prof:
        kinds = [k for k, _ in KERNEL_KINDS] + ["other"]
        what = "kernel" if cuda else "operator (self time)"
        gap = ("kernel time above the wall time ran concurrently; below it, the GPU idled, waiting for launches"
               if cuda else "the wall time above the operators' total is Python and dispatch overhead")
        lines += ["", f"Where a step's time goes: {what} milliseconds per step by kind, from `torch.profiler`, against "
                  f"the step's median wall time ({gap})", "",
                  "| variant | wall | " + " | ".join(kinds) + f" | {what} total |",
                  "|---" * (len(kinds) + 3) + "|"]
        for name, row in prof.items():
            wall = res[f"{name.split('/')[0]}_step_ms"][name.split("/")[1]]
            lines.append(f"| {name} | {f(wall)} | " + " | ".join(f(row.get(k, 0.0)) for k in kinds) +
                         f" | {f(row['total'])} |")
        for name in ("fused/a", "fused/b", "fused/d"):
            if name in res["top_kernels"]:
                lines += ["", f"Top {what}s of {name} by time per step:", "",
                          "| ms per step | calls per step | kind | name |", "|---|---|---|---|"]
                lines += [f"| {ms:.3f} | {c:g} | {kind} | `{k}` |" for k, c, ms, kind in res["top_kernels"][name]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
