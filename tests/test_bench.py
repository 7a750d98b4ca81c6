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
           "--profile", "2", "--channels-last", "--nhwc-groupnorm", "--split-geglu", "--graph-text", "--graph-vae"]
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
    for key in ("text_ms", "vae_ms"):  # once per image, outside the step graph: (b) is their own capture (flags)
        row = res[key]
        assert all(row[k] > 0 for k in "abc") and row["d"] is None, (key, row)
        assert row["c/a"] == pytest.approx(row["c"] / row["a"])
    assert res["peak_gib"] is None and res["graph_capture_s"] == {"fused": None, "single": None}  # CUDA only
    assert res["compile_s"] is None and res["fused_step_ms"]["d"] is None  # (d) only with --compile-baseline
    env = res["env"]
    assert (env["device_type"], env["config"], env["dtype"], env["steps"], env["timed_steps"]) == \
        ("cpu", "tiny", "float32", 3, 2)
    assert env["channels_last"] and env["nhwc_groupnorm"] and env["split_geglu"]

    # the matrix work of a step: two same-shaped models do twice one model's; throughput is work over time
    tflop = res["work_tflop"]
    assert tflop["single"] > 0 and tflop["fused"] == pytest.approx(2 * tflop["single"])
    assert tflop["text"] > 0 and tflop["vae"] > 0
    for kind in ("fused", "single"):
        for k in "abc":
            assert res["achieved_tflop_per_s"][kind][k] == pytest.approx(tflop[kind] * 1e3 / res[f"{kind}_step_ms"][k])
    # the profile: every variant, its time split by kind, the parts summing to the total, the convolutions seen
    prof = res["profile_ms_per_step"]
    assert set(prof) == set(res["top_kernels"]) == {f"{kind}/{k}" for kind in ("fused", "single") for k in "abc"}
    for name, row in prof.items():
        assert row["convolution"] > 0 and row["matmul"] > 0 and row["elementwise"] > 0
        assert sum(v for k, v in row.items() if k != "total") == pytest.approx(row["total"])
        top = res["top_kernels"][name]  # (name, calls per step, ms per step, kind), the slowest first
        assert 0 < len(top) <= 15 and [r[2] for r in top] == sorted((r[2] for r in top), reverse=True)
        assert all(r[3] == bench.kernel_kind(r[0]) for r in top) and sum(r[2] for r in top) <= row["total"] + 1e-6
    # the NHWC GroupNorm lever is on: its statistics, not PyTorch's group_norm, show in the profile
    names = {r[0] for r in res["top_kernels"]["fused/a"]}
    assert "aten::var_mean" in names and "aten::native_group_norm" not in names

    # the printed markdown table carries the same numbers
    assert "| fused step, 2 models (ms) |" in proc.stdout and "no capture on CPU" in proc.stdout
    assert "Top operator (self time)s of fused/a" in proc.stdout
    assert "levers on: channels_last, nhwc_groupnorm, split_geglu" in proc.stdout
    assert f"{res['fused_step_ms']['c/a']:.2f}x" in proc.stdout


def load_bench():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench", ROOT / "tools" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_bench()


@pytest.mark.parametrize("name,kind", [
    # Hopper (H100) kernel names as torch.profiler reports them (levers.json of the 2026-11-27 run)
    ("nvjet_sm90_hsh_168x128_64x5_1x2_h_bz_TNN", "matmul"),
    ("nvjet_sm90_hsh_80x64_64x11_1x2_h_bz_bias_TNN", "matmul"),
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off", "matmul"),
    ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x192x64_warpgroup", "convolution"),
    ("void cudnn::cnn::conv2d_grouped_direct_kernel<false, true, false>", "convolution"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>", "attention"),
    ("fmha_cutlassF_f16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel)", "attention"),
    ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::Half>(long, c10::Hal", "normalization"),
    ("void at::native::(anonymous namespace)::ComputeFusedParamsCUDAKernel<c10::Half>(long, long", "normalization"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::Half, float, fal", "normalization"),
    ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native:", "elementwise"),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::Half>, ", "elementwise"),
    ("void cudnn::ops::nchwToNhwcKernel<__half, __half, float, false, true, (cudnnKernelDataType_t)0>", "elementwise"),
    ("void (anonymous namespace)::softmax_warp_forward<float, float, float, 10, false, false>", "other"),
    # CPU operators
    ("aten::mkldnn_convolution", "convolution"), ("aten::addmm", "matmul"), ("aten::bmm", "matmul"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"), ("aten::native_group_norm", "normalization"),
    ("aten::var_mean", "normalization"), ("aten::add_", "elementwise"), ("aten::copy_", "elementwise"),
    ("aten::view", "other")])
def test_kernel_names_are_classified(name, kind):
    assert bench.kernel_kind(name) == kind


def test_the_sanity_check_has_teeth(tmp_path):
    """The bench's plain restatement of a fused step equals ours, and a changed expert temperature is caught."""
    import torch

    import magicfusion
    from magicfusion.prompt import encode_prompt
    from oracle import ddim_scheduler
    from tools.random_weights import write_checkpoint, write_tiny_vocab

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
        run = bench.eager_run([g.unet, e.unet], ctx, x, bench.tables_for(5, x.shape, "cpu"), [1.0, 1.0])
        run.step()
        ours, index = run.x, run.masks[0]
        theirs, general_wins = bench.baseline_step(ref["unets"], rctx, x, sched.timesteps[0], sched, bench.SCALE)
        other, other_wins = bench.baseline_step(ref["unets"], rctx, x, sched.timesteps[0], sched, bench.SCALE,
                                                ks=(1.0, 3.0))
    assert ((index == 0) == general_wins).all() and general_wins.any() and not general_wins.all()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (other_wins != general_wins).any() and (other - ours).abs().max() > 1e-2
