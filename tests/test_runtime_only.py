"""A torch-free serving host: `pip install .` alone, as the README offers it, in a fresh venv.

persimmon-run, `persimmon-export --help`, doctor and triton must work there; build, parity,
convert and demo must say in one line what to install, and write nothing.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import error_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("pyproject.toml", "README.md", "exporter", "runtime", "plugins")
EXTRA = "pip install '.[export]' in a persimmon-deploy checkout"


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A new venv with this checkout installed the way a serving host installs it (from a copy, so
    the checkout gets no build/ or egg-info); pip takes numpy, sentencepiece and onnxruntime."""
    root = tmp_path_factory.mktemp("runtime-only")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:
        if os.path.isdir(os.path.join(ROOT, name)):
            shutil.copytree(os.path.join(ROOT, name), source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(os.path.join(ROOT, name), source / name)
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=120)
    pip = subprocess.run([str(root / "venv" / "bin" / "pip"), "install", "-q", str(source)],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    return root / "venv" / "bin"


def run(bin_dir, tool, *args, cwd=None):
    return subprocess.run([str(bin_dir / tool), *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_it_has_no_torch_and_no_exporter_dependencies(venv):
    probe = subprocess.run([str(venv / "python"), "-c", "import importlib.util as u; print([m for m in "
                            "('torch', 'onnx', 'safetensors', 'tqdm') if u.find_spec(m)])"],
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "[]", probe.stderr


def test_persimmon_run_generates(venv, tiny_build):
    result = run(venv, "persimmon-run", tiny_build, "Hello", "--max-new-tokens", "4", "--no-verify")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n") and "finish_reason length: " in result.stderr


def test_export_help_doctor_and_triton_work(venv, tiny_build, tmp_path):
    help_text = run(venv, "persimmon-export", "--help")
    assert help_text.returncode == 0 and "doctor" in help_text.stdout and "triton" in help_text.stdout
    doctor = run(venv, "persimmon-export", "doctor")
    assert doctor.returncode == 0, doctor.stderr
    assert "not installed (the exporter needs it" in doctor.stdout  # the torch line
    findings = json.loads(run(venv, "persimmon-export", "doctor", "--json").stdout)
    assert findings["onnxruntime"].split(",")[0] and "not installed" in findings["torch"]
    repo = tmp_path / "repo"
    triton = run(venv, "persimmon-export", "triton", "--build", tiny_build, "--out", str(repo), "-q")
    assert triton.returncode == 0 and triton.stderr == "", triton.stderr
    assert triton.stdout.startswith(f"wrote model repository {repo}")
    assert (repo / "persimmon" / "config.pbtxt").is_file()


@pytest.mark.parametrize("command", [["build", "--checkpoint", "{checkpoint}", "--out", "{out}"],
                                     ["parity", "--checkpoint", "{checkpoint}", "--build", "{build}"],
                                     ["convert", "{checkpoint}", "--out", "{out}"],
                                     ["demo", "--out", "{out}"]], ids=lambda command: command[0])
def test_exporter_commands_say_what_to_install(venv, tiny_checkpoint, tiny_build, tmp_path, command):
    out = tmp_path / "out"
    args = [a.format(checkpoint=tiny_checkpoint, build=tiny_build, out=out) for a in command]
    result = run(venv, "persimmon-export", *args)
    line = error_line(result.stderr)
    assert result.returncode == 2 and result.stdout == ""
    assert line.startswith(f"persimmon-export {command[0]}: error: {command[0]} needs torch") and EXTRA in line
    assert not out.exists()
