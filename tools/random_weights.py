"""Random SD 1.x checkpoints of a named size and a tiny tokenizer, for tests, benchmarks and experiments.

`tiny` is small enough that a whole fusion runs on a laptop CPU in seconds; `sd15` has Stable Diffusion 1.5's
exact shapes (an 860M-parameter UNet) for tests and benchmarks of the real sizes. The weights are random, so
the images are abstract, but the code path is the one real weights take.
"""
from __future__ import annotations

from pathlib import Path

import json

import torch
from safetensors.torch import save_file

from magicfusion.clip import CLIPTextConfig, CLIPTextModel
from magicfusion.schedule import alphas_cumprod
from magicfusion.tokenizer import write_vocab
from magicfusion.unet import UNetConfig, UNetModel
from magicfusion.vae import VAEConfig, VAEDecoder

CONFIGS = {
    "tiny": (UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                        context_dim=128), CLIPTextConfig(vocab_size=1000, width=128, layers=2),
             VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)),
    "sd15": (UNetConfig(), CLIPTextConfig(), VAEConfig()),
}


def perturb_(module: torch.nn.Module, gen: torch.Generator, scale: float = 0.1) -> torch.nn.Module:
    """Add noise to every parameter, so norms are not exactly 1 and biases not 0: no default init can hide a
    wiring mistake from a parity test."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * (1.0 if p.dim() == 1 else p.std().item()))
    return module


def random_state_dict(config: str, seed: int = 0, dtype=torch.float32) -> dict:
    """A random LDM-layout state dict (`model.diffusion_model.*`, `cond_stage_model.transformer.*`,
    `first_stage_model.*` plus the schedule buffers real files carry) for a named config."""
    ucfg, ccfg, vcfg = CONFIGS[config]
    gen = torch.Generator().manual_seed(seed)
    sd = {"alphas_cumprod": alphas_cumprod()}
    with torch.random.fork_rng():  # the modules' default init draws from the global RNG: leave the caller's alone
        torch.manual_seed(seed)
        for prefix, build in (("model.diffusion_model.", lambda: UNetModel(ucfg)),
                              ("cond_stage_model.transformer.", lambda: CLIPTextModel(ccfg)),
                              ("first_stage_model.", lambda: VAEDecoder(vcfg))):
            module = perturb_(build(), gen)
            sd.update({prefix + k: v.to(dtype).contiguous() for k, v in module.state_dict().items()})
            del module
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(ccfg.max_positions)[None]
    return sd


def write_checkpoint(path, config: str = "tiny", seed: int = 0, dtype=torch.float32) -> Path:
    """Write a random checkpoint as LDM `.safetensors` (atomically: a temporary name, then a rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(random_state_dict(config, seed, dtype), str(tmp), metadata={"magicfusion": f"random {config} seed {seed}"})
    tmp.replace(path)
    return path


# Tiny vocabulary for tests and the offline demo: frequent English pairs and a few whole words.
_TINY_MERGES = ("t h|th e</w>|a n|an d</w>|i n|in g</w>|e r</w>|o n</w>|o f</w>|t o</w>|i s</w>|a t</w>|e n|"
                "o r|a r|s t|e s</w>|e d</w>|o u|r e|c a|ca t</w>|d o|do g</w>|p a|pa in|pain t|paint ing</w>|"
                "p h|ph o|pho t|phot o</w>|a l|i t</w>|w i|t h</w>|wi th</w>|l e</w>|h i|s u|"
                "su n</w>|s e</w>|b e|ar t</w>")


def write_tiny_vocab(dir) -> None:
    """Write a small deterministic CLIP-layout vocab.json + merges.txt (558 ids) into `dir`."""
    write_vocab(dir, [tuple(m.split(" ")) for m in _TINY_MERGES.split("|")])


def random_pair(folder) -> tuple[Path, Path, Path]:
    """Two random tiny checkpoints (seeds 1 and 2) and a tiny tokenizer in `folder`, made deterministically if absent."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = folder / "tiny-tokenizer"
    if not (tok / "merges.txt").exists():
        tmp = folder / "tiny-tokenizer.tmp"
        tmp.mkdir(exist_ok=True)
        write_tiny_vocab(tmp)
        assert len(json.loads((tmp / "vocab.json").read_text())) <= CONFIGS["tiny"][1].vocab_size
        tmp.replace(tok)
    paths = []
    for name, seed in (("tiny-general", 1), ("tiny-expert", 2)):
        p = folder / f"{name}.safetensors"
        if not p.exists():
            write_checkpoint(p, "tiny", seed)
        paths.append(p)
    return paths[0], paths[1], tok
