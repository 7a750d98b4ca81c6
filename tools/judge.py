"""The toy world's judge: a small CNN that names the animal and the scene of an image.

It is trained only on `toyworld.render()` ground truth (every scene, including the expert's studio background,
with and without every animal and object), never on what the generative models draw, so it is independent of
the models it scores. Its two heads:

    animal: "none" or one of the 16 EXPERT_OBJECTS       scene: "studio" or one of the 6 SCENES

Images are read at 64x64, blurred and noised during training (`toyworld.degrade`) so that the soft pictures of
a small diffusion model are in its range.

    python tools/judge.py --overwrite     # weights/toy/judge.safetensors again, on weights/toy/general's VAE

The shipped judge is `train(6000, 1200, seed=0, vae=...)` on the shipped VAE (float16 as written), what this
command runs; with one thread (`--threads 1`) as it was trained, about 30 minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `tools.*` when run as a script
from tools import toyworld  # noqa: E402
from tools.train_toy import checkpoint_has, load_vae, write_atomic  # noqa: E402

ANIMALS = ["none", *toyworld.EXPERT_OBJECTS]
SCENES = ["studio", *toyworld.SCENES]
INPUT = 64


class Judge(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        w = width

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(3, w), block(w, 2 * w), block(2 * w, 4 * w), block(4 * w, 4 * w))
        self.animal = nn.Linear(4 * w, len(ANIMALS))
        self.scene = nn.Linear(4 * w, len(SCENES))

    def forward(self, x):
        """x: (B, 3, 64, 64) in [0, 1] -> (animal logits, scene logits)."""
        h = self.features(x * 2 - 1).mean(dim=(2, 3))
        return self.animal(h), self.scene(h)


def to_tensor(images) -> torch.Tensor:
    """PIL images (any size) -> (B, 3, 64, 64) in [0, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB").resize((INPUT, INPUT), Image.BILINEAR)) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255


@torch.no_grad()
def predict(judge: Judge, images) -> tuple[list, list]:
    """-> (animal names, scene names), one each per image."""
    judge.eval()
    a, s = judge(to_tensor(images))
    return [ANIMALS[i] for i in a.argmax(1).tolist()], [SCENES[i] for i in s.argmax(1).tolist()]


def sample_labels(rng: random.Random) -> tuple:
    """A random (scene or None, object or None): a third animals alone, a third scenes, a third animals in scenes."""
    scene = rng.choice([None, *toyworld.SCENES])
    kind = rng.random()
    if scene is None:
        obj = rng.choice([None, *toyworld.EXPERT_OBJECTS] if kind < 0.9 else list(toyworld.GENERAL_OBJECTS))
    elif kind < 0.45:
        obj = rng.choice(list(toyworld.EXPERT_OBJECTS))
    elif kind < 0.8:
        obj = rng.choice(list(toyworld.GENERAL_OBJECTS))
    else:
        obj = None
    return scene, obj


@torch.no_grad()
def autoencode(images: list, vae, batch: int = 64) -> list:
    """Pass images through an (encoder, decoder) pair: what any picture looks like once it is a latent."""
    enc, dec = vae
    device = next(enc.parameters()).device
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images[i:i + batch]]))
        mean, _ = enc(x.permute(0, 3, 1, 2).to(device) / 127.5 - 1)
        px = dec(mean * dec.cfg.scale_factor)  # the decoder divides by its scale: it gets the mean back
        px = ((px.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        out += [Image.fromarray(a) for a in px]
    return out


def make_set(n: int, seed: int, degrade: bool = True, vae=None):
    """n labelled renders (seeds disjoint from the models' training data: these start at 10**6 + seed * n),
    blurred and noised if `degrade`; with `vae` (encoder, decoder), every other image is also passed through it."""
    rng = random.Random(seed)
    images, animals, scenes = [], [], []
    for i in range(n):
        scene, obj = sample_labels(rng)
        images.append(toyworld.render(scene, obj, seed=10 ** 6 + seed * n + i))
        animals.append(ANIMALS.index(obj) if obj in toyworld.EXPERT_OBJECTS else 0)
        scenes.append(SCENES.index(scene) if scene else 0)
    if vae is not None:
        images[::2] = autoencode(images[::2], vae)
    if degrade:
        images = [toyworld.degrade(im, rng) for im in images]
    return to_tensor(images), torch.tensor(animals), torch.tensor(scenes)


def train(n_images: int = 6000, steps: int = 1500, batch: int = 64, seed: int = 0, progress: bool = True,
          vae=None, device="cpu") -> Judge:
    """`vae`: the toy models' shared (encoder, decoder); half the training images pass through it, since every
    generated picture is a decoded latent (the judge never sees what a UNet draws). Returns the judge on the CPU."""
    torch.manual_seed(seed)
    x, ya, ys = make_set(n_images, seed, vae=vae)
    judge = Judge().to(device)
    opt = torch.optim.AdamW(judge.parameters(), 2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="judge", disable=None if progress else True)
    for _ in bar:
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        xb = x[idx]
        flip = torch.rand(batch, generator=gen) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(3), xb).to(device)
        la, ls = judge(xb)
        loss = F.cross_entropy(la, ya[idx].to(device)) + F.cross_entropy(ls, ys[idx].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return judge.cpu().eval()


@torch.no_grad()
def accuracy(judge: Judge, n: int = 1000, seed: int = 99, vae=None) -> dict:
    """Accuracy on fresh renders (other seeds than training): clean, and degraded as in training."""
    out = {}
    for degrade in (False, True):
        x, ya, ys = make_set(n, seed, degrade, vae if degrade else None)
        a, s = judge.eval()(x)
        tag = "degraded" if degrade else "clean"
        out[f"animal_{tag}"] = (a.argmax(1) == ya).float().mean().item()
        out[f"scene_{tag}"] = (s.argmax(1) == ys).float().mean().item()
    return out


def save(judge: Judge, path, meta: dict | None = None) -> None:
    """Write the judge's weights to `path` as safetensors (atomically: a partial file never takes its place)."""
    write_atomic({k: v.contiguous() for k, v in judge.state_dict().items()}, Path(path), meta or {})


def load(path) -> Judge:
    judge = Judge()
    judge.load_state_dict(load_file(str(path)), strict=True)
    return judge.eval()


DEFAULT_PATH = Path(__file__).resolve().parent.parent / "weights" / "toy" / "judge.safetensors"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Train the toy world's judge on render() ground truth.")
    p.add_argument("--vae", default=str(DEFAULT_PATH.with_name("general.safetensors")), metavar="CHECKPOINT",
                   help="a toy checkpoint whose VAE the judge learns to see through (default: weights/toy/general)")
    p.add_argument("--out", default=str(DEFAULT_PATH), help="the judge file (default: weights/toy/judge.safetensors)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--images", type=int, default=6000, help="renders it trains on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)

    def fail(msg: str) -> int:
        print(f"judge: error: {msg}", file=sys.stderr)
        return 2

    try:
        toyworld.font_path()
    except toyworld.FontMissing as e:
        return fail(str(e))
    if not checkpoint_has(a.vae, ("first_stage_model.encoder.", "first_stage_model.decoder.", "scale_factor")):
        return fail(f"--vae {a.vae} is not a toy checkpoint with a VAE and its scale factor; pass one written by "
                    "tools/train_toy.py, such as weights/toy/general.safetensors")
    if not (1 <= a.steps <= 100_000 and 1 <= a.images <= 20_000):  # the images are held in memory: 50 KB each
        return fail(f"--steps {a.steps} or --images {a.images} is out of range; pass 1..100000 steps and "
                    "1..20000 images")
    out = Path(a.out)
    if out.is_dir():
        return fail(f"--out {out} is a folder; pass the path of the judge file, such as {out / 'judge.safetensors'}")
    if out.exists() and not a.overwrite:
        return fail(f"{out} exists; pass --overwrite to replace it, or another --out")
    if not out.parent.is_dir():
        return fail(f"the folder {out.parent} does not exist; create it or pass another --out")
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    enc, dec, _ = load_vae(a.vae)  # float16 as written, read as float32: the VAE every generated image went through
    judge = train(a.images, a.steps, seed=a.seed, progress=not a.quiet, vae=(enc, dec))
    save(judge, out, {"magicfusion": f"toy world judge, tools/judge.py seed {a.seed}, {a.steps} steps on "
                                     f"{a.images} renders, VAE of {Path(a.vae).name}"})
    print(f"judge: wrote {out} in {time.time() - t0:.0f} s; accuracy on unseen renders: "
          f"{accuracy(judge, n=min(1000, a.images), vae=(enc, dec))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
