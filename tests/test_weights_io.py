"""Tests for magicfusion.weights_io: round trips, lazy reads, hostile pickles and corrupt files."""

import json
import os
import pickle
import sys
import types
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from magicfusion import weights_io
from magicfusion.errors import InputError
from magicfusion.weights_io import read_tensors


def _state_dict():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(2, 3, generator=g).half(),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "i64": torch.randint(-1000, 1000, (3, 2), generator=g),
        "strided": base[:, ::2].t(),  # non-contiguous view with an offset-free odd stride
        "shared_a": base[1],  # these two share `base`'s storage, at different offsets
        "shared_b": base[2:, 1:],
        "scalar": torch.tensor(2.5),
    }


def _assert_same(out, expected):
    assert sorted(out) == sorted(expected)
    for k, v in expected.items():
        assert out[k].dtype == v.dtype, k
        assert torch.equal(out[k], v), k


def _save_ckpt(path, sd, **extra):
    torch.save({"state_dict": sd, "global_step": 3, "callbacks": {"ModelCheckpoint": {"best": 0.5}}, **extra},
               path)


def test_safetensors_round_trip_and_keep(tmp_path):
    sd = {k: v.clone(memory_format=torch.contiguous_format) for k, v in _state_dict().items()}
    save_file(sd, tmp_path / "m.safetensors")
    _assert_same(read_tensors(tmp_path / "m.safetensors"), sd)
    kept = read_tensors(tmp_path / "m.safetensors", keep=lambda k: k.startswith("f"))
    _assert_same(kept, {k: sd[k] for k in ("f32", "f16")})


def test_ckpt_round_trip_keeps_views_and_sharing(tmp_path):
    sd = _state_dict()
    for suffix in (".ckpt", ".pt", ".pth", ".bin"):
        _save_ckpt(tmp_path / f"m{suffix}", sd)
        out = read_tensors(tmp_path / f"m{suffix}")
        _assert_same(out, sd)
    assert out["strided"].stride() == sd["strided"].stride()
    assert out["shared_a"].untyped_storage().data_ptr() == out["shared_b"].untyped_storage().data_ptr()
    out["shared_a"][0] = 100.0  # writable, and a write shows through the shared storage as in torch
    assert out["strided"][0, 1] == 100.0  # strided[i, j] is base[j, 2i]


def test_module_state_dict_parameters_and_float8(tmp_path):
    sd = torch.nn.Linear(3, 2).state_dict()  # an OrderedDict carrying a `_metadata` attribute
    sd.update(p=torch.nn.Parameter(torch.randn(2)), f8=torch.randn(4).to(torch.float8_e4m3fn), meta="not a tensor")
    torch.save(sd, tmp_path / "m.pt")  # float8 goes through _rebuild_tensor_v3 and an UntypedStorage
    out = read_tensors(tmp_path / "m.pt")
    _assert_same(out, {k: v.detach() for k, v in sd.items() if k != "meta"})
    assert not out["p"].requires_grad and type(out["p"]) is torch.Tensor


def test_keep_reads_only_kept_storages(tmp_path, monkeypatch):
    sd = _state_dict()
    _save_ckpt(tmp_path / "m.ckpt", sd)
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, name, *a, **k: opened.append(name)
                        or real_open(self, name, *a, **k))
    out = read_tensors(tmp_path / "m.ckpt", keep=lambda k: k in ("f16", "shared_a", "shared_b"))
    _assert_same(out, {k: sd[k] for k in ("f16", "shared_a", "shared_b")})
    data_reads = [n for n in opened if "/data/" in n]
    assert len(data_reads) == 2, opened  # f16's storage, and `base` once for both views into it
    assert len(set(data_reads)) == 2
    opened.clear()
    assert read_tensors(tmp_path / "m.ckpt", keep=lambda k: False) == {}
    assert [n for n in opened if "/data/" in n] == []


def _fake_lightning_module():
    """A module that exists only while saving, as Lightning's would be absent when loading."""
    mod = types.ModuleType("mf_fake_lightning")

    class Checkpointer:
        def __init__(self):
            self.best_k = {"epoch=1": torch.tensor(0.1)}
            self.dirpath = "/logs"

    class AttributeDict(dict):
        pass

    for cls in (Checkpointer, AttributeDict):
        cls.__module__, cls.__qualname__ = mod.__name__, cls.__name__
        setattr(mod, cls.__name__, cls)
    return mod


def test_foreign_objects_come_through_inert_and_nothing_is_imported(tmp_path):
    mod = _fake_lightning_module()
    sys.modules[mod.__name__] = mod
    try:
        hp = mod.AttributeDict(lr=1e-4, layers=[1, 2])
        _save_ckpt(tmp_path / "m.ckpt", _state_dict(), hyper_parameters=hp,
                   loops={mod.Checkpointer: mod.Checkpointer(), "list": [mod.Checkpointer()]},
                   numpy=[np.float64(0.25), np.dtype("float32"), np.arange(3)])
    finally:
        del sys.modules[mod.__name__]
    with pytest.raises(ModuleNotFoundError):  # an ordinary unpickler would have to import it
        torch.load(tmp_path / "m.ckpt", weights_only=False)
    _assert_same(read_tensors(tmp_path / "m.ckpt"), _state_dict())
    assert mod.__name__ not in sys.modules
    with zipfile.ZipFile(tmp_path / "m.ckpt") as zf:
        top = weights_io._unpickle(zf, zf.namelist()[0].split("/")[0] + "/")
    assert type(top["hyper_parameters"]).dotted == "mf_fake_lightning.AttributeDict"
    (key, cb), = [(k, v) for k, v in top["loops"].items() if k != "list"]
    assert key.dotted == type(cb).dotted == "mf_fake_lightning.Checkpointer"
    assert not hasattr(cb, "best_k")  # BUILD state was dropped
    assert [type(x).dotted for x in top["numpy"]] == ["builtins.object"] * 3  # inert stand-ins


class _Raw:
    """Pickle opcodes written verbatim in place of this object: how a hostile file is made."""

    def __init__(self, ops: bytes):
        self.ops = ops


class _RawPickler(pickle._Pickler):
    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _Raw):
            self.write(obj.ops)
        else:
            super().save(obj, save_persistent_id)


def _save_hostile(path, ops: bytes):
    raw_pickle = types.ModuleType("raw_pickle")
    raw_pickle.Pickler = _RawPickler
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": _Raw(ops)}, path, pickle_module=raw_pickle)


@pytest.mark.parametrize("module,name,cmd", [
    ("os", "system", "touch {p}"),
    ("posix", "system", "touch {p}"),
    ("builtins", "exec", "open('{p}', 'w')"),
    ("builtins", "eval", "open('{p}', 'w')"),
    ("__builtin__", "eval", "open('{p}', 'w')"),
    ("subprocess", "Popen", "touch {p}"),
])
def test_reduce_on_foreign_global_is_refused(tmp_path, module, name, cmd):
    pwned = tmp_path / "pwned"
    ops = f"c{module}\n{name}\n(V{cmd.format(p=pwned)}\ntR".encode()
    _save_hostile(tmp_path / "evil.ckpt", ops)
    with pytest.raises(InputError) as e:
        read_tensors(tmp_path / "evil.ckpt")
    shown = {"__builtin__": "builtins"}.get(module, module)
    assert f"refusing to call {shown}.{name}" in str(e.value)
    assert "\n" not in str(e.value)
    assert not pwned.exists()


def test_pickle_built_for_plain_unpickler_really_would_run(tmp_path):
    """Control for the test above: the same file does run its payload under torch.load(weights_only=False)."""
    pwned = tmp_path / "pwned"
    _save_hostile(tmp_path / "evil.ckpt", f"cbuiltins\nexec\n(Vopen('{pwned}', 'w')\ntR".encode())
    torch.load(tmp_path / "evil.ckpt", weights_only=False)
    assert pwned.exists()


def test_newobj_on_foreign_globals_imports_and_runs_nothing(tmp_path):
    pwned = tmp_path / "pwned"
    ops = (f"csubprocess\nPopen\n(Vtouch {pwned}\nt\x81}}(Vargs\nVtouch {pwned}\nub"  # NEWOBJ, then BUILD
           f"cmf_never_imported\nPayload\n)\x81(K\x01K\x02e(Vk\nK\x01u"  # NEWOBJ, APPENDS, SETITEMS
           f"cos\nsystem\n(Vtouch {pwned}\nt\x81\x87").encode("latin-1")  # NEWOBJ on a function; TUPLE3
    _save_hostile(tmp_path / "evil.ckpt", ops)
    modules = set(sys.modules)
    _assert_same(read_tensors(tmp_path / "evil.ckpt"), {"w": torch.ones(2)})
    assert not pwned.exists()
    assert "mf_never_imported" not in sys.modules and set(sys.modules) == modules
    with zipfile.ZipFile(tmp_path / "evil.ckpt") as zf:
        payload = weights_io._unpickle(zf, "evil/")["payload"]
    assert [type(p).dotted for p in payload] == ["subprocess.Popen", "mf_never_imported.Payload", "os.system"]


def _st_file(path, header, data=b"", header_len=None):
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    n = len(raw) if header_len is None else header_len
    path.write_bytes(n.to_bytes(8, "little") + raw + data)
    return path


def _good_header():
    return {"__metadata__": {"format": "pt"}, "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}


def _bad_files(tmp_path):
    """name -> (file, a word the message must contain)"""
    p = tmp_path
    (p / "empty.safetensors").write_bytes(b"")
    (p / "random.safetensors").write_bytes(os.urandom(4096))
    (p / "short.safetensors").write_bytes(b"\x01\x02\x03")
    (p / "random.ckpt").write_bytes(os.urandom(4096))
    torch.save({"w": torch.ones(100, 100)}, p / "full.ckpt")
    whole = (p / "full.ckpt").read_bytes()
    (p / "half.ckpt").write_bytes(whole[: len(whole) // 2])
    torch.save({"w": torch.ones(3)}, p / "legacy.pt", _use_new_zipfile_serialization=False)
    with zipfile.ZipFile(p / "corrupt_pickle.ckpt", "w") as zf:
        zf.writestr("a/data.pkl", pickle.dumps({"state_dict": {}})[:-5])
    with zipfile.ZipFile(p / "no_pkl.pt", "w") as zf:
        zf.writestr("a/other", b"x")
    (p / "m.onnx").write_bytes(b"x")
    bad_dtype = _good_header()
    bad_dtype["w"]["dtype"] = "Q9"
    bad_span = _good_header()
    bad_span["w"]["data_offsets"] = [0, 12]
    return {
        "missing": (p / "missing.safetensors", "no such file"),
        "empty": (p / "empty.safetensors", "empty"),
        "random_st": (p / "random.safetensors", "header"),
        "too_short": (p / "short.safetensors", "too short"),
        "header_longer_than_file": (_st_file(p / "long.safetensors", _good_header(), b"\0" * 16, 10**6),
                                    "header length 1000000"),
        "zero_header": (_st_file(p / "zero.safetensors", b"", header_len=0), "header length 0"),
        "header_not_json": (_st_file(p / "nojson.safetensors", b"{not json", b"\0" * 16), "JSON"),
        "header_not_object": (_st_file(p / "list.safetensors", [1, 2], b""), "JSON object"),
        "truncated_data": (_st_file(p / "trunc.safetensors", _good_header(), b"\0" * 10),
                           "header says 16 bytes of data, file has 10"),
        "unknown_dtype": (_st_file(p / "dtype.safetensors", bad_dtype, b"\0" * 16), "unknown dtype 'Q9'"),
        "offsets_mismatch": (_st_file(p / "span.safetensors", bad_span, b"\0" * 16), "data_offsets"),
        "truncated_ckpt": (p / "half.ckpt", "zip archive is truncated"),
        "random_ckpt": (p / "random.ckpt", "unsupported format"),
        "legacy_torch": (p / "legacy.pt", "torch>=1.6"),
        "corrupt_pickle": (p / "corrupt_pickle.ckpt", "UnpicklingError"),
        "zip_without_pickle": (p / "no_pkl.pt", "data.pkl"),
        "unknown_suffix": (p / "m.onnx", ".safetensors"),
    }


def test_bad_files_raise_one_line_input_errors(tmp_path):
    for name, (path, word) in _bad_files(tmp_path).items():
        with pytest.raises(InputError) as e:
            read_tensors(path)
        msg = str(e.value)
        assert "\n" not in msg, (name, msg)
        assert str(path) in msg and word in msg, (name, msg)
        assert e.value.__cause__ is None and (e.value.__context__ is None or e.value.__suppress_context__), name
