"""The machine a benchmark runs on: its CPU, how much of it was ours, its memory bandwidth.

Shared by the scripts in benchmarks/ (each runs with benchmarks/ on sys.path). No torch here:
benchmarks/openvino_peer.py imports it from the OpenVINO venv too.
"""

from __future__ import annotations

import glob
import os
import platform
import statistics
import time

import numpy as np


def cpu_model() -> str:
    from persimmon_runtime.cpu import cpu_model as model  # here, not above: the OpenVINO venv lacks the package

    return model()


def cpu_features() -> dict:
    """What a prefill/decode figure depends on: the CPU model, its matrix/vector units (the
    RECORDED_FLAGS it has) and the integer unit our int8 prefill graph would run on."""
    from persimmon_runtime.cpu import RECORDED_FLAGS, cpu_flags, int8_unit

    flags = cpu_flags()
    return {"model": cpu_model(), "cores": os.cpu_count(), "flags": [f for f in RECORDED_FLAGS if f in flags],
            "int8_unit": int8_unit(flags)}


def machine() -> str:
    features = cpu_features()
    return f"{platform.machine()}, {os.cpu_count()} cores, {features['model']} ({' '.join(features['flags'])})"


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _machine_busy_s() -> float:
    """CPU seconds all cores have spent working since boot (/proc/stat: user, nice, system, irq, softirq)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return (ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6]) / os.sysconf("SC_CLK_TCK")


def group_cpu_s(pgid: int) -> float:
    """CPU seconds used so far by the live processes of process group `pgid` (the server and its stubs)."""
    ticks = 0
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:  # exited while we looked
            continue
        if int(fields[2]) == pgid:
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


class CpuShare:
    """Cores in use while a measurement runs: the benchmark's own (this process, plus what
    `own_extra` counts, e.g. the server) and the rest, other work on a shared machine. Starts
    after waiting up to `wait_idle_s` for the machine to be idle."""

    def __init__(self, own_extra=lambda: 0.0, wait_idle_s: float = 0.0):
        self.waited_s = wait_until_idle(wait_idle_s) if wait_idle_s > 0 else 0.0
        self.own_extra = own_extra
        self.start = self._now()

    def _now(self) -> tuple:
        return time.perf_counter(), _machine_busy_s(), time.process_time() + self.own_extra()

    def result(self) -> dict:
        wall, machine, own = (end - start for end, start in zip(self._now(), self.start))
        return {"waited_for_idle_s": self.waited_s, "wall_s": wall, "machine_busy_cores": machine / wall,
                "benchmark_cores": own / wall, "other_work_cores": max(0.0, machine - own) / wall}


def wait_until_idle(limit_s: float, busy_cores: float = 0.25) -> float:
    """Wait (up to limit_s) until the machine, with this benchmark idle between measurements, has
    stayed under `busy_cores` of other work for 2 s; return the seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit_s:
        busy = _machine_busy_s()
        time.sleep(2)
        if (_machine_busy_s() - busy) / 2 < busy_cores:
            break
    return time.perf_counter() - started


def cpu_note(cpu: dict) -> str:
    waited = f", waited {cpu['waited_for_idle_s']:.0f} s for an idle machine" if cpu["waited_for_idle_s"] >= 3 else ""
    return f"[cores: this benchmark {cpu['benchmark_cores']:.2f}, other work {cpu['other_work_cores']:.2f}{waited}]"


def measure_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict:
    """Read bandwidth (bytes/s) by several methods, each the best of `repeats`; "best" is the largest.

    Decode reads every weight once per token, so read bandwidth bounds it. No single method is a
    true upper bound on its own (a 2-thread sum reached only ~96% of what our decode achieved once):
    the methods include the decode's own access pattern, a float32 matrix-vector product, in torch
    and in onnxruntime (the kernel our runtime runs), over a matrix far larger than the caches.
    """
    import onnxruntime
    import torch
    from onnx import TensorProto, helper, numpy_helper

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    rows, cols = int(gib * 2**30) // (4 * 4096), 4096
    matrix = torch.rand(rows, cols)
    vector = torch.rand(cols)
    flat = matrix.view(-1)
    weights = matrix.numpy().T  # [cols, rows]: x[1, cols] @ W, as our graphs store linear weights
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cols])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows])],
                              [numpy_helper.from_array(np.ascontiguousarray(weights), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((1, cols), dtype=np.float32)
    methods = {"torch_sum": lambda: flat.sum(), "torch_matvec": lambda: torch.mv(matrix, vector),
               "onnxruntime_matvec": lambda: session.run(None, {"x": x})}
    result = {}
    for name, fn in methods.items():
        fn()
        best = min(_seconds(fn) for _ in range(repeats))
        result[name] = matrix.numel() * 4 / best
    result["best"] = max(result.values())
    return result


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fixed_work_jitter(step_s: float, steps: int) -> dict:
    """What this machine alone adds to a step's spread, measured right after a step measurement:
    p50, p99 and p99/p50 of `steps` runs of one unchanging piece of pure-Python work that takes
    about `step_s`, on one thread, touching no memory to speak of. Every run does the same work,
    so its spread is the machine's: interrupts, the hypervisor, neighbours on the host. It changes
    over minutes (1.09 to 2.09 between the cases of one benchmarks/run.py run here), which is why
    it is taken next to each measurement. One thread is the least a step can be exposed to: our
    steps run on every core and wait for the slowest. p50_ms says how close to `step_s` the
    calibration came.
    """
    def work(iterations: int) -> int:
        total = 0
        for i in range(iterations):
            total += i
        return total

    iterations = 100_000
    for _ in range(2):  # calibrate, then again at about the length wanted (a big sum's ints cost more)
        iterations = max(1, round(iterations * step_s / timed(lambda: work(iterations), 5)))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        work(iterations)
        times.append(time.perf_counter() - start)
    p50, p99 = (float(np.percentile(times, q)) for q in (50, 99))
    return {"p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3, "p99_over_p50": p99 / p50}
