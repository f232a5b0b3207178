"""Inputs are read as regular files only: a FIFO hung a read, `config.json -> /dev/zero` read
without bound, `model.safetensors -> /dev/urandom` gave a misleading error."""

import os
import shutil
import threading

import pytest

from conftest import error_line
from persimmon_export import cli
from persimmon_runtime import Tokenizer
from persimmon_runtime.errors import PersimmonError


def _replace(checkpoint, tmp_path, name, kind):
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    os.remove(copy / name)
    if kind == "fifo":
        os.mkfifo(copy / name)
    else:
        os.symlink(kind, copy / name)
    return copy


@pytest.mark.parametrize("name, kind, shown", [
    ("config.json", "fifo", "is a FIFO, not a regular file"),
    ("config.json", "/dev/zero", "is a device, not a regular file"),
    ("model.safetensors", "fifo", "is a FIFO, not a regular file"),
    ("model.safetensors", "/dev/urandom", "is a device, not a regular file"),
    ("tokenizer.model", "fifo", "is a FIFO, not a regular file"),
])
def test_special_files_in_a_checkpoint_are_one_line_and_never_block(tiny_checkpoint, tmp_path, capsys, name, kind,
                                                                   shown):
    copy = _replace(tiny_checkpoint, tmp_path, name, kind)
    done = {}
    worker = threading.Thread(target=lambda: done.update(code=cli.main(
        ["build", "--checkpoint", str(copy), "--out", str(tmp_path / "b"), "--dtype", "float32", "-q"])))
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the build blocked on a special file"
    line = error_line(capsys.readouterr().err)
    assert done["code"] == 2 and f"{copy / name}: {shown}" in line and not (tmp_path / "b").exists()


def test_a_fifo_as_calibration_file_is_refused(tiny_checkpoint, tmp_path, capsys):
    fifo = tmp_path / "prompts.txt"
    os.mkfifo(fifo)
    code = cli.main(["build", "--checkpoint", tiny_checkpoint, "--out", str(tmp_path / "b"), "--dtype", "float16",
                     "--calibration-file", str(fifo), "-q"])
    assert code == 2 and "is a FIFO, not a regular file" in error_line(capsys.readouterr().err)


def test_a_tokenizer_config_that_is_a_device_is_refused(tiny_checkpoint, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, copy)
    (copy / "tokenizer_config.json").unlink(missing_ok=True)
    os.symlink("/dev/zero", copy / "tokenizer_config.json")
    with pytest.raises(PersimmonError, match=r"tokenizer_config.json: is a device, not a regular file"):
        Tokenizer.from_dir(str(copy))
