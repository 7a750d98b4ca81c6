"""The noise prediction one sampling step uses: classifier-free guidance for one model, SNB over several.

`Denoiser` is built once per run from the UNets, their prompts' embeddings, the guidance scale and the softmax
temperatures (the idea of k-diffusion's `CFGDenoiser`): `denoise(x, t, window) -> (eps, index)`. With several
models it blends their guided noises by saliency (snb.py) where `window` (a 0-d bool tensor: this step is inside
the fusion window) is true, and uses the outside model's elsewhere; `index` is the (B, h, w) map of whose noise
each latent pixel got. Everything step-dependent is a tensor argument, so the call can be captured in a CUDA graph.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from .snb import guidance, snb


@dataclass(frozen=True)
class FuseOptions:
    """How several models' noises become one (see snb.py). Defaults reproduce the authors' code."""
    blur: bool = True
    reference: str = "general"   # "general": r_E = s (c_E - u_G); "own": r_E = s (c_E - u_E)
    blend: str = "argmax"        # "argmax": SNB; "average": the plain mean (the paper's Fig. 9 baseline)
    outside: str = "general"     # whose noise is used outside the fusion window: "general" or "expert" (the first)


def predict(unet, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor):
    """Unconditional and conditional noise predictions in one batched UNet pass, as float32."""
    # [x; x] in the model's dtype and layout in one copy; the noise back as contiguous float32 in one more
    eps = unet(unet.twice(x, context.dtype), t, context)
    u, c = eps.to(torch.float32, memory_format=torch.contiguous_format).chunk(2)
    return u, c


class Denoiser:
    def __init__(self, unets: list, contexts: list, scale: torch.Tensor, ks: torch.Tensor, opts: FuseOptions,
                 streams: list | None = None):
        """`scale` (the guidance scale) and `ks` (one softmax temperature per model) are device tensors, so a
        captured graph reads new values without a new capture. The UNets are held weakly: a cached graph's step
        must not keep its models alive."""
        self.unets = [weakref.ref(u) for u in unets]
        self.contexts, self.scale, self.ks, self.opts, self.streams = contexts, scale, ks, opts, streams
        self.outside = 0 if opts.outside == "general" else 1

    def __call__(self, x: torch.Tensor, t: torch.Tensor, window: torch.Tensor, fuse: bool = True):
        """`fuse=False` (the eager loop, which knows the step is outside the window) runs the outside model alone."""
        unets, o = [ref() for ref in self.unets], self.outside
        if len(unets) == 1 or not fuse:
            u, c = predict(unets[o], x, t, self.contexts[o])
            return guidance(u, c, self.scale), torch.full_like(x[:, 0], o, dtype=torch.int64)
        pairs = self.predict_all(unets, x, t)
        uncond, cond = [p[0] for p in pairs], [p[1] for p in pairs]
        if self.opts.blend == "average":
            eps = sum(guidance(u, c, self.scale) for u, c in pairs) / len(pairs)
            index = torch.full_like(x[:, 0], 255, dtype=torch.int64)
        else:
            eps, index = snb(uncond, cond, self.scale, list(self.ks.unbind()), self.opts.blur, self.opts.reference)
        eps = torch.where(window, eps, guidance(uncond[o], cond[o], self.scale))
        return eps, torch.where(window, index, torch.full_like(index, o))

    def predict_all(self, unets: list, x: torch.Tensor, t: torch.Tensor) -> list:
        """Every model's (u, c); with CUDA streams (one per model) the passes are issued on their own streams,
        forked from and joined back into the current one, so independent kernels can run side by side."""
        if self.streams is None:
            return [predict(unet, x, t, ctx) for unet, ctx in zip(unets, self.contexts)]
        main, out = torch.cuda.current_stream(), []
        for unet, ctx, stream in zip(unets, self.contexts, self.streams):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                out.append(predict(unet, x, t, ctx))
        for stream in self.streams:
            main.wait_stream(stream)
        return out
