"""Read a diffusers Stable Diffusion 1.x folder as if it were an LDM single-file checkpoint.

A diffusers folder (`model_index.json`, `unet/`, `text_encoder/`, `vae/`, `tokenizer/`) holds the same
weights as an LDM `.ckpt`/`.safetensors` under other names. `read_diffusers_folder` renames them to the LDM
keys (`model.diffusion_model.`, `cond_stage_model.transformer.`, `first_stage_model.`), so the project's one
loader takes both formats. The renaming is a few rules walking the block structure, with the block counts
read off the diffusers keys (tiny and full-size models take the same path), not a per-key table. The VAE
encoder and `quant_conv` are never read: sampling only decodes.

References: CompVis/stable-diffusion (`ldm/modules/diffusionmodules/openaimodel.py`, `model.py`) for the LDM
names; diffusers' `UNet2DConditionModel` and `AutoencoderKL` module names for the other side.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import torch

from .errors import InputError
from .paths import kind, read_bytes
from .weights_io import read_tensors

# diffusers ResBlock layer -> LDM's (in_layers.1 and out_layers.1/.2 are LDM's SiLU/Dropout index gaps)
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
# the inside of a SpatialTransformer has the same names in both layouts
_TRANSFORMER = re.compile(r"norm|proj_in|proj_out|transformer_blocks\.\d+\."
                          r"(norm[123]|attn[12]\.to_([qkv]|out\.0)|ff\.net\.(0\.proj|2))")
_UNET_BLOCK = re.compile(r"(?:down_blocks\.(\d+)|up_blocks\.(\d+)|mid_block)"
                         r"\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
# VAE mid-block attention, current diffusers names and the older query/key/value/proj_attn ones
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
             "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_CLIP_PARTS = ("embeddings", "encoder", "final_layer_norm")
MAX_JSON = 64 * 2 ** 20  # bytes of a shard index or config (real ones: a few hundred kB at most)  # transformers 5 saves these without `text_model.`


def _count(keys, pattern: str) -> int:
    """1 + the largest index that `pattern`'s group captures in any key (0 when none matches)."""
    return 1 + max((int(m[1]) for k in keys if (m := re.match(pattern, k))), default=-1)


def _unet_namer(keys) -> Callable[[str], str | None]:
    """diffusers -> LDM module names for this UNet; None for a name outside SD1's layout."""
    per_down = _count(keys, r"down_blocks\.\d+\.resnets\.(\d+)\.")  # ResBlocks per level going down
    per_up = _count(keys, r"up_blocks\.\d+\.resnets\.(\d+)\.")      # one more going up
    up_attn = {m[1] for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}

    def name(mod: str) -> str | None:
        if mod in _UNET_TOP:
            return _UNET_TOP[mod]
        if not (m := _UNET_BLOCK.fullmatch(mod)):
            return None
        down, up, part, j, rest = m[1], m[2], m[3], int(m[4]), m[5]
        # the LDM block, and the slot of its ResBlock in it (a SpatialTransformer is always slot 1)
        if down is not None:  # input_blocks: conv_in, then per level its ResBlocks (+ attention) and a Downsample
            n = 1 + int(down) * (per_down + 1) + (per_down if part == "downsamplers" else j)
            block, res = f"input_blocks.{n}", "0"
        elif up is not None:  # output_blocks: per level its ResBlocks (+ attention), the last one also upsampling
            block, res = f"output_blocks.{int(up) * per_up + (per_up - 1 if part == 'upsamplers' else j)}", "0"
        else:                 # middle_block holds its layers directly: ResBlock, SpatialTransformer, ResBlock
            block, res = "middle_block", str(2 * j)
        if part == "resnets" and rest in _UNET_RESNET:
            return f"{block}.{res}.{_UNET_RESNET[rest]}"
        if part == "attentions" and _TRANSFORMER.fullmatch(rest):
            return f"{block}.1.{rest}"
        if part == "downsamplers" and down is not None and rest == "conv":
            return f"{block}.0.op"
        if part == "upsamplers" and up is not None and rest == "conv":
            return f"{block}.{2 if up in up_attn else 1}.conv"  # after the attention, if the level has one
        return None
    return name


def _vae_namer(keys) -> Callable[[str], str | None]:
    """diffusers -> LDM names for the VAE decoder. diffusers' up_blocks run in application order; LDM stores
    `up` lowest resolution last, so up_blocks.i is up.{levels-1-i}."""
    levels = _count(keys, r"decoder\.up_blocks\.(\d+)\.")

    def name(mod: str) -> str | None:
        if mod in ("post_quant_conv", "decoder.conv_in", "decoder.conv_out"):
            return mod
        if mod == "decoder.conv_norm_out":
            return "decoder.norm_out"
        m = re.fullmatch(r"decoder\.(?:up_blocks\.(\d+)\.resnets\.(\d+)|mid_block\.resnets\.([01]))\.(\w+)", mod)
        if m and m[4] in _VAE_RESNET:
            block = f"up.{levels - 1 - int(m[1])}.block.{m[2]}" if m[1] is not None else f"mid.block_{int(m[3]) + 1}"
            return f"decoder.{block}.{_VAE_RESNET[m[4]]}"
        if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv", mod):
            return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv"
        if (m := re.fullmatch(r"decoder\.mid_block\.attentions\.0\.(.+)", mod)) and m[1] in _VAE_ATTN:
            return f"decoder.mid.attn_1.{_VAE_ATTN[m[1]]}"
        return None
    return name


def _clip_name(mod: str) -> str | None:
    if mod.startswith("text_model."):
        return mod
    return "text_model." + mod if mod.split(".")[0] in _CLIP_PARTS else None


def _rename(sd: dict, name: Callable[[str], str | None], prefix: str, source: Path) -> dict[str, torch.Tensor]:
    """Apply `name` to each key's module path; any key it does not place (or places twice) is an error."""
    out, unknown = {}, []
    for key, tensor in sd.items():
        mod, _, param = key.rpartition(".")
        new = name(mod) if param in ("weight", "bias") else None
        if new is None or f"{prefix}{new}.{param}" in out:
            unknown.append(key)
        else:
            out[f"{prefix}{new}.{param}"] = tensor
    if unknown:
        raise InputError(f"{source}: {len(unknown)} keys are not Stable Diffusion 1.x weights "
                         f"(e.g. {', '.join(unknown[:3])}); use an SD1 diffusers folder or an SD1 checkpoint file")
    return out


def _read_sharded(index: Path, keep) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(read_bytes(index, MAX_JSON, "a shard index"))["weight_map"]
        shards = sorted({file for key, file in weight_map.items() if keep(key)})
        ok = all(Path(s).name == s for s in shards)  # shards sit next to their index
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        ok = False
    if not ok:
        raise InputError(f"{index}: not a shard index with a weight_map of file names; re-download it")
    out = {}
    for shard in shards:  # shards holding only skipped keys (the VAE encoder) are not opened
        out.update(read_tensors(index.parent / shard, keep))
    return out


def _read_part(root: Path, part: str, safe: str, pickle: str, keep=lambda k: True) -> tuple[dict, Path]:
    """The tensors of one subfolder (and the file they came from): full precision first, safetensors first."""
    sub = root / part
    if kind(sub, "model folder") != "dir":
        raise InputError(f"{root}: no {part}/ subfolder, which a Stable Diffusion diffusers folder needs "
                         "(with unet/, text_encoder/, vae/); re-download or re-save the model")
    for stem, ext in ((safe, "safetensors"), (pickle, "bin")):
        for variant in ("", ".fp16"):
            single, index = sub / f"{stem}{variant}.{ext}", sub / f"{stem}.{ext}.index{variant}.json"
            if kind(single, "weights file") == "file":
                return read_tensors(single, keep), single
            if kind(index, "shard index") == "file":
                return _read_sharded(index, keep), index
    raise InputError(f"{sub}: no weights file (looked for {safe}.safetensors, {pickle}.bin, their .fp16 "
                     "variants and sharded .index.json); re-download the model")


def read_diffusers_folder(path) -> dict[str, torch.Tensor]:
    """All SD1 weights of a diffusers folder, keyed as in an LDM single-file checkpoint, in the stored dtype."""
    root = Path(path)
    if kind(root / "model_index.json", "model index") != "file":
        raise InputError(f"{root}: no model_index.json, so not a diffusers model folder; pass the folder that "
                         "diffusers' save_pretrained wrote, or a .safetensors/.ckpt checkpoint file")
    unet, src = _read_part(root, "unet", "diffusion_pytorch_model", "diffusion_pytorch_model")
    out = _rename(unet, _unet_namer(list(unet)), "model.diffusion_model.", src)
    text, src = _read_part(root, "text_encoder", "model", "pytorch_model",
                           keep=lambda k: not k.endswith("embeddings.position_ids"))  # an index buffer, rebuilt
    out |= _rename(text, _clip_name, "cond_stage_model.transformer.", src)
    vae, src = _read_part(root, "vae", "diffusion_pytorch_model", "diffusion_pytorch_model",
                          keep=lambda k: k.startswith(("decoder.", "post_quant_conv.")))
    vae = _rename(vae, _vae_namer(list(vae)), "first_stage_model.", src)
    for key, t in vae.items():  # diffusers' attention projections are Linear (C, C); LDM's are 1x1 convs
        if ".attn_1." in key and key.endswith("weight") and t.ndim == 2:
            vae[key] = t[:, :, None, None]
    out |= vae
    scale = _vae_scaling_factor(root / "vae" / "config.json")
    if scale is not None:  # stored under LDM's name for a scale computed from data (see checkpoint.py)
        out["scale_factor"] = torch.tensor(scale, dtype=torch.float32)
    return out


def _vae_scaling_factor(config: Path) -> float | None:
    """The latent scale factor of diffusers' vae/config.json (`scaling_factor`), if the file names one."""
    try:
        if kind(config, "VAE config") != "file":
            return None
        value = json.loads(read_bytes(config, MAX_JSON, "a VAE config")).get("scaling_factor")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, RecursionError):
        return None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def find_tokenizer_dir(path) -> Path | None:
    """`path/tokenizer` when it holds a CLIP BPE tokenizer (vocab.json + merges.txt, or tokenizer.json)."""
    tok = Path(path) / "tokenizer"
    if ((tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()) or (tok / "tokenizer.json").is_file():
        return tok
    return None
