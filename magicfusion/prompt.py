"""Prompt -> text embeddings: tokenize, run the text encoder, lay out the unconditional and conditional rows."""
from __future__ import annotations

import torch

from .errors import InputError


@torch.no_grad()
def encode_prompt(model: Model, prompt: str, negative_prompt: str, batch: int, clip_skip: int = 0) -> torch.Tensor:
    """-> (2B, 77, width) text embeddings, the B unconditional (negative prompt) rows first."""
    layers = model.text_encoder.cfg.layers
    if not isinstance(clip_skip, int) or not 0 <= clip_skip < layers:
        raise InputError(f"clip skip must be an integer in 0..{layers - 1} for {model.name}, got {clip_skip}; "
                         "0 uses the last layer")
    ids = model.tokenizer([negative_prompt, prompt]).to(model.device)
    emb = model.text_encoder(ids, clip_skip=clip_skip)
    return emb.repeat_interleave(batch, dim=0)
