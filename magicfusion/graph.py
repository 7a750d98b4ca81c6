"""The whole sampling step (every model's guided UNet passes, SNB, the DDIM update) as ONE CUDA graph.

A CUDA graph records the kernels of one step once and replays them with a single launch, removing the
per-kernel CPU overhead (about a thousand kernels per SD UNet pass) that otherwise bounds a fast GPU. For one
graph to serve every step, nothing step-dependent may be a Python value: the step reads its timestep, alpha
products, sigma, eta noise and fusion-window flag from device tables (`pipeline.Tables`) at the row named by a
device-side counter, and the graph itself advances that counter. Per step the host calls `replay()` and nothing
else: no `.item()`, no synchronisation, no re-capture.

The math is `pipeline.fused_step`, the same function the eager loop runs; only its `i` differs (a device tensor
here, an int there). On CPU the same runner works without capture, replaying by calling the step directly, which
is how the tests check it against the eager loop on machines without a GPU.

A capture belongs to (models, latent shape and batch, dtype, eta on/off, the fusion options that change which
kernels run: blur, reference, blend, outside) and lives in the general model's `graphs` cache with its own
memory pool. Later calls copy their prompts' embeddings, initial noise, tables, guidance scale and softmax
temperatures into the static buffers and replay. A graph also holds the addresses of the weights it read at
capture: it is dropped (and its pool freed) when `Model.release_graphs()` is called, when any of its models is
garbage-collected, or when their weights move (`.to(...)`, `.half()`), and a runner held past that refuses to
replay rather than read memory that is no longer its models'.

All models' UNets run at every step here, also outside the fusion window, where the window's `torch.where`
picks the outside model's noise: the graph cannot skip work on a device-side condition. The eager loop, which
knows the step on the host, runs only the model it needs there.

The host queues all of a run's replays at once. When a progress bar is shown, each replay is followed by a CUDA
event and the bar advances as those complete, so it counts steps the GPU has finished rather than launches.
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref

import torch

from .pipeline import FuseOptions, Tables, fused_step


def weights(unets: list) -> tuple:
    """Where the models' weights are: a graph reads them at these addresses on every replay."""
    return tuple(p.data_ptr() for u in unets for p in u.parameters())


class StepGraph:
    def __init__(self, unets: list, contexts: list, x: torch.Tensor, tab: Tables, scale: float, opts: FuseOptions):
        self.unets = [weakref.ref(u) for u in unets]  # the cache must not keep released models alive
        self.weights = weights(unets)
        self.closed = False
        self.finalizers = []  # set by graph_for: drop this graph from its cache when one of its models dies
        self.device = x.device
        self.cuda = x.device.type == "cuda"
        # static buffers: the graph reads and writes these addresses on every replay. Guidance and the softmax
        # temperatures are device scalars too, so changing them needs no new capture.
        self.x = x.clone()
        self.contexts = [c.clone() for c in contexts]
        self.tab = Tables(*(v.clone() if v is not None else None for v in tab.tensors()))
        self.scale = torch.tensor(float(scale), device=x.device)
        self.ks = torch.tensor([float(k) for k in opts.ks], device=x.device)
        self.opts = dataclasses.replace(opts, ks=tuple(self.ks.unbind()))  # views of self.ks
        self.counter = torch.zeros(1, dtype=torch.int64, device=x.device)
        self.masks = torch.zeros((len(tab.t),) + x[:, 0].shape, dtype=torch.uint8, device=x.device)
        self.graph = None
        # two models' passes go on their own streams inside the graph, so their kernels can overlap
        self.streams = [torch.cuda.Stream(x.device) for _ in unets] if self.cuda and len(unets) > 1 else None
        if self.cuda:
            self.capture()

    @property
    def capacity(self) -> int:
        """The most steps a run may have (the tables' rows)."""
        return len(self.tab.t)

    def on_device(self):
        return torch.cuda.device(self.device) if self.cuda else contextlib.nullcontext()

    def step(self) -> None:
        """One step on the static buffers, advancing the counter (what the graph records)."""
        unets = [ref() for ref in self.unets]
        x, index = fused_step(unets, self.contexts, self.x, self.counter, self.tab, self.scale, self.opts, self.streams)
        self.x.copy_(x)
        self.masks.index_copy_(0, self.counter, index.to(torch.uint8)[None])
        self.counter.add_(1)

    def capture(self) -> None:
        x0 = self.x.clone()
        with self.on_device():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: cuBLAS/cuDNN handles and kernel choices settle outside capture
                for _ in range(2):
                    self.counter.zero_()
                    self.step()
            torch.cuda.current_stream().wait_stream(side)
            self.x.copy_(x0)
            self.counter.zero_()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # recorded, not run; a private memory pool per graph
                self.step()

    def valid(self) -> bool:
        """Its models are alive and their weights where the capture read them."""
        unets = [ref() for ref in self.unets]
        return not self.closed and all(u is not None for u in unets) and weights(unets) == self.weights

    def close(self) -> None:
        """Drop the captured graph, so its memory pool can be freed, and stop watching the models."""
        self.closed, self.graph = True, None
        for f in self.finalizers:
            f.detach()

    def run(self, x: torch.Tensor, contexts: list, tab: Tables, scale: float, ks: tuple,
            bar=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample a whole run: load this run's inputs into the static buffers, replay once per step."""
        if not self.valid():
            raise RuntimeError("this step graph was released, or a model it was captured for was released or had its "
                               "weights moved (.to, .half); use graph_for again")
        steps = len(tab.t)
        if steps > self.capacity:
            raise ValueError(f"this graph holds tables for {self.capacity} steps, not {steps}")
        self.x.copy_(x)
        for static, c in zip(self.contexts, contexts):
            static.copy_(c)
        for static, v in zip(self.tab.tensors(), tab.tensors()):
            if v is not None:
                static[:steps].copy_(v)
        self.scale.fill_(float(scale))
        self.ks.copy_(torch.tensor([float(k) for k in ks]))
        self.counter.zero_()
        shown = bar is not None and not getattr(bar, "disable", False)
        with self.on_device():
            if self.graph is None:  # no capture (CPU): a step is done when its call returns
                for _ in range(steps):
                    self.step()
                    if shown:
                        bar.update()
            elif not shown:
                for _ in range(steps):
                    self.graph.replay()
            else:  # replay() returns at launch, long before its step is done: an event marks each step's end
                events = [torch.cuda.Event() for _ in range(steps)]
                for event in events:
                    self.graph.replay()
                    event.record()
                for event in events:  # all queued; the bar follows the GPU finishing them
                    event.synchronize()
                    bar.update()
        return self.x.clone(), self.masks[:steps].clone()


def graph_for(models: list, contexts: list, x: torch.Tensor, tab: Tables, scale: float, opts: FuseOptions) -> StepGraph:
    """The cached StepGraph for these models and this latent shape, dtype and kind of step; captured on first use.

    Prompts, seeds, guidance and the softmax temperatures are inputs of a captured graph, not part of its key; a
    run with more steps than a cached graph's tables hold captures a larger one in its place.
    """
    cache = models[0].graphs
    kind = dataclasses.replace(opts, ks=len(opts.ks))
    key = (tuple(id(m.unet) for m in models), tuple(x.shape), tuple(m.dtype for m in models), tab.noise is None, kind)
    for k in [k for k, g in cache.items() if not g.valid()]:
        cache.pop(k).close()
    if key not in cache or cache[key].capacity < len(tab.t):
        if key in cache:
            cache.pop(key).close()  # free the smaller graph's pool before capturing the larger one
        runner = StepGraph([m.unet for m in models], contexts, x, tab, scale, opts)
        owner = weakref.ref(models[0])  # a weak reference: an expert must not keep the general model's graphs alive
        runner.finalizers = [weakref.finalize(m.unet, forget, owner, key) for m in models]
        cache[key] = runner
    return cache[key]


def forget(owner: weakref.ref, key) -> None:
    """One of a cached graph's models was garbage-collected: drop the graph from its owner's cache."""
    model = owner()
    if model is not None and key in model.graphs:
        model.graphs.pop(key).close()
