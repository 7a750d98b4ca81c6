"""The `magicfusion` command: `generate` (one model), `fuse` (MagicFusion), `demo` (offline, built-in weights).

Bad input ends with one line on stderr (`magicfusion: error: ...`) and exit status 2, before anything is
written. Every file is written under a temporary name and renamed into place, and existing files are kept
unless --overwrite is given. PNGs carry their settings in a `parameters` text chunk, AUTOMATIC1111-style.
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoint import load
from . import demo
from .checks import check_expert_count, check_options, device_arg, dtype_arg, text
from .errors import InputError
from .lora import network_fields, parse_spec, tagged
from .outputs import (Terminated, check_folder, check_writable, make_folder, raise_terminated, remove_folders,
                      save_all)
from .paths import check_length
from .pipeline import fuse, generate, per_expert, validate
from .samplers import SAMPLERS


class ExpertLora(argparse.Action):
    """`--expert-lora` belongs to the `--expert` given before it: stored as (expert index, FILE[:SCALE])."""
    def __call__(self, parser, namespace, value, option_string=None):
        index = max(len(getattr(namespace, "expert", None) or []) - 1, 0)
        setattr(namespace, self.dest, (getattr(namespace, self.dest) or []) + [(index, value)])


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise InputError(f"{message}; see `{self.prog} --help`")


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", help="folder with CLIP's vocab.json + merges.txt (default: $MAGICFUSION_TOKENIZER, "
                   "then weights/tokenizer/; a diffusers folder brings its own)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like")
    p.add_argument("--sampler", choices=tuple(SAMPLERS), default="ddim",
                   help="ddim (the paper's), dpmpp-2m (DPM++ 2M: use 20-25 steps), euler, euler-a (ancestral)")
    p.add_argument("--karras", action="store_true", help="Karras sigmas (rho 7), for dpmpp-2m and euler")
    p.add_argument("--seed", type=int, default=0, help="0..2**64-1, or -1 for a random seed (reported)")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--clip-skip", type=int, default=0, help="stop the text encoder N layers early (A1111's "
                   "'Clip skip 2' is 1)")
    p.add_argument("--ema", action="store_true", help="use the EMA UNet weights of a full-EMA .ckpt")
    p.add_argument("--embedding", action="append", metavar="FILE", help="a textual-inversion embedding (A1111 .pt/"
                   ".safetensors or diffusers learned_embeds); its token is the file name; repeatable")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (float16 on CUDA, float32 on CPU), float32, float16, bfloat16")
    p.add_argument("--graph", action=argparse.BooleanOptionalAction, default=None,
                   help="capture the sampling step as one CUDA graph (default: on with CUDA)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="UNet and VAE weights in the channels_last memory format (default: on with CUDA)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages")


def build_parser() -> Parser:
    parser = Parser(prog="magicfusion", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    g = sub.add_parser("generate", help="text to image with one SD 1.x model")
    g.add_argument("--model", required=True, help="SD 1.x .safetensors/.ckpt file or diffusers folder")
    g.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="a LoRA merged into the model (scale 1 "
                   "by default); repeatable")
    add_common(g)
    g.add_argument("--out", required=True, help="output PNG (with --batch > 1: NAME-0.png, NAME-1.png, ...)")
    f = sub.add_parser("fuse", help="MagicFusion: blend a general and an expert model by saliency")
    f.add_argument("--general", required=True, help="the general model (file or diffusers folder)")
    f.add_argument("--expert", required=True, action="append", help="an expert model; repeat for several")
    f.add_argument("--general-lora", action="append", metavar="FILE[:SCALE]", help="a LoRA for the general model")
    f.add_argument("--expert-lora", action=ExpertLora, metavar="FILE[:SCALE]", help="a LoRA for the expert given "
                   "before it (the first if none is); repeatable")
    add_common(f)
    f.add_argument("--expert-prompt", action="append", help="the expert's prompt (default: --prompt); one per expert")
    f.add_argument("--kg", type=float, default=1.0, help="softmax scale of the general model's saliency")
    f.add_argument("--ke", type=float, action="append", help="softmax scale of the expert's saliency (default 1.0)")
    f.add_argument("--no-blur", dest="blur", action="store_false", help="skip the 4x4 box blur of the saliency")
    f.add_argument("--fuse-from", type=int, default=1000, help="SNB at steps with fuse_until < t <= fuse_from")
    f.add_argument("--fuse-until", type=int, default=-1)
    f.add_argument("--outside", choices=("general", "expert"), default="general",
                   help="whose noise is used outside the fusion window")
    f.add_argument("--saliency-reference", choices=("general", "own"), default="general",
                   help="unconditional prediction the expert's response is measured against")
    f.add_argument("--blend", choices=("argmax", "average"), default="argmax")
    f.add_argument("--out", required=True, help="output folder: fused.png, general.png, expert.png (expert1.png, "
                   "... with several), and with --blend argmax masks.png")
    f.add_argument("--fused-only", action="store_true", help="skip the single-model comparison images")
    d = sub.add_parser("demo", help="fuse the two small trained toy-world models, offline, on the CPU")
    d.add_argument("--out", default=None, help="output folder (default: out/demo, replaced on each run)")
    d.add_argument("--weights", default=None, help="folder of the toy models (default: the repository's weights/toy)")
    d.add_argument("--overwrite", action="store_true")
    d.add_argument("--quiet", action="store_true")
    return parser


def pick_device(name: str) -> torch.device:
    return device_arg(name, "device", cli=True)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    return dtype_arg(name, device, "dtype", cli=True)


def check_cli(a) -> None:
    """Every option's type and range, and every path's length, before anything is loaded or allocated."""
    for name in ("prompt", "negative_prompt", "expert_prompt"):
        value = getattr(a, name, None)
        for v in value if isinstance(value, list) else [] if value is None else [value]:
            text(v, name, cli=True)
    check_options(True, a.steps, a.guidance, a.eta, a.seed, a.height, a.width, a.batch, a.clip_skip,
                  getattr(a, "kg", 1.0), getattr(a, "ke", None) or [1.0], getattr(a, "fuse_from", 1000),
                  getattr(a, "fuse_until", -1))
    check_expert_count(len(getattr(a, "expert", None) or []), cli=True)
    for name in ("model", "general", "expert", "tokenizer", "out"):
        value = getattr(a, name, None)
        for v in value if isinstance(value, list) else [] if value is None else [value]:
            check_length(v, "--" + name)


def quote(value) -> str:
    """A1111 quotes values that would break its `key: value, ...` line."""
    s = str(value)
    return json.dumps(s) if any(ch in s for ch in ',:"\n') else s


def parameters(prompt: str, negative: str, a, seed: int, model: str, extra: dict = None) -> str:
    sampler = SAMPLERS[a.sampler].name + (" Karras" if a.karras else "")  # A1111's names: "DPM++ 2M Karras"
    fields = {"Steps": a.steps, "Sampler": sampler, "CFG scale": a.guidance, "Seed": seed,
              "Size": f"{a.width}x{a.height}", "Model": model}
    if a.eta:
        fields["Eta"] = a.eta
    if a.clip_skip:
        fields["Clip skip"] = a.clip_skip + 1  # A1111 counts the last layer as 1
    fields.update(extra or {})
    line = ", ".join(f"{k}: {quote(v)}" for k, v in fields.items())
    return f"{prompt}\nNegative prompt: {negative}\n{line}"


def numbered(path: Path, n: int) -> list:
    return [path] if n == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def mask_grid(masks: list, n_models: int, scale: int = 4) -> Image.Image:
    """One tile per step (row by row), each the (B, h, w) winner map with the batch side by side: white where the
    general model's noise was used, black where the first expert's, grays (darkest first) for further experts."""
    steps = len(masks)
    b, h, w = masks[0].shape
    cols = math.ceil(math.sqrt(steps))
    rows = math.ceil(steps / cols)
    tile_w, tile_h = b * (w * scale + 1), h * scale + 1
    canvas = np.zeros((rows * tile_h + 1, cols * tile_w + 1, 3), dtype=np.uint8)
    canvas[:] = (70, 110, 200)  # blue grid lines and margins, unlike any model's shade
    shades = np.array([255] + [int(180 * i / max(n_models - 2, 1)) for i in range(n_models - 1)], dtype=np.uint8)
    for i, m in enumerate(masks):
        shade = shades[m.numpy().astype(np.int64)].repeat(scale, axis=1).repeat(scale, axis=2)
        r, c = divmod(i, cols)
        for j in range(b):
            y, x = r * tile_h + 1, c * tile_w + 1 + j * (w * scale + 1)
            canvas[y:y + h * scale, x:x + w * scale] = shade[j][..., None]
    return Image.fromarray(canvas)


def load_models(a, paths: list, device, dtype, loras: list) -> list:
    """loras: per path its FILE[:SCALE] specs. Each model is read from disk once, its LoRAs merged as it loads."""
    return [load(p, tokenizer=a.tokenizer, device=device, dtype=dtype, ema=a.ema, lora=[parse_spec(x) for x in specs],
                 embeddings=a.embedding or [], channels_last=a.channels_last) for p, specs in zip(paths, loras)]


def say(a, message: str) -> None:
    if not a.quiet:
        print(message, file=sys.stderr)


def run_generate(a) -> None:
    check_cli(a)
    device = pick_device(a.device)
    dtype = pick_dtype(a.dtype, device)
    validate(a.sampler, a.karras, a.steps, a.eta, 0)  # the sampler's options, before loading anything
    out = Path(a.out)
    if out.suffix.lower() != ".png":
        raise InputError(f"--out {out}: the output must be a .png file")
    paths = numbered(out, a.batch)
    check_writable(paths, a.overwrite)
    (model,) = load_models(a, [a.model], device, dtype, [a.lora or []])
    images = generate(model, a.prompt, a.negative_prompt, a.steps, a.guidance, a.eta, a.seed, a.height,
                      a.width, a.batch, a.clip_skip, a.graph, not a.quiet, a.sampler, a.karras)
    seed = images.seed
    params = parameters(tagged(a.prompt, model), a.negative_prompt, a, seed, model.name, network_fields([model]))
    save_all([(p, im, params) for p, im in zip(paths, images)], a.overwrite)
    say(a, f"seed {seed}: wrote {', '.join(map(str, paths))}")


def run_fuse(a) -> None:
    check_cli(a)
    device = pick_device(a.device)
    dtype = pick_dtype(a.dtype, device)
    validate(a.sampler, a.karras, a.steps, a.eta, 0)  # the sampler's options, before loading anything
    n = len(a.expert)
    eprompts = per_expert(a.prompt if a.expert_prompt is None else a.expert_prompt, n, "--expert-prompt values")
    kes = per_expert(1.0 if a.ke is None else a.ke, n, "--ke values")
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; fuse writes a folder of images")
    names = ["fused"] + ([] if a.fused_only else ["general"] + (["expert"] if n == 1 else
                                                               [f"expert{i + 1}" for i in range(n)]))
    targets = {name: numbered(out / f"{name}.png", a.batch) for name in names}
    if a.blend == "argmax":
        targets["masks"] = [out / "masks.png"]
    paths = [p for ps in targets.values() for p in ps]
    if out.is_dir():
        check_writable(paths, a.overwrite)
    else:
        check_folder(out)  # made only when there is something to save
    loras = [a.general_lora or []] + [[x for i, x in a.expert_lora or [] if i == j] for j in range(n)]
    models = load_models(a, [a.general] + a.expert, device, dtype, loras)
    general, experts = models[0], models[1:]
    common = dict(negative_prompt=a.negative_prompt, steps=a.steps, guidance=a.guidance, eta=a.eta,
                  height=a.height, width=a.width, batch=a.batch, clip_skip=a.clip_skip, graph=a.graph,
                  progress=not a.quiet, sampler=a.sampler, karras=a.karras)
    result = fuse(general, experts, a.prompt, eprompts, seed=a.seed, kg=a.kg, ke=kes, blur=a.blur,
                  fuse_from=a.fuse_from, fuse_until=a.fuse_until, outside=a.outside,
                  saliency_reference=a.saliency_reference, blend=a.blend, **common)
    seed = result.seed
    fusion = {"Fusion": f"MagicFusion SNB ({a.blend})", "Experts": " | ".join(m.name for m in experts),
              "Expert prompts": " | ".join(tagged(p, m) for p, m in zip(eprompts, experts)), "kg": a.kg, "ke": " | ".join(map(str, kes)),
              "Blur": a.blur, "Fuse from": a.fuse_from, "Fuse until": a.fuse_until, "Outside": a.outside,
              "Saliency reference": a.saliency_reference}
    fused_params = parameters(tagged(a.prompt, general), a.negative_prompt, a, seed, general.name,
                              fusion | network_fields(models))
    items = [(p, im, fused_params) for p, im in zip(targets["fused"], result.fused)]
    if not a.fused_only:
        for name, model, prompt in zip(names[1:], models, [a.prompt] + eprompts):
            images = generate(model, prompt, seed=seed, **common)
            items += [(p, im, parameters(tagged(prompt, model), a.negative_prompt, a, seed, model.name,
                                         network_fields([model])))
                      for p, im in zip(targets[name], images)]
    if "masks" in targets:
        items.append((targets["masks"][0], mask_grid(result.masks, n + 1), fused_params))
    made = make_folder(out)
    try:
        check_writable(paths, a.overwrite)
        save_all(items, a.overwrite)
    except BaseException:
        remove_folders(made)  # a failed run leaves no folder behind either
        raise
    say(a, f"seed {seed}: wrote {', '.join(sorted({str(p.name) for p, _, _ in items}))} in {out}")


def run_demo(a) -> None:
    """Fuse the toy models on the demo prompts: per prompt a folder of general/expert/fused/masks PNGs, and
    panel.png with a row per prompt."""
    out = Path(a.out or "out/demo")
    slugs = ["-".join(prompt.split()[1:]) for prompt, _ in demo.PROMPTS]  # "a lion on the beach" -> lion-on-the-beach
    names = ("general", "expert", "fused", "masks")
    paths = [out / "panel.png"] + [out / slug / f"{n}.png" for slug in slugs for n in names]
    overwrite = a.overwrite or a.out is None  # the default folder is the demo's own
    if out.is_dir():
        check_writable([p for p in paths if p.parent.is_dir()], overwrite)
    elif out.exists():
        raise InputError(f"--out {out} is a file; the demo writes a folder of images")
    else:
        check_folder(out)
    rows = demo.run(a.weights, progress=not a.quiet)
    items = [(out / "panel.png", demo.panel(rows), None)]
    for slug, row in zip(slugs, rows):
        params = (f"{row.prompt}\nExpert prompt: {row.expert_prompt}, Steps: {demo.STEPS}, Sampler: DDIM, "
                  f"Seed: {demo.SEED}")
        images = (row.general, row.expert, row.fused, mask_grid(row.masks, 2))
        items += [(out / slug / f"{n}.png", im, params) for n, im in zip(names, images)]
    try:
        for slug in slugs:
            (out / slug).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot make folder {out}: {e.strerror or e}; choose another --out") from None
    check_writable(paths, overwrite)
    save_all(items, overwrite)
    say(a, f"demo done: {out}/panel.png; one folder per prompt ({', '.join(slugs)}).\n"
           "Each row: the general model alone, the expert alone, MagicFusion, and where the expert's noise was used.")


def main(argv=None) -> int:
    try:  # SIGTERM unwinds like Ctrl-C, so temporary files are removed (outputs.py)
        previous = signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:  # not the main thread: signals are not ours to handle
        previous = None
    try:
        a = build_parser().parse_args(argv)
        {"generate": run_generate, "fuse": run_fuse, "demo": run_demo}[a.command](a)
    except InputError as e:  # one line even when a path or value in the message holds a line break
        print(f"magicfusion: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("magicfusion: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("magicfusion: terminated", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0
