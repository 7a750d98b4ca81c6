"""The speed levers (layout.py, layers.py, the UNet's and VAE's layers): each gives the same numbers (bit for bit, or
within float32 rounding where it is a switch), and each switch really changes what it claims to (memory format,
the operators that run). CPU, float32, tiny configs; what a lever is worth on a GPU is measured by tools/bench.py.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import magicfusion
from magicfusion.layers import GroupNorm, group_norm_nhwc, is_channels_last
from magicfusion.layout import configure, default_channels_last, set_channels_last
from magicfusion.denoiser import predict
from magicfusion.unet import UNetModel
from magicfusion.vae import VAEDecoder
from tools.random_weights import CONFIGS, perturb_, write_checkpoint, write_tiny_vocab

CL = torch.channels_last
UNET_CFG, _, VAE_CFG = CONFIGS["tiny"]


def close(ours, ref, tol=1e-5):
    """Agreement relative to the output's magnitude, as in test_parity."""
    err = (ours - ref).abs().max().item()
    assert err <= tol * max(1.0, ref.abs().max().item()), f"max abs err {err}"


def ops(fn) -> dict:
    """Operator name -> calls, for one call of fn (CPU profiler)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages()}


@pytest.fixture(scope="module")
def unet():
    return perturb_(UNetModel(UNET_CFG), torch.Generator().manual_seed(1)).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def unet_inputs():
    g = torch.Generator().manual_seed(2)
    return (torch.randn(2, 4, 16, 24, generator=g), torch.tensor([981, 1]),
            torch.randn(2, 77, UNET_CFG.context_dim, generator=g))


def levers(module, on: bool):
    set_channels_last([module], on)
    return configure(module, nhwc_groupnorm=on, split_geglu=on)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,groups", [((2, 64, 9, 7), 32), ((1, 96, 5, 4), 8), ((3, 32, 1, 6), 32)])
def test_group_norm_nhwc_matches_group_norm(shape, groups, affine):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3 + 2
    w, b = (torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)) if affine else (None, None)
    ref = F.group_norm(x, groups, w, b, 1e-6)
    out = group_norm_nhwc(x.contiguous(memory_format=CL), groups, w, b, 1e-6)
    assert is_channels_last(out) and out.shape == ref.shape
    close(out, ref, 2e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_group_norm_nhwc_in_low_precision_has_float32_statistics(dtype):
    """Input far from zero mean: statistics in the low-precision type would be off by whole units; ours are float32
    and the result is within the output type's own rounding of the float32 reference."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 64, 6, 5, generator=g) + 40).to(dtype)
    w, b = torch.randn(64, generator=g).to(dtype), torch.randn(64, generator=g).to(dtype)
    ref = F.group_norm(x.float(), 32, w.float(), b.float(), 1e-5)
    out = group_norm_nhwc(x.contiguous(memory_format=CL), 32, w, b, 1e-5)
    assert out.dtype == dtype and is_channels_last(out)
    eps = torch.finfo(dtype).eps
    assert (out.float() - ref).abs().max() <= 2 * eps * ref.abs().max()


def test_group_norm_switch_changes_the_operator_path():
    m = GroupNorm(32, 64, eps=1e-6)
    perturb_(m, torch.Generator().manual_seed(0))
    x = torch.randn(2, 64, 8, 8)
    xcl = x.contiguous(memory_format=CL)
    native = ops(lambda: m(xcl))
    assert "aten::native_group_norm" in native
    m.nhwc = True
    nhwc = ops(lambda: m(xcl))
    assert "aten::native_group_norm" not in nhwc and "aten::var_mean" in nhwc
    assert "aten::native_group_norm" in ops(lambda: m(x)), "NCHW input keeps PyTorch's kernel"
    close(m(xcl), m(x), 2e-6)
    # gradients flow through the NHWC path too, and agree with PyTorch's kernel's
    xg = xcl.clone().requires_grad_(True)
    m(xg).square().sum().backward()
    grads = xg.grad, m.weight.grad.clone()
    m.nhwc, m.weight.grad = False, None
    xg.grad = None
    m(xg).square().sum().backward()
    close(grads[0], xg.grad, 1e-5)
    close(grads[1], m.weight.grad, 1e-5)


def test_unet_channels_last_and_levers_match_diffusers(unet, unet_inputs):
    """float32 parity with diffusers holds with every lever on, as it does with none."""
    from oracle import diffusers_unet
    ref = diffusers_unet(UNET_CFG, unet.state_dict())
    x, t, ctx = unet_inputs
    with torch.no_grad():
        expected = ref(x, t, ctx).sample
        plain = unet(x, t, ctx)
        levers(unet, True)
        try:
            fast = unet(x, t, ctx)
        finally:
            levers(unet, False)
    close(plain, expected)
    close(fast, expected)
    close(fast, plain)


def test_unet_switches_change_the_layout_and_the_operators(unet, unet_inputs):
    x, t, ctx = unet_inputs
    formats = []
    hooks = [m.register_forward_hook(lambda m, i, o: formats.append(is_channels_last(o)))
             for m in unet.modules() if isinstance(m, (torch.nn.Conv2d, GroupNorm))]
    try:
        with torch.no_grad():
            plain = ops(lambda: unet(x, t, ctx))
            assert formats and not any(formats)
            formats.clear()
            set_channels_last([unet], True)
            assert unet.channels_last and is_channels_last(unet.input_blocks[0][0].weight)
            cl = ops(lambda: unet(x, t, ctx))
            assert formats and all(formats), "every convolution and GroupNorm output is channels_last"
            configure(unet, nhwc_groupnorm=True)
            nhwc = ops(lambda: unet(x, t, ctx))
    finally:
        for h in hooks:
            h.remove()
        levers(unet, False)
    n_norms = sum(isinstance(m, GroupNorm) for m in unet.modules())
    assert plain["aten::native_group_norm"] == cl["aten::native_group_norm"] == n_norms
    assert "aten::native_group_norm" not in nhwc and nhwc["aten::var_mean"] == n_norms
    assert not unet.channels_last and unet.input_blocks[0][0].weight.is_contiguous()


def test_split_geglu_computes_without_the_joint_projection(unet, unet_inputs):
    x, t, ctx = unet_inputs
    calls = []
    projs = [m.ff.net[0].proj for m in unet.modules() if hasattr(m, "ff")]
    hooks = [p.register_forward_hook(lambda *a: calls.append(1)) for p in projs]
    try:
        with torch.no_grad():
            joint = unet(x, t, ctx)
            assert len(calls) == len(projs) > 0
            calls.clear()
            configure(unet, split_geglu=True)
            split = unet(x, t, ctx)
            assert not calls
    finally:
        for h in hooks:
            h.remove()
        configure(unet, split_geglu=False)
    close(split, joint)


def test_spatial_transformer_reshapes_are_views_in_channels_last(unet, unet_inputs):
    x, t, ctx = unet_inputs
    st = unet.input_blocks[1][1]
    seen = {}
    hooks = [st.proj_in.register_forward_hook(lambda m, i, o: seen.__setitem__("proj_in_out", o)),
             st.transformer_blocks[0].register_forward_pre_hook(lambda m, i: seen.__setitem__("tokens", i[0])),
             st.transformer_blocks[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("tokens_out", o)),
             st.proj_out.register_forward_pre_hook(lambda m, i: seen.__setitem__("proj_out_in", i[0]))]
    set_channels_last([unet], True)
    try:
        with torch.no_grad():
            unet(x, t, ctx)
    finally:
        for h in hooks:
            h.remove()
        set_channels_last([unet], False)
    assert seen["tokens"].data_ptr() == seen["proj_in_out"].data_ptr() and seen["tokens"].is_contiguous()
    assert seen["proj_out_in"].data_ptr() == seen["tokens_out"].data_ptr() and is_channels_last(seen["proj_out_in"])


def test_in_place_residuals_are_exact_and_only_without_gradients(unet, unet_inputs):
    x, t, ctx = unet_inputs
    with torch.no_grad():
        no_grad = ops(lambda: unet(x, t, ctx))
        out = unet(x, t, ctx)
    with torch.enable_grad():
        with_grad = ops(lambda: unet(x, t, ctx))
        ref = unet(x, t, ctx)
    assert torch.equal(out, ref)  # bit for bit: the same sums, in place or not
    assert no_grad.get("aten::add_", 0) > 0 and no_grad.get("aten::mul_", 0) > 0
    assert with_grad.get("aten::add_", 0) == 0 and with_grad.get("aten::mul_", 0) == 0
    # training still works: gradients flow through the out-of-place path
    trainable = perturb_(UNetModel(UNET_CFG), torch.Generator().manual_seed(1))
    trainable(x, t, ctx).square().mean().backward()
    assert all(p.grad is not None for p in trainable.parameters())


def test_vae_decoder_channels_last_and_levers_match_diffusers():
    from oracle import diffusers_vae
    vae = perturb_(VAEDecoder(VAE_CFG), torch.Generator().manual_seed(3)).eval().requires_grad_(False)
    ref = diffusers_vae(VAE_CFG, vae.state_dict())
    z = torch.randn(1, 4, 8, 6, generator=torch.Generator().manual_seed(4))
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(is_channels_last(o)))
             for m in vae.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        expected = ref.decode(z / VAE_CFG.scale_factor).sample
        plain = vae(z)
        assert not any(outputs)
        outputs.clear()
        levers(vae, True)
        nhwc = ops(lambda: vae(z))
        fast = vae(z)
    for h in hooks:
        h.remove()
    assert all(outputs) and "aten::native_group_norm" not in nhwc
    close(plain, expected)
    close(fast, expected)
    close(fast, plain)


def test_twice_is_cat_in_the_models_layout_and_predict_returns_contiguous_float32(unet, unet_inputs):
    x, t, ctx = unet_inputs
    x1 = x[:1]
    for on in (False, True):
        set_channels_last([unet], on)
        two = unet.twice(x1, torch.bfloat16)
        assert torch.equal(two, torch.cat([x1, x1]).to(torch.bfloat16)) and two.dtype == torch.bfloat16
        assert is_channels_last(two) == on
        with torch.no_grad():
            u, c = predict(unet, x1, t[:1], ctx)
        assert u.dtype == torch.float32 and u.is_contiguous() and c.is_contiguous()
    set_channels_last([unet], False)
    with torch.no_grad():
        u, c = predict(unet, x1, t[:1], ctx)
        eps = unet(torch.cat([x1, x1]), t[:1], ctx).float()  # what predict computed before
    assert torch.equal(torch.cat([u, c]), eps)


def test_load_default_and_switch(tmp_path):
    assert default_channels_last("cuda") and default_channels_last(torch.device("cuda", 0))
    assert not default_channels_last("cpu")
    write_tiny_vocab(tmp_path)
    path = write_checkpoint(tmp_path / "m.safetensors", "tiny", seed=1)
    plain = magicfusion.load(path, tokenizer=tmp_path)  # CPU: as before, contiguous
    cl = magicfusion.load(path, tokenizer=tmp_path, channels_last=True)

    def four_d(model):
        # 3x3 kernels: a 1x1 kernel is both NCHW- and NHWC-contiguous
        return [p for m in (model.unet, model.vae) for p in m.parameters() if p.dim() == 4 and p.shape[2:] != (1, 1)]
    assert all(p.is_contiguous() for p in four_d(plain))
    assert all(is_channels_last(p) for p in four_d(cl))
    assert all(p.is_contiguous() for p in cl.text_encoder.parameters())
    assert list(cl.unet.state_dict()) == list(plain.unet.state_dict())  # the names (LDM keys) are unchanged
    kw = dict(steps=3, height=64, width=48, seed=5, progress=False)
    a = np.asarray(magicfusion.generate(plain, "a lion", **kw)[0], dtype=np.int16)
    for graph in (False, True):  # the graph runner (on CPU: stepping without capture) too
        configure(cl.unet, nhwc_groupnorm=graph, split_geglu=graph)
        b = np.asarray(magicfusion.generate(cl, "a lion", graph=graph, **kw)[0], dtype=np.int16)
        assert np.abs(a - b).max() <= 1


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_group_norm_nhwc_within_rounding(dtype):
    """SD 1.5's largest GroupNorm shape, half precision on the GPU: within the output type's rounding of float32."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 320, 64, 64, generator=g) * 2 + 3).to("cuda", dtype)
    w, b = torch.randn(320, generator=g).to("cuda", dtype), torch.randn(320, generator=g).to("cuda", dtype)
    ref = F.group_norm(x.float(), 32, w.float(), b.float(), 1e-5)
    out = group_norm_nhwc(x.contiguous(memory_format=CL), 32, w, b, 1e-5)
    assert is_channels_last(out)
    assert (out.float() - ref).abs().max() <= 2 * torch.finfo(dtype).eps * ref.abs().max()


@cuda
@pytest.mark.parametrize("levers_on", [False, True])
def test_cuda_default_is_channels_last_and_replay_equals_eager(tmp_path, levers_on):
    """On CUDA `load` makes the UNet and VAE channels_last; with the levers off or on, the captured step's images
    equal the eager loop's (the same kernels in the same order)."""
    write_tiny_vocab(tmp_path)
    ms = [magicfusion.load(write_checkpoint(tmp_path / f"m{s}.safetensors", "tiny", seed=s), tokenizer=tmp_path,
                           device="cuda", dtype=torch.float16) for s in (1, 2)]
    for m in ms:
        assert m.unet.channels_last and is_channels_last(m.vae.decoder.conv_in.weight)
        for module in (m.unet, m.vae):
            configure(module, nhwc_groupnorm=levers_on, split_geglu=levers_on)
    kw = dict(steps=6, height=64, width=64, seed=1, progress=False)
    g = magicfusion.fuse(ms[0], ms[1], "a lion", graph=True, **kw)
    e = magicfusion.fuse(ms[0], ms[1], "a lion", graph=False, **kw)
    diff = np.abs(np.asarray(g.fused[0], dtype=np.int16) - np.asarray(e.fused[0], dtype=np.int16))
    assert diff.max() == 0, diff.max()
    assert all(torch.equal(a, b) for a, b in zip(g.masks, e.masks))
    magicfusion.release_graphs(*ms)
