"""Prompts as SD users write them: AUTOMATIC1111's emphasis, BREAK and 75-token chunks, and textual inversion.

The expected embeddings are built by hand from the reference (transformers' CLIP tokenizer and text encoder on
the same weights): the fragments a prompt parses into are tokenized one by one, laid out in 77-id chunks, encoded,
weighted and scaled back to the chunk's mean. Textual inversion is compared with diffusers' load_textual_inversion.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTokenizer as HFTokenizer

import magicfusion
from magicfusion.errors import InputError
from magicfusion.prompt import BREAK, chunk_prompt, encode_prompt, parse_weights
from helpers import deadline
from oracle import hf_clip, reference_pipeline
from tools.random_weights import write_checkpoint, write_tiny_vocab

B = "BREAK"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompt")
    write_tiny_vocab(d)
    path = write_checkpoint(d / "model.safetensors", "tiny", seed=21)
    model = magicfusion.load(path, tokenizer=d)
    hf_tok = HFTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=77)
    return d, path, model, hf_tok, hf_clip(model.text_encoder.cfg, model.text_encoder.state_dict())


# --- parsing -------------------------------------------------------------------------------------------------

PARSE = {  # expected fragments, worked out from AUTOMATIC1111's rules by hand
    "a cat": [("a cat", 1.0)],
    "a (cat)": [("a ", 1.0), ("cat", 1.1)],
    "((cat)) dog": [("cat", 1.1 * 1.1), (" dog", 1.0)],
    "[cat] [[dog]]": [("cat", 1 / 1.1), (" ", 1.0), ("dog", 1 / 1.1 / 1.1)],
    "(cat:1.3), dog": [("cat", 1.3), (", dog", 1.0)],
    "(a (b:2) c)": [("a ", 1.1), ("b", 2.2), (" c", 1.1)],
    "(cat: 0.5 )": [("cat", 0.5)],
    r"\(cat\) \[x\] a\\b": [("(cat) [x] a\\b", 1.0)],
    "(open [sq": [("open ", 1.1), ("sq", 1.0)],
    "time: 5) ] end": [("time: 5) ] end", 1.0)],
    "a BREAK b": [("a", 1.0), (B, None), ("b", 1.0)],
    "(x BREAK y)": [("x", 1.1), (B, None), ("y", 1.1)],
    "BREAKFAST": [("BREAKFAST", 1.0)],
    "": [("", 1.0)],
}


@pytest.mark.parametrize("text", list(PARSE))
def test_parse_weights(text):
    got = [(B if t is BREAK else t, w) for t, w in parse_weights(text)]
    expected = [(t, None if w is None else pytest.approx(w)) for t, w in PARSE[text]]
    assert got == expected


def test_a_weight_that_is_not_a_number_is_refused():
    with pytest.raises(InputError, match="not a number"):
        parse_weights("(cat:1.2.3)")


# --- encoding, derived by hand from the reference encoder ----------------------------------------------------

def reference(tiny, chunks: list) -> torch.Tensor:
    """chunks: per chunk a list of (text, weight) pieces, each tokenized on its own -> (chunks * 77, width)."""
    _, _, _, hf_tok, hf_enc = tiny
    out = []
    for pieces in chunks:
        ids, weights = [], []
        for text, w in pieces:
            t = hf_tok(text, add_special_tokens=False).input_ids
            ids, weights = ids + t, weights + [w] * len(t)
        assert len(ids) <= 75
        pad = 75 - len(ids)
        ids = [hf_tok.bos_token_id] + ids + [hf_tok.eos_token_id] * (pad + 1)
        weights = torch.tensor([1.0] + weights + [1.0] * (pad + 1))
        with torch.no_grad():
            z = hf_enc(torch.tensor([ids])).last_hidden_state[0]
        weighted = z * weights[:, None]
        out.append(weighted * (z.mean() / weighted.mean()))
    return torch.cat(out)


def ours(tiny, prompt, negative=""):
    model = tiny[2]
    emb = encode_prompt(model, prompt, negative, 1)
    return emb[1], emb[0]


def test_plain_prompts_give_exactly_the_plain_encoding(tiny):
    model = tiny[2]
    for prompt, negative in [("a cat with a hat, painting", "blurry"), ("", ""), ("the sun: art", "a dog")]:
        ids = model.tokenizer([negative, prompt])
        expected = model.text_encoder(ids).repeat_interleave(2, dim=0)
        assert torch.equal(encode_prompt(model, prompt, negative, 2), expected)


CASES = {
    "a (cat:1.3) and [dog]": [[("a", 1), ("cat", 1.3), ("and", 1), ("dog", 1 / 1.1)]],
    "((the sun)) with \\(art\\)": [[("the sun", 1.21), ("with (art)", 1)]],
    "(a (paint:0.5) cat) BREAK [dog] on (it:1.4)": [[("a", 1.1), ("paint", 0.55), ("cat", 1.1)],
                                                     [("dog", 1 / 1.1), ("on", 1), ("it", 1.4)]],
}


@pytest.mark.parametrize("prompt", list(CASES))
def test_emphasis_and_break_match_the_hand_derivation(tiny, prompt):
    cond, _ = ours(tiny, prompt)
    torch.testing.assert_close(cond, reference(tiny, CASES[prompt]), rtol=1e-5, atol=1e-5)


def test_long_prompt_is_cut_into_chunks_of_75(tiny):
    words = ("dog sun the " * 55).split()  # 165 one-token words: chunks of 75, 75 and 15
    assert len(tiny[3](" ".join(words), add_special_tokens=False).input_ids) == 165
    prompt = " ".join(words[:100]) + " (" + " ".join(words[100:]) + ":1.2)"
    chunks = [[(" ".join(words[:75]), 1)], [(" ".join(words[75:100]), 1), (" ".join(words[100:150]), 1.2)],
              [(" ".join(words[150:]), 1.2)]]
    cond, uncond = ours(tiny, prompt, "blurry")
    assert cond.shape[0] == 3 * 77
    torch.testing.assert_close(cond, reference(tiny, chunks), rtol=1e-5, atol=1e-5)
    # the negative prompt is padded with empty chunks to the same length
    torch.testing.assert_close(uncond, reference(tiny, [[("blurry", 1)], [], []]), rtol=1e-5, atol=1e-5)


def test_a_full_chunk_moves_the_words_after_its_last_comma_to_the_next(tiny):
    words = ("dog sun " * 40).split()  # 80 one-token words, and a comma after the 70th: 71 tokens up to it
    assert len(tiny[3](" ".join(words), add_special_tokens=False).input_ids) == 80
    prompt = " ".join(words[:70]) + ", " + " ".join(words[70:])
    cond, _ = ours(tiny, prompt)
    expected = reference(tiny, [[(" ".join(words[:70]) + ",", 1)], [(" ".join(words[70:]), 1)]])
    torch.testing.assert_close(cond, expected, rtol=1e-5, atol=1e-5)
    far = " ".join(words[:30]) + ", " + " ".join(words[30:])  # comma more than 20 tokens back: a plain cut
    expected = reference(tiny, [[(" ".join(words[:30]) + ", " + " ".join(words[30:74]), 1)],
                                [(" ".join(words[74:]), 1)]])
    torch.testing.assert_close(ours(tiny, far)[0], expected, rtol=1e-5, atol=1e-5)


def test_long_weighted_prompt_samples_like_the_reference_given_its_embeddings(tiny):
    """The UNet attends to 2 * 77 context vectors: same image as diffusers' pipeline fed the hand-made ones."""
    d, _, model, _, _ = tiny
    words = ("the sun art " * 30).split()
    assert len(tiny[3](" ".join(words), add_special_tokens=False).input_ids) == 90
    prompt = "(" + " ".join(words[:40]) + ":1.2) " + " ".join(words[40:])
    chunks = [[(" ".join(words[:40]), 1.2), (" ".join(words[40:75]), 1)], [(" ".join(words[75:]), 1)]]
    pipe = reference_pipeline(model, d)
    cond = reference(tiny, chunks)[None]
    uncond = reference(tiny, [[], []])[None]
    kw = dict(steps=2, height=64, width=64, seed=4)
    image = magicfusion.generate(model, prompt, progress=False, graph=False, **kw)[0]
    ref = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=2, height=64, width=64,
               generator=torch.Generator("cpu").manual_seed(4)).images[0]
    diff = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(ref, dtype=np.int16))
    assert diff.max() <= 1, diff.max()


# --- textual inversion ---------------------------------------------------------------------------------------

def embedding_files(folder, width, gen):
    """One file of each format: AUTOMATIC1111 .pt (2 vectors), AUTOMATIC1111 .safetensors (1), diffusers (3)."""
    vecs = [torch.randn(n, width, generator=gen) for n in (2, 1, 3)]
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vecs[0]}, "name": "stored-name",
                "step": 100}, folder / "painto.pt")
    save_file({"emb_params": vecs[1]}, str(folder / "sunnyx.safetensors"))
    save_file({"<hat-thing>": vecs[2]}, str(folder / "learned_embeds.safetensors"))
    return [folder / "painto.pt", folder / "sunnyx.safetensors", folder / "learned_embeds.safetensors"], vecs


def test_textual_inversion_matches_diffusers(tiny, tmp_path):
    d, path, base, _, _ = tiny
    files, _ = embedding_files(tmp_path, base.text_encoder.cfg.width, torch.Generator().manual_seed(0))
    model = magicfusion.load(path, tokenizer=d, embeddings=files)
    assert {k: v[1] for k, v in model.embeddings.items()} == {"painto": 2, "sunnyx": 1, "<hat-thing>": 3}
    pipe = reference_pipeline(base, d)
    pipe.load_textual_inversion([str(f) for f in files], token=["painto", "sunnyx", "<hat-thing>"])
    for prompt in ["a painto cat with a <hat-thing>, sunnyx art", "(painto:1.3) and a sun"]:
        weighted = "(" in prompt
        ref_prompt = prompt.replace("(painto:1.3)", "painto") if weighted else prompt
        cond, _ = pipe.encode_prompt(ref_prompt, "cpu", 1, True, "")
        ours_cond = encode_prompt(model, prompt, "", 1)[1]
        if weighted:  # the reference has no emphasis: weight its output by hand (painto's 2 vectors follow bos)
            w = torch.ones(77)
            w[1:3] = 1.3
            z = cond[0]
            cond = (z * w[:, None] * (z.mean() / (z * w[:, None]).mean()))[None]
        torch.testing.assert_close(ours_cond, cond[0], rtol=1e-5, atol=1e-5)
    kw = dict(steps=2, height=64, width=64, seed=7)
    prompt = "a painto cat with a <hat-thing>"
    image = magicfusion.generate(model, prompt, progress=False, graph=False, **kw)[0]
    ref = pipe(prompt, num_inference_steps=2, height=64, width=64,
               generator=torch.Generator("cpu").manual_seed(7)).images[0]
    assert np.abs(np.asarray(image, dtype=np.int16) - np.asarray(ref, dtype=np.int16)).max() <= 1


def test_an_embedding_is_never_split_across_chunks(tiny, tmp_path):
    d, path, _, _, _ = tiny
    files, vecs = embedding_files(tmp_path, 128, torch.Generator().manual_seed(1))
    model = magicfusion.load(path, tokenizer=d, embeddings=[files[2]])
    ids = chunk_prompt(model, "dog " * 74 + "<hat-thing>").ids  # "dog" is one token
    first = model.embeddings["<hat-thing>"][0]
    assert len(ids) == 2 and ids[1][1:4] == [first, first + 1, first + 2]
    assert ids[0][75] == model.tokenizer.eos_id  # the first chunk ends early, eos-padded


def test_embedding_errors(tiny, tmp_path):
    d, path, _, _, _ = tiny
    save_file({"emb_params": torch.randn(2, 1024)}, str(tmp_path / "sd2.safetensors"))
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, str(tmp_path / "xl.safetensors"))
    save_file({"a": torch.randn(1, 128), "b": torch.randn(1, 128)}, str(tmp_path / "two.safetensors"))
    save_file({"emb_params": torch.randn(1, 128)}, str(tmp_path / "dup.safetensors"))
    (tmp_path / "x.txt").write_text("hi")
    for files, words in [([tmp_path / "sd2.safetensors"], "Stable Diffusion 2.x"),
                         ([tmp_path / "xl.safetensors"], "SDXL"),
                         ([tmp_path / "two.safetensors"], "not a textual-inversion file"),
                         ([tmp_path / "dup.safetensors", (tmp_path / "dup.safetensors", "dup")], "already taken"),
                         ([tmp_path / "x.txt"], "unsupported"), ([tmp_path / "none.pt"], "no such file")]:
        with pytest.raises(InputError, match=words) as e:
            magicfusion.load(path, tokenizer=d, embeddings=files)
        assert "\n" not in str(e.value)


def test_an_embedding_that_is_a_fifo_or_a_device_is_named_and_never_opened(tiny, tmp_path):
    """Opening a FIFO waits for a writer and a device can be endless: both are refused by kind, in one line."""
    d, path, _, _, _ = tiny
    os.mkfifo(tmp_path / "pipe.pt")
    (tmp_path / "zero.pt").symlink_to("/dev/zero")
    with deadline(60):
        for file, words in [(tmp_path / "pipe.pt", "FIFO"), (tmp_path / "zero.pt", "character device")]:
            with pytest.raises(InputError, match=words) as e:
                magicfusion.load(path, tokenizer=d, embeddings=[file])
            assert "\n" not in str(e.value) and "embedding" in str(e.value) and file.name in str(e.value)


def test_models_of_a_fusion_take_contexts_of_their_own_length_graph_or_not(tiny, tmp_path):
    """The general prompt needs 2 chunks, the expert's 1: each UNet attends to its own context length; the step
    graph (run eagerly on a CPU) is keyed on those lengths, so a run with other lengths gets its own."""
    d, path, model, _, _ = tiny
    expert = magicfusion.load(write_checkpoint(tmp_path / "e.safetensors", "tiny", seed=22), tokenizer=d)
    long = "dog sun the " * 30
    kw = dict(steps=2, height=64, width=64, seed=3, progress=False)
    for prompt, expert_prompt in [(long, "a dog"), ("a dog", long), ("a dog", "a sun")]:
        eager = magicfusion.fuse(model, expert, prompt, expert_prompt, graph=False, **kw).fused
        graphed = magicfusion.fuse(model, expert, prompt, expert_prompt, graph=True, **kw).fused
        assert np.array_equal(np.asarray(eager[0]), np.asarray(graphed[0]))
