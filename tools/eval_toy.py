"""Measure MagicFusion's claims in the toy world: does the fused image hold the expert's animal in the general
model's scene, and how do the paper's variants and baselines compare?

    python tools/eval_toy.py                   # every setting: docs/toyworld.json, the table, the example grid
    python tools/eval_toy.py --settings "SNB (defaults)" "average" --seeds 1 --json /tmp/t.json --examples ""

For each setting, every (animal, scene) pair of the toy world (16 x 6) is sampled from `--seeds` initial noises,
and the judge (tools/judge.py, trained on render() ground truth only) names the animal and the scene of each
image. Reported per setting: the share of images whose animal is right, whose scene is right, and both.
The general model is prompted with the whole scene ("a lion on the beach"), the expert with its animal ("a lion");
the rows "general prompted with its scene" give the general model only its scene's caption ("a beach"), since
each model of a fusion has a prompt of its own.

Settings: each model alone, SNB with the defaults (the authors' code: saliency against the general model's
unconditional prediction, 4x4 blur, k = 1, SNB at every step), the plain average of the two noises (the paper's
Fig. 9 baseline), no blur, the paper's own-unconditional saliency, the two windows of the authors' README, a
kg/ke sweep and a guidance-scale sweep (the paper's open question 2), and DPM++ 2M Karras at 20 steps against
DDIM at 50; then the best window with a sharper expert softmax (ke = 2, 4) or guidance 5, the same window with the
general model's noise outside it (ke = 1, 2, 4), own-unconditional saliency with ke = 2 at every step, and the
general model prompted with its scene alone. Unless a setting names its own steps, images are made with DDIM at
`--steps` (20: the demo's).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `tools.*` when run as a script
import magicfusion  # noqa: E402
from magicfusion.demo import toy_paths  # noqa: E402
from tools import judge as judge_mod  # noqa: E402
from tools import toyworld  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SIZE = toyworld.SIZE
EVAL_SEED = 1000  # the tests use seeds below 100: the evaluation never sees their images

OWN = {"saliency_reference": "own"}  # the paper's reading of the saliency
LATE = {"fuse_from": 850, "fuse_until": -1, "outside": "expert"}  # the authors' second window recipe
SCENE_PROMPT = {"general_prompt": "scene"}  # the general model told only its scene ("a beach")
# name -> (how the image is made, keyword arguments); "general"/"expert" sample one model, "fuse" both
SETTINGS = {
    "general alone": ("general", {}),
    "expert alone": ("expert", {}),
    "SNB (defaults)": ("fuse", {}),
    "average blend (Fig. 9 baseline)": ("fuse", {"blend": "average"}),
    "SNB, no blur": ("fuse", {"blur": False}),
    "SNB, own-unconditional saliency": ("fuse", OWN),
    "SNB 1000->600, general outside": ("fuse", {"fuse_from": 1000, "fuse_until": 600}),
    "SNB 850->-1, expert outside": ("fuse", LATE),
    "SNB 850->-1, expert outside, own-unconditional": ("fuse", {**LATE, **OWN}),
    "SNB 850->-1, expert outside, own-unconditional, ke=2": ("fuse", {**LATE, **OWN, "ke": 2.0}),
    "SNB 850->-1, expert outside, own-unconditional, ke=4": ("fuse", {**LATE, **OWN, "ke": 4.0}),
    "SNB 850->-1, expert outside, own-unconditional, guidance 5": ("fuse", {**LATE, **OWN, "guidance": 5.0}),
    "SNB 850->-1, general outside, own-unconditional": ("fuse", {**LATE, "outside": "general", **OWN}),
    "SNB 850->-1, general outside, own-unconditional, ke=2": ("fuse", {**LATE, "outside": "general", **OWN,
                                                                      "ke": 2.0}),
    "SNB 850->-1, general outside, own-unconditional, ke=4": ("fuse", {**LATE, "outside": "general", **OWN,
                                                                      "ke": 4.0}),
    "SNB, own-unconditional, ke=2": ("fuse", {**OWN, "ke": 2.0}),
    "SNB, own-unconditional, general prompted with its scene": ("fuse", {**OWN, **SCENE_PROMPT}),
    "SNB 850->-1, expert outside, own-unconditional, general prompted with its scene": (
        "fuse", {**LATE, **OWN, **SCENE_PROMPT}),
    "SNB kg=1, ke=0.5": ("fuse", {"ke": 0.5}),
    "SNB kg=1, ke=2": ("fuse", {"ke": 2.0}),
    "SNB kg=2, ke=1": ("fuse", {"kg": 2.0}),
    "SNB guidance 3": ("fuse", {"guidance": 3.0}),
    "SNB guidance 5": ("fuse", {"guidance": 5.0}),
    "SNB guidance 10": ("fuse", {"guidance": 10.0}),
    "SNB, DPM++ 2M Karras 20 steps": ("fuse", {"sampler": "dpmpp-2m", "karras": True, "steps": 20}),
    "SNB (defaults), DDIM 50 steps": ("fuse", {"steps": 50}),
    "SNB, own-unconditional saliency, DDIM 50 steps": ("fuse", {**OWN, "steps": 50}),
}
EXAMPLES = [("lion", "beach"), ("panda", "snow"), ("frog", "meadow"), ("owl", "night"), ("fox", "desert"),
            ("penguin", "underwater")]


def select(names: list) -> list:
    """The settings named, in the order named, each once: a setting's whole name picks that setting alone, any
    other text every setting whose name starts with it ("SNB guidance" picks 3, 5 and 10; "" picks them all)."""
    return list(dict.fromkeys(s for x in names for s in ([x] if x in SETTINGS else
                                                         [s for s in SETTINGS if s.startswith(x)])))


def grid():
    """Every (animal, scene) pair of the toy world."""
    return [(a, s) for a in toyworld.EXPERT_OBJECTS for s in toyworld.SCENES]


def make_images(kind: str, kw: dict, general, expert, animal: str, scene: str, seed: int, batch: int,
                steps: int) -> list:
    # the general model's prompt: the whole sentence, or (general_prompt="scene") only the words it was trained on
    prompt = toyworld.SCENES[scene][0] if kw.pop("general_prompt", None) == "scene" else \
        toyworld.fusion_prompt(scene, animal)
    expert_prompt = f"{toyworld._article(animal)} {animal}"
    common = dict(seed=seed, height=SIZE, width=SIZE, batch=batch, progress=False, steps=steps)
    for name in ("guidance", "sampler", "karras", "steps"):  # sampling options every kind takes
        if name in kw:
            common[name] = kw.pop(name)
    if kind == "general":
        return magicfusion.generate(general, prompt, **common)
    if kind == "expert":
        return magicfusion.generate(expert, expert_prompt, **common)
    return magicfusion.fuse(general, expert, prompt, expert_prompt, **common, **kw).fused


def sampled(setting: str, general, expert, animal: str, scene: str, seeds: int, steps: int, folder) -> list:
    """The setting's images of one pair; with `folder`, kept there as PNGs (lossless) and read back on a later run,
    so another judge can score the same images without sampling them again."""
    kind, kw = SETTINGS[setting]
    paths = [Path(folder) / setting / f"{animal}-{scene}-{i}.png" for i in range(seeds)] if folder else []
    if paths and all(p.exists() for p in paths):
        return [Image.open(p).convert("RGB") for p in paths]
    images = make_images(kind, dict(kw), general, expert, animal, scene, EVAL_SEED, seeds, steps)
    for im, p in zip(images, paths):  # whole files only: another evaluation may be reading the same folder
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        im.save(tmp, format="PNG")
        tmp.replace(p)
    return images


def evaluate(setting: str, general, expert, judge, seeds: int, steps: int, progress: bool = True,
             folder=None) -> dict:
    """Score one setting over the whole grid -> {"animal", "scene", "both", "n"} (shares in 0..1)."""
    hits = {"animal": 0, "scene": 0, "both": 0}
    n = 0
    for animal, scene in tqdm(grid(), desc=setting, disable=None if progress else True, leave=False):
        images = sampled(setting, general, expert, animal, scene, seeds, steps, folder)
        animals, scenes = judge_mod.predict(judge, images)
        for im, a, s in zip(images, animals, scenes):
            ok_a, ok_s = a == animal, s == scene
            hits["animal"] += ok_a
            hits["scene"] += ok_s
            hits["both"] += ok_a and ok_s
            n += 1
    return {k: v / n for k, v in hits.items()} | {"n": n, "steps": SETTINGS[setting][1].get("steps", steps)}


def example_grid(settings: list, general, expert, seeds: int, steps: int, folder, path: Path, scale: int = 1) -> None:
    """Rows: (animal, scene) pairs; columns: the ground-truth render, then one image per setting (the evaluation's
    first image of that pair, read back from `folder` when the evaluation kept it there)."""
    examples = {pair: {name: sampled(name, general, expert, *pair, seeds, steps, folder)[0] for name in settings}
                for pair in EXAMPLES}
    tile, head, pad = SIZE * scale, 60, 4
    cols = ["render() ground truth", *settings]
    canvas = Image.new("RGB", (pad + len(cols) * (tile + pad), head + len(examples) * (tile + pad)), (250, 250, 250))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=11)
    for c, name in enumerate(cols):  # column titles wrapped to the tile's width
        draw.multiline_text((pad + c * (tile + pad), 2), "\n".join(textwrap.wrap(name, 22)[:5]), fill=(20, 20, 20),
                            font=font)
    for r, ((animal, scene), images) in enumerate(examples.items()):
        y = head + r * (tile + pad)
        row = [toyworld.render(scene, animal, seed=EVAL_SEED)] + [images[s] for s in settings]
        for c, im in enumerate(row):
            canvas.paste(im.resize((tile, tile), Image.NEAREST), (pad + c * (tile + pad), y))
    canvas.save(path)


def markdown_table(results: dict) -> str:
    lines = ["| setting | animal right | scene right | both right | images | steps |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['animal']:.0%} | {r['scene']:.0%} | **{r['both']:.0%}** | {r['n']} | "
                     f"{r['steps']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=str(ROOT / "weights" / "toy"))
    p.add_argument("--settings", nargs="*", default=None, help="a subset of the settings, by whole name or name "
                   "prefix, evaluated in the order named")
    p.add_argument("--seeds", type=int, default=2, help="initial noises per (animal, scene) pair")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (a setting that names its own keeps them)")
    p.add_argument("--json", default=str(ROOT / "docs" / "toyworld.json"), help="results (merged into the file)")
    p.add_argument("--examples", default=str(ROOT / "docs" / "toyworld-examples.png"),
                   help="the example grid's path (\"\": none)")
    p.add_argument("--example-settings", nargs="*", default=None,
                   help="the grid's columns, by whole name or name prefix (default: the settings evaluated)")
    p.add_argument("--images", default=None, help="keep every image in this folder (re-scored, not resampled, "
                   "when run again with the same options)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    p.add_argument("--device", default="cpu", help="where the models sample: cpu or cuda (default: cpu)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    try:
        toyworld.font_path()
        g_path, e_path, tok = toy_paths(a.weights)
    except (toyworld.FontMissing, magicfusion.InputError) as e:
        print(f"eval_toy: error: {e}", file=sys.stderr)
        return 2
    # in the order named: each prefix's matches in table order, once each ("" matches every setting)
    settings = list(SETTINGS) if a.settings is None else select(a.settings)
    if not settings:
        print(f"eval_toy: error: no setting matches {a.settings}; known: {', '.join(SETTINGS)}", file=sys.stderr)
        return 2
    torch.set_grad_enabled(False)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        general = magicfusion.load(g_path, tokenizer=tok, device=a.device)
        expert = magicfusion.load(e_path, tokenizer=tok, device=a.device)
    except magicfusion.InputError as e:
        print(f"eval_toy: error: {e}", file=sys.stderr)
        return 2
    judge = judge_mod.load(Path(a.weights) / "judge.safetensors")
    out = Path(a.json)
    results = json.loads(out.read_text()) if out.exists() else {}
    for setting in settings:
        t0 = time.time()
        results[setting] = evaluate(setting, general, expert, judge, a.seeds, a.steps, not a.quiet, a.images)
        results[setting]["seconds"] = round(time.time() - t0, 1)
        out.write_text(json.dumps(results, indent=1))
        if not a.quiet:
            r = results[setting]
            print(f"{setting}: animal {r['animal']:.0%}, scene {r['scene']:.0%}, both {r['both']:.0%} "
                  f"({r['n']} images, {r['seconds']} s)", file=sys.stderr)
    results["judge accuracy on unseen renders"] = judge_mod.accuracy(judge)
    out.write_text(json.dumps(results, indent=1))
    if a.examples:
        columns = settings if a.example_settings is None else select(a.example_settings)
        example_grid(columns, general, expert, a.seeds, a.steps, a.images, Path(a.examples))
    print(markdown_table({k: v for k, v in results.items() if k in SETTINGS}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
