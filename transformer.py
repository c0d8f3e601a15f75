"""The transformer both the teachers and the byte student run: Llama-style blocks (attention, SwiGLU MLP, norms,
RoPE) with the small switches that separate the teacher families, and a KV cache for incremental decoding.

teacher.py maps HF checkpoints of each family onto TransformerConfig and loads them; model.py builds the byte student's
encoder and decoder (sliding-window attention, no embeddings) and its main network (the teacher's blocks) from it.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass
class TransformerConfig:
    vocab_size: int = 32000         # 0: no token embedding or output layer (the byte student's stacks)
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
        elif cache is None:
            y = banded_attention(q, k, v, cfg.sliding_window)
        else:  # the cache holds only what some row's window still sees; the mask picks each query's part of it
            mask = cache.mask(T, cfg.sliding_window)
            k, v = cache.write(layer, k, v, cfg.sliding_window)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def banded_attention(q, k, v, window):
    """Sliding-window causal attention (query i sees keys j with i - window < j <= i) in O(T x window) time and
    memory: the queries go in blocks of `window`, and each block attends to its own block of keys and the one before
    it, with one (window, 2 window) band mask shared by every block (no (T, T) mask). q (B, H, T, hd), k and v
    (B, Hkv, T, hd) -> (B, H, T, hd)."""
    B, H, T, hd = q.shape
    W = window
    n = -(-T // W)  # blocks; the last is padded, and padded keys come after every real query
    pad = lambda t: F.pad(t, (0, 0, 0, n * W - T)).unflatten(2, (n, W))  # noqa: E731  (B, h, n, W, hd)
    qb, kb, vb = pad(q), pad(k), pad(v)
    before = lambda t: F.pad(t, (0, 0, 0, 0, 1, 0))[:, :, :-1]  # noqa: E731  each block's previous block (zeros first)
    kb, vb = torch.cat([before(kb), kb], 3), torch.cat([before(vb), vb], 3)  # (B, Hkv, n, 2W, hd)
    a = torch.arange(W, device=q.device)[:, None]
    c = torch.arange(2 * W, device=q.device)[None, :]
    band = (c > a) & (c <= a + W)  # key c of [previous block, own block] against query a of the own block
    mask = band.expand(n, W, 2 * W).clone()
    mask[0, :, :W] = False  # the first block has no previous one
    fold = lambda t: t.transpose(1, 2).flatten(0, 1)  # noqa: E731  (B * n, h, W or 2W, hd): blocks as batch rows
    y = F.scaled_dot_product_attention(fold(qb), fold(kb), fold(vb), attn_mask=mask.repeat(B, 1, 1)[:, None],
                                       enable_gqa=True)
    return y.unflatten(0, (B, n)).transpose(1, 2).flatten(2, 3)[:, :, :T]


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


class Transformer(nn.Module):
    """A stack of blocks and a final norm, with token embeddings and an output layer when it is a token LM (a teacher).
    Parameter names equal HF's keys minus the leading 'model.'."""

    def __init__(self, cfg, with_embeddings=True):
        super().__init__()
        self.cfg = cfg
        # with_embeddings=False or vocab_size 0: only the blocks and final norm (the byte student's three stacks)
        with_embeddings = with_embeddings and cfg.vocab_size > 0
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model) if with_embeddings else None
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = Norm(cfg.d_model, cfg.norm_eps, cfg.norm_type)
        untied = with_embeddings and not cfg.tie_embeddings
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False) if untied else None
        self.inv_freq = rope_inv_freq(cfg)  # plain CPU fp32 tensor (not a buffer: survives meta-device construction)
        # activation checkpointing: at 8192-byte windows the saved activations, not the weights, fill a GPU
        self.checkpoint_blocks = False
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
        recompute = self.checkpoint_blocks and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.layers):
            if recompute:  # keep only the block's input for backward; its inside is computed again there
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, None, i, use_reentrant=False)
            else:
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

