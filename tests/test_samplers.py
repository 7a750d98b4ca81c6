"""The samplers (samplers.py, schedule.py) step by step against diffusers' schedulers, float32 CPU.

Each reference scheduler is built as a user swaps schedulers, `from_config(<SD 1.x's scheduler config>)`
(tests/oracle.py). Per sampler and step count: the timesteps, the initial noise scale, the UNet input scaling and
every update, fed the same noise predictions and (ancestral) the same generator's draws. The end-to-end images
against StableDiffusionPipeline are in test_parity.py; self-fusion in test_fusion.py; the graph in test_graph.py.
"""
import pytest
import torch
from oracle import reference_scheduler

import magicfusion
from magicfusion import schedule
from magicfusion.samplers import SAMPLERS

CASES = [("ddim", False), ("dpmpp-2m", False), ("dpmpp-2m", True), ("euler", False), ("euler", True),
         ("euler-a", False)]


@pytest.mark.parametrize("name, karras", CASES, ids=[f"{n}{'-karras' if k else ''}" for n, k in CASES])
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 20])
def test_every_step_matches_the_diffusers_scheduler(name, karras, steps):
    sampler = SAMPLERS[name]
    sched = reference_scheduler(name, karras)
    sched.set_timesteps(steps)
    plan = sampler.plan(steps, 0.0, karras)
    torch.testing.assert_close(plan.t, sched.timesteps.float(), rtol=1e-6, atol=1e-4)
    if name == "dpmpp-2m" or not karras:  # whole timesteps, as the UNet sees them
        assert torch.equal(plan.t, sched.timesteps.float())
    g = torch.Generator().manual_seed(steps)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    ours, ref = noise * plan.init, noise * sched.init_noise_sigma
    prev = torch.zeros_like(ours)
    draws, ref_draws = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for i, t in enumerate(sched.timesteps):
        torch.testing.assert_close(ours / plan.c_in[i], sched.scale_model_input(ref, t), rtol=1e-6, atol=1e-6)
        eps = torch.randn(ours.shape, generator=g)
        z = torch.randn(ours.shape, generator=draws) if plan.noisy else None
        ours, prev = sampler.update(ours, eps, plan.c[i], z, prev)
        ref = sched.step(eps, t, ref, generator=ref_draws).prev_sample
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        ours = ref.clone()  # the next step starts from the reference's latents: no drift, each update on its own


def test_dpmpp_2m_second_order_term_is_used():
    """With three or more steps the middle steps carry the previous prediction (weight 1 / 2r), the ends do not."""
    w = SAMPLERS["dpmpp-2m"].plan(5, 0.0, False).c[:, 4]
    assert w[0] == 0 and w[-1] == 0 and (w[1:-1] > 0).all()


@pytest.mark.parametrize("steps", [1, 7, 50, 333, 500, 999])
def test_karras_sigmas_follow_eq5(steps):
    """rho-7 spacing: sigma^(1/7) is linear in the step index, from the largest training sigma to the smallest."""
    table = schedule.sigmas()
    _, sigma = schedule.noise_levels(steps, True, skip=1)
    assert sigma[-1] == 0 and len(sigma) == steps + 1
    torch.testing.assert_close(sigma[0], table[-1])
    if steps > 1:
        torch.testing.assert_close(sigma[-2], table[0])
        root = sigma[:-1].double() ** (1 / 7)
        torch.testing.assert_close(root.diff(), root.diff()[:1].expand(steps - 1), rtol=1e-4, atol=1e-7)


def test_sampler_options_are_checked(tmp_path):
    from tools.random_weights import write_checkpoint, write_tiny_vocab
    write_tiny_vocab(tmp_path)
    model = magicfusion.load(write_checkpoint(tmp_path / "m.safetensors", "tiny", seed=1), tokenizer=tmp_path)
    for kw, words in [(dict(sampler="plms"), "unknown sampler"), (dict(karras=True), "no Karras"),
                      (dict(sampler="euler-a", karras=True), "no Karras"), (dict(sampler="euler", eta=0.5), "eta"),
                      (dict(sampler="dpmpp-2m", steps=1000), "1..999")]:
        with pytest.raises(magicfusion.InputError, match=words):
            magicfusion.generate(model, "a lion", **{"steps": 2, "height": 64, "width": 64, "progress": False, **kw})


def test_cli_sampler_flags_and_infotext(tmp_path):
    """`--sampler dpmpp-2m --karras` gives the API's image, named as AUTOMATIC1111 names it in the PNG."""
    import numpy as np
    from PIL import Image

    from magicfusion.cli import main
    from tools.random_weights import write_checkpoint, write_tiny_vocab
    write_tiny_vocab(tmp_path)
    path = write_checkpoint(tmp_path / "m.safetensors", "tiny", seed=1)
    common = ["generate", "--model", str(path), "--tokenizer", str(tmp_path), "--prompt", "a lion", "--steps", "3",
              "--height", "64", "--width", "64", "--device", "cpu", "--quiet"]
    cases = ((["--sampler", "dpmpp-2m", "--karras"], "DPM++ 2M Karras"), (["--sampler", "euler-a"], "Euler a"),
             ([], "DDIM"))
    for flags, name in cases:
        out = tmp_path / f"{name}.png"
        assert main(common + flags + ["--out", str(out)]) == 0
        with Image.open(out) as im:
            assert f"Steps: 3, Sampler: {name}, " in im.text["parameters"]
            got = np.asarray(im.convert("RGB"))
        model = magicfusion.load(path, tokenizer=tmp_path)
        kw = dict(sampler=flags[1] if flags else "ddim", karras="--karras" in flags)
        want = magicfusion.generate(model, "a lion", steps=3, height=64, width=64, progress=False, **kw)[0]
        assert np.array_equal(got, np.asarray(want))
    assert main(common + ["--karras", "--out", str(tmp_path / "x.png")]) == 2  # DDIM has no Karras schedule
