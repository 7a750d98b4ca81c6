"""The VAE decoder of Stable Diffusion 1.x: (B, 4, H/8, W/8) latents -> (B, 3, H, W) pixels in [-1, 1].

Attribute names are the LDM checkpoint keys under `first_stage_model.` (`post_quant_conv`,
`decoder.up.3.block.0.conv1`). The encoder half is not built: sampling never needs it, and the loader skips
its weights. As in the checkpoint, the mid-block attention's q/k/v/proj_out are 1x1 convolutions and the
`up` list is stored lowest resolution LAST (`up.3` is the first level applied), so it is iterated reversed.

Reference: Esser et al., "Taming Transformers" (2021) for the autoencoder, as used by Rombach et al. (2022);
the layout follows CompVis' `ldm/modules/diffusionmodules/model.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class VAEConfig:
    z_channels: int = 4
    ch: int = 128                      # width of the full-resolution level
    ch_mult: tuple = (1, 2, 4, 4)      # one entry per level, full resolution first; 2**(len-1) = 8x upsampling
    num_res_blocks: int = 2            # the decoder runs num_res_blocks + 1 ResnetBlocks per level
    out_ch: int = 3
    scale_factor: float = 0.18215      # SD1 latents were scaled by this to unit variance for training

    @property
    def factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD 1.x)."""
        return 2 ** (len(self.ch_mult) - 1)

    @staticmethod
    def from_state_dict(sd: dict) -> "VAEConfig":
        """Read the architecture off an LDM VAE state dict (keys after `first_stage_model.`)."""
        levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("decoder.up.")})
        widths = [sd[f"decoder.up.{i}.block.0.conv2.weight"].shape[0] for i in levels]
        blocks = len({k.split(".")[4] for k in sd if k.startswith("decoder.up.0.block.")})
        ch = widths[0]
        return VAEConfig(sd["post_quant_conv.weight"].shape[0], ch, tuple(w // ch for w in widths), blocks - 1,
                         sd["decoder.conv_out.weight"].shape[0])


def swish(x):
    return F.silu(x)


class ResnetBlock(nn.Module):
    def __init__(self, ch: int, out_ch: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, ch, eps=1e-6)
        self.conv1 = nn.Conv2d(ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(32, out_ch, eps=1e-6)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(ch, out_ch, 1) if ch != out_ch else nn.Identity()

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, channels as features."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = nn.GroupNorm(32, ch, eps=1e-6)
        self.q, self.k, self.v = nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head whose sequence is the pixels
        q, k, v = (p(y).flatten(2).transpose(1, 2)[:, None] for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out[:, 0].transpose(1, 2).reshape(b, c, h, w))


class Mid(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(ch, ch), AttnBlock(ch), ResnetBlock(ch, ch)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UpLevel(nn.Module):
    def __init__(self, ch: int, out_ch: int, n_blocks: int, upsample: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(ch if i == 0 else out_ch, out_ch) for i in range(n_blocks))
        if upsample:
            self.upsample = Upsample(out_ch)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = Mid(widths[-1])
        # up[i] works at level i's width; built in storage order, applied from the last (lowest resolution)
        self.up = nn.ModuleList(
            UpLevel(widths[min(i + 1, len(widths) - 1)], widths[i], cfg.num_res_blocks + 1, upsample=i != 0)
            for i in range(len(widths)))
        self.norm_out = nn.GroupNorm(32, widths[0], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VAEDecoder(nn.Module):
    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the training-time latent scaling, then decode to pixels in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(latents / self.cfg.scale_factor))
