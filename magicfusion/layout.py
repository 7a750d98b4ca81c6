"""Memory layout of the convolutional models, and the switches of the layers that keep it (the speed levers).

cuDNN's convolutions are fastest on NHWC tensors ("channels_last": an (N, C, H, W) tensor whose channels are
adjacent in memory). Measured on an H100 (docs/benchmarks.md), converting the UNets' weights took the fused step's
CUDA graph from 21.8 to 16.4 ms, so `magicfusion.load` does it by default on CUDA (`default_channels_last`). Only
the 4-d weights' format is set; every convolution then writes channels_last activations, and the layers between
them (layers.py, unet.py) either keep that layout or, behind the switches of `configure`, avoid the copies.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import GroupNorm
from .unet import GEGLU


def default_channels_last(device) -> bool:
    """Whether `load` puts the UNet and VAE in channels_last: on CUDA (measured faster); elsewhere as before."""
    return torch.device(device).type == "cuda"


def set_channels_last(modules, on: bool) -> None:
    """Put the 4-d weights of `modules` in channels_last (on) or contiguous NCHW (off). Values are unchanged."""
    fmt = torch.channels_last if on else torch.contiguous_format
    for m in modules:
        m.to(memory_format=fmt)


def configure(module: nn.Module, nhwc_groupnorm: bool | None = None, split_geglu: bool | None = None) -> nn.Module:
    """Turn the layout levers of every layer in `module` on or off (None leaves one as it is); returns `module`.

    nhwc_groupnorm: a `GroupNorm` given channels_last input computes in that layout (`layers.group_norm_nhwc`)
    instead of PyTorch's kernel, which copies to NCHW and back.
    split_geglu: the UNet's GEGLU projects value and gate with two matrix products into two contiguous tensors, so
    the GELU and the product run on contiguous memory instead of the two strided halves of one product.
    Both change rounding only (float32: within float32 rounding); neither changes a parameter or its name.
    """
    for m in module.modules():
        if nhwc_groupnorm is not None and isinstance(m, GroupNorm):
            m.nhwc = nhwc_groupnorm
        if split_geglu is not None and isinstance(m, GEGLU):
            m.split = split_geglu
    return module
