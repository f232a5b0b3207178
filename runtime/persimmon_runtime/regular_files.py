"""Reading inputs as regular files only, with a size bound: a FIFO would hang a read, a device
(`config.json -> /dev/zero`) would never end one, a /proc file lies about its size."""

from __future__ import annotations

import os
import stat

from .errors import PersimmonError


class NotRegularError(PersimmonError):
    """An input that is not a regular file, or larger than its format allows."""


def check_regular(path: str, what: str = "") -> int:
    """The size of `path` if it is (or a symbolic link leads to) a regular file, else one line.
    Opened non-blocking, so that a FIFO is refused instead of waiting for a writer."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise NotRegularError(f"{path}: cannot open {what or 'it'} ({e.strerror or e})") from None
    try:
        info = os.fstat(descriptor)
    finally:
        os.close(descriptor)
    if not stat.S_ISREG(info.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device" if stat.S_ISCHR(info.st_mode) or \
            stat.S_ISBLK(info.st_mode) else "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise NotRegularError(f"{path}: is {kind}, not a regular file; {what or 'an input'} must be a file")
    return info.st_size


def read_regular(path: str, max_bytes: int, what: str = "") -> bytes:
    """The bytes of regular file `path`, refusing one larger than `max_bytes` (the format's bound)."""
    size = check_regular(path, what)
    if size > max_bytes:
        raise NotRegularError(f"{path}: {size:,} bytes, more than {max_bytes:,} for {what or 'this file'}; it is "
                              f"not one")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while we looked
        raise NotRegularError(f"{path}: more than {max_bytes:,} bytes for {what or 'this file'}; it is not one")
    return data
