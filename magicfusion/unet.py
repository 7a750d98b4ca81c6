"""The latent-diffusion UNet of Stable Diffusion 1.x: predicts the noise in a latent, given a timestep and text.

Attribute names are the keys of the LDM checkpoint under `model.diffusion_model.`
(`input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight`), so a real file loads with a strict
`load_state_dict` and no renaming. Where LDM's `nn.Sequential`s hold parameter-free layers the index
gaps stay (`in_layers.1` is a SiLU, so the convolution is `in_layers.2`).

References: Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (2022), and the
CompVis/stable-diffusion code it shipped with (`ldm/modules/diffusionmodules/openaimodel.py`), whose
module layout this file mirrors; Ho et al. 2020 for the sinusoidal timestep embedding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import GroupNorm, is_channels_last, residual


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4               # latent channels in (9 would be an inpainting model)
    out_channels: int = 4
    model_channels: int = 320          # width of the first level; level i is model_channels * channel_mult[i]
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2            # ResBlocks per level on the way down (one more on the way up)
    attention_levels: tuple = (0, 1, 2)  # levels with a SpatialTransformer after each ResBlock
    context_dim: int = 768             # width of the text embeddings the cross-attention reads
    num_heads: int = 8                 # SD1 uses 8 heads at every level; shapes cannot tell this
    transformer_depth: int = 1

    @staticmethod
    def from_state_dict(sd: dict) -> "UNetConfig":
        """Read the architecture off the tensor shapes of an LDM UNet state dict (prefix stripped)."""
        conv_in = sd["input_blocks.0.0.weight"]
        mc = conv_in.shape[0]
        idx = sorted({int(k.split(".")[1]) for k in sd if k.startswith("input_blocks.")})
        mults, attn, n_res, level = [], [], [], 0
        for i in idx[1:]:
            p = f"input_blocks.{i}."
            if p + "0.op.weight" in sd:  # a Downsample closes the level
                level += 1
                continue
            if len(mults) == level:
                mults.append(sd[p + "0.in_layers.2.weight"].shape[0] // mc)
                n_res.append(0)
            n_res[level] += 1
            if p + "1.proj_in.weight" in sd and level not in attn:
                attn.append(level)
        if len(set(n_res)) != 1:
            raise ValueError(f"unequal ResBlock counts per level {n_res}")
        depth = len({k.split(".")[3] for k in sd if k.startswith("middle_block.1.transformer_blocks.")})
        ctx = next(v.shape[1] for k, v in sd.items() if k.endswith("attn2.to_k.weight"))
        return UNetConfig(conv_in.shape[1], sd["out.2.weight"].shape[0], mc, tuple(mults), n_res[0],
                          tuple(attn), ctx, 8, max(depth, 1))


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps as [cos | sin] over geometric frequencies 1 .. 1/10000."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, ch: int, emb_dim: int, out_ch: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch))
        # index 2 of out_layers is LDM's Dropout (inactive at inference)
        self.out_layers = nn.Sequential(GroupNorm(32, out_ch), nn.SiLU(), nn.Identity(),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if ch == out_ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x, emb):
        h = residual(self.emb_layers(emb)[:, :, None, None], self.in_layers(x))
        return residual(self.skip_connection(x), self.out_layers(h))


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when no context is given."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))  # LDM's to_out.1 is a Dropout

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        # (B, L, heads*d) -> (B, heads, L, d)
        q, k, v = (z.unflatten(-1, (self.heads, -1)).transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    """Shazeer 2020: a GELU-gated linear unit, one projection producing value and gate.

    `split` (a speed lever, layout.configure): compute value and gate as two matrix products over the two halves of
    `proj`'s weight, so both come out contiguous and the GELU and the product run as contiguous (vectorised)
    kernels, instead of over the two strided halves of one product. The same number of passes over memory; the
    products may round differently on a GPU (another GEMM shape), hence a switch.
    """

    split = False

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        if self.split:
            (w, w_gate), (b, b_gate) = self.proj.weight.chunk(2), self.proj.bias.chunk(2)  # row halves: views
            x, gate = F.linear(x, w, b), F.linear(x, w_gate, b_gate)
        else:
            x, gate = self.proj(x).chunk(2, dim=-1)
        return product(x, F.gelu(gate))


def product(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x * y, written into `y` (a fresh result) when no gradient is recorded: one temporary fewer, the same values."""
    return x * y if torch.is_grad_enabled() else y.mul_(x)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * 4), nn.Identity(), nn.Linear(dim * 4, dim))  # net.1: Dropout

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = residual(x, self.attn1(self.norm1(x)))
        x = residual(x, self.attn2(self.norm2(x), context))
        return residual(x, self.ff(self.norm3(x)))


class SpatialTransformer(nn.Module):
    """Attention over the pixels of a feature map, with the text as cross-attention context."""

    def __init__(self, ch: int, context_dim: int, heads: int, depth: int):
        super().__init__()
        self.norm = GroupNorm(32, ch, eps=1e-6)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(ch, context_dim, heads) for _ in range(depth))
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x, context):
        b, c, h, w = x.shape
        # (B, C, H, W) -> (B, H*W, C): a view when the map is channels_last (its memory is already pixel-major)
        y = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            y = block(y, context)
        # and back, (B, H*W, C) -> (B, C, H, W): a view with channels_last strides, copied only to keep an NCHW
        # model NCHW (one copy either way: otherwise the convolution or the residual add makes it)
        fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
        return residual(x, self.proj_out(y.transpose(1, 2).reshape(b, c, h, w).contiguous(memory_format=fmt)))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size=None):
        # `size`: the next skip's size, so latents whose side is not a multiple of 8 come back to their shape
        return self.conv(F.interpolate(x, size=size, mode="nearest") if size else
                         F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.ModuleList):
    """One UNet block: layers applied in order, each given what it needs (emb for ResBlocks, text for attention)."""

    def forward(self, x, emb, context, up_size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, up_size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.cfg = cfg
        mc, emb_dim = cfg.model_channels, cfg.model_channels * 4

        def attention(ch):
            return SpatialTransformer(ch, cfg.context_dim, cfg.num_heads, cfg.transformer_depth)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
        skip_chs, ch = [mc], mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_dim, mult * mc)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(layers))
                skip_chs.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential([Downsample(ch)]))
                skip_chs.append(ch)
        self.middle_block = TimestepEmbedSequential([ResBlock(ch, emb_dim, ch), attention(ch), ResBlock(ch, emb_dim, ch)])
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chs.pop(), emb_dim, mult * mc)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(attention(ch))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(layers))
        self.out = nn.Sequential(GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    @property
    def channels_last(self) -> bool:
        """Whether the weights are in the channels_last memory format (layout.set_channels_last)."""
        return is_channels_last(self.input_blocks[0][0].weight)

    def twice(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[x; x] in `dtype` and in this model's memory format, the input of a guided (uncond + cond) pass: one
        copy kernel, where `torch.cat([x, x]).to(dtype)` takes two and the first convolution a third (the layout)."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        out = torch.empty((2 * x.shape[0], *x.shape[1:]), dtype=dtype, device=x.device, memory_format=fmt)
        out.view(2, *x.shape).copy_(x)  # the batch dimension split in two: both halves from one broadcast copy
        return out

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, 4, h, w) latents; t: (B,) or () timesteps on the 0..999 scale; context: (B, 77, context_dim)."""
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))
        skips = []
        for block in self.input_blocks:
            x = block(x, emb, context)
            skips.append(x)
        x = self.middle_block(x, emb, context)
        for block in self.output_blocks:
            x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb, context, up_size=skips[-1].shape[-2:] if skips else None)
        return self.out(x)
