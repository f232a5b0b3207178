"""Persimmon reference model in PyTorch.

Module names mirror the Hugging Face checkpoint keys, so loading is a dict copy. The two
Persimmon-specific pieces, the per-head QK LayerNorm and the partial rotary embedding, are one
function each (`qk_layernorm`, `partial_rotary`): the ONNX exporter turns each into a custom op.

fp16/bf16 safety: LayerNorm statistics, rotary tables, softmax and logits are computed in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PersimmonConfig


def layer_norm_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    # Statistics in fp32: LayerNorm after attention overflows in fp16 (see the notes).
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(x.dtype)


def qk_layernorm(query, key, q_weight, q_bias, k_weight, k_bias, eps: float):
    """Per-head LayerNorm of q and k over head_dim, one shared weight/bias for all heads.

    query, key: [batch, seq, heads, head_dim].
    """
    return layer_norm_fp32(query, q_weight, q_bias, eps), layer_norm_fp32(key, k_weight, k_bias, eps)


def partial_rotary(x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX rotary on the first 2*len(inv_freq) dims of each head; the other dims pass through.

    x: [batch, seq, heads, head_dim]; position_ids: [batch, seq]; inv_freq: [rotary_dims/2] fp32.
    The angle table is built in fp32 (bf16 tables drift at long positions).
    """
    rotary_dims = 2 * inv_freq.shape[0]
    freqs = position_ids[..., None].float() * inv_freq.float()  # [batch, seq, rotary_dims/2]
    cos = torch.cat((freqs, freqs), dim=-1).cos()[:, :, None, :]
    sin = torch.cat((freqs, freqs), dim=-1).sin()[:, :, None, :]
    x_rot, x_pass = x[..., :rotary_dims].float(), x[..., rotary_dims:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((rotated.to(x.dtype), x_pass), dim=-1)


def rope_inv_freq(config: PersimmonConfig, seq_len: int, device=None) -> torch.Tensor:
    """Inverse frequencies for a forward whose largest position is seq_len - 1 (HF's formulas).

    `dynamic` NTK scaling raises the base once seq_len passes max_position_embeddings;
    `linear` divides the frequencies (same as dividing positions) by the factor.
    """
    dims = config.rotary_dims
    base = config.rope_theta
    kind, factor = config.rope_scaling_type, (config.rope_scaling or {}).get("factor", 1.0)
    if kind == "dynamic" and seq_len > config.max_position_embeddings:
        base = base * ((factor * seq_len / config.max_position_embeddings) - (factor - 1)) ** (dims / (dims - 2))
    exponents = torch.arange(0, dims, 2, dtype=torch.int64, device=device).float() / dims
    inv_freq = 1.0 / (base ** exponents)
    return inv_freq / factor if kind == "linear" else inv_freq


class KVCache(nn.Module):
    """Fixed-capacity cache for one layer: [max_batch, heads, kv_capacity, head_dim], written in place."""

    def __init__(self, max_batch: int, heads: int, kv_capacity: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (max_batch, heads, kv_capacity, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, cache_position: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [batch, heads, seq, head_dim] at slots `cache_position`; return the batch's cache."""
        batch = k.shape[0]
        k_cache, v_cache = self.k_cache[:batch], self.v_cache[:batch]
        k_cache.index_copy_(2, cache_position, k)
        v_cache.index_copy_(2, cache_position, v)
        return k_cache, v_cache


class PersimmonAttention(nn.Module):
    def __init__(self, config: PersimmonConfig):
        super().__init__()
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.eps = config.layer_norm_eps
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.q_layernorm = nn.LayerNorm(self.head_dim, eps=self.eps) if config.qk_layernorm else None
        self.k_layernorm = nn.LayerNorm(self.head_dim, eps=self.eps) if config.qk_layernorm else None
        self.kv_cache: KVCache | None = None

    def forward(self, x, position_ids, inv_freq, mask, cache_position=None):
        batch, seq, hidden = x.shape
        # The fused projection is interleaved per head: [heads, (q, k, v), head_dim].
        qkv = self.query_key_value(x).view(batch, seq, self.heads, 3, self.head_dim)
        q, k, v = qkv.unbind(dim=3)
        if self.q_layernorm is not None:
            q, k = qk_layernorm(q, k, self.q_layernorm.weight, self.q_layernorm.bias,
                                self.k_layernorm.weight, self.k_layernorm.bias, self.eps)
        q = partial_rotary(q, position_ids, inv_freq)
        k = partial_rotary(k, position_ids, inv_freq)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, heads, seq, head_dim]
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(cache_position, k, v)
        scores = torch.matmul(q * self.head_dim ** -0.5, k.transpose(-1, -2)).float() + mask
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(batch, seq, hidden)
        return self.dense(out)


class PersimmonMLP(nn.Module):
    def __init__(self, config: PersimmonConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = config.hidden_act

    def forward(self, x):
        h = self.dense_h_to_4h(x)
        if self.act == "relu2":
            h = torch.square(F.relu(h))
        elif self.act == "gelu_pytorch_tanh":
            h = F.gelu(h, approximate="tanh")
        else:
            h = getattr(F, self.act)(h)
        return self.dense_4h_to_h(h)


class PersimmonDecoderLayer(nn.Module):
    def __init__(self, config: PersimmonConfig):
        super().__init__()
        self.eps = config.layer_norm_eps
        self.self_attn = PersimmonAttention(config)
        self.mlp = PersimmonMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=self.eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=self.eps)

    def forward(self, x, position_ids, inv_freq, mask, cache_position=None):
        ln = self.input_layernorm
        h = x + self.self_attn(layer_norm_fp32(x, ln.weight, ln.bias, self.eps), position_ids, inv_freq,
                               mask, cache_position)
        ln = self.post_attention_layernorm
        return h + self.mlp(layer_norm_fp32(h, ln.weight, ln.bias, self.eps))


class PersimmonModel(nn.Module):
    def __init__(self, config: PersimmonConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(PersimmonDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.kv_capacity = 0

    def setup_cache(self, max_batch: int, kv_capacity: int, dtype=None, device=None) -> None:
        """Allocate the static KV cache; afterwards every forward must pass `cache_position`."""
        dtype = dtype or self.embed_tokens.weight.dtype
        device = device or self.embed_tokens.weight.device
        c = self.config
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(max_batch, c.num_attention_heads, kv_capacity, c.head_dim,
                                               dtype, device)
        self.kv_capacity = kv_capacity

    def drop_cache(self) -> None:
        for layer in self.layers:
            layer.self_attn.kv_cache = None
        self.kv_capacity = 0

    def forward(self, input_ids, position_ids=None, attention_mask=None, cache_position=None):
        """input_ids [batch, seq]. Without a cache the tokens attend to themselves (causally).

        With a cache, `cache_position` [seq] gives the slots these tokens are written to and the
        keys are all kv_capacity slots. `attention_mask` [batch, slots seen so far] is 1 for real
        tokens, 0 for (left) padding; position ids then count real tokens only, as in HF generate.
        """
        batch, seq = input_ids.shape
        device = input_ids.device
        if cache_position is None:
            if self.kv_capacity:
                raise ValueError("the model has a KV cache: pass cache_position")
            cache_position = torch.arange(seq, device=device)
        key_slots = self.kv_capacity or seq
        if attention_mask is not None:
            attention_mask = attention_mask.to(device=device, dtype=torch.bool)
        if position_ids is None:
            if attention_mask is not None:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                position_ids = positions[:, cache_position]
            else:
                position_ids = cache_position[None, :].expand(batch, seq)
        inv_freq = rope_inv_freq(self.config, int(position_ids.max()) + 1, device)
        mask = self._additive_mask(cache_position, attention_mask, batch, key_slots)

        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, position_ids, inv_freq, mask, cache_position if self.kv_capacity else None)
        ln = self.final_layernorm
        return layer_norm_fp32(x, ln.weight, ln.bias, self.config.layer_norm_eps)

    @staticmethod
    def _additive_mask(cache_position, attention_mask, batch, key_slots):
        """[batch, 1, seq, key_slots] fp32: 0 where a query may attend, a large negative elsewhere.

        A finite minimum rather than -inf keeps fully padded query rows finite (uniform weights).
        """
        slots = torch.arange(key_slots, device=cache_position.device)
        allowed = slots[None, :] <= cache_position[:, None]  # causal: [seq, key_slots]
        allowed = allowed[None].expand(batch, -1, -1)
        if attention_mask is not None:
            padding = torch.ones(batch, key_slots, dtype=torch.bool, device=slots.device)
            width = min(attention_mask.shape[1], key_slots)
            padding[:, :width] = attention_mask[:, :width]
            allowed = allowed & padding[:, None, :]
        mask = torch.zeros(allowed.shape, dtype=torch.float32, device=slots.device)
        return mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)[:, None]


class PersimmonForCausalLM(nn.Module):
    def __init__(self, config: PersimmonConfig):
        super().__init__()
        self.config = config
        self.model = PersimmonModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def setup_cache(self, max_batch: int, kv_capacity: int, dtype=None, device=None) -> None:
        self.model.setup_cache(max_batch, kv_capacity, dtype, device)

    def drop_cache(self) -> None:
        self.model.drop_cache()

    def forward(self, input_ids, position_ids=None, attention_mask=None, cache_position=None):
        """Logits [batch, seq, vocab] in fp32 (reductions over 262144 logits overflow in fp16)."""
        hidden = self.model(input_ids, position_ids, attention_mask, cache_position)
        return self.lm_head(hidden).float()


class PersimmonForSequenceClassification(nn.Module):
    def __init__(self, config: PersimmonConfig):
        super().__init__()
        self.config = config
        self.model = PersimmonModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def forward(self, input_ids, position_ids=None, attention_mask=None):
        """Logits [batch, num_labels], read at each row's rightmost non-pad token (left or right padding)."""
        logits = self.score(self.model(input_ids, position_ids, attention_mask)).float()
        batch, seq = input_ids.shape
        pad = self.config.pad_token_id
        if pad is None:
            if batch != 1:
                raise ValueError("batch > 1 needs pad_token_id in the config to find each row's last token")
            last = torch.full((1,), seq - 1, device=input_ids.device)
        else:
            slots = torch.arange(seq, device=input_ids.device)
            last = (slots * (input_ids != pad)).argmax(-1)
        return logits[torch.arange(batch, device=input_ids.device), last]


class PersimmonForTokenClassification(nn.Module):
    def __init__(self, config: PersimmonConfig):
        super().__init__()
        self.config = config
        self.model = PersimmonModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=True)

    def forward(self, input_ids, position_ids=None, attention_mask=None):
        """Logits [batch, seq, num_labels]."""
        return self.score(self.dropout(self.model(input_ids, position_ids, attention_mask))).float()
