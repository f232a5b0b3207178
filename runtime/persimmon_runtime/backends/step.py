"""What every backend checks before a step: the device it is asked for, and the step's inputs
against the started batch and the cache (the graphs do not bound-check their cache writes)."""

from __future__ import annotations

import re

import numpy as np

from ..errors import PersimmonError
from ..manifest import Manifest


def parse_device(device) -> tuple[str, int]:
    """'cpu', 'cuda' or 'cuda:N' -> (kind, index); anything else is refused in one line."""
    if not (isinstance(device, str) and re.fullmatch(r"cpu|cuda(:\d{1,3})?", device)):
        raise PersimmonError(f"device {device!r} is not 'cpu', 'cuda' or 'cuda:N' (N a GPU index, e.g. cuda:0)")
    kind, _, index = device.partition(":")
    return kind, int(index or 0)


def check_step(manifest: Manifest, batch: int, input_ids, first_slot, token_count, attention_mask,
               first_row: int = 0) -> None:
    """Refuse, naming the values, a step that would write or read outside the KV cache.

    The cache update (ONNX TensorScatter; TensorRT's KV-cache-update layer) writes all `seq`
    new slots of a row, padding included, at first_slot .. first_slot + seq - 1 and
    assumes they fit: onnxruntime fails deep inside, TensorRT writes out of bounds. `batch` is
    the batch the backend was started for (0: not started); its buffers hold that many rows, of
    which the step uses input_ids.shape[0] from `first_row` on.
    """
    if batch < 1:
        raise PersimmonError("step() before start(): start the backend for a batch first")
    arrays = {"input_ids": input_ids, "first_slot": first_slot, "token_count": token_count,
              "attention_mask": attention_mask}
    for name, value in arrays.items():
        if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.integer):
            kind = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
            raise PersimmonError(f"step input {name} must be an integer numpy array, got {kind}")
    _check_shapes(batch, first_row, input_ids, first_slot, token_count, attention_mask)
    _check_slots(manifest.kv_capacity, input_ids.shape[1], first_slot, token_count, attention_mask.shape[1])
    check_token_ids(input_ids, manifest.model.vocab_size)


def check_token_ids(input_ids: np.ndarray, vocab: int) -> None:
    """Refuse ids outside the embedding table (the graph's Gather fails deep inside on them)."""
    outside = (input_ids < 0) | (input_ids >= vocab)
    if outside.any():
        row, column = np.argwhere(outside)[0]
        raise PersimmonError(f"input_ids[{row}, {column}] = {input_ids[row, column]} is not a token id "
                             f"(0..{vocab - 1})")


def _check_shapes(batch: int, first_row, input_ids, first_slot, token_count, attention_mask) -> None:
    if isinstance(first_row, bool) or not (isinstance(first_row, (int, np.integer)) and 0 <= first_row < batch):
        raise PersimmonError(f"first_row {first_row!r} is not a row of the {batch} the backend was started for")
    rows = batch - first_row  # the most this step can use
    if input_ids.ndim != 2 or not 1 <= input_ids.shape[0] <= rows or input_ids.shape[1] < 1:
        raise PersimmonError(f"input_ids has shape {input_ids.shape}; the backend was started for {batch} rows: "
                             f"expected (1..{rows}, seq >= 1) from row {first_row}")
    rows = input_ids.shape[0]
    for name, value in (("first_slot", first_slot), ("token_count", token_count)):
        if value.shape != (rows,):
            raise PersimmonError(f"{name} has shape {value.shape}, expected ({rows},): one per row")
    if attention_mask.ndim != 2 or attention_mask.shape[0] != rows or attention_mask.shape[1] < 1:
        raise PersimmonError(f"attention_mask has shape {attention_mask.shape}, expected ({rows}, slots >= 1)")


def _check_slots(capacity: int, seq: int, first_slot, token_count, width: int) -> None:
    def first(rows):
        return int(np.flatnonzero(rows)[0])

    if (first_slot < 0).any():
        row = first(first_slot < 0)
        raise PersimmonError(f"first_slot {first_slot[row]} of row {row} is negative")
    # compared as capacity - seq: first_slot + seq could wrap around int64
    if (first_slot > capacity - seq).any():
        row = first(first_slot > capacity - seq)
        raise PersimmonError(f"row {row}: first_slot {first_slot[row]} + {seq} new tokens exceeds the KV "
                             f"cache capacity {capacity} of this build")
    if ((token_count < 1) | (token_count > seq)).any():
        row = first((token_count < 1) | (token_count > seq))
        raise PersimmonError(f"token_count {token_count[row]} of row {row} is outside 1..{seq} (the new tokens "
                             f"in this step)")
    if width > capacity:
        raise PersimmonError(f"attention_mask covers {width} slots, past the KV cache capacity {capacity}")
    reach = first_slot + token_count  # each row's last real token sits at slot reach - 1
    if (reach > width).any():
        row = first(reach > width)
        raise PersimmonError(f"attention_mask covers {width} slots, but row {row}'s last new token is at slot "
                             f"{reach[row] - 1}")


def run_rows(run, layout: str, input_ids, first_slot, token_count, attention_mask, first_row: int) -> np.ndarray:
    """`run(input_ids, first_slot, token_count, attention_mask, first_row)` for the step, or, where a
    `capacity` graph needs it, for each row alone, cut to its tokens: a multi-token step over rows
    that already hold tokens (GroupQueryAttention's CPU kernel runs new tokens over cached ones for
    one row at a time, and such a row's tokens must fill the step: see `step_feeds`)."""
    seq = input_ids.shape[1]
    if layout == "capacity" and seq > 1 and first_slot.any() and (len(input_ids) > 1 or (token_count != seq).any()):
        return np.concatenate([run(input_ids[r:r + 1, :token_count[r]], first_slot[r:r + 1], token_count[r:r + 1],
                                   attention_mask[r:r + 1], first_row + r) for r in range(len(input_ids))])
    return run(input_ids, first_slot, token_count, attention_mask, first_row)


def step_feeds(input_names, input_ids, first_slot, token_count, attention_mask) -> dict[str, np.ndarray]:
    """The graph's step inputs (int64, contiguous) from the backends' four, for a checked step.

    A graph that takes input_ids and attention_mask alone (the `capacity` layout: see
    manifest.STEP_INPUTS) holds a row's tokens in its first slots, as many as its mask's 1s: its new
    tokens fill the step up to there, or start at slot 0 (right padding). So the mask is 1s up to
    first_slot + token_count, then 0s, at least seq wide. Such a graph reads no mask values (its
    GroupQueryAttention cannot skip a slot): a caller's 0 below that is refused, and a row that
    holds tokens must fill the step (`run_rows` runs it alone, cut to its tokens)."""
    arrays = {"input_ids": input_ids, "first_slot": first_slot, "token_count": token_count,
              "attention_mask": attention_mask}
    if "first_slot" not in input_names:
        seq = input_ids.shape[1]
        short = (first_slot > 0) & (token_count != seq)
        if short.any():
            row = int(np.flatnonzero(short)[0])
            raise PersimmonError(f"row {row} holds {first_slot[row]} tokens and has {token_count[row]} of the step's "
                                 f"{seq} new ones: this graph takes such a row's tokens filling the step "
                                 f"(run it alone)")
        reach = first_slot + token_count
        slots = np.arange(max(int(reach.max()), seq))[None, :]
        if not attention_mask.all():  # the scheduler always sends 1s: no scan per step
            zeros = np.argwhere(attention_mask[:, :slots.shape[1]] == 0)
            zeros = zeros[zeros[:, 1] < reach[zeros[:, 0]]]  # 0s past a row's reach are what the graph needs
            if len(zeros):
                row, slot = zeros[0]
                raise PersimmonError(f"attention_mask is 0 at row {row}, slot {slot}: this build (cache layout "
                                     f"'capacity') attends to every slot a row holds and cannot leave one out; send "
                                     f"rows without padding (the runtime's scheduler never pads)")
        arrays = {"input_ids": input_ids, "attention_mask": (slots < reach[:, None]).astype(np.int64)}
    return {name: np.ascontiguousarray(value, dtype=np.int64) for name, value in arrays.items()}


# ---- the plain step loop, for tools that want every step's logits (parity, benchmarks) ----
