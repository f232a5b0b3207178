"""Build integrity: every file a build lists must have its recorded size and sha256 before we serve it.

Hashing costs about one read of the build (an 8B fp16 build is ~18 GB: about 27 s from the
page cache, 63 s cold, on a 2-core AMD EPYC, extrapolated from 4 GB in docs/benchmarks.md), so a
successful verification is remembered in a per-user record and an unchanged file is not hashed
again. "Unchanged" means same size, mtime, ctime, inode and device: a same-size rewrite changes ctime (which, unlike
mtime, cannot be set back), and a replaced file has a new inode. The record is bound to the
manifest's own sha256, so a new or edited manifest starts from scratch.

What this protects against: corruption (bad disks, truncated or interrupted copies, a file
from another build, flipped bytes). It is not a signature: whoever can write the build
directory can rewrite the manifest's checksums too, and whoever can write the user's record
directory can forge records; it checks files at load, not while they are served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import tempfile
import time

from .errors import PersimmonError

log = logging.getLogger(__name__)
PROGRESS_BYTES = 1 << 30  # a progress line per GiB hashed (an 8B build: about 18 lines over 27-63 s)

CACHE_DIR_ENV = "PERSIMMON_CACHE_DIR"
# A file changed within this long before it was hashed is not recorded: a later same-size write
# could land in the same timestamp tick and keep ctime unchanged. 2 s covers coarse filesystems
# (FAT has 2 s timestamps), and the clock's tick.
RACY_MARGIN_NS = 2_000_000_000
_STAT_FIELDS = ("size", "mtime_ns", "ctime_ns", "inode", "device")


class IntegrityError(PersimmonError):
    """A build file is missing, has the wrong size or the wrong sha256."""


def sha256_file(path: str, chunk_bytes: int = 1 << 24, progress=None) -> str:
    """The file's sha256; `progress(bytes)` after each chunk when given."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest.hexdigest()


class _Progress:
    """INFO lines while a build's files are hashed: where it stands every PROGRESS_BYTES, then the time."""

    def __init__(self, directory: str, total: int):
        self.directory, self.total, self.done, self.shown = directory, total, 0, 0
        self.started = time.perf_counter()
        log.info(f"verifying the sha256 of {directory} ({total / 2**30:.2f} GiB; first load or changed files, "
                 f"remembered for later loads) ...")

    def __call__(self, count: int) -> None:
        self.done += count
        if self.done - self.shown >= PROGRESS_BYTES:
            self.shown = self.done
            log.info(f"  {self.done / 2**30:.1f} / {self.total / 2**30:.1f} GiB verified")

    def close(self) -> None:
        log.info(f"verified {self.directory} in {time.perf_counter() - self.started:.1f} s")


def check_sizes(directory: str, files: dict) -> None:  # name -> manifest.FileEntry
    """Cheap checks done on every load: each listed file is a regular file of its recorded size."""
    for name, info in files.items():
        path = os.path.join(directory, name)
        try:
            found = os.stat(path)
        except FileNotFoundError:
            raise IntegrityError(f"{path}: listed in the manifest but missing; the build is incomplete") from None
        except OSError as e:
            raise IntegrityError(f"{path}: cannot be read ({e.strerror}); check its permissions") from None
        if not stat.S_ISREG(found.st_mode):
            raise IntegrityError(f"{path}: not a regular file; the build is damaged, rebuild it")
        if found.st_size != info.bytes:
            raise IntegrityError(f"{path}: {found.st_size} bytes, the manifest says {info.bytes}; "
                                 f"the file is truncated or from another build")


def verify_checksums(directory: str, files: dict, manifest_sha256: str) -> None:
    """Hash every listed file not verified unchanged before; raise IntegrityError on a mismatch."""
    record_path = _record_path(directory)
    known = _read_record(record_path, manifest_sha256)
    verified, pending = {}, {}
    for name, info in files.items():
        entry = _stat_entry(os.path.join(directory, name))
        if known.get(name) == {**entry, "sha256": info.sha256}:
            verified[name] = known[name]
        else:
            pending[name] = entry
    progress = _Progress(directory, sum(entry["size"] for entry in pending.values())) if pending else None
    for name, entry in pending.items():
        path, info = os.path.join(directory, name), files[name]
        started = time.time_ns()
        digest = _hash_unchanging(path, entry, progress)
        if digest != info.sha256:
            raise IntegrityError(f"{path}: sha256 {digest[:16]}... differs from the manifest's "
                                 f"{info.sha256[:16]}...; the file is corrupt or from another build: rebuild "
                                 f"or copy the build again")
        if entry["ctime_ns"] < started - RACY_MARGIN_NS:
            verified[name] = {**entry, "sha256": digest}
    if progress is not None:
        progress.close()
    if record_path and verified != known:
        _write_record(record_path, {"build_dir": os.path.realpath(directory), "manifest_sha256": manifest_sha256,
                                    "files": verified})


def _hash_unchanging(path: str, entry: dict, progress=None) -> str:
    """sha256 of `path`, refusing a file that changed while it was read (the digest would be of neither)."""
    digest = sha256_file(path, progress=progress)
    if _stat_entry(path) != entry:
        raise IntegrityError(f"{path}: changed while it was being verified; load again once whatever writes it "
                             f"has finished")
    return digest


def _stat_entry(path: str) -> dict:
    found = os.stat(path)
    values = (found.st_size, found.st_mtime_ns, found.st_ctime_ns, found.st_ino, found.st_dev)
    return dict(zip(_STAT_FIELDS, values))


# ---- the per-user verification record ----

def records_dir() -> str | None:
    """Where records live: $PERSIMMON_CACHE_DIR, else $XDG_CACHE_HOME/persimmon, else ~/.cache/persimmon.

    Records are kept out of the build directory: builds are often read-only (containers,
    Triton repositories), and a record there would be forgeable by anyone who can write it.
    """
    base = os.environ.get(CACHE_DIR_ENV)
    if not base:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "persimmon")
    return os.path.join(base, "verified") if os.path.isabs(base) else None  # no home: no records


def _record_path(directory: str) -> str | None:
    folder = records_dir()
    if folder is None:
        return None
    key = hashlib.sha256(os.fsencode(os.path.realpath(directory))).hexdigest()[:32]
    return os.path.join(folder, f"{key}.json")


def _read_record(path: str | None, manifest_sha256: str) -> dict:
    """The files verified before under this manifest, or {}: a record that is missing, unreadable,
    not ours or for another manifest only costs a re-hash."""
    if path is None or not _private(os.path.dirname(path)):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(record, dict) or record.get("manifest_sha256") != manifest_sha256:
        return {}
    files = record.get("files")
    return files if isinstance(files, dict) else {}


def _write_record(path: str, record: dict) -> None:
    """Replace the record atomically (concurrent loads each write a whole one); skip it if we cannot
    write (read-only home, full disk): the next load then hashes again."""
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        if not _private(folder):
            return
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(record, f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass


def _private(folder: str) -> bool:
    """Only a folder that we own and that others cannot write holds records we trust."""
    try:
        found = os.stat(folder)
    except OSError:
        return False
    return found.st_uid == os.getuid() and not found.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
