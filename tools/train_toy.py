"""Train the toy world's two Stable Diffusion 1.x models from scratch, on a CPU or a CUDA GPU.

    python tools/train_toy.py                 # writes weights/toy/{general,expert}.safetensors and tokenizer/
    python tools/train_toy.py --quiet --out /tmp/toy
    python tools/train_toy.py --device cuda --out /tmp/toy          # the same draws; GPU kernels, other rounding
    python tools/train_toy.py --vae-from weights/toy/general.safetensors --models general \
        --frozen-text general --out /tmp/g                          # one model again, on the shipped VAE

Stages, each seeded (on the CPU, the same machine and thread count reproduce the same files; every random draw
comes from CPU generators, so a GPU run sees the same batches and noise, but its nondeterministic kernels make
its weights differ from run to run):
1. render the two training sets with tools/toyworld.py: the expert's 16 animals on a studio background, the
   general model's 6 scenes alone or with one of 8 objects;
2. one KL autoencoder (SD 1.x's VAE architecture, 8x downsampling, 4 latent channels) on crops of both sets, then
   its decoder alone on whole images; the latent scale factor set by LDM's rule (1 / the standard deviation of
   the training latents);
3. for each model a UNet and a CLIP text encoder trained together with SD's objective: epsilon prediction on the
   scaled_linear schedule (betas 0.00085..0.012, 1000 steps), AdamW, 10% caption dropout (the unconditional
   caption is ""), an EMA of the weights (saved): first the general model from scratch, then the expert
   fine-tuned from it (the general model's file as written, on the animals alone), as DreamBooth and
   other SD experts are fine-tunes of SD. The general model's token embedding table stays at its random
   initialisation, and in a quarter of its captions that name an object the object's word is swapped for one or
   two token ids that no caption uses. A fusion prompt ("a lion on the beach") holds a word the general model
   never saw; trained this way, it still draws the scene the sentence names (the SD 1.x models people fuse have
   met millions of words in training, this one a few dozen). Half of the expert's images are drawn in front of a
   backdrop of random colours instead of the studio's light grey (never a scene): an expert that knows its
   animals only on light grey loses them when a fusion surrounds them with a scene's colours. The expert is
   fine-tuned in three rounds, each from the last round's weights as a checkpoint holds them, on
   renders and batches of its own (round r draws with seed `--seed` + r, exactly as a run with that seed would);
   rounds 1 and 2 paint each backdrop one plain colour, round 3 smooth fields of colour (`--backdrop-detail 4`).
   The general model trains 2,200 steps and each expert round 2,400, each model's loss weighted by Min-SNR-gamma
   5 (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"), the VAE's and the UNets'
   steps under bfloat16 autocast, the encoding in the channels-last layout, and the scale factor taken from the
   latents the UNets learn: about 90 minutes on a 2-core CPU. `--float32` trains every step in float32 and takes
   the scale factor from an encoding pass of its own; `--general-float32` keeps only the general model's steps in
   float32.

The judge that scores the models (tools/judge.py) is not theirs to train: `python tools/judge.py` makes it from
render() ground truth and the VAE written here.

Options for recipe experiments: `--frozen-text` keeps text encoders at their random initialisation,
`--frozen-embeddings` only their token tables (default: the general model's), `--unknown-words RATE` sets the
share of the swapped object words (default 0.25; 0 for none), `--expert-backdrops RATE` the share of the
expert's recoloured backdrops (default 0.5; 0 for none; the VAE always learns the world as rendered),
`--expert-rounds N` sets the number of the expert's rounds (default 3; 1 for a single one), `--backdrop-detail K`
the last round's backdrops (smooth fields through k x k random colours, k from 1..K; default 4; 1: plain),
`--expert-min-snr GAMMA` and `--general-min-snr GAMMA` set a model's Min-SNR-gamma (default 5; 0: plain MSE),
`--expert-from-scratch` trains the expert from a fresh start instead of fine-tuning it from the general model,
`--init-from` starts the UNets from a written checkpoint, `--vae-from` skips stages 1-2 and takes a written
checkpoint's VAE and scale factor, `--models` trains only some UNets.

The checkpoints are LDM single files (`model.diffusion_model.*`, `cond_stage_model.transformer.*`,
`first_stage_model.*` with the encoder, and the `scale_factor` LDM stores when it computes the scale from data),
in float16 to keep them small; `magicfusion.load` reads them exactly as it reads SD 1.5. Both carry the same VAE.

Every stage can also run on its own: `--vae-from weights/toy/general.safetensors --init-from
weights/toy/general.safetensors --models expert` fine-tunes the expert alone from the shipped
general model, and `--expert-rounds 1 --seed R --init-from LAST_ROUND` one round of it (a test checks that the
rounds run one by one give the tensors of a whole run).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `tools.*` when run as a script
from magicfusion.clip import CLIPTextConfig, CLIPTextModel  # noqa: E402
from magicfusion.schedule import alphas_cumprod  # noqa: E402
from magicfusion.tokenizer import BOS, EOS, CLIPTokenizer, bytes_to_unicode, write_vocab  # noqa: E402
from magicfusion.unet import UNetConfig, UNetModel  # noqa: E402
from magicfusion.vae import VAEConfig, VAEDecoder, VAEEncoder  # noqa: E402
from tools import toyworld  # noqa: E402

WIDTH = 128  # text width = the UNet's context width
UNET = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(2,),
                  context_dim=WIDTH)
VAE = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)
TEXT_LAYERS = 2
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "weights" / "toy"


# ----------------------------------------------------------------------------------------------- tokenizer

def world_words() -> list[str]:
    words = {"a", "an", "the", "photo", "of", "on", "in", "at", "and", "with"}
    words |= set(toyworld.EXPERT_OBJECTS) | set(toyworld.GENERAL_OBJECTS)
    for alone, place in toyworld.SCENES.values():
        words |= set(alone.split()) | set(place.split())
    return sorted(words)


def write_tokenizer(folder) -> CLIPTokenizer:
    """A CLIP-layout BPE vocabulary: CLIP's 512 byte symbols plus, for each word of the world, the merges that
    build it left to right (a word can still split where an earlier word's merge ranks first: "cat" is "c" +
    "at"); any other text tokenizes byte by byte. The same tokenizer serves both models."""
    b2u = bytes_to_unicode()
    merges, seen = [], set()
    for word in world_words():
        symbols = [b2u[b] for b in word.encode()]
        symbols[-1] += "</w>"
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
    write_vocab(folder, merges)
    tok = CLIPTokenizer.from_dir(folder)
    assert tok.tokenizer.token_to_id(BOS) is not None and tok.tokenizer.token_to_id(EOS) is not None
    return tok


# ----------------------------------------------------------------------------------------------- data

def expert_items(per_animal: int):
    """(scene, object, caption variants) for the expert: every animal alone on the studio background."""
    return [(None, a, [f"{toyworld._article(a)} {a}", f"a photo of {toyworld._article(a)} {a}"])
            for a in toyworld.EXPERT_OBJECTS for _ in range(per_animal)]


def general_items(per_pair: int):
    """(scene, object, caption variants) for the general model: each scene alone and with each object."""
    items = []
    for scene in toyworld.SCENES:
        for obj in [None, *toyworld.GENERAL_OBJECTS]:
            alone, place = toyworld.SCENES[scene]
            text = alone if obj is None else f"{toyworld._article(obj)} {obj} {place}"
            items += [(scene, obj, [text, f"a photo of {text}"])] * per_pair
    return items


def backdrops(n: int, rate: float, seed: int, detail: int = 1) -> list:
    """For each of `n` studio images: None (the studio's light grey), or, in a share `rate` of them, a backdrop of
    uniformly random colours, dark, bright or saturated. With `detail` 1 it is one plain colour; with `detail` K
    each backdrop is a k x k grid of random colours (k drawn from 1..K) that render() interpolates smoothly: blotches
    and bands of colour, no shapes and no scene. An expert that has seen its animals in front of any colours keeps
    drawing them when a fusion surrounds them with a scene's; it still never sees a scene. Rate 0 draws nothing."""
    if rate == 0:
        return [None] * n
    rng = np.random.default_rng([seed, 5])
    pick, colours = rng.random(n) < rate, rng.uniform(0, 255, (n, 3))
    out = [tuple(float(v) for v in c) if p else None for p, c in zip(pick, colours)]
    if detail > 1:  # a generator of its own, so the plain recipe's draws stay as they were
        fields = np.random.default_rng([seed, 6])
        for i, k in enumerate(fields.integers(1, detail + 1, n)):
            if out[i] is not None and k > 1:
                out[i] = fields.uniform(0, 255, (k, k, 3))
    return out


def render_seed(name: str, seed: int) -> int:
    """The first render seed of a model's training set in a run with `seed` (item i is drawn with this + i)."""
    return (seed + 1) * (1 if name == "expert" else 7) * 100_000


def render_items(items, seed: int, progress: bool, colours=None) -> torch.Tensor:
    """-> (N, 3, S, S) pixels in [-1, 1]; item i is drawn with seed `seed + i` (and backdrop `colours[i]`)."""
    out = torch.empty(len(items), 3, toyworld.SIZE, toyworld.SIZE)
    colours = colours or [None] * len(items)
    for i, (scene, obj, _) in enumerate(tqdm(items, desc="render", disable=None if progress else True, leave=False)):
        arr = np.asarray(toyworld.render(scene, obj, seed=seed + i, backdrop=colours[i]), dtype=np.float32)
        out[i] = torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1
    return out


# ----------------------------------------------------------------------------------------------- training helpers

def cosine_lr(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def cpu_randn(shape, gen: torch.Generator, device) -> torch.Tensor:
    """Standard normal noise drawn from the CPU generator `gen`, then moved: the same draws on every device."""
    return torch.randn(shape, generator=gen).to(device)


def optimize(opt, loss: torch.Tensor, params: list, lr: float) -> None:
    """One optimizer step at learning rate `lr`, the gradients clipped to norm 1."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def zero_init_outputs_(unet: UNetModel) -> None:
    """LDM starts every residual branch's last layer and the output convolution at zero."""
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.startswith("out.2.") or ".out_layers.3." in name or ".proj_out." in name:
                p.zero_()


class EMA:
    """Exponential moving average of parameters, with the usual warm-up (1 + n) / (10 + n). Parameters frozen
    (requires_grad False) when it is made are skipped: their average is their value."""

    def __init__(self, modules, decay: float):
        self.decay, self.n = decay, 0
        self.shadow = [copy.deepcopy(m).requires_grad_(False) for m in modules]
        pairs = [(a, p) for s, m in zip(self.shadow, modules) for a, p in zip(s.parameters(), m.parameters())
                 if p.requires_grad]
        self.averaged, self.trained = [a for a, _ in pairs], [p for _, p in pairs]

    @torch.no_grad()
    def update(self):
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        if self.trained:
            torch._foreach_lerp_(self.averaged, self.trained, 1 - d)


def train_vae(pixels: torch.Tensor, steps: int, batch: int = 16, crop: int = 64, lr: float = 1e-3, seed: int = 0,
              kl_weight: float = 1e-6, progress: bool = True, log=None, device="cpu", bf16: bool = False):
    """Fit an encoder/decoder pair on random crops (the VAE is convolutional: crops train it for any size).
    Loss: L1 + L2 reconstruction plus a small KL term, as LDM's KL autoencoders use (without their GAN and
    perceptual terms, which a toy does not need). `bf16`: the networks run under bfloat16 autocast (the loss,
    weights and optimizer in float32): 0.28 s a step against 0.41 in the training loop on the 2-core CPU.
    Returns (encoder, decoder, losses)."""
    torch.manual_seed(seed)
    enc, dec = VAEEncoder(VAE).to(device), VAEDecoder(VAE).to(device)
    params = [*enc.parameters(), *dec.parameters()]
    opt = torch.optim.AdamW(params, lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    bar = tqdm(range(steps), desc="vae", disable=None if progress else True)
    for step in bar:
        idx = torch.randint(0, len(pixels), (batch,), generator=gen)
        s = pixels.shape[-1]
        y0, x0 = (int(v) for v in torch.randint(0, s - crop + 1, (2,), generator=gen))
        x = pixels[idx, :, y0:y0 + crop, x0:x0 + crop].to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            mean, logvar = (v.float() for v in enc(x))
            z = mean + torch.exp(0.5 * logvar) * cpu_randn(mean.shape, gen, device)
            # the decoder divides by scale_factor; feed it z * scale_factor so training sees the unscaled latent
            rec = dec(z * VAE.scale_factor).float()
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).sum() / x.shape[0]
        loss = (rec - x).abs().mean() + (rec - x).square().mean() + kl_weight * kl
        optimize(opt, loss, params, cosine_lr(step, steps, lr, warmup=min(50, steps // 4 + 1)))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if log and step % 100 == 0:
            log(f"vae step {step} loss {loss.item():.4f}")
    return enc.eval(), dec.eval(), losses


def finetune_decoder(enc: VAEEncoder, dec: VAEDecoder, pixels: torch.Tensor, steps: int, batch: int = 8,
                     lr: float = 5e-4, seed: int = 0, progress: bool = True, log=None, device="cpu"):
    """Train the decoder alone on whole images, the encoder frozen: the crops of `train_vae` leave colours and the
    image borders short of what whole pictures need. The latents (what the UNets learn) do not change, so this
    stage is independent of the UNets'. It starts from the weights as saved (float16), so the decoder of a written
    checkpoint can be refined after the fact with the same result. Returns (decoder, losses). (The channels-last
    layout, faster here in a micro-benchmark, was slower in the training loop: 0.75 s a step against 0.70.)"""
    torch.manual_seed(seed)
    enc, dec = rounded(enc).eval().requires_grad_(False), rounded(dec)
    opt = torch.optim.AdamW(dec.parameters(), lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    bar = tqdm(range(steps), desc="decoder", disable=None if progress else True)
    for step in bar:
        x = pixels[torch.randint(0, len(pixels), (batch,), generator=gen)].to(device)
        with torch.no_grad():
            mean, logvar = enc(x)
            z = mean + torch.exp(0.5 * logvar) * cpu_randn(mean.shape, gen, device)
        rec = dec(z * dec.cfg.scale_factor)
        loss = (rec - x).abs().mean() + (rec - x).square().mean()
        optimize(opt, loss, list(dec.parameters()), cosine_lr(step, steps, lr, warmup=min(50, steps // 4 + 1)))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if log and step % 100 == 0:
            log(f"decoder step {step} loss {loss.item():.4f}")
    return dec.eval(), losses


@torch.no_grad()
def encode(enc: VAEEncoder, pixels: torch.Tensor, batch: int = 64,
           channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (mean, std) of the unscaled latent Gaussian for every image. `channels_last` (the bfloat16 recipe's): the
    convolutions in that layout (float32, other rounding): both training sets in 108 s against 153 on the 2-core
    CPU."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    enc = copy.deepcopy(enc).to(memory_format=layout) if channels_last else enc
    means, stds = [], []
    device = next(enc.parameters()).device
    for x in pixels.split(batch):
        m, lv = enc(x.to(device, memory_format=layout))
        means.append(m.cpu().contiguous())
        stds.append(torch.exp(0.5 * lv).cpu().contiguous())
    return torch.cat(means), torch.cat(stds)


def caption_ids(tok: CLIPTokenizer, items) -> torch.Tensor:
    """(N, variants, 77) token ids of every item's caption variants."""
    texts = sorted({c for _, _, caps in items for c in caps})
    table = dict(zip(texts, tok(texts)))
    return torch.stack([torch.stack([table[c] for c in caps]) for _, _, caps in items])


def object_spans(tok: CLIPTokenizer, items) -> torch.Tensor:
    """(N, variants, 2): where each caption variant's object word sits among its token ids (start, length);
    (0, 0) for a caption without an object. BPE splits each word on its own, so the word's ids are contiguous."""
    def span(obj: str, cap: str) -> list:
        word = tok([obj])[0]
        word = word[1:int((word == word[-1]).nonzero()[0])].tolist()  # between bos and the first eos
        row = tok([cap])[0].tolist()
        return [next(j for j in range(1, len(row)) if row[j:j + len(word)] == word), len(word)]

    table = {(obj, cap): span(obj, cap) for _, obj, caps in items if obj is not None for cap in caps}
    spans = torch.zeros(len(items), max(len(caps) for _, _, caps in items), 2, dtype=torch.long)
    for i, (_, obj, caps) in enumerate(items):
        for v, cap in enumerate(caps if obj is not None else []):
            spans[i, v] = torch.tensor(table[obj, cap])
    return spans


def untaught_ids(tok: CLIPTokenizer, items) -> torch.Tensor:
    """Token ids that no caption of `items` uses (pass both models' items): the vocabulary's byte symbols and
    partial merges, whose embeddings stay as initialised, like an animal's name in the general model."""
    used = set(caption_ids(tok, items).unique().tolist())
    return torch.tensor(sorted(set(range(tok.vocab_size)) - used))


def replace_objects(ids: torch.Tensor, spans: torch.Tensor, pool: torch.Tensor, rate: float,
                    gen: torch.Generator) -> torch.Tensor:
    """Unknown-word augmentation: in a share `rate` of the captions that name an object, the object's word is
    swapped for one or two ids drawn from `pool`, so the model learns to keep drawing the scene its caption names
    around a word it was never taught (what a general model meets in a fusion prompt: "a lion on the beach")."""
    hit = (torch.rand(len(ids), generator=gen) < rate) & (spans[:, 1] > 0)
    lengths = torch.randint(1, 3, (len(ids),), generator=gen)
    picks = pool[torch.randint(0, len(pool), (len(ids), 2), generator=gen)]
    out = ids.clone()
    for i in hit.nonzero().flatten().tolist():
        row, (start, n) = ids[i].tolist(), spans[i].tolist()
        new = row[:start] + picks[i, :lengths[i]].tolist() + row[start + n:]
        out[i] = torch.tensor((new + [row[-1]] * len(row))[:len(row)])  # re-padded with eos (the last id)
    return out


def diffusion_loss(unet, text, z0, ids, t, noise, snr_gamma: float = 0.0) -> torch.Tensor:
    """SD's objective: || eps - eps_theta(sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, t, text) ||^2.
    `snr_gamma` > 0 weights each image by min(SNR_t, gamma) / SNR_t, SNR_t = abar_t / (1 - abar_t): Min-SNR-gamma
    for epsilon prediction (Hang et al. 2023, arXiv 2303.09556, eq. 7 and Table 1), which lowers the weight of the
    nearly clean timesteps (SNR_t > gamma, here t < 130 or so for gamma 5) and leaves the others at 1."""
    abar = alphas_cumprod().to(z0.device)[t][:, None, None, None]
    x_t = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
    eps = unet(x_t, t, text(ids))
    if not snr_gamma:
        return F.mse_loss(eps, noise)
    snr = abar / (1 - abar)
    return (snr.clamp(max=snr_gamma) / snr * (eps.float() - noise) ** 2).mean()


def train_unet(mean, std, scale: float, ids: torch.Tensor, uncond: torch.Tensor, vocab_size: int, steps: int,
               batch: int = 32, lr: float = 6e-4, seed: int = 0, dropout: float = 0.1, ema_decay: float = 0.998,
               name: str = "unet", progress: bool = True, log=None, train_text: bool = True, init=None,
               device="cpu", train_embeddings: bool = True, unknown: float = 0.0, spans=None, pool=None,
               bf16: bool = False, snr_gamma: float = 0.0, frozen_down: bool = False):
    """Train a UNet with its own text encoder; returns (EMA unet, EMA text encoder, losses), on the CPU.
    `init`: a (unet, text encoder) pair to start from (fine-tuning) instead of a fresh initialisation.
    `train_embeddings=False` keeps the token embedding table as initialised (the rest of the encoder trains);
    `unknown` > 0 applies `replace_objects` with `spans` (from `object_spans`) and `pool` to the captions.
    `bf16`: the forward and backward passes under bfloat16 autocast (convolutions and matrix products in bfloat16,
    the weights, optimizer and EMA in float32): about 15% less time a step on the 2-core CPU, other weights. On
    the CPU its attention takes the plain softmax(QK^T)V kernel (`attention` below): 5-10% less again.
    `snr_gamma` > 0: the Min-SNR-gamma weighting of `diffusion_loss` (the losses returned are weighted).
    `frozen_down`: the UNet's time embedding, input blocks and middle block keep their `init` weights (no
    gradients, no weight decay); its output blocks and the text encoder train. Backpropagation then stops at the
    middle block, except through the input blocks' cross-attention to the trained text: 0.36-0.39 s a step
    against 0.40-0.45 under bfloat16 in the training loop on the 2-core CPU (docs/toyworld.md)."""
    torch.manual_seed(seed)
    unet = UNetModel(UNET)
    zero_init_outputs_(unet)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, width=WIDTH, layers=TEXT_LAYERS))
    with torch.no_grad():
        text.text_model.embeddings.token_embedding.weight.normal_(0, 0.02)
        text.text_model.embeddings.position_embedding.weight.normal_(0, 0.01)
    if init is not None:
        unet.load_state_dict(init[0].state_dict(), strict=True)
        text.load_state_dict(init[1].state_dict(), strict=True)
    unet, text = unet.to(device), text.to(device)
    text.requires_grad_(train_text)
    text.text_model.embeddings.token_embedding.requires_grad_(train_text and train_embeddings)
    if frozen_down:
        for part in (unet.time_embed, unet.input_blocks, unet.middle_block):
            part.requires_grad_(False)
    params = [p for p in (*unet.parameters(), *text.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr, weight_decay=0.01)
    ema = EMA([unet, text], ema_decay)
    gen = torch.Generator().manual_seed(seed)
    # PyTorch's CPU flash-attention kernel is slow in bfloat16 for these short sequences (its backward most: 2-6x
    # the plain softmax(QK^T)V on the 2-core CPU), so bfloat16 steps on the CPU take the plain ("math") path
    on_cpu_bf16 = bf16 and torch.device(device).type == "cpu"
    attention = sdpa_kernel(SDPBackend.MATH) if on_cpu_bf16 else contextlib.nullcontext()
    losses = []
    bar = tqdm(range(steps), desc=name, disable=None if progress else True)
    with attention:
        for step in bar:
            idx = torch.randint(0, len(mean), (batch,), generator=gen)
            z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
            variant = torch.randint(0, ids.shape[1], (batch,), generator=gen)
            b_ids = ids[idx, variant]
            if unknown > 0:  # drawn only when used, so the draws of a run without it are unchanged
                b_ids = replace_objects(b_ids, spans[idx, variant], pool, unknown, gen)
            drop = torch.rand(batch, generator=gen) < dropout
            b_ids = torch.where(drop[:, None], uncond[None], b_ids)
            t = torch.randint(0, 1000, (batch,), generator=gen)
            noise = torch.randn(z0.shape, generator=gen)
            # every random draw comes from the CPU generator, so a GPU run sees the same batches and noise
            z0, b_ids, t, noise = (v.to(device) for v in (z0, b_ids, t, noise))
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                loss = diffusion_loss(unet, text, z0, b_ids, t, noise, snr_gamma)
            optimize(opt, loss, params, cosine_lr(step, steps, lr))
            ema.update()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
            if log and step % 200 == 0:
                log(f"{name} step {step} loss(avg50) {np.mean(losses[-50:]):.4f}")
    return ema.shadow[0].cpu().eval(), ema.shadow[1].cpu().eval(), losses


def checkpoint_has(path, prefixes) -> bool:
    """Whether `path` is a safetensors file with keys under every one of `prefixes` (read from its header only)."""
    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except Exception:  # missing, unreadable, or not safetensors: safetensors raises several kinds
        return False
    return all(any(k.startswith(p) for k in keys) for p in prefixes)


def load_prefixed(sd: dict, module, prefix: str):
    """Fill `module` strictly from the keys of `sd` under `prefix` (as float32); returns it in eval mode."""
    module.load_state_dict({k: sd[prefix + k].float() for k in module.state_dict()}, strict=True)
    return module.eval()


def load_vae(path) -> tuple:
    """(encoder, decoder, latent scale factor) of a checkpoint this script wrote."""
    sd = load_file(str(path))
    return (load_prefixed(sd, VAEEncoder(VAE), "first_stage_model."),
            load_prefixed(sd, VAEDecoder(VAE), "first_stage_model."), float(sd["scale_factor"]))


def load_unet_text(path, vocab_size: int) -> tuple:
    """(UNet, text encoder) of a checkpoint this script wrote."""
    sd = load_file(str(path))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, width=WIDTH, layers=TEXT_LAYERS))
    return (load_prefixed(sd, UNetModel(UNET), "model.diffusion_model."),
            load_prefixed(sd, text, "cond_stage_model.transformer."))


def rounded(module):
    """A copy of `module` with its weights rounded to float16 and back, as a checkpoint stores them."""
    module = copy.deepcopy(module)
    module.load_state_dict({k: v.half().float() for k, v in module.state_dict().items()})
    return module


def checkpoint_dict(unet, text, enc, dec, scale: float, dtype=torch.float16) -> dict:
    sd = {}
    for prefix, module in (("model.diffusion_model.", unet), ("cond_stage_model.transformer.", text),
                           ("first_stage_model.", enc), ("first_stage_model.", dec)):
        sd.update({prefix + k: v.detach().to("cpu", dtype).contiguous() for k, v in module.state_dict().items()})
    sd["scale_factor"] = torch.tensor(scale, dtype=torch.float32)  # LDM's buffer when the scale comes from data
    return sd


def write_atomic(sd: dict, path: Path, meta: dict) -> None:
    tmp = path.with_name(f".{path.name}.{time.time_ns()}.tmp")
    save_file(sd, str(tmp), metadata=meta)
    tmp.replace(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: weights/toy)")
    p.add_argument("--per-animal", type=int, default=200, help="expert training images per animal")
    p.add_argument("--per-pair", type=int, default=60, help="general training images per (scene, object) pair")
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--decoder-steps", type=int, default=1000, help="whole-image steps of the decoder alone")
    p.add_argument("--unet-steps", type=int, default=2200, help="steps of the general UNet (default 2200)")
    p.add_argument("--float32", action="store_true",
                   help="every step in float32 and the scale factor from an encoding pass of its own (default: the "
                        "VAE's and the UNets' steps under bfloat16 autocast, the encoding in the channels-last "
                        "layout, the scale factor from the UNets' latents; docs/toyworld.md says what each costs)")
    p.add_argument("--general-float32", action="store_true",
                   help="train the general UNet in float32, the VAE and the expert in bfloat16 (about 3 minutes "
                        "more on the 2-core CPU)")
    p.add_argument("--models", nargs="+", choices=("general", "expert"), default=["general", "expert"],
                   help="the UNets to train (default: both)")
    p.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="start each trained UNet and text encoder from this checkpoint's (fine-tuning)")
    p.add_argument("--vae-from", default=None, metavar="CHECKPOINT",
                   help="take the VAE and its latent scale factor from a written checkpoint instead of training "
                        "one (to retrain UNets on the shipped VAE)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    p.add_argument("--frozen-text", choices=("both", "general", "expert"), default=None,
                   help="keep these models' text encoders at their random initialisation (default: train both)")
    p.add_argument("--frozen-embeddings", choices=("none", "both", "general", "expert"), default="general",
                   help="keep these models' token embedding tables at their random initialisation, the rest of "
                        "the text encoder trained (default: general, so that every word it never saw stays as "
                        "random as the untaught ids of --unknown-words)")
    p.add_argument("--unknown-words", type=float, default=0.25, metavar="RATE",
                   help="share of the general model's object captions whose object word is swapped for one or "
                        "two untaught token ids (default: 0.25; 0: none)")
    p.add_argument("--expert-backdrops", type=float, default=0.5, metavar="RATE",
                   help="share of the expert's UNet training images drawn in front of a plain backdrop of a random "
                        "colour instead of the light studio (default 0.5; 0 for none)")
    p.add_argument("--expert-rounds", type=int, default=3, metavar="N",
                   help="fine-tune the expert in N rounds of --unet-steps (default 3), round r from round r-1's "
                        "weights with seed --seed + r (new renders and batches)")
    p.add_argument("--backdrop-detail", type=int, default=4, metavar="K",
                   help="the last round's random backdrops: a smooth field through a k x k grid of random colours, "
                        "k drawn from 1..K (default 4); 1: a plain colour each, as in the earlier rounds")
    p.add_argument("--expert-steps", type=int, default=2400, metavar="N",
                   help="steps of each expert round (default 2400)")
    p.add_argument("--expert-min-snr", type=float, default=5.0, metavar="GAMMA",
                   help="weight the expert's loss by Min-SNR-gamma (Hang et al. 2023), as SD fine-tuning scripts "
                        "offer (default 5, the paper's; 0: plain epsilon MSE)")
    p.add_argument("--general-min-snr", type=float, default=5.0, metavar="GAMMA",
                   help="weight the general model's loss by Min-SNR-gamma (default 5; 0: plain epsilon MSE, which "
                        "left 2,200-step general models drawing 40-98%% of their scenes right, docs/toyworld.md)")
    p.add_argument("--expert-frozen-down", action="store_true",
                   help="fine-tune only the expert UNet's output blocks (and its text encoder): the time "
                        "embedding, input blocks and middle block stay as the general model has them; a few percent "
                        "less time a step (default: the whole UNet trains)")
    p.add_argument("--expert-from-scratch", action="store_true",
                   help="train the expert from a fresh initialisation (default: the general model is trained "
                        "first and the expert is fine-tuned from it as written, as real experts are fine-tunes "
                        "of a general model)")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where the networks train; the random draws come "
                   "from CPU generators either way (default: cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    progress = not a.quiet
    finetune_expert = not a.expert_from_scratch
    try:
        toyworld.font_path()
    except toyworld.FontMissing as e:
        print(f"train_toy: error: {e}", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device not in ("cpu", "cuda") or (a.device == "cuda" and not torch.cuda.is_available()):
        print(f"train_toy: error: --device {a.device} is not available here; use --device cpu", file=sys.stderr)
        return 2
    dev = torch.device(a.device)
    if finetune_expert and a.models == ["expert"] and not a.init_from:
        print("train_toy: error: the expert is fine-tuned from the general model: train both (--models general "
              "expert), pass the general checkpoint with --init-from, or add --expert-from-scratch", file=sys.stderr)
        return 2
    if a.expert_frozen_down and a.expert_from_scratch and not a.init_from:
        print("train_toy: error: --expert-frozen-down keeps the expert's input blocks as it starts, and "
              "--expert-from-scratch starts them random; drop one of the two", file=sys.stderr)
        return 2
    for flag, path, needs in (("--vae-from", a.vae_from, ("first_stage_model.encoder.", "scale_factor")),
                              ("--init-from", a.init_from, ("model.diffusion_model.", "cond_stage_model."))):
        if path and not checkpoint_has(path, needs):
            print(f"train_toy: error: {flag} {path} is not a checkpoint written by this script (no {' or '.join(needs)} "
                  f"keys, or not a safetensors file); pass one such as weights/toy/general.safetensors", file=sys.stderr)
            return 2
    for flag, rate in (("--unknown-words", a.unknown_words), ("--expert-backdrops", a.expert_backdrops)):
        if not 0 <= rate <= 1:
            print(f"train_toy: error: {flag} {rate} is not a share; pass a number in 0..1", file=sys.stderr)
            return 2
    if a.general_float32 and a.float32:
        print("train_toy: error: --float32 already trains every step in float32; drop --general-float32 (or "
              "--float32, to keep the VAE and the expert in bfloat16)", file=sys.stderr)
        return 2
    bf16 = not a.float32
    for flag, gamma in (("--expert-min-snr", a.expert_min_snr), ("--general-min-snr", a.general_min_snr)):
        if not 0 <= gamma <= 1000:
            print(f"train_toy: error: {flag} {gamma:g} is out of range; pass a gamma in 0..1000 (5 is the paper's; "
                  "0 turns the weighting off)", file=sys.stderr)
            return 2
    for flag, value, top, what in (("--expert-rounds", a.expert_rounds, 10, "a count"),
                                   ("--expert-steps", a.expert_steps, 100000, "a step count"),
                                   ("--backdrop-detail", a.backdrop_detail, 16, "a grid size")):
        if not 1 <= value <= top:
            print(f"train_toy: error: {flag} {value} is out of range; pass {what} in 1..{top}", file=sys.stderr)
            return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    tok = write_tokenizer(out / "tokenizer")
    vocab = tok.vocab_size
    log(f"tokenizer: {vocab} ids")
    items = {"expert": expert_items(a.per_animal), "general": general_items(a.per_pair)}
    if a.vae_from:  # only the sets whose UNets are trained
        items = {k: v for k, v in items.items() if k in a.models}
    seeds = {k: render_seed(k, a.seed) for k in items}
    rounds = a.expert_rounds if "expert" in items else 1

    def detail(r):  # the expert's backdrops in round r: fields of colour in the last round only
        return a.backdrop_detail if r == rounds - 1 else 1

    colours = {"expert": backdrops(len(items["expert"]), a.expert_backdrops, a.seed, detail(0))} \
        if "expert" in items else {}
    unet_pixels = {k: render_items(v, seeds[k], progress, colours.get(k)) for k, v in items.items()}
    log(f"rendered {', '.join(f'{k}: {len(v)}' for k, v in unet_pixels.items())}"
        + (f" (expert backdrops recoloured: {sum(c is not None for c in colours['expert'])})" if colours else ""))

    if a.vae_from:
        enc, dec, scale = load_vae(a.vae_from)
        enc, dec = enc.to(dev), dec.to(dev)
        report = {"vae_from": a.vae_from, "scale_factor": scale}
        latents = {k: encode(enc, v, channels_last=bf16) for k, v in unet_pixels.items()}
        log(f"vae from {a.vae_from}, latent scale factor {scale:.5f}")
    else:
        # the VAE learns the world as rendered: the expert's images again, without their recoloured backdrops
        recoloured = {k for k, c in colours.items() if any(x is not None for x in c)}
        pixels = {k: render_items(v, seeds[k], progress) if k in recoloured else unet_pixels[k]
                  for k, v in items.items()}
        everything = torch.cat(list(pixels.values()))
        enc, dec, vae_losses = train_vae(everything, a.vae_steps, seed=a.seed, progress=progress, log=log, device=dev,
                                         bf16=bf16)
        dec, dec_losses = finetune_decoder(enc, dec, everything, a.decoder_steps, seed=a.seed + 3,
                                           progress=progress, log=log, device=dev)
        del everything
        # the UNets learn the latents of the encoder as the checkpoints hold it (float16), which is what a run
        # with --vae-from gives them: a whole run and the stage-by-stage path train the same UNets
        unrounded, enc = enc, rounded(enc)
        latents = {k: encode(enc, v, channels_last=bf16) for k, v in unet_pixels.items()}
        # LDM's scale rule: the float32 recipe applies it to a pass of its own (the unrounded encoder, the sets as
        # rendered); the bfloat16 one to the UNets' latents, one pass fewer (2.5 minutes less on the 2-core CPU)
        scale_from = latents if bf16 else {k: encode(unrounded, v) for k, v in pixels.items()}
        all_z = torch.cat([m + s * torch.randn(m.shape, generator=torch.Generator().manual_seed(a.seed))
                           for m, s in scale_from.values()])
        scale = float(1 / all_z.flatten().std())
        log(f"vae: final loss {np.mean(vae_losses[-50:]):.4f}, latent scale factor {scale:.5f}")
        report = {"vae_loss": float(np.mean(vae_losses[-50:])), "decoder_loss": float(np.mean(dec_losses[-50:])),
                  "scale_factor": scale}

    uncond = tok([""])[0]
    pool = untaught_ids(tok, expert_items(1) + general_items(1))
    trained = {}
    for name in ("general", "expert") if finetune_expert else ("expert", "general"):
        if name not in a.models:
            continue
        ids = caption_ids(tok, items[name])
        m, s = latents[name]
        init = None
        unknown = a.unknown_words if name == "general" else 0.0  # the expert's captions hold no word to swap
        unet_bf16 = bf16 and not (name == "general" and a.general_float32)
        gamma = a.expert_min_snr if name == "expert" else a.general_min_snr
        if a.init_from:
            init = load_unet_text(a.init_from, vocab)
        elif finetune_expert and name == "expert":
            # the fine-tune starts from the general model as written (float16), exactly what
            # `--vae-from general.safetensors --init-from general.safetensors` gives
            init = tuple(rounded(x) for x in trained["general"])
        started_from = init
        for r in range(rounds if name == "expert" else 1):
            if r > 0:  # the next round: new renders (with this round's backdrops) and batches, from the last
                # round's weights as a checkpoint holds them, as `--init-from LAST --seed SEED+r` would give
                colours = backdrops(len(items[name]), a.expert_backdrops, a.seed + r, detail(r))
                m, s = encode(enc, render_items(items[name], render_seed(name, a.seed + r), progress, colours),
                              channels_last=bf16)
                init = tuple(rounded(x) for x in (unet, text))
                log(f"{name} round {r + 1} of {rounds}: rendered {len(items[name])} (backdrops recoloured: "
                    f"{sum(c is not None for c in colours)}, detail {detail(r)})")
            steps = a.expert_steps if name == "expert" else a.unet_steps
            unet, text, losses = train_unet(m, s, scale, ids, uncond, vocab, steps,
                                            seed=a.seed + r + (10 if name == "expert" else 11), name=name,
                                            progress=progress, log=log,
                                            train_text=a.frozen_text not in ("both", name), init=init, device=dev,
                                            train_embeddings=a.frozen_embeddings not in ("both", name),
                                            unknown=unknown, pool=pool, bf16=unet_bf16,
                                            snr_gamma=gamma,
                                            frozen_down=a.expert_frozen_down and name == "expert",
                                            spans=object_spans(tok, items[name]) if unknown else None)
        trained[name] = (unet, text)
        meta = {"magicfusion": f"toy world {name} model, tools/train_toy.py seed {a.seed}",
                "training": (f"{rounds} rounds of " if name == "expert" and rounds > 1 else "")
                            + f"{steps} steps" + (" under bfloat16 autocast" if unet_bf16 else "")
                            + (f", Min-SNR-gamma {gamma:g}" if gamma else "")
                            + (", input and middle blocks frozen" if name == "expert" and a.expert_frozen_down
                               else "")
                            + f", final loss {np.mean(losses[-200:]):.4f}"
                            + (f", fine-tuned from {Path(a.init_from or 'general.safetensors').name}"
                               if started_from is not None else "")
                            + (", frozen text encoder" if a.frozen_text in ("both", name) else "")
                            + (", frozen token embeddings" if a.frozen_embeddings in ("both", name) else "")
                            + (f", unknown words {a.unknown_words:g}" if name == "general" and a.unknown_words
                               else "")
                            + (f", random backdrops {a.expert_backdrops:g}" if name == "expert" and a.expert_backdrops
                               else "")
                            + (f", backdrop detail {a.backdrop_detail}" + (" in the last round" if rounds > 1 else "")
                               if name == "expert" and a.expert_backdrops and a.backdrop_detail > 1 else "")}
        write_atomic(checkpoint_dict(unet, text, enc, dec, scale), out / f"{name}.safetensors", meta)
        report[f"{name}_loss"] = float(np.mean(losses[-200:]))
        log(f"{name}: final loss(avg200) {report[f'{name}_loss']:.4f}; wrote {out / (name + '.safetensors')}")

    log(f"done in {time.time() - t0:.0f} s: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
