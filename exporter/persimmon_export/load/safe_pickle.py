"""Load a torch checkpoint that may be hostile: nothing in the file is run or imported.

`torch.load(weights_only=True)` does the unpickling. Its unpickler resolves a global only by an
exact "module.name" lookup in an allow-list, calls only allow-listed callables, allows BUILD only
on tensors, OrderedDicts and allow-listed classes, and accepts no persistent id but a tensor
storage. What it lacks is added here by reading the pickle's opcodes once *before* torch runs
(that pass builds no object, so it can neither run code nor be slowed by what it reads):

- a narrower exact allow-list: of torch's defaults only what rebuilds tensors, no constructor that
  allocates a size the file declares (`torch.Tensor(n)`, `bytearray(n)`) and no other torch name;
- placeholders: where the caller accepts foreign classes (Megatron checkpoints pickle their own
  classes next to the tensors), each such (module, name) is registered with torch's `safe_globals`
  as an inert `Placeholder` class; standard-library names (`builtins.eval`, `os.system`, ...) are
  refused rather than replaced;
- limits torch has none of: pickle size, memo entries, nesting depth, reference cycles, the
  expanded size of shared structures ("billion laughs") and of everything torch hashes, storage
  sizes larger than the file, zip records larger than the file (compressed bombs);
- one error line naming the file and the reason.
"""

from __future__ import annotations

import io
import os
import re
import struct
import sys
import warnings
from pickle import decode_long

import torch
from torch._utils import IMPORT_MAPPING, NAME_MAPPING
from torch._weights_only_unpickler import _get_allowed_globals

from persimmon_runtime.errors import PersimmonError

MAX_PICKLE_BYTES = 256 * 2**20
MAX_OBJECTS = 2_000_000  # also bounds the expanded size: a shared object counts each time it is used
MAX_MEMO = 1_000_000
MAX_DEPTH = 100

# Names a checkpoint's tensors and plain data need, each also on torch's weights_only allow-list.
_WANTED = {"collections.OrderedDict", "builtins.set", "_codecs.encode", "torch.Size", "torch.device",
           "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3",
           "torch._utils._rebuild_parameter"}
# Callables that hash what they are given (like dict keys and BUILD state: see `_Scan.hashed`).
_HASHING = {"collections.OrderedDict", "builtins.set"}
# Standard-library classes whose instances are plain data, loaded as placeholders.
_STDLIB_DATA = {"argparse.Namespace"}


def _tensor_globals() -> frozenset[str]:
    torch_allowed = _get_allowed_globals()
    return frozenset(name for name, value in torch_allowed.items()
                     if name in _WANTED or isinstance(value, torch.dtype) or re.fullmatch(r"torch\.\w+Storage", name))


_TENSOR_GLOBALS = _tensor_globals()


class Placeholder:
    """Stands in for a class the checkpoint pickles but we do not import (e.g. Megatron's args).

    Calling it, NEWOBJ and BUILD only record their arguments; `__slots__` means no state can
    shadow a method. Fields of a dict state read as attributes (`args.num_attention_heads`).
    """

    __slots__ = ("args", "state")

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args, self.state = args, None
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __getattr__(self, name):
        state = object.__getattribute__(self, "state")
        if isinstance(state, dict) and name in state:
            return state[name]
        raise AttributeError(name)


class _Refused(Exception):
    """The pickle asks for something we do not do."""


class _Malformed(Exception):
    """The bytes are not a pickle torch.save could have written."""


class _Value:
    """One object the unpickler would build: what it holds, never the object itself."""

    __slots__ = ("parts", "literal", "size", "depth", "done")

    def __init__(self, parts=None, literal=None):
        self.parts, self.literal = parts, literal  # parts is a list for containers, None for scalars
        self.size = self.depth = 1
        self.done = parts is None


class _Global(str):
    """The literal of a GLOBAL: its "module.name"."""


class _Scan:
    """Walks the opcodes of one or more pickles the way torch's weights_only unpickler would."""

    def __init__(self, file_size: int, foreign_classes: bool):
        self.file_size, self.foreign_classes = file_size, foreign_classes
        self.placeholders: set[str] = set()
        self.containers: list[_Value] = []
        self.hashed: list[_Value] = []  # dict keys, BUILD state, arguments of hashing callables
        self.objects = 0
        self.encoded_bytes = 0  # what _codecs.encode calls will allocate
        self.member_lookups = False  # getattr(<placeholder class>, "name"): an enum member

    def pickle(self, f) -> None:
        """Scan one pickle from `f`, leaving `f` just after its STOP."""
        self.stack, self.marks, self.memo = [], [], {}
        while True:
            code = f.read(1)
            if not code:
                raise _Malformed("the pickle ends before its STOP")
            handler = _OPCODES.get(code)
            if handler is None:
                raise _Malformed(f"opcode {code!r} at byte {f.tell() - 1}, which torch.save never writes")
            if handler(self, f) is _STOP:
                return

    def push(self, parts=None, literal=None) -> None:
        self.objects += 1
        if self.objects > MAX_OBJECTS:
            raise _Refused(f"it builds more than {MAX_OBJECTS} objects")
        value = _Value(parts, literal)
        if parts is not None:
            self.containers.append(value)
        self.stack.append(value)

    def pop_mark(self) -> list:
        items, self.stack = self.stack, self.marks.pop()
        return items

    def target(self) -> _Value:
        """The container an APPEND/SETITEM/BUILD adds to."""
        if self.stack[-1].parts is None:
            raise _Malformed("it adds items to a scalar")
        return self.stack[-1]

    def check_global(self, module: str, name: str) -> _Global:
        if (module, name) in NAME_MAPPING:  # Python 2 names, mapped as torch maps them
            module, name = NAME_MAPPING[(module, name)]
        module = IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if not (name.isidentifier() and all(part.isidentifier() for part in module.split("."))):
            raise _Refused(f"it names the global {full!r}, which is not a plain module.name")
        if full in _TENSOR_GLOBALS:
            return _Global(full)
        if full == _MEMBER_LOOKUP and self.foreign_classes:  # each call's arguments are checked in _call
            self.member_lookups = True
            return _Global(full)
        top = module.split(".")[0]
        if top == "torch" or full in _get_allowed_globals():
            raise _Refused(f"it calls {full}, which is not one of the functions that rebuild tensors")
        if top in sys.stdlib_module_names and full not in _STDLIB_DATA:
            raise _Refused(f"it calls {full}, a Python function or class no checkpoint needs")
        if not self.foreign_classes:
            raise _Refused(f"it holds a {full} object, and a weights file holds only tensors")
        self.placeholders.add(full)
        return _Global(full)

    def check_storage_id(self, pid: _Value) -> None:
        """The one persistent id torch writes: ("storage", type, key, location, numel[, view])."""
        if pid.parts is None or not pid.parts or pid.parts[0].literal not in ("storage", b"storage"):
            raise _Refused("it has a persistent id other than a tensor storage (e.g. a legacy 'module' id)")
        for part in pid.parts:
            for item in ([part] if part.parts is None else part.parts):
                if item.parts is not None:
                    raise _Refused("its tensor storage id nests containers")
                if isinstance(item.literal, int) and not 0 <= item.literal <= self.file_size:
                    raise _Refused(f"a tensor storage declares {item.literal} elements, more than the "
                                   f"file's {self.file_size} bytes could hold")

    def measure(self) -> None:
        """Sizes and depths of every container; refuses cycles, deep nesting and expansion bombs."""
        for start in self.containers:
            if start.done:
                continue
            path = [(start, iter(start.parts))]
            on_path = {id(start)}
            while path:
                value, parts = path[-1]
                for part in parts:
                    if part.done:
                        continue
                    if id(part) in on_path:
                        raise _Refused("it contains a reference cycle")
                    if len(path) >= MAX_DEPTH:
                        raise _Refused(f"it nests objects more than {MAX_DEPTH} deep")
                    on_path.add(id(part))
                    path.append((part, iter(part.parts)))
                    break
                else:
                    path.pop()
                    on_path.discard(id(value))
                    self.finish(value)
        if sum(value.size for value in self.hashed) > MAX_OBJECTS:
            raise _Refused(f"it has torch hash more than {MAX_OBJECTS} shared objects")

    @staticmethod
    def finish(value: _Value) -> None:
        value.size = 1 + sum(part.size for part in value.parts)
        value.depth = 1 + max((part.depth for part in value.parts), default=0)
        value.done = True
        if value.depth > MAX_DEPTH:
            raise _Refused(f"it nests objects more than {MAX_DEPTH} deep")
        if value.size > MAX_OBJECTS:
            raise _Refused(f"its shared references expand to more than {MAX_OBJECTS} objects (a 'billion "
                           f"laughs' pickle)")


_STOP = object()
_MEMBER_LOOKUP = "builtins.getattr"


def _placeholder_member(owner, name):
    """Stands in for getattr(EnumClass, "NAME") (see _call): the member as a placeholder instance."""
    if not (isinstance(owner, type) and issubclass(owner, Placeholder) and isinstance(name, str)):
        raise TypeError(f"getattr({owner!r}, {name!r}) is not an enum member of the checkpoint's own classes")
    return owner(name)


def _read(f, n: int) -> bytes:
    if n > MAX_PICKLE_BYTES:
        raise _Refused(f"it declares a {n}-byte string at byte {f.tell()}")
    data = f.read(n)
    if len(data) != n:
        raise _Malformed(f"it is truncated: {n} bytes declared at byte {f.tell() - len(data)}, "
                         f"{len(data)} present")
    return data


def _unpack(fmt: str):
    size = struct.calcsize(fmt)
    return lambda f: struct.unpack(fmt, _read(f, size))[0]


def _line(f) -> str:
    line = f.readline()
    if not line.endswith(b"\n"):
        raise _Malformed("a GLOBAL name is not terminated")
    try:
        return line[:-1].decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed("a GLOBAL name is not UTF-8") from None


_uint32 = _unpack("<I")


def _unicode(f) -> str:
    data = _read(f, _uint32(f))
    try:
        return str(data, "utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise _Malformed("a string is not UTF-8") from None


def _scalar(read):
    return lambda scan, f: scan.push(literal=read(f))


def _constant(literal):
    return lambda scan, f: scan.push(literal=literal)


def _empty(scan, f):
    scan.push(parts=[])


def _tuple(n):
    def build(scan, f):
        items = scan.stack[-n:] if n else []
        if len(items) != n:
            raise _Malformed("a tuple opcode finds too few items")
        del scan.stack[len(scan.stack) - n:]
        scan.push(parts=items)
    return build


def _tuple_mark(scan, f):
    scan.push(parts=scan.pop_mark())


def _mark(scan, f):
    scan.marks.append(scan.stack)
    scan.stack = []


def _append(scan, f):
    item = scan.stack.pop()
    scan.target().parts.append(item)


def _appends(scan, f):
    items = scan.pop_mark()
    scan.target().parts.extend(items)


def _setitem(scan, f):
    value, key = scan.stack.pop(), scan.stack.pop()
    scan.target().parts += (key, value)
    scan.hashed.append(key)


def _setitems(scan, f):
    items = scan.pop_mark()
    if len(items) % 2:
        raise _Malformed("SETITEMS has a key without a value")
    scan.target().parts.extend(items)
    scan.hashed.extend(items[0::2])


def _global(scan, f):
    module = _line(f)
    scan.push(literal=scan.check_global(module, _line(f)))


def _call(scan, callable_: _Value, args: _Value):
    if callable_.literal == _MEMBER_LOOKUP:
        # Python >= 3.11.2 pickles an enum member as getattr(EnumClass, "NAME"); allowed only on a
        # class that becomes a placeholder, with a public name, and run as `_placeholder_member`
        owner, name = args.parts if args.parts is not None and len(args.parts) == 2 else (None, None)
        if not (owner is not None and isinstance(owner.literal, _Global) and owner.literal in scan.placeholders
                and isinstance(name.literal, str) and name.literal.isidentifier()
                and not name.literal.startswith("_")):
            raise _Refused("it calls builtins.getattr on something other than a public member of one of its own "
                           "classes (an enum member)")
    if callable_.literal == "_codecs.encode" and args.parts:
        # one memoized string encoded again and again allocates its size each time, while the
        # file holds it once: torch.save encodes each bytes object once, so its total fits the file
        text = args.parts[0].literal
        scan.encoded_bytes += len(text) if isinstance(text, (str, bytes)) else 0
        if scan.encoded_bytes > scan.file_size:
            raise _Refused(f"its _codecs.encode calls build more bytes than the file's {scan.file_size} "
                           f"(a byte-amplification pickle)")
    scan.push(parts=[callable_, args])
    if isinstance(callable_.literal, _Global) and callable_.literal in _HASHING:
        scan.hashed.append(args)


def _reduce(scan, f):
    args = scan.stack.pop()
    _call(scan, scan.stack.pop(), args)


def _build(scan, f):
    state = scan.stack.pop()
    if isinstance(scan.stack[-1].literal, _Global):  # the standard unpickler would setattr on the class
        raise _Refused(f"it changes the class {scan.stack[-1].literal} itself (BUILD on a class)")
    scan.target().parts.append(state)
    scan.hashed.append(state)


def _persistent_id(scan, f):
    scan.check_storage_id(scan.stack.pop())
    scan.push()


def _get(read):
    def get(scan, f):
        index = read(f)
        if index not in scan.memo:
            raise _Malformed(f"it reads memo entry {index} before writing it")
        scan.stack.append(scan.memo[index])
    return get


def _put(read):
    def put(scan, f):
        scan.memo[read(f)] = scan.stack[-1]
        if len(scan.memo) > MAX_MEMO:
            raise _Refused(f"it memoizes more than {MAX_MEMO} objects")
    return put


def _proto(scan, f):
    version = _read(f, 1)[0]
    if version != 2:
        raise _Malformed(f"pickle protocol {version}; torch.save writes protocol 2")


def _stop(scan, f):
    scan.stack.pop()
    return _STOP


def _long1(f):
    return decode_long(_read(f, _read(f, 1)[0]))


# Exactly the opcodes torch's weights_only unpickler implements, with the same meaning.
_OPCODES = {
    b"c": _global, b"\x81": _reduce,  # NEWOBJ: cls.__new__(cls, *args), a call like REDUCE
    b"R": _reduce, b"b": _build, b"a": _append, b"e": _appends, b"s": _setitem, b"u": _setitems,
    b"(": _mark, b"t": _tuple_mark, b"\x85": _tuple(1), b"\x86": _tuple(2), b"\x87": _tuple(3),
    b")": _tuple(0), b"]": _empty, b"}": _empty, b"\x8f": _empty,
    b"N": _constant(None), b"\x89": _constant(False), b"\x88": _constant(True),
    b"J": _scalar(_unpack("<i")), b"K": _scalar(_unpack("<B")), b"M": _scalar(_unpack("<H")),
    b"G": _scalar(_unpack(">d")), b"X": _scalar(_unicode), b"U": _scalar(lambda f: _read(f, _read(f, 1)[0])),
    b"\x8a": _scalar(_long1), b"Q": _persistent_id,
    b"h": _get(_unpack("<B")), b"j": _get(_uint32), b"q": _put(_unpack("<B")), b"r": _put(_uint32),
    b"\x80": _proto, b".": _stop,
}


def _scan_zip(path: str, file_size: int, scan: _Scan) -> None:
    """torch's own zip reader gives the bytes torch will unpickle; its records must fit the file."""
    reader = torch._C.PyTorchFileReader(path)
    for record in reader.get_all_records():
        if reader.get_record_size(record) > file_size:
            raise _Refused(f"its record {record!r} unpacks to {reader.get_record_size(record)} bytes, more than "
                           f"the whole file (torch.save never compresses)")
    if not reader.has_record("data.pkl"):
        raise _Malformed("the zip archive has no data.pkl")
    if reader.get_record_size("data.pkl") > MAX_PICKLE_BYTES:
        raise _Refused(f"its data.pkl is over {MAX_PICKLE_BYTES} bytes")
    scan.pickle(io.BytesIO(reader.get_record("data.pkl")))


def _scan_legacy(path: str, scan: _Scan) -> None:
    """The pre-1.6 format: five pickles (magic, version, sys info, data, storage keys), then raw storages."""
    with open(path, "rb") as f:
        for _ in range(5):
            scan.pickle(f)
            if f.tell() > MAX_PICKLE_BYTES:
                raise _Refused(f"its pickles are over {MAX_PICKLE_BYTES} bytes")


def _one_line(error: Exception) -> str:
    """torch's messages span lines (the useful part of a weights_only one comes last)."""
    text = str(error).split("WeightsUnpickler error:")[-1]
    text = " ".join(text.split())
    return f"{error.__class__.__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def load(path: str, foreign_classes: bool, error: type[PersimmonError] = PersimmonError):
    """torch.load(path) without running or importing anything the file names.

    `foreign_classes`: load classes the checkpoint pickles (other than standard-library and torch
    ones) as `Placeholder` instances instead of refusing them. Every failure raises `error` with
    one line naming `path`.
    """
    path = os.fspath(path)
    scan = _Scan(0, foreign_classes)
    try:
        scan.file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"  # what torch.load tests to choose the format
        _scan_zip(path, scan.file_size, scan) if is_zip else _scan_legacy(path, scan)
        scan.measure()
    except _Refused as e:
        raise error(f"{path}: refused to load: {e}; nothing in it was run. A checkpoint holds tensors and "
                    f"plain data only - get this file from a source you trust") from None
    except (_Malformed, IndexError) as e:  # IndexError: a pickle pops more than it pushed
        detail = str(e) if isinstance(e, _Malformed) else "it pops from an empty stack"
        raise error(f"{path}: cannot read the checkpoint ({detail}); it may be truncated or not written by "
                    f"torch.save - copy or download it again") from None
    except (OSError, RuntimeError) as e:  # unreadable file; torch's zip reader on a broken archive
        raise error(f"{path}: cannot read the checkpoint ({_one_line(e)})") from None
    placeholders = [(type(name.rpartition(".")[2], (Placeholder,), {"__module__": f"placeholder:{name}"}), name)
                    for name in sorted(scan.placeholders)]
    if scan.member_lookups:  # the file's "builtins.getattr" resolves to this, never to getattr
        placeholders.append((_placeholder_member, _MEMBER_LOOKUP))
    try:
        with torch.serialization.safe_globals(placeholders), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. TypedStorage deprecation: not the user's concern
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as e:  # torch raises many types for a bad pickle, zip or storage
        raise error(f"{path}: cannot read the checkpoint ({_one_line(e)})") from None
    for tensor in _tensors(loaded):
        # A view may repeat its storage (stride 0): 4 bytes on disk can claim 80 GB once copied.
        if tensor.numel() * tensor.element_size() > tensor.untyped_storage().nbytes():
            raise error(f"{path}: refused to load: a tensor of shape {tuple(tensor.shape)} (strides "
                        f"{tensor.stride()}) claims more elements than its {tensor.untyped_storage().nbytes()}-byte "
                        f"storage holds; a checkpoint stores each weight whole - get this file from a source "
                        f"you trust")
    return loaded


def _tensors(loaded):
    """Every tensor in what torch.load returned (the scan bounded its depth and size)."""
    pending = [loaded]
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor):
            yield item
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            pending.extend(item)
        elif isinstance(item, Placeholder):
            pending.extend((item.args, item.state))
