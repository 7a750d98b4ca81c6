"""The `magicfusion` command: bad input is one line on stderr and exit status 2 with nothing written; good input
writes PNGs whose pixels equal the Python API's and whose `parameters` chunk is AUTOMATIC1111's format."""
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import magicfusion
from magicfusion import demo
from magicfusion.cli import main, mask_grid
from tools.random_weights import random_state_dict

UNET, CLIP = "model.diffusion_model.", "cond_stage_model.transformer."
PROMPT, NEGATIVE, SEED = "a cat with a crown", "blurry", 5
SMALL = {"--steps": "2", "--height": "64", "--width": "64", "--device": "cpu"}


# ------------------------------------------------------------------------------------------------ fixtures

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py; so is `weights`, the tiny demo pair


@pytest.fixture(scope="session")
def tiny_sd():
    """A valid tiny LDM state dict to damage; cases copy it (`dict(...)`) and replace tensors, never mutate."""
    return random_state_dict("tiny", 3)


@pytest.fixture(scope="session")
def models(weights):
    general, expert, tok = weights
    return (magicfusion.load(general, tokenizer=tok, device="cpu", dtype=torch.float32),
            magicfusion.load(expert, tokenizer=tok, device="cpu", dtype=torch.float32))


def argv(command: str, args: dict) -> list:
    """{flag: value or None} -> [command, flag, value, ...]; a list value repeats the flag."""
    out = [command]
    for flag, value in args.items():
        for v in value if isinstance(value, list) else [value]:
            out += [flag] if v is None else [flag, str(v)]
    return out


def generate_args(weights, out: Path, **extra) -> dict:
    general, _, tok = weights
    return {"--model": general, "--tokenizer": tok, "--prompt": PROMPT, "--negative-prompt": NEGATIVE,
            "--seed": SEED, **SMALL, "--out": out, **extra}


def fuse_args(weights, out: Path, **extra) -> dict:
    general, expert, tok = weights
    return {"--general": general, "--expert": expert, "--tokenizer": tok, "--prompt": PROMPT,
            "--negative-prompt": NEGATIVE, "--seed": SEED, **SMALL, "--out": out, **extra}


def snapshot(folder: Path):
    """Every file under `folder` (hidden temporaries too) with its bytes; None when the folder is absent."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else "dir" for p in folder.rglob("*")}


def pixels(source) -> np.ndarray:
    image = source if isinstance(source, Image.Image) else Image.open(source)
    return np.asarray(image.convert("RGB"))


def png_parameters(path: Path) -> str:
    with Image.open(path) as im:
        im.load()
        return im.text["parameters"]


def fields(params: str) -> dict:
    """The `key: value, key: value` third line of an A1111 `parameters` text -> {key: value}."""
    line = params.splitlines()[2]
    return dict(item.split(": ", 1) for item in re.split(r", (?=[A-Za-z][A-Za-z ]*: )", line))


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("magicfusion: error: "), err
    return lines[0].lower()


# -------------------------------------------------------------------------------------------- bad files

def save_sd(path: Path, sd: dict) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def valid_file(tmp, sd) -> Path:
    return save_sd(tmp / "valid.safetensors", sd)


def replaced(sd: dict, **tensors) -> dict:
    """A copy of `sd` with the named UNet tensors (`__` for `.`) set."""
    return {**sd, **{UNET + short.replace("__", "."): value for short, value in tensors.items()}}


class RunsShellCommand:
    """Pickles as a call to os.system: a loader that executes pickles would run the command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def hostile_ckpt(tmp: Path) -> Path:
    path = tmp / "hostile.ckpt"
    torch.save({"payload": RunsShellCommand(f"touch {shlex.quote(str(tmp / 'PWNED'))}"),
                "state_dict": {UNET + "input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}}, path)
    return path


def cut_file(tmp, sd) -> Path:
    data = valid_file(tmp, sd).read_bytes()
    path = tmp / "half.safetensors"
    path.write_bytes(data[: len(data) // 2])
    return path


def lying_header(factor: float):
    def make(tmp, sd):
        data = bytearray(valid_file(tmp, sd).read_bytes())
        n = int.from_bytes(data[:8], "little")
        data[:8] = int(n * factor if factor < 1 else len(data) * factor).to_bytes(8, "little")
        path = tmp / "lying.safetensors"
        path.write_bytes(bytes(data))
        return path
    return make


def garbled_header(tmp, sd) -> Path:
    data = bytearray(valid_file(tmp, sd).read_bytes())
    data[8:40] = bytes(range(200, 232))  # not UTF-8, so not JSON
    path = tmp / "garbled.safetensors"
    path.write_bytes(bytes(data))
    return path


def random_bytes(tmp, sd) -> Path:
    path = tmp / "noise.safetensors"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def model_file(make):
    """A case that writes a damaged checkpoint with `make(tmp, tiny_sd)` and passes it as the model."""
    return lambda ctx: {"model": make(ctx["tmp"], ctx["sd"])}


def sd_file(change):
    """A case that saves `change(tiny_sd)` as a .safetensors file and passes it as the model."""
    return model_file(lambda tmp, sd: save_sd(tmp / "changed.safetensors", change(sd)))


def tokenizer_with_bad_vocab(ctx):
    tok = ctx["tmp"] / "bad-tokenizer"
    shutil.copytree(ctx["weights"][2], tok)
    (tok / "vocab.json").write_text('{"a": 1, "b": ')
    return {"--tokenizer": tok}


def existing_output(ctx):
    ctx["out"].write_bytes(b"precious bytes, not a PNG")
    return {}


def read_only_folder(ctx):
    folder = ctx["out"].parent
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root writes anyway
        folder.chmod(0o755)
        pytest.skip("running as a user that can write to a read-only folder (root)")
    ctx["cleanup"].append(lambda: folder.chmod(0o755))
    return {}


def cuda_without_gpu(ctx):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available")
    return {"--device": "cuda"}


def replaced_key(sd, key, value):
    return {**sd, key: torch.full_like(sd[key], value)}


def option(**values):
    return lambda ctx: {"--" + k.replace("_", "-"): v for k, v in values.items()}


NAN_BIAS = sd_file(lambda sd: replaced(sd, out__2__bias=torch.full((4,), float("nan"))))
NAN_VAE = sd_file(lambda sd: replaced_key(sd, "first_stage_model.decoder.conv_out.bias", float("nan")))
NAN_UNET = sd_file(lambda sd: {k: torch.full_like(v, float("nan")) if k.startswith(UNET) else v
                               for k, v in sd.items()})

# (case, words the one-line message must contain: the problem and, where there is one, the fix)
GENERATE_CASES = [
    pytest.param(lambda ctx: {"model": ctx["tmp"] / "absent.safetensors"}, ["absent.safetensors", "no such file"],
                 id="missing-model"),
    pytest.param(model_file(lambda tmp, sd: (tmp / "empty.safetensors").touch() or tmp / "empty.safetensors"),
                 ["empty"], id="empty-file"),
    pytest.param(model_file(cut_file), ["truncated", "re-download"], id="truncated-file"),
    pytest.param(model_file(random_bytes), ["corrupt", "re-download"], id="random-bytes"),
    pytest.param(model_file(garbled_header), ["corrupt", "re-download"], id="garbled-header"),
    pytest.param(model_file(lying_header(2.0)), ["header length", "re-download"], id="header-length-too-long"),
    pytest.param(model_file(lying_header(0.5)), ["header", "re-download"], id="header-length-too-short"),
    pytest.param(sd_file(lambda sd: {"foo": torch.zeros(3)}), ["not a stable diffusion 1.x", "foo"],
                 id="not-stable-diffusion"),
    pytest.param(sd_file(lambda sd: {k: v for k, v in sd.items() if k != UNET + "out.2.bias"}),
                 ["missing", "out.2.bias"], id="missing-unet-key"),
    pytest.param(sd_file(lambda sd: {k: v for k, v in sd.items()
                                     if k != CLIP + "text_model.final_layer_norm.weight"}),
                 ["missing", "final_layer_norm.weight"], id="missing-text-encoder-key"),
    pytest.param(sd_file(lambda sd: replaced(sd, middle_block__0__in_layers__0__weight=torch.ones(63))),
                 ["wrongly shaped", "middle_block.0.in_layers.0.weight"], id="wrong-shape"),
    pytest.param(sd_file(lambda sd: replaced(sd, input_blocks__0__0__weight=torch.ones(32))),
                 ["malformed"], id="wrong-rank-conv-in"),
    pytest.param(sd_file(lambda sd: {**sd, "cond_stage_model.model.token_embedding.weight": torch.zeros(8, 4)}),
                 ["2.x"], id="sd2"),
    pytest.param(sd_file(lambda sd: {
        **sd, "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(4)}),
                 ["sdxl"], id="sdxl"),
    pytest.param(sd_file(lambda sd: replaced(sd, input_blocks__0__0__weight=torch.zeros(32, 9, 3, 3))),
                 ["9", "inpainting"], id="inpainting"),
    pytest.param(sd_file(lambda sd: {**sd, "cond_stage_model.something_else": torch.zeros(2)}),
                 ["unexpected", "cond_stage_model.something_else"], id="unexpected-key"),
    pytest.param(model_file(lambda tmp, sd: hostile_ckpt(tmp)), ["refusing", "system"], id="ckpt-runs-os-system"),
    pytest.param(model_file(lambda tmp, sd: (tmp / "model.gguf").write_bytes(b"GGUF") and tmp / "model.gguf"),
                 ["unsupported", ".gguf"], id="unsupported-suffix"),
    pytest.param(lambda ctx: {"model": ctx["tmp"] / "two\nlines.safetensors"}, ["two lines.safetensors", "no such"],
                 id="path-with-a-line-break"),
    pytest.param(sd_file(lambda sd: replaced(sd, middle_block__0__in_layers__2__weight=torch.zeros(
        sd[UNET + "middle_block.0.in_layers.2.weight"].shape, dtype=torch.int64))), ["int64"],
                 id="integer-weight"),
    pytest.param(lambda ctx: {"--tokenizer": ctx["tmp"] / "no-tokenizer"}, ["no-tokenizer", "vocab.json"],
                 id="missing-tokenizer"),
    pytest.param(tokenizer_with_bad_vocab, ["vocab.json", "json"], id="corrupt-tokenizer"),
    pytest.param(option(height=0), ["height", "multiple of 8"], id="height-0"),
    pytest.param(option(width=-8), ["width", "multiple of 8"], id="width-negative"),
    pytest.param(option(height=12), ["height", "multiple of 8"], id="height-12"),
    pytest.param(option(steps=0), ["steps", "1..1000"], id="steps-0"),
    pytest.param(option(clip_skip=-1), ["clip skip"], id="clip-skip-negative"),
    pytest.param(option(clip_skip=2), ["clip skip", "0..1"], id="clip-skip-too-deep"),
    pytest.param(option(steps=1001), ["steps", "1..1000"], id="steps-1001"),
    pytest.param(option(guidance="nan"), ["guidance", "finite"], id="guidance-nan"),
    pytest.param(option(guidance="inf"), ["guidance", "finite"], id="guidance-inf"),
    pytest.param(option(seed=2 ** 64), ["seed", str(2 ** 64)], id="seed-2**64"),
    pytest.param(option(seed=-2), ["seed", "-2"], id="seed-negative"),
    pytest.param(option(batch=0), ["batch", ">= 1"], id="batch-0"),
    pytest.param(option(eta=-0.1), ["eta", ">= 0"], id="eta-negative"),
    pytest.param(option(steps="two"), ["--steps", "invalid int", "--help"], id="steps-not-a-number"),
    pytest.param(option(dtype="float64"), ["dtype", "float64", "float32"], id="unknown-dtype"),
    pytest.param(option(device="tpu"), ["device", "tpu", "cpu"], id="unknown-device"),
    pytest.param(cuda_without_gpu, ["cuda", "--device cpu"], id="cuda-without-gpu"),
    pytest.param(lambda ctx: {"--out": ctx["out"].parent / "absent" / "image.png"}, ["absent", "does not exist"],
                 id="output-folder-missing"),
    pytest.param(read_only_folder, ["not writable"], id="output-folder-read-only"),
    pytest.param(lambda ctx: {"--out": ctx["out"].with_suffix(".jpg")}, [".png"], id="output-not-png"),
    pytest.param(existing_output, ["already exists", "--overwrite"], id="output-exists"),
    pytest.param(lambda ctx: ctx["out"].mkdir() or {}, ["is a folder"], id="output-is-a-folder"),
    pytest.param(NAN_BIAS, ["nan"], id="nan-out-bias"),
    pytest.param(NAN_UNET, ["nan"], id="nan-unet"),
    pytest.param(NAN_VAE, ["vae", "nan"], id="nan-vae"),
]


@pytest.mark.parametrize("case, words", GENERATE_CASES)
def test_generate_bad_input(case, words, weights, tiny_sd, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    ctx = {"tmp": tmp_path, "sd": tiny_sd, "weights": weights, "out": out_dir / "image.png", "cleanup": []}
    try:
        change = case(ctx)
        args = generate_args(weights, ctx["out"], **{k: v for k, v in change.items() if k != "model"})
        args["--model"] = change.get("model", args["--model"])
        before = snapshot(out_dir)
        code = main(argv("generate", args))
        after = snapshot(out_dir)
    finally:
        for undo in ctx["cleanup"]:
            undo()
    message = one_error_line(capsys.readouterr().err)
    assert code == 2
    for word in words:
        assert word.lower() in message, message
    assert after == before  # nothing written, no temporary left, an existing file's bytes unchanged
    assert not (tmp_path / "PWNED").exists()  # the hostile pickle's command never ran
    if "--out" in change:
        assert not Path(change["--out"]).exists()


FUSE_CASES = [
    pytest.param(lambda ctx: {"--general": ctx["tmp"] / "absent.safetensors"}, ["absent.safetensors", "no such"],
                 id="missing-general"),
    pytest.param(lambda ctx: {"--expert": ctx["tmp"] / "absent.safetensors"}, ["absent.safetensors", "no such"],
                 id="missing-expert"),
    pytest.param(lambda ctx: {"--expert": cut_file(ctx["tmp"], ctx["sd"])}, ["truncated"], id="truncated-expert"),
    pytest.param(lambda ctx: {"--expert": sd_file(lambda sd: {
        **sd, "conditioner.embedders.0.model.ln_final.weight": torch.zeros(4)})(ctx)["model"]}, ["sdxl"],
                 id="sdxl-expert"),
    pytest.param(lambda ctx: {"--general": sd_file(lambda sd: replaced(
        sd, input_blocks__0__0__weight=torch.zeros(32, 9, 3, 3)))(ctx)["model"]}, ["inpainting"],
                 id="inpainting-general"),
    pytest.param(lambda ctx: {"--expert": hostile_ckpt(ctx["tmp"])}, ["refusing"], id="ckpt-runs-os-system"),
    pytest.param(lambda ctx: {"--tokenizer": ctx["tmp"] / "no-tokenizer"}, ["no-tokenizer"], id="missing-tokenizer"),
    pytest.param(option(width=12), ["width", "multiple of 8"], id="width-12"),
    pytest.param(option(steps=1001), ["steps"], id="steps-1001"),
    pytest.param(option(guidance="inf"), ["guidance", "finite"], id="guidance-inf"),
    pytest.param(option(seed=-2), ["seed"], id="seed-negative"),
    pytest.param(option(kg="nan"), ["kg", "finite"], id="kg-nan"),
    pytest.param(option(device="tpu"), ["tpu"], id="unknown-device"),
    pytest.param(option(expert_prompt=["one", "two"]), ["--expert-prompt"], id="too-many-expert-prompts"),
    pytest.param(option(outside="nobody"), ["--outside", "invalid choice"], id="bad-choice"),
    pytest.param(lambda ctx: ctx["out"].mkdir() or (ctx["out"] / "fused.png").write_bytes(b"keep me") and {},
                 ["fused.png", "already exists", "--overwrite"], id="output-exists"),
    pytest.param(lambda ctx: ctx["out"].write_bytes(b"a file") and {}, ["is a file"], id="output-is-a-file"),
    pytest.param(lambda ctx: (ctx["out"].parent / "file").write_bytes(b"x") and {"--out": ctx["out"].parent / "file"
                                                                                  / "run"},
                 ["cannot make folder", "is a file"], id="output-below-a-file"),
    pytest.param(lambda ctx: {"--general": NAN_UNET(ctx)["model"]}, ["nan"], id="nan-general"),
]


@pytest.mark.parametrize("case, words", FUSE_CASES)
def test_fuse_bad_input(case, words, weights, tiny_sd, tmp_path, capsys):
    parent = tmp_path / "out"
    parent.mkdir()
    ctx = {"tmp": tmp_path, "sd": tiny_sd, "weights": weights, "out": parent / "run"}
    args = fuse_args(weights, ctx["out"], **case(ctx))
    before = snapshot(parent)
    code = main(argv("fuse", args))
    message = one_error_line(capsys.readouterr().err)
    assert code == 2
    for word in words:
        assert word.lower() in message, message
    assert snapshot(parent) == before  # not even the output folder is made when the run fails
    assert not (tmp_path / "PWNED").exists()


def test_subprocess_hostile_checkpoint_exits_2_without_traceback(weights, tmp_path):
    """End to end through `python -m magicfusion`: a real process, its real exit status and stderr."""
    out = tmp_path / "out" / "image.png"
    out.parent.mkdir()
    args = generate_args(weights, out, **{"--model": hostile_ckpt(tmp_path)})
    proc = subprocess.run([sys.executable, "-m", "magicfusion", *argv("generate", args)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "refusing" in one_error_line(proc.stderr)
    assert proc.stdout == ""
    assert not (tmp_path / "PWNED").exists()
    assert list(out.parent.iterdir()) == []


def test_console_script_exits_2_without_traceback(weights, tmp_path):
    exe = shutil.which("magicfusion")
    if exe is None:
        pytest.skip("the `magicfusion` console script is not on PATH")
    out = tmp_path / "image.png"
    proc = subprocess.run([exe, *argv("generate", generate_args(weights, out, **{"--steps": 0}))],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "steps" in one_error_line(proc.stderr)
    assert not out.exists()


# ------------------------------------------------------------------------------------------ good input

def test_generate_writes_png_equal_to_the_api_with_a1111_parameters(weights, models, tmp_path, capsys):
    out = tmp_path / "cat.png"
    assert main(argv("generate", generate_args(weights, out))) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(SEED) in err and str(out) in err
    (expected,) = magicfusion.generate(models[0], PROMPT, NEGATIVE, steps=2, guidance=7.5, seed=SEED, height=64,
                                       width=64, progress=False)
    np.testing.assert_array_equal(pixels(out), pixels(expected))
    prompt, negative, line = png_parameters(out).split("\n")
    assert prompt == PROMPT
    assert negative == f"Negative prompt: {NEGATIVE}"
    assert line == f"Steps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: {SEED}, Size: 64x64, Model: {weights[0].stem}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.png"]  # no temporary left beside it


def test_parameters_record_eta_and_size_and_keep_the_prompt_whole(weights, tmp_path):
    out = tmp_path / "eta.png"
    assert main(argv("generate", generate_args(weights, out, **{"--eta": 0.5, "--guidance": 3, "--width": 96,
                                                               "--prompt": "a, b: c", "--quiet": None}))) == 0
    params = png_parameters(out)
    assert params.splitlines()[0] == "a, b: c"
    f = fields(params)
    assert f["Eta"] == "0.5" and f["CFG scale"] == "3.0" and f["Seed"] == str(SEED)
    assert f["Size"] == "96x64" and Image.open(out).size == (96, 64)  # A1111 writes width x height


def test_batch_writes_numbered_images_that_differ(weights, models, tmp_path):
    out = tmp_path / "cat.png"
    assert main(argv("generate", generate_args(weights, out, **{"--batch": 2, "--quiet": None}))) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat-0.png", "cat-1.png"]
    first, second = pixels(tmp_path / "cat-0.png"), pixels(tmp_path / "cat-1.png")
    assert not np.array_equal(first, second)
    expected = magicfusion.generate(models[0], PROMPT, NEGATIVE, steps=2, seed=SEED, height=64, width=64, batch=2,
                                    progress=False)
    np.testing.assert_array_equal(first, pixels(expected[0]))
    np.testing.assert_array_equal(second, pixels(expected[1]))


def test_random_seed_is_reported_and_reproduces(weights, tmp_path, capsys):
    seeds = []
    for name in ("a.png", "b.png"):
        assert main(argv("generate", generate_args(weights, tmp_path / name, **{"--seed": -1}))) == 0
        reported = re.findall(r"seed (\d+)", capsys.readouterr().err)
        assert len(reported) == 1
        assert fields(png_parameters(tmp_path / name))["Seed"] == reported[0]
        seeds.append(int(reported[0]))
    assert seeds[0] != seeds[1]  # drawn, not a fixed stand-in for -1
    assert main(argv("generate", generate_args(weights, tmp_path / "again.png", **{"--seed": seeds[0]}))) == 0
    np.testing.assert_array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "a.png"))


def test_overwrite_replaces_an_existing_file(weights, tmp_path):
    out = tmp_path / "cat.png"
    out.write_bytes(b"old bytes")
    assert main(argv("generate", generate_args(weights, out, **{"--overwrite": None, "--quiet": None}))) == 0
    assert fields(png_parameters(out))["Seed"] == str(SEED)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.png"]


def test_quiet_prints_nothing(weights, tmp_path, capsys):
    assert main(argv("generate", generate_args(weights, tmp_path / "cat.png", **{"--quiet": None}))) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
    assert (tmp_path / "cat.png").is_file()


def test_fuse_writes_four_pngs_equal_to_the_api(weights, models, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(argv("fuse", fuse_args(weights, out, **{"--expert-prompt": "a cartoon cat", "--ke": 2.0,
                                                        "--fuse-until": 500}))) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(SEED) in err
    assert sorted(p.name for p in out.iterdir()) == ["expert.png", "fused.png", "general.png", "masks.png"]
    general, expert = models
    common = dict(negative_prompt=NEGATIVE, steps=2, guidance=7.5, seed=SEED, height=64, width=64, progress=False)
    result = magicfusion.fuse(general, expert, PROMPT, "a cartoon cat", ke=2.0, fuse_until=500, **common)
    np.testing.assert_array_equal(pixels(out / "fused.png"), pixels(result.fused[0]))
    np.testing.assert_array_equal(pixels(out / "general.png"),
                                  pixels(magicfusion.generate(general, PROMPT, **common)[0]))
    np.testing.assert_array_equal(pixels(out / "expert.png"),
                                  pixels(magicfusion.generate(expert, "a cartoon cat", **common)[0]))
    fused = png_parameters(out / "fused.png")
    assert fused.splitlines()[:2] == [PROMPT, f"Negative prompt: {NEGATIVE}"]
    f = fields(fused)
    assert f["Fuse until"] == "500" and f["Seed"] == str(SEED) and f["Model"] == weights[0].stem
    assert f["Experts"] == weights[1].stem and f["ke"] == "2.0"
    assert png_parameters(out / "expert.png").splitlines()[0] == "a cartoon cat"
    assert fields(png_parameters(out / "expert.png"))["Model"] == weights[1].stem
    assert "Fuse until" not in png_parameters(out / "general.png")
    assert fields(png_parameters(out / "general.png"))["Model"] == weights[0].stem
    np.testing.assert_array_equal(np.asarray(Image.open(out / "masks.png")), np.asarray(mask_grid(result.masks, 2)))
    assert png_parameters(out / "masks.png") == fused


def test_mask_grid_shades_each_model():
    import torch
    masks = [torch.tensor([[[0, 1, 2]]], dtype=torch.uint8)] * 2  # one batch item, three latent pixels, 2 steps
    grid = np.asarray(mask_grid(masks, 3, scale=1))
    first_tile = grid[1, 1:4]  # row 1 (below the grid line), the tile's three pixels
    assert first_tile[0].tolist() == [255] * 3 and first_tile[1].tolist() == [0] * 3  # general white, expert 1 black
    assert 0 < first_tile[2][0] < 255 and len(set(first_tile[2].tolist())) == 1  # expert 2 a gray
    assert len(set(map(tuple, grid[0].tolist()))) == 1 and tuple(grid[0, 0]) not in {(255,) * 3, (0,) * 3}


def test_demo_weights_folder_that_is_a_file_exits_2(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "out"), "--weights", str(tmp_path / "afile")]) == 2
    assert "--weights" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_fused_only_writes_fused_and_masks(weights, tmp_path, capsys):
    out = tmp_path / "new" / "run"  # folders are made
    assert main(argv("fuse", fuse_args(weights, out, **{"--fused-only": None, "--quiet": None}))) == 0
    assert capsys.readouterr().err == ""
    assert sorted(p.name for p in out.iterdir()) == ["fused.png", "masks.png"]
    assert "Fuse until" in png_parameters(out / "fused.png")


def test_demo_runs_offline_and_keeps_its_files(tmp_path, capsys, monkeypatch):
    """The demo fuses the shipped toy models: a panel and, per prompt, the four pictures; a rerun keeps them."""
    def no_network(*args, **kwargs):
        raise AssertionError("the demo tried to use the network")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    slugs = ["-".join(prompt.split()[1:]) for prompt, _ in demo.PROMPTS]
    assert sorted(p.name for p in out.iterdir()) == sorted(["panel.png", *slugs])
    for slug, (prompt, expert_prompt) in zip(slugs, demo.PROMPTS):
        assert sorted(p.name for p in (out / slug).iterdir()) == ["expert.png", "fused.png", "general.png", "masks.png"]
        for name in ("general", "expert", "fused"):
            assert Image.open(out / slug / f"{name}.png").size == (demo.SIZE, demo.SIZE)
        assert png_parameters(out / slug / "fused.png").startswith(prompt + "\nExpert prompt: " + expert_prompt)
    panel = Image.open(out / "panel.png")
    assert panel.size[0] >= 4 * 2 * demo.SIZE and panel.size[1] >= len(slugs) * 2 * demo.SIZE
    before = snapshot(out)
    assert main(["demo", "--out", str(out)]) == 2
    assert "--overwrite" in one_error_line(capsys.readouterr().err)
    assert snapshot(out) == before


def test_demo_without_its_models_says_how_to_get_them(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["demo", "--out", str(tmp_path / "out"), "--weights", str(tmp_path / "empty")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "general.safetensors" in line and "train_toy.py" in line
    assert not (tmp_path / "out").exists()