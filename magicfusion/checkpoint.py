"""`load()`: a Stable Diffusion 1.x checkpoint -> a ready `Model` (UNet, text encoder, VAE decoder, tokenizer).

An LDM single file (`.safetensors`, or a `.ckpt` read by the restricted unpickler in weights_io.py) is split by
key prefix, and each part goes into its module with a strict `load_state_dict`: the modules' attribute names are
the checkpoint's keys, so there is no renaming table. A diffusers folder is first mapped to the same flat layout
(diffusers_folder.py). Modules are built on the `meta` device and take the loaded tensors with `assign=True`, so a
checkpoint's weights are held in memory once. Before anything is built, the configuration read off the shapes is
checked against everything the modules assume (`unet_problem`, `text_problem`, `vae_problem`), so a file that
loads also runs.

Keys deliberately ignored: the VAE encoder and `quant_conv` (sampling never encodes an image), the DDPM schedule
buffers LDM stores beside the model (the schedule is recomputed in schedule.py), `model_ema.*` unless `ema=True`, and
the text encoder's `position_ids`, which some merged files store corrupted (it is always 0..76 and rebuilt).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from .checks import DTYPES, device_arg, dtype_arg  # noqa: F401 (DTYPES: also imported from here)
from .clip import CLIPTextConfig, CLIPTextModel
from .diffusers_folder import find_tokenizer_dir, read_diffusers_folder
from .errors import InputError
from .layout import default_channels_last, set_channels_last
from .lora import apply_loras
from .model import Model
from .paths import as_path, kind, shown
from .prompt import add_embeddings
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
MAX_WIDTH = 8192       # channels or features of any layer (SD 1.x: at most 1280)
MAX_VOCAB = 2 ** 22    # rows of the token table (CLIP: 49,408)
MAX_POSITIONS = 4096   # rows of the position table (CLIP: 77)
MAX_LAYERS = 128


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


def latent_scale(value, name: str) -> float | None:
    """The VAE latent scale factor a file stores (LDM's `scale_factor` buffer, written when the scale was computed
    from data as 1/std of the latents; a diffusers folder's `scaling_factor`), or None for SD 1.x's 0.18215."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
        raise InputError(f"{name}: scale_factor must be one floating-point number; the file is damaged")
    scale = float(value.reshape(()))
    if not (1e-4 <= scale <= 1e4):  # also refuses NaN and inf
        raise InputError(f"{name}: latent scale_factor {scale} is not a usable number (SD 1.x uses 0.18215); "
                         "the file is damaged")
    return scale


def split(sd: dict, ema: bool, name: str, all_keys: list) -> tuple[dict, dict, dict]:
    """Flat checkpoint -> (unet, text encoder, vae) state dicts with the prefixes stripped.

    all_keys: every key in the file, also those not read (with `ema`, the non-EMA UNet's names give the
    EMA copy's: LitEma stores `model.diffusion_model.a.b` as `model_ema.diffusion_modelab`).
    """
    unet, clip, vae, unknown = {}, {}, {}, []
    if ema:
        ema_names = {k[len("model."):].replace(".", ""): k[len(UNET):] for k in all_keys if k.startswith(UNET)}
        if not any(k.startswith(EMA) and k[len(EMA):] in ema_names for k in sd):
            found = "no model_ema.* tensors" if not any(k.startswith(EMA) for k in all_keys) else \
                "model_ema.* holds only its counters, no UNet weights"
            raise InputError(f"{name}: the file has no EMA UNet weights ({found}); drop --ema / ema=True to use "
                             "its UNet weights")
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


def infer_config(cfg_cls, sd: dict, part: str, name: str):
    """The part's config read off its tensor shapes, checked against everything its modules assume."""
    try:
        cfg = cfg_cls.from_state_dict(sd)
    except (KeyError, StopIteration, ValueError, IndexError, ZeroDivisionError, AttributeError, TypeError) as e:
        raise InputError(f"{name}: {part} weights are incomplete or malformed ({type(e).__name__}: "
                         f"{str(e)[:120]}); the file may be damaged or not SD 1.x") from None
    problem = CONFIG_PROBLEMS[cfg_cls](cfg)
    if problem:
        raise InputError(f"{name}: {part} {problem}; the file is damaged or not a Stable Diffusion 1.x model")
    return cfg


def _width_problem(what: str, width: int, lo: int = 32, group: int = 32) -> str | None:
    if not lo <= width <= MAX_WIDTH or width % group:
        return (f"has {what} {width}, but it must be a multiple of {group} (GroupNorm's groups, attention heads) "
                f"in {lo}..{MAX_WIDTH}")
    return None


def unet_problem(c: UNetConfig) -> str | None:
    """What the UNet's modules cannot run with: GroupNorm(32) on every width, 8 heads, 4 latent channels."""
    if problem := _width_problem("model_channels", c.model_channels):
        return problem
    if c.in_channels != 4:
        return (f"takes {c.in_channels} input channels (9 is an inpainting model) but magicfusion runs "
                "text-to-image SD 1.x models (4 channels)")
    if c.out_channels != c.in_channels:
        return f"predicts {c.out_channels} channels of noise for {c.in_channels} latent channels"
    if not 1 <= len(c.channel_mult) <= 8 or not all(isinstance(m, int) and m >= 1 for m in c.channel_mult):
        return f"has levels of widths {c.channel_mult} x {c.model_channels}, not 1 to 8 levels of whole multiples"
    for i, m in enumerate(c.channel_mult):
        if problem := _width_problem(f"level {i} width", c.model_channels * m):
            return problem
    if not 1 <= c.num_res_blocks <= 16 or not 1 <= c.transformer_depth <= 64:
        return f"has {c.num_res_blocks} ResBlocks per level and transformer depth {c.transformer_depth}"
    if not 1 <= c.context_dim <= MAX_WIDTH:
        return f"attends to text {c.context_dim} wide"
    return None


def text_problem(c: CLIPTextConfig) -> str | None:
    """What the text encoder cannot run with: 77 positions, 64-wide heads (so at least one), a token table."""
    if c.max_positions < 77 or c.max_positions > MAX_POSITIONS:
        return (f"has {c.max_positions} position embeddings, but a prompt is 77 tokens (at most {MAX_POSITIONS} "
                "are accepted)")
    if not c.head_dim <= c.width <= MAX_WIDTH or c.width % c.head_dim:
        return (f"is {c.width} wide, but its attention uses {c.head_dim}-wide heads, so the width must be a "
                f"multiple of {c.head_dim} in {c.head_dim}..{MAX_WIDTH}")
    if not 1 <= c.layers <= MAX_LAYERS:
        return f"has {c.layers} layers (1..{MAX_LAYERS} are accepted)"
    if not 1 <= c.vocab_size <= MAX_VOCAB:
        return f"has {c.vocab_size} token embeddings (1..{MAX_VOCAB} are accepted)"
    return None


def vae_problem(c: VAEConfig) -> str | None:
    """What the VAE decoder cannot run with: 4 latent channels, 3 image channels, GroupNorm(32), 8x upsampling."""
    if c.z_channels != 4 or c.out_ch != 3:
        return f"maps {c.z_channels} latent channels to {c.out_ch} image channels, not SD 1.x's 4 to 3"
    if c.factor != 8:
        return (f"upsamples latents {c.factor}x, not SD 1.x's 8x (it has {len(c.ch_mult)} levels, SD 1.x 4); "
                "use a Stable Diffusion 1.x checkpoint")
    if problem := _width_problem("width", c.ch):
        return problem
    if not all(isinstance(m, int) and m >= 1 for m in c.ch_mult):
        return f"has level widths {c.ch_mult} x {c.ch}, not whole multiples"
    for i, m in enumerate(c.ch_mult):
        if problem := _width_problem(f"level {i} width", c.ch * m):
            return problem
    if not 0 <= c.num_res_blocks <= 16:
        return f"has {c.num_res_blocks + 1} ResnetBlocks per level"
    return None


CONFIG_PROBLEMS = {UNetConfig: unet_problem, CLIPTextConfig: text_problem, VAEConfig: vae_problem}


def check_parts(unet_sd: dict, clip_sd: dict, vae_sd: dict, name: str) -> None:
    """Infer and check all three configs, and that they fit together, before any module is built."""
    unet = infer_config(UNetConfig, unet_sd, "the UNet", name)
    text = infer_config(CLIPTextConfig, clip_sd, "the text encoder", name)
    infer_config(VAEConfig, vae_sd, "the VAE decoder", name)
    if text.width != unet.context_dim:
        raise InputError(f"{name}: text encoder width {text.width} does not match the UNet's context "
                         f"width {unet.context_dim}; the file mixes parts of different models")


class SkipInit(torch.overrides.TorchFunctionMode):
    """Inside it, the initialisers of `torch.nn.init` do nothing. Modules are built on `meta`, where a tensor holds
    no values to fill, and the checkpoint's tensors replace them; `normal_` on a meta tensor (nn.Embedding's
    initialiser) would also import torch._dynamo, which takes 1.5-2 s the first time in a process."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def build(cls, cfg_cls, sd: dict, part: str, name: str, device, dtype):
    """Infer the config from shapes, build on `meta`, check keys and shapes by name, then move the tensors in."""
    cfg = infer_config(cfg_cls, sd, part, name)
    with torch.device("meta"), SkipInit():
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
    if tokenizer is not None:
        tokenizer = as_path(tokenizer, "tokenizer")
    env = os.environ.get("MAGICFUSION_TOKENIZER")
    for given, origin in ((tokenizer, "tokenizer"), (env, "$MAGICFUSION_TOKENIZER")):
        if given:
            if kind(given, origin) != "dir":
                raise InputError(f"{origin} {shown(given)} is not a folder; {TOKENIZER_HINT}")
            return CLIPTokenizer.from_dir(given)
    own = find_tokenizer_dir(path) if kind(path, "model") == "dir" else None
    for c in (own, DEFAULT_TOKENIZER, Path(__file__).resolve().parent.parent / DEFAULT_TOKENIZER):
        if c and kind(c, "tokenizer folder") == "dir":
            return CLIPTokenizer.from_dir(c)
    raise InputError(f"no tokenizer found for {path.name} (tried --tokenizer, $MAGICFUSION_TOKENIZER and "
                     f"weights/tokenizer/); {TOKENIZER_HINT}")


def load(path, tokenizer=None, device="cpu", dtype=torch.float32, ema: bool = False,
         channels_last: bool | None = None, lora=(), embeddings=()) -> Model:
    """Load an SD 1.x model: an LDM `.safetensors`/`.ckpt` file or a diffusers folder.

    tokenizer: a folder with CLIP's vocab.json + merges.txt (or tokenizer.json), or a CLIPTokenizer. A diffusers
    folder brings its own; otherwise `$MAGICFUSION_TOKENIZER`, then `weights/tokenizer/`, are tried.
    channels_last: the UNet's and VAE's weights in the channels_last memory format (None: on CUDA only; layout.py).
    lora: [(file, scale), ...] (or files, scale 1) merged into the weights in order (lora.py); embeddings:
    textual-inversion files (or (file, token) pairs) whose tokens the prompts may use (prompt.py).
    """
    path = as_path(path, "path")
    device = device_arg(device)
    dtype = dtype_arg(dtype, device)
    if not isinstance(ema, bool):
        raise InputError(f"ema must be True or False, got {type(ema).__name__}")
    if tokenizer is not None and not isinstance(tokenizer, (CLIPTokenizer, str, os.PathLike)):
        raise InputError(f"tokenizer must be a folder path or a CLIPTokenizer, got {type(tokenizer).__name__}")
    found = kind(path, "model")
    if found == "missing":
        raise InputError(f"{shown(path)}: no such file or folder; pass an SD 1.x .safetensors/.ckpt file or a "
                         "diffusers folder")
    tok = resolve_tokenizer(path, tokenizer)
    if found == "dir":
        sd = read_diffusers_folder(path)
        all_keys = list(sd)
    else:
        all_keys = []
        sd = read_tensors(path, keep=lambda k: all_keys.append(k) or not ignored(k, ema))
    detect_family(set(all_keys), path.name)
    scale = latent_scale(sd.pop("scale_factor", None), path.name)
    unet_sd, clip_sd, vae_sd = split(sd, ema, path.name, all_keys)
    if any(k.endswith("attn2.to_k.weight") and v.ndim == 2 and v.shape[1] == 1024 for k, v in unet_sd.items()):
        raise InputError(f"{path.name}: the UNet attends to 1024-wide text, a Stable Diffusion 2.x model; "
                         "magicfusion runs Stable Diffusion 1.x models only")
    check_parts(unet_sd, clip_sd, vae_sd, path.name)  # every shape the modules assume, before anything is built
    loras = apply_loras(lora, unet_sd, clip_sd, path.name, dtype)  # W += scale * up @ down, before building
    tokens = add_embeddings(embeddings, clip_sd, path.name)  # extra rows of the token table
    unet = build(UNetModel, UNetConfig, unet_sd, "the UNet", path.name, device, dtype)
    text = build(CLIPTextModel, CLIPTextConfig, clip_sd, "the text encoder", path.name, device, dtype)
    vae = build(VAEDecoder, VAEConfig, vae_sd, "the VAE decoder", path.name, device, dtype)
    if scale is not None:
        vae.cfg = dataclasses.replace(vae.cfg, scale_factor=scale)
    if tok.max_id >= text.cfg.vocab_size:
        raise InputError(f"the tokenizer has ids up to {tok.max_id} but {shown(path.name)}'s text encoder has only "
                         f"{text.cfg.vocab_size} token embeddings; use the tokenizer that belongs to this model")
    set_channels_last([unet, vae], default_channels_last(device) if channels_last is None else channels_last)
    return Model(unet, text, vae, tok, path.stem if path.is_file() else path.name, loras=loras, embeddings=tokens)
