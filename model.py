"""The byte student and its cached generation.

bytes -> encoder -> projection to the teacher width (h) -> patcher -> the teacher's own blocks on patch vectors ->
dechunk to bytes -> decoder -> 512-way head (next byte v, and whether it ends a patch). The README's "Method" section
explains each piece; the byte blocks reuse teacher.py's transformer code (Llama-style blocks, sliding-window attention).
"""
import itertools
import json
import math
import os
import shutil
import typing
import uuid
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from safetensors_io import is_int, read_safetensors, read_safetensors_header, write_safetensors
from teacher import Teacher, TeacherConfig, check_device, sample_from_logits
from targets import ByteTrie, exact_byte_targets, patch_prefix_nodes
from tokenizer import DOC_START_BYTE

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


def _local_config(scfg, n_layers):
    """The byte blocks are Llama-style blocks (one code path with the teacher) with sliding-window attention."""
    ff = scfg.local_ff or -(-8 * scfg.d_local // 3 // 64) * 64
    return TeacherConfig(family="llama", vocab_size=256, d_model=scfg.d_local, n_layers=n_layers,
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


class ByteLM(nn.Module):
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
        self.encoder = Teacher(_local_config(scfg, scfg.n_enc), with_embeddings=False)
        self.enc_proj = Projection(d, D, scfg.proj_hidden)
        self.patcher_q = nn.Linear(D, D, bias=False)
        self.patcher_k = nn.Linear(D, D, bias=False)
        self.main = Teacher(tcfg, with_embeddings=False)  # the teacher's blocks + final norm
        self.null_patch = nn.Parameter(torch.zeros(D))
        self.residual = nn.Linear(D, D, bias=False)
        self.main_to_local = nn.Linear(D, d, bias=False)
        self.byte_embed_dec = nn.Embedding(256, d)
        self.decoder = Teacher(_local_config(scfg, scfg.n_dec), with_embeddings=False)
        self.head = nn.Linear(d, 512, bias=False)
        # the teacher's vocabulary, its output layer and input embedding rows: buffers, part of the model, never trained
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
        self._trie = self._suffixes = None

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
        self._trie = self._suffixes = None
        return self

    def vocabulary(self):
        """The stored vocabulary's entries (bytes objects, in the trie's order), read from the buffers."""
        data, ends = bytes(self.prior_vocab_bytes.tolist()), [0] + self.prior_vocab_ends.tolist()
        return [data[a:b] for a, b in zip(ends, ends[1:])]

    @property
    def trie(self):
        """The prior's vocabulary as a ByteTrie (built from the buffers once, on the CPU)."""
        if self._trie is None:
            self._trie = ByteTrie(self.vocabulary())
        return self._trie

    def subword_rows(self, x, last_only=False):
        """Bolmo's subword embedding (arXiv 2512.15586), the rule that picks it: at each byte t, the longest vocabulary
        entry that ends at t (looking back from t, never past a document start), as a row of subword_embed; a
        document-start byte gets the teacher's start token (the last row); -1 where no entry ends at t (a vocabulary
        without every single byte). A function of the bytes up to t alone: the same in training, in a full forward
        and in cached generation. x (B, T) -> (B, T) int64; last_only: at the last byte of each row only -> (B, 1)
        (generation: x = each row's newest bytes). All positions walk the reversed vocabulary together, one byte
        further back per step, on x's device, until no walk can go on (a few steps more than the longest match)."""
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
            if not bool(alive.any()):
                break
            node = torch.where(alive, child[k], node)
            best = torch.where(alive & (row_of[node] >= 0), row_of[node], best)
        return torch.where(is_start, self.scfg.prior_vocab, best)

    def suffix_tables(self, device):
        """The vocabulary's entries reversed, as a trie in arrays (built once, kept per device): edge keys
        parent * 256 + byte, sorted, with their child nodes; each node's entry row (-1: none; two ids that spell the
        same bytes: the first in the trie's order); the longest entry's length."""
        if self._suffixes is None:
            entries = self.vocabulary()
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

    def subword_vectors(self, rows):
        """subword_rows' rows -> the teacher's embedding rows (..., D), zero where -1."""
        return self.subword_embed[rows.clamp(min=0)] * (rows >= 0)[..., None].to(self.subword_embed.dtype)

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
        h = self.enc_proj(states if at is None else states[at])
        if self.scfg.subword:
            sub = self.subword_rows(x) if sub is None else sub
            h = h + self.subword_vectors(sub if at is None else sub[at]).to(h.dtype)
        return h

    def boundary_probs(self, h):
        """p_t = (1 - cos(W_q h_t, W_k h_{t+1})) / 2, the probability that byte t ends a patch (one-byte lookahead);
        the last byte of the sequence is always an end. (B, T, D) -> (B, T), in fp32."""
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

    @torch.no_grad()
    def log_prior(self, y, cum_rows, nodes):
        """The byte-head prior: at each patch the main network's output y through the teacher's output layer is a
        next-token distribution, and the exact-target rule (targets.py) turns it into a 512-way distribution q for
        every byte of the patch, from the bytes the patch holds so far (the trie node). -> max(log q, log floor),
        (N, 512) fp32; a position with no patch yet or off the vocabulary (node -1) gets the floor everywhere, a
        constant the softmax ignores: there the learned part alone speaks. y (P, D) patch outputs, cum_rows (N,) each
        position's row of y. No gradient: the prior is a fixed function of the main network's output."""
        log_floor = math.log(self.scfg.prior_floor)
        out = torch.full((len(nodes), 512), log_floor, device=y.device)
        has = nodes >= 0
        if has.any():
            q = exact_byte_targets(self.trie, y.detach(), self.prior_head, cum_rows[has], nodes[has])
            out[has] = q.clamp(min=self.scfg.prior_floor).log()
        return out

    @torch.no_grad()
    def prior_cumulative(self, y):
        """Generation, once per patch: the patch outputs y (N, D) -> prefix sums of their next-token distributions
        (N, prior_vocab + 1) float64 (targets.ByteTrie.cumulative), from which prior_at reads every byte's prior."""
        return self.trie.cumulative(y.to(self.prior_head.dtype) @ self.prior_head.T)

    @torch.no_grad()
    def prior_at(self, cum, rows, nodes):
        """Generation, once per byte: log_prior from prefix sums, each position's row of cum and its node -> (N, 512)."""
        out = torch.full((len(nodes), 512), math.log(self.scfg.prior_floor), device=cum.device)
        has = nodes >= 0
        if has.any():
            out[has] = self.trie.targets(cum, rows[has], nodes[has]).float().clamp(min=self.scfg.prior_floor).log()
        return out

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

    def sequence_prior(self, x, ends, y, patch_mask):
        """log_prior for every position of (B, T) bytes with patch ends and run_main's outputs -> (B, T, 512), or
        None for the pure learned head."""
        if not self.has_prior:
            return None
        counts = patch_mask.sum(1)
        first = counts.cumsum(0) - counts  # each row's offset among the real patches
        rows = (ends.long().cumsum(1) - 1 + first[:, None]).clamp(min=0)
        nodes = patch_prefix_nodes(self.trie, x, ends)
        return self.log_prior(y[patch_mask], rows.reshape(-1), nodes.reshape(-1)).view(*x.shape, 512)


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



@torch.no_grad()
def greedy_flag_logprobs(model, texts, batch_size=16):
    """The student's proper likelihood of byte strings, each scored from a fresh document start (0xFE): every boundary
    flag is decided causally, as greedy generation decides it (once byte t is known, the likelier half of the head for
    it at position t-1), never by the patcher looking at the next byte. The product of the summed-halves
    probabilities along those flags is the exact likelihood of a well-defined byte model (the one whose boundaries
    greedy generation follows). Runs ByteGeneration teacher-forced, many texts in one batch.
    -> per text (log p(byte) (n,), log p(byte, flag used) (n,), flags (n,) bool): fp32, natural log."""
    out = [None] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # similar lengths share a batch
    for first in range(0, len(order), batch_size):
        chunk = order[first:first + batch_size]
        L = len(texts[chunk[0]])
        x = torch.full((len(chunk), L), ord(" "), dtype=torch.long)  # after a short text: never used
        for row, i in enumerate(chunk):
            x[row, :len(texts[i])] = torch.tensor(list(texts[i]), dtype=torch.long)
        gen = ByteGeneration(model, [b""] * len(chunk), L)
        logp, joint, flags = torch.zeros(len(chunk), L), torch.zeros(len(chunk), L), torch.zeros(len(chunk), L, dtype=torch.bool)
        lengths = torch.tensor([len(texts[i]) for i in chunk], device=gen.x.device)
        for rows, t, new, logits in gen.run(lengths, force=x):  # rows out of step: one main-network call for many rows
            rows, t = rows.cpu(), t.cpu()
            logp[rows, t] = byte_logprobs(logits).gather(1, new[:, None].to(logits.device))[:, 0].cpu()
            ends = gen.pending_end[rows.to(logits.device)]
            index = new.to(logits.device) + 256 * ends.long()
            joint[rows, t] = torch.log_softmax(logits.float(), -1).gather(1, index[:, None])[:, 0].cpu()
            flags[rows, t] = ends.cpu()
        for row, i in enumerate(chunk):
            n = len(texts[i])
            out[i] = (logp[row, :n], joint[row, :n], flags[row, :n])
    return out


@torch.no_grad()
def late_flag_logprobs(model, texts, eps=None):
    """The student's likelihood of byte strings under the late-flag byte model (LateFlagGeneration, teacher-forced):
    each boundary flag decided one byte late, byte t+1's probability summed over both flags of byte t. Every flag is
    a function of the bytes already seen, so the product is the exact likelihood of that model, the one sample.py
    draws from by default; a flag the next byte contradicts costs little here, where greedy flags
    (greedy_flag_logprobs) pay a dead end. eps as in LateFlagGeneration (None: LATE_EPS; 0: every flag waits).
    Texts in one lockstep batch, each from a fresh document start. -> per text (log p(byte) (n,), flags (n,) bool;
    the last byte's flag is never decided), fp32, natural log."""
    B, L = len(texts), max(map(len, texts))
    x = torch.full((B, L), ord(" "), dtype=torch.long)  # after a short text: never used
    for i, t in enumerate(texts):
        x[i, :len(t)] = torch.tensor(list(t), dtype=torch.long)
    gen = LateFlagGeneration(model, [b""] * B, L, eps)
    x, logp = x.to(gen.x.device), torch.zeros(B, L, device=gen.x.device)
    for t in range(L):
        new, mixed = gen.step(force=x[:, t])
        logp[:, t] = mixed.gather(1, new[:, None])[:, 0]
    return [(logp[i, :len(t)].cpu(), gen.ends[i, 1:len(t) + 1].cpu()) for i, t in enumerate(texts)]


class ByteGeneration:
    """Cached byte generation for a batch of prompts (each a bytes object; 0xFE is prepended).

    Encoder and decoder step once per byte; the main network steps only for rows whose newest byte closes a patch.
    Prefill: the patcher decides the boundaries of all prompt bytes but the last (its one-byte lookahead sees the
    next prompt byte); the last prompt byte's flag is the head's more likely e for that known byte at the previous
    position. After that, every flag is the e half of the sampled index. `x[:, :length]` and `ends` record the bytes
    and the boundaries used, so a full forward with those ends reproduces every logit.

    Two ways to drive it: step() gives every row one byte (rows in lockstep; the main network runs at a step for the
    rows that close a patch there), run() lets rows get out of step so that the main network runs once for many rows
    (in a batch nearly every byte closes some row's patch, and a CPU pays the main network's weight reads per call,
    however few rows it takes). Each row's bytes and logits are the same either way; only the order of work differs."""

    def __init__(self, model, prompts, max_new_bytes):
        self.model = model
        prompts = [bytes([BOS_BYTE]) + bytes(p) for p in prompts]
        dev = model.head.weight.device
        B, self.lens = len(prompts), torch.tensor([len(p) for p in prompts], device=dev)
        L, total = int(self.lens.max()), int(self.lens.max()) + max_new_bytes
        self.x = torch.zeros(B, total, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            self.x[i, :len(p)] = torch.tensor(list(p), device=dev)
        self.ends = torch.zeros(B, total, dtype=torch.bool, device=dev)
        self.rows = torch.arange(B, device=dev)
        self.enc_cache = model.encoder.new_cache(B, total)
        self.dec_cache = model.decoder.new_cache(B, total)
        self.main_cache = model.main.new_cache(B, min(total, model.tcfg.max_seq_len))
        self.prefill_logits = self._prefill(L)

    @torch.no_grad()
    def _prefill(self, L):
        m, x, lens, rows = self.model, self.x[:, :L], self.lens, self.rows
        h = m.encode(x, cache=self.enc_cache, advance=lens)
        t = torch.arange(L, device=x.device)[None]
        ends = (m.boundary_probs(h) > m.scfg.boundary_threshold) & (t < lens[:, None] - 1)
        y, patch_mask = m.run_main(h, ends, cache=self.main_cache)
        logits = m.decode(x, h, m.dechunk(y, ends), cache=self.dec_cache, advance=lens - 1,
                          prior=m.sequence_prior(x, ends, y, patch_mask))
        counts = ends.sum(1)
        self.y_cur = torch.where((counts > 0)[:, None], y[rows, (counts - 1).clamp(min=0)], m.null_patch.to(y.dtype))
        if m.has_prior:  # the trie node before the newest byte, and each row's current patch distribution
            self.node = torch.where(lens >= 2, patch_prefix_nodes(m.trie, x, ends)[rows, (lens - 2).clamp(min=0)], -1)
            self.cum = m.prior_cumulative(self.y_cur)
        prev = logits[rows, (lens - 2).clamp(min=0)]
        last = x[rows, lens - 1]
        # The last prompt byte's flag: the head's more likely e for that byte; a lone BOS byte is its own patch.
        self.pending_end = (prev[rows, last + 256] > prev[rows, last]) | (lens == 1)
        self.waiting = self.pending_end.clone()  # rows whose newest patch the main network has not yet taken
        self.h_last = h[rows, lens - 1]
        self.ends[:, :L] = ends
        self.done = torch.zeros_like(lens, dtype=torch.bool)
        return [logits[i, :lens[i] - 1] for i in range(len(lens))]

    @torch.no_grad()
    def step(self, temperature=1.0, top_k=None, top_p=None, generator=None, force=None):
        """Produce one byte per row -> (new bytes (B,), logits (B, 512) that they were sampled from).
        force (B,) appends those bytes instead of sampling, each with the flag greedy generation would give it (the
        likelier half of the head for that byte): teacher-forced scoring of text under greedy causal boundaries."""
        closing = self.waiting.nonzero()[:, 0]
        if len(closing):  # those rows' newest bytes end patches: the main network steps once, on those rows only
            self.close_patches(closing)
        return self.step_rows(self.rows, temperature, top_k, top_p, generator, force)

    @torch.no_grad()
    def run(self, n, temperature=1.0, top_k=None, top_p=None, generator=None, force=None, wait=1.0):
        """Generate n more bytes in every row (an int, or (B,) per row), rows out of step: a row whose newest byte
        closes a patch waits while the others go on, and the main network runs once for all waiting rows when no other
        row can go on, or when at least `wait` of the rows still generating are waiting (wait=1.0: only then). Clear
        `live[i]` between steps to finish row i early (a stop string, 0xFE). force (B, n): teacher-forced bytes as in
        step(). Yields (rows (R,), offsets (R,): how many bytes each of those rows had made before this one, their new
        bytes (R,), logits (R, 512)) for every byte step."""
        start = self.lens.clone()
        self.live = torch.ones_like(self.done)
        while True:
            live = self.live & (self.lens - start < n)
            n_live = int(live.sum())
            if n_live == 0:
                return
            waiting = live & self.waiting
            n_wait = int(waiting.sum())
            if n_wait and (n_wait == n_live or n_wait >= wait * n_live):
                self.close_patches(waiting.nonzero()[:, 0])
                continue
            rows = (live & ~self.waiting).nonzero()[:, 0]
            offsets = self.lens[rows] - start[rows]
            forced = None if force is None else force.to(self.x.device)[rows, offsets]
            new, logits = self.step_rows(rows, temperature, top_k, top_p, generator, forced)
            yield rows, offsets, new, logits

    @torch.no_grad()
    def close_patches(self, rows):
        """The main network takes the newest patch of these rows (R,) (each waiting: its newest byte closes a patch),
        stepping only their cache entries; the other rows' entries and positions do not move."""
        m = self.model
        self.ends[rows, self.lens[rows] - 1] = True
        cache = self.main_cache if len(rows) == len(self.rows) else self.main_cache.select(rows)
        self.y_cur[rows] = m.main.run_blocks(self.h_last[rows, None], cache=cache)[:, 0]
        if m.has_prior:
            self.cum[rows] = m.prior_cumulative(self.y_cur[rows])
        self.waiting[rows] = False

    @torch.no_grad()
    def step_rows(self, rows, temperature=1.0, top_k=None, top_p=None, generator=None, force=None):
        """One byte for each of these rows (R,) (none waiting for the main network), through the encoder and decoder
        caches of only those rows -> (new bytes (R,), logits (R, 512)). force (R,) as in step()."""
        m, everyone = self.model, len(rows) == len(self.rows)
        if bool(self.waiting[rows].any()):
            raise RuntimeError("a row's newest patch has not gone through the main network (close_patches)")
        t, closes = self.lens[rows] - 1, self.pending_end[rows]
        self.ends[rows, t] = closes
        last = self.x[rows, t]
        prior = None
        if m.has_prior:  # the prior at the newest byte: a closed patch starts the trie walk afresh
            node = torch.where(closes, 0, m.trie.step(self.node[rows], last))
            self.node[rows] = node
            prior = m.prior_at(self.cum, rows, node)[:, None]
        logits = m.decode(last[:, None], self.h_last[rows, None], self.y_cur[rows, None], prior=prior,
                          cache=self.dec_cache if everyone else self.dec_cache.select(rows))[:, 0]
        if force is not None or temperature == 0:  # greedy: the likeliest byte (both halves summed), then its flag
            new = byte_logprobs(logits).argmax(-1) if force is None else force.to(self.x.device)
            r = torch.arange(len(rows), device=logits.device)
            pending = logits[r, new + 256] > logits[r, new]
        else:
            index = sample_from_logits(logits, temperature, top_k, top_p, generator)[:, 0]
            new, pending = index % 256, index >= 256
        self.pending_end[rows], self.waiting[rows] = pending, pending
        self.done[rows] |= new == BOS_BYTE  # 0xFE would start a new document: the row is finished
        self.x[rows, t + 1] = new
        self.lens[rows] = t + 2
        enc = self.enc_cache if everyone else self.enc_cache.select(rows)
        sub = m.subword_newest(self.x[rows], self.lens[rows]) if m.scfg.subword else None
        self.h_last[rows] = m.encode(new[:, None], cache=enc, sub=sub)[:, 0]
        return new, logits


LATE_EPS = 0.01  # the late-flag model decides a flag at once when its other value is less likely than this


class LateFlagGeneration(ByteGeneration):
    """Cached generation from the late-flag byte model: the newest byte's boundary flag stays open until the next byte
    is known. Byte t+1 is drawn from the mixture over byte t's flag, p(b) = sum_e p(e_t = e) p(b | e_t = e), where
    p(e_t) is the head's two halves for the known byte t, and e_t is then the likelier flag given b_t+1 as well. A
    flag whose other value has probability below eps is decided at once, as greedy generation decides it (the rule
    is part of the model: late_flag_logprobs scores with the same eps). The others pay for the "ends" hypothesis:
    the main network steps on the byte, and the step is kept only if the patch does end. eps=0: every flag waits,
    and the main network steps at every byte. The prompt's flags come from the patcher (ByteGeneration's prefill),
    its last byte's flag open. Rows in lockstep: step() -> (new bytes (B,), log p(next byte) (B, 256) fp32: the
    mixture they were drawn from). x, lens and ends record the bytes and the flags decided, as in ByteGeneration."""

    def __init__(self, model, prompts, max_new_bytes, eps=None):
        super().__init__(model, prompts, max_new_bytes)
        self.eps = LATE_EPS if eps is None else eps
        rows, lens = self.rows, self.lens
        last = self.x[rows, lens - 1]
        prev = torch.stack([p[-1] if len(p) else torch.zeros(512, device=last.device, dtype=p.dtype)
                            for p in self.prefill_logits])
        log_e = torch.log_softmax(torch.stack([prev[rows, last], prev[rows, last + 256]], 1).float(), 1)
        ends = torch.tensor([-math.inf, 0.0], device=last.device)
        self.log_e = torch.where((lens == 1)[:, None], ends, log_e)  # a lone 0xFE is its own patch

    def _decoder_at(self, r, y, cum, cum_rows, node):
        """The decoder at the newest byte of rows r given that byte's patch state: its cache slot is written, not
        kept (the position does not advance) -> logits (R, 512)."""
        m, stay = self.model, torch.zeros_like(r)
        prior = None if cum is None else m.prior_at(cum, cum_rows, node)[:, None]
        cache = self.dec_cache if len(r) == len(self.rows) else self.dec_cache.select(r)
        last = self.x[r, self.lens[r] - 1]
        return m.decode(last[:, None], self.h_last[r, None], y[:, None], cache=cache, advance=stay, prior=prior)[:, 0]

    @torch.no_grad()
    def step(self, temperature=1.0, top_k=None, top_p=None, generator=None, force=None):
        """One byte per row; force (B,) appends those bytes instead of sampling (teacher-forced scoring)."""
        m, rows, B = self.model, self.rows, len(self.rows)
        log_e, prior = self.log_e, m.has_prior
        at_once = log_e[:, 1] > log_e[:, 0]
        sure = torch.isinf(log_e).any(1) | (log_e.min(1).values < math.log(self.eps) if self.eps > 0 else False)
        weight = torch.where(sure[:, None], torch.stack([~at_once, at_once], 1).float().log(), log_e)
        logits = torch.zeros(B, 2, 512, device=log_e.device)
        logp = torch.full((B, 2, 256), -math.inf, device=log_e.device)  # -inf where a hypothesis is not needed
        # "ends" first, so that the decoder slot of a row that needs both is left holding "continues"
        r1 = (~sure | at_once).nonzero()[:, 0]
        cum1, node1 = None, None
        if len(r1):
            cache = self.main_cache if len(r1) == B else self.main_cache.select(r1)
            y1 = m.main.run_blocks(self.h_last[r1, None], cache=cache, advance=torch.zeros_like(r1))[:, 0]
            if prior:
                cum1, node1 = m.prior_cumulative(y1), torch.zeros_like(r1)
            logits[r1, 1] = self._decoder_at(r1, y1, cum1, torch.arange(len(r1), device=r1.device), node1).float()
            logp[r1, 1] = byte_logprobs(logits[r1, 1])
        r0 = (~sure | ~at_once).nonzero()[:, 0]
        if len(r0):
            node0 = m.trie.step(self.node[r0], self.x[r0, self.lens[r0] - 1]) if prior else None
            logits[r0, 0] = self._decoder_at(r0, self.y_cur[r0], self.cum if prior else None, r0, node0).float()
            logp[r0, 0] = byte_logprobs(logits[r0, 0])
        mixed = torch.logsumexp(weight[:, :, None] + logp, 1)
        if force is not None:
            new = force.to(mixed.device)
        elif temperature == 0:
            new = mixed.argmax(-1)
        else:
            new = sample_from_logits(mixed, temperature, top_k, top_p, generator)[:, 0]
        joint = weight + logp.gather(2, new[:, None, None].expand(-1, 2, 1))[..., 0]
        e = torch.where(sure, at_once, joint[:, 1] > joint[:, 0])  # byte t's flag, now that byte t+1 is known
        # keep the decided hypothesis: the main network's step for the rows whose patch ended
        self.main_cache.advance(e.long())
        kept = e[r1]
        if len(r1):
            self.y_cur[r1[kept]] = y1[kept]
            if prior:
                self.cum[r1[kept]] = cum1[kept]
        if prior:
            if len(r0):
                self.node[r0] = node0
            self.node[e] = 0
        redo = r1[kept & ~sure[r1]]  # rows that needed both and ended: their decoder slot holds "continues"
        if len(redo):
            self._decoder_at(redo, self.y_cur[redo], self.cum if prior else None, redo,
                             torch.zeros_like(redo) if prior else None)
        self.dec_cache.advance(torch.ones_like(rows))
        t = self.lens - 1
        self.ends[rows, t] = e
        chosen = logits[rows, e.long()]
        self.log_e = torch.log_softmax(torch.stack([chosen[rows, new], chosen[rows, new + 256]], 1), 1)
        self.done |= new == BOS_BYTE
        self.x[rows, t + 1] = new
        self.lens = t + 2
        sub = m.subword_newest(self.x, self.lens) if m.scfg.subword else None
        self.h_last = m.encode(new[:, None], cache=self.enc_cache, sub=sub)[:, 0]
        return new, mixed


# ----------------------------------------------------------------------------------------------------------------
# Byte-model folders: model.safetensors (the weights) and config.json (both configurations, stage, phase, training
# config, teacher name, results), the unit that the stages write and everything else reads. Weights and JSON only: a
# pickle (torch.save / torch.load) can run any code when it is loaded, so a checkpoint that someone shares could too.

FORMAT = "byte-model/1"
CONFIG_FIELDS = {"format": str, "save_id": str, "stage": int, "teacher": str, "student_config": dict,
                 "teacher_config": dict, "config": dict, "phase": str, "step": int, "phase_done": bool,
                 "results": dict}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
INTEGER_BUFFERS = {"prior_vocab_bytes": ("U8",), "prior_vocab_ends": ("I64",)}  # the prior's vocabulary
MAX_JSON_BYTES = 64 * 1024 * 1024  # ours are kilobytes; anything far larger is not one


def save_student(folder, model, meta, extra=None):
    """Write the byte-model folder `folder`: model.safetensors (the weights as they are, fp32 in training) and
    config.json (meta, with the model's own configurations). extra(staging, save_id), if given, writes more files
    beside them (train.py: the resume state). Atomic as a whole: everything goes into folder/.saving, which is renamed
    to folder/.saved once complete (the commit), then moved into place file by file (finish_save). A crash before the
    commit leaves the previous save as it was; one after it is completed by the next save or --resume. Every file
    carries the save's random save_id, so files of two different saves never load as one."""
    os.makedirs(folder, exist_ok=True)
    finish_save(folder)
    staging = os.path.join(folder, ".saving")
    shutil.rmtree(staging, ignore_errors=True)  # a save that died before its commit
    os.makedirs(staging)
    save_id = uuid.uuid4().hex  # from os.urandom: draws nothing from the generators that resume restores
    config = {**meta, "format": FORMAT, "save_id": save_id, "student_config": asdict(model.scfg),
              "teacher_config": asdict(model.tcfg)}
    write_safetensors(model.state_dict(), os.path.join(staging, "model.safetensors"),
                      {"format": FORMAT, "save_id": save_id})
    with open(os.path.join(staging, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    if extra is not None:
        extra(staging, save_id)
    os.rename(staging, os.path.join(folder, ".saved"))
    finish_save(folder)


def finish_save(folder):
    """Move a committed save (folder/.saved) into place; each os.replace is atomic, and a crash midway is finished by
    the next call."""
    saved = os.path.join(folder, ".saved")
    if not os.path.isdir(saved):
        return
    for root, _, names in os.walk(saved):
        target = os.path.join(folder, os.path.relpath(root, saved))
        os.makedirs(target, exist_ok=True)
        for name in names:
            os.replace(os.path.join(root, name), os.path.join(target, name))
    shutil.rmtree(saved)


def read_json(path):
    """A JSON object from a file, or a ValueError naming the file: whatever else is there is only parsed as JSON."""
    try:
        if os.path.getsize(path) > MAX_JSON_BYTES:
            raise ValueError(f"larger than {MAX_JSON_BYTES} bytes")
        with open(path, "rb") as f:
            value = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{path}: not a JSON file ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a JSON object")
    return value


def has_type(value, kind):
    """JSON value against a field type: int excludes bool, a float may be written as an int, X | None allows null."""
    return any(value is None if k is type(None) else is_int(value) if k is int else
               (is_int(value) or isinstance(value, float)) if k is float else isinstance(value, k)
               for k in typing.get_args(kind) or (kind,))


def check_fields(values, spec, where):
    """Every key of spec {key: type} present in values with a value of that type, else a ValueError naming it."""
    for key, kind in spec.items():
        if key not in values:
            raise ValueError(f"{where}: {key!r} is missing")
        if not has_type(values[key], kind):
            raise ValueError(f"{where}: {key!r} is {str(values[key])[:60]!r}, not of type {kind}")


# fields added after folders were written: the value that builds the model such a folder holds
LATER_FIELDS = {"StudentConfig": {"prior": True, "subword": False}}


def config_from_json(cls, values, where):
    """A StudentConfig / TeacherConfig from its JSON object: exactly the dataclass's fields (a default silently filled
    in could build another model that the weights happen to fit), each of its type, plain ints not negative."""
    types = {f.name: f.type for f in fields(cls)}
    values = {**LATER_FIELDS.get(cls.__name__, {}), **values}
    if values.keys() != types.keys():
        extra, missing = sorted(values.keys() - types.keys()), sorted(types.keys() - values.keys())
        raise ValueError(f"{where}: unknown fields {extra}, missing fields {missing}")
    check_fields(values, types, where)
    negative = [k for k, v in values.items() if types[k] is int and v < 0]
    if negative:
        raise ValueError(f"{where}: {negative[0]} is negative ({values[negative[0]]})")
    return cls(**{k: float(v) if is_int(v) and float in (typing.get_args(types[k]) or (types[k],)) else v
                  for k, v in values.items()})


def read_student_config(folder):
    """config.json of a byte-model folder, checked: the folder holds both files, and every field has its type.
    -> (config.json's contents, StudentConfig, TeacherConfig)."""
    if not os.path.exists(folder):
        raise FileNotFoundError(f"no checkpoint at {folder}")
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: not a byte-student checkpoint: that is a file, and a checkpoint is a folder with "
                         "model.safetensors and config.json (pickled .pt checkpoints are never loaded: they run code)")
    missing = [name for name in ("model.safetensors", "config.json") if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        old = " (its ckpt.pt is a pickle from before byte-model folders: never loaded, it could run code)" \
            if os.path.exists(os.path.join(folder, "ckpt.pt")) else ""
        raise FileNotFoundError(f"no checkpoint at {folder} (no {' or '.join(missing)} in it){old}")
    path = os.path.join(folder, "config.json")
    try:
        meta = read_json(path)
        check_fields(meta, CONFIG_FIELDS, path)
        if meta["format"] != FORMAT:
            raise ValueError(f"{path}: format {meta['format']!r}, not {FORMAT!r}")
        scfg = config_from_json(StudentConfig, meta["student_config"], f"{path}: student_config")
        tcfg = config_from_json(TeacherConfig, meta["teacher_config"], f"{path}: teacher_config")
    except ValueError as e:
        raise ValueError(f"{folder}: not a byte-student checkpoint ({e})") from None
    return meta, scfg, tcfg


def check_weights(path, entries, model):
    """The safetensors header against the model that config.json describes: the same names, the same shapes, floats."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unknown = sorted(expected.keys() - entries.keys()), sorted(entries.keys() - expected.keys())
    wrong = [f"{k} is {list(entries[k][1])}, config.json says {list(expected[k])}"
             for k in sorted(expected.keys() & entries.keys()) if entries[k][1] != expected[k]]
    not_float = [f"{k} is {entries[k][0]}" for k in sorted(entries)
                 if entries[k][0] not in INTEGER_BUFFERS.get(k, FLOAT_DTYPES)]
    if missing or unknown or wrong or not_float:
        parts = [f"missing {missing[:3]}" if missing else "", f"unexpected {unknown[:3]}" if unknown else "",
                 "; ".join(wrong[:3]), "; ".join(not_float[:3])]
        raise ValueError(f"{path}: weights do not fit config.json: " + "; ".join(p for p in parts if p))


def load_student(folder, device="cpu", dtype=torch.float32):
    """A ByteLM from a byte-model folder (save_student; stage1_kd.py, stage2_sft.py) -> (model, config.json's contents).
    config.json and the safetensors header are checked against each other before a tensor is read: anything else given
    as a checkpoint (a pickle, a folder without the two files, a header that lies, a config.json with wrong types,
    missing keys or sizes that disagree with the weights) is one ValueError / FileNotFoundError; nothing in it runs."""
    meta, scfg, tcfg = read_student_config(folder)
    device = check_device(device)
    path = os.path.join(folder, "model.safetensors")
    entries, metadata, _ = read_safetensors_header(path)
    if metadata.get("save_id") != meta["save_id"]:
        raise ValueError(f"{folder}: model.safetensors (save_id {metadata.get('save_id')!r}) and config.json (save_id "
                         f"{meta['save_id']!r}) come from different saves")
    try:  # on the meta device: no memory for the weights yet (RoPE tables are computed on the CPU even there)
        with torch.device("meta"):
            model = ByteLM(scfg, tcfg)
    except (ValueError, TypeError, KeyError, RuntimeError, ZeroDivisionError, OverflowError) as e:
        raise ValueError(f"{folder}: config.json does not describe a byte student ({type(e).__name__}: {e})") from None
    check_weights(path, entries, model)
    model.load_state_dict(read_safetensors(path, dtype=dtype, device=device), assign=True)
    return model.eval(), meta
