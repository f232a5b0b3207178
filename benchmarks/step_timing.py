"""Per-token timing of real generation, taken the same way for every runtime.

A run records one timestamp when the request starts and one as each generated token becomes
available: our Scheduler's `on_step` (after every model step), or a `generate()` streamer for
transformers and optimum-intel (`put` is called with the prompt before prefill, then with each
new token). From those: time to first token (the prefill, as the user waits for it) and the
decode step times, of which p50, p99 and tokens/s are reported. p99 of one run's 127 steps lies
between its third- and second-slowest step, so `median_run` takes p50 and p99 over the steps of
all its runs. No torch
or runtime imports here: benchmarks/openvino_peer.py uses it from the OpenVINO venv.
"""

from __future__ import annotations

import time

import numpy as np


class StampStreamer:
    """A `generate(streamer=...)` streamer that keeps a timestamp per call of `put` (any batch)."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def token_stamps(self) -> list[float]:
        """The times each new token (each batch of tokens) arrived: every put after the prompt's."""
        return self.stamps[1:]


def time_generate(model, ids: list[list[int]], new_tokens: int) -> tuple[dict, list[list[int]]]:
    """Greedy `model.generate` (transformers or optimum-intel) of `new_tokens` per row, timed per
    token; returns the summary and each row's new ids."""
    import torch

    input_ids = torch.tensor(ids)
    streamer = StampStreamer()
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=streamer)
    return summarize(started, streamer.token_stamps(), len(ids), len(ids[0])), out[:, len(ids[0]):].tolist()


def summarize(started: float, token_stamps: list[float], batch: int, prompt_tokens: int) -> dict:
    """Prefill and decode figures from the request's start and the arrival time of each new token."""
    if len(token_stamps) < 2:
        raise ValueError("need at least two generated tokens to time a decode step")
    ttft = token_stamps[0] - started
    steps = np.diff(np.array(token_stamps))
    return {"ttft_s": ttft, "prefill_tok_s": batch * prompt_tokens / ttft,
            "decode_tok_s": batch * len(steps) / float(steps.sum()), "new_tokens": len(token_stamps),
            **step_figures(steps), "step_ms": [round(float(s) * 1e3, 3) for s in steps]}


def step_figures(steps) -> dict:
    """p50, p99, max of decode step times (seconds), the slowest steps' numbers (1-based), and the
    first decode step over p50: after a long prompt, that step is where a growing cache stalled."""
    steps = np.asarray(steps)
    p50, p99 = (float(np.percentile(steps, q)) for q in (50, 99))
    return {"step_p50_ms": p50 * 1e3, "step_p99_ms": p99 * 1e3, "step_max_ms": float(steps.max()) * 1e3,
            "p99_over_p50": p99 / p50, "first_step_over_p50": float(steps[0]) / p50,
            "slowest_steps": [int(i) + 1 for i in np.argsort(steps)[::-1][:3]]}


def median_run(run_once, repeats: int) -> tuple[dict, list]:
    """Call `run_once()` -> (figures, greedy ids) `repeats` times; return the run whose decode
    tokens/s is the median (a VM's runs of one case differed by up to 1.2x for our runtime here,
    more for the peers), with every run's decode
    tokens/s kept in `decode_tok_s_runs`, and step p50/p99/max taken over the steps of every run
    (`steps_timed` of them; `step_ms` and `slowest_steps` are the median run's own)."""
    runs = sorted((run_once() for _ in range(repeats)), key=lambda run: run[0]["decode_tok_s"])
    figures, greedy = runs[len(runs) // 2]
    pooled = step_figures(np.concatenate([run[0]["step_ms"] for run in runs]) / 1e3)
    return {**figures, **{key: pooled[key] for key in ("step_p50_ms", "step_p99_ms", "step_max_ms", "p99_over_p50")},
            # the slowest first step of all the runs
            "first_step_over_p50": max(run[0]["step_ms"][0] for run in runs) / pooled["step_p50_ms"],
            "steps_timed": sum(len(run[0]["step_ms"]) for run in runs),
            "decode_tok_s_runs": [run[0]["decode_tok_s"] for run in runs]}, greedy
