"""The tritonserver that examples/setup.sh unpacks into .cache, started on 127.0.0.1 by the
documented command (examples/tritonserver.sh) and stopped clean: one way for tests/test_triton.py
and benchmarks/serving.py (no pytest here)."""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "tritonserver.sh")
SERVER = os.path.join(ROOT, ".cache", "tritonserver", "pytriton", "tritonserver", "bin", "tritonserver")
STUB = os.path.join(ROOT, ".cache", "triton-backends", "python", "triton_python_backend_stub")
MODEL_PYTHON = os.path.join(ROOT, ".cache", "triton-python")  # numpy, onnxruntime, sentencepiece for the stub
SHM_REGIONS = "/dev/shm/triton_python_backend_shm_region_*"


class Unavailable(Exception):
    """No tritonserver in .cache (examples/setup.sh fetches it on Linux x86_64)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(repository: str, workdir, runtime_dir: str, *options: str, metrics: bool = True,
          ready_timeout_s: float = 90) -> dict:
    """Start tritonserver with examples/tritonserver.sh on free ports in a new session (its own
    process group), its stubs importing `runtime_dir`; wait until ready. Raises Unavailable, or
    RuntimeError with the log's tail when it exits or is not ready in time (after stopping it)."""
    if not (os.path.isfile(SERVER) and os.path.isfile(STUB) and os.path.isdir(MODEL_PYTHON)):
        raise Unavailable("no tritonserver in .cache (examples/setup.sh fetches it on Linux x86_64)")
    http, grpc, metrics_port = free_port(), free_port(), free_port()
    metric_flags = (["--allow-gpu-metrics", "false", "--metrics-port", str(metrics_port)] if metrics
                    else ["--allow-metrics", "false"])
    log = open(os.path.join(str(workdir), "tritonserver.log"), "w+")
    regions_before = set(glob.glob(SHM_REGIONS))
    process = subprocess.Popen(["bash", SCRIPT, repository, "--http-port", str(http), "--grpc-port", str(grpc),
                                *metric_flags, *options], stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "PERSIMMON_RUNTIME_DIR": runtime_dir}, start_new_session=True)
    server = {"http": f"http://127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}", "process": process, "log": log,
              "metrics": f"http://127.0.0.1:{metrics_port}/metrics", "regions_before": regions_before}
    deadline = time.monotonic() + ready_timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"{server['http']}/v2/health/ready", timeout=2).status == 200:
                return server
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.5)
    failure = (f"tritonserver exited with {process.returncode}" if process.poll() is not None
               else f"tritonserver not ready after {ready_timeout_s:g} s")
    stop(server)
    with open(log.name) as f:
        raise RuntimeError(f"{failure}:\n{f.read()[-3000:]}")


def group_members(pgid: int) -> list[int]:
    """PIDs of the live processes in process group pgid (the server and its backend stubs)."""
    members = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:  # exited while we looked
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.split("/")[2]))
    return members


def regions_in_use() -> set[str]:
    """Shared-memory regions some live process maps: another server's, never to be removed."""
    used = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            used.update(line.split()[-1] for line in open(maps) if "triton_python_backend_shm_region_" in line)
        except (OSError, IndexError):
            continue
    return used


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # every member has exited already
        pass


def stop(server: dict, sig: int = signal.SIGTERM) -> list[str]:
    """Stop the server and everything it started; return the shared-memory regions removed.

    `sig` goes to the whole process group, so the Python-backend stubs get it too (a server
    killed alone leaves them orphaned). SIGTERM lets Triton unload its models and remove its
    shared memory; whatever is left after 30 s, or after SIGKILL, is killed, and the regions
    this server created that no live process maps any more are removed.
    """
    process = server["process"]
    _signal_group(process.pid, sig)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    if group_members(process.pid):
        _signal_group(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    for _ in range(100):  # stubs killed by SIGKILL vanish asynchronously
        if not group_members(process.pid):
            break
        time.sleep(0.05)
    leaked = set(glob.glob(SHM_REGIONS)) - server["regions_before"] - regions_in_use()
    for region in leaked:
        os.unlink(region)
    server["log"].close()
    return sorted(leaked)


def post(server: dict, path: str, body, timeout: float = 120) -> tuple[int, str]:
    """(HTTP status, reply text) of a POST to the server's `path` (e.g. "v2/models/m/infer"); body: a
    dict sent as JSON, or raw bytes. An error status is returned, not raised: its reply is the answer."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{server['http']}/{path}", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
