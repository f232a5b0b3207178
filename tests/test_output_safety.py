"""`--out` never destroys what we did not write, and interrupted or failing writes leave no debris.

Each refusal is run through the real CLI entry point and must exit 2 with one stderr line and
leave every file under the test's workspace exactly as it was.
"""

import contextlib
import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import error_line, without_permission_override

from persimmon_export import cli
from persimmon_export.build import build
from persimmon_export.config import PersimmonConfig
from persimmon_export.demo import make_demo_checkpoint
from persimmon_export.files import MARKER, OutputError, atomic_directory, check_output, read_marker
from persimmon_export.load.checkpoint import CheckpointError, load_model, save_checkpoint, save_model
from persimmon_export.options import BuildOptions
from persimmon_runtime.manifest import Manifest

SMALL_BUILD = dict(dtype="float32", kv_capacity=16, max_batch=1, backend="onnxruntime")
CONSOLE = os.path.join(os.path.dirname(sys.executable), "persimmon-export")


def snapshot(root) -> dict:
    """Every path under root (links not followed) with its kind and content digest or link target."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                found[path] = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                found[path] = ("dir",)
            elif stat.S_ISREG(info.st_mode):
                with open(path, "rb") as f:
                    found[path] = ("file", hashlib.sha256(f.read()).hexdigest())
            else:
                found[path] = ("other", stat.S_IFMT(info.st_mode))
    return found


def temps_in(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith(".tmp-"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A user's area: a checkpoint, a build of it, an adept checkpoint layout and a project dir."""
    root = tmp_path_factory.mktemp("user")
    checkpoint = make_demo_checkpoint(str(root / "models" / "ck"))
    (root / "models" / "notes.txt").write_text("a sibling of the checkpoint")
    built = str(root / "builds" / "b")
    build(checkpoint, built, BuildOptions(**SMALL_BUILD))
    adept = root / "adept"
    (adept / "iter_0001000" / "mp_rank_00").mkdir(parents=True)
    (adept / "iter_0001000" / "mp_rank_00" / "model_optim_rng.pt").write_bytes(b"weights")
    (adept / "adept_vocab.model").write_bytes(b"vocab")
    project = root / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('my work')\n")
    (project / "README").write_text("mine")
    return root


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def refusal_cases(ws):
    ck, b, adept = f"{ws}/models/ck", f"{ws}/builds/b", f"{ws}/adept"
    pt = f"{adept}/iter_0001000/mp_rank_00/model_optim_rng.pt"
    return {
        "build --out . (a project dir)": (["build", "--checkpoint", ck, "--out", "."], "did not write"),
        "build --out the checkpoint": (["build", "--checkpoint", ck, "--out", ck], "is the input"),
        "build --out the checkpoint's parent": (["build", "--checkpoint", ck, "--out", f"{ws}/models"],
                                                "contains the input"),
        "build --out inside the checkpoint": (["build", "--checkpoint", ck, "--out", f"{ck}/build"],
                                              "lies inside the input"),
        "build --out via a link into the checkpoint": (["build", "--checkpoint", ck, "--out", f"{ws}/link-to-ck/b"],
                                                       "lies inside the input"),
        "build --overwrite --out holding the timing cache": (
            ["build", "--checkpoint", ck, "--out", b, "--overwrite", "--timing-cache", f"{b}/cache"],
            "contains the input"),
        "build --out the workspace root": (["build", "--checkpoint", ck, "--out", str(ws)], "contains the input"),
        "build --out /": (["build", "--checkpoint", ck, "--out", "/"], "filesystem root"),
        "build --out a file": (["build", "--checkpoint", ck, "--out", f"{ws}/project/README"], "not a directory"),
        "build --out under a file": (["build", "--checkpoint", ck, "--out", f"{ws}/project/README/b"],
                                     "a part of the path is a file"),
        "build --out a name too long": (["build", "--checkpoint", ck, "--out", "x" * 250], "File name too long"),
        "build --out a symlink": (["build", "--checkpoint", ck, "--out", f"{ws}/link-to-build"], "symbolic link"),
        "build --out a foreign dir": (["build", "--checkpoint", ck, "--out", f"{ws}/project"], "did not write"),
        "build --out a dir with a fake marker link": (["build", "--checkpoint", ck, "--out", f"{ws}/fake-marker"],
                                                      "did not write"),
        "build --out our build, no --overwrite": (["build", "--checkpoint", ck, "--out", b], "pass --overwrite"),
        "convert ROOT --out ROOT": (["convert", adept, "--out", adept], "is the input"),
        "convert the .pt --out ROOT": (["convert", pt, "--out", adept], "contains the input"),
        "convert --out the checkpoint we made, no --overwrite": (["convert", adept, "--out", ck],
                                                                 "pass --overwrite"),
        "convert --overwrite --out a build": (["convert", adept, "--out", b, "--overwrite"], "not a checkpoint"),
        "triton --build B --out B": (["triton", "--build", b, "--out", b], "is the input"),
        "triton --out inside the build": (["triton", "--build", b, "--out", f"{b}/repo"], "lies inside the input"),
        "triton --overwrite --out a checkpoint": (["triton", "--build", b, "--out", ck, "--overwrite"],
                                                  "not a Triton model repository"),
    }


@pytest.fixture(scope="module")
def hostile_paths(workspace):
    os.symlink(workspace / "models" / "ck", workspace / "link-to-ck")
    os.symlink(workspace / "builds" / "b", workspace / "link-to-build")
    fake = workspace / "fake-marker"
    fake.mkdir()
    os.symlink(workspace / "builds" / "b" / MARKER, fake / MARKER)  # borrowing our marker through a link
    os.mkfifo(fake / "pipe")  # must not be opened
    return workspace


@pytest.mark.parametrize("case", list(refusal_cases("WS")))
def test_refused_outputs_change_nothing(hostile_paths, case, capsys, monkeypatch):
    ws = hostile_paths
    argv, reason = refusal_cases(ws)[case]
    monkeypatch.chdir(ws / "project")
    before = snapshot(ws)
    code, err = run_cli(capsys, *argv)
    assert code == 2, err
    error_line(err)
    out = argv[argv.index("--out") + 1]
    assert os.path.abspath(out) in err and reason in err, err
    assert snapshot(ws) == before


def test_the_console_script_refuses_in_one_line(workspace):
    """The same refusal through the installed command, as in the issue (`build --out .` in a project)."""
    before = snapshot(workspace)
    result = subprocess.run([CONSOLE, "build", "--checkpoint", "../models/ck", "--out", "."],
                            cwd=workspace / "project", capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and error_line(result.stderr), result.stderr
    assert "is a non-empty directory that persimmon-export did not write" in result.stderr
    assert snapshot(workspace) == before


def test_an_empty_directory_may_be_used(workspace, tmp_path):
    (tmp_path / "empty").mkdir()
    build(str(workspace / "models" / "ck"), str(tmp_path / "empty"), BuildOptions(**SMALL_BUILD))
    Manifest.load(str(tmp_path / "empty"))
    assert read_marker(str(tmp_path / "empty"))["kind"] == "build" and temps_in(tmp_path) == []


def test_overwrite_replaces_our_previous_build(workspace, tmp_path, capsys):
    ck, out = str(workspace / "models" / "ck"), str(tmp_path / "b")
    build(ck, out, BuildOptions(**SMALL_BUILD))
    assert Manifest.load(out).max_batch == 1
    code, err = run_cli(capsys, "build", "--checkpoint", ck, "--out", out, "--dtype", "float32", "--kv-capacity", "16",
                        "--max-batch", "3", "--backend", "onnxruntime", "--overwrite")
    assert code == 0, err
    assert Manifest.load(out).max_batch == 3 and sorted(os.listdir(tmp_path)) == ["b"]


@pytest.mark.parametrize("added", ["other_model", "notes.txt"])
def test_overwrite_never_deletes_what_the_user_added_to_our_output(tmp_path, added):
    """e.g. a second model put into a repository we wrote: --overwrite must not take it along."""
    out = tmp_path / "repo"
    with atomic_directory(str(out), "triton") as tmp:
        os.makedirs(os.path.join(tmp, "persimmon", "1"))
    (out / added).mkdir() if "." not in added else (out / added).write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(OutputError, match=rf"also holds {added}, which persimmon-export did not write"):
        with atomic_directory(str(out), "triton", overwrite=True):
            pass
    assert snapshot(tmp_path) == before


def test_library_default_refuses_to_overwrite(workspace, tmp_path):
    out = str(tmp_path / "c")
    model = load_model(str(workspace / "models" / "ck"))
    save_model(model, out)
    with pytest.raises(OutputError, match=r"already holds a checkpoint written by persimmon-export; pass --overwrite"):
        save_model(model, out)
    save_model(model, out, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["c"]


# --- interrupted writes ----------------------------------------------------------------------

def test_an_interrupted_write_removes_its_temp_and_keeps_the_old_output(tmp_path):
    out = str(tmp_path / "out")
    with atomic_directory(out, "checkpoint") as tmp:
        open(os.path.join(tmp, "old"), "w").close()
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(out, "checkpoint", overwrite=True) as tmp:
            open(os.path.join(tmp, "new"), "w").close()
            raise KeyboardInterrupt
    assert sorted(os.listdir(tmp_path)) == ["out"] and sorted(os.listdir(out)) == [MARKER, "old"]


def test_sigterm_during_a_build_cleans_up_and_keeps_the_old_build(workspace, tmp_path):
    out = tmp_path / "b"
    build(str(workspace / "models" / "ck"), str(out), BuildOptions(**SMALL_BUILD))
    before = snapshot(tmp_path)
    process = subprocess.Popen([CONSOLE, "build", "--checkpoint", str(workspace / "models" / "ck"), "--out", str(out),
                                "--overwrite", "--dtype", "float32", "--kv-capacity", "16", "--backend", "onnxruntime"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not temps_in(tmp_path) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert temps_in(tmp_path), "the build never created its temp dir"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert snapshot(tmp_path) == before  # no temp left, the old build untouched
    Manifest.load(str(out), verify_checksums=True)


KILLED_WRITER = """
import os, sys, time
from persimmon_export.files import atomic_directory
with atomic_directory(sys.argv[1], "checkpoint") as tmp:
    open(os.path.join(tmp, "partial"), "wb").write(b"x" * 1000)
    print("writing", flush=True)
    time.sleep(60)
"""


def test_a_killed_writers_temp_is_removed_by_the_next_run(tmp_path, caplog):
    out = str(tmp_path / "out")
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, out], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "writing\n"
    (stale,) = temps_in(tmp_path)
    with caplog.at_level(logging.WARNING):  # while the writer lives, its temp is only reported
        check_output(out, "checkpoint")
    assert temps_in(tmp_path) == [stale] and f"{stale} is being written by pid {writer.pid}" in caplog.text
    writer.kill()
    writer.wait()
    caplog.clear()
    with caplog.at_level(logging.WARNING), atomic_directory(out, "checkpoint") as tmp:
        open(os.path.join(tmp, "complete"), "w").close()
    assert sorted(os.listdir(tmp_path)) == ["out"] and f"removed {tmp_path / stale}" in caplog.text


def test_a_crash_between_the_two_renames_is_recovered(tmp_path, caplog):
    """The state a crash after `out -> temp.old` and before `temp -> out` leaves: the old output comes back."""
    out = str(tmp_path / "out")
    with atomic_directory(out, "build") as tmp:
        open(os.path.join(tmp, "old"), "w").close()
    with atomic_directory(str(tmp_path / "new"), "build") as tmp:
        open(os.path.join(tmp, "new"), "w").close()
    os.rename(tmp_path / "new", tmp_path / ".tmp-out-k3x9_a0q")
    os.rename(out, tmp_path / ".tmp-out-k3x9_a0q.old")
    with caplog.at_level(logging.WARNING), pytest.raises(OutputError, match="pass --overwrite"):
        check_output(out, "build")
    assert sorted(os.listdir(tmp_path)) == ["out"] and sorted(os.listdir(out)) == [MARKER, "old"]
    assert f"restored {out}" in caplog.text


def test_temps_that_are_not_provably_ours_are_left_alone(tmp_path, caplog):
    (tmp_path / ".tmp-out-abcdefgh").mkdir()  # our naming, no marker: maybe the user's
    (tmp_path / ".tmp-out-abcdefgh" / "data").write_text("keep")
    (tmp_path / ".tmp-out-12345678").write_text("a file")
    elsewhere = tmp_path / ".tmp-out-zzzzzzzz"
    elsewhere.mkdir()  # being written on another host
    (elsewhere / MARKER).write_text(json.dumps({"written_by": "persimmon-export", "kind": "build",
                                                "state": "writing", "host": "other-host", "pid": 1}))
    before = snapshot(tmp_path)
    with caplog.at_level(logging.WARNING):
        check_output(str(tmp_path / "out"), "build")
    assert snapshot(tmp_path) == before
    assert caplog.text.count("left alone") == 3


# --- permission, disk full, file size limit ----------------------------------------------------

def test_no_write_permission_is_one_line(workspace, tmp_path):
    """The parent of --out is read-only. Root ignores permission bits, so it runs without that capability."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    result = subprocess.run([*without_permission_override(), CONSOLE, "build", "--checkpoint", str(workspace / "models" / "ck"),
                             "--out", str(locked / "b"), "--dtype", "float32", "--kv-capacity", "16",
                             "--backend", "onnxruntime"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and error_line(result.stderr), result.stderr
    assert f"{locked}/b: cannot create it (Permission denied); check the permissions" in result.stderr
    assert os.listdir(locked) == []


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 64 KiB tmpfs here ({mounted.stderr.strip()}); the file size limit test "
                    f"covers the same path")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_one_line_and_leaves_nothing(workspace, tiny_disk, capsys):
    code, err = run_cli(capsys, "build", "--checkpoint", str(workspace / "models" / "ck"), "--out",
                        str(tiny_disk / "b"), "--dtype", "float32", "--kv-capacity", "16", "--backend", "onnxruntime")
    assert code == 2 and error_line(err), err
    assert "No space left on device; the disk is full" in err and str(tiny_disk / "b") in err
    assert os.listdir(tiny_disk) == []


def test_a_full_disk_while_writing_safetensors(workspace, tiny_disk):
    model = load_model(str(workspace / "models" / "ck"))
    with pytest.raises(CheckpointError, match=r"model-00001\.safetensors: cannot write .*No space left"):
        save_model(model, str(tiny_disk / "c"))
    assert os.listdir(tiny_disk) == []


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_the_file_size_limit_is_one_line_and_leaves_nothing(workspace, tmp_path):
    result = subprocess.run([CONSOLE, "build", "--checkpoint", str(workspace / "models" / "ck"), "--out",
                             str(tmp_path / "b"), "--dtype", "float32", "--kv-capacity", "16", "--backend", "onnxruntime"],
                            capture_output=True, text=True, timeout=120, preexec_fn=_limit_file_size)
    assert result.returncode == 2 and error_line(result.stderr), result.stderr
    assert "File too large" in result.stderr and str(tmp_path / "b") in result.stderr
    assert os.listdir(tmp_path) == []


# --- shard size ------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["nan", "0", "-1", "inf", "-inf", "1e-12"])
def test_max_shard_gb_must_be_a_positive_size(workspace, tmp_path, capsys, value):
    code, err = run_cli(capsys, "convert", str(workspace / "adept"), "--out", str(tmp_path / "o"),
                        f"--max-shard-gb={value}")
    assert code == 2 and error_line(err) and "--max-shard-gb must be a positive" in err, err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("size", [0, -5, 2.5, True, None])
def test_save_checkpoint_refuses_a_bad_shard_size(tmp_path, size):
    config = PersimmonConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                             num_attention_heads=2)
    with pytest.raises(CheckpointError, match="max shard size must be a positive number of bytes"):
        save_checkpoint(iter([("x", torch.zeros(2))]), config, str(tmp_path / "o"), max_shard_bytes=size)
    assert os.listdir(tmp_path) == []


def test_help_explains_out_and_overwrite(capsys):
    for command in ("build", "convert", "triton"):
        with contextlib.suppress(SystemExit):
            cli.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "a new or empty directory, outside every input" in text and "--overwrite" in text


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signals_sent_during_the_swap_arrive_after_it(signum):
    """Between the two renames no signal may interrupt, whichever thread the OS delivers it to."""
    from persimmon_export.files import _signals_deferred
    from persimmon_runtime.console import Terminated, _raise_terminated

    # the CLI's handlers, whatever an earlier test or library left installed (an ignored SIGINT
    # would be deferred and then ignored too, correctly, and raise nothing here)
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_terminated),
                signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}
    reached_the_end = False
    try:
        with pytest.raises(KeyboardInterrupt) as raised:
            with _signals_deferred():
                sender = threading.Thread(target=os.kill, args=(os.getpid(), signum))
                sender.start()
                sender.join()
                time.sleep(0.2)  # the handler would run here, in the main thread, without the deferral
                reached_the_end = True
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert reached_the_end
    assert isinstance(raised.value, Terminated) == (signum == signal.SIGTERM)


def test_a_build_from_before_markers_can_be_overwritten_but_not_with_user_files(workspace, tmp_path):
    """Builds written before outputs carried a marker are recognised by their persimmon-build
    manifest and their file set; anything else in the directory keeps it foreign."""
    ck, out = str(workspace / "models" / "ck"), tmp_path / "b"
    build(ck, str(out), BuildOptions(**SMALL_BUILD))
    for name in (MARKER, "tokenizer_config.json", "genai_config.json"):  # as an older persimmon-export wrote it
        os.remove(out / name)
    with pytest.raises(OutputError, match="already holds a persimmon-export build; pass --overwrite"):
        build(ck, str(out), BuildOptions(**SMALL_BUILD))
    (out / "my-notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(OutputError, match="non-empty directory that persimmon-export did not write"):
        build(ck, str(out), BuildOptions(overwrite=True, **SMALL_BUILD))
    assert snapshot(tmp_path) == before
    os.remove(out / "my-notes.txt")
    build(ck, str(out), BuildOptions(overwrite=True, **SMALL_BUILD))
    assert read_marker(str(out))["kind"] == "build"
