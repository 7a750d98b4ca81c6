"""read_diffusers_folder: a folder written by diffusers/transformers from our weights reads back as our weights.

Our tiny modules get random weights; diffusers' own LDM converters rename them, real diffusers/transformers
models load them strictly and `save_pretrained` them; reading the folder back must give every original tensor
under its LDM key, and nothing else.
"""
import copy
import json
import shutil

import pytest
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file

import magicfusion.diffusers_folder as dfolder
from magicfusion.clip import CLIPTextConfig, CLIPTextModel
from magicfusion.diffusers_folder import find_tokenizer_dir, read_diffusers_folder
from magicfusion.errors import InputError
from magicfusion.unet import UNetConfig, UNetModel
from magicfusion.vae import VAEConfig, VAEDecoder

UNET_CASES = {  # (num_res_blocks, attention_levels): level 1 without attention is SD's last level
    "res2_attn01": UNetConfig(4, 4, 32, (1, 2), 2, (0, 1), 32),
    "res1_attn0": UNetConfig(4, 4, 32, (1, 2), 1, (0,), 32),
}
VAE_CFG = VAEConfig(4, 32, (1, 2), 1, 3)
CLIP_CFG = CLIPTextConfig(1000, 77, 32, 2, head_dim=8)


def randomized(module, seed):
    torch.manual_seed(seed)
    for name, p in module.named_parameters():  # distinct values everywhere, so any swapped weight shows
        p.data.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.2)
    return module


def ldm_state(unet_cfg, seed=0):
    """Our three models' weights with LDM single-file prefixes."""
    sd = {}
    for prefix, model in (("model.diffusion_model.", UNetModel(unet_cfg)),
                          ("cond_stage_model.transformer.", CLIPTextModel(CLIP_CFG)),
                          ("first_stage_model.", VAEDecoder(VAE_CFG))):
        sd |= {prefix + k: v for k, v in randomized(model, seed).state_dict().items()}
        seed += 1
    return sd


def diffusers_models(cfg: UNetConfig, ldm: dict):
    """Real diffusers/transformers models holding `ldm`'s weights, converted by diffusers' own converters."""
    levels = range(len(cfg.channel_mult))
    down = ["CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in levels]
    unet_config = dict(sample_size=8, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                       block_out_channels=[cfg.model_channels * m for m in cfg.channel_mult],
                       layers_per_block=cfg.num_res_blocks, down_block_types=down,
                       up_block_types=[t.replace("Down", "Up") for t in reversed(down)],
                       cross_attention_dim=cfg.context_dim, attention_head_dim=cfg.num_heads)  # SD1: heads
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(ldm, unet_config))

    vae_config = dict(in_channels=3, out_channels=VAE_CFG.out_ch, latent_channels=VAE_CFG.z_channels,
                      block_out_channels=[VAE_CFG.ch * m for m in VAE_CFG.ch_mult],
                      layers_per_block=VAE_CFG.num_res_blocks, down_block_types=["DownEncoderBlock2D"] * 2,
                      up_block_types=["UpDecoderBlock2D"] * 2, sample_size=16)
    vae = randomized(AutoencoderKL(**vae_config), 9)  # the encoder keeps these random weights
    decoder = convert_ldm_vae_checkpoint(ldm, vae_config)
    assert set(decoder) == {k for k in vae.state_dict() if k.startswith(("decoder.", "post_quant_conv."))}
    vae.load_state_dict(vae.state_dict() | decoder)

    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=CLIP_CFG.vocab_size, hidden_size=CLIP_CFG.width, intermediate_size=4 * CLIP_CFG.width,
        num_hidden_layers=CLIP_CFG.layers, num_attention_heads=CLIP_CFG.width // CLIP_CFG.head_dim,
        max_position_embeddings=CLIP_CFG.max_positions, bos_token_id=0, eos_token_id=2))
    prefix = "cond_stage_model.transformer.text_model."  # transformers 5 names these without `text_model.`
    clip.load_state_dict({k[len(prefix):]: v for k, v in ldm.items() if k.startswith(prefix)})
    return unet, clip, vae


def write_folder(root, models, **save_kwargs):
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    for part, model in zip(("unet", "text_encoder", "vae"), models):
        model.save_pretrained(root / part, **save_kwargs)
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Per UNet case: (our LDM state dict, diffusers models, a folder saved as plain fp32 safetensors)."""
    out = {}
    for case, cfg in UNET_CASES.items():
        ldm = ldm_state(cfg)
        models = diffusers_models(cfg, ldm)
        out[case] = ldm, models, write_folder(tmp_path_factory.mktemp(case) / "sd", models)
    return out


def assert_same(got, want, dtype=None):
    got = dict(got)
    scale = got.pop("scale_factor", None)  # vae/config.json's scaling_factor, which save_pretrained always writes
    assert scale is None or scale.item() == pytest.approx(VAE_CFG.scale_factor)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == (dtype or v.dtype), k
        assert torch.equal(got[k], v.to(got[k].dtype)), k


@pytest.mark.parametrize("case", UNET_CASES)
def test_safetensors_folder_reads_back_our_exact_weights(built, case):
    ldm, _, folder = built[case]
    got = read_diffusers_folder(folder)
    assert not [k for k in got if k.startswith(("first_stage_model.encoder.", "first_stage_model.quant_conv."))]
    assert_same(got, ldm)


def test_fp16_variant_and_full_precision_preferred(built, tmp_path):
    ldm, (unet, clip, vae), folder = built["res2_attn01"]
    half = write_folder(tmp_path / "sd", [copy.deepcopy(m).half() for m in (unet, clip, vae)], variant="fp16")
    assert (half / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert_same(read_diffusers_folder(half), {k: v.half() for k, v in ldm.items()}, torch.float16)
    for part in ("unet", "text_encoder", "vae"):
        shutil.copy(next((folder / part).glob("*.safetensors")), half / part)
    assert_same(read_diffusers_folder(half), ldm)


def test_bin_folder_with_hub_style_text_encoder_keys(built, tmp_path):
    ldm, (unet, _, vae), _ = built["res1_attn0"]
    root = tmp_path / "sd"
    root.mkdir()
    (root / "model_index.json").write_text("{}")
    unet.save_pretrained(root / "unet", safe_serialization=False)
    vae.save_pretrained(root / "vae", safe_serialization=False)
    # folders on the Hub (transformers 4) keep `text_model.` and often a position_ids buffer
    prefix = "cond_stage_model.transformer."
    text = {k[len(prefix):]: v for k, v in ldm.items() if k.startswith(prefix)}
    text["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    (root / "text_encoder").mkdir()
    torch.save(text, root / "text_encoder" / "pytorch_model.bin")
    assert (root / "unet" / "diffusion_pytorch_model.bin").is_file()
    assert_same(read_diffusers_folder(root), ldm)


def test_sharded_folder_never_reads_the_vae_encoder(built, tmp_path, monkeypatch):
    ldm, models, _ = built["res2_attn01"]
    folder = write_folder(tmp_path / "sd", models, max_shard_size="100KB")
    index = folder / "vae" / "diffusion_pytorch_model.safetensors.index.json"
    assert (folder / "text_encoder" / "model.safetensors.index.json").is_file()
    weight_map = json.loads(index.read_text())["weight_map"]
    wanted = {f for k, f in weight_map.items() if k.startswith(("decoder.", "post_quant_conv."))}
    assert len(wanted) < len(set(weight_map.values()))  # some shards hold only the encoder
    opened, read_keys, real = set(), [], dfolder.read_tensors

    def recording(path, keep=lambda k: True):
        tensors = real(path, keep)
        if path.parent.name == "vae":
            opened.add(path.name)
            read_keys.extend(tensors)
        return tensors
    monkeypatch.setattr(dfolder, "read_tensors", recording)
    assert_same(read_diffusers_folder(folder), ldm)
    assert opened == wanted
    assert not [k for k in read_keys if not k.startswith(("decoder.", "post_quant_conv."))]


def test_old_vae_attention_names(built, tmp_path):
    ldm, _, folder = built["res1_attn0"]
    folder = shutil.copytree(folder, tmp_path / "sd")
    file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in load_file(file).items():
        for new_name, old_name in old.items():
            k = k.replace(f"attentions.0.{new_name}.", f"attentions.0.{old_name}.")
        renamed[k] = v
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in renamed
    save_file(renamed, file)
    assert_same(read_diffusers_folder(folder), ldm)


def one_line_error(folder, *words):
    with pytest.raises(InputError) as e:
        read_diffusers_folder(folder)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_errors_name_the_problem(built, tmp_path):
    _, _, folder = built["res1_attn0"]
    one_line_error(tmp_path, "model_index.json")
    (tmp_path / "model_index.json").write_text("{}")
    one_line_error(tmp_path, "unet/")
    (tmp_path / "unet").mkdir()
    one_line_error(tmp_path, str(tmp_path / "unet"), "no weights file")
    index = tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    for broken in ("{", '{"weight_map": {"conv_in.weight": "../elsewhere.safetensors"}}'):
        index.write_text(broken)
        one_line_error(tmp_path, str(index), "shard index")

    bad = shutil.copytree(folder, tmp_path / "bad")
    file = bad / "unet" / "diffusion_pytorch_model.safetensors"
    save_file(load_file(file) | {"down_blocks.0.mystery.weight": torch.zeros(1)}, file)
    one_line_error(bad, str(file), "down_blocks.0.mystery.weight")
    twice = load_file(file) | {"mid_block.attentions.1.norm.weight": torch.zeros(1)}  # -> middle_block.1 again
    del twice["down_blocks.0.mystery.weight"]
    save_file(twice, file)
    one_line_error(bad, str(file), "mid_block.attentions.1.norm.weight")


def test_find_tokenizer_dir(tmp_path):
    assert find_tokenizer_dir(tmp_path) is None
    tok = tmp_path / "tokenizer"
    tok.mkdir()
    (tok / "vocab.json").write_text("{}")
    assert find_tokenizer_dir(tmp_path) is None  # merges.txt missing
    (tok / "merges.txt").write_text("")
    assert find_tokenizer_dir(tmp_path) == tok
    (tok / "vocab.json").unlink()
    (tok / "tokenizer.json").write_text("{}")
    assert find_tokenizer_dir(tmp_path) == tok


def test_full_size_sd1_names_and_shapes():
    """The rules, applied to real SD1-size diffusers models (on the meta device), give our models' keys and shapes."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=["DownEncoderBlock2D"] * 4,
                            up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2)
        ours_unet, ours_vae = UNetModel(UNetConfig()).state_dict(), VAEDecoder(VAEConfig()).state_dict()
    got_unet = dfolder._rename(unet.state_dict(), dfolder._unet_namer(list(unet.state_dict())), "", "unet")
    decoder = {k: v for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    got_vae = dfolder._rename(decoder, dfolder._vae_namer(list(decoder)), "", "vae")
    for got, ours in ((got_unet, ours_unet), (got_vae, ours_vae)):
        assert sorted(got) == sorted(ours)
        # diffusers' VAE attention projections are Linear; read_diffusers_folder adds the 1x1 conv dims
        assert not [k for k in ours if got[k].shape != ours[k].shape and got[k].shape + (1, 1) != ours[k].shape]


def test_vae_scaling_factor_of_the_folder_is_used(built, tmp_path):
    """A VAE trained with another latent scale (diffusers' `scaling_factor`) decodes with that scale."""
    _, models, folder = built["res1_attn0"]
    root = tmp_path / "sd"
    shutil.copytree(folder, root)
    config = json.loads((root / "vae" / "config.json").read_text())
    assert config["scaling_factor"] == pytest.approx(0.18215)
    assert read_diffusers_folder(root)["scale_factor"].item() == pytest.approx(0.18215)
    config["scaling_factor"] = 0.5
    (root / "vae" / "config.json").write_text(json.dumps(config))
    assert read_diffusers_folder(root)["scale_factor"].item() == 0.5
