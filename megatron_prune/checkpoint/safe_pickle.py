"""Reading the pickles inside checkpoint files without executing code or allocating without bound.

A Megatron checkpoint's pickles name Python globals: torch's tensor rebuild functions, `argparse.Namespace`, and in
the args of any Megatron-LM version whatever types it stores there (megatron-core enums, `signal.Signals`, numpy RNG
states, `PipelineParallelLayerLayout`, `InferenceCudaGraphScope`, next release's new ones). A plain unpickler
imports and calls each of them; torch's weights_only unpickler refuses them (so every Megatron-LM release broke
reading) and still calls `bytearray(n)` / `torch.Tensor(n)` with sizes taken from the file.

Here a global is looked up in a short table of things that only build data (tensors from the file's own storages,
`Namespace`, `OrderedDict`, `torch.Size`, dtypes), with size-checked stand-ins for the few that could allocate from a
number in the file. Every other global becomes an `Opaque` value: its dotted name plus what the file passed to it
(the enum's value, the array's state); nothing is imported, nothing of it runs. Globals that only a payload names
(`os.system`, `builtins.eval`, `subprocess.*` ...) are refused outright (`PayloadError`): such a file is an attack,
not data. The unpickler is pickle's pure-Python one, whose memo is a dict (the C one grows an array to the largest
memo index a file names), with BYTEARRAY8 bounded by the bytes actually present.

    torch.load(path, weights_only=False, pickle_module=safe_pickle)     # a rank file: tensors, args, ...
    safe_pickle.loads(data)                                              # a pickled object (a dist-checkpoint item)
    safe_pickle.loads(data, strict=DCP_METADATA)                         # only the listed globals, else refused
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import io
import pickle
import struct
from typing import Any

import torch

from megatron_prune.checkpoint.errors import CheckpointError

# Modules (and module.name) that no data needs: a file naming one of them is a payload.
_PAYLOAD_MODULES = ("os", "posix", "nt", "subprocess", "sys", "builtins", "importlib", "runpy", "pickle",
                    "_pickle", "marshal", "shutil", "socket", "ctypes", "code", "codeop", "pty", "webbrowser",
                    "multiprocessing", "threading", "_thread", "types", "operator", "io", "_io", "tempfile",
                    "asyncio", "pdb", "timeit", "platform", "commands", "popen2", "torch.hub", "torch.jit",
                    "torch._C", "torch.ops", "torch.package", "torch.utils.cpp_extension", "torch.serialization",
                    "numpy.testing", "numpy.f2py", "numpy.distutils", "numpy.lib.npyio", "yaml", "dill")
_PAYLOAD_NAMES = {"torch.load", "torch.save", "torch.compile", "numpy.load", "numpy.fromfile", "numpy.memmap"}

MAX_BYTES_FROM_TEXT = 4  # _codecs.encode(text, "latin1") output bytes per input character (bounded: 1)


class PayloadError(CheckpointError):
    """A pickle that names a global no checkpoint data needs (it would run code under a plain unpickler)."""


class Opaque:
    """A value of a type that is not imported: its dotted type name, the arguments the file passed to it, and the
    state the file set on it. Inert: comparing, printing and keeping it run nothing of the type."""

    __slots__ = ("type_name", "args", "state")

    def __init__(self, type_name: str, args: tuple = (), state: Any = None):
        self.type_name, self.args, self.state = type_name, tuple(args), state

    def __setstate__(self, state: Any) -> None:  # BUILD
        self.state = state

    def __reduce__(self):  # saving it again (e.g. copied args) writes an inert record, not the original type
        return (Opaque, (self.type_name, self.args, self.state))

    @property
    def value(self) -> Any:
        """The first argument (an enum's value, e.g. 15 for signal.Signals.SIGTERM), else None."""
        return self.args[0] if self.args else None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque) and (self.type_name, self.args) == (other.type_name, other.args)

    def __hash__(self) -> int:
        return hash((self.type_name, repr(self.args)))

    def __repr__(self) -> str:
        return f"<{self.type_name}{self.args!r}>"


class _OpaqueType(type):
    """The stand-in a global resolves to: calling it or `__new__` on it (REDUCE, NEWOBJ, INST) makes an Opaque."""

    def __call__(cls, *args, **kwargs):
        return Opaque(cls.type_name, args + tuple(sorted(kwargs.items())))


def _opaque_type(dotted: str) -> type:
    def new(klass, *args, **kwargs):
        return Opaque(dotted, args + tuple(sorted(kwargs.items())))

    return _OpaqueType(dotted.rsplit(".", 1)[-1], (), {"type_name": dotted, "__new__": new})


# ----------------------------------------------------------------------------- the globals that build data
def _bytearray(*args):
    """bytearray(bytes) / bytearray(text, encoding) from the file's own bytes; never bytearray(n)."""
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)) or \
            len(args) == 2 and isinstance(args[0], str) and isinstance(args[1], str):
        return bytearray(*args)
    raise pickle.UnpicklingError(f"bytearray{tuple(type(a).__name__ for a in args)}: only from bytes in the file")


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    """Protocol-2 pickles store bytes as _codecs.encode(text, "latin1")."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not pickled data")
    return text.encode(encoding, errors)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if backward_hooks:  # hooks are callables: data never has them
        raise pickle.UnpicklingError("a tensor with backward hooks is not checkpoint data")
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
                                           collections.OrderedDict(), metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks=None, *rest):
    if backward_hooks or not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("a parameter with hooks or without a tensor is not checkpoint data")
    return torch.nn.Parameter(data, requires_grad)


_TENSOR_REBUILDS = (_rebuild_tensor_v2, _rebuild_parameter)


def _rebuild_from_type_v2(func, new_type, args, state):
    """torch's wrapper for tensors saved with Python attributes: only plain tensors and parameters."""
    if func not in _TENSOR_REBUILDS or new_type not in (torch.Tensor, torch.nn.Parameter):
        raise pickle.UnpicklingError("a tensor subclass is not checkpoint data")
    return func(*args)


def _reconstructor(cls, base, state):
    """copyreg._reconstructor (protocol 0/1 objects): a real object only for the data classes we build."""
    if isinstance(cls, type) and cls in _DATA_CLASSES and base is object:
        return object.__new__(cls)
    name = cls.type_name if isinstance(cls, _OpaqueType) else getattr(cls, "__name__", repr(cls))
    return Opaque(name, (), state)


_DATA_CLASSES = (argparse.Namespace, collections.OrderedDict)


def _safe_globals() -> dict[str, Any]:
    table: dict[str, Any] = {
        "builtins.set": set, "builtins.frozenset": frozenset, "builtins.complex": complex, "builtins.slice": slice,
        "builtins.bytearray": _bytearray, "_codecs.encode": _codecs_encode,
        "collections.OrderedDict": collections.OrderedDict, "argparse.Namespace": argparse.Namespace,
        "copyreg._reconstructor": _reconstructor,
        "torch.Size": torch.Size, "torch.serialization._get_layout": torch.serialization._get_layout,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2, "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
        "torch.device": _device,
    }
    for name in dir(torch):  # dtypes, memory formats and layouts are pickled as torch.<name>
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.memory_format, torch.layout)):
            table[f"torch.{name}"] = value
    return table


def _device(*args):
    if not all(isinstance(a, (str, int)) for a in args) or len(args) > 2:
        raise pickle.UnpicklingError(f"torch.device{args!r} is not pickled data")
    return torch.device(*args)


SAFE_GLOBALS = _safe_globals()


def _is_payload(module: str, name: str) -> bool:
    dotted = f"{module}.{name}"
    return dotted in _PAYLOAD_NAMES or any(module == m or module.startswith(m + ".") for m in _PAYLOAD_MODULES)


# ----------------------------------------------------------------------------- the unpickler
class Unpickler(pickle._Unpickler):  # the pure-Python unpickler: its memo is a dict
    """`strict`: the dotted names of the only globals allowed besides SAFE_GLOBALS (resolved to the real objects,
    for trusted-format metadata that another reader will unpickle with plain pickle); None: unknown globals become
    Opaque values."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, *, strict: dict[str, Any] | None = None, **kwargs):
        kwargs.pop("encoding", None)
        super().__init__(file, encoding="utf-8", **kwargs)
        self.strict = strict
        self.opaque_names: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and self.fix_imports:
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        dotted = f"{module}.{name}"
        if dotted in SAFE_GLOBALS:
            return SAFE_GLOBALS[dotted]
        if self.strict is not None:
            if dotted in self.strict:
                return self.strict[dotted]
            raise PayloadError(f"names {dotted}, which this format never holds")
        if _is_payload(module, name):
            raise PayloadError(f"names {dotted}, which no checkpoint data needs (a code payload, not data)")
        self.opaque_names.add(dotted)
        return _opaque_type(dotted)

    def load_bytearray8(self):
        (n,) = struct.unpack("<Q", self.read(8))
        data = self.read(n)  # at most what the file holds; bytearray(n) would allocate n from 9 bytes
        if len(data) != n:
            raise pickle.UnpicklingError("BYTEARRAY8 is longer than the data")
        self.append(bytearray(data))

    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8

    def _refuse_extension(self):
        raise pickle.UnpicklingError("copyreg extension codes are not checkpoint data")

    for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = _refuse_extension


def load(file, **kwargs) -> Any:
    """pickle.load for torch.load(..., pickle_module=safe_pickle) (its legacy, non-zip format)."""
    return Unpickler(file, **kwargs).load()


def loads(data: bytes, strict: dict[str, Any] | None = None) -> Any:
    return Unpickler(io.BytesIO(data), strict=strict).load()

