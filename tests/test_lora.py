"""LoRA files merged at load: the same weights and images as diffusers' load_lora_weights + fuse_lora (peft), in both
formats; other spellings of the same layers; the full-size SD 1.5 layer names; and every refusal, one line each."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors.torch import load_file, save_file

import magicfusion
from magicfusion.clip import CLIPTextModel
from magicfusion.errors import InputError
from magicfusion.lora import TEXT_PART, UNET_PART, Targets, parse_spec
from magicfusion.unet import UNetModel
from oracle import reference_pipeline, unet_config
from tools.make_lora import random_lora, write_lora
from tools.random_weights import CONFIGS, write_checkpoint, write_tiny_vocab


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    write_tiny_vocab(d)
    path = write_checkpoint(d / "model.safetensors", "tiny", seed=31)
    return d, path, magicfusion.load(path, tokenizer=d)


def in_diffusers_layout(model) -> dict:
    sd = {"model.diffusion_model." + k: v for k, v in model.unet.state_dict().items()}
    return convert_ldm_unet_checkpoint(sd, unet_config(model.unet.cfg))


def text_sd(module) -> dict:  # transformers 5 saves CLIP without the `text_model.` level
    return {k.removeprefix("text_model."): v for k, v in module.state_dict().items() if not k.endswith("position_ids")}


def changed(a: dict, b: dict) -> set:
    return {k for k in a if not torch.equal(a[k], b[k])}


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_merged_weights_and_images_equal_diffusers_fuse_lora(tiny, tmp_path, fmt):
    d, path, base = tiny
    lora = write_lora(tmp_path / f"{fmt}.safetensors", config="tiny", fmt=fmt, rank=4, alpha=2.0, seed=3,
                      targets="all", magnitude=0.2)  # alpha != rank: the format's scale matters; LoCon convs
    model = magicfusion.load(path, tokenizer=d, lora=[(lora, 0.7)])
    assert [(n, s) for n, s, _ in model.loras] == [(fmt, 0.7)] and len(model.loras[0][2]) == 12
    pipe = reference_pipeline(base, d)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=0.7)
    pipe.unload_lora_weights()  # the fused weights stay
    before, ours, ref = in_diffusers_layout(base), in_diffusers_layout(model), pipe.unet.state_dict()
    assert changed(ref, before) == changed(ours, before) and len(changed(ours, before)) > 100
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    before, ours, ref = text_sd(base.text_encoder), text_sd(model.text_encoder), text_sd(pipe.text_encoder)
    assert changed(ref, before) == changed(ours, before) and len(changed(ours, before)) == 12
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    kw = dict(steps=2, height=64, width=64, seed=5)
    image = magicfusion.generate(model, "a dog in the sun", progress=False, graph=False, **kw)[0]
    ref_image = pipe("a dog in the sun", num_inference_steps=2, height=64, width=64,
                     generator=torch.Generator("cpu").manual_seed(5)).images[0]
    assert np.abs(np.asarray(image, dtype=np.int16) - np.asarray(ref_image, dtype=np.int16)).max() <= 1


def weights_of(model) -> dict:
    return {**model.unet.state_dict(), **{"te." + k: v for k, v in model.text_encoder.state_dict().items()}}


def test_other_spellings_of_the_same_layers_merge_the_same(tiny, tmp_path):
    """kohya naming LDM modules, diffusers' pre-PEFT names, a .pt file, scale 0, and two LoRAs adding up."""
    d, path, base = tiny
    kohya = write_lora(tmp_path / "k.safetensors", config="tiny", fmt="kohya", rank=2, alpha=1.0, seed=4, targets="all")
    peft = write_lora(tmp_path / "p.safetensors", config="tiny", fmt="peft", rank=2, seed=4, targets="attn")
    k_sd, p_sd = load_file(str(kohya)), load_file(str(peft))
    where = Targets(base.unet.state_dict(), base.text_encoder.state_dict(), "tiny")
    ldm_named = {}
    for key, v in k_sd.items():
        layer, _, rest = key.partition(".")
        if layer.startswith("lora_unet_"):
            module = where.key(UNET_PART, layer.removeprefix("lora_unet_"), kohya=True).removesuffix(".weight")
            layer = "lora_unet_" + module.replace(".", "_")
        ldm_named[f"{layer}.{rest}"] = v
    assert ldm_named.keys() != k_sd.keys()
    save_file(ldm_named, str(tmp_path / "ldm.safetensors"))
    torch.save(k_sd, tmp_path / "k.pt")
    old = {}
    for key, v in p_sd.items():
        new = key.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.")
        if key.startswith("text_encoder."):
            new = key.replace(".lora_A.", ".lora_linear_layer.down.").replace(".lora_B.", ".lora_linear_layer.up.")
        for name in ("to_q", "to_k", "to_v", "to_out.0"):
            for ab, du in (("A", "down"), ("B", "up")):
                out = "to_out" if name == "to_out.0" else name
                new = new.replace(f".{name}.lora_{ab}.weight", f".processor.{out}_lora.{du}.weight")
        old[new] = v
    save_file(old, str(tmp_path / "old.safetensors"))
    ref = weights_of(magicfusion.load(path, tokenizer=d, lora=[(kohya, 0.8)]))
    for other in (tmp_path / "ldm.safetensors", tmp_path / "k.pt"):
        got = weights_of(magicfusion.load(path, tokenizer=d, lora=[(other, 0.8)]))
        assert all(torch.equal(got[k], ref[k]) for k in ref), other
    ref = weights_of(magicfusion.load(path, tokenizer=d, lora=[peft]))
    got = weights_of(magicfusion.load(path, tokenizer=d, lora=[tmp_path / "old.safetensors"]))
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    plain = weights_of(base)
    assert all(torch.equal(v, plain[k]) for k, v in weights_of(magicfusion.load(path, tokenizer=d,
                                                                                  lora=[(kohya, 0.0)])).items())
    both = weights_of(magicfusion.load(path, tokenizer=d, lora=[(kohya, 0.5), (peft, 1.0)]))
    one, two = (weights_of(magicfusion.load(path, tokenizer=d, lora=[x])) for x in [(kohya, 0.5), (peft, 1.0)])
    for k in both:
        torch.testing.assert_close(both[k], one[k] + two[k] - plain[k], rtol=1e-5, atol=1e-6)


def test_sd15_layer_names_land_where_diffusers_puts_them():
    """Full size, shapes only: every Linear/Conv of diffusers' SD 1.5 UNet, named the kohya way, resolves to the LDM
    key diffusers' own checkpoint converter maps it from; and every layer of a full LoCon file for sd15 resolves."""
    ucfg, ccfg, _ = CONFIGS["sd15"]
    with torch.device("meta"):
        ours_unet, ours_text = UNetModel(ucfg).state_dict(), CLIPTextModel(ccfg).state_dict()
        ref = UNet2DConditionModel(**unet_config(ucfg))
    where = Targets(ours_unet, ours_text, "sd15")
    ids = {"model.diffusion_model." + k: torch.tensor([float(i)]) for i, k in enumerate(ours_unet)}
    names = list(ours_unet)
    ldm_of = {k: names[int(v)] for k, v in convert_ldm_unet_checkpoint(ids, unet_config(ucfg)).items()}
    layers = [n for n, m in ref.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert len(layers) > 250
    for n in layers:
        expected = ldm_of[n + ".weight"]
        assert where.key(UNET_PART, n.replace(".", "_"), kohya=True) == expected, n
        assert where.key(UNET_PART, n, kohya=False) == expected, n
    tensors, _ = random_lora("sd15", "kohya", rank=1, targets="all")
    modules = {k.split(".")[0] for k in tensors}
    assert {m for m in modules if m.startswith("lora_unet_")} == {"lora_unet_" + n.replace(".", "_") for n in layers}
    assert len([m for m in modules if m.startswith("lora_te_")]) == 12 * 6
    for m in modules:
        part = UNET_PART if m.startswith("lora_unet_") else TEXT_PART
        assert where.key(part, m.removeprefix(f"lora_{part}_"), kohya=True), m


def test_parse_spec():
    assert parse_spec("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_spec("a.safetensors:0.8") == ("a.safetensors", 0.8)
    assert parse_spec("C:\\loras\\a.safetensors:-1") == ("C:\\loras\\a.safetensors", -1.0)
    assert parse_spec("C:\\loras\\a.safetensors") == ("C:\\loras\\a.safetensors", 1.0)
    with pytest.raises(InputError):
        parse_spec("a.safetensors:nan")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def bad_files(tmp_path, base):
    ok = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(2, 32, 1, 1),
          "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(32, 2, 1, 1)}
    xattn = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    files = {
        "nomatch": (ok | {"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.randn(2, 32),
                          "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.randn(32, 2)},
                    "match no layer.*down_blocks_7"),
        "shape": (ok | {f"{xattn}.lora_down.weight": torch.randn(2, 64), f"{xattn}.lora_up.weight": torch.randn(32, 2)},
                  "shapes that do not fit.*attn2_to_k"),
        "sdxl_width": (ok | {f"{xattn}.lora_down.weight": torch.randn(2, 2048),
                             f"{xattn}.lora_up.weight": torch.randn(32, 2)}, "SDXL"),
        "sd2_width": (ok | {f"{xattn}.lora_down.weight": torch.randn(2, 1024),
                            f"{xattn}.lora_up.weight": torch.randn(32, 2)}, "2.x"),
        "sdxl_te2": (ok | {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(2, 1280)},
                     "SDXL.*lora_te2_"),
        "loha": ({"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.randn(2, 2)}, "LyCORIS"),
        "garbage": (ok | {"some.other.weight": torch.randn(2)}, "not LoRA weights.*some.other.weight"),
        "half": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(2, 32, 1, 1)},
                 "only one of the two"),
        "empty": ({"__x": torch.zeros(1)}, "not LoRA weights"),
    }
    for name, (tensors, _) in files.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    return {**{tmp_path / f"{k}.safetensors": v[1] for k, v in files.items()}, tmp_path / "evil.pt": "refusing to call",
            tmp_path / "missing.safetensors": "no such file"}


def test_bad_loras_are_refused_in_one_line_and_exit_2(tiny, tmp_path):
    d, path, base = tiny
    for file, words in (bad_files(tmp_path, base) | {path: "whole Stable Diffusion checkpoint, not a LoRA"}).items():
        with pytest.raises(InputError, match=words) as e:
            magicfusion.load(path, tokenizer=d, lora=[(file, 1.0)])
        assert "\n" not in str(e.value), file
    out = tmp_path / "x.png"
    r = subprocess.run([sys.executable, "-m", "magicfusion", "generate", "--model", str(path), "--tokenizer", str(d),
                        "--prompt", "a dog", "--steps", "1", "--height", "64", "--width", "64", "--device", "cpu",
                        "--lora", f"{tmp_path / 'nomatch.safetensors'}:0.5", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "down_blocks_7" in r.stderr and not out.exists()


def infotext(png) -> str:
    return Image.open(png).text["parameters"]


def test_cli_loras_and_embeddings_per_model_and_in_the_infotext(tiny, tmp_path):
    d, path, base = tiny
    lora = write_lora(tmp_path / "subject.safetensors", config="tiny", fmt="kohya", rank=2, seed=8, magnitude=0.3)
    save_file({"emb_params": torch.randn(2, 128)}, str(tmp_path / "sks.safetensors"))
    from magicfusion.cli import main
    common = ["--tokenizer", str(d), "--steps", "2", "--height", "64", "--width", "64", "--device", "cpu", "--quiet"]
    assert main(["generate", "--model", str(path), "--prompt", "a (sks:1.2) dog", "--lora", f"{lora}:0.5",
                 "--embedding", str(tmp_path / "sks.safetensors"), "--out", str(tmp_path / "g.png")] + common) == 0
    text = infotext(tmp_path / "g.png")
    digest = magicfusion.load(path, tokenizer=d, lora=[(lora, 0.5)]).loras[0][2]
    assert text.startswith("a (sks:1.2) dog <lora:subject:0.5>\n")
    assert f'Lora hashes: "subject: {digest}"' in text and 'TI hashes: "sks: ' in text
    model = magicfusion.load(path, tokenizer=d, lora=[(lora, 0.5)], embeddings=[tmp_path / "sks.safetensors"])
    # the infotext's prompt, tag included, gives the same image
    image = magicfusion.generate(model, text.splitlines()[0], steps=2, height=64, width=64, progress=False)[0]
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(tmp_path / "g.png")))
    assert main(["fuse", "--general", str(path), "--expert", str(path), "--expert-lora", f"{lora}:0.5",
                 "--prompt", "a dog on the sun", "--expert-prompt", "a sks dog", "--embedding",
                 str(tmp_path / "sks.safetensors"), "--out", str(tmp_path / "f")] + common) == 0
    general, expert = infotext(tmp_path / "f" / "general.png"), infotext(tmp_path / "f" / "expert.png")
    assert "<lora:" not in general and "Lora hashes" not in general
    assert expert.startswith("a sks dog <lora:subject:0.5>\n") and "Lora hashes" in expert
    assert np.array_equal(np.asarray(Image.open(tmp_path / "f" / "expert.png")),
                          np.asarray(magicfusion.generate(model, "a sks dog", steps=2, height=64, width=64,
                                                          progress=False)[0]))
    assert 'Expert prompts: "a sks dog <lora:subject:0.5>"' in infotext(tmp_path / "f" / "fused.png")
    with pytest.raises(InputError, match="without a LoRA 'other'"):
        magicfusion.generate(model, "a dog <lora:other:1>", steps=1, height=64, width=64, progress=False)


def test_lora_argument_forms(tiny, tmp_path):
    d, path, base = tiny
    lora = write_lora(tmp_path / "a.safetensors", config="tiny", fmt="peft", rank=2, seed=9)
    one = weights_of(magicfusion.load(path, tokenizer=d, lora=str(lora)))
    assert all(torch.equal(v, one[k]) for k, v in weights_of(magicfusion.load(path, tokenizer=d,
                                                                               lora=[(lora, 1)])).items())
    for bad, words in [([(lora, "x")], "finite number"), ([(lora, 1, 2)], "pairs"), (5, "pairs"),
                       ([(lora, float("inf"))], "finite number")]:
        with pytest.raises(InputError, match=words):
            magicfusion.load(path, tokenizer=d, lora=bad)


def test_expert_lora_belongs_to_the_expert_before_it():
    from magicfusion.cli import build_parser
    a = build_parser().parse_args(["fuse", "--general", "g", "--expert-lora", "w", "--expert", "a", "--expert-lora",
                                   "x:0.5", "--expert", "b", "--expert-lora", "y", "--general-lora", "z:2",
                                   "--prompt", "p", "--out", "o"])
    assert a.expert_lora == [(0, "w"), (0, "x:0.5"), (1, "y")] and a.general_lora == ["z:2"]
    assert build_parser().parse_args(["fuse", "--general", "g", "--expert", "a", "--prompt", "p",
                                      "--out", "o"]).expert_lora is None
