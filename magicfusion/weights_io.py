"""Read tensors from checkpoint files without trusting them, and without reading what is not needed.

`read_tensors(path, keep)` returns the tensors whose key passes `keep`, in the dtype stored in the file.

* `.safetensors`: the header is checked against the file (lengths, dtypes, shapes, offsets) before the
  `safetensors` package memory-maps the kept tensors. Format: https://github.com/huggingface/safetensors
* `.ckpt` / `.pt` / `.pth` / `.bin`: torch's zip format (torch.save since 1.6: `<archive>/data.pkl` plus one
  member `<archive>/data/<key>` per storage). `data.pkl` is read by a restricted unpickler that imports
  nothing and calls only the few functions in `_CALLS`, which build lazy records; any other global becomes an
  inert placeholder, and asking to call one is refused. Storage bytes are read only for kept tensors.

Every problem raises `InputError` with a one-line message naming the file, the problem and the fix.
"""

from __future__ import annotations

import json
import math
import pickle
import zipfile
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from safetensors import safe_open

from .errors import InputError

SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
MAX_HEADER = 100_000_000  # the safetensors package's own limit on the JSON header, in bytes

# safetensors dtype name -> bytes per element
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def read_tensors(path, keep: Callable[[str], bool] = lambda k: True) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint at `path` whose flat key satisfies `keep`; the others are never read."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"{path}: unsupported checkpoint type {suffix or '(no suffix)'!r}; "
                         f"use one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise InputError(f"{path}: no such file; check the path")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty; re-download it")
    try:
        return _read_safetensors(path, keep) if suffix == ".safetensors" else _read_torch_zip(path, keep)
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    except Exception as e:  # pickle, zip, json, safetensors and torch all raise their own types
        detail = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise InputError(f"{path}: file is corrupt or truncated ({detail}); re-download it") from None


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
        try:
            header = json.loads(f.read(n))
        except ValueError:  # includes UnicodeDecodeError
            raise InputError("safetensors header is not valid JSON; the file is corrupt, re-download it") from None
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
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in entries if keep(k)}


def _check_entry(key: str, e) -> None:
    def is_ints(v, n=None):
        return (isinstance(v, list) and (n is None or len(v) == n)
                and all(type(i) is int and i >= 0 for i in v))

    bad = "corrupt safetensors header"
    if not isinstance(e, dict) or not is_ints(e.get("shape")) or not is_ints(e.get("data_offsets"), 2):
        raise InputError(f"{bad}: tensor {key!r} lacks a valid shape or data_offsets; re-download the file")
    if e.get("dtype") not in _ST_ITEMSIZE:
        raise InputError(f"{bad}: tensor {key!r} has unknown dtype {e.get('dtype')!r}; re-download or "
                         "re-export the file")
    begin, end = e["data_offsets"]
    if begin > end or end - begin != math.prod(e["shape"]) * _ST_ITEMSIZE[e["dtype"]]:
        raise InputError(f"{bad}: tensor {key!r} has data_offsets {[begin, end]} that do not fit its "
                         f"shape {e['shape']} and dtype {e['dtype']}; re-download the file")


# ---------------------------------------------------------------------------------------------- torch zip

class _Storage(NamedTuple):  # a persistent id: which zip member holds the bytes, and their element type
    key: str
    dtype: torch.dtype


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

    def __setstate__(self, state):  # BUILD
        pass

    def __setitem__(self, key, value):  # SETITEMS
        pass

    def append(self, item):  # APPENDS
        pass

    extend = append


def _inert(*args, **kwargs):
    return _Inert.__new__(_Inert)


def _new_inert(cls, *args, **kwargs):  # copyreg.__newobj__ and copyreg._reconstructor
    return cls.__new__(cls) if isinstance(cls, _Global) else _inert()


class _Dict(dict):  # collections.OrderedDict; torch's state dicts carry a `_metadata` attribute: dropped
    def __setstate__(self, state):
        pass


def _rebuild_tensor_v2(storage, offset, size, stride, *unused):
    return _rebuild_tensor_v3(storage, offset, size, stride, None, None, getattr(storage, "dtype", None))


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *unused):
    if not isinstance(storage, _Storage) or not isinstance(dtype, torch.dtype):
        raise InputError("a tensor in data.pkl has no valid storage; the file is corrupt, re-download it")
    return _Lazy(storage, dtype, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *unused):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter):
        raise _refuse(getattr(func, "dotted", type(func).__name__))
    return func(*args)


# The only globals a pickle may call; none imports or runs anything of the file's choosing.
_CALLS = {
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
}
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
                and isinstance(pid[1], torch.dtype)):
            raise InputError(f"unexpected persistent id {str(pid)[:60]!r} in data.pkl; the file is corrupt, "
                             "re-download it")
        return _Storage(str(pid[2]), pid[1])


def _unpickle(zf: zipfile.ZipFile, prefix: str):
    """The object in `<prefix>data.pkl`, with tensors as `_Lazy` records and foreign objects inert."""
    with zf.open(prefix + "data.pkl") as f:
        return _Unpickler(f, encoding="utf-8").load()


def _read_torch_zip(path: Path, keep) -> dict[str, torch.Tensor]:
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"PK\x03\x04":
            raise InputError("zip archive is truncated or corrupt; re-download it")
        raise InputError("unsupported format: not a zip-format torch checkpoint (a legacy torch file, or not a "
                         "checkpoint at all); convert it to safetensors or re-save it with torch>=1.6")
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
        lazy = {k: v for k, v in flat.items() if isinstance(k, str) and isinstance(v, _Lazy)}
        if not lazy:
            raise InputError(f"checkpoint has no tensors under its top-level keys {list(top)[:8]}; "
                             "save a state_dict instead")
        return _materialise(zf, prefix, {k: v for k, v in lazy.items() if keep(k)})


def _materialise(zf: zipfile.ZipFile, prefix: str, lazy: dict[str, _Lazy]) -> dict[str, torch.Tensor]:
    """Read each needed storage once (tensors that shared one still do) and view the tensors into it."""
    storages: dict[str, torch.Tensor] = {}
    out = {}
    for name, t in lazy.items():
        key = t.storage.key
        if key not in storages:
            raw = bytearray(zf.read(f"{prefix}data/{key}"))  # bytearray: writable, so torch does not warn
            storages[key] = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        out[name] = storages[key].view(t.dtype).as_strided(t.size, t.stride, t.offset)
    return out
