"""Layers shared by the UNet and the VAE that keep a channels_last activation channels_last.

PyTorch's GroupNorm on CUDA reads channels_last input by copying it to NCHW, and writes NCHW, which the next
convolution (channels_last weights, see layout.py) copies back: two layout copies per GroupNorm, about 3 ms of a
20 ms fused step on an H100 (docs/benchmarks.md). `GroupNorm` here is `nn.GroupNorm` (same parameters, so the same
checkpoint keys) with a second path, `group_norm_nhwc`, taken when its input is channels_last and its `nhwc` switch
is on: the group statistics are reduced over the NHWC view itself, and scale and shift (the affine folded with the
statistics) are applied in one pass that writes channels_last. It rounds differently from PyTorch's kernel (within
float32 rounding in float32), so it is a switch (`layout.configure`), off by default until a GPU run shows it pays.

`residual` adds a skip connection into the fresh result in place when no gradient is recorded.

Stock PyTorch operators only: no Triton, no `torch.compile`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def is_channels_last(x: torch.Tensor) -> bool:
    """A 4-d tensor stored NHWC and not also NCHW-contiguous (1x1 maps and single channels are both)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def group_norm_nhwc(x: torch.Tensor, groups: int, weight, bias, eps: float) -> torch.Tensor:
    """F.group_norm for a channels_last x, reading and writing NHWC memory with no layout copy.

    Statistics are float32 whatever x's dtype: float32 input uses one Welford pass (`var_mean`); float16/bfloat16
    input two reduction passes that accumulate in float32 without a float32 copy of x (a copy would cost more than
    the extra read). The output is x * scale + shift with scale = rstd * weight and shift = bias - mean * scale
    (float32, one per sample and channel), computed in float32 and rounded once to x's dtype.
    """
    b, c, h, w = x.shape
    g = x.permute(0, 2, 3, 1).reshape(b, h * w, groups, c // groups)  # a view: x's NHWC memory, channels split
    dims = (1, 3)
    if x.dtype in (torch.float32, torch.float64):
        var, mean = torch.var_mean(g, dim=dims, keepdim=True, correction=0)
    else:
        mean = g.mean(dim=dims, keepdim=True, dtype=torch.float32)
        var = torch.empty_like(mean)
        torch.var(g, dim=dims, keepdim=True, correction=0, out=var)
    # per (sample, channel) scale and shift in float32; weight and bias are promoted inside the kernels that read
    # them (no cast kernels): a few tiny kernels on (B, 1, G, C/G) values
    scale = (var + eps).rsqrt_()  # (B, 1, G, 1)
    if weight is not None:
        scale = scale * weight.view(1, 1, groups, -1)  # (B, 1, G, C/G)
    if bias is not None:
        shift = torch.addcmul(bias.view(1, 1, groups, -1), mean, scale, value=-1)  # bias - mean * scale
    else:
        shift = (mean * scale).neg_()
    if torch.is_grad_enabled() and (shift.requires_grad or g.requires_grad):
        out = torch.addcmul(shift, g, scale).to(x.dtype)  # autograd records no out= form
    else:
        out = torch.empty_like(g)  # contiguous (B, H*W, G, C/G): NHWC
        torch.addcmul(shift, g, scale, out=out)  # in float32, rounded once into x's dtype: one pass
    return out.view(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W) with NHWC strides


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm with an optional layout-preserving path for channels_last input (see the module docstring)."""

    nhwc = False  # the switch, per module (layout.configure sets it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nhwc and is_channels_last(x):
            return group_norm_nhwc(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def residual(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + y, added into `y` in place when no gradient is recorded (y: a fresh result that nothing else holds).

    Bit for bit the same sum (addition commutes); it saves one activation-sized allocation, which inside a captured
    graph is memory of its pool. With gradients on it stays out of place.
    """
    return x + y if torch.is_grad_enabled() else y.add_(x)
