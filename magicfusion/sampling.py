"""The sampling loop: a run's per-step tables on the device, its state in fixed buffers, one step, one loop.

A step reads its row of the tables at a device-side counter, denoises (denoiser.py), updates the latents
(samplers.py), records the mask and advances the counter, never reading a value back to the host. The eager loop
calls the step, running only the outside model at steps it knows (on the host) to be outside the fusion window;
with `graph` the step is captured once (graph.py) and replayed, running every model and selecting with
`torch.where`. Captured runs are cached per (models, shapes, dtype, sampler, noise on/off, fusion options) and
reused across prompts, seeds, guidance scales and temperatures, which are copied into their static buffers.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from .denoiser import Denoiser, FuseOptions
from .graph import Graph
from .samplers import Plan, Sampler


@dataclass
class Tables:
    """A `Plan` on the device with the fusion window and the per-step noise: row i is what step i reads."""
    t: torch.Tensor                  # (steps,) float32 timesteps
    c_in: torch.Tensor               # (steps,) float32 input divisor
    c: torch.Tensor                  # (steps, K) float32 sampler coefficients
    window: torch.Tensor             # (steps,) bool: SNB runs at this step
    noise: torch.Tensor | None       # (steps, B, 4, h, w) float32 fresh noise, None when the sampler draws none

    def tensors(self) -> tuple:
        return self.t, self.c_in, self.c, self.window, self.noise

    def row(self, i: torch.Tensor) -> list:
        """Step i's (t, c_in, c, window, noise), i a (1,) int64 tensor on the tables' device: `index_select`,
        unlike indexing with a tensor, never reads the index back to the host."""
        return [None if v is None else v.index_select(0, i).squeeze(0) for v in self.tensors()]


def make_tables(plan: Plan, window: torch.Tensor, generator: torch.Generator, shape: tuple, device) -> Tables:
    # one draw per step, in step order, exactly as the reference schedulers consume the generator
    noise = torch.stack([torch.randn(shape, generator=generator) for _ in plan.t]) if plan.noisy else None
    return Tables(*(v if v is None else v.to(device) for v in (plan.t, plan.c_in, plan.c, window, noise)))


class Run:
    """One run's state in tensors that stay put: the latents, the sampler's carried state, the step counter,
    the masks, and what a step reads (tables, prompt embeddings, guidance scale, temperatures)."""

    def __init__(self, unets: list, sampler: Sampler, x: torch.Tensor, tables: Tables, contexts: list,
                 scale: torch.Tensor, ks: torch.Tensor, opts: FuseOptions, streams: list | None = None):
        self.x, self.prev, self.tables, self.update = x, torch.zeros_like(x), tables, sampler.update
        self.contexts, self.scale, self.ks = contexts, scale, ks
        self.counter = torch.zeros(1, dtype=torch.int64, device=x.device)
        self.masks = torch.zeros((len(tables.t),) + x[:, 0].shape, dtype=torch.uint8, device=x.device)
        self.denoise = Denoiser(unets, contexts, scale, ks, opts, streams)

    def step(self, fuse: bool = True) -> None:
        t, c_in, c, window, noise = self.tables.row(self.counter)
        eps, index = self.denoise(self.x / c_in, t, window, fuse)
        x, prev = self.update(self.x, eps, c, noise, self.prev)
        self.x.copy_(x)
        self.prev.copy_(prev)
        self.masks.index_copy_(0, self.counter, index.to(torch.uint8)[None])
        self.counter.add_(1)

    def load(self, x: torch.Tensor, tables: Tables, contexts: list, scale: torch.Tensor, ks: torch.Tensor) -> None:
        """Copy a run's inputs into the buffers and rewind."""
        steps = len(tables.t)
        if steps > len(self.tables.t):
            raise ValueError(f"these buffers hold tables for {len(self.tables.t)} steps, not {steps}")
        for static, v in zip(self.tables.tensors(), tables.tensors()):
            if v is not None:
                static[:steps].copy_(v)
        for static, v in zip([self.x, self.scale, self.ks, *self.contexts], [x, scale, ks, *contexts]):
            static.copy_(v)
        self.prev.zero_()
        self.counter.zero_()


CACHE: dict = {}  # key -> (Run, Graph, finalizers): captured steps with their static buffers


def captured(unets: list, sampler: Sampler, x, tables: Tables, contexts: list, scale, ks, opts) -> tuple:
    """The cached (Run, Graph) for this kind of run, captured on first use, with this run's inputs loaded."""
    key = (tuple(id(u) for u in unets), tuple(x.shape), tuple((c.shape, c.dtype) for c in contexts), sampler.name,
           tables.noise is None, opts)
    for k in [k for k, entry in CACHE.items() if not entry[1].valid()]:
        drop(k)
    if key not in CACHE or len(CACHE[key][0].tables.t) < len(tables.t):
        drop(key)  # free a smaller graph's pool before capturing the larger one
        clone = [None if v is None else v.clone() for v in tables.tensors()]
        streams = [torch.cuda.Stream(x.device) for _ in unets] if x.device.type == "cuda" and len(unets) > 1 else None
        run = Run(unets, sampler, x.clone(), Tables(*clone), [c.clone() for c in contexts], scale.clone(), ks.clone(),
                  opts, streams)
        graph = Graph(run.step, unets, x.device, run.counter.zero_)
        CACHE[key] = run, graph, [weakref.finalize(u, drop, key) for u in unets]
    run, graph, _ = CACHE[key]
    run.load(x, tables, contexts, scale, ks)
    return run, graph


def drop(key) -> None:
    if key in CACHE:
        _, graph, finalizers = CACHE.pop(key)
        graph.close()
        for f in finalizers:
            f.detach()


def release_graphs(*models) -> None:
    """Free the captured step graphs that use any of `models` (all of them when none is named) and their pools."""
    ids = {id(m.unet) for m in models}
    for k in [k for k in CACHE if not ids or ids & set(k[0])]:
        drop(k)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # a freed graph pool goes back to the driver only through the cache


@torch.no_grad()
def sample(unets: list, contexts: list, sampler: Sampler, x: torch.Tensor, tables: Tables, fusing: list,
           scale: torch.Tensor, ks: torch.Tensor, opts: FuseOptions, graph: bool, callback=None):
    """Run every step -> (latents, (steps, B, h, w) uint8 masks). `fusing`: per step, on the host, whether it is
    inside the fusion window. `callback(i, mask)` follows each finished step (the progress bar)."""
    if graph:
        run, step = captured(unets, sampler, x, tables, contexts, scale, ks, opts)
    else:
        run = Run(unets, sampler, x.clone(), tables, contexts, scale, ks, opts)
    queued = graph and x.device.type == "cuda" and callback is not None
    events = []
    for i in range(len(tables.t)):
        if graph:
            step.replay()  # `captured` checked that its models and weights are still the ones captured
        else:
            run.step(fusing[i])
        if queued:  # a replay returns at launch, long before its step is done: an event marks each step's end
            events.append(torch.cuda.Event())
            events[-1].record()
        elif callback is not None:
            callback(i, run.masks[i])
    for i, event in enumerate(events):  # all queued; the callback follows the GPU finishing them
        event.synchronize()
        callback(i, run.masks[i])
    return run.x.clone(), run.masks[:len(tables.t)].clone()
