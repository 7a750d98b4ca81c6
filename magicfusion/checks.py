"""Argument checks shared by the Python API and the command line: a wrong type or an impossible value is an
`InputError` that names the argument (`guidance`, or `--guidance` on the command line), never a TypeError from
deep inside torch or a run that overflows to NaN and then blames the weights.

`check_generate(locals())` and `check_fuse(locals())` are the first line of `generate` and `fuse`; `check_options`
is what the CLI calls before it loads anything; `device_arg` and `dtype_arg` turn the user's words into torch's.
"""
from __future__ import annotations

import math
import numbers
import os

import torch

from .errors import InputError
from .limits import MAX_BATCH, MAX_EXPERTS, MAX_GUIDANCE, MAX_K, MAX_SIDE, check_memory
from .tokenizer import check_text

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_PROMPT = 100_000  # characters; only the first 75 tokens are used, so longer text is a mistake
TRAIN_STEPS = 1000


def flag(name: str, cli: bool) -> str:
    """How the user spelled argument `name`: `--fuse-from` on the command line, `fuse_from` in Python."""
    return "--" + name.replace("_", "-") if cli else name


def integer(value, name: str, lo: int, hi: int, cli: bool = False, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{flag(name, cli)} must be an integer, got {type(value).__name__} {str(value)[:40]!r}")
    if not lo <= value <= hi:
        raise InputError(f"{flag(name, cli)} must be an integer in {lo}..{hi}, got {value}{hint}")
    return value


def real(value, name: str, lo: float, hi: float, cli: bool = False, hint: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{flag(name, cli)} must be a number, got {type(value).__name__} {str(value)[:40]!r}")
    if not math.isfinite(value):
        raise InputError(f"{flag(name, cli)} must be a finite number, got {value}{hint}")
    if not lo <= value <= hi:
        raise InputError(f"{flag(name, cli)} {value:g} is out of range: it must be >= {lo:g} and <= {hi:g}{hint}")
    return float(value)


def text(value, name: str, cli: bool = False) -> str:
    check_text(value, flag(name, cli))
    if len(value) > MAX_PROMPT:
        raise InputError(f"{flag(name, cli)} is {len(value)} characters long; only its first 75 tokens are used, "
                         f"so keep it under {MAX_PROMPT}")
    return value


def check_options(cli: bool = False, steps=50, guidance=7.5, eta=0.0, seed=0, height=512, width=512, batch=1,
                  clip_skip=0, kg=1.0, ke=(1.0,), fuse_from=1000, fuse_until=-1) -> None:
    """Every sampling option's type and range, before anything is loaded or allocated."""
    integer(steps, "steps", 1, TRAIN_STEPS, cli, "; 50 is typical")
    real(guidance, "guidance", -MAX_GUIDANCE, MAX_GUIDANCE, cli,
         "; a guidance scale that large makes the guided noise overflow to inf/NaN (7.5 is typical)")
    real(eta, "eta", 0.0, 1.0, cli, "; DDIM's eta runs from 0 (deterministic) to 1 (DDPM-like), "
         "beyond 1 its noise exceeds the step's variance (Song et al. 2021, eq. 16)")
    if not (isinstance(seed, int) and not isinstance(seed, bool) and (seed == -1 or 0 <= seed < 2 ** 64)):
        raise InputError(f"{flag('seed', cli)} must be an integer in 0..2**64-1, or -1 for a random one; got "
                         f"{str(seed)[:40]}")
    for name, v in (("height", height), ("width", width)):
        integer(v, name, -2 ** 63, 2 ** 63, cli)
        if v <= 0 or v % 8:
            raise InputError(f"{flag(name, cli)} must be a positive multiple of 8, got {v}; use e.g. 512")
        integer(v, name, 8, MAX_SIDE, cli, f"; SD 1.x works at 512, and {MAX_SIDE} is the most this runs")
    integer(batch, "batch", 1, MAX_BATCH, cli, f" (batch must be >= 1, and at most {MAX_BATCH} images per run)")
    integer(clip_skip, "clip_skip", 0, 1000, cli, " (clip skip counts text encoder layers; 0 uses the last)")
    real(kg, "kg", -MAX_K, MAX_K, cli, "; 1.0 is the default")
    for k in ke if isinstance(ke, (list, tuple)) else [ke]:
        real(k, "ke", -MAX_K, MAX_K, cli, "; 1.0 is the default")
    integer(fuse_from, "fuse_from", -1, TRAIN_STEPS, cli, " (timesteps run 999..0)")
    integer(fuse_until, "fuse_until", -1, TRAIN_STEPS, cli, " (timesteps run 999..0)")


def check_expert_count(n: int, cli: bool = False) -> None:
    if n > MAX_EXPERTS:
        raise InputError(f"{n} experts given; at most {MAX_EXPERTS} models can be fused at once "
                         f"({'--expert' if cli else 'expert'})")


def device_arg(value, name: str = "device", cli: bool = False) -> torch.device:
    """'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device -> a device this PyTorch can use."""
    use_cpu = f"{flag(name, cli)} cpu" if cli else f"{name}='cpu'"
    if isinstance(value, str) and value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(value, (str, torch.device)):
        raise InputError(f"{flag(name, cli)} must be 'cpu', 'cuda' or 'cuda:N', got {type(value).__name__}")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise InputError(f"unknown {flag(name, cli)} {str(value)[:40]!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported {flag(name, cli)} {str(value)!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{flag(name, cli)} {value}: no CUDA GPU is available to this PyTorch; use {use_cpu}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"{flag(name, cli)} {value}: this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s), numbered from 0")
    return device


def dtype_arg(value, device: torch.device, name: str = "dtype", cli: bool = False) -> torch.dtype:
    """'auto' (float16 on CUDA, float32 on CPU), a name in DTYPES or one of their torch dtypes."""
    if isinstance(value, str) and value == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(value, str) and value in DTYPES:
        return DTYPES[value]
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    raise InputError(f"unknown {flag(name, cli)} {str(value)[:40]!r}; use auto, float32, float16 or bfloat16")


def model_arg(value, name: str):
    """A loaded Model; a path (the usual slip) gets told how to load it."""
    from . import Model  # the package's public class, wherever it lives; late, since the package imports us
    if isinstance(value, Model):
        return value
    if isinstance(value, (str, bytes, os.PathLike)):
        raise InputError(f"{name} must be a loaded model, got the path {str(value)[:80]!r}; load it first: "
                         f"magicfusion.load(path, tokenizer=...)")
    raise InputError(f"{name} must be a magicfusion.Model (from magicfusion.load), got {type(value).__name__}")


def check_models(models: list, names: list) -> None:
    """Each model's tokenizer fits its own text encoder, and all live on one device."""
    for m, name in zip(models, names):
        table = m.text_encoder.cfg.vocab_size
        largest = getattr(m.tokenizer, "max_id", None)
        if largest is not None and largest >= table:
            raise InputError(f"{name}'s tokenizer produces ids up to {largest} but its text encoder has only "
                             f"{table} embeddings; use the tokenizer that belongs to this model")


def _common(args: dict, models: list, names: list) -> None:
    for name in ("prompt", "negative_prompt"):
        if name in args:
            text(args[name], name)
    opts = {k: args[k] for k in ("steps", "guidance", "eta", "seed", "height", "width", "batch", "clip_skip", "kg",
                                 "ke", "fuse_from", "fuse_until") if k in args}
    check_options(False, **opts)
    if args.get("graph") is not None and not isinstance(args["graph"], bool):
        raise InputError(f"graph must be True, False or None, got {type(args['graph']).__name__}")
    for name in ("progress", "karras", "blur"):
        if name in args and not isinstance(args[name], bool):
            raise InputError(f"{name} must be True or False, got {type(args[name]).__name__}")
    check_models(models, names)
    devices = {m.unet.out[2].weight.device for m in models}
    if len(devices) == 1:
        device = devices.pop()
        graph = args.get("graph")
        concurrent = len(models) > 1 and (graph if graph is not None else device.type == "cuda")
        noisy = args.get("eta", 0.0) > 0 or args.get("sampler", "ddim") != "ddim"  # counted high, never low
        check_memory(models, args.get("height", 512), args.get("width", 512), args.get("batch", 1),
                     args.get("steps", 50), noisy, concurrent)


def check_generate(args: dict) -> None:
    """The arguments of `generate` (its `locals()` on entry)."""
    model = model_arg(args.get("model"), "model")
    _common(args, [model], ["model"])


def check_fuse(args: dict) -> None:
    """The arguments of `fuse` (its `locals()` on entry)."""
    general = model_arg(args.get("general"), "general")
    expert = args.get("expert")
    experts = list(expert) if isinstance(expert, (list, tuple)) else [expert]
    check_expert_count(len(experts))
    experts = [model_arg(e, "expert" if len(experts) == 1 else f"expert[{i}]") for i, e in enumerate(experts)]
    eprompt = args.get("expert_prompt")
    for i, p in enumerate(eprompt if isinstance(eprompt, (list, tuple)) else [] if eprompt is None else [eprompt]):
        text(p, "expert_prompt" if not isinstance(eprompt, (list, tuple)) else f"expert_prompt[{i}]")
    _common(args, [general] + experts, ["general"] + [f"expert {i + 1}" for i in range(len(experts))])
