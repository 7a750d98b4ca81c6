"""Hostile checkpoint files (issue 10, classes 1, 2 and 10): deep nesting that would crash Python's C code,
small files that would need gigabytes, and pickles that try to change the loader's own functions.

The files are built here, opcode by opcode or as hand-written zips (a 3 GB bomb is a few MB deflated). Every
load that a regression could turn into a crash or a memory blow-up runs in a child process whose address space
is capped (RLIMIT_AS), so a regression fails the test instead of taking the machine down.
"""
import collections
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import types
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from magicfusion import weights_io
from magicfusion.errors import InputError
from magicfusion.weights_io import read_tensors

ROOT = Path(__file__).resolve().parent.parent
CAP = 3 * 2 ** 30   # address space of the child: importing torch maps ~0.7 GB, so a load gets ~2 GB at most
GB = 2 ** 30


# ------------------------------------------------------------------------------------------ building files

class Storage:
    """Pickles as a persistent id: ('storage', torch.FloatStorage, key, 'cpu', numel), as torch.save writes."""

    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


class Tensor:
    """Pickles as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...), as torch.save writes."""

    def __init__(self, storage: Storage, offset: int, size: tuple, stride: tuple):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class Raw:
    """Pickle opcodes written verbatim where this object would be."""

    def __init__(self, ops: bytes):
        self.ops = ops


class Pickler(pickle._Pickler):
    def persistent_id(self, obj):
        return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel) if isinstance(obj, Storage) else None

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, Raw):
            self.write(obj.ops)
        else:
            super().save(obj, save_persistent_id)


def pickled(obj) -> bytes:
    import io
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def deflated_zeros(n_bytes: int) -> bytes:
    """A raw deflate stream that inflates to n_bytes zero bytes, made in milliseconds: one 16 MB block ends
    with a full flush (no reference reaches back past it), so the block can be repeated."""
    chunk = 16 * 2 ** 20
    assert n_bytes % chunk == 0
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(b"\0" * chunk) + c.flush(zlib.Z_FULL_FLUSH)
    return block * (n_bytes // chunk) + zlib.compressobj(9, zlib.DEFLATED, -15).flush()


def write_zip(path: Path, members: list) -> Path:
    """members: (name, data, method, size): data stored (method 0) or already deflated (8), `size` the size it
    declares. Written by hand so a member can declare what it likes; CRCs of deflated members are not computed
    (3 GB of zeros), which only a reader that inflates to the end would notice."""
    out, central = bytearray(), bytearray()
    for name, data, method, size in members:
        raw_name = name.encode()
        crc = zlib.crc32(data) if method == 0 else 0
        header = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(data), size,
                             len(raw_name), 0)
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, len(data), size,
                               len(raw_name), 0, 0, 0, 0, 0, len(out)) + raw_name
        out += header + raw_name + data
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(out), 0)
    path.write_bytes(bytes(out + central + end))
    return path


def ckpt(path: Path, top, storages: dict = None, pickle_bytes: bytes = None) -> Path:
    """A torch-zip checkpoint: data.pkl (from `top`) and {key: (data, method, size)} storage members."""
    data = pickle_bytes if pickle_bytes is not None else pickled(top)
    members = [("a/data.pkl", data, 0, len(data))]
    members += [(f"a/data/{k}", d, m, s) for k, (d, m, s) in (storages or {}).items()]
    return write_zip(path, members)


def floats(n: int) -> bytes:
    return torch.arange(n, dtype=torch.float32).numpy().tobytes()


def run_capped(files: list, expect_rss_below: int = int(1.5 * GB)) -> dict:
    """read_tensors on each file in a child with RLIMIT_AS = CAP -> {file name: (ok, message, {key: shape})}.
    Asserts the child neither crashed (a segfault is exit -11) nor grew past `expect_rss_below`."""
    script = textwrap.dedent(f"""
        import json, resource, sys
        resource.setrlimit(resource.RLIMIT_AS, ({CAP}, {CAP}))
        from magicfusion.weights_io import read_tensors
        from magicfusion.errors import InputError
        for name in sys.argv[1:]:
            try:
                out = {{k: list(v.shape) for k, v in read_tensors(name).items()}}
                print(json.dumps([name, True, "", out]), flush=True)
            except InputError as e:
                print(json.dumps([name, False, str(e), {{}}]), flush=True)
        print(json.dumps(["rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]))
    """)
    proc = subprocess.run([sys.executable, "-c", script, *map(str, files)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"child died with {proc.returncode}: {proc.stderr[-2000:]}"
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    rss = rows.pop()[1]
    assert rss < expect_rss_below, f"peak RSS {rss / GB:.2f} GB"
    return {Path(r[0]).name: tuple(r[1:]) for r in rows}


# -------------------------------------------------------------------------------- class 1: deep nesting

DEEP = 1_000_000


def nesting_payloads() -> dict:
    """name -> opcodes that build containers DEEP levels deep (and then hash, compare or keep them)."""
    def as_key(deep: bytes) -> bytes:  # {deep: None}: inserting the key hashes it, recursively in C
        return b"}" + deep + b"Ns"
    deep_tuple = b")" + b"\x85" * DEEP
    return {
        "tuple1-key": as_key(deep_tuple),                                          # (((),),) by TUPLE1
        "mark-tuple-key": as_key(b"(" * DEEP + b"t" * DEEP),                       # MARK ... TUPLE
        "tuple3-key": as_key(b"NNN\x87" + b"NN\x87" * (DEEP - 1)),                 # TUPLE3 chains
        "frozenset-key": as_key(b"(" + deep_tuple + b"\x91"),                      # a frozenset of a deep tuple
        "lists": b"(" * DEEP + b"l" * DEEP,                                        # MARK ... LIST
        "dicts": b"(N" * DEEP + b"}" + b"d" * DEEP,                                # {None: {None: ...}}
        "append-chain": b"]" * (DEEP + 1) + b"a" * DEEP,                           # [[[...]]] by APPEND
        "reduce-args": b"ccollections\nOrderedDict\n" + deep_tuple + b"\x85R",    # deep REDUCE arguments
    }


def _get(j: int) -> bytes:
    return b"h" + bytes([j]) if j < 256 else b"j" + struct.pack("<I", j)


def _put(j: int) -> bytes:
    return b"q" + bytes([j]) if j < 256 else b"r" + struct.pack("<I", j)


def memo_regrowth_ops(n: int) -> bytes:
    """n memoized lists, then list i appended into list i-1 from the outside in: each APPEND sees a child of
    depth 1, and only later growth of that child makes the chain n deep, so a scan must follow growth."""
    ops = b"".join(b"]" + _put(i) + b"0" for i in range(n))
    ops += b"".join(_get(i - 1) + _get(i) + b"a0" for i in range(1, n))
    return ops + _get(0)


def nesting_files(tmp: Path) -> list:
    files = []
    for name, ops in {**nesting_payloads(), "memo-regrowth": memo_regrowth_ops(300)}.items():
        top = {"state_dict": {"w": Tensor(Storage("0", 4), 0, (4,), (1,))}, "payload": Raw(ops)}
        files.append(ckpt(tmp / f"{name}.ckpt", None, {"0": (floats(4), 0, 16)}, pickle_bytes=pickled(top)))
    return files


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    """The hostile files of classes 1 and 2, all read in one capped child (starting one costs seconds)."""
    tmp = tmp_path_factory.mktemp("hostile")
    nesting, bombs = nesting_files(tmp), bomb_files(tmp)
    return nesting, bombs, run_capped(nesting + list(bombs.values()))


def test_deep_nesting_is_refused_before_c_code_recurses(capped):
    nesting, _, results = capped
    for path in nesting:
        ok, message, _ = results[path.name]
        assert not ok and "levels deep" in message, (path.name, message)
        assert "\n" not in message


def test_shallow_nesting_and_sharing_still_load(tmp_path):
    """Controls: nesting a real checkpoint uses (a dozen levels), shared and memoized containers, a cycle
    through an inert object, all load."""
    mod = types.ModuleType("mf_absent")

    class Obj:
        pass
    Obj.__module__, Obj.__qualname__ = mod.__name__, "Obj"
    sys.modules[mod.__name__] = mod
    mod.Obj = Obj
    try:
        shared = {"lr": [1e-4, (1, (2, (3,)))]}
        cyc = Obj()
        cyc.me = cyc
        nested = 0
        for _ in range(12):  # 36 levels: three times what a real checkpoint nests
            nested = (nested, {"k": [nested]})
        path = tmp_path / "ok.ckpt"
        torch.save({"state_dict": {"w": torch.ones(3)}, "a": shared, "b": shared, "cyc": cyc, "n": nested}, path)
    finally:
        del sys.modules[mod.__name__]
    assert torch.equal(read_tensors(path)["w"], torch.ones(3))


def test_pickle_scan_counts_depth_through_later_growth():
    data = pickled({"x": Raw(memo_regrowth_ops(120))})
    with pytest.raises(InputError, match="levels deep"):
        weights_io._scan_pickle(data)
    weights_io._scan_pickle(pickled({"x": Raw(memo_regrowth_ops(60))}))  # 60 deep is allowed


# ---------------------------------------------------------------------------- class 2: small files, big needs

def bomb_files(tmp_path: Path) -> dict:
    """name -> a checkpoint that would need gigabytes if read naively."""
    w = Tensor(Storage("0", 144), 0, (12, 12), (12, 1))  # 576 bytes
    sd = {"state_dict": {"w": w}}
    three_gb = deflated_zeros(3 * GB)
    small_view = {"state_dict": {"w": Tensor(Storage("0", 3 * GB // 4), 0, (12, 12), (12, 1))}}
    files = {
        # a storage that inflates to 3 GB (and says so) holding a tensor of 576 bytes: read 576 bytes, accept
        "big-storage-small-tensor.ckpt": ckpt(tmp_path / "big-storage-small-tensor.ckpt", small_view,
                                              {"0": (three_gb, 8, 3 * GB)}),
        # the member declared as data.pkl says (576 bytes) but inflating further: 576 read, then its CRC fails
        "lying-member.ckpt": ckpt(tmp_path / "lying-member.ckpt", sd, {"0": (three_gb, 8, 576)}),
        # a 3 GB tensor made of a 3 GB deflated storage: refused as a zip bomb before inflating
        "big-tensor.ckpt": ckpt(tmp_path / "big-tensor.ckpt",
                                {"state_dict": {"w": Tensor(Storage("0", 3 * GB // 4), 0, (3 * GB // 4,), (1,))}},
                                {"0": (three_gb, 8, 3 * GB)}),
        # data.pkl that inflates to 3 GB, declared
        "pickle-bomb.ckpt": write_zip(tmp_path / "pickle-bomb.ckpt", [("a/data.pkl", three_gb, 8, 3 * GB)]),
        # data.pkl declared small, inflating to 3 GB: read as far as declared, then found corrupt
        "pickle-bomb-lying.ckpt": write_zip(tmp_path / "pickle-bomb-lying.ckpt", [("a/data.pkl", three_gb, 8, 1000)]),
        # a stride-0 view of 768 floats claiming 2e7 rows (a cast would make it 61 GB)
        "stride0.ckpt": ckpt(tmp_path / "stride0.ckpt",
                             {"state_dict": {"w": Tensor(Storage("0", 768), 0, (20_000_000, 768), (0, 1))}},
                             {"0": (floats(768), 0, 768 * 4)}),
        # a storage member smaller than data.pkl says
        "short-member.ckpt": ckpt(tmp_path / "short-member.ckpt", sd, {"0": (floats(100), 0, 400)}),
        # a view reaching past its storage
        "past-end.ckpt": ckpt(tmp_path / "past-end.ckpt",
                              {"state_dict": {"w": Tensor(Storage("0", 144), 100, (12, 12), (12, 1))}},
                              {"0": (floats(144), 0, 576)}),
        # a memo index of 2**31: the C unpickler would size its memo to it (16 GB)
        "memo-index.ckpt": ckpt(tmp_path / "memo-index.ckpt", None, {"0": (floats(4), 0, 16)},
                                pickle_bytes=pickled({"state_dict": {"w": Tensor(Storage("0", 4), 0, (4,), (1,))},
                                                      "x": Raw(b"Nr\xff\xff\xff\x7f0")})),
        # a million empty lists from a 1 MB pickle: 72 MB of objects, far more than records of tensors take
        "list-bomb.ckpt": ckpt(tmp_path / "list-bomb.ckpt", None, {"0": (floats(4), 0, 16)},
                               pickle_bytes=pickled({"state_dict": {"w": Tensor(Storage("0", 4), 0, (4,), (1,))},
                                                     "x": Raw(b"(" + b"]" * 1_000_000 + b"l")})),
    }
    return files


def test_bombs_read_only_what_tensors_need(capped):
    _, _, results = capped
    ok, _, shapes = results["big-storage-small-tensor.ckpt"]
    assert ok and shapes == {"w": [12, 12]}
    expected = {"big-tensor.ckpt": "zip bomb", "pickle-bomb.ckpt": "data.pkl declares",
                "pickle-bomb-lying.ckpt": "corrupt", "lying-member.ckpt": "CRC", "stride0.ckpt": "stride-0",
                "short-member.ckpt": "holds 400 bytes", "past-end.ckpt": "reaches byte",
                "memo-index.ckpt": "memo slot", "list-bomb.ckpt": "MB of objects"}
    for name, word in expected.items():
        ok, message, _ = results[name]
        assert not ok and word in message, (name, message)


def test_stride0_view_saved_by_torch_is_refused(tmp_path):
    t = torch.zeros(768).as_strided((20_000_000, 768), (0, 1))
    torch.save({"state_dict": {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": t}},
               tmp_path / "s.ckpt")
    with pytest.raises(InputError, match="stride-0"):
        read_tensors(tmp_path / "s.ckpt")
    # control: the same storage viewed without repeating rows loads
    torch.save({"w": torch.zeros(768).as_strided((1, 768), (0, 1))}, tmp_path / "ok.ckpt")
    assert read_tensors(tmp_path / "ok.ckpt")["w"].shape == (1, 768)


def test_zip_with_too_many_entries_is_refused_before_parsing(tmp_path, monkeypatch):
    monkeypatch.setattr(weights_io, "MAX_MEMBERS", 100)  # the real bound (200,000) makes a 17 MB test file
    path = write_zip(tmp_path / "many.ckpt", [(f"a/data/{i}", b"", 0, 0) for i in range(101)])
    opened = []
    monkeypatch.setattr(zipfile.ZipFile, "__init__", lambda self, *a, **k: opened.append(a))
    with pytest.raises(InputError, match="101 entries"):
        read_tensors(path)
    assert opened == []  # refused from the end record, before zipfile made an object per entry


def test_safetensors_with_absurd_dimensions_is_refused(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [10 ** 15, 0, 3, 3], "data_offsets": [0, 0]}}
    raw = json.dumps(header).encode()
    (tmp_path / "dims.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)
    with pytest.raises(InputError, match="shape"):
        read_tensors(tmp_path / "dims.safetensors")


def test_safetensors_header_nested_deep_or_oversized_is_refused(tmp_path):
    deep = b'{"a":' * 1_000_000 + b"1" + b"}" * 1_000_000
    (tmp_path / "deep.safetensors").write_bytes(len(deep).to_bytes(8, "little") + deep)
    with pytest.raises(InputError, match="not valid JSON"):
        read_tensors(tmp_path / "deep.safetensors")
    big = b"{" + b" " * (weights_io.MAX_HEADER + 1) + b"}"
    (tmp_path / "big.safetensors").write_bytes(len(big).to_bytes(8, "little") + big)
    with pytest.raises(InputError, match="header length"):
        read_tensors(tmp_path / "big.safetensors")


def test_safetensors_reads_only_kept_tensors_and_any_file_name(tmp_path):
    name = os.fsdecode(b"m\xff\xfe.safetensors")  # not UTF-8: the Rust reader could not even open it
    save_file({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}, str(tmp_path / "x"))
    os.rename(tmp_path / "x", tmp_path / name)
    out = read_tensors(tmp_path / name, keep=lambda k: k == "a")
    assert list(out) == ["a"] and torch.equal(out["a"], torch.arange(6.0).reshape(2, 3))


# --------------------------------------------------------------------- class 10: BUILD on the loader's functions

BUILD_TARGETS = ["torch._utils\n_rebuild_parameter", "torch._utils\n_rebuild_tensor_v2",
                 "torch._tensor\n_rebuild_from_type_v2", "collections\nOrderedDict", "copyreg\n__newobj__",
                 "copyreg\n_reconstructor", "numpy\ndtype", "torch\nSize", "_codecs\nencode"]


@pytest.mark.parametrize("target", BUILD_TARGETS)
@pytest.mark.parametrize("state", [
    b"}(V__defaults__\nK\x01\x85V__kwdefaults__\nNu",           # BUILD with a dict: __dict__.update
    b"N}(V__defaults__\nK\x01\x85V__name__\nVowned\nu\x86",      # (None, slotstate): setattr per item
    b"N}V__code__\nctorch._utils\n_rebuild_parameter\ns\x86",    # swap in another function's code
], ids=["dict", "slots", "code"])
def test_build_on_allowed_globals_is_refused_and_changes_nothing(tmp_path, target, state):
    module, name = target.split("\n")
    before = {k: (v.fn, getattr(v.fn, "__defaults__", None), dict(getattr(v.fn, "__dict__", {})),
                  getattr(v.fn, "__code__", None), getattr(v.fn, "__name__", None))
              for k, v in weights_io._CALLS.items()}
    ops = f"c{module}\n{name}\n".encode() + state + b"b"
    path = ckpt(tmp_path / "build.ckpt", None, {"0": (floats(2), 0, 8)},
                pickle_bytes=pickled({"state_dict": {"w": Tensor(Storage("0", 2), 0, (2,), (1,))}, "x": Raw(ops)}))
    with pytest.raises(InputError, match="set the state"):
        read_tensors(path)
    after = {k: (v.fn, getattr(v.fn, "__defaults__", None), dict(getattr(v.fn, "__dict__", {})),
                 getattr(v.fn, "__code__", None), getattr(v.fn, "__name__", None))
             for k, v in weights_io._CALLS.items()}
    assert after == before
    torch.save({"w": torch.nn.Parameter(torch.ones(2))}, tmp_path / "fine.pt")  # the loader still works
    assert torch.equal(read_tensors(tmp_path / "fine.pt")["w"], torch.ones(2))


@pytest.mark.parametrize("target", ["torch\nfloat32", "torch\nFloatStorage", "torch.storage\nUntypedStorage"])
def test_build_on_torch_dtypes_changes_nothing(tmp_path, target):
    module, name = target.split("\n")
    ops = f"c{module}\n{name}\n".encode() + b"N}V__doc__\nVowned\ns\x86b"
    path = ckpt(tmp_path / "dtype.ckpt", None, {"0": (floats(2), 0, 8)},
                pickle_bytes=pickled({"state_dict": {"w": Tensor(Storage("0", 2), 0, (2,), (1,))}, "x": Raw(ops)}))
    with pytest.raises(InputError):
        read_tensors(path)
    assert torch.float32.__doc__ != "owned" and torch.float32.is_floating_point


def test_build_on_placeholders_is_dropped(tmp_path):
    ops = b"cmf_absent\nThing\n)\x81}(Vk\nK\x01ub"  # NEWOBJ of a foreign class, then BUILD: inert, state dropped
    path = ckpt(tmp_path / "inert.ckpt", None, {"0": (floats(2), 0, 8)},
                pickle_bytes=pickled({"state_dict": {"w": Tensor(Storage("0", 2), 0, (2,), (1,))}, "x": Raw(ops)}))
    assert torch.equal(read_tensors(path)["w"], torch.tensor([0.0, 1.0]))


def overlapping_zip(path: Path, n: int, payload: bytes) -> Path:
    """n stored storage members whose data each run to the end of the file, through the next member's header:
    the "overlapping files" zip bomb, n times the file's bytes from one copy of them."""
    names = [f"a/data/{k}ab".encode() for k in range(n)]  # 30 + 10 bytes of header: whole floats
    chain, sizes = payload, []
    for name in reversed(names):
        sizes.insert(0, len(chain))
        chain = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0x21, zlib.crc32(chain), len(chain), len(chain),
                            len(name), 0) + name + chain
    top = {"state_dict": {f"w{k}": Tensor(Storage(f"{k}ab", sizes[k] // 4), 0, (sizes[k] // 4,), (1,))
                          for k in range(n)}}
    pkl = pickled(top)
    head = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0x21, zlib.crc32(pkl), len(pkl), len(pkl), 10,
                       0) + b"a/data.pkl" + pkl
    body = head + chain
    entries = [(b"a/data.pkl", pkl, len(pkl), 0)]
    offset = len(head)
    for name, size in zip(names, sizes):
        entries.append((name, None, size, offset))
        offset += 30 + len(name)
    central = bytearray()
    for name, data, size, off in entries:
        crc = zlib.crc32(data if data is not None else body[off + 30 + len(name):off + 30 + len(name) + size])
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0x21, crc, size, size, len(name),
                               0, 0, 0, 0, 0, off) + name
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), len(body), 0)
    path.write_bytes(body + central + end)
    return path


def test_overlapping_zip_members_are_refused(tmp_path):
    path = overlapping_zip(tmp_path / "overlap.ckpt", 10, floats(100_000))
    with zipfile.ZipFile(path) as zf:  # the file is a valid zip: each member reads back, CRC and all
        assert len(zf.read("a/data/9ab")) == 400_000 and len(zf.read("a/data/0ab")) > 400_000
    with pytest.raises(InputError, match="overlap"):
        read_tensors(path)
    one = overlapping_zip(tmp_path / "one.ckpt", 1, floats(100_000))  # control: one member, no overlap
    assert torch.equal(read_tensors(one)["w0"], torch.arange(100_000, dtype=torch.float32))
