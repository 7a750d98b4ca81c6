"""`magicfusion demo`: MagicFusion on two small trained models, offline, on a CPU, in seconds.

The models come with the repository (`weights/toy/`, made by `tools/train_toy.py`): real SD 1.x checkpoints of a
tiny size, trained from scratch in a toy world (tools/toyworld.py). The **expert** has only seen 16 animal emoji
on plain or blotchy backgrounds (a light studio, random colours); the **general** model has only seen 6 scenes
(beach, snow, meadow, night, desert, underwater) with everyday objects, never an animal. Asked for "a lion on the
beach", the general model draws a beach without a lion, the expert a lion without a beach; Saliency-aware Noise
Blending takes the lion where the expert's guidance is salient and the beach everywhere else.

`panel()` lays the results out one row per prompt: general | expert | fused | where the expert won.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .errors import InputError

TOY = Path(__file__).resolve().parent.parent / "weights" / "toy"
SIZE = 128
# (general prompt, expert prompt): the expert is told only the animal, the general model the whole scene
PROMPTS = [("a lion on the beach", "a lion"), ("a panda in a meadow", "a panda"),
           ("a cat in the desert", "a cat"), ("a tiger underwater", "a tiger"), ("a fox at night", "a fox")]
# The panel shows one seed, chosen by eye among 1-4 as one at which all five prompts fuse well (with the previous
# models, and looked at again with these); the prompts after the first were picked among pairs that fused right, in
# a scene the general model also drew right alone. Over every prompt of the toy world and other seeds, 91% of fused
# images have both the animal and the scene right with the options below (docs/toyworld.md).
SEED = 2
STEPS = 20  # DDIM steps: the toy models are small, and the demo must take seconds on a CPU
# The best setting measured in the toy world (docs/toyworld.md): the general model's noise alone for the first
# steps (t > 850: it lays out the scene, and a placeholder where the sentence names what it does not know), then
# SNB to the end, each model's saliency against its own unconditional prediction (the paper's text) and a sharper
# expert softmax (ke = 2). 91% both right, against 80% for the authors' defaults and 58% for the plain
# average of the two noises (ke = 4 measured 94%, a difference inside the evaluation's noise).
FUSION = dict(fuse_from=850, fuse_until=-1, outside="general", saliency_reference="own", ke=2.0)


@dataclass
class Row:
    """One prompt's results: each model alone, the fusion, and per step which model's noise was used."""
    prompt: str
    expert_prompt: str
    general: Image.Image
    expert: Image.Image
    fused: Image.Image
    masks: list  # per step, a (1, h, w) uint8 map: 0 the general model, 1 the expert


def toy_paths(folder=None) -> tuple[Path, Path, Path]:
    """(general checkpoint, expert checkpoint, tokenizer folder) of the toy models, or an InputError saying how to
    get them."""
    folder = Path(folder) if folder else TOY
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--weights {folder} is a file; pass the folder that holds the toy models "
                         "(general.safetensors, expert.safetensors, tokenizer/)")
    paths = (folder / "general.safetensors", folder / "expert.safetensors", folder / "tokenizer")
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise InputError(f"the demo models are missing from {folder} ({', '.join(missing)}); they ship with the "
                         "repository in weights/toy (pass that folder with --weights) and are rebuilt by "
                         "`python tools/train_toy.py`")
    return paths


def window_mask(masks: list) -> np.ndarray:
    """(h, w) share of the steps at which each latent pixel took the expert's noise, from per-step (1, h, w) maps."""
    return np.mean([m[0].numpy() == 1 for m in masks], axis=0).astype(np.float32)


def _label(draw: ImageDraw.ImageDraw, xy, text: str, size: int) -> None:
    draw.text(xy, text, fill=(20, 20, 20), font=ImageFont.load_default(size=size))


def panel(rows: list, scale: int = 2) -> Image.Image:
    """Rows of general | expert | fused | expert's share of each latent pixel (white: always the expert), scaled up
    `scale` times, each row headed by its prompts."""
    tile = SIZE * scale
    pad, head, top = 8, 22, 30
    cols = ["general model alone", "expert alone", "MagicFusion (SNB)", "where the expert's noise was used"]
    width = pad + 4 * (tile + pad)
    canvas = Image.new("RGB", (width, top + len(rows) * (head + tile + pad)), (250, 250, 250))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(cols):
        _label(draw, (pad + c * (tile + pad), 8), name, 14)
    for r, row in enumerate(rows):
        y = top + r * (head + tile + pad)
        _label(draw, (pad, y + 3), f'"{row.prompt}"   (expert prompt: "{row.expert_prompt}")', 14)
        share = (window_mask(row.masks) * 255).round().astype(np.uint8)
        mask = Image.fromarray(share).resize((tile, tile), Image.NEAREST).convert("RGB")
        for c, im in enumerate((row.general, row.expert, row.fused, mask)):
            canvas.paste(im.resize((tile, tile), Image.NEAREST), (pad + c * (tile + pad), y + head))
    return canvas


@torch.no_grad()
def run(folder=None, prompts=PROMPTS, seed: int = SEED, progress: bool = True) -> list:
    """Load the toy models and fuse every prompt -> [Row]. Each model alone uses the same seed as the fusion."""
    from .checkpoint import load
    from .pipeline import fuse, generate
    g_path, e_path, tok = toy_paths(folder)
    general = load(g_path, tokenizer=tok)
    expert = load(e_path, tokenizer=tok)
    rows = []
    for prompt, expert_prompt in prompts:
        common = dict(seed=seed, height=SIZE, width=SIZE, steps=STEPS, progress=progress)
        result = fuse(general, expert, prompt, expert_prompt, **common, **FUSION)
        rows.append(Row(prompt, expert_prompt, generate(general, prompt, **common)[0],
                        generate(expert, expert_prompt, **common)[0], result.fused[0], result.masks))
    return rows
