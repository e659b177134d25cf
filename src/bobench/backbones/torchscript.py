"""Read the tensors of a TorchScript archive (``torch.jit.save``) without executing any of it.

``torch.jit.load`` would compile and run the archive's code, and a plain unpickler would import whatever
``data.pkl`` names. :func:`read_torchscript_state_dict` instead unpickles with an allow-list (tensor
rebuilds and ``OrderedDict`` only; everything else becomes an inert stub), reads storages from the
archive's ``data/`` folder, and reads which attributes are parameters and buffers from the ``code/``
files as text. Used for SSCD's TorchScript releases.
"""

from __future__ import annotations

import ast
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from typing import Any

import torch

from bobench.backbones.errors import WeightsError

StateDict = dict[str, torch.Tensor]

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}


class _Stub:
    """Inert stand-in for every global that is not allow-listed: records arguments and state, runs nothing."""

    qualname = "?"
    args: tuple = ()
    state: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _StorageTag:
    """What a ``torch.*Storage`` global unpickles to: only its dtype (never the real, mutable class)."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class _Storage:
    __slots__ = ("dtype", "untyped")

    def __init__(self, untyped: torch.UntypedStorage, dtype: torch.dtype) -> None:
        self.untyped, self.dtype = untyped, dtype


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_ignored: Any) -> torch.Tensor:
    # requires_grad and backward hooks are ignored on purpose: the result is a plain tensor
    if not (isinstance(storage, _Storage) and isinstance(offset, int)):
        raise pickle.UnpicklingError("malformed tensor record")
    if not all(isinstance(x, int) for x in (*size, *stride)):
        raise pickle.UnpicklingError("malformed tensor record")
    # set_ checks that size/stride/offset stay inside the storage
    return torch.empty(0, dtype=storage.dtype).set_(storage.untyped, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data: Any, *_ignored: Any) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("malformed parameter record")
    return data


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` of a TorchScript archive; no pickled global can run code."""

    def __init__(self, file: Any, archive: zipfile.ZipFile, root: str) -> None:
        super().__init__(file)
        self._zip, self._root = archive, root
        self._stubs: dict[str, type[_Stub]] = {}
        self._storages: dict[str, torch.UntypedStorage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageTag(_STORAGE_DTYPES[name])
        qualname = f"{module}.{name}"
        if qualname not in self._stubs:  # one class per name, so modules can be told apart
            self._stubs[qualname] = type("Stub", (_Stub,), {"qualname": qualname})
        return self._stubs[qualname]

    def persistent_load(self, pid: Any) -> _Storage:
        ok = isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"
        if not (ok and isinstance(pid[1], _StorageTag) and isinstance(pid[2], str)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        key = pid[2]
        if not re.fullmatch(r"\w+", key):
            raise pickle.UnpicklingError(f"bad storage key {key!r:.40}")
        if key not in self._storages:
            data = self._zip.read(f"{self._root}/data/{key}")
            self._storages[key] = (
                torch.UntypedStorage.from_buffer(data, dtype=torch.uint8) if data else torch.UntypedStorage(0)
            )
        return _Storage(self._storages[key], pid[1].dtype)


def _archive_root(archive: zipfile.ZipFile) -> str | None:
    names = set(archive.namelist())
    for name in names:
        root, _, rest = name.partition("/")
        if rest == "data.pkl" and (
            f"{root}/constants.pkl" in names or any(n.startswith(f"{root}/code/") for n in names)
        ):
            return root
    return None


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``torch.jit.save`` archive (a zip with ``data.pkl`` and ``code/`` or constants)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return _archive_root(archive) is not None
    except (OSError, zipfile.BadZipFile):
        return False


_LIST_ATTR = re.compile(r"^\s+(__parameters__|__buffers__) = (\[[^\]]*\])", re.M)


def _tensor_slots(archive: zipfile.ZipFile, root: str) -> dict[str, list[str]]:
    """``{class qualname: parameter and buffer names}`` read (parsed, never run) from ``code/``.

    The pickled state of a scripted module holds every attribute; only these are in its state_dict.
    """
    slots: dict[str, list[str]] = {}
    prefix = f"{root}/code/"
    for name in archive.namelist():
        if not (name.startswith(prefix) and name.endswith(".py")):
            continue
        module = name[len(prefix) : -len(".py")].replace("/", ".")
        text = archive.read(name).decode("utf-8", "replace")
        parts = re.split(r"^class (\w+)\(", text, flags=re.M)
        for cls, body in zip(parts[1::2], parts[2::2], strict=True):
            found = dict(_LIST_ATTR.findall(body))
            if found:
                lists = [ast.literal_eval(found.get(a, "[]")) for a in ("__parameters__", "__buffers__")]
                slots[f"{module}.{cls}"] = [str(n) for n in lists[0] + lists[1]]
    return slots


def _walk(obj: _Stub, prefix: str, slots: dict[str, list[str]], out: StateDict, depth: int = 0) -> None:
    state = obj.state if isinstance(obj.state, dict) else {}
    if depth > 100:
        raise WeightsError("TorchScript module tree is nested too deeply")
    names = slots.get(type(obj).qualname)
    # parameters and buffers first, then submodules, as nn.Module.state_dict orders them
    for attr, value in state.items():
        if names is not None and attr not in names:
            continue
        if isinstance(value, torch.Tensor):
            out[prefix + attr] = value
        elif value is not None and names is not None:
            raise WeightsError(f"unsupported tensor kind for {prefix + attr} ({type(value).__name__})")
    for attr, value in state.items():
        if isinstance(value, _Stub) and isinstance(value.state, dict):
            _walk(value, f"{prefix}{attr}.", slots, out, depth + 1)


def read_torchscript_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive, named as ``module.state_dict()`` names them.

    The archive is opened as a zip and ``data.pkl`` is unpickled with an allow-list: only tensor
    rebuilding and ``OrderedDict`` are real; every other global (``__torch__.*`` module classes, and
    anything a crafted file may name) becomes an inert stub, so no code runs. Storages are read from
    ``<archive>/data/<key>``; which attributes are parameters or buffers is parsed from ``code/``.

    Raises:
        WeightsError: the file is missing, not a TorchScript archive, or malformed.
    """
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise WeightsError(f"{path} is not a TorchScript archive (torch.jit.save zip): {exc}") from exc
    with archive:
        root = _archive_root(archive)
        if root is None:
            raise WeightsError(
                f"{path} is not a TorchScript archive (no <archive>/data.pkl beside code/ or constants.pkl); "
                "read state dicts saved with torch.save with load_state_dict instead"
            )
        if f"{root}/byteorder" in archive.namelist() and archive.read(f"{root}/byteorder") != b"little":
            raise WeightsError(f"{path} was saved on a big-endian machine; re-save it on a little-endian one")
        try:
            with archive.open(f"{root}/data.pkl") as f:
                top = _ArchiveUnpickler(f, archive, root).load()
        except Exception as exc:
            raise WeightsError(f"cannot read TorchScript archive {path}: {exc}") from exc
        out: StateDict = {}
        if isinstance(top, _Stub):
            _walk(top, "", _tensor_slots(archive, root), out)
    if not out:
        raise WeightsError(f"TorchScript archive {path} holds no module parameters or buffers")
    return {k: v.detach() for k, v in out.items()}
