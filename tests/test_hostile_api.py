"""Hostile checkpoints, tokenizers and arguments through the Python API (issue 10, classes 3, 6, 7, 8, 9, 11):
every one is an InputError naming what is wrong, raised at load or before sampling, never an IndexError,
TypeError or RuntimeError from inside torch, and never a run that allocates what the machine does not have."""
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

import magicfusion
from magicfusion import limits
from magicfusion.tokenizer import CLIPTokenizer
from tools.random_weights import random_state_dict, write_checkpoint, write_tiny_vocab

UNET, CLIP, VAE = "model.diffusion_model.", "cond_stage_model.transformer.text_model.", "first_stage_model."
SMALL = dict(steps=1, height=32, width=32, progress=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile-api")
    write_tiny_vocab(d / "tok")
    return d, write_checkpoint(d / "m.safetensors", "tiny", seed=1), d / "tok"


@pytest.fixture(scope="module")
def model(files):
    _, path, tok = files
    return magicfusion.load(path, tokenizer=tok)


@pytest.fixture(scope="module")
def tiny_sd():
    return random_state_dict("tiny", 3)


def one_line_error(call, *words):
    with pytest.raises(magicfusion.InputError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, (word, message)
    return message


# ------------------------------------------------------------------ class 6: configurations the modules cannot run

def with_tensor(sd: dict, key: str, tensor) -> dict:
    assert key in sd, key
    return {**sd, key: tensor}


CONFIG_CASES = {
    # (key, replacement, words of the message)
    "positions-10": (CLIP + "embeddings.position_embedding.weight", torch.zeros(10, 128), ["10 position", "77"]),
    "conv-in-48": (UNET + "input_blocks.0.0.weight", torch.zeros(48, 4, 3, 3), ["48", "multiple of 32"]),
    "text-32-wide": (CLIP + "embeddings.token_embedding.weight", torch.zeros(1000, 32), ["32 wide", "64-wide heads"]),
    "claimed-10**12": (UNET + "input_blocks.0.0.weight", torch.empty(10 ** 12, 0, 3, 3), ["1000000000000"]),
    "unet-out-8": (UNET + "out.2.weight", torch.zeros(8, 32, 3, 3), ["predicts 8 channels"]),
    "vae-out-1": (VAE + "decoder.conv_out.weight", torch.zeros(1, 32, 3, 3), ["to 1 image channels"]),
    "vae-width-48": (VAE + "decoder.up.0.block.0.conv2.weight", torch.zeros(48, 48, 3, 3), ["48", "multiple of 32"]),
    "latents-8": (VAE + "post_quant_conv.weight", torch.zeros(8, 8, 1, 1), ["8 latent channels"]),
    "vocab-0": (CLIP + "embeddings.token_embedding.weight", torch.zeros(0, 128), ["0 token embeddings"]),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_load_validates_the_whole_configuration(files, tiny_sd, tmp_path, case):
    key, tensor, words = CONFIG_CASES[case]
    path = tmp_path / f"{case}.safetensors"
    save_file({k: v.contiguous() for k, v in with_tensor(tiny_sd, key, tensor).items()}, str(path))
    message = one_line_error(lambda: magicfusion.load(path, tokenizer=files[2]), *words)
    assert "Error" not in message  # said in words, not an exception's repr from a module's constructor


# ---------------------------------------------------------------- class 7: tokenizer ids past the embedding table

def sparse_vocab(folder, src) -> None:
    """The tiny tokenizer with <|endoftext|> moved to id 5000: the same number of entries, a larger largest id
    (the tiny text encoder has 1000 embeddings)."""
    shutil.copytree(src, folder)
    vocab = json.loads((folder / "vocab.json").read_text())
    vocab["<|endoftext|>"] = 5000
    (folder / "vocab.json").write_text(json.dumps(vocab))


def test_tokenizer_ids_past_the_table_are_refused_from_every_source(files, tmp_path, monkeypatch):
    _, path, tok = files
    sparse_vocab(tmp_path / "sparse", tok)
    assert CLIPTokenizer.from_dir(tmp_path / "sparse").vocab_size < 1000  # counting entries would pass it
    one_line_error(lambda: magicfusion.load(path, tokenizer=tmp_path / "sparse"), "5000", "1000")
    monkeypatch.setenv("MAGICFUSION_TOKENIZER", str(tmp_path / "sparse"))
    one_line_error(lambda: magicfusion.load(path), "5000")
    monkeypatch.delenv("MAGICFUSION_TOKENIZER")
    (tmp_path / "json").mkdir()
    CLIPTokenizer.from_dir(tmp_path / "sparse").tokenizer.save(str(tmp_path / "json" / "tokenizer.json"))
    one_line_error(lambda: magicfusion.load(path, tokenizer=tmp_path / "json"), "5000")
    good = magicfusion.load(path, tokenizer=tok)  # control: the right tokenizer loads
    swapped = type(good)(good.unet, good.text_encoder, good.vae, CLIPTokenizer.from_dir(tmp_path / "sparse"))
    one_line_error(lambda: magicfusion.generate(swapped, "a cat", **SMALL), "5000")  # a Model built by hand


# ----------------------------------------------------------------------- class 11: the wrong kind of argument

def test_api_arguments_of_the_wrong_kind_are_input_errors(files, model):
    _, path, tok = files
    cases = [
        (lambda: magicfusion.generate(str(path), "a cat", **SMALL), ["model", "load"]),
        (lambda: magicfusion.generate(path, "a cat", **SMALL), ["model", "load"]),
        (lambda: magicfusion.fuse(model, "file.safetensors", "a cat", **SMALL), ["expert", "load"]),
        (lambda: magicfusion.fuse("file.safetensors", model, "a cat", **SMALL), ["general", "load"]),
        (lambda: magicfusion.fuse(model, [model, 3], "a cat", **SMALL), ["expert[1]"]),
        (lambda: magicfusion.generate(model, None, **SMALL), ["prompt", "str"]),
        (lambda: magicfusion.generate(model, "a cat", negative_prompt=3, **SMALL), ["negative_prompt"]),
        (lambda: magicfusion.fuse(model, model, "a cat", expert_prompt=[None], **SMALL), ["expert_prompt"]),
        (lambda: magicfusion.generate(model, "a cat", guidance="7.5", **SMALL), ["guidance", "number"]),
        (lambda: magicfusion.generate(model, "a cat", **{**SMALL, "steps": 2.0}), ["steps", "integer"]),
        (lambda: magicfusion.generate(model, "a cat", batch=True, **SMALL), ["batch", "integer"]),
        (lambda: magicfusion.generate(model, "a cat", seed="1", **SMALL), ["seed"]),
        (lambda: magicfusion.generate(model, "a cat", graph="yes", **SMALL), ["graph"]),
        (lambda: magicfusion.fuse(model, model, "a cat", kg="1", **SMALL), ["kg", "number"]),
        (lambda: magicfusion.load(path, tokenizer=tok, device="banana"), ["device", "banana"]),
        (lambda: magicfusion.load(path, tokenizer=tok, device=3.5), ["device"]),
        (lambda: magicfusion.load(path, tokenizer=tok, dtype=torch.int64), ["dtype", "int64"]),
        (lambda: magicfusion.load(path, tokenizer=tok, dtype="float64"), ["dtype", "float64"]),
        (lambda: magicfusion.load(path, tokenizer=123), ["tokenizer", "int"]),
        (lambda: magicfusion.load(123, tokenizer=tok), ["path", "int"]),
        (lambda: magicfusion.load(path, tokenizer=tok, ema="yes"), ["ema"]),
    ]
    if not torch.cuda.is_available():
        cases.append((lambda: magicfusion.load(path, tokenizer=tok, device="cuda"), ["cuda", "device='cpu'"]))
    for call, words in cases:
        one_line_error(call, *words)


# ----------------------------------------------------------- classes 3 and 9: values out of range, by name

@pytest.mark.parametrize("kwargs, words", [
    (dict(guidance=1e308), ["guidance", "out of range"]),
    (dict(guidance=-1e308), ["guidance"]),
    (dict(eta=1e308), ["eta", "out of range"]),
    (dict(eta=1.5), ["eta", "<= 1"]),
    (dict(height=100000, width=100000), ["height", "8192"]),
    (dict(batch=4611686018427387904), ["batch", "1024"]),
    (dict(seed=2 ** 70), ["seed"]),
])
def test_out_of_range_values_name_the_argument(model, kwargs, words):
    message = one_line_error(lambda: magicfusion.generate(model, "a cat", **{**SMALL, **kwargs}), *words)
    assert "float32" not in message and "weights" not in message  # not blamed on the model


@pytest.mark.parametrize("kwargs, word", [(dict(kg=1e308), "kg"), (dict(ke=[-1e308]), "ke"),
                                          (dict(fuse_until=10 ** 30), "fuse_until")])
def test_out_of_range_fusion_values_name_the_argument(model, kwargs, word):
    one_line_error(lambda: magicfusion.fuse(model, model, "a cat", **{**SMALL, **kwargs}), word)


def test_memory_estimate_refuses_and_says_what_fits(model, monkeypatch):
    free = 400 * 2 ** 20
    monkeypatch.setattr(limits, "available_bytes", lambda device: free)
    args = dict(steps=2, eta=0.0, height=512, width=512)
    message = one_line_error(lambda: magicfusion.generate(model, "a cat", batch=64, progress=False, **args),
                             "needs about", "is free")
    fits = int(re.search(r"at most (\d+) image", message)[1])
    estimate = lambda b: limits.estimate_bytes([model], 512, 512, b, 2, False, False)  # noqa: E731
    assert estimate(fits) <= free < estimate(fits + 1)  # the largest batch that fits, not a guess
    message = one_line_error(lambda: magicfusion.generate(model, "a cat", batch=1, progress=False,
                                                          **{**args, "height": 8192, "width": 8192}), "needs about")
    side = int(re.search(r"one image fits at (\d+)x", message)[1])
    assert limits.estimate_bytes([model], side, side, 1, 2, False, False) <= free
    magicfusion.generate(model, "a cat", batch=2, progress=False, **{**args, "height": 32, "width": 32})  # fits


def test_memory_estimate_grows_with_every_dimension(model):
    base = limits.estimate_bytes([model], 256, 256, 2, 10, False, False)
    assert limits.estimate_bytes([model], 512, 256, 2, 10, False, False) > base
    assert limits.estimate_bytes([model], 256, 256, 4, 10, False, False) > base
    assert limits.estimate_bytes([model], 256, 256, 2, 10, True, False) > base  # per-step noise of a noisy sampler
    assert limits.estimate_bytes([model, model], 256, 256, 2, 10, False, True) > base  # a graph holds both


# --------------------------------------------------------------------------- class 8: text that is not UTF-8

def test_prompts_that_are_not_utf8_are_refused(model):
    bad = b"a caf\xe9".decode("utf-8", "surrogateescape")  # how Python hands over a Latin-1 argument
    one_line_error(lambda: magicfusion.generate(model, bad, **SMALL), "prompt", "UTF-8")
    one_line_error(lambda: magicfusion.generate(model, "a cat", negative_prompt=bad, **SMALL), "negative_prompt")
    one_line_error(lambda: magicfusion.fuse(model, model, "a cat", expert_prompt=bad, **SMALL), "expert_prompt")
    one_line_error(lambda: model.tokenizer([bad]), "UTF-8")
    assert magicfusion.generate(model, "a café ☕", **SMALL)[0].size == (32, 32)  # real Unicode is fine


def test_paths_that_are_not_utf8_or_too_long(files, tmp_path):
    _, path, tok = files
    odd = tmp_path / os.fsdecode(b"mod\xe8le.safetensors")
    shutil.copy(path, odd)
    odd_tok = tmp_path / os.fsdecode(b"tok\xff")
    shutil.copytree(tok, odd_tok)
    loaded = magicfusion.load(odd, tokenizer=odd_tok)
    assert loaded.name.startswith("mod")
    (tmp_path / "json").mkdir()
    CLIPTokenizer.from_dir(tok).tokenizer.save(str(tmp_path / "json" / "tokenizer.json"))
    os.rename(tmp_path / "json", tmp_path / os.fsdecode(b"js\xffon"))
    magicfusion.load(path, tokenizer=tmp_path / os.fsdecode(b"js\xffon"))  # tokenizer.json read by Python
    one_line_error(lambda: magicfusion.load(tmp_path / ("m" * 300 + ".safetensors"), tokenizer=tok), "312 bytes")
    one_line_error(lambda: magicfusion.load(path, tokenizer=tmp_path / ("t" * 300)), "300 bytes")
