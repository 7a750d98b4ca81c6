"""`load()`: a Stable Diffusion 1.x checkpoint -> a ready `Model` (UNet, text encoder, VAE decoder, tokenizer).

An LDM single file (`.safetensors`, or a `.ckpt` read by the restricted unpickler in weights_io.py) is split by
key prefix, and each part goes into its module with a strict `load_state_dict`: the modules' attribute names are
the checkpoint's keys, so there is no renaming table. A diffusers folder is first mapped to the same flat layout
(diffusers_folder.py). Modules are built on the `meta` device and take the loaded tensors with `assign=True`, so a
checkpoint's weights are held in memory once.

Keys deliberately ignored: the VAE encoder and `quant_conv` (sampling never encodes an image), the DDPM schedule
buffers LDM stores beside the model (the schedule is recomputed in ddim.py), `model_ema.*` unless `ema=True`, and
the text encoder's `position_ids`, which some merged files store corrupted (it is always 0..76 and rebuilt).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .clip import CLIPTextConfig, CLIPTextModel
from .diffusers_folder import find_tokenizer_dir, read_diffusers_folder
from .errors import InputError
from .pipeline import Model
from .tokenizer import TOKENIZER_HINT, CLIPTokenizer
from .unet import UNetConfig, UNetModel
from .vae import VAEConfig, VAEDecoder
from .weights_io import read_tensors

UNET, CLIP, VAE, EMA = "model.diffusion_model.", "cond_stage_model.transformer.", "first_stage_model.", "model_ema."
SCHEDULE_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "logvar"}
VAE_UNUSED = (VAE + "encoder.", VAE + "quant_conv.")
DEFAULT_TOKENIZER = Path("weights") / "tokenizer"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def ignored(key: str, ema: bool) -> bool:
    return (key in SCHEDULE_BUFFERS or key.startswith(VAE_UNUSED) or key.endswith("embeddings.position_ids")
            or (key.startswith(EMA) and not ema) or (key.startswith(UNET) and ema))


def detect_family(keys: set, name: str) -> None:
    """Refuse what is not SD 1.x by name, before any shape is checked."""
    def has(prefix):
        return any(k.startswith(prefix) for k in keys)
    if has("conditioner.embedders."):
        raise InputError(f"{name}: this is an SDXL checkpoint; magicfusion runs Stable Diffusion 1.x models only")
    if has("cond_stage_model.model."):
        raise InputError(f"{name}: this is a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder); "
                         "magicfusion runs Stable Diffusion 1.x models only")
    if UNET + "input_blocks.0.0.weight" not in keys:
        found = ", ".join(sorted(keys)[:3]) or "no tensors"
        raise InputError(f"{name}: not a Stable Diffusion 1.x checkpoint (no {UNET}input_blocks.0.0.weight; found "
                         f"{found}); pass an SD 1.4/1.5-family .safetensors/.ckpt file or a diffusers folder")


def split(sd: dict, ema: bool, name: str, all_keys: list) -> tuple[dict, dict, dict]:
    """Flat checkpoint -> (unet, text encoder, vae) state dicts with the prefixes stripped.

    all_keys: every key in the file, also those not read (with `ema`, the non-EMA UNet's names give the
    EMA copy's: LitEma stores `model.diffusion_model.a.b` as `model_ema.diffusion_modelab`).
    """
    unet, clip, vae, unknown = {}, {}, {}, []
    if ema:
        if not any(k.startswith(EMA) for k in sd):
            raise InputError(f"{name}: the file has no EMA weights (model_ema.*); drop --ema / ema=True")
        ema_names = {k[len("model."):].replace(".", ""): k[len(UNET):] for k in all_keys if k.startswith(UNET)}
    for key in list(sd):
        tensor = sd.pop(key)  # popping keeps one reference per tensor: nothing is held twice
        if ignored(key, ema):
            continue
        if key.startswith(UNET):
            unet[key[len(UNET):]] = tensor
        elif key.startswith(CLIP):
            k = key[len(CLIP):]
            clip[k if k.startswith("text_model.") else "text_model." + k] = tensor  # older files lack the level
        elif key.startswith(VAE):
            vae[key[len(VAE):]] = tensor
        elif ema and key.startswith(EMA):
            if key[len(EMA):] in ema_names:
                unet[ema_names[key[len(EMA):]]] = tensor
            elif key not in (EMA + "decay", EMA + "num_updates"):
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise InputError(f"{name}: unexpected keys {', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''} "
                         f"({len(unknown)} in all); is this a Stable Diffusion 1.x checkpoint?")
    return unet, clip, vae


def build(cls, cfg_cls, sd: dict, part: str, name: str, device, dtype):
    """Infer the config from shapes, build on `meta`, check keys and shapes by name, then move the tensors in."""
    try:
        cfg = cfg_cls.from_state_dict(sd)
    except (KeyError, StopIteration, ValueError, IndexError, ZeroDivisionError) as e:
        raise InputError(f"{name}: the {part} weights are incomplete or malformed ({type(e).__name__}: {e}); "
                         "the file may be damaged or not SD 1.x") from None
    with torch.device("meta"):
        module = cls(cfg)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in sd and sd[k].shape != v.shape]
    not_float = [f"{k} ({sd[k].dtype})" for k in expected if k in sd and not sd[k].is_floating_point()]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", wrong),
                         ("non-floating-point", not_float)):
        if items:
            raise InputError(f"{name}: {part} has {len(items)} {label} keys: {', '.join(items[:3])}"
                             f"{' ...' if len(items) > 3 else ''}; the file is damaged or not SD 1.x")
    for k in list(sd):
        sd[k] = sd[k].to(device=device, dtype=dtype)
    module.load_state_dict(sd, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def resolve_tokenizer(path: Path, tokenizer) -> CLIPTokenizer:
    """The tokenizer for a model at `path`: the one given, a diffusers folder's own, $MAGICFUSION_TOKENIZER,
    then weights/tokenizer/ (beside the working directory, then beside this package)."""
    if isinstance(tokenizer, CLIPTokenizer):
        return tokenizer
    env = os.environ.get("MAGICFUSION_TOKENIZER")
    for given, origin in ((tokenizer, "tokenizer"), (env, "$MAGICFUSION_TOKENIZER")):
        if given:
            if not Path(given).is_dir():
                raise InputError(f"{origin} {given} is not a folder; {TOKENIZER_HINT}")
            return CLIPTokenizer.from_dir(given)
    own = find_tokenizer_dir(path) if path.is_dir() else None
    for c in (own, DEFAULT_TOKENIZER, Path(__file__).resolve().parent.parent / DEFAULT_TOKENIZER):
        if c and Path(c).is_dir():
            return CLIPTokenizer.from_dir(c)
    raise InputError(f"no tokenizer found for {path.name} (tried --tokenizer, $MAGICFUSION_TOKENIZER and "
                     f"weights/tokenizer/); {TOKENIZER_HINT}")


def load(path, tokenizer=None, device="cpu", dtype=torch.float32, ema: bool = False) -> Model:
    """Load an SD 1.x model: an LDM `.safetensors`/`.ckpt` file or a diffusers folder.

    tokenizer: a folder with CLIP's vocab.json + merges.txt (or tokenizer.json), or a CLIPTokenizer. A diffusers
    folder brings its own; otherwise `$MAGICFUSION_TOKENIZER`, then `weights/tokenizer/`, are tried.
    """
    path = Path(path)
    device = torch.device(device)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InputError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
        dtype = DTYPES[dtype]
    if not path.exists():
        raise InputError(f"{path}: no such file or folder; pass an SD 1.x .safetensors/.ckpt file or a diffusers folder")
    tok = resolve_tokenizer(path, tokenizer)
    if path.is_dir():
        sd = read_diffusers_folder(path)
        all_keys = list(sd)
    else:
        all_keys = []
        sd = read_tensors(path, keep=lambda k: all_keys.append(k) or not ignored(k, ema))
    detect_family(set(all_keys), path.name)
    unet_sd, clip_sd, vae_sd = split(sd, ema, path.name, all_keys)
    if any(k.endswith("attn2.to_k.weight") and v.shape[1] == 1024 for k, v in unet_sd.items()):
        raise InputError(f"{path.name}: the UNet attends to 1024-wide text, a Stable Diffusion 2.x model; "
                         "magicfusion runs Stable Diffusion 1.x models only")
    unet = build(UNetModel, UNetConfig, unet_sd, "the UNet", path.name, device, dtype)
    if unet.cfg.in_channels != 4:
        raise InputError(f"{path.name}: the UNet takes {unet.cfg.in_channels} input channels (9 is an inpainting "
                         "model); magicfusion runs text-to-image SD 1.x models (4 channels)")
    text = build(CLIPTextModel, CLIPTextConfig, clip_sd, "the text encoder", path.name, device, dtype)
    vae = build(VAEDecoder, VAEConfig, vae_sd, "the VAE decoder", path.name, device, dtype)
    if vae.cfg.factor != 8:
        raise InputError(f"{path.name}: the VAE upsamples latents {vae.cfg.factor}x, not SD 1.x's 8x; "
                         "use a Stable Diffusion 1.x checkpoint")
    if text.cfg.width != unet.cfg.context_dim:
        raise InputError(f"{path.name}: text encoder width {text.cfg.width} does not match the UNet's context "
                         f"width {unet.cfg.context_dim}; the file mixes parts of different models")
    if tok.vocab_size > text.cfg.vocab_size:
        raise InputError(f"the tokenizer has {tok.vocab_size} tokens but {path.name}'s text encoder only "
                         f"{text.cfg.vocab_size}; use the tokenizer that belongs to this model")
    return Model(unet, text, vae, tok, path.stem if path.is_file() else path.name)
