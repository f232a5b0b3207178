"""Output directories: written whole or not at all, and never over anything we did not write.

Every directory persimmon-export writes carries a MARKER file naming what it holds. An existing
`--out` is replaced only when it carries the marker of the same kind and the caller asked to
overwrite it; a file, a symlink, a non-empty directory without the marker, or a path that is,
holds or lies inside one of the run's inputs is refused before anything is written.

Writing goes to `.tmp-<name>-XXXXXXXX` beside the target (marked "writing", with the writer's
host and pid). Publishing renames the old output to `<temp>.old`, the new one into place, then
deletes the old one, with SIGINT/SIGTERM held back in between. A crash can still fall between
the two renames: the target is then missing and `<temp>.old` holds the previous output. The
next write to the same target puts `<temp>.old` back (or a user can: `mv <temp>.old <target>`)
and removes our temps whose writer is gone; temps it cannot prove stale are reported, not touched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
import threading

from persimmon_runtime.errors import PersimmonError

MARKER = ".persimmon-export"
KINDS = {"build": "a persimmon-export build", "triton": "a Triton model repository written by persimmon-export",
         "checkpoint": "a checkpoint written by persimmon-export"}
_WRITTEN_BY = "persimmon-export"
_MARKER_MAX_BYTES = 1 << 20  # (it lists every path we wrote)

log = logging.getLogger(__name__)


class OutputError(PersimmonError):
    pass


def check_output(out_dir, kind: str, overwrite: bool = False, inputs=()) -> str:
    """The absolute path of `out_dir` if it may be (re)written as `kind`; else OutputError.

    Also puts back a previous output left aside by a crash and clears our stale temps beside it.
    `inputs` are the paths the run reads (None entries are skipped).
    """
    path = os.path.abspath(os.fspath(out_dir))
    parent, base = os.path.split(path)
    if not base:
        raise OutputError(f"--out {path}: the filesystem root cannot be an output; choose a new directory")
    with reported_os_errors(path):
        if os.path.isdir(parent):
            _recover_leftovers(parent, base)
    _check_target(path, kind, overwrite, inputs)
    return path


def _check_target(path: str, kind: str, overwrite: bool, inputs) -> None:
    with reported_os_errors(path):
        _refuse_inputs(path, inputs)
        _refuse_existing(path, kind, overwrite)


def _refuse_inputs(path: str, inputs) -> None:
    real = os.path.realpath(path)
    for source in inputs:
        if source is None:
            continue
        source_real = os.path.realpath(os.fspath(source))
        if real == source_real:
            relation = "is"
        elif _inside(source_real, real):
            relation = "contains"
        elif _inside(real, source_real):
            relation = "lies inside"
        else:
            continue
        raise OutputError(f"--out {path}: {relation} the input {os.fspath(source)}; writing there would destroy or "
                          f"mix with the input, so choose an --out outside every input")


def _inside(child: str, ancestor: str) -> bool:
    return child != ancestor and os.path.commonpath([child, ancestor]) == ancestor


def _refuse_existing(path: str, kind: str, overwrite: bool) -> None:
    if os.path.islink(path):
        raise OutputError(f"--out {path}: is a symbolic link; pass a new directory or the real path of one "
                          f"persimmon-export wrote (nothing was changed)")
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise OutputError(f"--out {path}: exists and is not a directory; choose a new or empty directory "
                          f"(nothing was changed)")
    if not os.listdir(path):
        return
    marker = read_marker(path) or _unmarked_build(path)
    if marker is None:
        raise OutputError(f"--out {path}: is a non-empty directory that persimmon-export did not write; choose a "
                          f"new or empty directory (nothing was changed)")
    if marker["kind"] != kind:
        raise OutputError(f"--out {path}: holds {KINDS.get(marker['kind'], repr(marker['kind']))}, not "
                          f"{KINDS[kind]}; choose another directory (nothing was changed)")
    if not overwrite:
        raise OutputError(f"--out {path}: already holds {KINDS[kind]}; pass --overwrite to replace it "
                          f"(nothing was changed)")
    paths = marker.get("paths")  # every entry we wrote, at any depth (markers before it: the top level)
    if isinstance(paths, list) and all(isinstance(p, str) for p in paths):
        added = sorted(set(_tree(path)) - set(paths))
    else:
        names = marker.get("names")
        ours = set(names) if isinstance(names, list) and all(isinstance(n, str) for n in names) else set()
        added = sorted(set(os.listdir(path)) - {MARKER} - ours)
    if added:  # e.g. another model put into our Triton repository: --overwrite would delete it
        raise OutputError(f"--out {path}: also holds {', '.join(added[:3])}{' ...' if len(added) > 3 else ''}, "
                          f"which persimmon-export did not write; move that out or choose another --out (nothing "
                          f"was changed)")


# What a build directory held before outputs carried a marker (persimmon-export 0.1 before the
# marker): such a directory, holding only these files and a persimmon-build manifest, is ours.
_UNMARKED_BUILD_FILES = {"manifest.json", "model.onnx", "model.onnx.data", "tokenizer.model", "engine.plan",
                         "model.trt.onnx"}


def _unmarked_build(directory: str) -> dict | None:
    """A marker standing in for a build written before markers, or None."""
    names = set(os.listdir(directory))
    if "manifest.json" not in names or not names <= _UNMARKED_BUILD_FILES:
        return None
    try:
        with open(os.path.join(directory, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != "persimmon-build":
        return None
    return {"written_by": _WRITTEN_BY, "kind": "build", "names": sorted(names)}


MAX_TREE_ENTRIES = 100_000  # an output of ours holds a few dozen; more is not ours to weigh up


def _tree(directory: str) -> list[str]:
    """Every entry under `directory` (relative paths, links listed but not followed), marker excluded.
    Python's bytecode caches are left out: Triton's Python backend writes `__pycache__/` beside the
    model.py it imports, and it is no one's data (--overwrite replaces it with the rest)."""
    paths = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = [name for name in dirs if name != "__pycache__"]
        relative = os.path.relpath(root, directory)
        paths += [os.path.normpath(os.path.join(relative, name)) for name in dirs + files]
        if len(paths) > MAX_TREE_ENTRIES:
            raise OutputError(f"--out {directory}: holds more than {MAX_TREE_ENTRIES:,} entries, far more than "
                              f"persimmon-export writes; choose another --out (nothing was changed)")
    return sorted(set(paths) - {MARKER})


def read_marker(directory: str) -> dict | None:
    """Our marker in `directory` as a dict with at least `kind`, or None if it has none (or a foreign one)."""
    path = os.path.join(directory, MARKER)
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > _MARKER_MAX_BYTES:
            return None  # a link, FIFO or big file is not something we wrote
        with open(path, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("written_by") != _WRITTEN_BY or marker.get("kind") not in KINDS:
        return None
    return marker


def _write_marker(directory: str, kind: str, writing: bool) -> None:
    marker = {"written_by": _WRITTEN_BY, "kind": kind}
    if writing:  # who to ask whether this temp is still being written
        marker.update(state="writing", host=socket.gethostname(), pid=os.getpid())
    else:  # what --overwrite may delete: only these
        marker["names"] = sorted(set(os.listdir(directory)) - {MARKER})
        marker["paths"] = _tree(directory)
    with open(os.path.join(directory, MARKER), "w", encoding="utf-8") as f:
        json.dump(marker, f)


@contextlib.contextmanager
def atomic_directory(out_dir, kind: str, overwrite: bool = False, inputs=()):
    """Yield a temp dir beside `out_dir`; on success it becomes `out_dir`, on any error it is removed.

    `kind` is one of KINDS; see check_output for what may be replaced. An old output is swapped
    for the new one only once the new one is complete. OSErrors (no permission, disk full) come
    out as one OutputError naming the path.
    """
    out = check_output(out_dir, kind, overwrite, inputs)
    parent, base = os.path.split(out)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{base}-", dir=parent)
    except OSError as e:  # named as the user wrote it: the random temp name would only confuse
        advice = _ERRNO_ADVICE.get(e.errno)
        raise OutputError(f"{out}: cannot create it ({e.strerror or e})" + (f"; {advice}" if advice else "")) from None
    try:
        with reported_os_errors(out, tmp):
            _write_marker(tmp, kind, writing=True)
            yield tmp
            _make_readable(tmp)
            _write_marker(tmp, kind, writing=False)
            _check_target(out, kind, overwrite, inputs)  # the target may have changed while we wrote
            _swap(tmp, out)
    except BaseException:
        _remove_ours(tmp)
        raise


def _make_readable(tmp: str) -> None:
    """mkdtemp (and safetensors) create private files; give them the user's usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for name in os.listdir(tmp):
        path = os.path.join(tmp, name)
        if os.path.isfile(path) and not os.path.islink(path):
            os.chmod(path, 0o666 & ~umask)


def _swap(tmp: str, out: str) -> None:
    """Put `tmp` at `out`; an old output there is moved aside first and deleted last."""
    with _signals_deferred():
        if not os.path.isdir(out) or not os.listdir(out):
            os.rename(tmp, out)  # rename replaces an empty directory
            return
        aside = tmp + ".old"
        os.rename(out, aside)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(aside, out)
            raise
        _remove_ours(aside)


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT/SIGTERM back so they cannot fall between two renames; deliver them after.

    Python runs signal handlers in the main thread whichever thread the OS picked, so masking
    the main thread is not enough (torch and onnxruntime threads would still take them): swap
    the handlers for ones that only record, then re-raise what was recorded.
    """
    if threading.current_thread() is not threading.main_thread():  # only it may set handlers
        yield
        return
    received = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in received:
            signal.raise_signal(sig)


def _remove_ours(path: str) -> None:
    """Delete a directory of ours, its marker last, so a half-deleted one is still recognisably ours."""
    try:
        names = os.listdir(path)
    except OSError:
        return
    for name in names:
        if name != MARKER:
            child = os.path.join(path, name)
            if os.path.isdir(child) and not os.path.islink(child):
                shutil.rmtree(child, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(child)
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(path, MARKER))
    with contextlib.suppress(OSError):
        os.rmdir(path)


def _recover_leftovers(parent: str, base: str) -> None:
    """Deal with the temps an interrupted write to parent/base left beside it (see the module doc)."""
    out = os.path.join(parent, base)
    pattern = re.compile(r"\.tmp-" + re.escape(base) + r"-[a-z0-9_]{8}(\.old)?")
    for name in sorted(os.listdir(parent)):  # a temp sorts before its .old, so .old is restored last
        match = pattern.fullmatch(name)
        if not match:
            continue
        path = os.path.join(parent, name)
        marker = read_marker(path) if os.path.isdir(path) and not os.path.islink(path) else None
        if marker is None:
            log.warning(f"note: {path} looks like a temp of an interrupted write but has no persimmon-export "
                        f"marker: left alone; delete it yourself if nothing is writing {out}")
        elif marker.get("state") == "writing" and _writer_may_be_alive(marker):
            log.warning(f"note: {path} is being written by pid {marker.get('pid')} on {marker.get('host')} (or "
                        f"was, on another host): left alone; delete it yourself if nothing is writing {out}")
        elif match.group(1) and not os.path.lexists(out):
            os.rename(path, out)
            log.warning(f"note: restored {out} from {path}: an earlier run was interrupted while replacing it")
        else:
            _remove_ours(path)
            log.warning(f"note: removed {path}, left over from an interrupted run")


def _writer_may_be_alive(marker: dict) -> bool:
    pid = marker.get("pid")
    if marker.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return True  # cannot tell: be safe
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


_ERRNO_ADVICE = {
    errno.ENOSPC: "the disk is full; free some space or choose an --out on another disk",
    errno.EDQUOT: "the disk quota is used up; free some space or choose an --out on another disk",
    errno.EFBIG: "the file is larger than this filesystem or the file size limit (ulimit -f) allows",
    errno.EACCES: "check the permissions, or choose an --out you can write to",
    errno.EPERM: "check the permissions, or choose an --out you can write to",
    errno.EROFS: "the filesystem is read-only; choose an --out you can write to",
    errno.EEXIST: "a part of the path is a file, not a directory; choose another --out",
    errno.ENOTDIR: "a part of the path is a file, not a directory; choose another --out",
}


@contextlib.contextmanager
def reported_os_errors(out: str, tmp: str | None = None):
    """Turn an OSError into one OutputError line naming the file (as its final path, not the temp's)."""
    try:
        yield
    except OSError as e:
        raise OutputError(describe_os_error(e, out, tmp)) from None


def describe_os_error(e: OSError, out: str, tmp: str | None = None) -> str:
    filename = os.fspath(e.filename) if e.filename is not None else out
    if tmp is not None and (filename == tmp or filename.startswith(tmp + os.sep)):
        filename = out + filename[len(tmp):]
    reason = e.strerror or str(e)
    advice = _ERRNO_ADVICE.get(e.errno)
    return f"{filename}: {reason}" + (f"; {advice}" if advice else "") + (
        f" (while writing {out}; nothing was changed there)" if tmp is not None else "")
