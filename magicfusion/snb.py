"""Saliency-aware Noise Blending (SNB), the core of MagicFusion, as pure functions.

Reference: Zhao et al., "MagicFusion: Boosting Text-to-Image Generation Performance by Fusing Diffusion
Models", ICCV 2023 (arXiv 2303.13126), Sec. 3.2, and the authors' released sampling code.

For a general model G and an expert E at one DDIM step (u: unconditional, c: conditional prediction, s: the
guidance scale):
    eps_X = u_X + s (c_X - u_X)                                   classifier-free guidance, each model
    r_G = s (c_G - u_G),   r_E = s (c_E - u_G)                    guidance responses; the authors' code
                                                                  subtracts G's u in both ("general"), the
                                                                  paper's text uses each model's own ("own")
    S_X = softmax_{h,w}( k_X * mean_c blur(|r_X|) )               saliency, a distribution over pixels
    M = [S_G >= S_E]                                              G wins ties
    eps = M eps_G + (1 - M) eps_E                                 eq. (5)
With more than two models (beyond the paper: its open question 1) M becomes the argmax over all saliencies,
ties going to the earliest model, G first.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): u + s (c - u)."""
    return uncond + scale * (cond - uncond)


def saliency(response: torch.Tensor, k: float, blur: bool = True) -> torch.Tensor:
    """(B, C, h, w) guidance response -> (B, h, w) probability map softmax(k * mean_c blur(|r|))."""
    s = response.abs()
    if blur:  # a 4x4 box filter (padding 1 makes it one pixel smaller), resized back to the latent size
        s = F.interpolate(F.avg_pool2d(s, 4, stride=1, padding=1), size=s.shape[-2:], mode="bilinear",
                          align_corners=False)
    s = s.mean(dim=1)
    return torch.softmax(k * s.flatten(1), dim=1).view_as(s)


def winner(saliencies: list[torch.Tensor]) -> torch.Tensor:
    """Index of the most salient model per pixel, (B, h, w) int64; ties go to the lowest index."""
    return torch.stack(saliencies).argmax(dim=0)  # argmax returns the first of equal maxima


def blend(noises: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """Pick each pixel's noise (all channels) from the model `index` names."""
    out = noises[-1]
    for i in range(len(noises) - 2, -1, -1):
        out = torch.where((index == i)[:, None], noises[i], out)
    return out


def snb(uncond: list[torch.Tensor], cond: list[torch.Tensor], scale: float, ks: list[float], blur: bool = True,
        reference: str = "general") -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse the guided noises of models [G, E1, E2, ...] -> (eps, winner index map (B, h, w)).

    `reference="general"` measures every response against G's unconditional prediction (the authors' code);
    `"own"` against each model's own.
    """
    eps = [guidance(u, c, scale) for u, c in zip(uncond, cond)]
    base = [uncond[0]] * len(cond) if reference == "general" else uncond
    sal = [saliency(scale * (c - u), k, blur) for c, u, k in zip(cond, base, ks)]
    index = winner(sal)
    return blend(eps, index), index
