"""The reference implementations, built from OUR random weights: diffusers' UNet2DConditionModel, AutoencoderKL,
DDIMScheduler and StableDiffusionPipeline, and transformers' CLIPTextModel and CLIPTokenizer (test-only oracles).

Our LDM-layout state dicts are turned into diffusers layout by diffusers' own single-file converters, so the
key map under test (ours) and the one doing the conversion here (theirs) are independent.
"""
from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from transformers import CLIPTextConfig as HFCLIPConfig
from transformers import CLIPTextModel as HFCLIPTextModel
from transformers import CLIPTokenizer as HFTokenizer

from magicfusion.clip import CLIPTextConfig
from magicfusion.unet import UNetConfig
from magicfusion.vae import VAEConfig


def unet_config(cfg: UNetConfig) -> dict:
    n = len(cfg.channel_mult)
    down = [("CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D") for i in range(n)]
    up = [("CrossAttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D") for i in reversed(range(n))]
    return dict(sample_size=64, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                down_block_types=tuple(down), up_block_types=tuple(up),
                block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
                layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
                attention_head_dim=cfg.num_heads, transformer_layers_per_block=cfg.transformer_depth)


def vae_config(cfg: VAEConfig) -> dict:
    n = len(cfg.ch_mult)
    return dict(in_channels=3, out_channels=cfg.out_ch, latent_channels=cfg.z_channels,
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
                scaling_factor=cfg.scale_factor, sample_size=64)


def clip_config(cfg: CLIPTextConfig) -> HFCLIPConfig:
    return HFCLIPConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.width * 4,
                        num_hidden_layers=cfg.layers, num_attention_heads=cfg.width // cfg.head_dim,
                        max_position_embeddings=cfg.max_positions, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                        bos_token_id=cfg.vocab_size - 2, eos_token_id=cfg.vocab_size - 1, pad_token_id=1,
                        attn_implementation="eager")


def diffusers_unet(cfg: UNetConfig, sd: dict) -> UNet2DConditionModel:
    """sd: our UNet state dict (no prefix)."""
    config = unet_config(cfg)
    converted = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in sd.items()}, config)
    unet = UNet2DConditionModel(**config)
    unet.load_state_dict(converted, strict=True)
    return unet.eval()


def diffusers_vae(cfg: VAEConfig, sd: dict) -> AutoencoderKL:
    """sd: our VAE decoder state dict (no prefix); the encoder half stays at diffusers' random init."""
    config = vae_config(cfg)
    vae = AutoencoderKL(**config)
    converted = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in sd.items()}, config)
    missing = vae.load_state_dict(converted, strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys
    assert all(k.startswith(("encoder.", "quant_conv.")) for k in missing.missing_keys), missing.missing_keys
    return vae.eval()


def hf_clip(cfg: CLIPTextConfig, sd: dict) -> HFCLIPTextModel:
    model = HFCLIPTextModel(clip_config(cfg))
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers 5 dropped the level
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    result = model.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys and all(k.endswith("position_ids") for k in result.missing_keys), result
    return model.eval()


def ddim_scheduler() -> DDIMScheduler:
    """SD 1.x's shipped scheduler settings."""
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                         prediction_type="epsilon")


def reference_pipeline(model, tokdir) -> StableDiffusionPipeline:
    """diffusers' pipeline on our model's exact weights (a `magicfusion.Model`), with the tokenizer in `tokdir`
    (vocab.json, merges.txt) and SD 1.x's DDIM scheduler."""
    return StableDiffusionPipeline(
        vae=diffusers_vae(model.vae.cfg, model.vae.state_dict()),
        text_encoder=hf_clip(model.text_encoder.cfg, model.text_encoder.state_dict()),
        tokenizer=HFTokenizer(str(tokdir / "vocab.json"), str(tokdir / "merges.txt"), model_max_length=77),
        unet=diffusers_unet(model.unet.cfg, model.unet.state_dict()), scheduler=ddim_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def reference_scheduler(sampler: str, karras: bool = False):
    """diffusers' scheduler for one of our samplers, built as a user swaps schedulers: `from_config(<SD's config>)`."""
    from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
    config = ddim_scheduler().config
    if sampler == "dpmpp-2m":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                       use_karras_sigmas=karras)
    if sampler == "euler":
        return EulerDiscreteScheduler.from_config(config, use_karras_sigmas=karras)
    assert not karras, "diffusers has no Karras variant of this scheduler"
    return EulerAncestralDiscreteScheduler.from_config(config) if sampler == "euler-a" else ddim_scheduler()
