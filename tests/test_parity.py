"""Parity with the reference implementations (diffusers / transformers) on the same random weights, float32 CPU.

Per module: UNet noise prediction, text-encoder hidden states (with clip_skip), VAE decode, DDIM timesteps and
steps (the other samplers' steps: test_samplers.py). End to end: `magicfusion.generate` against diffusers'
StableDiffusionPipeline with the same seed, from an LDM single file and from a diffusers folder, and with each
sampler against the pipeline on the matching scheduler, within 1/255 per pixel. One test runs SD 1.5's full shapes.
"""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import magicfusion
from magicfusion import schedule
from magicfusion.samplers import ddim, ddim_plan
from magicfusion.clip import CLIPTextModel
from tools.random_weights import CONFIGS, perturb_, random_state_dict, write_checkpoint
from tools.random_weights import write_tiny_vocab
from magicfusion.unet import UNetConfig, UNetModel
from magicfusion.vae import VAEConfig, VAEDecoder
from oracle import ddim_scheduler, diffusers_unet, diffusers_vae, hf_clip, reference_pipeline, reference_scheduler

TOL = dict(rtol=1e-5, atol=1e-5)


def close(ours, ref, scale_tol=1e-5):
    """Agreement relative to the output's magnitude (random weights make activations of order 1..10)."""
    err = (ours - ref).abs().max().item()
    assert err <= scale_tol * max(1.0, ref.abs().max().item()), f"max abs err {err}"


UNET_CASES = {
    "tiny": CONFIGS["tiny"][0],
    "3 levels, last without attention, 2 res blocks": UNetConfig(model_channels=32, channel_mult=(1, 2, 2),
                                                                 num_res_blocks=2, attention_levels=(0, 1),
                                                                 context_dim=64, transformer_depth=2),
}


@pytest.mark.parametrize("name", list(UNET_CASES))
def test_unet_matches_diffusers(name):
    cfg = UNET_CASES[name]
    ours = perturb_(UNetModel(cfg), torch.Generator().manual_seed(1)).eval()
    assert UNetConfig.from_state_dict(ours.state_dict()) == cfg
    ref = diffusers_unet(cfg, ours.state_dict())
    g = torch.Generator().manual_seed(2)
    ctx = torch.randn(2, 77, cfg.context_dim, generator=g)
    with torch.no_grad():
        for size in ((16, 24), (9, 13)):  # the second is not a multiple of the UNet's downsampling
            x = torch.randn(2, 4, *size, generator=g)
            for t in (torch.tensor([981, 1]), torch.tensor(500)):
                close(ours(x, t, ctx), ref(x, t, ctx).sample)


def test_text_encoder_matches_transformers():
    cfg = CONFIGS["tiny"][1]
    ours = perturb_(CLIPTextModel(cfg), torch.Generator().manual_seed(3)).eval()
    ref = hf_clip(cfg, ours.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 77), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        close(ours(ids), out.last_hidden_state)
        final_norm = ref.get_submodule("text_model.final_layer_norm" if hasattr(ref, "text_model") else "final_layer_norm")
        for skip in (1, 2):
            close(ours(ids, clip_skip=skip), final_norm(out.hidden_states[-(skip + 1)]))


def test_vae_decoder_matches_diffusers():
    cfg = VAEConfig(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1)
    ours = perturb_(VAEDecoder(cfg), torch.Generator().manual_seed(5)).eval()
    assert VAEConfig.from_state_dict(ours.state_dict()) == cfg
    ref = diffusers_vae(cfg, ours.state_dict())
    z = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        close(ours(z), ref.decode(z / cfg.scale_factor).sample)


@pytest.mark.parametrize("steps", [1, 7, 50, 333, 500, 999])
def test_ddim_timesteps_and_alphas(steps):
    sched = ddim_scheduler()
    sched.set_timesteps(steps)
    ours = ddim_plan(steps, 0.0)
    assert torch.equal(ours.t, sched.timesteps.float())
    assert torch.equal(ours.c[:, 0], sched.alphas_cumprod[sched.timesteps])
    assert torch.equal(schedule.alphas_cumprod(), sched.alphas_cumprod)


def test_ddim_1000_steps_clamps_first_timestep():
    t = schedule.timesteps(1000)
    assert t[0] == 999 and t[1] == 999 and t[-1] == 1 and len(t) == 1000


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_matches_diffusers(eta):
    steps = 10
    sched = ddim_scheduler()
    sched.set_timesteps(steps)
    s = ddim_plan(steps, eta)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(sched.timesteps):
        eps, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        ref = sched.step(eps, t, x, eta=eta, variance_noise=noise if eta else None).prev_sample
        ours, _ = ddim(x, eps, s.c[i], noise if eta else None, None)
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
        x = ref


# --- end to end -------------------------------------------------------------------------------------------

def skipped_embeddings(pipe, text, skip):
    """The reference's clip_skip: the hidden state `skip` layers before the last, then the final layer norm."""
    ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    enc = pipe.text_encoder
    hidden = enc(ids, output_hidden_states=True).hidden_states[-(skip + 1)]
    return enc.get_submodule("text_model.final_layer_norm" if hasattr(enc, "text_model") else "final_layer_norm")(hidden)


def pixels(images):
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def assert_same_images(ours, ref):
    diff = np.abs(pixels(ours) - pixels(ref))
    assert diff.max() <= 1, f"max pixel difference {diff.max()} (/255), mean {diff.mean():.4f}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    write_tiny_vocab(d)
    return write_checkpoint(d / "model.safetensors", "tiny", seed=11), d


E2E = [dict(prompt="a lion with a crown", steps=4, height=64, width=64, seed=0),
       dict(prompt="a bee making honey", negative_prompt="blurry", steps=3, height=48, width=80, seed=123,
            guidance=5.0, batch=2),
       dict(prompt="an astronaut", steps=3, height=64, width=64, seed=2 ** 40, eta=0.8, batch=2),
       dict(prompt="a red car", steps=2, height=64, width=64, seed=9, clip_skip=1)]


@pytest.mark.parametrize("kw", E2E, ids=[k["prompt"] for k in E2E])
def test_generate_matches_stable_diffusion_pipeline(tiny, kw):
    path, tokdir = tiny
    model = magicfusion.load(path, tokenizer=tokdir)
    ours = magicfusion.generate(model, progress=False, **kw)
    kw = dict(kw)
    pipe = reference_pipeline(model, tokdir)
    texts = dict(prompt=kw.pop("prompt"), negative_prompt=kw.pop("negative_prompt", ""))
    skip = kw.pop("clip_skip", 0)
    if skip:  # the pipeline's own clip_skip path expects transformers 4's module layout: embed by hand
        texts = {f"{k}_embeds": skipped_embeddings(pipe, v, skip) for k, v in texts.items()}
    ref = pipe(**texts, num_inference_steps=kw.pop("steps"),
               guidance_scale=kw.pop("guidance", 7.5), eta=kw.pop("eta", 0.0), height=kw.pop("height"),
               width=kw.pop("width"), num_images_per_prompt=kw.pop("batch", 1),
               generator=torch.Generator("cpu").manual_seed(kw.pop("seed"))).images
    assert not kw
    assert_same_images(ours, ref)


SAMPLER_CASES = [("ddim", False), ("dpmpp-2m", False), ("dpmpp-2m", True), ("euler", False), ("euler", True),
                 ("euler-a", False)]


@pytest.mark.parametrize("sampler, karras", SAMPLER_CASES)
def test_each_sampler_matches_the_pipeline_on_its_scheduler(tiny, sampler, karras):
    """DDIMScheduler, DPMSolverMultistepScheduler (dpmsolver++, order 2), EulerDiscreteScheduler (both with and
    without Karras sigmas) and EulerAncestralDiscreteScheduler, each built from SD's scheduler config."""
    path, tokdir = tiny
    model = magicfusion.load(path, tokenizer=tokdir)
    kw = dict(steps=5, height=64, width=64, seed=4, batch=2)
    ours = magicfusion.generate(model, "a lion with a crown", sampler=sampler, karras=karras, progress=False, **kw)
    pipe = reference_pipeline(model, tokdir)
    pipe.scheduler = reference_scheduler(sampler, karras)
    ref = pipe("a lion with a crown", num_inference_steps=5, height=64, width=64, num_images_per_prompt=2,
               generator=torch.Generator("cpu").manual_seed(4)).images
    assert_same_images(ours, ref)
    # the sampler was used: DDIM gives another image (but for Euler on the same timesteps: deterministic DDIM is
    # Euler's method in sigma, Karras et al. 2022, Sec. 3, and the two end only abar_0 apart)
    other = magicfusion.generate(model, "a lion with a crown", progress=False, **kw)
    assert sampler in ("ddim", "euler") or np.abs(pixels(ours) - pixels(other)).max() > 1


def test_generate_from_diffusers_folder_matches_pipeline(tiny, tmp_path):
    path, tokdir = tiny
    model = magicfusion.load(path, tokenizer=tokdir)
    pipe = reference_pipeline(model, tokdir)
    pipe.save_pretrained(tmp_path / "folder")
    folder_model = magicfusion.load(tmp_path / "folder")  # brings its own tokenizer/
    kw = dict(steps=3, height=64, width=72, seed=5)
    ours = magicfusion.generate(folder_model, "a castle on a hill", progress=False, **kw)
    ref = pipe("a castle on a hill", num_inference_steps=3, height=64, width=72,
               generator=torch.Generator("cpu").manual_seed(5)).images
    assert_same_images(ours, ref)
    assert np.array_equal(pixels(ours), pixels(magicfusion.generate(model, "a castle on a hill", progress=False, **kw)))


def test_ckpt_and_fp16_files_load_the_same_weights(tiny, tmp_path):
    path, tokdir = tiny
    model = magicfusion.load(path, tokenizer=tokdir)
    sd = random_state_dict("tiny", seed=11)
    torch.save({"state_dict": sd, "global_step": 1}, tmp_path / "m.ckpt")
    save_file({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, str(tmp_path / "h.safetensors"))
    from_ckpt = magicfusion.load(tmp_path / "m.ckpt", tokenizer=tokdir)
    for a, b in zip(model.unet.state_dict().values(), from_ckpt.unet.state_dict().values()):
        assert torch.equal(a, b)
    half = magicfusion.load(tmp_path / "h.safetensors", tokenizer=tokdir, dtype=torch.float16)
    assert half.dtype == torch.float16
    for a, b in zip(model.vae.state_dict().values(), half.vae.state_dict().values()):
        assert torch.equal(a.half(), b)


def test_ema_weights_are_used_only_when_asked(tiny, tmp_path):
    path, tokdir = tiny
    sd = random_state_dict("tiny", seed=11)
    unet_keys = [k for k in sd if k.startswith("model.diffusion_model.")]
    for k in unet_keys:  # LitEma's flattened names, holding different weights
        sd["model_ema." + k[len("model."):].replace(".", "")] = sd[k] + 1.0
    sd["model_ema.decay"], sd["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(10)
    save_file(sd, str(tmp_path / "ema.safetensors"))
    plain = magicfusion.load(tmp_path / "ema.safetensors", tokenizer=tokdir)
    ema = magicfusion.load(tmp_path / "ema.safetensors", tokenizer=tokdir, ema=True)
    k = "input_blocks.0.0.weight"
    assert torch.equal(plain.unet.state_dict()[k], sd["model.diffusion_model." + k])
    assert torch.equal(ema.unet.state_dict()[k], sd["model.diffusion_model." + k] + 1.0)
    with pytest.raises(magicfusion.InputError, match="no EMA"):
        magicfusion.load(path, tokenizer=tokdir, ema=True)


def test_every_checkpoint_key_is_consumed_or_deliberately_ignored(tiny):
    path, tokdir = tiny
    model = magicfusion.load(path, tokenizer=tokdir)
    sd = random_state_dict("tiny", seed=11)
    consumed = {"model.diffusion_model." + k for k in model.unet.state_dict()}
    consumed |= {"cond_stage_model.transformer." + k for k in model.text_encoder.state_dict()}
    consumed |= {"first_stage_model." + k for k in model.vae.state_dict()}
    assert consumed <= set(sd)
    assert set(sd) - consumed == {"alphas_cumprod", "cond_stage_model.transformer.text_model.embeddings.position_ids"}
    for k in consumed:
        prefix, _, rest = k.partition(".diffusion_model." if k.startswith("model.") else
                                      (".transformer." if k.startswith("cond_") else "_model."))
        part = {"model": model.unet, "cond_stage_model": model.text_encoder, "first_stage": model.vae}[prefix]
        assert torch.equal(part.state_dict()[rest], sd[k]), k


def test_full_size_sd15_matches_pipeline(tmp_path):
    """The real shapes: an 860M-parameter UNet, CLIP ViT-L/14's text tower, the full VAE decoder (random)."""
    write_tiny_vocab(tmp_path)
    path = write_checkpoint(tmp_path / "sd15.safetensors", "sd15", seed=3, dtype=torch.float16)
    model = magicfusion.load(path, tokenizer=tmp_path)
    assert model.unet.cfg == UNetConfig() and model.text_encoder.cfg.layers == 12 and model.vae.cfg == VAEConfig()
    assert abs(sum(p.numel() for p in model.unet.parameters()) - 859_520_964) == 0
    ours = magicfusion.generate(model, "a lion with a crown", steps=2, height=64, width=64, seed=1, progress=False)
    pipe = reference_pipeline(model, tmp_path)
    ref = pipe("a lion with a crown", num_inference_steps=2, height=64, width=64,
               generator=torch.Generator("cpu").manual_seed(1)).images
    assert_same_images(ours, ref)
    # the recommended sampler at full size: DPM++ 2M Karras (3 steps: a first-order, a second-order, a final step)
    ours = magicfusion.generate(model, "a lion with a crown", steps=3, height=64, width=64, seed=1,
                                sampler="dpmpp-2m", karras=True, progress=False)
    pipe.scheduler = reference_scheduler("dpmpp-2m", karras=True)
    ref = pipe("a lion with a crown", num_inference_steps=3, height=64, width=64,
               generator=torch.Generator("cpu").manual_seed(1)).images
    assert_same_images(ours, ref)
