"""Benchmark: MagicFusion sampling in this project against the diffusers loop a user would write today.

One fused DDIM step (two SD 1.x models, classifier-free guidance, Saliency-aware Noise Blending at every step) is
run three ways, in ONE process, in interleaved rounds (a, b, c, a, b, c, ...) so clock and thermal drift hit all
three alike:
  (a) ours, eager: `pipeline.fused_step`, and `magicfusion.fuse(graph=False)` end to end;
  (b) ours, CUDA graph: the whole step captured once and replayed (`graph.py`); on a CPU the same runner steps
      without capture, so (b) is reported there but means nothing about graphs;
  (c) the baseline: two diffusers `UNet2DConditionModel`s called in a Python loop, the SNB math written out plainly
      below (`baseline_step`), diffusers' `DDIMScheduler` for the update, transformers' CLIP for the text and
      diffusers' `AutoencoderKL` for the pixels.
Single-model rows time plain guided DDIM (one UNet, no SNB) the same three ways.

Also reported: the matrix work of one step (convolutions, matmuls and attention, counted by
`torch.utils.flop_counter` on the meta device, so nothing is computed) and each variant's achieved TFLOP/s;
`--profile N` adds, per variant, the device time of N steps by kind of kernel (on a CPU: by operator), which says
where a step's time goes and, set against the step's wall time, how much of it overlaps or idles (CUPTI's timing of
kernels inside CUDA graphs has had a known problem, pytorch/kineto#1165: (a) runs the same kernels without a graph,
so its breakdown is the one to trust);
`--channels-last` runs every UNet and VAE (ours and diffusers') in the channels-last memory format.

Why the comparison is fair: (c)'s models are built from the very tensors (a) and (b) load (diffusers' own
single-file converters, tests/oracle.py), in the same dtype on the same device; attention is
`F.scaled_dot_product_attention` on both sides (diffusers' AttnProcessor2_0 and transformers' "sdpa", set
explicitly); the latents stay float32 and the UNet runs in the model dtype on both sides; and the math is the
same, which the script checks before timing: one step of (a) and (c) from the same latents must agree. Both sides
share our tokenizer (tokenization is not what is measured). The weights are random (`magicfusion.demo`), which
changes nothing about speed.

    python tools/bench.py                                    # CUDA: sd15 shapes, 512x512, float16, 50 steps
    python tools/bench.py --device cpu --json bench.json     # CPU: tiny config, 64x64, float32, 5 steps
"""
from __future__ import annotations

import argparse
import collections
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
from magicfusion.clip import CLIPTextModel
from magicfusion.graph import graph_for
from magicfusion.pipeline import FuseOptions, decode, fused_step, make_tables
from magicfusion.prompt import encode_prompt
from magicfusion.unet import UNetModel
from magicfusion.vae import VAEDecoder

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `tools.*` when run as a script
from tools.random_weights import write_checkpoint, write_tiny_vocab  # noqa: E402

PROMPT, SCALE = "a photo of a red fox in the snow", 7.5
FUSE_OPTS, SINGLE_OPTS = FuseOptions(ks=(1.0, 1.0)), FuseOptions()  # FUSE_OPTS is what fuse() builds by default
THRESHOLD = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 1e-1}   # sanity check: max |a - c| / max |c|
GIB = 2 ** 30
KERNEL_KINDS = (  # by (lowercased) kernel or operator name, first match wins; the rest is elementwise and glue
    ("attention", ("flash", "fmha", "attention", "sdp")),
    ("convolution", ("conv", "fprop", "implicit", "nchw", "nhwc")),  # cuDNN's implicit GEMMs and layout transposes
    ("matmul", ("gemm", "mm", "matmul", "cutlass", "xmma", "linear")),
    ("normalization", ("norm",)))


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
def baseline_fuse(ref, tokenizer, steps, height, width, batch, seed=0):
    """(c) end to end: CLIP, the DDIM loop of `baseline_step`, VAE decode, PIL images."""
    from oracle import ddim_scheduler
    device = ref["vae"].device
    contexts = baseline_encode(ref, tokenizer, batch)
    sched = ddim_scheduler()
    sched.set_timesteps(steps, device=device)
    gen = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn((batch, 4, height // 8, width // 8), generator=gen).to(device)
    for t in sched.timesteps:
        x, _ = baseline_step(ref["unets"], contexts, x, t, sched, SCALE)
    return baseline_decode(ref, x)


def baseline_encode(ref, tokenizer, batch):
    """(c) each model's [negative, prompt] embeddings with transformers' CLIP, repeated for the batch."""
    ids = tokenizer(["", PROMPT]).to(ref["vae"].device)
    return [clip(input_ids=ids).last_hidden_state.repeat_interleave(batch, 0) for clip in ref["clips"]]


def baseline_decode(ref, x):
    """(c) latents -> PIL images with diffusers' AutoencoderKL."""
    px = ref["vae"].decode(x.to(ref["vae"].dtype) / ref["vae"].config.scaling_factor).sample.float()
    px = (px / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((p * 255).round().astype(np.uint8)) for p in px]


def build_baseline(general, expert, device, dtype):
    """diffusers/transformers models from OUR loaded tensors (converted on the CPU, then moved and cast)."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.utils import logging
    from oracle import diffusers_unet, diffusers_vae, hf_clip
    logging.set_verbosity_error()  # .to(dtype) warns about an empty list of modules to keep in float32

    def cpu(module):
        return {k: v.cpu() for k, v in module.state_dict().items()}
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


def static_bytes(runner) -> int:
    """A graph runner's static buffers (latents, embeddings, tables, masks), allocated outside its pool."""
    buffers = [runner.x, *runner.contexts, *(t for t in runner.tab.tensors() if t is not None), runner.masks,
               runner.counter, runner.scale, runner.ks]
    return sum(t.numel() * t.element_size() for t in buffers)


def pool_bytes() -> collections.Counter:
    """Reserved bytes per CUDA memory pool; a captured graph keeps its activations in a private pool."""
    out = collections.Counter()
    for seg in torch.cuda.memory_snapshot():
        out[tuple(seg.get("segment_pool_id", (0, 0)))] += seg["total_size"]
    return out


def work_tflop(g, e, x_shape, ctx_shape) -> dict:
    """TFLOP of matrix work (convolutions, matmuls, attention) in each part of a run, counted by running fresh
    copies of the models on the meta device: shapes only, nothing computed, nothing allocated."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        unets = [UNetModel(m.unet.cfg) for m in (g, e)]
        clip, vae = CLIPTextModel(g.text_encoder.cfg), VAEDecoder(g.vae.cfg)
        contexts, x = [torch.empty(ctx_shape) for _ in unets], torch.empty(x_shape)
        ids = torch.zeros((2, ctx_shape[1]), dtype=torch.int64)
    tab = make_tables(1, 0.0, 1000, -1, None, x_shape, "meta")
    parts = {"fused": lambda: fused_step(unets, contexts, x, 0, tab, SCALE, FUSE_OPTS),
             "single": lambda: fused_step(unets[:1], contexts[:1], x, 0, tab, SCALE, SINGLE_OPTS),
             "text": lambda: [clip(ids) for _ in unets],  # each model encodes its [negative, prompt] pair
             "vae": lambda: vae(x)}
    out = {}
    for name, run in parts.items():
        with FlopCounterMode(display=False) as count:
            run()
        out[name] = count.get_total_flops() / 1e12
    return out


def kernel_kind(name: str) -> str:
    name = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in name for k in keys)), "other")


def profile_steps(variants, x, steps: int, n: int, device: torch.device) -> dict:
    """Per variant: milliseconds of device time per step, by kind of kernel, over n profiled steps. On a CPU the
    'kernels' are the operators' self times."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    # CUPTI torn down and re-initialised between sessions crashed with CUDA graphs before CUDA 12.6 (pytorch#112507)
    os.environ.setdefault("TEARDOWN_CUPTI", "0")
    out = {}
    for name, step, runner in variants:
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for r in range(n):
                if runner is not None and r % steps == 0:  # rewind the graph's own step counter
                    runner.x.copy_(x)
                    runner.counter.zero_()
                step(r % steps)
            if cuda:
                torch.cuda.synchronize()
        kinds = collections.Counter()
        for evt in prof.key_averages():
            if cuda and evt.device_type != DeviceType.CUDA:
                continue
            kinds[kernel_kind(evt.key)] += (evt.self_device_time_total if cuda else evt.self_cpu_time_total) / 1e3 / n
        out[name] = dict(kinds, total=sum(kinds.values()))
    return out


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
    p.add_argument("--channels-last", action="store_true", help="UNets and VAEs in the channels-last memory format")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile N steps per variant: device time by kind of kernel")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    p.add_argument("--quiet", action="store_true", help="print only the table")
    a = p.parse_args(argv)
    a.device = torch.device(a.device)
    cuda = a.device.type == "cuda"
    for name, gpu, cpu in (("config", "sd15", "tiny"), ("height", 512, 64), ("width", 512, 64), ("steps", 50, 5),
                           ("timed_steps", 30, 3), ("warmup", 5, 1), ("runs", 3, 1), ("dtype", "float16", "float32")):
        if getattr(a, name) is None:
            setattr(a, name, gpu if cuda else cpu)
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
                                 device=device, dtype=dtype) for s in (1, 2))
    ref = build_baseline(g, e, device, dtype) if baseline else None
    if a.channels_last:
        for module in [g.unet, e.unet, g.vae, e.vae] + ([*ref["unets"], ref["vae"]] if baseline else []):
            module.to(memory_format=torch.channels_last)

    # fixed inputs of the per-step timings: latents, the run's tables, each side's own text encoding
    gen = torch.Generator("cpu").manual_seed(0)
    x = torch.randn((a.batch, 4, a.height // 8, a.width // 8), generator=gen).to(device)
    tab = make_tables(a.steps, 0.0, 1000, -1, gen, x.shape, device)
    def encode():  # ours: each model's [negative, prompt] embeddings
        return [encode_prompt(m, PROMPT, "", a.batch) for m in (g, e)]
    ctx = encode()
    if baseline:
        from oracle import ddim_scheduler
        sched = ddim_scheduler()
        sched.set_timesteps(a.steps, device=device)
        rctx = baseline_encode(ref, g.tokenizer, a.batch)

    # sanity: one fused step of (a) and (c) from the same latents; pixels where SNB picks differently (a near-tie
    # of the saliencies flipped by rounding) are counted, not compared
    xa, index = fused_step([g.unet, e.unet], ctx, x, 0, tab, SCALE, FUSE_OPTS)
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

    # graph runners: constructing one on CUDA is the warm-up plus the capture (and a private memory pool)
    g.release_graphs()
    runners, capture_s, pools = {}, {}, {}
    for name, models, contexts, opts in (("fused", [g, e], ctx, FUSE_OPTS), ("single", [g], ctx[:1], SINGLE_OPTS)):
        before = pool_bytes() if cuda else None
        timer.sync()
        t0 = time.perf_counter()
        runners[name] = graph_for(models, contexts, x, tab, SCALE, opts)
        timer.sync()
        capture_s[name] = time.perf_counter() - t0 if cuda else None
        if cuda:
            after = pool_bytes()
            pools[name] = sum(after[k] for k in after if k not in before)

    def replay(runner):
        return runner.graph.replay() if runner.graph is not None else runner.step()

    fused, single = [g.unet, e.unet], [g.unet]
    variants = [  # (name, step i -> None, graph runner to rewind or None), timed in this order every round
        ("fused/a", lambda i: fused_step(fused, ctx, x, i, tab, SCALE, FUSE_OPTS), None),
        ("fused/b", lambda i: replay(runners["fused"]), runners["fused"]),
        ("fused/c", lambda i: baseline_step(ref["unets"], rctx, x, sched.timesteps[i], sched, SCALE), None),
        ("single/a", lambda i: fused_step(single, ctx[:1], x, i, tab, SCALE, SINGLE_OPTS), None),
        ("single/b", lambda i: replay(runners["single"]), runners["single"]),
        ("single/c", lambda i: baseline_step(ref["unets"][:1], rctx[:1], x, sched.timesteps[i], sched, SCALE), None)]
    variants = [v for v in variants if baseline or not v[0].endswith("/c")]
    log(f"timing {a.timed_steps} steps per variant after {a.warmup} warm-up, interleaved ...")
    times = collections.defaultdict(list)
    for r in range(a.warmup + a.timed_steps):
        i = r % a.steps
        for name, step, runner in variants:
            if runner is not None and i == 0:  # a graph advances its own step counter: rewind it, untimed
                runner.x.copy_(x)
                runner.counter.zero_()
            ms = timer(lambda: step(i))
            if r >= a.warmup:
                times[name].append(ms)
    step_ms = {k: statistics.median(v) for k, v in times.items()}
    tflop = work_tflop(g, e, tuple(x.shape), tuple(ctx[0].shape))

    # the parts that run once per image, outside the step graph: are they worth graphing too?
    parts = {"text": {"a": encode}, "vae": {"a": lambda: decode(g, x)}}
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
    prof = None
    if a.profile:
        log(f"profiling {a.profile} steps per variant ...")
        prof = profile_steps(variants, x, a.steps, a.profile, device)

    log(f"end to end: {a.runs} run(s) of {a.steps} steps per variant ...")
    kw = dict(steps=a.steps, height=a.height, width=a.width, batch=a.batch, progress=False)
    e2e = {"a": lambda: magicfusion.fuse(g, e, PROMPT, graph=False, **kw).fused,
           "b": lambda: magicfusion.fuse(g, e, PROMPT, graph=True, **kw).fused}
    weights = {"a": nbytes(g.unet, g.text_encoder, g.vae, e.unet, e.text_encoder)}
    weights["b"] = weights["a"] + pools.get("fused", 0) + static_bytes(runners["fused"])
    if baseline:
        e2e["c"] = lambda: baseline_fuse(ref, g.tokenizer, a.steps, a.height, a.width, a.batch)
        weights["c"] = nbytes(*ref["unets"], *ref["clips"], ref["vae"].decoder, ref["vae"].post_quant_conv)
    magicfusion.fuse(g, e, PROMPT, graph=False, **dict(kw, steps=1))  # warm the text encoders and VAEs once
    if baseline:
        baseline_fuse(ref, g.tokenizer, 1, a.height, a.width, a.batch)
    cached = set(g.graphs)
    secs, peak = collections.defaultdict(list), {}
    for _ in range(a.runs):
        for k, run in e2e.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device)
            secs[k].append(timer(run) / 1e3)
            if cuda:
                peak[k] = (weights[k] + torch.cuda.max_memory_allocated(device) - resident) / GIB
    assert set(g.graphs) == cached, "fuse(graph=True) captured a new graph: the e2e (b) time would include it"

    res = {
        "env": {"device": torch.cuda.get_device_name(device) if cuda else
                f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs)",
                "device_type": device.type, "config": a.config, "dtype": a.dtype, "height": a.height,
                "width": a.width, "batch": a.batch, "steps": a.steps, "timed_steps": a.timed_steps,
                "warmup": a.warmup, "runs": a.runs, "channels_last": a.channels_last, "torch": torch.__version__,
                "diffusers": __import__("diffusers").__version__ if baseline else None,
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "command": " ".join(shlex.quote(s) for s in ["python"] + sys.argv)},
        "sanity": sanity,
        "work_tflop": tflop,
        "profile_ms_per_step": prof,
        "graph_capture_s": capture_s,
        "graph_pool_gib": {k: v / GIB for k, v in pools.items()} if cuda else None,
    }
    rows = [("fused_step_ms", {k: step_ms.get("fused/" + k) for k in "abc"}),
            ("single_step_ms", {k: step_ms.get("single/" + k) for k in "abc"}),
            ("text_ms", {k: statistics.median(part_times["text", k]) if ("text", k) in part_times else None
                         for k in "abc"}),
            ("vae_ms", {k: statistics.median(part_times["vae", k]) if ("vae", k) in part_times else None
                        for k in "abc"}),
            ("e2e_s", {k: statistics.median(secs[k]) if secs[k] else None for k in "abc"}),
            ("peak_gib", {k: peak.get(k) for k in "abc"} if cuda else None)]
    for key, row in rows:
        if row is not None:
            row.update({f"c/{k}": row["c"] / row[k] if row["c"] and row[k] else None for k in "ab"})
        res[key] = row
    res["achieved_tflop_per_s"] = {kind: {k: tflop[kind] * 1e3 / step_ms[f"{kind}/{k}"] if f"{kind}/{k}" in step_ms
                                          else None for k in "abc"} for kind in ("fused", "single")}
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
    lines = [f"### MagicFusion benchmark: {env['device']}", "",
             f"- {env['config']} shapes, random weights, {env['dtype']}, {env['height']}x{env['width']}, batch "
             f"{env['batch']}, {env['steps']} steps end to end (median of {env['runs']}); per-step: median of "
             f"{env['timed_steps']} after {env['warmup']} warm-up, {'CUDA events' if cuda else 'perf_counter'}",
             f"- torch {env['torch']}, diffusers {env['diffusers'] or '(not run)'}, {env['date']}",
             f"- command: `{env['command']}`"]
    s = res["sanity"]
    if s is not None:
        lines.append(f"- sanity: one fused step, ours vs diffusers: max|diff|/max|x| = {s['rel_diff']:.1e} (limit "
                     f"{s['threshold']:g}), SNB masks agree on {100 * s['mask_agreement']:.2f}% of pixels: "
                     f"{'OK' if s['ok'] else 'FAILED'}")
    lines += ["", f"| | (a) ours, eager | {b} | (c) diffusers loop | c/a | c/b |", "|---|---|---|---|---|---|"]
    names = {"fused_step_ms": "fused step, 2 models (ms)", "single_step_ms": "single-model step (ms)",
             "text_ms": "text encoding, both models (ms)", "vae_ms": "VAE decode to PIL (ms)",
             "e2e_s": "end-to-end fuse, text to PIL (s)", "peak_gib": "peak GPU memory, weights + run (GiB)"}
    for key, label in names.items():
        row = res[key]
        if row is not None:
            lines.append(f"| {label} | " + " | ".join(f(row[k]) for k in "abc") + " | " +
                         " | ".join(f(row[k], "x") for k in ("c/a", "c/b")) + " |")
    for kind, label in (("fused", "fused step"), ("single", "single-model step")):
        row = res["achieved_tflop_per_s"][kind]
        lines.append(f"| {label}: achieved TFLOP/s ({f(res['work_tflop'][kind])} TFLOP of matrix work) | " +
                     " | ".join(f(row[k]) for k in "abc") + " | | |")
    cap = res["graph_capture_s"]
    lines.append("| graph build: 2 warm-up steps + capture, fused / single (s) | — | " +
                 (f"{f(cap['fused'])} / {f(cap['single'])}" if cuda else "(no capture on CPU)") + " | — | | |")
    if cuda:
        lines += ["", "Peak memory counts each variant's own weights (all variants are resident in this one process) "
                  "plus the peak of memory allocated during the run above what was allocated before it; (b) adds its "
                  f"static buffers and its graph's private memory pool ({f(res['graph_pool_gib'].get('fused'))} GiB) "
                  "at the pool's reserved size, which includes the allocator's rounding, so if anything (b) is "
                  "overstated."]
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
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
