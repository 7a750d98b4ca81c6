"""The Python API refuses bad arguments with InputError (one line), as the CLI does, before any sampling."""
import dataclasses

import numpy as np

import pytest

import magicfusion
from tools.random_weights import random_state_dict, write_checkpoint
from tools.random_weights import write_tiny_vocab
from magicfusion.unet import UNetModel
from magicfusion.vae import VAEConfig, VAEDecoder


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    write_tiny_vocab(d)
    return [magicfusion.load(write_checkpoint(d / f"m{s}.safetensors", "tiny", seed=s), tokenizer=d) for s in (1, 2)]


SMALL = dict(steps=2, height=64, width=64, progress=False)


@pytest.mark.parametrize("kwargs, words", [
    (dict(outside="both"), "outside"),
    (dict(saliency_reference="mine"), "saliency_reference"),
    (dict(blend="max"), "blend"),
    (dict(kg=float("nan")), "kg"),
    (dict(ke=float("inf")), "ke"),
    (dict(ke=[1.0, 2.0]), "ke values"),
    (dict(expert_prompt=["a", "b"]), "expert prompts"),
    (dict(height=60), "multiple of 8"),
    (dict(steps=0), "steps"),
    (dict(seed=2 ** 64), "seed"),
    (dict(batch=0), "batch"),
    (dict(eta=-1.0), "eta"),
    (dict(guidance=float("nan")), "guidance"),
    (dict(clip_skip=5), "clip skip"),
    (dict(height=8), "16 px"),
    (dict(fuse_from=100, fuse_until=900), "widen the window"),
    (dict(steps=2, fuse_from=600, fuse_until=510), "widen the window"),  # t = 501, 1: the window holds neither
])
def test_fuse_refuses_bad_arguments(pair, kwargs, words):
    with pytest.raises(magicfusion.InputError, match=words) as e:
        magicfusion.fuse(pair[0], pair[1], "a lion", **{**SMALL, **kwargs})
    assert "\n" not in str(e.value)


def test_fuse_refuses_models_with_different_latent_spaces(pair):
    other = dataclasses.replace(pair[1], unet=UNetModel(dataclasses.replace(pair[1].unet.cfg, in_channels=8)))
    with pytest.raises(magicfusion.InputError, match="latent channels"):
        magicfusion.fuse(pair[0], other, "a lion", **SMALL)


def test_load_refuses_a_vae_that_is_not_8x(tmp_path):
    from safetensors.torch import save_file
    write_tiny_vocab(tmp_path)
    sd = {k: v for k, v in random_state_dict("tiny", seed=1).items()
          if not k.startswith("first_stage_model.")}
    vae = VAEDecoder(VAEConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1))  # three levels: 4x, not 8x
    sd.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    save_file(sd, str(tmp_path / "vae4x.safetensors"))
    with pytest.raises(magicfusion.InputError, match="4x"):
        magicfusion.load(tmp_path / "vae4x.safetensors", tokenizer=tmp_path)


def test_random_seed_is_reported_and_reproducible(pair):
    images = magicfusion.generate(pair[0], "a lion", seed=-1, **SMALL)
    seed = images.seed
    assert 0 <= seed < 2 ** 64 and isinstance(images, list)
    again = magicfusion.generate(pair[0], "a lion", seed=seed, **SMALL)
    assert np.array_equal(np.asarray(images[0]), np.asarray(again[0]))
    result = magicfusion.fuse(pair[0], pair[1], "a lion", seed=-1, **SMALL)
    assert result.seed >= 0 and len(result.masks) == SMALL["steps"]


def test_fuse_needs_an_expert_and_takes_an_empty_expert_prompt_literally(pair):
    with pytest.raises(magicfusion.InputError, match="at least one expert"):
        magicfusion.fuse(pair[0], [], "a lion", **SMALL)
    default = magicfusion.fuse(pair[0], pair[1], "a lion", **SMALL)
    same = magicfusion.fuse(pair[0], pair[1], "a lion", expert_prompt="a lion", **SMALL)
    empty = magicfusion.fuse(pair[0], pair[1], "a lion", expert_prompt="", **SMALL)
    assert np.array_equal(np.asarray(default.fused[0]), np.asarray(same.fused[0]))
    assert not np.array_equal(np.asarray(default.fused[0]), np.asarray(empty.fused[0]))


def test_tokenizer_given_by_environment_must_exist(tmp_path, monkeypatch):
    path = write_checkpoint(tmp_path / "m.safetensors", "tiny", seed=1)
    monkeypatch.setenv("MAGICFUSION_TOKENIZER", str(tmp_path / "missing"))
    with pytest.raises(magicfusion.InputError, match="MAGICFUSION_TOKENIZER"):
        magicfusion.load(path)
    write_tiny_vocab(tmp_path / "tok")
    monkeypatch.setenv("MAGICFUSION_TOKENIZER", str(tmp_path / "tok"))
    assert magicfusion.load(path).tokenizer.vocab_size < 1000


def test_load_builds_its_modules_without_running_initialisers(tmp_path):
    """`load` builds on `meta` with torch.nn.init skipped (checkpoint.SkipInit): a fresh process that loads a model
    has not imported torch._dynamo, which meta's normal_ (nn.Embedding's initialiser) imports at a cost of 1.5-2 s,
    and the initialisers work again once the modules are built."""
    import subprocess
    import sys
    write_tiny_vocab(tmp_path)
    path = write_checkpoint(tmp_path / "m.safetensors", "tiny", seed=1)
    code = ("import sys, torch, magicfusion\n"
            f"m = magicfusion.load({str(path)!r}, tokenizer={str(tmp_path)!r})\n"
            "assert m.text_encoder.text_model.embeddings.token_embedding.weight.device.type == 'cpu'\n"
            "assert 'torch._dynamo' not in sys.modules, 'load imported torch._dynamo'\n"
            "w = torch.zeros(64)\n"
            "torch.nn.init.normal_(w)\n"
            "assert w.abs().sum() > 0, 'torch.nn.init is still switched off after load'\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
