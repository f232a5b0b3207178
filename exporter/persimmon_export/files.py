"""Writing output directories that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_directory(out_dir: str):
    """Yield a temp dir beside `out_dir`; on success it replaces `out_dir`, on error it is removed.

    An existing `out_dir` is only moved aside once the new one is complete, so a failed or
    interrupted write never leaves a half-written directory behind.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out_dir) + "-", dir=parent)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp (and safetensors) create private files
        for name in os.listdir(tmp):
            path = os.path.join(tmp, name)
            if os.path.isfile(path) and not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)
        if os.path.exists(out_dir):
            old = tmp + ".old"
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
