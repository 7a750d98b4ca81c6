"""Read tensors from checkpoint files without trusting them, and without reading what is not needed.

`read_tensors(path, keep)` returns the tensors whose key passes `keep`, in the dtype stored in the file;
with `nested=True` also those one dict down in a torch file, keyed `outer.inner` (textual-inversion files).

* `.safetensors`: the header is checked against the file (lengths, dtypes, shapes, offsets), then each kept
  tensor's bytes, and only those, are read. Format: https://github.com/huggingface/safetensors
* `.ckpt` / `.pt` / `.pth` / `.bin`: torch's zip format (torch.save since 1.6: `<archive>/data.pkl` plus one
  member `<archive>/data/<key>` per storage). `data.pkl` is first walked opcode by opcode without running it
  (`_scan_pickle`: nesting depth, memo indices and the memory it would take are bounded, so no pickle can
  send Python's C code into unbounded recursion or allocation), then read by a restricted unpickler that
  imports nothing and calls only the few functions in `_CALLS`, which build lazy records; any other global
  becomes an inert placeholder, asking to call one is refused, and BUILD (setting an object's state) works
  only on those placeholders, which drop it. Storage bytes are read only for kept tensors, and only as many
  as those tensors reach, after every tensor's extent was checked against the size of its storage.

What a file cannot do here: run code, import a module, change the loader's functions, make the reader hold
much more memory than the tensors it asked for need, or make it recurse without bound. Every problem raises
`InputError` with a one-line message naming the file, the problem and the fix.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import pickletools
import zipfile
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from .errors import InputError
from .paths import os_problem, regular_file, shown

SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
MAX_HEADER = 16 * 2 ** 20  # JSON header bytes (SD 1.x: ~150 kB; the safetensors package allows 100 MB, whose
                          # parsed objects could take 1-2 GB)
MAX_DIM = 2 ** 40         # no dimension of a real tensor comes near this; larger ones overflow size arithmetic
MAX_RANK = 16

# safetensors dtype name -> torch dtype
_ST_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E5M2": torch.float8_e5m2,
              "F8_E4M3": torch.float8_e4m3fn, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
              "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
              "I64": torch.int64, "U64": torch.uint64, "F64": torch.float64}
_ST_ITEMSIZE = {k: v.itemsize for k, v in _ST_DTYPES.items()}


def read_tensors(path, keep: Callable[[str], bool] = lambda k: True, *, nested: bool = False
                 ) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint at `path` whose flat key satisfies `keep`; the others are never read.

    nested: a torch file's top-level dicts of tensors count too, their tensors keyed `outer.inner` (AUTOMATIC1111's
    textual-inversion `.pt` keeps its vectors as `string_to_param: {"*": tensor}`); a top-level key of the same
    name wins. Safetensors files are flat, so it changes nothing for them."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"{shown(path)}: unsupported checkpoint type {suffix or '(no suffix)'!r}; "
                         f"use one of {', '.join(SUFFIXES)}")
    if regular_file(path, "checkpoint") == 0:
        raise InputError(f"{shown(path)}: file is empty; re-download it")
    try:
        return _read_safetensors(path, keep) if suffix == ".safetensors" else _read_torch_zip(path, keep, nested)
    except InputError as e:
        raise InputError(f"{shown(path)}: {e}") from None
    except OSError as e:
        raise InputError(f"{shown(path)}: cannot read it ({os_problem(e)}); check the file and its permissions") \
            from None
    except Exception as e:  # pickle, zip, json and torch all raise their own types
        detail = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise InputError(f"{shown(path)}: file is corrupt or truncated ({detail}); re-download it") from None


# ---------------------------------------------------------------------------------------------- safetensors

def _read_safetensors(path: Path, keep) -> dict[str, torch.Tensor]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"file is too short to be safetensors ({size} bytes); re-download it")
        n = int.from_bytes(head, "little")
        if not 0 < n <= min(MAX_HEADER, size - 8):
            raise InputError(f"safetensors header length {n} is impossible for a file of {size} bytes; "
                             "the file is corrupt or not safetensors, re-download it")
        raw = f.read(n)
        if raw[:1] != b"{":
            raise InputError("safetensors header is not a JSON object; the file is corrupt, re-download it")
        try:
            header = json.loads(raw)
        except (ValueError, RecursionError):  # ValueError includes UnicodeDecodeError
            raise InputError("safetensors header is not valid JSON; the file is corrupt, re-download it") from None
        del raw
        if not isinstance(header, dict):
            raise InputError("safetensors header is not a JSON object; the file is corrupt, re-download it")
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        data_end = 0
        for key, e in entries.items():
            _check_entry(key, e)
            data_end = max(data_end, e["data_offsets"][1])
        if size - 8 - n < data_end:
            raise InputError(f"file is truncated (header says {data_end} bytes of data, file has "
                             f"{size - 8 - n}); re-download it")
        out = {}
        for key, e in entries.items():
            if keep(key):
                begin, end = e["data_offsets"]
                f.seek(8 + n + begin)
                buf = bytearray(end - begin)  # bytearray: writable, so torch.frombuffer does not warn
                if f.readinto(buf) != len(buf):
                    raise InputError(f"file is truncated inside tensor {key!r}; re-download it")
                flat = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
                out[key] = flat.view(_ST_DTYPES[e["dtype"]]).reshape(e["shape"])
        return out


def _check_entry(key: str, e) -> None:
    def is_ints(v, n=None, top=None):
        return (isinstance(v, list) and (n is None or len(v) == n)
                and all(type(i) is int and 0 <= i and (top is None or i <= top) for i in v))

    bad = "corrupt safetensors header"
    if not isinstance(e, dict) or not is_ints(e.get("shape"), top=MAX_DIM) or len(e["shape"]) > MAX_RANK \
            or not is_ints(e.get("data_offsets"), 2):
        raise InputError(f"{bad}: tensor {key!r} lacks a valid shape or data_offsets (at most {MAX_RANK} "
                         f"dimensions of at most {MAX_DIM}); re-download the file")
    if e.get("dtype") not in _ST_ITEMSIZE:
        raise InputError(f"{bad}: tensor {key!r} has unknown dtype {str(e.get('dtype'))[:20]!r}; re-download or "
                         "re-export the file")
    begin, end = e["data_offsets"]
    if begin > end or end - begin != math.prod(e["shape"]) * _ST_ITEMSIZE[e["dtype"]]:
        raise InputError(f"{bad}: tensor {key!r} has data_offsets {[begin, end]} that do not fit its "
                         f"shape {e['shape']} and dtype {e['dtype']}; re-download the file")


# ---------------------------------------------------------------------------------------------- pickle scan

MAX_NESTING = 100                 # containers inside containers; a real checkpoint nests about 10 deep
MAX_PICKLE = 256 * 2 ** 20        # data.pkl, bytes, at most; and at most this much for a checkpoint's size:
PICKLE_BASE, PICKLE_PER_MEMBER = 4 * 2 ** 20, 16 * 2 ** 10  # a tensor takes ~200 bytes of pickle
MAX_MEMBERS = 200_000             # zip entries (a real checkpoint has one per storage, ~1,000-10,000)
MAX_INFLATE = 20                  # a deflated storage may grow this much (float weights barely compress)


class _Node:
    """What the scan knows of one value on the pickle's stack: how deeply it nests containers, and which
    containers hold it (so that growing it later, by APPEND or SETITEM through the memo, deepens them too)."""
    __slots__ = ("depth", "parents", "grows")

    def __init__(self, depth: int, grows: bool):
        self.depth, self.parents, self.grows = depth, None, grows


class _Scan:
    """Walk a pickle's opcodes without running them (pickletools.genops) and refuse it before Python's
    unpickler sees it when it would nest containers more than MAX_NESTING deep (hashing a deeply nested
    tuple recurses in C and kills the process), would take more than `budget` bytes of objects, or names
    memo slots far beyond those it filled (the C unpickler sizes its memo to the largest index)."""

    _LEAF = _Node(0, False)  # numbers, strings, globals, persistent ids: contain nothing
    _PUSH = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING",
             "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "UNICODE",
             "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "NONE", "NEWTRUE", "NEWFALSE", "FLOAT", "BINFLOAT",
             "GLOBAL", "PERSID", "EXT1", "EXT2", "EXT4", "NEXT_BUFFER"}

    def __init__(self, budget: int):
        self.stack: list = []
        self.marks: list = []
        self.memo: dict = {}
        self.cost, self.budget, self.work = 0, budget, 0

    def pop_mark(self) -> list:
        items, self.stack = self.stack, self.marks.pop()
        return items

    def charge(self, nbytes: int) -> None:
        self.cost += nbytes
        if self.cost > self.budget:
            raise InputError(f"data.pkl would build more than {self.budget >> 20} MB of objects, far more "
                             "than a checkpoint's records of its tensors; the file is hostile or corrupt")

    def deepen(self, node: _Node, depth: int) -> None:
        todo = [(node, depth)]
        while todo:
            n, d = todo.pop()
            if d <= n.depth:
                continue
            if d > MAX_NESTING:
                raise InputError(f"data.pkl nests containers more than {MAX_NESTING} levels deep (or in a "
                                 "cycle); a checkpoint never does, the file is hostile or corrupt")
            n.depth = d
            if n.parents:
                self.work += len(n.parents)
                if self.work > self.budget // 64:
                    raise InputError("data.pkl keeps regrowing shared containers; the file is hostile or corrupt")
                todo.extend((p, d + 1) for p in n.parents)

    def link(self, parent: _Node, children: list) -> None:
        """`children` go into `parent`: its depth covers theirs, and it grows when they do."""
        self.charge(16 * len(children))
        for c in children:
            if c.grows:
                if c.parents is None:
                    c.parents = []
                c.parents.append(parent)
                parent.grows = True
        self.deepen(parent, 1 + max((c.depth for c in children), default=0))

    def new(self, children: list, grows: bool = False) -> _Node:
        self.charge(72 + 8 * len(children))
        node = _Node(1, grows)
        self.link(node, children)
        self.stack.append(node)
        return node

    @staticmethod
    def size_of(arg) -> int:
        """Bytes a pushed scalar takes: a stack slot for the shared small ints and singletons, else an object."""
        if arg is None or isinstance(arg, bool) or (isinstance(arg, int) and -5 <= arg <= 256):
            return 8
        return 56 + len(arg) if isinstance(arg, (str, bytes, bytearray)) else 40

    def run(self, data: bytes) -> None:
        for op, arg, pos in pickletools.genops(data):
            name = op.name
            if name in self._PUSH:
                self.charge(self.size_of(arg))
                self.stack.append(self._LEAF)
            elif name in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET"):
                self.new([], grows=True)
            elif name == "EMPTY_TUPLE":
                self.new([])
            elif name == "MARK":
                self.marks.append(self.stack)
                self.stack = []
            elif name in ("TUPLE", "FROZENSET"):
                self.new(self.pop_mark())
            elif name in ("LIST", "DICT", "OBJ", "INST"):
                self.new(self.pop_mark(), grows=True)
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                k = int(name[-1])
                if len(self.stack) < k:
                    raise IndexError("a tuple of more items than the stack holds")
                items = self.stack[-k:]
                del self.stack[-k:]
                self.new(items)
            elif name in ("REDUCE", "NEWOBJ"):
                args, func = self.stack.pop(), self.stack.pop()
                self.new([func, args], grows=True)
            elif name == "NEWOBJ_EX":
                kwargs, args, cls = self.stack.pop(), self.stack.pop(), self.stack.pop()
                self.new([cls, args, kwargs], grows=True)
            elif name == "STACK_GLOBAL":
                self.stack.pop(), self.stack.pop()
                self.stack.append(self._LEAF)
            elif name == "BINPERSID":
                self.stack[-1] = self._LEAF
            elif name == "APPEND":
                item = self.stack.pop()
                self.link(self.stack[-1], [item])
            elif name == "SETITEM":
                value, key = self.stack.pop(), self.stack.pop()
                self.link(self.stack[-1], [key, value])
            elif name in ("APPENDS", "SETITEMS", "ADDITEMS"):
                items = self.pop_mark()
                self.link(self.stack[-1], items)
            elif name == "BUILD":  # the state is dropped (placeholders keep none) or the BUILD is refused
                self.stack.pop()
                if not self.stack:
                    raise IndexError("BUILD without an object")
            elif name == "POP":
                if self.stack:
                    self.stack.pop()
                else:
                    self.pop_mark()
            elif name == "POP_MARK":
                self.pop_mark()
            elif name == "DUP":
                self.charge(8)
                self.stack.append(self.stack[-1])
            elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                index = len(self.memo) if name == "MEMOIZE" else arg
                if not 0 <= index <= 2 * len(self.memo) + 1024:
                    raise InputError(f"data.pkl stores into memo slot {index} after filling {len(self.memo)}; "
                                     "the file is hostile or corrupt")
                self.charge(32)
                self.memo[index] = self.stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                self.charge(8)
                self.stack.append(self.memo[arg])
            elif name == "STOP":
                return
            elif name not in ("PROTO", "FRAME", "READONLY_BUFFER"):
                raise InputError(f"data.pkl uses the opcode {name}, which no checkpoint needs; the file is "
                                 "hostile or corrupt")


def _scan_pickle(data: bytes) -> None:
    try:
        _Scan(min(2 ** 30, 16 * 2 ** 20 + 32 * len(data))).run(data)  # real checkpoints: ~10 bytes per byte
    except InputError:
        raise
    except (IndexError, KeyError):
        raise InputError("data.pkl is malformed (it uses values it never made); the file is corrupt, "
                         "re-download it") from None
    except ValueError as e:  # genops: an unknown opcode, a truncated argument, no STOP
        raise pickle.UnpicklingError(str(e)) from None


# ---------------------------------------------------------------------------------------------- torch zip

class _Storage(NamedTuple):  # a persistent id: which zip member holds the bytes, their element type and count
    key: str
    dtype: torch.dtype
    numel: int


class _Lazy(NamedTuple):  # a tensor not read yet
    storage: _Storage
    dtype: torch.dtype
    offset: int
    size: tuple
    stride: tuple


def _refuse(name) -> InputError:
    return InputError(f"refusing to call {name}: the checkpoint tries to run code when loaded; "
                      "do not use this file, or convert a trusted copy to safetensors")


class _Global(type):
    """Metaclass of the stand-ins for globals we do not import. Calling one (pickle's REDUCE) is refused;
    pickle's NEWOBJ goes through `__new__` instead and gets an inert object."""

    def __call__(cls, *args, **kwargs):
        raise _refuse(cls.dotted)


class _Inert(metaclass=_Global):
    """An object of a class that was not imported: takes pickled state and items, keeps none of them."""
    dotted = "builtins.object"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __setstate__(self, state):  # BUILD: the one kind of object BUILD may touch, and it keeps nothing
        pass

    def __setitem__(self, key, value):  # SETITEMS
        pass

    def append(self, item):  # APPENDS
        pass

    extend = append


class _Call:
    """An allowed global (one of `_CALLS`): a pickle may call it, nothing else. BUILD on it, which on a plain
    function would set its `__dict__`, `__defaults__` or `__code__`, is refused: a file cannot change the loader."""
    __slots__ = ("dotted", "fn")

    def __init__(self, dotted: str, fn):
        self.dotted, self.fn = dotted, fn

    def __call__(self, *args):
        return self.fn(*args)

    def __setstate__(self, state):
        raise InputError(f"data.pkl tries to set the state of {self.dotted}, a function of the loader; "
                         "the file is hostile, do not use it")


def _inert(*args, **kwargs):
    return _Inert.__new__(_Inert)


def _new_inert(cls, *args, **kwargs):  # copyreg.__newobj__ and copyreg._reconstructor
    return cls.__new__(cls) if isinstance(cls, _Global) else _inert()


class _Dict(dict):  # collections.OrderedDict; torch's state dicts carry a `_metadata` attribute: dropped
    def __setstate__(self, state):
        pass


def _ints(v, what: str) -> tuple:
    if not isinstance(v, (tuple, list)) or len(v) > MAX_RANK or not all(type(i) is int and 0 <= i <= MAX_DIM
                                                                         for i in v):
        raise InputError(f"a tensor in data.pkl has an invalid {what} (at most {MAX_RANK} integers in "
                         f"0..{MAX_DIM}); the file is corrupt, re-download it")
    return tuple(v)


def _rebuild_tensor_v2(storage, offset, size, stride, *unused):
    return _rebuild_tensor_v3(storage, offset, size, stride, None, None, getattr(storage, "dtype", None))


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *unused):
    if not isinstance(storage, _Storage) or not isinstance(dtype, torch.dtype):
        raise InputError("a tensor in data.pkl has no valid storage; the file is corrupt, re-download it")
    size, stride, (offset,) = _ints(size, "size"), _ints(stride, "stride"), _ints((offset,), "offset")
    if len(size) != len(stride):
        raise InputError("a tensor in data.pkl has sizes and strides of different lengths; the file is corrupt")
    return _Lazy(storage, dtype, offset, size, stride)


def _rebuild_parameter(data, *unused):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in _TENSOR_CALLS or not isinstance(args, tuple):
        raise _refuse(getattr(func, "dotted", type(func).__name__))
    return func(*args)


# The only globals a pickle may call; none imports or runs anything of the file's choosing.
_CALLS = {dotted: _Call(dotted, fn) for dotted, fn in {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "collections.OrderedDict": _Dict,
    "torch.Size": tuple,
    "copyreg._reconstructor": _new_inert,
    "copyreg.__newobj__": _new_inert,
    # numpy scalars, arrays and dtypes (Lightning's callback state), and the bytes they are built from: inert
    "numpy.core.multiarray.scalar": _inert,
    "numpy._core.multiarray.scalar": _inert,
    "numpy.core.multiarray._reconstruct": _inert,
    "numpy._core.multiarray._reconstruct": _inert,
    "numpy.dtype": _inert,
    "_codecs.encode": _inert,
}.items()}
_TENSOR_CALLS = [_CALLS[f"torch._utils.{n}"] for n in ("_rebuild_tensor_v2", "_rebuild_tensor_v3",
                                                        "_rebuild_parameter", "_rebuild_parameter_with_state")]
# Storage classes name the element type of a storage (untyped ones hold bytes); torch.<dtype> are dtypes.
_STORAGE_DTYPES = {f"torch.{name}Storage": dtype for name, dtype in [
    ("Double", torch.float64), ("Float", torch.float32), ("Half", torch.float16), ("BFloat16", torch.bfloat16),
    ("Long", torch.int64), ("Int", torch.int32), ("Short", torch.int16), ("Char", torch.int8),
    ("Byte", torch.uint8), ("Bool", torch.bool), ("ComplexFloat", torch.complex64),
    ("ComplexDouble", torch.complex128), ("Untyped", torch.uint8)]}
_STORAGE_DTYPES["torch.storage.UntypedStorage"] = torch.uint8
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}  # names in protocol-2 pickles


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):  # never imports
        module = _PY2_MODULES.get(module, module)
        dotted = f"{module}.{name}"
        if dotted in _CALLS:
            return _CALLS[dotted]
        if dotted in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[dotted]
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        return _Global(name, (_Inert,), {"dotted": dotted})

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], torch.dtype) and isinstance(pid[2], (str, int))
                and type(pid[4]) is int and 0 <= pid[4] <= MAX_DIM):
            raise InputError(f"unexpected persistent id {str(pid)[:60]!r} in data.pkl; the file is corrupt, "
                             "re-download it")
        return _Storage(str(pid[2]), pid[1], pid[4])


def _unpickle(zf: zipfile.ZipFile, prefix: str):
    """The object in `<prefix>data.pkl`, with tensors as `_Lazy` records and foreign objects inert."""
    info = zf.getinfo(prefix + "data.pkl")
    limit = min(MAX_PICKLE, PICKLE_BASE + PICKLE_PER_MEMBER * len(zf.infolist()))
    if info.file_size > limit:
        raise InputError(f"data.pkl declares {info.file_size} bytes, more than the {limit} that the records of "
                         f"{len(zf.infolist())} storages can need; the file is hostile or corrupt")
    with zf.open(info.filename) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InputError(f"data.pkl inflates past the {limit} bytes it may have; the file is hostile or corrupt")
    _scan_pickle(data)
    return _Unpickler(io.BytesIO(data), encoding="utf-8").load()


def _zip_entries(path: Path) -> int:
    """How many entries the zip's end record announces, read before zipfile builds an object per entry."""
    with open(path, "rb") as f:
        end = zipfile._EndRecData(f)
    return end[zipfile._ECD_ENTRIES_TOTAL] if end else -1


def _records(d: dict, prefix: str = "") -> dict[str, _Lazy]:
    """The tensor records among the values of `d` under string keys, keyed `prefix + key`."""
    return {prefix + k: v for k, v in d.items() if isinstance(k, str) and isinstance(v, _Lazy)}


def _read_torch_zip(path: Path, keep, nested: bool = False) -> dict[str, torch.Tensor]:
    entries = _zip_entries(path)
    if entries < 0:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"PK\x03\x04":
            raise InputError("zip archive is truncated or corrupt; re-download it")
        raise InputError("unsupported format: not a zip-format torch checkpoint (a legacy torch file, or not a "
                         "checkpoint at all); convert it to safetensors or re-save it with torch>=1.6")
    if entries > MAX_MEMBERS:
        raise InputError(f"zip archive announces {entries} entries, more than the {MAX_MEMBERS} a checkpoint "
                         "can need; the file is hostile or corrupt")
    with zipfile.ZipFile(path) as zf:
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkls:
            raise InputError("zip archive has no <archive>/data.pkl, so it is not a torch checkpoint; "
                             "convert it to safetensors or re-save it with torch.save")
        prefix = pkls[0][: -len("data.pkl")]
        top = _unpickle(zf, prefix)
        if not isinstance(top, dict):
            raise InputError(f"checkpoint holds a {type(top).__name__}, not a dict of tensors; "
                             "save a state_dict instead")
        flat = top["state_dict"] if isinstance(top.get("state_dict"), dict) else top
        lazy = _records(flat)
        if nested:
            for outer, inner in flat.items():
                if isinstance(outer, str) and isinstance(inner, dict):
                    lazy = _records(inner, outer + ".") | lazy
        if not lazy:
            shown_keys = [k if isinstance(k, str) else type(k).__name__ for k in list(top)[:8]]
            raise InputError(f"checkpoint has no tensors under its top-level keys {shown_keys}; "
                             "save a state_dict instead")
        return _materialise(zf, prefix, {k: v for k, v in lazy.items() if keep(k)}, path.stat().st_size)


def _reach(name: str, t: _Lazy) -> int:
    """Bytes of its storage that tensor `t` reaches; refused when it claims more elements than the storage
    holds (a stride-0 or overlapping view that a dtype cast or copy would blow up) or reaches past its end."""
    storage_bytes = t.storage.numel * t.storage.dtype.itemsize
    numel = math.prod(t.size)
    if numel * t.dtype.itemsize > storage_bytes:
        raise InputError(f"tensor {name!r} claims {numel} elements of {t.dtype} but its storage holds "
                         f"{storage_bytes} bytes (a stride-0 or overlapping view); re-save the checkpoint "
                         "with contiguous tensors")
    if numel == 0:
        return 0
    reach = (t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride)) + 1) * t.dtype.itemsize
    if reach > storage_bytes:
        raise InputError(f"tensor {name!r} reaches byte {reach} of a storage of {storage_bytes} bytes; "
                         "the file is corrupt, re-download it")
    return reach


def _materialise(zf: zipfile.ZipFile, prefix: str, lazy: dict[str, _Lazy], file_size: int) -> dict[str, torch.Tensor]:
    """Read each needed storage once, only as far as its tensors reach (tensors that shared one still do),
    and view the tensors into it. Every size is checked before a byte is read: together the members read
    cannot take more bytes from the file than it has (zip entries that overlap would), and deflated ones
    cannot inflate more than MAX_INFLATE times."""
    need: dict[str, int] = {}
    for name, t in lazy.items():
        need[t.storage.key] = max(need.get(t.storage.key, 0), _reach(name, t))
    members = {}
    inflated = compressed = from_file = 0
    for name, t in lazy.items():
        key = t.storage.key
        if key in members:
            continue
        try:
            info = members[key] = zf.getinfo(f"{prefix}data/{key}")
        except KeyError:
            raise InputError(f"the storage of tensor {name!r} (data/{key}) is missing from the archive; "
                             "the file is truncated or corrupt, re-download it") from None
        declared = t.storage.numel * t.storage.dtype.itemsize
        if info.file_size != declared:
            raise InputError(f"storage data/{key} holds {info.file_size} bytes but data.pkl says "
                             f"{declared}; the file is corrupt, re-download it")
        from_file += need[key] if info.compress_type == zipfile.ZIP_STORED else info.compress_size
        if from_file > file_size:
            raise InputError(f"the storages read would take {from_file} bytes from a file of {file_size} (zip "
                             "entries that overlap); the file is hostile or corrupt")
        if info.compress_type != zipfile.ZIP_STORED:
            inflated += need[key]
            compressed += info.compress_size
            if inflated > MAX_INFLATE * compressed + 2 ** 24:
                raise InputError(f"compressed storages inflate to {inflated} bytes from {compressed} (a zip "
                                 "bomb); torch.save never compresses, the file is hostile or corrupt")
    storages: dict[str, torch.Tensor] = {}
    out = {}
    for name, t in lazy.items():
        key = t.storage.key
        if key not in storages:
            raw = bytearray()
            if need[key]:
                with zf.open(members[key].filename) as f:
                    raw = bytearray(f.read(need[key]))  # bytearray: writable, so torch does not warn
                if len(raw) < need[key]:
                    raise InputError(f"storage data/{key} is truncated; re-download the file")
            storages[key] = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        if math.prod(t.size) == 0:
            out[name] = torch.empty(t.size, dtype=t.dtype)
            continue
        raw = storages[key]
        usable = raw[: raw.numel() // t.dtype.itemsize * t.dtype.itemsize]
        out[name] = usable.view(t.dtype).as_strided(t.size, t.stride, t.offset)
    return out
