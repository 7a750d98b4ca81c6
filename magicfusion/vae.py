"""The VAE of Stable Diffusion 1.x: a KL autoencoder between (B, 3, H, W) pixels in [-1, 1] and (B, 4, H/8, W/8)
latents.

Attribute names are the LDM checkpoint keys under `first_stage_model.` (`post_quant_conv`,
`decoder.up.3.block.0.conv1`, `encoder.down.0.block.1.conv2`, `quant_conv`). Sampling needs only the decoder
(`VAEDecoder`); `VAEEncoder` is used for training (tools/train_toy.py) and image-to-image. As in the checkpoint, the mid-block attention's q/k/v/proj_out are 1x1 convolutions and the
`up` list is stored lowest resolution LAST (`up.3` is the first level applied), so it is iterated reversed.

Reference: Esser et al., "Taming Transformers" (2021) for the autoencoder, as used by Rombach et al. (2022);
the layout follows CompVis' `ldm/modules/diffusionmodules/model.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import GroupNorm, residual


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
        self.norm1 = GroupNorm(32, ch, eps=1e-6)
        self.conv1 = nn.Conv2d(ch, out_ch, 3, padding=1)
        self.norm2 = GroupNorm(32, out_ch, eps=1e-6)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(ch, out_ch, 1) if ch != out_ch else nn.Identity()

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return residual(self.nin_shortcut(x), h)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, channels as features."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = GroupNorm(32, ch, eps=1e-6)
        self.q, self.k, self.v = nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head whose sequence is the pixels
        q, k, v = (p(y).flatten(2).transpose(1, 2)[:, None] for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return residual(x, self.proj_out(out[:, 0].transpose(1, 2).reshape(b, c, h, w)))


class Downsample(nn.Module):
    """Stride-2 3x3 convolution; LDM pads only right and bottom (by one), so even sizes halve exactly."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class DownLevel(nn.Module):
    def __init__(self, ch: int, out_ch: int, n_blocks: int, downsample: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(ch if i == 0 else out_ch, out_ch) for i in range(n_blocks))
        if downsample:
            self.downsample = Downsample(out_ch)

    def forward(self, x):
        for block in self.block:
            x = block(x)
        return self.downsample(x) if hasattr(self, "downsample") else x


class Mid(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(ch, ch), AttnBlock(ch), ResnetBlock(ch, ch)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


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

    def forward(self, x):
        for block in self.block:
            x = block(x)
        return self.upsample(x) if hasattr(self, "upsample") else x


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
        self.norm_out = GroupNorm(32, widths[0], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))


class Encoder(nn.Module):
    """Pixels -> the mean and log-variance of the latent Gaussian, (B, 2 * z_channels, H/8, W/8)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.out_ch, widths[0], 3, padding=1)
        self.down = nn.ModuleList(
            DownLevel(widths[max(i - 1, 0)], widths[i], cfg.num_res_blocks, downsample=i != len(widths) - 1)
            for i in range(len(widths)))
        self.mid = Mid(widths[-1])
        self.norm_out = GroupNorm(32, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)  # LDM's double_z

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(swish(self.norm_out(self.mid(h))))


class VAEDecoder(nn.Module):
    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the training-time latent scaling, then decode to pixels in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(latents / self.cfg.scale_factor))


class VAEEncoder(nn.Module):
    """Pixels in [-1, 1] -> the latent Gaussian's (mean, logvar), both (B, z, H/8, W/8) and unscaled.

    `encode` draws a latent and applies the scale factor, giving what the UNet is trained on (LDM's
    `get_first_stage_encoding`). The log-variance is clamped to [-30, 20] as in LDM's DiagonalGaussianDistribution.
    """

    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.quant_conv(self.encoder(pixels)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A scaled latent sample z = (mean + std * noise) * scale_factor; the mean alone if `generator` is None."""
        mean, logvar = self(pixels)
        if generator is not None:
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
            mean = mean + torch.exp(0.5 * logvar) * noise
        return mean * self.cfg.scale_factor
