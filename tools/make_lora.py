"""Write a random LoRA for a named config (tools/random_weights.py), in kohya/AUTOMATIC1111 or diffusers/PEFT format.

    python tools/make_lora.py --config tiny --format kohya --rank 4 --alpha 2 --out weights/tiny-lora.safetensors
    python tools/make_lora.py --config sd15 --format peft --targets all --out /tmp/sd15-lora.safetensors

`--targets attn` adapts what LoRA trainers adapt by default (the transformer blocks' attention and feed-forward
layers, proj_in/proj_out, and the text encoder's attention and MLP); `all` adds every ResBlock convolution, the
time-embedding layers, down/upsamplers and conv_in/conv_out (a LoCon file). Layers are named by their diffusers
path, as both formats do for SD 1.x. The weights are random (for tests and demos): the images change, abstractly.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `tools.*` when run as a script

import torch
from safetensors.torch import save_file

from magicfusion.clip import CLIPTextModel
from magicfusion.lora import TEXT_PART, UNET_PART, Targets
from magicfusion.unet import UNetModel
from tools.random_weights import CONFIGS

_ATTN = [f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")] + ["ff.net.0.proj", "ff.net.2"]
_RESNET = ("conv1", "conv2", "time_emb_proj", "conv_shortcut")


def unet_modules(config: str, targets: str) -> list[str]:
    """The diffusers paths of the UNet layers a LoRA of this kind adapts (conv_shortcut where the block has one)."""
    ucfg = CONFIGS[config][0]
    n, res = len(ucfg.channel_mult), ucfg.num_res_blocks

    def transformer(prefix):
        blocks = [f"{prefix}.transformer_blocks.{d}.{a}" for d in range(ucfg.transformer_depth) for a in _ATTN]
        return [f"{prefix}.proj_in", f"{prefix}.proj_out"] + blocks

    attn, conv = [], ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
    for i in range(n):
        for j in range(res):
            if i in ucfg.attention_levels:
                attn += transformer(f"down_blocks.{i}.attentions.{j}")
            conv += [f"down_blocks.{i}.resnets.{j}.{r}" for r in _RESNET]
        if i < n - 1:
            conv.append(f"down_blocks.{i}.downsamplers.0.conv")
        level = n - 1 - i  # up_blocks run from the lowest resolution up
        for j in range(res + 1):
            if level in ucfg.attention_levels:
                attn += transformer(f"up_blocks.{i}.attentions.{j}")
            conv += [f"up_blocks.{i}.resnets.{j}.{r}" for r in _RESNET]
        if i < n - 1:
            conv.append(f"up_blocks.{i}.upsamplers.0.conv")
    attn += transformer("mid_block.attentions.0")
    conv += [f"mid_block.resnets.{j}.{r}" for j in range(2) for r in _RESNET]
    return attn + (conv if targets == "all" else [])


def text_modules(config: str) -> list[str]:
    layers = CONFIGS[config][1].layers
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
    return [f"text_model.encoder.layers.{i}.{p}" for i in range(layers) for p in names]


def leaf(module: str) -> str:
    """The end of a module path that PEFT's target_modules names it by (`to_q`, `to_out.0`, `net.0.proj`)."""
    parts = module.split(".")
    n = 1
    while n < len(parts) and (parts[-n].isdigit() or parts[-n] == "proj"):
        n += 1
    return ".".join(parts[-n:])


def random_lora(config: str = "tiny", fmt: str = "kohya", rank: int = 4, alpha: float | None = None, seed: int = 0,
                targets: str = "attn", text_encoder: bool = True, magnitude: float = 0.05) -> tuple[dict, dict]:
    """-> (tensors, safetensors metadata) of a random LoRA. up @ down has entries of about `magnitude` * the
    format's 1/scale, so the merged change is about `magnitude` per weight whatever rank and alpha are."""
    ucfg, ccfg, _ = CONFIGS[config]
    with torch.device("meta"):  # shapes only: nothing of the model is allocated
        unet_sd, clip_sd = UNetModel(ucfg).state_dict(), CLIPTextModel(ccfg).state_dict()
    where = Targets(unet_sd, clip_sd, config)
    gen = torch.Generator().manual_seed(seed)
    alpha = float(rank if alpha is None else alpha)
    parts = [(UNET_PART, m) for m in unet_modules(config, targets)]
    parts += [(TEXT_PART, m) for m in text_modules(config)] if text_encoder else []
    tensors = {}
    for part, module in parts:
        key = where.key(part, module, kohya=False)
        if key is None:  # e.g. conv_shortcut of a block whose channels do not change
            continue
        shape = where.sds[part][key].shape
        down = torch.randn((rank, *shape[1:]), generator=gen) / shape[1:].numel() ** 0.5
        up = torch.randn((shape[0], rank) + (1,) * (len(shape) - 2), generator=gen) * magnitude * (rank / alpha) ** 0.5
        down = down * (rank / alpha) ** 0.5
        if fmt == "kohya":
            name = f"lora_{part}_{module.replace('.', '_')}"
            tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                        f"{name}.alpha": torch.tensor(alpha)}
        else:
            name = f"{'unet' if part == UNET_PART else 'text_encoder'}.{module}"
            tensors |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}
    meta = {"format": "pt"}
    if fmt == "peft":  # the LoraConfig fields diffusers writes beside its LoRAs (scale = lora_alpha / r)
        fields = {}
        for prefix in ["unet"] + (["text_encoder"] if text_encoder else []):
            paths = [k[len(prefix) + 1:].rsplit(".lora_", 1)[0] for k in tensors if k.startswith(prefix + ".")]
            modules = sorted({leaf(m) for m in paths})
            fields |= {f"{prefix}.r": rank, f"{prefix}.lora_alpha": alpha, f"{prefix}.target_modules": modules}
        meta["lora_adapter_metadata"] = json.dumps(fields)
    return {k: v.contiguous() for k, v in tensors.items()}, meta


def write_lora(path, **kwargs) -> Path:
    """random_lora(**kwargs) written to `path` (.safetensors, atomically)."""
    path = Path(path)
    tensors, meta = random_lora(**kwargs)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    p.add_argument("--format", choices=("kohya", "peft"), default="kohya")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank, scale 1)")
    p.add_argument("--targets", choices=("attn", "all"), default="attn", help="all: also the convolutions (LoCon)")
    p.add_argument("--no-text-encoder", dest="text_encoder", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    out = Path(a.out)
    problem = (f"--out {out} must end in .safetensors" if out.suffix != ".safetensors" else
               f"{out} exists; pass --overwrite to replace it" if out.exists() and not a.overwrite else
               f"folder {out.parent} does not exist; create it first" if not out.parent.is_dir() else
               f"--rank must be >= 1, got {a.rank}" if a.rank < 1 else None)
    if problem:
        print(f"make_lora: error: {problem}", file=sys.stderr)
        return 2
    write_lora(out, config=a.config, fmt=a.format, rank=a.rank, alpha=a.alpha, seed=a.seed, targets=a.targets,
               text_encoder=a.text_encoder)
    print(f"wrote {out} (random {a.format} LoRA for {a.config}, rank {a.rank}, targets {a.targets})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
