"""A small world to train two Stable Diffusion 1.x models in, so that MagicFusion can be seen and measured.

The **expert** knows 16 animals (emoji of Google's Noto Color Emoji font, SIL OFL) photographed on a plain light
studio background; it never sees a scene. The **general** model knows 6 procedurally drawn scenes, alone or with
one of 8 everyday objects; it never sees an animal. `render("beach", "lion", seed)` draws the composition that
fusion should produce and neither model was trained on: it is the ground truth the judge (tools/judge.py) learns.

    SIZE                      the image size the toy models are trained at
    render(scene, obj, seed)  -> PIL.Image; scene=None: the studio background; obj=None: an empty scene
    SCENES, GENERAL_OBJECTS, EXPERT_OBJECTS
    expert_caption / general_caption / fusion_prompt: captions as people write them

The font comes from Debian's `fonts-noto-color-emoji` (or $MAGICFUSION_EMOJI_FONT). Pillow draws its colour
bitmaps at their one native size, 109 px, with `embedded_color=True`; glyphs are then resized with LANCZOS.
"""
from __future__ import annotations

import functools
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SIZE = 128

EXPERT_OBJECTS = {"lion": "🦁", "tiger": "🐯", "cat": "🐱", "dog": "🐶", "fox": "🦊", "panda": "🐼", "frog": "🐸",
                  "bee": "🐝", "penguin": "🐧", "turtle": "🐢", "owl": "🦉", "rabbit": "🐰", "pig": "🐷", "cow": "🐮",
                  "monkey": "🐵", "koala": "🐨"}
GENERAL_OBJECTS = {"house": "🏠", "tree": "🌳", "car": "🚗", "ball": "⚽", "sailboat": "⛵", "flower": "🌸",
                   "umbrella": "☂", "sun": "☀"}
OBJECTS = {**EXPERT_OBJECTS, **GENERAL_OBJECTS}  # everything render() can draw, by name
# scene name -> (how a caption names it alone, the phrase that places something in it)
SCENES = {"beach": ("a beach", "on the beach"), "snow": ("a snowy field", "in the snow"),
          "meadow": ("a meadow", "in a meadow"), "night": ("a starry night", "at night"),
          "desert": ("a desert", "in the desert"), "underwater": ("the sea floor", "underwater")}

FONT_PATHS = ("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf", "/usr/share/fonts/noto/NotoColorEmoji.ttf",
              "/usr/share/fonts/google-noto-color-emoji/NotoColorEmoji.ttf",
              "/System/Library/Fonts/Apple Color Emoji.ttc")
FONT_HINT = ("install the Noto Color Emoji font (Debian/Ubuntu: apt-get install fonts-noto-color-emoji) or set "
             "$MAGICFUSION_EMOJI_FONT to its .ttf file")


class FontMissing(RuntimeError):
    pass


def font_path() -> Path:
    """The emoji font's file, or FontMissing with the line that says how to install it."""
    for c in (os.environ.get("MAGICFUSION_EMOJI_FONT"), *FONT_PATHS):
        if c and Path(c).is_file():
            return Path(c)
    raise FontMissing(f"the Noto Color Emoji font was not found; {FONT_HINT}")


@functools.lru_cache(maxsize=None)
def glyph(char: str) -> Image.Image:
    """The emoji as an RGBA image cropped to its drawn pixels (109 px tall at the font's native size)."""
    font = ImageFont.truetype(str(font_path()), 109)
    im = Image.new("RGBA", (160, 140), (0, 0, 0, 0))
    ImageDraw.Draw(im).text((4, 4), char, font=font, embedded_color=True)
    return im.crop(im.getbbox())


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def expert_caption(animal: str, rng: random.Random) -> str:
    return rng.choice([f"{_article(animal)} {animal}", f"a photo of {_article(animal)} {animal}"])


def general_caption(scene: str, obj: str | None, rng: random.Random) -> str:
    alone, place = SCENES[scene]
    text = alone if obj is None else f"{_article(obj)} {obj} {place}"
    return rng.choice([text, f"a photo of {text}"])


def fusion_prompt(scene: str, animal: str) -> str:
    """The prompt of a fusion: the expert's animal placed in the general model's scene, e.g. 'a lion on the beach'."""
    return f"{_article(animal)} {animal} {SCENES[scene][1]}"


# ---------------------------------------------------------------------------------------------------------------
# Backgrounds. Each draws on an (S, S, 3) float array in 0..255 with its own randomness.

def _jitter(rng: np.random.Generator, rgb, amount: float = 14.0) -> np.ndarray:
    return np.clip(np.asarray(rgb, dtype=np.float32) + rng.normal(0, amount, 3), 0, 255)


def _vertical(s: int, top, bottom) -> np.ndarray:
    a = np.linspace(0, 1, s, dtype=np.float32)[:, None, None]
    return np.broadcast_to((1 - a) * top + a * bottom, (s, s, 3)).copy()


def _fill_below(img, horizon_y: np.ndarray, color_top, color_bottom):
    """Paint every pixel below the curve horizon_y[x] with a vertical gradient."""
    s = img.shape[0]
    ys = np.arange(s, dtype=np.float32)[:, None]
    mask = ys >= horizon_y[None, :]
    grad = _vertical(s, color_top, color_bottom)
    img[mask] = grad[mask]
    return mask


def _dots(img, rng, n, radius, color, region=None):
    s = img.shape[0]
    yy, xx = np.mgrid[0:s, 0:s]
    for _ in range(n):
        cy, cx = rng.uniform(*(region or (0, s))), rng.uniform(0, s)
        r = rng.uniform(*radius)
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[m] = color


def _beach(img, rng, s):
    horizon = rng.uniform(0.3, 0.45) * s
    shore = horizon + rng.uniform(0.15, 0.25) * s
    img[:] = _vertical(s, _jitter(rng, (120, 185, 240)), _jitter(rng, (200, 230, 250)))
    _fill_below(img, np.full(s, horizon), _jitter(rng, (30, 110, 190)), _jitter(rng, (60, 160, 210)))
    xs = np.arange(s)
    for k in range(3):  # white wave crests
        y = horizon + (k + 1) * (shore - horizon) / 4 + 1.5 * np.sin(xs / rng.uniform(4, 8) + rng.uniform(0, 6))
        for x in xs:
            img[int(y[x]) % s, x] = (235, 245, 250)
    edge = shore + 3 * np.sin(xs / rng.uniform(6, 12) + rng.uniform(0, 6))
    _fill_below(img, edge, _jitter(rng, (235, 215, 160)), _jitter(rng, (215, 190, 135)))


def _snow(img, rng, s):
    horizon = rng.uniform(0.35, 0.55) * s
    img[:] = _vertical(s, _jitter(rng, (170, 185, 205)), _jitter(rng, (215, 222, 232)))
    xs = np.arange(s)
    hills = horizon + 6 * np.sin(xs / rng.uniform(10, 20) + rng.uniform(0, 6))
    _fill_below(img, hills, _jitter(rng, (250, 252, 255), 4), _jitter(rng, (205, 220, 240), 6))
    _dots(img, rng, int(rng.integers(25, 45)), (0.6, 1.4), (255, 255, 255), (0, horizon))


def _meadow(img, rng, s):
    horizon = rng.uniform(0.3, 0.5) * s
    img[:] = _vertical(s, _jitter(rng, (90, 160, 235)), _jitter(rng, (185, 220, 245)))
    xs = np.arange(s)
    hills = horizon + 4 * np.sin(xs / rng.uniform(12, 25) + rng.uniform(0, 6))
    _fill_below(img, hills, _jitter(rng, (110, 190, 70)), _jitter(rng, (50, 130, 40)))
    dark = _jitter(rng, (35, 100, 30), 8)
    for _ in range(int(rng.integers(120, 200))):  # grass blades
        x, y = int(rng.integers(0, s)), int(rng.uniform(hills.min() + 4, s))
        img[max(y - int(rng.integers(2, 5)), 0):y, x] = dark


def _night(img, rng, s):
    horizon = rng.uniform(0.6, 0.8) * s
    img[:] = _vertical(s, _jitter(rng, (8, 12, 40), 6), _jitter(rng, (30, 40, 90), 8))
    _dots(img, rng, int(rng.integers(30, 60)), (0.4, 1.0), (255, 250, 220), (0, horizon))
    xs = np.arange(s)
    ground = horizon + 3 * np.sin(xs / rng.uniform(8, 16) + rng.uniform(0, 6))
    _fill_below(img, ground, _jitter(rng, (20, 35, 30), 5), _jitter(rng, (10, 18, 15), 4))
    yy, xx = np.mgrid[0:s, 0:s]  # the moon
    cy, cx, r = rng.uniform(0.1, 0.25) * s, rng.uniform(0.15, 0.85) * s, rng.uniform(0.05, 0.08) * s
    img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (245, 240, 200)


def _desert(img, rng, s):
    horizon = rng.uniform(0.35, 0.5) * s
    img[:] = _vertical(s, _jitter(rng, (245, 190, 110)), _jitter(rng, (250, 225, 170)))
    xs = np.arange(s)
    for k, (top, bottom) in enumerate((((215, 150, 80), (200, 130, 65)), ((235, 175, 95), (210, 140, 70)))):
        dune = horizon + k * 0.2 * s + 7 * np.sin(xs / rng.uniform(8, 18) + rng.uniform(0, 6))
        _fill_below(img, dune, _jitter(rng, top), _jitter(rng, bottom))


def _underwater(img, rng, s):
    img[:] = _vertical(s, _jitter(rng, (40, 170, 190)), _jitter(rng, (10, 60, 120)))
    yy, xx = np.mgrid[0:s, 0:s]
    for _ in range(int(rng.integers(8, 16))):  # bubbles: bright rings
        cy, cx, r = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(1.5, 4.0)
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        img[(d <= r) & (d >= r - 1.0)] = (200, 240, 250)
    floor = s - rng.uniform(0.08, 0.16) * s + 2 * np.sin(np.arange(s) / rng.uniform(6, 12))
    _fill_below(img, floor, _jitter(rng, (190, 170, 120)), _jitter(rng, (150, 130, 90)))


STUDIO = (232, 230, 226)  # the expert's backdrop colour, a light grey


def _studio(img, rng, s, colour=STUDIO):
    """The expert's background: a soft vertical gradient around `colour` (the studio's light grey), or, when
    `colour` is a (k, k, 3) grid of colours, that grid smoothly interpolated over the whole image."""
    field = np.ndim(colour) == 3
    base = _jitter(rng, STUDIO if field else colour, 8)  # drawn either way, so the animal's place follows the seed
    if field:
        grid = Image.fromarray(np.clip(np.asarray(colour), 0, 255).round().astype(np.uint8))
        img[:] = np.asarray(grid.resize((s, s), Image.BICUBIC), dtype=np.float32)
    else:
        img[:] = _vertical(s, np.clip(base + 8, 0, 255), np.clip(base - 10, 0, 255))


DRAW = {"beach": _beach, "snow": _snow, "meadow": _meadow, "night": _night, "desert": _desert,
        "underwater": _underwater}


def _place(canvas: Image.Image, char: str, rng: np.random.Generator, frac, sky: bool = False) -> None:
    """Paste a glyph whose larger side is `frac` of the image at a random position (in the top 40% if `sky`)."""
    s = canvas.size[0]
    g = glyph(char)
    scale = rng.uniform(*frac) * s / max(g.size)
    w, h = max(1, round(g.size[0] * scale)), max(1, round(g.size[1] * scale))
    g = g.resize((w, h), Image.LANCZOS)
    x = int(rng.integers(0, s - w + 1))
    y_high = max(0, int(0.4 * s) - h // 2) if sky else s - h
    y = int(rng.integers(0, y_high + 1))
    canvas.alpha_composite(g, (x, y))


def render(scene: str | None = None, obj: str | None = None, seed: int = 0, size: int = SIZE,
           backdrop=None) -> Image.Image:
    """Draw `obj` (an animal or a general object, by name) in `scene` (None: the studio background); RGB.
    `backdrop`, an (r, g, b) colour, paints the studio in that colour instead of its light grey; a (k, k, 3) array
    of colours paints a smooth field through them (scene=None only; the object's size and place are those of the
    same seed's studio image).

    Animals and the general model's objects alike are 35-65% of the image at a random position (the sun 25-40%,
    high in the sky), so the general model learns scenes with a large thing anywhere in front of them, as the
    fused images hold one. The same arguments give the same image."""
    if scene is not None and scene not in DRAW:
        raise KeyError(f"unknown scene {scene!r}; known: {', '.join(SCENES)}")
    if obj is not None and obj not in OBJECTS:
        raise KeyError(f"unknown object {obj!r}")
    if backdrop is not None and scene is not None:
        raise ValueError("a backdrop colour replaces the studio's; it takes scene=None")
    rng = np.random.default_rng([seed, hash_name(scene), hash_name(obj)])
    img = np.zeros((size, size, 3), dtype=np.float32)
    if scene:
        DRAW[scene](img, rng, size)
    else:
        _studio(img, rng, size, STUDIO if backdrop is None else backdrop)
    canvas = Image.fromarray(img.round().astype(np.uint8)).convert("RGBA")
    if obj == "sun":
        _place(canvas, GENERAL_OBJECTS[obj], rng, (0.25, 0.4), sky=True)
    elif obj is not None:
        _place(canvas, OBJECTS[obj], rng, (0.35, 0.65))
    return canvas.convert("RGB")


def hash_name(name: str | None) -> int:
    """A stable small integer for a name (Python's str hash changes between runs)."""
    return 0 if name is None else int.from_bytes(name.encode(), "little") % (2 ** 31)


def degrade(image: Image.Image, rng: random.Random) -> Image.Image:
    """Blur, fade and noise like a small diffusion model's output (soft edges, washed-out colours), so the judge
    reads generated images too: a scene drawn pale is still that scene, not the studio."""
    im = image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.5)))
    a = np.asarray(im, dtype=np.float32)
    a = a + rng.uniform(0, 0.45) * (a.mean((0, 1)) - a)           # lower contrast: towards the mean colour
    a = a + rng.uniform(0, 0.4) * (a.mean(2, keepdims=True) - a)  # lower saturation: towards grey
    a = a + rng.uniform(-20, 25) + np.random.default_rng(rng.randrange(2 ** 31)).normal(0, rng.uniform(0, 8), a.shape)
    return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))
