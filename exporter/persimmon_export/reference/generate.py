"""Greedy decoding with the reference model's static KV cache (the reference for every runtime)."""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    max_new_tokens: int = 32, eos_token_id: int | None = None,
                    kv_capacity: int | None = None, on_token=None) -> torch.Tensor:
    """Prompt ids [batch, prompt] (left-padded where attention_mask is 0) -> [batch, prompt + new].

    One prefill over the prompt, then one token per step written into the cache. Rows that
    produced eos keep emitting eos. `on_token(step, tokens[batch])` is called for each step.
    """
    batch, prompt_len = input_ids.shape
    capacity = kv_capacity or prompt_len + max_new_tokens
    if prompt_len + max_new_tokens > capacity:
        raise ValueError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds kv_capacity {capacity}")
    slots_mask = torch.zeros(batch, capacity, dtype=torch.long, device=input_ids.device)
    slots_mask[:, :prompt_len] = 1 if attention_mask is None else attention_mask
    model.setup_cache(batch, capacity)
    try:
        logits = model(input_ids, attention_mask=slots_mask,
                       cache_position=torch.arange(prompt_len, device=input_ids.device))[:, -1]
        tokens = []
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            next_token = logits.argmax(-1)
            if eos_token_id is not None:
                next_token = next_token.masked_fill(finished, eos_token_id)
                finished |= next_token == eos_token_id
            tokens.append(next_token)
            if on_token is not None:
                on_token(step, next_token)
            if step + 1 == max_new_tokens or bool(finished.all()):
                break
            slot = prompt_len + step
            slots_mask[:, slot] = 1
            logits = model(next_token[:, None], attention_mask=slots_mask,
                           cache_position=torch.tensor([slot], device=input_ids.device))[:, -1]
    finally:
        model.drop_cache()
    return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)
