"""The VAE encoder (used to train the toy models and for image-to-image) against diffusers' AutoencoderKL."""
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from magicfusion.vae import VAEConfig, VAEDecoder, VAEEncoder
from oracle import vae_config
from tools.random_weights import perturb_

CFGS = {"tiny": VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
        "two-blocks": VAEConfig(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=2)}


def reference(cfg, encoder, decoder):
    """diffusers' AutoencoderKL holding our encoder and decoder weights, converted by diffusers' own converter."""
    ldm = {"first_stage_model." + k: v for m in (encoder, decoder) for k, v in m.state_dict().items()}
    config = vae_config(cfg)
    vae = AutoencoderKL(**config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(ldm, config), strict=True)
    return vae.eval()


@pytest.mark.parametrize("name", sorted(CFGS))
def test_encoder_matches_diffusers(name):
    cfg = CFGS[name]
    gen = torch.Generator().manual_seed(3)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        encoder, decoder = perturb_(VAEEncoder(cfg), gen).eval(), perturb_(VAEDecoder(cfg), gen).eval()
    ref = reference(cfg, encoder, decoder)
    pixels = torch.rand(2, 3, 64, 48, generator=gen) * 2 - 1
    with torch.no_grad():
        mean, logvar = encoder(pixels)
        dist = ref.encode(pixels).latent_dist
    assert mean.shape == (2, cfg.z_channels, 8, 6)
    torch.testing.assert_close(mean, dist.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logvar, dist.logvar, rtol=1e-5, atol=1e-5)
    # the scaled sample: the same noise through both gives the same latent
    noise_gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        z = encoder.encode(pixels, torch.Generator().manual_seed(7))
    expected = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=noise_gen)) * cfg.scale_factor
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(encoder.encode(pixels), dist.mean * cfg.scale_factor, rtol=1e-5, atol=1e-5)


def test_encoder_state_dict_uses_ldm_names():
    keys = set(VAEEncoder(CFGS["tiny"]).state_dict())
    assert {"quant_conv.weight", "encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight",
            "encoder.down.2.downsample.conv.weight", "encoder.mid.attn_1.q.weight",
            "encoder.conv_out.weight"} <= keys
    assert not any(k.startswith("encoder.down.3.downsample") for k in keys)  # the last level does not downsample


def test_loader_reads_a_checkpoints_latent_scale_factor(tmp_path):
    """LDM stores `scale_factor` when it computed the scale from data (1/std of the latents); the toy models do."""
    from safetensors.torch import save_file

    import magicfusion
    from magicfusion.errors import InputError
    from tools.random_weights import random_state_dict, write_tiny_vocab
    write_tiny_vocab(tmp_path / "tok")
    sd = random_state_dict("tiny", seed=1)
    save_file(sd, str(tmp_path / "default.safetensors"))
    save_file(sd | {"scale_factor": torch.tensor(0.75)}, str(tmp_path / "scaled.safetensors"))
    default = magicfusion.load(tmp_path / "default.safetensors", tokenizer=tmp_path / "tok")
    scaled = magicfusion.load(tmp_path / "scaled.safetensors", tokenizer=tmp_path / "tok")
    assert default.vae.cfg.scale_factor == pytest.approx(0.18215)
    assert scaled.vae.cfg.scale_factor == 0.75
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():  # the decoder undoes the file's scale: z / 0.75 in, not z / 0.18215
        torch.testing.assert_close(scaled.vae(z), default.vae(z * 0.18215 / 0.75), rtol=1e-5, atol=1e-5)
    for bad in (torch.tensor(float("nan")), torch.tensor([1.0, 2.0]), torch.tensor(0.0)):
        save_file(sd | {"scale_factor": bad}, str(tmp_path / "bad.safetensors"))
        with pytest.raises(InputError, match="scale_factor"):
            magicfusion.load(tmp_path / "bad.safetensors", tokenizer=tmp_path / "tok")
