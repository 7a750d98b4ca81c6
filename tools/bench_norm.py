"""GroupNorm + SiLU on a channels_last activation, three ways, at SD 1.5's UNet shapes (batch 2: a guided pass).

  native, channels_last: what a channels_last UNet does without the lever: PyTorch's GroupNorm (which copies the
      input to NCHW and writes NCHW), SiLU, and the copy back to channels_last that the next convolution makes;
  native, NCHW: the same on an NCHW activation (no layout copies: the NCHW model's cost);
  nhwc: `magicfusion.layers.group_norm_nhwc` (the `nhwc_groupnorm` lever) and SiLU, channels_last throughout.

CUDA: each variant captured as a CUDA graph of 10 calls and replayed 50 times (CUDA events), so launch overhead
does not count; microseconds per call. Also checks that nhwc agrees with the float32 reference. CPU: tiny shapes,
eager, perf_counter (it only shows the script works).

    python tools/bench_norm.py [--json FILE]
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from magicfusion.layers import GroupNorm, group_norm_nhwc  # noqa: E402
from magicfusion.unet import UNetConfig, UNetModel  # noqa: E402


def groupnorm_shapes(cfg: UNetConfig, latent: int) -> collections.Counter:
    """(B, C, H, W) -> how many of the UNet's GroupNorms see that shape in one guided pass (batch 2), found by
    running the model on the meta device (shapes only)."""
    seen = collections.Counter()
    with torch.device("meta"):
        unet = UNetModel(cfg)
        for m in unet.modules():
            if isinstance(m, GroupNorm):
                m.register_forward_pre_hook(lambda m, i: seen.update([tuple(i[0].shape)]))
        unet(torch.empty(2, cfg.in_channels, latent, latent), torch.zeros(2), torch.empty(2, 77, cfg.context_dim))
    return seen


def native_cl(x, w, b):
    return F.silu(F.group_norm(x, 32, w, b, 1e-5)).contiguous(memory_format=torch.channels_last)


def native(x, w, b):
    return F.silu(F.group_norm(x, 32, w, b, 1e-5))


def nhwc(x, w, b):
    return F.silu(group_norm_nhwc(x, 32, w, b, 1e-5))


def time_us(fn, x, w, b, cuda: bool, n: int = 50) -> float:
    if not cuda:
        t0 = time.perf_counter()
        for _ in range(n):
            fn(x, w, b)
        return (time.perf_counter() - t0) / n * 1e6
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(x, w, b)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            fn(x, w, b)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n / 10 * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev, dt = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    rows, totals = [], {"native_cl": 0.0, "native_nchw": 0.0, "nhwc": 0.0}
    gen = torch.Generator("cpu").manual_seed(0)
    shapes = groupnorm_shapes(UNetConfig(), 64) if cuda else {(2, 64, 16, 16): 1, (2, 128, 8, 8): 1}
    with torch.no_grad():
        for (B, C, H, W), weight in shapes.items():
            x = (torch.randn((B, C, H, W), generator=gen) * 2 + 0.5).to(dev, dt)
            w, b = torch.randn(C, generator=gen).to(dev, dt), torch.randn(C, generator=gen).to(dev, dt)
            xcl = x.contiguous(memory_format=torch.channels_last)
            ref = native(x.float(), w.float(), b.float())
            err = ((nhwc(xcl, w, b).float() - ref).abs().max() / ref.abs().max()).item()
            us = {"native_cl": time_us(native_cl, xcl, w, b, cuda), "native_nchw": time_us(native, x, w, b, cuda),
                  "nhwc": time_us(nhwc, xcl, w, b, cuda)}
            for k in totals:
                totals[k] += weight * us[k]
            rows.append({"shape": [B, C, H, W], "per_fused_step": 2 * weight, "us": us, "nhwc_rel_err": err})
            print(f"{(B, C, H, W)} x{2 * weight}/fused step: " + ", ".join(f"{k} {v:.1f} us" for k, v in us.items()) +
                  f", nhwc max rel err {err:.1e}", flush=True)
    # both UNets of a fused step: each shape's GroupNorm count in one UNet pass, times two
    per_step = {k: 2 * v / 1e3 for k, v in totals.items()}
    print(f"ms per fused step ({2 * sum(shapes.values())} GroupNorm+SiLU):",
          {k: round(v, 3) for k, v in per_step.items()})
    if a.json:
        a.json.write_text(json.dumps({"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dt),
                                      "rows": rows, "ms_per_fused_step": per_step}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
