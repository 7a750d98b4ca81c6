"""Hostile options, paths and races through the command line (issue 10, classes 3, 4, 5, 8, 9): one line on
stderr and exit 2 (130/143 for SIGINT/SIGTERM), nothing half-written, nothing replaced that appeared while the
run worked, no temporary file left on any exit path, and no option that can make a run allocate without bound."""
import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from magicfusion import cli, limits, outputs
from magicfusion.cli import main
from tools.random_weights import random_state_dict
from helpers import deadline

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--steps", "1", "--height", "32", "--width", "32", "--device", "cpu", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py; so is `weights`, the tiny demo pair


def gen(weights, out, *extra, model=None) -> list:
    general, _, tok = weights
    return ["generate", "--model", str(model or general), "--tokenizer", str(tok), "--prompt", "a cat",
            *SMALL, "--out", str(out), *map(str, extra)]


def fuse_argv(weights, out, *extra) -> list:
    general, expert, tok = weights
    return ["fuse", "--general", str(general), "--expert", str(expert), "--tokenizer", str(tok),
            "--prompt", "a cat", *SMALL, "--out", str(out), *map(str, extra)]


def run(argv, capsys) -> tuple:
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    if code != 0:
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
    return code, err


def listing(folder: Path) -> list:
    """Every entry in `folder`, hidden ones included (temporaries start with a dot)."""
    return sorted(p.name for p in folder.iterdir())


def refuse_to_load(monkeypatch):
    monkeypatch.setattr(cli, "load", lambda *a, **k: pytest.fail("loaded a model for a run it should refuse"))


# ------------------------------------------------------------------------------ class 3: options without bounds

@pytest.mark.parametrize("extra, words", [
    (["--batch", 4611686018427387904], ["--batch", "1024"]),
    (["--batch", 100000], ["--batch"]),
    (["--height", 100000, "--width", 100000], ["--height", "8192"]),
    (["--width", 2 ** 70], ["--width"]),
    (["--steps", 10 ** 30], ["--steps"]),
    (["--seed", 10 ** 30], ["--seed"]),
    (["--clip-skip", 10 ** 30], ["--clip-skip"]),
    (["--guidance", "1e308"], ["--guidance", "out of range"]),
    (["--eta", "1e308"], ["--eta", "out of range"]),
    (["--eta", "1.5"], ["--eta"]),
])
def test_generate_options_are_bounded_before_loading(weights, tmp_path, capsys, monkeypatch, extra, words):
    refuse_to_load(monkeypatch)
    code, err = run(gen(weights, tmp_path / "out.png", *extra), capsys)
    assert code == 2
    for word in words:
        assert word in err, err
    assert "float32" not in err and "weights" not in err  # the option is named, not the model blamed
    assert listing(tmp_path) == []


@pytest.mark.parametrize("extra, word", [(["--kg", "1e308"], "--kg"), (["--ke", "-1e308"], "--ke"),
                                         (["--fuse-until", 10 ** 30], "--fuse-until"),
                                         (["--fuse-from", -(10 ** 30)], "--fuse-from")])
def test_fuse_options_are_bounded_before_loading(weights, tmp_path, capsys, monkeypatch, extra, word):
    refuse_to_load(monkeypatch)
    code, err = run(fuse_argv(weights, tmp_path / "run", *extra), capsys)
    assert code == 2 and word in err, err
    assert listing(tmp_path) == []


def test_number_of_experts_is_bounded_before_loading(weights, tmp_path, capsys, monkeypatch):
    refuse_to_load(monkeypatch)
    code, err = run(fuse_argv(weights, tmp_path / "run", *["--expert", weights[1]] * 16), capsys)  # 17 in all
    assert code == 2 and "17 experts" in err and "16" in err, err


def test_memory_estimate_refuses_before_sampling(weights, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(limits, "available_bytes", lambda device: 256 * 2 ** 20)
    code, err = run(gen(weights, tmp_path / "out.png", "--batch", 1000, "--height", 4096, "--width", 4096), capsys)
    assert code == 2 and "needs about" in err and "fits" in err, err
    assert listing(tmp_path) == []


def test_memory_of_a_capped_process_is_respected(weights, tmp_path):
    """In a child whose address space is capped at 3 GB (what `ulimit -v` does), a run that would need far more
    is refused from the estimate instead of dying in the allocator."""
    general, _, tok = weights
    script = textwrap.dedent("""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2 ** 30, 3 * 2 ** 30))
        from magicfusion.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    argv = gen(weights, tmp_path / "out.png", "--batch", 512, "--height", 2048, "--width", 2048)
    proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "needs about" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out-0.png").exists()


# ------------------------------------------------------------ class 4: outputs that appear while the run works

def appear_during(monkeypatch, name: str, make):
    """Wrap cli.<name> (generate or fuse) so that `make()` runs while the run samples."""
    real = getattr(cli, name)

    def wrapped(*args, **kwargs):
        make()
        return real(*args, **kwargs)
    monkeypatch.setattr(cli, name, wrapped)


def test_generate_never_replaces_an_output_that_appeared(weights, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cat.png"
    appear_during(monkeypatch, "generate", lambda: out.write_bytes(b"another run's image"))
    code, err = run(gen(weights, out), capsys)
    assert code == 2 and "appeared" in err and "--overwrite" in err, err
    assert out.read_bytes() == b"another run's image"
    assert listing(tmp_path) == ["cat.png"]  # no temporary left either


def test_fuse_never_replaces_an_output_that_appeared(weights, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    appear_during(monkeypatch, "fuse", lambda: out.mkdir() or (out / "general.png").write_bytes(b"theirs"))
    code, err = run(fuse_argv(weights, out), capsys)
    assert code == 2 and "general.png" in err and "--overwrite" in err, err
    assert listing(out) == ["general.png"] and (out / "general.png").read_bytes() == b"theirs"


def test_a_dangling_symlink_is_an_existing_output(weights, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cat.png"
    out.symlink_to(tmp_path / "nowhere.png")
    code, err = run(gen(weights, out), capsys)
    assert code == 2 and "already exists" in err, err
    assert os.readlink(out) == str(tmp_path / "nowhere.png") and not (tmp_path / "nowhere.png").exists()
    late = tmp_path / "late.png"  # one that appears while the run works is caught when linking
    appear_during(monkeypatch, "generate", lambda: late.symlink_to(tmp_path / "nowhere.png"))
    code, err = run(gen(weights, late), capsys)
    assert code == 2 and "appeared" in err
    assert os.readlink(late) == str(tmp_path / "nowhere.png") and not (tmp_path / "nowhere.png").exists()
    monkeypatch.undo()
    assert run(gen(weights, out, "--overwrite"), capsys)[0] == 0  # replaced on request: the link, not its target
    assert not out.is_symlink() and Image.open(out).size == (32, 32)
    assert not (tmp_path / "nowhere.png").exists()
    assert listing(tmp_path) == ["cat.png", "late.png"]


# ----------------------------------------------------------------------- class 5: all outputs or none

def test_batch_is_all_or_nothing_when_a_later_image_fails(weights, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cat.png"
    appear_during(monkeypatch, "generate", lambda: (tmp_path / "cat-1.png").mkdir())
    code, err = run(gen(weights, out, "--batch", 2), capsys)
    assert code == 2 and "cat-1.png" in err, err
    assert listing(tmp_path) == ["cat-1.png"]  # image 0 was taken back; the folder that blocked image 1 stays


def test_fuse_is_all_or_nothing_when_masks_fail(weights, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    appear_during(monkeypatch, "fuse", lambda: (out / "masks.png").mkdir())
    code, err = run(fuse_argv(weights, out), capsys)
    assert code == 2 and "masks.png" in err, err
    assert listing(out) == ["masks.png"]  # no fused.png, general.png or expert.png


def test_fuse_into_a_new_folder_leaves_no_folder_when_it_fails(weights, tmp_path, capsys, monkeypatch):
    out = tmp_path / "new" / "run"
    real = outputs._write_temp
    calls = []

    def full_disk(path, *args):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, *args)
    monkeypatch.setattr(outputs, "_write_temp", full_disk)
    code, err = run(fuse_argv(weights, out), capsys)
    assert code == 2 and "no space left" in err.lower(), err
    assert listing(tmp_path) == []  # neither images nor temporaries nor the folders made for them


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_saving_leaves_nothing(weights, tmp_path, capsys, monkeypatch, signum, code):
    real = outputs._write_temp
    calls = []

    def then_signal(*args):
        real(*args)
        calls.append(args[0])
        if len(calls) == 2:
            os.kill(os.getpid(), signum)  # delivered to this process's handler: SIGTERM's is main()'s
    monkeypatch.setattr(outputs, "_write_temp", then_signal)
    got = main(gen(weights, tmp_path / "cat.png", "--batch", 3))
    assert got == code
    assert len(calls) == 2 and listing(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is not outputs.raise_terminated  # main put the old handler back


def test_a_signal_while_linking_waits_until_the_outputs_are_consistent(weights, tmp_path, capsys, monkeypatch):
    real = outputs._publish
    calls = []

    def then_signal(*args):
        calls.append(args)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # held until every link is made (or taken back)
        return real(*args)
    monkeypatch.setattr(outputs, "_publish", then_signal)
    got = main(gen(weights, tmp_path / "cat.png", "--batch", 2))
    assert got == 143
    assert listing(tmp_path) in ([], ["cat-0.png", "cat-1.png"])


def test_temporary_names_are_unique_and_foreign_files_there_are_left_alone(weights, tmp_path, capsys):
    (tmp_path / ".cat.png.tmp").mkdir()  # the fixed temporary name an older version used
    (tmp_path / ".cat.png.tmp" / "theirs").write_bytes(b"x")
    assert run(gen(weights, tmp_path / "cat.png"), capsys)[0] == 0
    assert listing(tmp_path) == [".cat.png.tmp", "cat.png"]
    assert (tmp_path / "cat.png").stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------- class 8: text and paths that are not what they seem

def test_non_utf8_prompt_is_refused_before_loading(weights, tmp_path, capsys, monkeypatch):
    refuse_to_load(monkeypatch)
    bad = b"a caf\xe9".decode("utf-8", "surrogateescape")  # how Python hands over a Latin-1 argument
    for flag in ("--prompt", "--negative-prompt"):
        argv = gen(weights, tmp_path / "cat.png")
        argv[argv.index("--prompt")] = flag
        argv[argv.index(flag) + 1] = bad
        code, err = run(argv + (["--prompt", "a cat"] if flag != "--prompt" else []), capsys)
        assert code == 2 and flag in err and "UTF-8" in err, err
    assert listing(tmp_path) == []


def test_model_file_name_that_is_not_utf8_reaches_the_png(weights, tmp_path, capsys):
    odd = tmp_path / os.fsdecode(b"mod\xe8le.safetensors")
    shutil.copy(weights[0], odd)
    out = tmp_path / "cat.png"
    assert run(gen(weights, out, model=odd), capsys)[0] == 0
    with Image.open(out) as im:
        im.load()
        assert "Model: mod\ufffdle" in im.text["parameters"]


def test_output_name_that_is_not_utf8_works(weights, tmp_path, capsys):
    out = tmp_path / os.fsdecode(b"ch\xe2t.png")
    assert run(gen(weights, out, "--batch", 2), capsys)[0] == 0
    assert listing(tmp_path) == sorted(os.fsdecode(b"ch\xe2t-%d.png" % i) for i in range(2))


@pytest.mark.parametrize("flag", ["--out", "--model", "--tokenizer"])
def test_names_too_long_are_refused_before_loading(weights, tmp_path, capsys, monkeypatch, flag):
    refuse_to_load(monkeypatch)
    argv = gen(weights, tmp_path / "cat.png")
    argv[argv.index(flag) + 1] = str(tmp_path / ("x" * 296 + ".png"))
    code, err = run(argv, capsys)
    assert code == 2 and flag in err and "300 bytes" in err, err


def test_the_longest_allowed_name_works_and_its_numbered_siblings_are_checked(weights, tmp_path, capsys,
                                                                            monkeypatch):
    out = tmp_path / ("x" * 251 + ".png")  # 255 bytes: the most a name can have; temporaries are shorter
    assert run(gen(weights, out), capsys)[0] == 0
    assert listing(tmp_path) == [out.name]
    refuse_to_load(monkeypatch)
    code, err = run(gen(weights, tmp_path / ("y" * 251 + ".png"), "--batch", 2), capsys)  # y...-0.png: 257 bytes
    assert code == 2 and "257 bytes" in err, err


# ------------------------------------------------------------------------------- class 9: the right culprit

def test_ema_on_a_file_without_ema_weights_says_so(weights, tmp_path, capsys):
    sd = random_state_dict("tiny", 3)
    for name, extra in (("plain", {}), ("counters", {"model_ema.decay": torch.tensor(0.999),
                                                      "model_ema.num_updates": torch.tensor(7)})):
        path = tmp_path / f"{name}.safetensors"
        save_file({**sd, **extra}, str(path))
        code, err = run(gen(weights, tmp_path / "cat.png", "--ema", model=path), capsys)
        assert code == 2 and "no EMA UNet weights" in err and "--ema" in err, err
        assert "the the" not in err and "damaged" not in err


def test_fifos_and_devices_are_named_as_such(weights, tmp_path, capsys):
    os.mkfifo(tmp_path / "pipe.safetensors")
    os.mkfifo(tmp_path / "pipe.pt")
    (tmp_path / "zero.ckpt").symlink_to("/dev/zero")
    tok = tmp_path / "tok"
    shutil.copytree(weights[2], tok)
    (tok / "vocab.json").unlink()
    os.mkfifo(tok / "vocab.json")
    with deadline(60):
        for argv, words in ((gen(weights, tmp_path / "a.png", model=tmp_path / "pipe.safetensors"), ["FIFO"]),
                            (gen(weights, tmp_path / "a.png", model=tmp_path / "zero.ckpt"), ["character device"]),
                            (gen(weights, tmp_path / "a.png", "--tokenizer", tok), ["vocab.json", "FIFO"]),
                            (gen(weights, tmp_path / "a.png", "--embedding", tmp_path / "pipe.pt"),
                             ["embedding", "pipe.pt", "FIFO"])):
            code, err = run(argv, capsys)
            assert code == 2 and "no such file" not in err, err
            for word in words:
                assert word in err, err
    assert not (tmp_path / "a.png").exists()
