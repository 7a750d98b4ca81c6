"""`Model`: one Stable Diffusion 1.x model's parts, as `magicfusion.load` returns them."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .clip import CLIPTextModel
from .tokenizer import CLIPTokenizer
from .unet import UNetModel
from .vae import VAEDecoder


@dataclass(eq=False)
class Model:
    """One Stable Diffusion 1.x model, ready to sample. Made by `magicfusion.load`."""
    unet: UNetModel
    text_encoder: CLIPTextModel
    vae: VAEDecoder
    tokenizer: CLIPTokenizer
    name: str = "model"
    loras: tuple = ()  # ((name, scale, short hash), ...) merged into the weights at load (lora.py)
    embeddings: dict = field(default_factory=dict)  # textual-inversion token -> (first row, vectors, hash)

    @property
    def device(self) -> torch.device:
        return self.unet.out[2].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.out[2].weight.dtype
