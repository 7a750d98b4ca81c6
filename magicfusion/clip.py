"""The CLIP ViT-L/14 text tower that turns token ids into the (B, 77, 768) embeddings the UNet attends to.

Attribute names are the checkpoint keys under `cond_stage_model.transformer.` in an LDM file (and the keys of
a diffusers `text_encoder/`): `text_model.encoder.layers.0.self_attn.q_proj.weight`.

Reference: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (2021):
a causal pre-LayerNorm transformer with quick-GELU MLPs; Stable Diffusion 1.x feeds the UNet the final
layer-normed hidden states of every token (not the pooled output).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    head_dim: int = 64  # CLIP's text towers all use 64-wide heads; width / 64 heads

    @staticmethod
    def from_state_dict(sd: dict) -> "CLIPTextConfig":
        """Read the architecture off an HF-layout CLIP text state dict (`text_model.` keys)."""
        tok = sd["text_model.embeddings.token_embedding.weight"]
        pos = sd["text_model.embeddings.position_embedding.weight"]
        layers = len({k.split(".")[3] for k in sd if k.startswith("text_model.encoder.layers.")})
        return CLIPTextConfig(tok.shape[0], pos.shape[0], tok.shape[1], layers)


class Attention(nn.Module):
    def __init__(self, width: int, head_dim: int):
        super().__init__()
        self.heads = width // head_dim
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        # (B, L, heads*d) -> (B, heads, L, d)
        q, k, v = (p(x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # each token sees only those before it
        return self.out_proj(out.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width * 4), nn.Linear(width * 4, width)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick-GELU, the activation CLIP was trained with


class EncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.self_attn = Attention(cfg.width, cfg.head_dim)
        self.layer_norm1 = nn.LayerNorm(cfg.width)
        self.mlp = MLP(cfg.width)
        self.layer_norm2 = nn.LayerNorm(cfg.width)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(positions)


class Encoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))


class TextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width)


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: CLIPTextConfig = CLIPTextConfig()):
        super().__init__()
        self.cfg = cfg
        self.text_model = TextTransformer(cfg)

    def forward(self, ids: torch.Tensor, clip_skip: int = 0) -> torch.Tensor:
        """ids: (B, 77) token ids -> (B, 77, width).

        clip_skip=N stops N layers before the last and layer-norms that hidden state (diffusers' `clip_skip`;
        AUTOMATIC1111's "Clip skip" counts one higher, so its 2 is our 1).
        """
        tm = self.text_model
        x = tm.embeddings(ids)
        for layer in tm.encoder.layers[: len(tm.encoder.layers) - clip_skip]:
            x = layer(x)
        return tm.final_layer_norm(x)
