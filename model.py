"""The byte student: its configuration, its modules, the full forward and the pieces that training and cached
generation (decoding.py) call one at a time. The byte-model folder format is checkpoint.py.

bytes -> encoder -> projection to the teacher width (h) -> patcher -> the teacher's own blocks on patch vectors ->
dechunk to bytes -> decoder -> 512-way head (next byte v, and whether it ends a patch). The README's "Method" section
explains each piece; the byte blocks reuse transformer.py's code (Llama-style blocks, sliding-window attention).
"""
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from targets import ByteTrie, at_least_fp32, exact_byte_targets, patch_prefix_nodes
from tokenizer import DOC_START_BYTE
from transformer import Transformer, TransformerConfig

BOS_BYTE = DOC_START_BYTE  # 0xFE starts every document; it never occurs in UTF-8


@dataclass
class StudentConfig:
    d_local: int = 256          # width of the byte-level encoder and decoder
    n_enc: int = 2              # encoder blocks
    n_dec: int = 2              # decoder blocks
    n_local_heads: int = 4
    local_window: int = 256     # sliding-window attention span of the byte blocks, in bytes
    local_ff: int = 0           # SwiGLU hidden width of the byte blocks; 0 = 8/3 * d_local rounded up to 64
    proj_hidden: int = 2048     # SwiGLU hidden width of the encoder -> teacher projection; 0 = a linear map
    boundary_threshold: float = 0.5
    max_bytes: int = 65536      # longest byte sequence (RoPE positions of the byte blocks)
    prior_vocab: int = 0        # entries of the teacher's vocabulary kept in the model (0: none; see log_prior)
    prior_bytes: int = 0        # their total length in bytes
    prior: bool = True          # with that vocabulary: the byte head adds its prior (False: the pure learned head)
    prior_floor: float = 1e-5   # the prior's probability floor, so that every byte stays possible
    subword: bool = False       # add the teacher's input embedding of the longest vocabulary entry ending at each byte
                                # to h (needs that vocabulary; see subword_rows)

    @staticmethod
    def for_teacher(tcfg, **overrides):
        """Defaults that scale with the teacher: byte blocks at about a quarter of its width (256..1024)."""
        d_local = min(1024, max(256, (tcfg.d_model // 4) // 64 * 64))
        base = dict(d_local=d_local, n_local_heads=d_local // 64, proj_hidden=min(8 * d_local, 4 * tcfg.d_model))
        return StudentConfig(**{**base, **overrides})


def byte_blocks_config(scfg, n_layers):
    """The encoder's or decoder's stack: Llama-style blocks (one code path with the teacher) over bytes, with
    sliding-window attention and no token embedding (the student embeds bytes itself)."""
    ff = scfg.local_ff or -(-8 * scfg.d_local // 3 // 64) * 64
    return TransformerConfig(vocab_size=0, d_model=scfg.d_local, n_layers=n_layers,
                         n_heads=scfg.n_local_heads, n_kv_heads=scfg.n_local_heads,
                         head_dim=scfg.d_local // scfg.n_local_heads, d_ff=ff, norm_eps=1e-5, rope_theta=10000.0,
                         max_seq_len=scfg.max_bytes, sliding_window=scfg.local_window)


class Projection(nn.Module):
    """Encoder width -> teacher width: SwiGLU MLP (an MLP beat a linear map in a prototype on SmolLM2) or a linear map."""

    def __init__(self, d_in, d_out, hidden):
        super().__init__()
        self.hidden = hidden
        if hidden:
            self.gate = nn.Linear(d_in, hidden, bias=False)
            self.up = nn.Linear(d_in, hidden, bias=False)
        self.out = nn.Linear(hidden or d_in, d_out, bias=True)

    def forward(self, x):
        return self.out(F.silu(self.gate(x)) * self.up(x) if self.hidden else x)


class TeacherVocabularyParts:
    """The parts of ByteLM that read the teacher's vocabulary (its buffers prior_vocab_*, prior_head, subword_embed): the
    byte-head prior and the subword embedding. A mixin so that the buffers keep their names in ByteLM's state dict."""

    def add_vocabulary_buffers(self, scfg, D):
        """The teacher's vocabulary, its output layer and input embedding rows: buffers, part of the model, never
        trained (filled by attach_prior)."""
        self.has_prior = bool(scfg.prior_vocab) and scfg.prior
        if scfg.prior_vocab:
            self.register_buffer("prior_vocab_bytes", torch.zeros(scfg.prior_bytes, dtype=torch.uint8))
            self.register_buffer("prior_vocab_ends", torch.zeros(scfg.prior_vocab, dtype=torch.int64))
        if self.has_prior:
            self.prior_scale = nn.Parameter(torch.ones(()))
            self.register_buffer("prior_head", torch.zeros(scfg.prior_vocab, D))            # rows in byte order
        if scfg.subword:  # the input embedding rows of the same entries, then the document-start token's
            if not scfg.prior_vocab:
                raise ValueError("StudentConfig.subword needs the teacher's vocabulary (prior_vocab > 0)")
            self.register_buffer("subword_embed", torch.zeros(scfg.prior_vocab + 1, D))
        self._vocab = None

    @torch.no_grad()
    def attach_prior(self, head_weight, id_to_bytes, embed_weight=None, start_id=None):
        """Copy the teacher's vocabulary (the entries that spell bytes, in byte order: the trie's order) and, with the
        prior, its output layer into the buffers; the model then needs no tokenizer. With StudentConfig.subword, also
        the teacher's input embedding rows of those entries and of its document-start token start_id."""
        entries, ids = prior_vocabulary(id_to_bytes)
        if (len(entries), sum(map(len, entries))) != (self.scfg.prior_vocab, self.scfg.prior_bytes):
            raise ValueError("the vocabulary does not match StudentConfig.prior_vocab / prior_bytes")
        if self.has_prior:
            self.prior_head.copy_(head_weight.detach()[torch.tensor(ids, device=head_weight.device)].float())
        self.prior_vocab_bytes.copy_(torch.tensor(list(b"".join(entries)), dtype=torch.uint8))
        self.prior_vocab_ends.copy_(torch.tensor(list(itertools.accumulate(map(len, entries)))))
        if self.scfg.subword:
            if embed_weight is None or start_id is None:
                raise ValueError("StudentConfig.subword: attach_prior needs the teacher's input embedding and start id")
            rows = torch.tensor(ids + [start_id], device=embed_weight.device)
            self.subword_embed.copy_(embed_weight.detach()[rows].float())
        self._vocab = None
        return self

    @property
    def vocab(self):
        """The stored vocabulary's tables (Vocabulary), built from the buffers once."""
        if self._vocab is None:
            self._vocab = Vocabulary(self.prior_vocab_bytes, self.prior_vocab_ends, self.scfg.prior_vocab)
        return self._vocab

    def subword_vectors(self, rows):
        """subword_rows' rows -> the teacher's embedding rows (..., D), zero where -1."""
        return self.subword_embed[rows.clamp(min=0)] * (rows >= 0)[..., None].to(self.subword_embed.dtype)

    @torch.no_grad()
    def log_prior(self, y, cum_rows, nodes):
        """The byte-head prior: at each patch the main network's output y through the teacher's output layer is a
        next-token distribution, and the exact-target rule (targets.py) turns it into a 512-way distribution q for
        every byte of the patch, from the bytes the patch holds so far (the trie node). -> max(log q, log floor),
        (N, 512) fp32 (fp64 in an fp64 model); a position with no patch yet or off the vocabulary (node -1) gets the floor everywhere, a
        constant the softmax ignores: there the learned part alone speaks. y (P, D) patch outputs, cum_rows (N,) each
        position's row of y. No gradient: the prior is a fixed function of the main network's output."""
        # every position computed (node -1 read as the root) and the floor put back where the node is -1: picking
        # the positions with a node would read their number back from the device
        floor = self.scfg.prior_floor
        q = exact_byte_targets(self.vocab.trie, y.detach(), self.prior_head, cum_rows, nodes.clamp(min=0))
        return torch.where((nodes >= 0)[:, None], q.clamp(min=floor).log(), math.log(floor))

    @torch.no_grad()
    def prior_cumulative(self, y):
        """Generation, once per patch: the patch outputs y (N, D) -> prefix sums of their next-token distributions
        (N, prior_vocab + 1) float64 (targets.ByteTrie.cumulative), from which prior_at reads every byte's prior."""
        return self.vocab.trie.cumulative(y.to(self.prior_head.dtype) @ self.prior_head.T)

    @torch.no_grad()
    def prior_at(self, cum, rows, nodes):
        """Generation, once per byte: log_prior from prefix sums, each position's row of cum and its node -> (N, 512)."""
        floor = self.scfg.prior_floor  # every position computed, the floor put back at node -1 (as log_prior)
        q = self.vocab.trie.targets(cum, rows, nodes.clamp(min=0)).to(at_least_fp32(self.prior_head.dtype))
        return torch.where((nodes >= 0)[:, None], q.clamp(min=floor).log(), math.log(floor))

    def sequence_prior(self, x, ends, y, patch_mask, at=None):
        """log_prior for every position of (B, T) bytes with patch ends and run_main's outputs -> (B, T, 512), or
        None for the pure learned head; at (B,): one position per row only -> (B, 512)."""
        if not self.has_prior:
            return None
        B, P, D = y.shape
        # y's rows flattened, padding patches included (y[patch_mask] would read the count of real ones back from the
        # device; no position reads a padding row, so patch_mask is not needed); each position's row is its row's
        # latest patch, its first one before the first end (where its node is -1)
        rows = (ends.long().cumsum(1) - 1).clamp(min=0) + P * torch.arange(B, device=ends.device)[:, None]
        nodes = patch_prefix_nodes(self.vocab.trie, x, ends)
        if at is not None:
            b = torch.arange(len(at), device=at.device)
            return self.log_prior(y.reshape(B * P, D), rows[b, at], nodes[b, at])
        return self.log_prior(y.reshape(B * P, D), rows.reshape(-1), nodes.reshape(-1)).view(*x.shape, 512)


class ByteLM(TeacherVocabularyParts, nn.Module):
    # Parameter groups the training phases select by name prefix.
    ENCODER_SIDE = ("byte_embed.", "encoder.", "enc_proj.")
    PATCHER = ("patcher_q.", "patcher_k.")
    MAIN = ("main.",)
    OUTPUT_SIDE = ("null_patch", "residual.", "main_to_local.", "byte_embed_dec.", "decoder.", "head.", "prior_scale")

    def __init__(self, scfg, tcfg):
        super().__init__()
        self.scfg, self.tcfg = scfg, tcfg
        D, d = tcfg.d_model, scfg.d_local
        self.byte_embed = nn.Embedding(256, d)
        self.encoder = Transformer(byte_blocks_config(scfg, scfg.n_enc))
        self.enc_proj = Projection(d, D, scfg.proj_hidden)
        self.patcher_q = nn.Linear(D, D, bias=False)
        self.patcher_k = nn.Linear(D, D, bias=False)
        self.main = Transformer(tcfg, with_embeddings=False)  # the teacher's blocks + final norm
        self.null_patch = nn.Parameter(torch.zeros(D))
        self.residual = nn.Linear(D, D, bias=False)
        self.main_to_local = nn.Linear(D, d, bias=False)
        self.byte_embed_dec = nn.Embedding(256, d)
        self.decoder = Transformer(byte_blocks_config(scfg, scfg.n_dec))
        self.head = nn.Linear(d, 512, bias=False)
        self.add_vocabulary_buffers(scfg, D)

    @torch.no_grad()
    def init_weights(self, teacher=None):
        """Every initialisation, in one place:
        - byte embeddings (encoder and decoder side): N(0, 1), as nn.Embedding (RMSNorm follows in each block);
        - byte blocks: linear weights N(0, 0.02); attention and MLP output projections N(0, 0.02 / sqrt(2 * n_layers))
          (GPT-2's residual scaling); norm weights 1;
        - encoder -> teacher projection: hidden weights N(0, 0.02), output weights ZERO and output bias = the mean row of
          the teacher's input embedding (starts at relative MSE ~0.9 instead of ~8 from a random init); with the
          subword embedding the bias is zero too (h starts as that embedding alone);
        - patcher W_q, W_k: the identity (the rule starts as plain cosine similarity of neighbouring states);
        - main network: the teacher's blocks and final norm, copied (if `teacher` is given);
        - dechunk null vector: zero; residual from h: ZERO (the decoder starts from the main network alone);
        - teacher -> byte width projection: N(0, 1 / sqrt(D)); head: N(0, 0.02)."""
        for stack in (self.encoder, self.decoder):
            for name, p in stack.named_parameters():
                if name.endswith("norm.weight") or "layernorm" in name:
                    p.fill_(1.0)
                elif name.endswith(("o_proj.weight", "down_proj.weight")):
                    p.normal_(0.0, 0.02 / math.sqrt(2 * len(stack.layers)))
                else:
                    p.normal_(0.0, 0.02)
        nn.init.normal_(self.byte_embed.weight)
        nn.init.normal_(self.byte_embed_dec.weight)
        if self.enc_proj.hidden:
            nn.init.normal_(self.enc_proj.gate.weight, 0.0, 0.02)
            nn.init.normal_(self.enc_proj.up.weight, 0.0, 0.02)
        self.enc_proj.out.weight.zero_()
        self.enc_proj.out.bias.zero_()
        if teacher is not None:
            if not self.scfg.subword:
                self.enc_proj.out.bias.copy_(teacher.embed_tokens.weight.float().mean(0))
            self.load_main_from(teacher)
        for w in (self.patcher_q.weight, self.patcher_k.weight):
            w.copy_(torch.eye(w.shape[0]))
        self.null_patch.zero_()
        self.residual.weight.zero_()
        nn.init.normal_(self.main_to_local.weight, 0.0, 1.0 / math.sqrt(self.tcfg.d_model))
        nn.init.normal_(self.head.weight, 0.0, 0.02)
        if self.has_prior:
            self.prior_scale.fill_(1.0)  # with a learned part near zero, the head starts as the prior itself
        return self

    def recompute_blocks(self, on=True):
        """Activation checkpointing for the three stacks (encoder, main network, decoder), the projection to the
        teacher width and the patcher: a training forward keeps each block's (and projection's) input only and
        recomputes the rest in backward (the stage scripts' --checkpoint_blocks)."""
        for stack in (self.encoder, self.main, self.decoder):
            stack.checkpoint_blocks = on
        return self

    @torch.no_grad()
    def load_main_from(self, teacher):
        state = {k: v for k, v in teacher.state_dict().items() if not k.startswith(("embed_tokens.", "lm_head."))}
        self.main.load_state_dict(state)

    # -- the pieces, each usable on its own (the training phases need different subsets) --

    def encode(self, x, cache=None, advance=None, at=None, sub=None):
        """bytes (B, T) -> h (B, T, D): byte states in the teacher's embedding space. at (B, T) bool projects only
        those bytes -> (N, D): the projection to the teacher width costs more than the byte blocks, and the align
        phase needs it only at token ends. With StudentConfig.subword, h adds the subword embedding of subword_rows:
        sub (B, T) gives those rows (generation, where x is only the newest bytes), else they are computed from x."""
        states = self.encoder.run_blocks(self.byte_embed(x), cache=cache, advance=advance)
        h = self._maybe_recompute(self.enc_proj, states if at is None else states[at])
        if self.scfg.subword:
            sub = self.vocab.subword_rows(x) if sub is None else sub
            h = h + self.subword_vectors(sub if at is None else sub[at]).to(h.dtype)
        return h

    def boundary_probs(self, h):
        """p_t = (1 - cos(W_q h_t, W_k h_{t+1})) / 2, the probability that byte t ends a patch (one-byte lookahead);
        the last byte of the sequence is always an end. (B, T, D) -> (B, T), in fp32."""
        return self._maybe_recompute(self._boundary_probs, h)

    def _maybe_recompute(self, fn, *args):
        """fn(*args), its inside recomputed in backward under recompute_blocks: the projection to the teacher width and
        the patcher work at the teacher's width on every byte, and would save more than the byte blocks."""
        if self.encoder.checkpoint_blocks and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _boundary_probs(self, h):
        q = self.patcher_q(h[:, :-1]).float()
        k = self.patcher_k(h[:, 1:]).float()
        p = (1 - F.cosine_similarity(q, k, dim=-1)) / 2
        return F.pad(p, (0, 1), value=1.0)

    def run_main(self, h, ends, cache=None):
        """Patch vectors z_i = h at the patch-end bytes, through the main network with positions = patch index.
        Rows hold different numbers of patches: each row's patches come first, padding after them, so causal
        attention keeps padding out of real patches. -> y (B, P, D), patch_mask (B, P)."""
        order, patch_mask = patch_order(ends)
        z = h.gather(1, order[..., None].expand(-1, -1, h.shape[-1]))
        y = self.main.run_blocks(z, cache=cache, advance=patch_mask.sum(1) if cache is not None else None)
        return y, patch_mask

    def dechunk(self, y, ends):
        """Byte t receives the main output of the latest patch ending at or before t; the null vector before the
        first. (B, P, D), (B, T) -> (B, T, D)."""
        B, _, D = y.shape
        which = ends.long().cumsum(dim=1)  # 0 = no patch yet, i = patch i - 1
        table = torch.cat([self.null_patch.to(y.dtype).expand(B, 1, D), y], dim=1)
        return table.gather(1, which[..., None].expand(-1, -1, D))

    def decode(self, x, h, dechunked, cache=None, advance=None, prior=None):
        """-> logits (B, T, 512); index v + 256 * e: the next byte is v and it ends a patch (e = 1) or not.
        With the prior (log_prior's output), logits = the learned ones + prior_scale x the floored log-prior."""
        u = self.main_to_local(dechunked + self.residual(h)) + self.byte_embed_dec(x)
        logits = self.head(self.decoder.run_blocks(u, cache=cache, advance=advance))
        return logits if prior is None else logits + self.prior_scale * prior

    def forward(self, x, ends=None):
        """Stage-2 forward. bytes (B, T) -> (logits (B, T, 512), boundary probs (B, T), ends used (B, T)).
        ends=None takes the patches from the patcher (p_t > threshold); pass ends to force them (ground truth, or
        the boundaries that generation chose)."""
        h = self.encode(x)
        p = self.boundary_probs(h)
        if ends is None:
            ends = p > self.scfg.boundary_threshold
        y, patch_mask = self.run_main(h, ends)
        return self.decode(x, h, self.dechunk(y, ends), prior=self.sequence_prior(x, ends, y, patch_mask)), p, ends


class Vocabulary:
    """The teacher's vocabulary entries that the student keeps (ByteLM's prior_vocab_* buffers) and the two look-ups
    built on them: the prior's trie (forward, for the bytes a patch holds so far) and the reversed trie that picks the
    subword embedding's row at every byte. Plain tensors and Python, no parameters; built once per model."""

    def __init__(self, vocab_bytes, vocab_ends, start_row):
        data, ends = bytes(vocab_bytes.tolist()), [0] + vocab_ends.tolist()
        self.entries = [data[a:b] for a, b in zip(ends, ends[1:])]  # bytes objects, in the trie's order
        self.start_row = start_row  # subword_embed's row of the document-start token: the last one
        self._trie = self._suffixes = None

    @property
    def trie(self):
        """The prior's vocabulary as a ByteTrie (built once, on the CPU)."""
        if self._trie is None:
            self._trie = ByteTrie(self.entries)
        return self._trie

    def subword_rows(self, x, last_only=False):
        """Bolmo's subword embedding (arXiv 2512.15586), the rule that picks it: at each byte t, the longest vocabulary
        entry that ends at t (looking back from t, never past a document start), as a row of subword_embed; a
        document-start byte gets the teacher's start token (the last row); -1 where no entry ends at t (a vocabulary
        without every single byte). A function of the bytes up to t alone: the same in training, in a full forward
        and in cached generation. x (B, T) -> (B, T) int64; last_only: at the last byte of each row only -> (B, 1)
        (generation: x = each row's newest bytes). All positions walk the reversed vocabulary together, one byte
        further back per step, on x's device, for as many steps as the longest entry has bytes (a fixed count: stopping
        once every walk has ended would read the device back each step)."""
        keys, child, row_of, span = self.suffix_tables(x.device)
        B, T = x.shape
        t = torch.arange(T - 1 if last_only else 0, T, device=x.device).expand(B, -1)  # the positions looked up
        b = torch.arange(B, device=x.device)[:, None].expand_as(t)
        is_start = x[b, t] == BOS_BYTE
        node, best, alive = torch.zeros_like(t), torch.full_like(t, -1), ~is_start
        for back in range(min(span, T)):
            at = t - back
            alive &= at >= 0
            v = x[b, at.clamp(min=0)]
            alive &= v != BOS_BYTE
            query = node * 256 + v
            k = torch.searchsorted(keys, query).clamp(max=len(keys) - 1)
            alive &= keys[k] == query
            node = torch.where(alive, child[k], node)
            best = torch.where(alive & (row_of[node] >= 0), row_of[node], best)
        return torch.where(is_start, self.start_row, best)

    def suffix_tables(self, device):
        """The vocabulary's entries reversed, as a trie in arrays (built once, kept per device): edge keys
        parent * 256 + byte, sorted, with their child nodes; each node's entry row (-1: none; two ids that spell the
        same bytes: the first in the trie's order); the longest entry's length."""
        if self._suffixes is None:
            entries = self.entries
            edges, row_of = {}, [-1]
            for row, entry in enumerate(entries):
                node = 0
                for v in reversed(entry):
                    if (node, v) not in edges:
                        edges[node, v] = len(row_of)
                        row_of.append(-1)
                    node = edges[node, v]
                if row_of[node] < 0:
                    row_of[node] = row
            keys = sorted(edges)
            self._suffixes = {"cpu": (torch.tensor([p * 256 + v for p, v in keys]),
                                      torch.tensor([edges[k] for k in keys]), torch.tensor(row_of),
                                      max(map(len, entries)))}
        key = str(device)
        if key not in self._suffixes:
            keys, child, row_of, span = self._suffixes["cpu"]
            self._suffixes[key] = (keys.to(device), child.to(device), row_of.to(device), span)
        return self._suffixes[key]

    def subword_newest(self, x, lens):
        """subword_rows at each row's newest byte, for generation: x (R, L) bytes so far, lens (R,) -> (R, 1). Reads
        only the last bytes that the longest entry could span (positions before the first read as the row's 0xFE)."""
        span = self.suffix_tables(x.device)[3]
        at = (lens[:, None] - span + torch.arange(span, device=x.device)).clamp(min=0)
        return self.subword_rows(x.gather(1, at), last_only=True)


def patch_order(ends):
    """ends (B, T) bool -> (positions of the patch ends in order, padded (B, P); mask of real patches (B, P)),
    P = the most patches in any row (at least 1). Gather anything per patch with it: h.gather(1, order[..., None])."""
    counts = ends.sum(dim=1)
    P = max(int(counts.max()), 1)
    order = torch.argsort((~ends).to(torch.int8), dim=1, stable=True)[:, :P]  # end positions first, in order
    return order, torch.arange(P, device=ends.device)[None] < counts[:, None]


def prior_vocabulary(id_to_bytes):
    """A tokenizer's entries that spell bytes, in byte order, and their ids: the byte-head prior's vocabulary."""
    entries = sorted((b, i) for i, b in enumerate(id_to_bytes) if b)
    return [b for b, _ in entries], [i for _, i in entries]


def byte_logprobs(logits):
    """(..., 512) joint logits -> (..., 256) log p(next byte = v) = logsumexp(l_v, l_{v+256}) - logsumexp(l)."""
    logits = logits.float()
    return torch.logaddexp(logits[..., :256], logits[..., 256:]) - torch.logsumexp(logits, dim=-1, keepdim=True)
