"""Capture a step function once as a CUDA graph and replay it (the idea of tinygrad's `TinyJit`).

A CUDA graph records the kernels of one call and replays them with a single launch, removing the per-kernel CPU
overhead (about a thousand kernels per SD UNet pass) that otherwise bounds a fast GPU. The function must read and
write only tensors that stay at the same addresses (static buffers: the caller copies each run's inputs into
them) and must never read a device value back to the host. On a CPU nothing is captured and a call runs the
function, which is how the tests check the captured step against the eager loop on machines without a GPU.

A graph also replays the addresses of the weights it read: `valid()` is false once one of its modules was
garbage-collected or had its weights moved (`.to`, `.half`), or after `close()`, and such a graph refuses to run.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch


def addresses(modules: list) -> tuple:
    return tuple(p.data_ptr() for m in modules for p in m.parameters())


class Graph:
    def __init__(self, fn: Callable[[], None], modules: list, device: torch.device, rewind: Callable[[], None]):
        """`rewind()` puts the static state back to a run's start (the warm-up calls move it forward)."""
        self.fn, self.device, self.graph, self.closed = fn, device, None, False
        self.modules = [weakref.ref(m) for m in modules]
        self.weights = addresses(modules)
        if device.type != "cuda":
            return
        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: cuBLAS/cuDNN handles and kernel choices settle outside capture
                for _ in range(2):
                    rewind()
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            rewind()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # recorded, not run; a private memory pool per graph
                fn()

    def valid(self) -> bool:
        """Its modules are alive and their weights where the capture read them."""
        modules = [ref() for ref in self.modules]
        return not self.closed and all(m is not None for m in modules) and addresses(modules) == self.weights

    def close(self) -> None:
        """Drop the captured graph, so its memory pool can be freed."""
        self.closed, self.graph = True, None

    def __call__(self) -> None:
        if not self.valid():
            raise RuntimeError("this step graph was released, or a model it was captured for was released or had its "
                               "weights moved (.to, .half); sample again to capture a new one")
        self.replay()

    def replay(self) -> None:
        """A call without the validity check (which reads every weight's address), for a caller that made it."""
        if self.graph is None:
            self.fn()
        else:
            with torch.cuda.device(self.device):
                self.graph.replay()
