"""The toy world (tools/toyworld.py), its training script, the judge, and the shipped toy models fused.

The world's renders need the Noto Color Emoji font (`.ci/run` installs it); without it those tests skip. The
thresholds on the shipped models are the evaluation's figures (docs/toyworld.md) with a wide margin, on seeds
the evaluation does not use.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

import magicfusion
from magicfusion import demo
from magicfusion.demo import toy_paths
from tools import toyworld

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "weights" / "toy"

try:
    toyworld.font_path()
    HAVE_FONT = True
except toyworld.FontMissing:
    HAVE_FONT = False
needs_font = pytest.mark.skipif(not HAVE_FONT, reason="the Noto Color Emoji font is not installed")


def test_world_has_the_promised_names():
    assert len(toyworld.EXPERT_OBJECTS) >= 16 and len(toyworld.SCENES) >= 6 and len(toyworld.GENERAL_OBJECTS) >= 8
    assert {"lion", "tiger", "cat", "dog", "fox", "panda", "frog", "bee", "penguin", "turtle", "owl", "rabbit", "pig",
            "cow", "monkey", "koala"} <= set(toyworld.EXPERT_OBJECTS)
    assert {"beach", "snow", "meadow", "night", "desert", "underwater"} <= set(toyworld.SCENES)
    assert not set(toyworld.EXPERT_OBJECTS) & set(toyworld.GENERAL_OBJECTS)
    assert toyworld.fusion_prompt("beach", "lion") == "a lion on the beach"
    assert toyworld.fusion_prompt("night", "owl") == "an owl at night"


@needs_font
def test_render_is_deterministic_and_seeded():
    a = np.asarray(toyworld.render("beach", "lion", seed=3))
    b = np.asarray(toyworld.render("beach", "lion", seed=3))
    c = np.asarray(toyworld.render("beach", "lion", seed=4))
    assert a.shape == (toyworld.SIZE, toyworld.SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert toyworld.render(None, None, seed=0, size=64).size == (64, 64)


@needs_font
def test_render_draws_what_it_says():
    """On the light, nearly grey studio background the lion is every saturated or dark pixel, and its extent is the
    promised share of the image."""
    for seed in range(4):
        img = np.asarray(toyworld.render(None, "lion", seed=seed), dtype=np.int16)
        changed = (img.max(-1) - img.min(-1) > 60) | (img.mean(-1) < 150)
        ys, xs = np.nonzero(changed)
        side = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
        assert 0.3 * toyworld.SIZE <= side <= 0.7 * toyworld.SIZE  # animals are drawn at 35-65% of the image
    studio = np.asarray(toyworld.render(None, None, seed=5), dtype=np.float32)
    assert studio.mean() > 200 and studio.std() < 15  # plain and light


@needs_font
def test_a_backdrop_recolours_the_studio_and_leaves_the_animal():
    """render(None, animal, seed, backdrop=rgb): the same animal at the same place as the studio image of that seed,
    in front of a plain backdrop of that colour (the expert's --expert-backdrops images)."""
    studio = np.asarray(toyworld.render(None, "lion", seed=2), dtype=np.int16)
    blue = np.asarray(toyworld.render(None, "lion", seed=2, backdrop=(20, 40, 200)), dtype=np.int16)
    animal = (studio.max(-1) - studio.min(-1) > 60) | (studio.mean(-1) < 150)
    same = (studio == blue).all(-1)
    assert same[animal].mean() > 0.8 and same[~animal].mean() < 0.05  # the animal's soft edge mixes with both
    corners = blue[[0, 0, -1, -1], [0, -1, 0, -1]].astype(float)
    assert np.abs(corners - (20, 40, 200)).max() < 45  # the colour, jittered and graded like the studio
    with pytest.raises(ValueError):
        toyworld.render("beach", "lion", backdrop=(0, 0, 0))


def test_backdrop_draws_are_seeded_and_take_their_share():
    from tools import train_toy
    assert train_toy.backdrops(50, 0.0, 0) == [None] * 50
    full = train_toy.backdrops(50, 1.0, 0)
    assert all(c is not None and len(c) == 3 and all(0 <= v <= 255 for v in c) for c in full)
    half = train_toy.backdrops(2000, 0.5, 3)
    assert half == train_toy.backdrops(2000, 0.5, 3) and half != train_toy.backdrops(2000, 0.5, 4)
    assert 0.45 < np.mean([c is not None for c in half]) < 0.55
    colours = np.array([c for c in half if c is not None])
    assert colours.min() < 20 and colours.max() > 235  # dark and bright backdrops alike


@needs_font
def test_a_colour_field_backdrop_paints_the_grid_smoothly_behind_the_same_animal():
    """backdrop=(k, k, 3) colours: a smooth field through them (each corner takes its corner's colour), the animal
    at the same place as the studio image of that seed."""
    grid = np.array([[[250, 10, 10], [10, 250, 10]], [[10, 10, 250], [240, 240, 20]]], dtype=float)
    studio = np.asarray(toyworld.render(None, "cat", seed=4), dtype=np.int16)
    field = np.asarray(toyworld.render(None, "cat", seed=4, backdrop=grid), dtype=np.int16)
    animal = (studio.max(-1) - studio.min(-1) > 60) | (studio.mean(-1) < 150)
    same = (studio == field).all(-1)
    assert same[animal].mean() > 0.8 and same[~animal].mean() < 0.05
    for (y, x), colour in zip([(0, 0), (0, -1), (-1, 0), (-1, -1)], grid.reshape(4, 3)):
        if not animal[y, x]:
            assert np.abs(field[y, x] - colour).max() < 30, (y, x)
    row = field[2].astype(float)  # along the top edge: from red to green without a jump
    assert np.abs(np.diff(row[~animal[2]], axis=0)).max() < 40


def test_backdrop_detail_draws_colour_grids_on_the_same_images():
    from tools import train_toy
    plain = train_toy.backdrops(400, 0.5, 3)
    assert train_toy.backdrops(400, 0.5, 3, 1) == plain  # detail 1 is the plain recipe, draw for draw
    fields = train_toy.backdrops(400, 0.5, 3, 4)
    assert [c is None for c in fields] == [c is None for c in plain]  # the same images get a backdrop
    grids = [c for c in fields if isinstance(c, np.ndarray)]
    sizes = {c.shape[0] for c in grids}
    assert sizes == {2, 3, 4} and all(c.shape == (c.shape[0], c.shape[0], 3) for c in grids)
    assert 0.6 < len(grids) / sum(c is not None for c in fields) < 0.9  # k = 1 keeps a plain colour
    assert all(0 <= c.min() and c.max() <= 255 for c in grids)
    again = train_toy.backdrops(400, 0.5, 3, 4)
    assert all((a is None and b is None) or np.array_equal(a, b) for a, b in zip(fields, again))


def test_unknown_names_are_refused():
    with pytest.raises(KeyError):
        toyworld.render("moon", None)
    with pytest.raises(KeyError):
        toyworld.render("beach", "dragon")


def test_missing_font_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setattr(toyworld, "FONT_PATHS", ())
    monkeypatch.setenv("MAGICFUSION_EMOJI_FONT", str(tmp_path / "none.ttf"))
    with pytest.raises(toyworld.FontMissing, match="apt-get install fonts-noto-color-emoji"):
        toyworld.font_path()


# ------------------------------------------------------------------------------------------------ training

def test_tokenizer_tells_every_world_word_apart(tmp_path):
    from tools.train_toy import world_words, write_tokenizer
    tok = write_tokenizer(tmp_path)
    spelled = {}
    for word in world_words():
        ids = tok([word])[0].tolist()
        body = ids[1:ids.index(tok.eos_id)]
        assert 1 <= len(body) < len(word) or len(word) == 1, (word, body)  # merges, not only bytes
        spelled[tuple(body)] = word
    assert len(spelled) == len(world_words())
    assert (TOY / "tokenizer" / "vocab.json").read_text() == (tmp_path / "vocab.json").read_text()  # shipped = rebuilt


def test_vae_training_loss_falls():
    from tools.train_toy import train_vae
    gen = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(8, 3, 8, 8, generator=gen), size=64, mode="bilinear") * 2 - 1
    _, _, losses = train_vae(smooth, steps=40, batch=4, crop=32, lr=2e-3, progress=False)
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5])


def test_vae_training_loss_falls_under_bfloat16_too():
    """--bf16 runs the VAE's crop steps under bfloat16 autocast: the loss still falls, and the steps are not the
    float32 ones (the flag reaches the networks)."""
    from tools.train_toy import train_vae
    gen = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(8, 3, 8, 8, generator=gen), size=64, mode="bilinear") * 2 - 1
    kw = dict(steps=40, batch=4, crop=32, lr=2e-3, progress=False)
    enc, _, losses = train_vae(smooth, bf16=True, **kw)
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5])
    plain = train_vae(smooth, **{**kw, "steps": 2})[0].state_dict()
    fast = train_vae(smooth, bf16=True, **{**kw, "steps": 2})[0].state_dict()
    assert not all(torch.equal(plain[k], fast[k]) for k in plain)


def test_channels_last_encoding_matches_the_plain_layout():
    """--bf16 encodes in the channels-last layout (float32: the same arithmetic in another order). The latents
    agree with the plain layout's to float32 rounding and come back contiguous."""
    from tools.train_toy import VAE, encode
    from magicfusion.vae import VAEEncoder
    torch.manual_seed(0)
    enc = VAEEncoder(VAE).eval()
    pixels = torch.rand(6, 3, 32, 32) * 2 - 1
    plain, fast = encode(enc, pixels, batch=4), encode(enc, pixels, batch=4, channels_last=True)
    for p, f in zip(plain, fast):
        assert f.is_contiguous()
        torch.testing.assert_close(f, p, rtol=1e-4, atol=1e-5)


def test_unet_training_loss_falls():
    from tools.train_toy import diffusion_loss, train_unet, UNET
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(16, 4, 8, 8, generator=gen).sign()  # two-valued latents: quick to learn
    std = torch.full_like(mean, 0.05)
    ids = torch.randint(0, 50, (16, 2, 77), generator=gen)
    uncond = torch.zeros(77, dtype=torch.long)
    fixed = (torch.randint(0, 1000, (16,), generator=gen), torch.randn(16, 4, 8, 8, generator=gen))
    unet, text, losses = train_unet(mean, std, 1.0, ids, uncond, vocab_size=64, steps=30, batch=8, lr=2e-3,
                                    progress=False)
    assert unet.cfg == UNET
    with torch.no_grad():
        after = diffusion_loss(unet, text, mean, ids[:, 0], *fixed).item()
    assert after < 0.9  # the zero-initialised output starts at the noise's variance, 1.0
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_min_snr_weights_only_the_nearly_clean_timesteps():
    """Min-SNR-gamma: an image whose timestep has SNR <= gamma keeps weight 1, one above it gets gamma / SNR."""
    from tools.train_toy import alphas_cumprod, diffusion_loss
    gen = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    unet, text = (lambda x, t, c: 0.3 * x), (lambda ids: None)  # any prediction with an error to weigh
    abar = alphas_cumprod()
    snr = abar / (1 - abar)
    noisy, clean = int(torch.nonzero(snr < 1)[0]), 0  # SNR about 1 and about 1,200 on SD's schedule
    assert snr[clean] > 100
    for t in (noisy, clean):
        tt = torch.tensor([t, t])
        plain = diffusion_loss(unet, text, z0, None, tt, noise)
        weighted = diffusion_loss(unet, text, z0, None, tt, noise, snr_gamma=5.0)
        expected = plain * (1.0 if t == noisy else 5.0 / snr[t])
        torch.testing.assert_close(weighted, expected.to(weighted.dtype), rtol=1e-5, atol=0)
    both = torch.tensor([noisy, clean])  # and per image, not per batch
    per_image = [diffusion_loss(unet, text, z0[i:i + 1], None, both[i:i + 1], noise[i:i + 1], 5.0) for i in (0, 1)]
    torch.testing.assert_close(diffusion_loss(unet, text, z0, None, both, noise, 5.0), sum(per_image) / 2)


def _tiny_unet_data():
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(16, 4, 8, 8, generator=gen).sign()
    return mean, torch.full_like(mean, 0.05), torch.randint(0, 50, (16, 2, 77), generator=gen), \
        torch.zeros(77, dtype=torch.long)


def test_frozen_text_encoder_stays_at_its_initialisation():
    """--frozen-text: the UNet trains, the text encoder keeps the seeded random weights it started with."""
    from tools.train_toy import train_unet
    mean, std, ids, uncond = _tiny_unet_data()
    kw = dict(vocab_size=64, batch=4, lr=2e-3, progress=False, seed=3)
    start_u, start_t, _ = train_unet(mean, std, 1.0, ids, uncond, steps=0, **kw)
    frozen_u, frozen_t, _ = train_unet(mean, std, 1.0, ids, uncond, steps=5, train_text=False, **kw)
    trained_u, trained_t, _ = train_unet(mean, std, 1.0, ids, uncond, steps=5, **kw)
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert same(frozen_t, start_t) and not same(trained_t, start_t)
    assert not same(frozen_u, start_u)


def test_frozen_token_embeddings_stay_while_the_rest_of_the_encoder_trains():
    """--frozen-embeddings: the token table keeps its seeded initialisation; positions and layers train."""
    from tools.train_toy import train_unet
    mean, std, ids, uncond = _tiny_unet_data()
    kw = dict(vocab_size=64, batch=4, lr=2e-3, progress=False, seed=3)
    _, start, _ = train_unet(mean, std, 1.0, ids, uncond, steps=0, **kw)
    _, tuned, _ = train_unet(mean, std, 1.0, ids, uncond, steps=5, train_embeddings=False, **kw)
    table = "text_model.embeddings.token_embedding.weight"
    before, after = start.state_dict(), tuned.state_dict()
    assert torch.equal(before[table], after[table])
    assert not torch.equal(before["text_model.embeddings.position_embedding.weight"],
                           after["text_model.embeddings.position_embedding.weight"])
    assert any(not torch.equal(before[k], after[k]) for k in before if ".layers." in k)


def test_bfloat16_steps_on_the_cpu_take_the_plain_attention_path():
    """--bf16 on the CPU: attention runs as the plain softmax(QK^T)V ("math") kernel, not PyTorch's CPU flash
    kernel, which is 2-6x slower in bfloat16 at these lengths (docs/toyworld.md). The same steps forced onto the
    math kernel from outside give the same weights; flash attention would round differently."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from tools.train_toy import train_unet
    mean, std, ids, uncond = _tiny_unet_data()
    kw = dict(vocab_size=64, batch=4, lr=2e-3, progress=False, steps=3, seed=3, bf16=True)
    plain = train_unet(mean, std, 1.0, ids, uncond, **kw)[0].state_dict()
    with sdpa_kernel(SDPBackend.MATH):
        forced = train_unet(mean, std, 1.0, ids, uncond, **kw)[0].state_dict()
    assert all(torch.equal(plain[k], forced[k]) for k in plain)


def test_frozen_down_trains_only_the_output_blocks_and_the_text_encoder():
    """--expert-frozen-down: the time embedding, input blocks and middle block keep the starting weights exactly
    (no weight decay either); the output blocks and the text encoder move."""
    from tools.train_toy import train_unet
    mean, std, ids, uncond = _tiny_unet_data()
    kw = dict(vocab_size=64, batch=4, lr=2e-3, progress=False)
    start = train_unet(mean, std, 1.0, ids, uncond, steps=3, seed=3, **kw)[:2]  # not a zero-initialised output
    unet, text, _ = train_unet(mean, std, 1.0, ids, uncond, steps=4, seed=4, init=start, frozen_down=True, **kw)
    before, after = start[0].state_dict(), unet.state_dict()
    frozen = ("time_embed.", "input_blocks.", "middle_block.")
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(frozen))
    assert all(not torch.equal(before[k], after[k]) for k in before
               if k.startswith("output_blocks.") and k.endswith(".weight"))
    assert any(not torch.equal(a, b) for a, b in zip(start[1].state_dict().values(), text.state_dict().values()))


def test_unknown_word_augmentation_swaps_only_the_object_for_untaught_ids(tmp_path):
    """--unknown-words: the object's ids (found by object_spans) give way to one or two ids no caption of either
    model uses; the article before and the scene after stay, the row stays 77 ids padded with eos."""
    from tools.train_toy import (caption_ids, expert_items, general_items, object_spans, replace_objects,
                                 untaught_ids, write_tokenizer)
    tok = write_tokenizer(tmp_path / "tok")
    items = general_items(1)
    ids, spans = caption_ids(tok, items), object_spans(tok, items)
    pool = untaught_ids(tok, expert_items(1) + items)
    animal_ids = set(caption_ids(tok, expert_items(1)).unique().tolist())
    assert pool.numel() > 100 and not animal_ids & set(pool.tolist())
    for i, (_, obj, _) in enumerate(items):  # the span holds exactly the object word's ids
        start, n = spans[i, 0].tolist()
        if obj is None:
            assert n == 0
        else:
            word = tok([obj])[0]
            assert ids[i, 0, start:start + n].tolist() == word[1:1 + n].tolist() and word[1 + n] == word[-1]
    rows, sp = ids[:, 0], spans[:, 0]
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(replace_objects(rows, sp, pool, 0.0, gen), rows)
    out = replace_objects(rows, sp, pool, 1.0, gen)
    eos = int(rows[0, -1])
    for row, new, (start, n) in zip(rows.tolist(), out.tolist(), sp.tolist()):
        if n == 0:
            assert new == row
            continue
        words = [t for t in row if t != eos]
        new_words = [t for t in new if t != eos]
        k = len(new_words) - len(words) + n  # the ids that took the object's place
        assert k in (1, 2) and len(new) == len(row) and new[-1] == eos
        assert new[:start] == row[:start] and new_words[start + k:] == words[start + n:]
        assert set(new[start:start + k]) <= set(pool.tolist())


def test_training_can_start_from_a_written_checkpoint(tmp_path):
    """--init-from / --vae-from read back exactly what checkpoint_dict wrote (float16), by LDM key prefix."""
    from tools.train_toy import (VAE, VAEDecoder, VAEEncoder, checkpoint_dict, load_unet_text, load_vae, rounded,
                                 train_unet, write_atomic)
    mean, std, ids, uncond = _tiny_unet_data()
    torch.manual_seed(0)
    unet, text, _ = train_unet(mean, std, 1.0, ids, uncond, vocab_size=64, steps=0, progress=False, seed=5)
    enc, dec = VAEEncoder(VAE), VAEDecoder(VAE)
    write_atomic(checkpoint_dict(unet, text, enc, dec, 0.25), tmp_path / "m.safetensors", {})
    u2, t2 = load_unet_text(tmp_path / "m.safetensors", vocab_size=64)
    e2, d2, scale = load_vae(tmp_path / "m.safetensors")
    assert scale == 0.25
    for a, b in ((unet, u2), (text, t2), (enc, e2), (dec, d2)):
        ref = rounded(a).state_dict()
        assert all(torch.equal(ref[k], v) for k, v in b.state_dict().items())
    # a fine-tune with a zero learning rate returns its starting point, not a fresh initialisation
    tuned_u, _, _ = train_unet(mean, std, 1.0, ids, uncond, vocab_size=64, steps=2, lr=0.0, progress=False,
                               seed=6, init=(u2, t2))
    assert all(torch.equal(x, y) for x, y in zip(tuned_u.state_dict().values(), u2.state_dict().values()))


def test_train_toy_refuses_a_device_it_does_not_have(tmp_path, capsys):
    from tools import train_toy
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal cannot be seen here")
    assert train_toy.main(["--device", "cuda", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device cpu" in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args", [["--vae-from", "missing.safetensors"], ["--init-from", "README.md"],
                                  ["--vae-from", str(TOY / "judge.safetensors")],
                                  ["--models", "expert"], ["--unknown-words", "2"], ["--unknown-words", "nan"],
                                  ["--expert-backdrops", "-0.1"], ["--expert-backdrops", "nan"],
                                  ["--backdrop-detail", "0"], ["--backdrop-detail", "17"],
                                  ["--expert-rounds", "0"], ["--expert-rounds", "11"],
                                  ["--expert-steps", "0"], ["--expert-min-snr", "-1"], ["--expert-min-snr", "nan"],
                                  ["--general-min-snr", "-1"],
                                  ["--expert-frozen-down", "--expert-from-scratch"]])
def test_train_toy_refuses_bad_starting_points_before_writing(args, tmp_path, capsys):
    from tools import train_toy
    assert train_toy.main([*args, "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_toy: error: ")
    assert not (tmp_path / "o").exists()


@needs_font
def test_judge_script_trains_the_judge_train_makes(tmp_path):
    """`python tools/judge.py` is judge.train on the given checkpoint's VAE as written, saved whole."""
    from tools import judge, train_toy
    out = tmp_path / "judge.safetensors"
    args = ["--vae", str(TOY / "general.safetensors"), "--out", str(out), "--steps", "2", "--images", "6",
            "--seed", "3", "--quiet"]
    assert judge.main(args) == 0
    enc, dec, _ = train_toy.load_vae(TOY / "general.safetensors")
    ref = judge.train(6, 2, seed=3, progress=False, vae=(enc, dec)).state_dict()
    got = judge.load(out).state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert not all(torch.equal(ref[k], judge.Judge().state_dict()[k]) for k in ref if "weight" in k)


@pytest.mark.parametrize("args", [["--vae", "README.md"], ["--vae", str(TOY / "judge.safetensors")],
                                  ["--steps", "0"], ["--images", "-1"], ["--images", "20001"],
                                  ["--out", "exists"], ["--out", ".", "--overwrite"],
                                  ["--out", "nofolder/judge.safetensors"]])
def test_judge_script_refuses_bad_input_before_writing(args, tmp_path, capsys, monkeypatch):
    from tools import judge
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exists").write_bytes(b"keep")
    before = sorted(p.name for p in tmp_path.iterdir())
    args = args if "--out" in args else [*args, "--out", "j.safetensors"]
    assert judge.main([*args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("judge: error: "), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before and (tmp_path / "exists").read_bytes() == b"keep"


def test_eval_settings_are_picked_by_whole_name_or_by_prefix():
    from tools import eval_toy
    assert eval_toy.select(["SNB (defaults)"]) == ["SNB (defaults)"]  # a whole name is that setting alone
    assert eval_toy.select(["SNB (defaults)", "SNB (defaults),"]) == ["SNB (defaults)", "SNB (defaults), DDIM 50 steps"]
    assert eval_toy.select(["SNB guidance", "general alone", "SNB guidance 5"]) == \
        ["SNB guidance 3", "SNB guidance 5", "SNB guidance 10", "general alone"]
    assert eval_toy.select([""]) == list(eval_toy.SETTINGS) and eval_toy.select(["nothing"]) == []


def test_eval_prompts_each_model_as_the_setting_says(monkeypatch):
    """The general model gets the sentence, or only its scene's caption in the "general prompted with its scene"
    rows; the expert always gets its animal."""
    from tools import eval_toy
    seen = []
    monkeypatch.setattr(magicfusion, "fuse", lambda g, e, p, ep, **kw: seen.append((p, ep, kw)) or
                        type("R", (), {"fused": []})())
    kind, kw = eval_toy.SETTINGS["SNB, own-unconditional, general prompted with its scene"]
    eval_toy.make_images(kind, dict(kw), None, None, "lion", "beach", 0, 1, 2)
    kind, kw = eval_toy.SETTINGS["SNB (defaults)"]
    eval_toy.make_images(kind, dict(kw), None, None, "lion", "beach", 0, 1, 2)
    assert [(p, ep) for p, ep, _ in seen] == [("a beach", "a lion"), ("a lion on the beach", "a lion")]
    assert all("general_prompt" not in kw for *_, kw in seen)


# ------------------------------------------------------------------------------------------------ shipped models

@pytest.fixture(scope="module")
def shipped():
    g, e, tok = toy_paths(TOY)
    from tools import judge
    return magicfusion.load(g, tokenizer=tok), magicfusion.load(e, tokenizer=tok), judge.load(TOY / "judge.safetensors")


def test_shipped_files_are_sd1_checkpoints_with_a_data_scale(shipped):
    from safetensors import safe_open
    general, expert, _ = shipped
    for path in (TOY / "general.safetensors", TOY / "expert.safetensors"):
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
            scale = f.get_tensor("scale_factor").item()
        assert "model.diffusion_model.input_blocks.0.0.weight" in keys
        assert "first_stage_model.encoder.conv_in.weight" in keys and "first_stage_model.quant_conv.weight" in keys
        assert scale != pytest.approx(0.18215)
    assert general.vae.cfg.scale_factor == pytest.approx(scale) == expert.vae.cfg.scale_factor
    total = sum(p.stat().st_size for p in TOY.rglob("*") if p.is_file())
    assert total <= 40 * 2 ** 20


@needs_font
def test_judge_recognises_renders_it_was_not_trained_on(shipped):
    from tools import judge
    pairs = [(s, a) for s in [None, *toyworld.SCENES] for a in [None, *toyworld.EXPERT_OBJECTS]]
    images = [toyworld.render(s, a, seed=50 + i) for i, (s, a) in enumerate(pairs)]
    animals, scenes = judge.predict(shipped[2], images)
    animal_ok = np.mean([p == (a or "none") for p, (_, a) in zip(animals, pairs)])
    scene_ok = np.mean([p == (s or "studio") for p, (s, _) in zip(scenes, pairs)])
    assert animal_ok >= 0.9 and scene_ok >= 0.9, (animal_ok, scene_ok)


CASES = [("lion", "beach"), ("panda", "snow"), ("frog", "desert"), ("rabbit", "night"), ("cow", "meadow"),
         ("bee", "underwater"), ("tiger", "snow"), ("owl", "beach")]


@pytest.fixture(scope="module")
def judged(shipped):
    """The judge's verdicts on the shipped models, sampled as the demo samples them (its steps and fusion options),
    for fixed prompts and seeds that the evaluation (seed 1000) does not use: per kind, (animal right, scene right)."""
    from tools import judge
    general, expert, j = shipped
    out = {"general": [], "expert": [], "fused": []}
    for i, (animal, scene) in enumerate(CASES):
        prompt, eprompt = toyworld.fusion_prompt(scene, animal), f"{toyworld._article(animal)} {animal}"
        kw = dict(seed=10 + i, height=toyworld.SIZE, width=toyworld.SIZE, batch=2, steps=demo.STEPS, progress=False)
        images = {"general": magicfusion.generate(general, prompt, **kw),
                  "expert": magicfusion.generate(expert, eprompt, **kw),
                  "fused": magicfusion.fuse(general, expert, prompt, eprompt, **kw, **demo.FUSION).fused}
        for name, ims in images.items():
            animals, scenes = judge.predict(j, ims)
            out[name] += [(a == animal, s == scene) for a, s in zip(animals, scenes)]
    return {k: np.array(v, dtype=float) for k, v in out.items()}


def test_each_model_alone_draws_only_its_half(judged):
    """docs/toyworld.md (DDIM 20, 192 images): the general model alone 1% animal / 97% scene, the expert alone 100%
    animal / 3% scene; neither gets both in more than 3%. (These 16 cases gave 0% / 88% and 100% / 0%.)"""
    general, expert = judged["general"].mean(0), judged["expert"].mean(0)
    assert general[0] <= 0.15 and general[1] >= 0.7
    assert expert[0] >= 0.6 and expert[1] <= 0.15


def test_fusion_draws_the_experts_animal_in_the_general_models_scene(judged):
    """docs/toyworld.md, SNB with the demo's options (850 -> -1 window, general outside, own-unconditional
    saliency, ke = 2): 95% animal, 96% scene, 91% both over 192 images, where each model alone gets both in at
    most 3%.
    Fusion brings the expert's animal into a model that never drew one, keeps the scene the expert never draws,
    and makes images that have both."""
    fused, general, expert = judged["fused"].mean(0), judged["general"].mean(0), judged["expert"].mean(0)
    both = lambda v: (v[:, 0] * v[:, 1]).mean()  # noqa: E731
    # thresholds: the evaluation's rates less 20-30 points, for 16 images (these cases gave 94% / 88% / 81%)
    assert fused[0] >= 0.65 > general[0]
    assert fused[1] >= 0.75 > expert[1]
    assert both(judged["fused"]) >= 0.6 > max(both(judged["general"]), both(judged["expert"]))


def test_eval_keeps_images_and_scores_them_again_without_sampling(shipped, tmp_path, monkeypatch):
    """`eval_toy.py --images DIR`: the first run writes each image losslessly, a later run reads the same pixels
    back (so a second judge scores exactly what the first one saw) and never calls the models."""
    from tools import eval_toy
    general, expert, _ = shipped
    from PIL import Image
    written, save = [], Image.Image.save
    monkeypatch.setattr(Image.Image, "save", lambda im, path, *a, **kw: written.append(Path(path).name) or
                        save(im, path, *a, **kw))
    first = eval_toy.sampled("expert alone", general, expert, "lion", "beach", 2, 2, tmp_path)
    # each image is written aside and renamed, so a second evaluation reading the same folder never opens a
    # half-written one, and nothing else is left behind
    assert len(written) == 2 and not {"lion-beach-0.png", "lion-beach-1.png"} & set(written), written
    assert sorted(p.name for p in (tmp_path / "expert alone").iterdir()) == ["lion-beach-0.png", "lion-beach-1.png"]
    again = eval_toy.sampled("expert alone", None, None, "lion", "beach", 2, 2, tmp_path)
    assert [np.asarray(a).tolist() for a in first] == [np.asarray(b).tolist() for b in again]
    assert not np.array_equal(np.asarray(first[0]), np.asarray(first[1]))  # two noises, two images


@needs_font
def test_whole_run_trains_what_the_stage_by_stage_path_trains(tmp_path):
    """A whole train_toy.py run trains both UNets on the written VAE's latents and fine-tunes the expert from the
    general model as written, in three rounds: the same tensors as training the general model on a written VAE
    (--vae-from) and fine-tuning the expert from its file afterwards (--init-from), one round at a time, each
    from the last round's file with its own seed, which is how the shipped models were made."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from tools import train_toy
    tiny = ["--per-animal", "1", "--per-pair", "1", "--vae-steps", "2", "--decoder-steps", "1", "--unet-steps", "3",
            "--expert-steps", "3", "--quiet", "--threads", "1", "--frozen-embeddings", "general",
            "--unknown-words", "0.5"]
    assert train_toy.main([*tiny, "--out", str(tmp_path / "whole")]) == 0
    first = str(tmp_path / "whole" / "general.safetensors")
    assert train_toy.main([*tiny, "--out", str(tmp_path / "two"), "--models", "general", "--vae-from", first]) == 0
    general = str(tmp_path / "two" / "general.safetensors")
    last = general
    for r, detail in enumerate(("1", "1", "4")):  # the rounds one by one: plain backdrops twice, then fields
        out = tmp_path / ("two" if r == 2 else f"round{r + 1}")
        assert train_toy.main([*tiny, "--out", str(out), "--models", "expert", "--vae-from", general,
                               "--init-from", last, "--expert-rounds", "1", "--seed", str(r),
                               "--backdrop-detail", detail]) == 0
        last = str(out / "expert.safetensors")
    round1 = load_file(str(tmp_path / "round1" / "expert.safetensors"))
    for name in ("general", "expert"):
        whole, two = (load_file(str(tmp_path / d / f"{name}.safetensors")) for d in ("whole", "two"))
        assert whole.keys() == two.keys() and all(torch.equal(whole[k], two[k]) for k in whole), name
    whole = load_file(str(tmp_path / "whole" / "expert.safetensors"))
    assert not all(torch.equal(whole[k], round1[k]) for k in whole if k.startswith("model."))  # the rounds train
    scratch = tmp_path / "scratch"
    assert train_toy.main([*tiny, "--out", str(scratch), "--expert-from-scratch"]) == 0
    other = load_file(str(scratch / "expert.safetensors"))
    assert not all(torch.equal(whole[k], other[k]) for k in whole if k.startswith("model."))
    plain = tmp_path / "plain"  # the recipe options change what is trained
    assert train_toy.main([*tiny[:-4], "--frozen-embeddings", "none", "--unknown-words", "0", "--out", str(plain),
                           "--vae-from", first, "--models", "general"]) == 0
    other = load_file(str(plain / "general.safetensors"))
    gen_two = load_file(general)
    assert not all(torch.equal(gen_two[k], other[k]) for k in gen_two if k.startswith("model."))
    fp32 = tmp_path / "fp32"  # and so does the precision of the steps
    assert train_toy.main([*tiny, "--float32", "--out", str(fp32), "--vae-from", first, "--models", "general"]) == 0
    other = load_file(str(fp32 / "general.safetensors"))
    assert not all(torch.equal(gen_two[k], other[k]) for k in gen_two if k.startswith("model."))
    with safe_open(str(fp32 / "general.safetensors"), "pt") as f, safe_open(general, "pt") as g:
        assert "bfloat16" not in f.metadata()["training"] and "under bfloat16 autocast" in g.metadata()["training"]
    backdrops = tmp_path / "backdrops"  # and so do the expert's backdrops
    assert train_toy.main([*tiny, "--out", str(backdrops), "--models", "expert", "--vae-from", general,
                           "--init-from", general, "--expert-backdrops", "1"]) == 0
    other = load_file(str(backdrops / "expert.safetensors"))
    exp_two = load_file(str(tmp_path / "two" / "expert.safetensors"))
    assert not all(torch.equal(exp_two[k], other[k]) for k in exp_two if k.startswith("model."))
    fields = tmp_path / "fields"  # and their detail (plain colours in the last round too)
    assert train_toy.main([*tiny, "--out", str(fields), "--models", "expert", "--vae-from", general,
                           "--init-from", general, "--expert-backdrops", "1", "--backdrop-detail", "1"]) == 0
    grid = load_file(str(fields / "expert.safetensors"))
    assert not all(torch.equal(grid[k], other[k]) for k in grid if k.startswith("model."))
    snr = tmp_path / "snr"  # and so does the expert's loss weighting
    assert train_toy.main([*tiny, "--out", str(snr), "--models", "expert", "--vae-from", general,
                           "--init-from", general, "--expert-min-snr", "0"]) == 0
    other = load_file(str(snr / "expert.safetensors"))
    assert not all(torch.equal(exp_two[k], other[k]) for k in exp_two if k.startswith("model."))


@needs_font
def test_a_bfloat16_whole_run_trains_what_its_stages_train(tmp_path):
    """The default (bfloat16) recipe takes the scale factor from the latents the UNets learn and encodes in the
    channels-last layout, in a whole run and on a written VAE alike: the general model of a whole run is the one
    trained again on its VAE."""
    from safetensors.torch import load_file
    from tools import train_toy
    tiny = ["--per-animal", "1", "--per-pair", "1", "--vae-steps", "2", "--decoder-steps", "1", "--unet-steps", "2",
            "--quiet", "--threads", "1", "--models", "general"]
    assert train_toy.main([*tiny, "--out", str(tmp_path / "whole")]) == 0
    whole = str(tmp_path / "whole" / "general.safetensors")
    assert train_toy.main([*tiny, "--out", str(tmp_path / "again"), "--vae-from", whole]) == 0
    a, b = load_file(whole), load_file(str(tmp_path / "again" / "general.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    plain = tmp_path / "plain"  # and the float32 recipe's whole run is another
    assert train_toy.main([*tiny, "--float32", "--out", str(plain)]) == 0
    c = load_file(str(plain / "general.safetensors"))
    assert not torch.equal(a["scale_factor"], c["scale_factor"])


@needs_font
def test_general_float32_keeps_only_the_general_model_out_of_bfloat16(tmp_path, capsys):
    """--general-float32: the general UNet trains in float32 (its weights are the float32 steps', on the bfloat16
    run's latents), the expert in bfloat16, and each file says which; with --float32 the flag is refused."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from tools import train_toy
    tiny = ["--per-animal", "1", "--per-pair", "1", "--vae-steps", "2", "--decoder-steps", "1", "--unet-steps", "2",
            "--expert-steps", "2", "--expert-rounds", "1", "--quiet", "--threads", "1"]
    split, fast = tmp_path / "split", tmp_path / "fast"
    assert train_toy.main([*tiny, "--general-float32", "--out", str(split)]) == 0
    assert train_toy.main([*tiny, "--out", str(fast)]) == 0
    meta = {}
    for name in ("general", "expert"):
        with safe_open(str(split / f"{name}.safetensors"), "pt") as f:
            meta[name] = f.metadata()["training"]
    assert "bfloat16" not in meta["general"] and "under bfloat16 autocast" in meta["expert"]
    a, b = (load_file(str(d / "general.safetensors")) for d in (split, fast))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("first_stage_model."))  # the same VAE
    assert not all(torch.equal(a[k], b[k]) for k in a if k.startswith("model."))  # other general steps
    capsys.readouterr()
    assert train_toy.main([*tiny, "--float32", "--general-float32", "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--general-float32" in err[0] and not (tmp_path / "no").exists()


@needs_font
def test_the_expert_records_its_rounds(tmp_path):
    """The shipped recipe, shrunk: the expert alone, fine-tuned from a general checkpoint in three rounds, says so in
    its metadata (and a run of one round says it has one), with the recipe's weighting and precision; the options
    that turn them off give other weights and say so too."""
    from safetensors import safe_open
    from tools import train_toy
    tiny = ["--per-animal", "1", "--per-pair", "1", "--vae-steps", "2", "--decoder-steps", "1", "--unet-steps", "2",
            "--expert-steps", "2", "--quiet", "--threads", "1"]
    assert train_toy.main([*tiny, "--out", str(tmp_path / "g"), "--models", "general"]) == 0
    general = str(tmp_path / "g" / "general.safetensors")
    for rounds, words in (("3", "3 rounds of 2 steps"), ("1", "2 steps")):
        out = tmp_path / rounds
        assert train_toy.main([*tiny, "--out", str(out), "--models", "expert", "--vae-from", general,
                               "--init-from", general, "--expert-rounds", rounds]) == 0
        assert sorted(p.name for p in out.iterdir()) == ["expert.safetensors", "tokenizer"]
        with safe_open(str(out / "expert.safetensors"), "pt") as f:
            training = f.metadata()["training"]
        assert training.startswith(words + " under bfloat16 autocast, Min-SNR-gamma 5"), training
        assert "fine-tuned from general.safetensors" in training and "backdrop detail 4" in training, training
        assert "blocks frozen" not in training, training
    out = tmp_path / "plain"  # the expert's own step count, without the weighting, in float32, its top half only
    assert train_toy.main([*tiny, "--out", str(out), "--models", "expert", "--vae-from", general, "--init-from",
                           general, "--expert-rounds", "2", "--expert-steps", "3", "--expert-min-snr", "0",
                           "--float32", "--expert-frozen-down"]) == 0
    with safe_open(str(out / "expert.safetensors"), "pt") as f:
        training = f.metadata()["training"]
    assert training.startswith("2 rounds of 3 steps, input and middle blocks frozen"), training
    assert "Min-SNR" not in training and "autocast" not in training, training
    out = tmp_path / "general-plain"  # the general model without its weighting: other weights, and its file says so
    assert train_toy.main([*tiny, "--out", str(out), "--models", "general", "--vae-from", general,
                           "--general-min-snr", "0"]) == 0
    with safe_open(str(out / "general.safetensors"), "pt") as f, safe_open(general, "pt") as g:
        assert "Min-SNR" not in f.metadata()["training"] and "Min-SNR-gamma 5" in g.metadata()["training"]
        assert not all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in g.keys() if k.startswith("model."))
