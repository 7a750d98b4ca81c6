"""The CUDA-graph runner (graph.py, sampling.py): static buffers, device tables and a device step counter.

On CPU the runner steps without capture, so these tests check, on any machine, that running the step the way the
graph does gives exactly what the eager loop gives. The CUDA tests (skipped without a GPU) compare replay to eager.
"""
import gc

import numpy as np
import pytest
import torch

import magicfusion
from magicfusion.denoiser import FuseOptions
from magicfusion.prompt import encode_prompt
from magicfusion.samplers import DDIM, SAMPLERS
from magicfusion.sampling import CACHE, Tables, captured, make_tables, sample
from tools.random_weights import write_checkpoint
from tools.random_weights import write_tiny_vocab


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("graph")
    write_tiny_vocab(d)
    return [magicfusion.load(write_checkpoint(d / f"m{s}.safetensors", "tiny", seed=s), tokenizer=d) for s in (1, 2)]


def same(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def tables(steps, eta, fuse_from, fuse_until, gen, shape, device, sampler=DDIM) -> Tables:
    plan = sampler.plan(steps, eta, False)
    return make_tables(plan, (plan.t > fuse_until) & (plan.t <= fuse_from), gen, shape, device)


def cached(model) -> list:
    """The cached (Run, Graph) pairs whose general model is `model`."""
    return [entry[:2] for key, entry in CACHE.items() if key[0][0] == id(model.unet)]


def graphed(models, ctx, x, tab, scale, opts, ks):
    """The cached (Run, Graph) for these models, captured on first use."""
    return captured([m.unet for m in models], DDIM, x, tab, ctx, torch.tensor(scale), torch.tensor(ks), opts)


def replay(models, ctx, x, tab, scale, ks, callback=None):
    """A whole run through the cached graph -> (latents, masks)."""
    return sample([m.unet for m in models], ctx, DDIM, x, tab, tab.window.tolist(), torch.tensor(scale),
                  torch.tensor(ks), FuseOptions(), True, callback)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_generate_runner_equals_eager(models, eta):
    kw = dict(steps=4, height=64, width=48, seed=3, eta=eta, batch=2, progress=False)
    assert same(magicfusion.generate(models[0], "a lion", graph=True, **kw),
                magicfusion.generate(models[0], "a lion", graph=False, **kw))


@pytest.mark.parametrize("window", [(1000, -1), (1000, 600), (850, 300)])
@pytest.mark.parametrize("outside", ["general", "expert"])
def test_fuse_runner_equals_eager(models, window, outside):
    kw = dict(steps=5, height=64, width=64, seed=7, eta=0.3, fuse_from=window[0], fuse_until=window[1],
              outside=outside, ke=2.0, progress=False)
    g = magicfusion.fuse(models[0], models[1], "a lion", "a cartoon lion", graph=True, **kw)
    e = magicfusion.fuse(models[0], models[1], "a lion", "a cartoon lion", graph=False, **kw)
    assert same(g.fused, e.fused)
    assert all(torch.equal(a, b) for a, b in zip(g.masks, e.masks))


SAMPLER_CASES = [("ddim", False), ("dpmpp-2m", False), ("dpmpp-2m", True), ("euler", False), ("euler", True),
                 ("euler-a", False)]


@pytest.mark.parametrize("sampler, karras", SAMPLER_CASES)
def test_every_sampler_runner_equals_eager(models, sampler, karras):
    """The 2M solver's previous prediction and the ancestral noise live in the runner's static buffers."""
    kw = dict(steps=4, height=64, width=48, seed=3, batch=2, sampler=sampler, karras=karras, progress=False)
    g = magicfusion.generate(models[0], "a lion", graph=True, **kw)
    assert same(g, magicfusion.generate(models[0], "a lion", graph=False, **kw))
    kw.update(fuse_until=400, ke=2.0)
    g, e = (magicfusion.fuse(models[0], models[1], "a lion", "a cartoon lion", graph=graph, **kw)
            for graph in (True, False))
    assert same(g.fused, e.fused) and all(torch.equal(a, b) for a, b in zip(g.masks, e.masks))
    assert any(m.any() for m in e.masks)  # the expert wins somewhere
    magicfusion.release_graphs()


def test_runner_is_reused_with_new_prompts_seeds_and_settings_then_released(models):
    general = models[0]
    magicfusion.release_graphs(general)
    kw = dict(height=64, width=64, progress=False)
    runs = [dict(prompt="a lion", seed=1, steps=3), dict(prompt="a bee making honey", seed=2, steps=3, guidance=5.0),
            dict(prompt="a lion", seed=3, steps=2, ke=3.0, kg=0.5)]  # fewer steps: the same tables serve
    for r in runs:
        g = magicfusion.fuse(general, models[1], graph=True, **kw, **r)
        e = magicfusion.fuse(general, models[1], graph=False, **kw, **r)
        assert same(g.fused, e.fused) and len(g.masks) == r["steps"]
        assert all(torch.equal(a, b) for a, b in zip(g.masks, e.masks))
    assert len(cached(general)) == 1
    magicfusion.fuse(general, models[1], "a lion", graph=True, steps=5, **kw)  # more steps: recaptured in place
    assert len(cached(general)) == 1 and len(cached(general)[0][0].tables.t) == 5
    magicfusion.fuse(general, models[1], "a lion", graph=True, steps=2, blur=False, **kw)  # other kernels: new entry
    assert len(cached(general)) == 2
    magicfusion.fuse(general, models[1], "a lion", graph=True, steps=2, sampler="euler", **kw)  # another sampler
    assert len(cached(general)) == 3
    magicfusion.release_graphs(general)
    assert not cached(general)


def test_runner_of_released_model_refuses_to_replay(tmp_path):
    write_tiny_vocab(tmp_path)
    ms = [magicfusion.load(write_checkpoint(tmp_path / f"m{s}.safetensors", "tiny", seed=s), tokenizer=tmp_path)
          for s in (1, 2)]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    tab = tables(2, 0.0, 1000, -1, gen, tuple(x.shape), "cpu")
    ctx = [encode_prompt(m, "a lion", "", 1) for m in ms]
    run, graph = graphed(ms, ctx, x, tab, 7.5, FuseOptions(), [1.0, 1.0])
    assert cached(ms[0]) == [(run, graph)]
    del ms[1]  # the expert goes: its graph (and on CUDA its memory pool) leaves the cache at once
    gc.collect()
    assert not cached(ms[0])
    with pytest.raises(RuntimeError, match="released"):
        graph()
    assert graphed(ms[:1], ctx[:1], x, tab, 7.5, FuseOptions(), [1.0])[1] is not graph
    assert len(cached(ms[0])) == 1


def test_a_graph_is_dropped_when_its_weights_move_or_it_is_released(models):
    """A graph replays the weight addresses it captured: after `.to(...)` moved them it must not be replayed."""
    m = models[0]
    magicfusion.release_graphs(m)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    tab = tables(2, 0.0, 1000, -1, gen, tuple(x.shape), "cpu")
    ctx = [encode_prompt(m, "a lion", "", 1)]
    _, graph = graphed([m], ctx, x, tab, 7.5, FuseOptions(), [1.0])
    assert graphed([m], ctx, x, tab, 7.5, FuseOptions(), [1.0])[1] is graph  # unchanged weights: the same graph
    m.unet.double().float()  # the same modules and dtype, the weights in new memory
    with pytest.raises(RuntimeError, match="moved"):
        graph()
    out, masks = replay([m], ctx, x, tab, 7.5, [1.0])
    fresh = cached(m)[0][1]
    assert fresh is not graph and len(cached(m)) == 1
    assert out.shape == x.shape and masks.shape == (2, 1, 8, 8)
    magicfusion.release_graphs(m)
    assert not cached(m)
    with pytest.raises(RuntimeError, match="released"):  # a graph held past release_graphs() refuses too
        fresh()


def test_runner_counter_and_tables_are_device_state(models):
    m = models[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    tab = tables(3, 0.0, 1000, -1, gen, tuple(x.shape), "cpu")
    ctx = [encode_prompt(m, "a lion", "", 1)]
    out, masks = replay([m], ctx, x, tab, 7.5, [1.0])
    run = cached(m)[0][0]
    assert run.counter.item() == 3 and masks.shape == (3, 1, 8, 8)
    assert not torch.equal(out, x)
    magicfusion.release_graphs(m)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graph_replay_matches_eager(tmp_path, dtype):
    write_tiny_vocab(tmp_path)
    ms = [magicfusion.load(write_checkpoint(tmp_path / f"m{s}.safetensors", "tiny", seed=s), tokenizer=tmp_path,
                           device="cuda", dtype=dtype) for s in (1, 2)]
    for sampler, karras in (("ddim", False), ("dpmpp-2m", True), ("euler-a", False)):
        kw = dict(steps=6, height=64, width=64, seed=1, fuse_until=400, sampler=sampler, karras=karras, progress=False)
        g = magicfusion.fuse(ms[0], ms[1], "a lion", graph=True, **kw)
        e = magicfusion.fuse(ms[0], ms[1], "a lion", graph=False, **kw)
        diff = np.abs(np.asarray(g.fused[0], dtype=np.int16) - np.asarray(e.fused[0], dtype=np.int16))
        assert diff.max() <= 2, (sampler, diff.max())
        # the same kernels in the same order: masks agree but for rare near-ties flipped by half-precision rounding
        assert all((a == b).float().mean() > 0.95 for a, b in zip(g.masks, e.masks))
    one_g = magicfusion.generate(ms[0], "a lion", graph=True, steps=6, height=64, width=64, seed=1, progress=False)
    one_e = magicfusion.generate(ms[0], "a lion", graph=False, steps=6, height=64, width=64, seed=1, progress=False)
    assert np.abs(np.asarray(one_g[0], dtype=np.int16) - np.asarray(one_e[0], dtype=np.int16)).max() <= 2
    magicfusion.release_graphs(ms[0])  # else the 6-row graph above would serve the 1-step run
    single_step = magicfusion.generate(ms[0], "a lion", graph=True, steps=1, height=64, width=64, progress=False)
    assert np.asarray(single_step[0]).std() > 0  # one-row tables: the warm-up must not step past them
    magicfusion.release_graphs(ms[0])
    gc.collect()


def test_graph_step_never_reads_device_values_back_to_the_host(models):
    """What the graph records must not synchronise: no `.item()`, `bool(tensor)` or data-dependent shapes.
    Every op the step dispatches is recorded (on CPU too) and none may be one that reads a value to the host."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    ctx = [encode_prompt(m, "a lion", "", 1) for m in models]
    syncing = {"aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.is_nonzero", "aten.masked_select"}
    for sampler in SAMPLERS.values():
        tab = tables(4, 0.5 if sampler is DDIM else 0.0, 900, 300, gen, tuple(x.shape), "cpu", sampler)
        run, _ = captured([m.unet for m in models], sampler, x, tab, ctx, torch.tensor(7.5), torch.tensor([1.0, 2.0]),
                          FuseOptions())
        run.step()  # the second step: DPM-Solver++(2M) uses the first one's prediction
        with Record() as rec:
            run.step()
        assert "aten.convolution" in rec.ops and "aten.index_select" in rec.ops  # the recording saw the step
        assert not rec.ops & syncing, (sampler.name, rec.ops & syncing)
    magicfusion.release_graphs(models[0])


def test_graph_step_touches_only_tensors_on_its_own_device(models):
    """A CPU tensor meeting a CUDA one inside a capture is read once, at capture time, and replayed as a constant
    (a guidance scale written `torch.tensor(7.5)` would be frozen into the graph). Run the step on the meta device,
    where no value is ever computed, and check that every op it dispatches sees meta tensors only."""
    import copy

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from magicfusion.sampling import Run

    class Devices(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.foreign = 0, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            devices = {t.device.type for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            if devices - {"meta"}:
                self.foreign.append((str(func), devices))
            return func(*args, **(kwargs or {}))

    unets = [copy.deepcopy(m.unet).to("meta") for m in models]
    shape = (2, 4, 8, 8)
    contexts = [torch.empty(4, 77, u.cfg.context_dim, device="meta") for u in unets]
    scale, ks = torch.tensor(7.5, device="meta"), torch.tensor([1.0, 2.0], device="meta")
    for sampler in SAMPLERS.values():
        tab = tables(4, 0.5 if sampler is DDIM else 0.0, 900, 300, torch.Generator().manual_seed(0), shape, "meta",
                     sampler)
        for opts, n in ((FuseOptions(), 2), (FuseOptions(blend="average", outside="expert"), 2), (FuseOptions(), 1)):
            run = Run(unets[:n], sampler, torch.empty(shape, device="meta"), tab, contexts[:n], scale, ks[:n], opts)
            with Devices() as seen:
                run.step()
            assert seen.ops > 100 and not seen.foreign, seen.foreign


def test_runner_advances_the_progress_bar_once_per_step(models):
    class Bar:
        n = 0

        def update(self, k=1):
            self.n += k
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    tab = tables(3, 0.0, 1000, -1, gen, tuple(x.shape), "cpu")
    ctx = [encode_prompt(m, "a lion", "", 1) for m in models]
    bar, seen = Bar(), []
    _, masks = replay(models, ctx, x, tab, 7.5, [1.0, 1.0], lambda i, mask: bar.update() or seen.append(mask.clone()))
    assert bar.n == 3
    assert torch.equal(torch.stack(seen), masks)  # the callback is handed each step's mask
    magicfusion.release_graphs(models[0])
