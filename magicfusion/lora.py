"""LoRA files merged into an SD 1.x model's weights at load: W += scale * up @ down, once, before sampling.

A LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685) stores, per
adapted layer, a `down` (rank x in) and an `up` (out x rank) matrix; the layer's weight becomes
W + s * up @ down. Merging it into the state dict before the modules are built makes sampling cost nothing
extra and leaves the UNet (and its CUDA graph) unchanged.

Formats read (the two that SD 1.x LoRAs are shared in):

* kohya-ss / AUTOMATIC1111: `lora_unet_<module>` / `lora_te_<module>` with `.lora_down.weight`,
  `.lora_up.weight` and an optional `.alpha`, the module named by its diffusers path with `_` for `.`
  (`lora_unet_down_blocks_0_attentions_0_proj_in`); LDM paths (`lora_unet_input_blocks_1_1_proj_in`) too.
  LoCon files add the ResBlocks' 3x3 convolutions: down (rank, in, 3, 3), up (out, rank, 1, 1). Scale: alpha/rank
  (alpha absent: 1).
* diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` and `text_encoder.<module>...`, and the older
  diffusers spellings (`.lora.down/up`, `.lora_linear_layer.down/up`, `attn1.processor.to_q_lora.down`). Scale: 1,
  or alpha/rank with `.alpha` keys, or from PEFT's `lora_alpha`/`r` in the file's `lora_adapter_metadata`.

The user's scale multiplies the format's. Anything that is not one of these (a key no layer matches, a wrong
shape, a LoRA for SDXL or SD 2.x, LyCORIS' LoHa/LoKr/DoRA variants) is refused with one line naming the keys.
References: kohya-ss/sd-scripts `networks/lora.py` (naming, alpha); huggingface/peft `tuners/lora` (scaling).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open

from .diffusers_folder import _clip_name, _unet_namer
from .errors import InputError
from .unet import UNetConfig
from .weights_io import read_tensors

_KOHYA = re.compile(r"lora_(unet|te)_(\w+)\.(lora_down\.weight|lora_up\.weight|alpha)")
_PEFT = re.compile(r"(unet|text_encoder)\.(.+?)\.(lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight"
                   r"|lora_linear_layer\.down\.weight|lora_linear_layer\.up\.weight|alpha)")
_PROCESSOR = re.compile(r"unet\.(.+)\.processor\.(to_[qkv]|to_out)_lora\.(down|up)\.weight")  # diffusers < 0.21
_ROLE = {"lora_down.weight": "down", "lora_A.weight": "down", "lora.down.weight": "down",
         "lora_linear_layer.down.weight": "down", "lora_up.weight": "up", "lora_B.weight": "up",
         "lora.up.weight": "up", "lora_linear_layer.up.weight": "up", "alpha": "alpha", "down": "down", "up": "up"}
# kohya writes a module path with `_` for `.`; these names keep their own underscores when the dots come back
_WORDS = re.compile(r"(?:down_blocks|up_blocks|mid_block|transformer_blocks|to_[qkv]|to_out|proj_in|proj_out"
                    r"|time_emb_proj|conv_shortcut|conv_norm_out|conv_in|conv_out|time_embedding|linear_[12]"
                    r"|text_model|self_attn|[qkv]_proj|out_proj|final_layer_norm|layer_norm[12]|[^_]+)(?=_|$)")
_OTHER_FAMILY = {"lora_te1_": "SDXL", "lora_te2_": "SDXL", "text_encoder_2.": "SDXL", "lora_unet_label_emb": "SDXL",
                 "unet.add_embedding": "SDXL", "lora_unet_add_embedding": "SDXL"}
_LYCORIS = ("hada_", "lokr_", "lora_mid", "dora_scale", "lora_magnitude_vector", "lora_B.bias")
UNET_PART, TEXT_PART = "unet", "te"


def parse_spec(spec: str) -> tuple[str, float]:
    """`FILE[:SCALE]` -> (file, scale); a colon not followed by a number belongs to the path."""
    path, _, tail = spec.rpartition(":")
    try:
        scale = float(tail)
    except ValueError:
        return spec, 1.0
    if not path or not math.isfinite(scale):
        raise InputError(f"LoRA {spec!r}: give FILE or FILE:SCALE with a finite scale, e.g. subject.safetensors:0.8")
    return path, scale


def short_hash(path: Path) -> str:
    """AUTOMATIC1111's LoRA hash: sha256 of a .safetensors file's data after its header (of the whole file
    otherwise), first 12 hex digits, as in its `Lora hashes` infotext field."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix.lower() == ".safetensors":
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def _refuse(name: str, problem: str, keys: list, fix: str) -> InputError:
    shown = ", ".join(keys[:3]) + (f" ... ({len(keys)} in all)" if len(keys) > 3 else "")
    return InputError(f"LoRA {name}: {problem}: {shown}; {fix}")


def _peft_metadata(path: Path) -> dict:
    """diffusers' `lora_adapter_metadata` (PEFT LoraConfig fields per part, `unet.lora_alpha` ...), or {}."""
    if path.suffix.lower() != ".safetensors":
        return {}
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    try:
        meta = json.loads(raw) if raw else {}
        assert isinstance(meta, dict)
        return meta
    except (ValueError, AssertionError):
        raise InputError(f"LoRA {path.name}: its lora_adapter_metadata is not a JSON object; "
                         "re-save the file") from None


def _is_lora_key(key: str) -> bool:
    return bool(_KOHYA.fullmatch(key) or _PROCESSOR.fullmatch(key) or _PEFT.fullmatch(key))


def group(sd: dict, name: str) -> dict:
    """LoRA keys -> {(part, module as written in the file, kohya?): {"down", "up"[, "alpha"]}}."""
    for key in sd:
        for marker, family in _OTHER_FAMILY.items():
            if key.startswith(marker):
                raise InputError(f"LoRA {name}: a LoRA for {family} (key {key}), not for Stable Diffusion 1.x; "
                                 "use a LoRA trained on an SD 1.x base")
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in sd):
        raise InputError(f"LoRA {name}: this is a whole Stable Diffusion checkpoint, not a LoRA; pass it as the model "
                         "(--model, --general, --expert) and a LoRA file with --lora")
    lycoris = [k for k in sd if any(m in k for m in _LYCORIS)]
    if lycoris:
        raise _refuse(name, "LyCORIS (LoHa, LoKr, Tucker, DoRA) or bias weights are not supported", lycoris,
                      "use a plain LoRA or LoCon file")
    layers, unknown = {}, []
    for key, tensor in sd.items():
        if m := _KOHYA.fullmatch(key):
            ident, role = (UNET_PART if m[1] == "unet" else TEXT_PART, m[2], True), m[3]
        elif m := _PROCESSOR.fullmatch(key):
            ident, role = (UNET_PART, f"{m[1]}.{'to_out.0' if m[2] == 'to_out' else m[2]}", False), m[3]
        elif m := _PEFT.fullmatch(key):
            ident, role = (UNET_PART if m[1] == "unet" else TEXT_PART, m[2], False), m[3]
        else:
            unknown.append(key)
            continue
        layers.setdefault(ident, {})[_ROLE[role]] = tensor
    if unknown:
        raise _refuse(name, "keys that are not LoRA weights of a known format", unknown,
                      "use a kohya/AUTOMATIC1111 (lora_unet_*, lora_te_*) or diffusers/PEFT (unet.*.lora_A) LoRA")
    unpaired = [f"{'lora_' + p + '_' if kohya else ''}{mod}" for (p, mod, kohya), t in layers.items()
                if "down" not in t or "up" not in t]
    if unpaired:
        raise _refuse(name, "layers with only one of the two LoRA matrices", unpaired, "the file is damaged")
    if not layers:
        raise InputError(f"LoRA {name}: the file holds no LoRA weights; pass a LoRA .safetensors file")
    odd = [k for k, t in sd.items() if not t.is_floating_point() or (k.endswith(".alpha") and t.numel() != 1)
           or (not k.endswith(".alpha") and (t.ndim not in (2, 4) or t.shape[0] * t.shape[1] == 0))]
    if odd:
        raise _refuse(name, "tensors that are not LoRA matrices (or one alpha number)", odd, "the file is damaged")
    return layers


def _redot(flat: str) -> str:
    """kohya's `down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0` -> the dotted diffusers path."""
    return ".".join(_WORDS.findall(flat))


class Targets:
    """Where a LoRA's layer names land in this model's LDM-layout state dicts."""

    def __init__(self, unet_sd: dict, clip_sd: dict, name: str):
        try:
            cfg = UNetConfig.from_state_dict(unet_sd)
        except (KeyError, StopIteration, ValueError, IndexError, ZeroDivisionError) as e:
            raise InputError(f"{name}: the UNet weights are incomplete or malformed ({type(e).__name__}: {e}); "
                             "the file may be damaged or not SD 1.x") from None
        n = len(cfg.channel_mult)  # the namer reads block counts off diffusers keys: give it this model's
        keys = [f"down_blocks.0.resnets.{cfg.num_res_blocks - 1}.x", f"up_blocks.0.resnets.{cfg.num_res_blocks}.x"]
        self.unet_name = _unet_namer(keys + [f"up_blocks.{n - 1 - lvl}.attentions.0.x" for lvl in cfg.attention_levels])
        self.sds = {UNET_PART: unet_sd, TEXT_PART: clip_sd}
        self.flat = {UNET_PART: {k.rsplit(".", 1)[0].replace(".", "_"): k.rsplit(".", 1)[0] for k in unet_sd}}
        self.context_dim = cfg.context_dim
        self.text_width = clip_sd.get("text_model.final_layer_norm.weight", torch.empty(0)).shape[0]

    def key(self, part: str, module: str, kohya: bool) -> str | None:
        """The weight key the LoRA layer adapts, or None."""
        if part == UNET_PART:
            ldm = self.flat[UNET_PART].get(module) if kohya else None  # kohya naming the LDM module
            ldm = ldm or self.unet_name(_redot(module) if kohya else module)
        else:
            ldm = _clip_name(_redot(module) if kohya else module)
        key = f"{ldm}.weight"
        return key if ldm and key in self.sds[part] else None


def _scale(part: str, module: str, t: dict, meta: dict) -> float:
    """The format's own scale: alpha/rank (kohya `.alpha`, diffusers' alphas, PEFT lora_alpha), else 1."""
    rank = t["down"].shape[0]
    if "alpha" in t:
        return float(t["alpha"]) / rank
    prefix = "unet." if part == UNET_PART else "text_encoder."
    alpha = meta.get(prefix + "lora_alpha")
    if alpha is None:
        return 1.0
    for pattern, value in (meta.get(prefix + "alpha_pattern") or {}).items():  # PEFT: a regex on the path's end
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
            alpha = value
            break
    return float(alpha) / (math.sqrt(rank) if meta.get(prefix + "use_rslora") else rank)


def scale_of(name: str, part: str, module: str, t: dict, meta: dict) -> float:
    try:
        scale = _scale(part, module, t, meta)
    except (TypeError, ValueError, AttributeError, re.error) as e:
        raise InputError(f"LoRA {name}: unreadable alpha for {module} ({type(e).__name__}: {e}); "
                         "re-save the file") from None
    if not math.isfinite(scale):
        raise InputError(f"LoRA {name}: alpha for {module} is not a finite number; the file is damaged")
    return scale


def fits(up: torch.Tensor, down: torch.Tensor, shape: torch.Size) -> bool:
    """Whether up @ down can be shaped like the weight: a Linear, a 1x1 conv, or a kxk conv (LoCon: the kernel is
    in `down`, `up` is 1x1); a Linear LoRA on a 1x1 conv (and back) fits too, as AUTOMATIC1111 allows."""
    if up.ndim not in (2, 4) or down.ndim not in (2, 4) or any(s != 1 for s in up.shape[2:]):
        return False
    if up.shape[0] != shape[0] or up.shape[1] != down.shape[0] or down[0].numel() * shape[0] != math.prod(shape):
        return False
    return not (down.ndim == 4 and len(shape) == 4 and down.shape[2:] != shape[2:])


def delta(up: torch.Tensor, down: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """up @ down in float32, shaped like the weight."""
    return (up.flatten(1).float() @ down.flatten(1).float()).reshape(shape)


def _family_hint(part: str, key: str, down: torch.Tensor, targets: Targets) -> str:
    width = down.flatten(1).shape[1]
    if part == UNET_PART and key.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) and width != targets.context_dim:
        return {2048: " (an SDXL LoRA)", 1024: " (a Stable Diffusion 2.x LoRA)"}.get(width, "")
    if part == TEXT_PART and width != targets.text_width and width in (1024, 1280, 4096):
        return " (a Stable Diffusion 2.x or SDXL LoRA)"
    return ""


def apply_lora(path, scale: float, targets: Targets, dtype: torch.dtype) -> tuple[str, float, str]:
    """Merge one LoRA file into `targets`' state dicts in place; -> (name, scale, short hash) for the infotext."""
    path = Path(path)
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InputError(f"LoRA {path.name}: scale must be a finite number, got {scale!r}")
    keys = []
    sd = read_tensors(path, keep=lambda k: keys.append(k) or _is_lora_key(k))  # a checkpoint's tensors are not read
    layers = group(sd | {k: None for k in keys if k not in sd}, path.name)
    meta = _peft_metadata(path)
    planned, unmatched, wrong, family = [], [], [], ""
    for (part, module, kohya), t in layers.items():
        key = targets.key(part, module, kohya)
        shown = f"lora_{part}_{module}" if kohya else f"{'unet' if part == UNET_PART else 'text_encoder'}.{module}"
        if key is None:
            unmatched.append(shown)
            continue
        weight = targets.sds[part][key]
        if not fits(t["up"], t["down"], weight.shape):
            up, down = tuple(t["up"].shape), tuple(t["down"].shape)
            wrong.append(f"{shown} (up {up} @ down {down} vs {tuple(weight.shape)})")
            family = family or _family_hint(part, key, t["down"], targets)
            continue
        planned.append((part, key, t, scale_of(path.name, part, module, t, meta)))
    if wrong:  # first: a wrong width often names the family the LoRA was made for
        raise _refuse(path.name, f"shapes that do not fit this model{family}", wrong,
                      "use a LoRA trained on this model's family (SD 1.x)")
    if unmatched:
        raise _refuse(path.name, "layers that match no layer of this SD 1.x model", unmatched,
                      "use a LoRA trained on an SD 1.x base")
    for part, key, t, own in planned:  # all checked before any weight changes; one float32 delta at a time
        sd_part = targets.sds[part]
        sd_part[key] = (sd_part[key].float() + (scale * own) * delta(t["up"], t["down"], sd_part[key].shape)).to(dtype)
    return path.stem, float(scale), short_hash(path)


def apply_loras(loras, unet_sd: dict, clip_sd: dict, name: str, dtype: torch.dtype) -> tuple:
    """Merge [(file, scale), ...] (or bare files, scale 1) in order; -> ((name, scale, hash), ...)."""
    if not loras:
        return ()
    items = [loras] if isinstance(loras, (str, Path)) else list(loras) if isinstance(loras, (list, tuple)) else [None]
    for item in items:
        if not (isinstance(item, (str, Path)) or (isinstance(item, (tuple, list)) and len(item) == 2
                                                  and isinstance(item[0], (str, Path)))):
            raise InputError(f"lora= takes files or (file, scale) pairs, got {item!r}; "
                             "e.g. lora=[('subject.safetensors', 0.8)]")
    targets = Targets(unet_sd, clip_sd, name)
    return tuple(apply_lora(*((item, 1.0) if isinstance(item, (str, Path)) else item), targets, dtype)
                 for item in items)


# ------------------------------------------------------------------------------------------------- infotext

def tagged(prompt: str, model) -> str:
    """The prompt as AUTOMATIC1111 records it: each LoRA of the model as `<lora:name:scale>` at the end (unless the
    prompt already names it; encode_prompt drops such tags)."""
    tags = [f"<lora:{name}:{scale:g}>" for name, scale, _ in model.loras if f"<lora:{name}:" not in prompt]
    return " ".join([prompt] + tags) if tags else prompt


def network_fields(models: list) -> dict:
    """AUTOMATIC1111's `Lora hashes` and `TI hashes` infotext fields over the models' LoRAs and embeddings."""
    loras = {name: digest for m in models for name, _, digest in m.loras}
    embeddings = {token: digest for m in models for token, (_, _, digest) in m.embeddings.items()}
    fields = {}
    if loras:
        fields["Lora hashes"] = ", ".join(f"{k}: {v}" for k, v in loras.items())
    if embeddings:
        fields["TI hashes"] = ", ".join(f"{k}: {v}" for k, v in embeddings.items())
    return fields
