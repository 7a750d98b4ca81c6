"""Saliency-aware Noise Blending on tiny tensors whose answers are known by construction.

Each case is built so the expected mask/noise follows from the MagicFusion equations by hand (see snb.py's
docstring); where a map is too fiddly to write out (the blur), it is checked against a plain-Python restatement of
the box filter and the bilinear resize (`reference_saliency`), written here without torch's pooling/interpolation.
The window and the outside-model rule are checked through one step of `sampling.Run` (the denoiser and the DDIM
update) with stub "UNets" that return known predictions, against a DDIM update written out here (eq. 12).
"""
import math

import numpy as np
import pytest
import torch

from magicfusion.denoiser import FuseOptions
from magicfusion.samplers import DDIM, ddim_plan
from magicfusion.sampling import Run, make_tables as tables_of
from magicfusion.snb import blend, guidance, saliency, snb, winner


def maps(*rows_per_channel, channels=4):
    """A (1, C, h, w) response with the same (h, w) map in every channel."""
    m = torch.tensor(rows_per_channel, dtype=torch.float32)
    return m.expand(1, channels, *m.shape).clone()


# --- plain-Python reference of saliency (no torch pooling / interpolation) -------------------------------------

def box4(a: np.ndarray) -> np.ndarray:
    """avg_pool2d(kernel 4, stride 1, padding 1, count_include_pad=True) of one (h, w) map: (h-1, w-1)."""
    h, w = a.shape
    p = np.zeros((h + 2, w + 2))
    p[1:-1, 1:-1] = a
    return np.array([[p[i:i + 4, j:j + 4].sum() / 16 for j in range(w - 1)] for i in range(h - 1)])


def resize_bilinear(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize with align_corners=False (half-pixel centres, sources below 0 clamped to 0)."""
    def taps(n_out, n_in):
        out = []
        for d in range(n_out):
            s = max((d + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = int(math.floor(s))
            i1 = min(i0 + 1, n_in - 1)
            out.append((i0, i1, s - i0))
        return out
    res = np.zeros((h, w))
    for i, (a0, a1, la) in enumerate(taps(h, a.shape[0])):
        for j, (b0, b1, lb) in enumerate(taps(w, a.shape[1])):
            res[i, j] = ((1 - la) * ((1 - lb) * a[a0, b0] + lb * a[a0, b1])
                         + la * ((1 - lb) * a[a1, b0] + lb * a[a1, b1]))
    return res


def reference_saliency(response: torch.Tensor, k: float, blur: bool) -> np.ndarray:
    r = np.abs(response.double().numpy())
    out = []
    for b in range(r.shape[0]):
        chans = [resize_bilinear(box4(c), *c.shape) if blur else c for c in r[b]]
        m = k * np.mean(chans, axis=0)
        e = np.exp(m - m.max())
        out.append(e / e.sum())
    return np.stack(out)


# --- guidance, saliency -----------------------------------------------------------------------------------------

def test_guidance_is_u_plus_s_times_c_minus_u():
    u, c = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])
    torch.testing.assert_close(guidance(u, c, 2.5), torch.tensor([1 + 2.5 * 2, -2 + 2.5 * 2]))
    torch.testing.assert_close(guidance(u, c, 1.0), c)


@pytest.mark.parametrize("k, hot", [(1.0, 0.5), (2.0, 0.75)])
def test_saliency_softmax_of_channel_mean_of_abs(k, hot):
    # position (0, 0): channels (0, 0, -2 ln3, 2 ln3) -> mean |r| = ln 3; elsewhere 0.
    # softmax(k * s): e^{k ln3} / (e^{k ln3} + 3) = 3/6 for k=1, 9/12 for k=2; the others share the rest.
    r = torch.zeros(1, 4, 2, 2)
    r[0, 2, 0, 0], r[0, 3, 0, 0] = -2 * math.log(3), 2 * math.log(3)
    s = saliency(r, k, blur=False)
    cold = (1 - hot) / 3
    torch.testing.assert_close(s, torch.tensor([[[hot, cold], [cold, cold]]]))


def test_saliency_is_a_distribution_per_batch_item():
    r = torch.randn(3, 4, 6, 5, generator=torch.Generator().manual_seed(0))
    for blur in (False, True):
        s = saliency(r, 1.7, blur)
        assert s.shape == (3, 6, 5)
        torch.testing.assert_close(s.sum(dim=(1, 2)), torch.ones(3))


@pytest.mark.parametrize("h, w", [(8, 8), (5, 7), (7, 5), (2, 3)])
@pytest.mark.parametrize("blur", [True, False])
def test_saliency_matches_plain_restatement(h, w, blur):
    r = 3 * torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(h * 10 + w))
    got = saliency(r, 1.3, blur)
    np.testing.assert_allclose(got.double().numpy(), reference_saliency(r, 1.3, blur), rtol=1e-5, atol=1e-7)


def test_blur_of_one_hot_pixel_by_hand():
    # 4x4 map, one pixel (1, 1) of value 16: the box filter gives 1 on the 3x3 output cells whose 4x4 window
    # (shifted by the padding of 1) covers it, i.e. all nine; resizing a constant 3x3 map gives a constant 4x4.
    r = torch.zeros(1, 4, 4, 4)
    r[0, :, 1, 1] = 16.0
    s = saliency(r, 1.0, blur=True)
    torch.testing.assert_close(s, torch.full((1, 4, 4), 1 / 16))  # softmax of a constant is uniform
    # without the blur the single pixel dominates: e^16 / (e^16 + 15)
    assert saliency(r, 1.0, blur=False)[0, 1, 1] == pytest.approx(math.exp(16) / (math.exp(16) + 15), rel=1e-6)


# --- winner, blend ----------------------------------------------------------------------------------------------

def test_winner_ties_go_to_the_earliest():
    a = torch.tensor([[[0.2, 0.5, 0.3]]])
    b = torch.tensor([[[0.2, 0.6, 0.1]]])
    c = torch.tensor([[[0.2, 0.6, 0.3]]])
    assert winner([a, a]).tolist() == [[[0, 0, 0]]]
    assert winner([a, b]).tolist() == [[[0, 1, 0]]]
    assert winner([a, b, c]).tolist() == [[[0, 1, 0]]]  # (0,2) ties a/c -> 0; (0,1) ties b/c -> 1
    assert winner([b, a, c]).tolist() == [[[0, 0, 1]]]
    assert winner([a, b]).dtype == torch.int64


def test_blend_takes_every_channel_from_the_indexed_model():
    noises = [torch.full((2, 4, 2, 3), float(v)) + torch.arange(4.0)[None, :, None, None] * 10 for v in (1, 2, 3)]
    index = torch.tensor([[[0, 1, 2], [2, 1, 0]], [[1, 1, 1], [0, 2, 0]]])
    out = blend(noises, index)
    expected = torch.empty(2, 4, 2, 3)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                expected[b, :, i, j] = noises[index[b, i, j]][b, :, i, j]
    assert torch.equal(out, expected)


# --- snb ------------------------------------------------------------------------------------------------------

def test_identical_models_all_general_and_eps_is_generals():
    g = torch.Generator().manual_seed(1)
    u, c = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    for reference in ("general", "own"):
        for blur in (True, False):
            eps, index = snb([u, u.clone()], [c, c.clone()], 7.5, [1.0, 1.0], blur, reference)
            assert not index.any()
            assert torch.equal(eps, guidance(u, c, 7.5))


def test_mask_picks_the_model_with_the_larger_response():
    # G responds on the left half, E on the right (u = 0 for both, so both references agree); no blur.
    z = torch.zeros(1, 4, 2, 4)
    cg = maps([2.0, 2.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0])
    ce = maps([0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0]) + torch.arange(4.0)[None, :, None, None] * 1e-3
    eps, index = snb([z, z], [cg, ce], 3.0, [1.0, 1.0], blur=False)
    assert index.tolist() == [[[0, 0, 1, 1], [0, 0, 1, 1]]]
    expected = torch.cat([3.0 * cg[..., :2], 3.0 * ce[..., 2:]], dim=-1)  # eps_X = s c_X, all channels
    torch.testing.assert_close(eps, expected, rtol=0, atol=0)


def test_blur_changes_the_mask_at_a_hot_pixel():
    # G: one hot pixel (3, 3) of 8 in an 8x8 map. E: a 4x4 block of 3 over rows/cols 2..5 (covering (3, 3)).
    # No blur: S_G(3,3) = e^8 / (e^8 + 63) ~ 0.98 beats S_E(3,3) = e^3 / (16 e^3 + 48) ~ 0.054, so G wins there;
    # everywhere else S_G = 1 / (e^8 + 63) ~ 3e-4 loses to S_E >= 1 / (16 e^3 + 48) ~ 2.7e-3.
    # Blur: the box filter spreads the hot pixel over 16 cells (<= 8/16 = 0.5 everywhere), so G's map is nearly
    # flat, S_G(3,3) ~ e^0.5 / 68 ~ 0.022; the block's interior stays ~3, S_E(3,3) ~ 0.052 -> E wins at (3, 3).
    z = torch.zeros(1, 4, 8, 8)
    cg = z.clone()
    cg[..., 3, 3] = 8.0
    ce = z.clone()
    ce[..., 2:6, 2:6] = 3.0
    _, sharp = snb([z, z], [cg, ce], 1.0, [1.0, 1.0], blur=False)
    _, blurred = snb([z, z], [cg, ce], 1.0, [1.0, 1.0], blur=True)
    expected_sharp = torch.ones(1, 8, 8, dtype=torch.int64)
    expected_sharp[0, 3, 3] = 0
    assert torch.equal(sharp, expected_sharp)
    assert blurred[0, 3, 3] == 1
    assert not blurred[0, 0].any()  # far from both, G's flatter softmax (smaller partition sum) wins
    # and the blurred decision is the one the plain restatement gives everywhere
    sg, se = reference_saliency(cg, 1.0, True), reference_saliency(ce, 1.0, True)
    assert np.array_equal(blurred.numpy(), (se > sg).astype(np.int64))


def test_temperature_flips_the_decision():
    # Identical responses [1, 0] (no blur): equal k ties everywhere -> G. A sharper expert softmax (ke = 3) gives
    # e^3/(e^3+1) = 0.95 > e/(e+1) = 0.73 at the responsive pixel (E wins) and 0.05 < 0.27 at the other (G wins);
    # swapping the temperatures swaps the mask.
    z = torch.zeros(1, 4, 1, 2)
    c = maps([1.0, 0.0])
    args = ([z, z], [c, c.clone()], 1.0)
    assert snb(*args, [1.0, 1.0], blur=False)[1].tolist() == [[[0, 0]]]
    assert snb(*args, [1.0, 3.0], blur=False)[1].tolist() == [[[1, 0]]]
    assert snb(*args, [3.0, 1.0], blur=False)[1].tolist() == [[[0, 1]]]


def test_reference_general_vs_own():
    # G: u = [0, 0], c = [1, 0]  -> r_G = [1, 0], S_G = [0.73, 0.27].
    # E: u = [2, 0], c = [2, 0]  -> own: r_E = 0, S_E = [0.5, 0.5]   -> mask [G, E];
    #                               general: r_E = c_E - u_G = [2, 0], S_E = [0.88, 0.12] -> mask [E, G].
    ug, cg = maps([0.0, 0.0]), maps([1.0, 0.0])
    ue, ce = maps([2.0, 0.0]), maps([2.0, 0.0])
    eps_own, own = snb([ug, ue], [cg, ce], 1.0, [1.0, 1.0], blur=False, reference="own")
    eps_gen, gen = snb([ug, ue], [cg, ce], 1.0, [1.0, 1.0], blur=False, reference="general")
    assert own.tolist() == [[[0, 1]]]
    assert gen.tolist() == [[[1, 0]]]
    eg, ee = guidance(ug, cg, 1.0), guidance(ue, ce, 1.0)  # the noises themselves use each model's own u
    assert torch.equal(eps_own, torch.cat([eg[..., :1], ee[..., 1:]], -1))
    assert torch.equal(eps_gen, torch.cat([ee[..., :1], eg[..., 1:]], -1))


@pytest.mark.parametrize("copy_of", [1, 0])
@pytest.mark.parametrize("blur", [True, False])
def test_three_models_with_a_duplicate_equal_two(copy_of, blur):
    g = torch.Generator().manual_seed(7)
    u = [torch.randn(2, 4, 5, 7, generator=g) for _ in range(2)]
    c = [torch.randn(2, 4, 5, 7, generator=g) for _ in range(2)]
    eps2, idx2 = snb(u, c, 5.0, [1.0, 2.0], blur, "own")
    assert idx2.any() and not idx2.all()  # a real mixture, so the comparison means something
    k3 = [1.0, 2.0, [1.0, 2.0][copy_of]]
    eps3, idx3 = snb(u + [u[copy_of].clone()], c + [c[copy_of].clone()], 5.0, k3, blur, "own")
    assert torch.equal(idx3, idx2)  # the copy ties with its original, which comes first
    assert torch.equal(eps3, eps2)


def test_three_models_argmax_with_own_temperatures():
    g = torch.Generator().manual_seed(3)
    u = [torch.randn(1, 4, 5, 7, generator=g) for _ in range(3)]
    c = [torch.randn(1, 4, 5, 7, generator=g) for _ in range(3)]
    ks = [1.0, 2.0, 0.5]
    eps, idx = snb(u, c, 4.0, ks, True, "general")
    sal = np.stack([reference_saliency(4.0 * (ci - u[0]), k, True) for ci, k in zip(c, ks)])
    assert np.array_equal(idx.numpy(), sal.argmax(0))
    assert set(idx.unique().tolist()) == {0, 1, 2}
    noises = [guidance(ui, ci, 4.0) for ui, ci in zip(u, c)]
    for m in range(3):
        sel = (idx == m)[:, None].expand_as(eps)
        assert torch.equal(eps[sel], noises[m][sel])


def test_non_square_latents():
    g = torch.Generator().manual_seed(11)
    u = [torch.randn(1, 4, 5, 7, generator=g) for _ in range(2)]
    c = [torch.randn(1, 4, 5, 7, generator=g) for _ in range(2)]
    eps, idx = snb(u, c, 7.5, [1.0, 3.0], True, "general")
    assert eps.shape == (1, 4, 5, 7) and idx.shape == (1, 5, 7)
    sg = reference_saliency(7.5 * (c[0] - u[0]), 1.0, True)
    se = reference_saliency(7.5 * (c[1] - u[0]), 3.0, True)
    assert np.array_equal(idx.numpy(), (se > sg).astype(np.int64))


# --- fused_step: the window, the outside model, average ----------------------------------------------------------

class StubUNet(torch.nn.Module):
    """Returns known (uncond, cond) predictions, ignoring x; records the timesteps it was called with."""

    def __init__(self, u, c):
        super().__init__()
        self.u, self.c, self.calls = u, c, []

    def twice(self, x, dtype):
        return torch.cat([x, x]).to(dtype)

    def forward(self, x, t, context):
        assert x.shape[0] == context.shape[0] == 2 * self.u.shape[0]
        self.calls.append(int(t))
        return torch.cat([self.u, self.c])


def ddim_by_hand(x, eps, a, a_prev, sigma=0.0, z=None):
    """DDIM eq. 12 (+ sigma z, eq. 16)."""
    x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    out = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma ** 2) * eps
    return out if z is None else out + sigma * z


def make_tables(steps, eta, fuse_from, fuse_until, generator, shape, device):
    """DDIM's tables with the fusion window fuse_until < t <= fuse_from."""
    plan = ddim_plan(steps, eta)
    return tables_of(plan, (plan.t > fuse_until) & (plan.t <= fuse_from), generator, shape, device)


def fused_step(unets, contexts, x, i, tab, scale, opts, ks, graph=False):
    """Step i of a run -> (latents, (B, h, w) winner index): as the eager loop runs it (only the outside model
    outside the window), or as the captured step does (`graph`: every model, selected with `torch.where`)."""
    run = Run(unets, DDIM, x.clone(), tab, contexts, torch.tensor(scale), torch.tensor(ks), opts)
    run.counter.fill_(i)
    run.step(True if graph else bool(tab.window[i]))
    return run.x, run.masks[i].long()


def test_make_tables_window_edges():
    gen = torch.Generator().manual_seed(0)
    shape = (1, 4, 2, 4)
    tab = make_tables(4, 0.0, 501, 251, gen, shape, "cpu")  # 4 steps: t = 751, 501, 251, 1
    assert tab.t.tolist() == [751, 501, 251, 1]
    assert tab.window.tolist() == [False, True, False, False]  # t == fuse_from fuses, t == fuse_until does not
    assert make_tables(4, 0.0, 1000, -1, gen, shape, "cpu").window.tolist() == [True] * 4
    assert make_tables(4, 0.0, 1000, 1, gen, shape, "cpu").window.tolist() == [True, True, True, False]
    assert make_tables(4, 0.0, 750, 0, gen, shape, "cpu").window.tolist() == [False, True, True, True]
    assert make_tables(4, 0.0, 0, -1, gen, shape, "cpu").window.tolist() == [False] * 4
    assert tab.noise is None


def test_make_tables_eta_noise_is_one_draw_per_step_in_order():
    shape = (2, 4, 3, 5)
    tab = make_tables(3, 0.5, 1000, -1, torch.Generator().manual_seed(5), shape, "cpu")
    g = torch.Generator().manual_seed(5)
    assert torch.equal(tab.noise, torch.stack([torch.randn(shape, generator=g) for _ in range(3)]))
    assert (tab.c[:, 2] > 0).all()  # DDIM's eta-scaled sigma


@pytest.fixture
def stubs():
    """G responds on the left half, E on the right, in every channel, on a non-square 2x4 latent.

    u_G = 0.1, u_E = -0.1; c_G - u_G = [1, 1, 0, 0]; c_E = [-0.1, -0.1, 1.1, 1.1] per row. With s = 2:
    r_G = [2, 2, 0, 0] -> S_G = [.22, .22, .03, .03]; "general" r_E = s (c_E - u_G) = [-.4, -.4, 2, 2] ->
    S_E = [.04, .04, .21, .21]; "own" r_E = s (c_E - u_E) = [0, 0, 2.4, 2.4] -> S_E = [.02, .02, .23, .23].
    Both references give the mask [G, G, E, E] (no blur).
    """
    ug = torch.full((1, 4, 2, 4), 0.1)
    ue = torch.full((1, 4, 2, 4), -0.1)
    cg = ug + maps([1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0])
    ce = ue + maps([0.0, 0.0, 1.2, 1.2], [0.0, 0.0, 1.2, 1.2])
    return StubUNet(ug, cg), StubUNet(ue, ce)


SCALE = 2.0


def contexts():
    return [torch.zeros(2, 3, 8), torch.zeros(2, 3, 8)]


def step_inputs():
    """Latents and a 4-step table (t = 751, 501, 251, 1) whose window 251 < t <= 501 holds step 1 alone."""
    x = torch.randn(1, 4, 2, 4, generator=torch.Generator().manual_seed(0))
    return x, make_tables(4, 0.0, 501, 251, torch.Generator(), x.shape, "cpu")


@pytest.mark.parametrize("outside", [0, 1])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["eager", "graph-index"])
def test_fused_step_outside_window_uses_the_outside_model(stubs, outside, as_tensor):
    G, E = stubs
    x, tab = step_inputs()
    opts = FuseOptions(blur=False, outside=("general", "expert")[outside])
    model = (G, E)[outside]
    eps = model.u + SCALE * (model.c - model.u)
    for i in (0, 2, 3):
        out, index = fused_step([G, E], contexts(), x, i, tab, SCALE, opts, [1.0, 1.0], graph=as_tensor)
        a, a_prev = tab.c[i, 0].item(), tab.c[i, 1].item()
        torch.testing.assert_close(out, ddim_by_hand(x, eps, a, a_prev))
        assert torch.equal(index, torch.full((1, 2, 4), outside))
    assert set(model.calls) == {751, 251, 1}
    other = (E, G)[outside]  # the eager loop skips the model whose noise goes unused; the graph cannot
    assert other.calls == ([751, 251, 1] if as_tensor else [])


@pytest.mark.parametrize("outside", [0, 1])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["eager", "graph-index"])
def test_fused_step_inside_window_blends(stubs, outside, as_tensor):
    G, E = stubs
    x, tab = step_inputs()
    i = 1
    eg, ee = G.u + SCALE * (G.c - G.u), E.u + SCALE * (E.c - E.u)
    eps = torch.cat([eg[..., :2], ee[..., 2:]], dim=-1)  # G left, E right
    for ref in ("general", "own"):
        opts = FuseOptions(blur=False, reference=ref, outside=("general", "expert")[outside])
        out, index = fused_step([G, E], contexts(), x, i, tab, SCALE, opts, [1.0, 1.0], graph=as_tensor)
        assert index.tolist() == [[[0, 0, 1, 1], [0, 0, 1, 1]]]
        torch.testing.assert_close(out, ddim_by_hand(x, eps, tab.c[i, 0].item(), tab.c[i, 1].item()))
    assert G.calls == E.calls == [501, 501]


def test_fused_step_average_is_the_mean(stubs):
    G, E = stubs
    x, tab = step_inputs()
    opts = FuseOptions(blend="average")
    eg, ee = G.u + SCALE * (G.c - G.u), E.u + SCALE * (E.c - E.u)
    out, index = fused_step([G, E], contexts(), x, 1, tab, SCALE, opts, [1.0, 1.0])
    torch.testing.assert_close(out, ddim_by_hand(x, (eg + ee) / 2, tab.c[1, 0].item(), tab.c[1, 1].item()))
    assert torch.equal(index, torch.full((1, 2, 4), 255))
    out, index = fused_step([G, E], contexts(), x, 0, tab, SCALE, opts, [1.0, 1.0])  # outside: G alone
    torch.testing.assert_close(out, ddim_by_hand(x, eg, tab.c[0, 0].item(), tab.c[0, 1].item()))
    assert not index.any()


def test_fused_step_eta_adds_sigma_times_the_steps_noise(stubs):
    G, E = stubs
    x = torch.randn(1, 4, 2, 4, generator=torch.Generator().manual_seed(0))
    tab = make_tables(4, 0.5, 1000, -1, torch.Generator().manual_seed(9), x.shape, "cpu")
    eg, ee = G.u + SCALE * (G.c - G.u), E.u + SCALE * (E.c - E.u)
    eps = torch.cat([eg[..., :2], ee[..., 2:]], dim=-1)
    for i in range(4):
        out, _ = fused_step([G, E], contexts(), x, i, tab, SCALE, FuseOptions(blur=False), [1.0, 1.0])
        expected = ddim_by_hand(x, eps, tab.c[i, 0].item(), tab.c[i, 1].item(), tab.c[i, 2].item(),
                                tab.noise[i])
        torch.testing.assert_close(out, expected)


def test_fused_step_three_models_with_a_duplicate_equal_two(stubs):
    G, E = stubs
    x = torch.randn(1, 4, 2, 4, generator=torch.Generator().manual_seed(0))
    tab = make_tables(4, 0.0, 1000, -1, torch.Generator(), x.shape, "cpu")
    E2 = StubUNet(E.u.clone(), E.c.clone())
    for blur in (True, False):
        out2, idx2 = fused_step([G, E], contexts(), x, 1, tab, SCALE, FuseOptions(blur), [1.0, 2.0])
        out3, idx3 = fused_step([G, E, E2], contexts() + [torch.zeros(2, 3, 8)], x, 1, tab, SCALE,
                                FuseOptions(blur), [1.0, 2.0, 2.0])
        assert torch.equal(idx2, idx3) and torch.equal(out2, out3)
