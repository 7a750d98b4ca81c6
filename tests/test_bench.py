"""tools/bench.py runs end to end on the CPU (tiny config) and reports consistent numbers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_bench_runs_and_its_numbers_are_consistent(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "tools" / "bench.py"), "--device", "cpu", "--config", "tiny", "--height", "64",
           "--width", "64", "--steps", "3", "--timed-steps", "2", "--warmup", "1", "--quiet", "--json", str(out),
           "--profile", "2", "--channels-last"]
    # one intra-op thread: tiny convolutions gain nothing from more, and lose a lot when the machine is busy
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())

    # one step of ours and of the diffusers loop from the same latents agree (fp32 on CPU: to rounding)
    sanity = res["sanity"]
    assert sanity["threshold"] == 1e-3 and sanity["rel_diff"] < sanity["threshold"]
    assert sanity["mask_agreement"] >= 0.99 and sanity["ok"]

    for key in ("fused_step_ms", "single_step_ms", "e2e_s"):
        row = res[key]
        assert all(row[k] > 0 for k in "abc"), (key, row)
        assert row["c/a"] == pytest.approx(row["c"] / row["a"])
        assert row["c/b"] == pytest.approx(row["c"] / row["b"])
    for key in ("text_ms", "vae_ms"):  # once per image, outside the step graph: (b) has no column of its own
        row = res[key]
        assert row["a"] > 0 and row["c"] > 0 and row["b"] is None and row["c/b"] is None, (key, row)
        assert row["c/a"] == pytest.approx(row["c"] / row["a"])
    assert res["peak_gib"] is None and res["graph_capture_s"] == {"fused": None, "single": None}  # CUDA only
    env = res["env"]
    assert (env["device_type"], env["config"], env["dtype"], env["steps"], env["timed_steps"]) == \
        ("cpu", "tiny", "float32", 3, 2)

    # the matrix work of a step: two same-shaped models do twice one model's; throughput is work over time
    tflop = res["work_tflop"]
    assert tflop["single"] > 0 and tflop["fused"] == pytest.approx(2 * tflop["single"])
    assert tflop["text"] > 0 and tflop["vae"] > 0
    for kind in ("fused", "single"):
        for k in "abc":
            assert res["achieved_tflop_per_s"][kind][k] == pytest.approx(tflop[kind] * 1e3 / res[f"{kind}_step_ms"][k])
    # the profile: every variant, its time split by kind, the parts summing to the total, the convolutions seen
    prof = res["profile_ms_per_step"]
    assert set(prof) == {f"{kind}/{k}" for kind in ("fused", "single") for k in "abc"}
    for row in prof.values():
        assert row["convolution"] > 0 and row["matmul"] > 0
        assert sum(v for k, v in row.items() if k != "total") == pytest.approx(row["total"])
    assert env["channels_last"] is True

    # the printed markdown table carries the same numbers
    assert "| fused step, 2 models (ms) |" in proc.stdout and "no capture on CPU" in proc.stdout
    assert f"{res['fused_step_ms']['c/a']:.2f}x" in proc.stdout


def test_the_sanity_check_has_teeth(tmp_path):
    """The bench's plain restatement of a fused step equals ours, and a changed expert temperature is caught."""
    import importlib.util

    import torch

    import magicfusion
    from tools.random_weights import write_checkpoint
    from magicfusion.pipeline import fused_step, make_tables
    from magicfusion.prompt import encode_prompt
    from tools.random_weights import write_tiny_vocab
    from oracle import ddim_scheduler

    spec = importlib.util.spec_from_file_location("bench", ROOT / "tools" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    write_tiny_vocab(tmp_path)
    g, e = (magicfusion.load(write_checkpoint(tmp_path / f"m{s}.safetensors", "tiny", s), tokenizer=tmp_path)
            for s in (1, 2))
    ref = bench.build_baseline(g, e, torch.device("cpu"), torch.float32)
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    sched = ddim_scheduler()
    sched.set_timesteps(5)
    with torch.no_grad():
        ctx = [encode_prompt(m, bench.PROMPT, "", 1) for m in (g, e)]
        rctx = [clip(input_ids=g.tokenizer(["", bench.PROMPT])).last_hidden_state for clip in ref["clips"]]
        ours, index = fused_step([g.unet, e.unet], ctx, x, 0, make_tables(5, 0.0, 1000, -1, None, x.shape, "cpu"),
                                 bench.SCALE, bench.FUSE_OPTS)
        theirs, general_wins = bench.baseline_step(ref["unets"], rctx, x, sched.timesteps[0], sched, bench.SCALE)
        other, other_wins = bench.baseline_step(ref["unets"], rctx, x, sched.timesteps[0], sched, bench.SCALE,
                                                ks=(1.0, 3.0))
    assert ((index == 0) == general_wins).all() and general_wins.any() and not general_wins.all()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (other_wins != general_wins).any() and (other - ours).abs().max() > 1e-2
