"""Cached generation from the byte student, and the byte models built on it, each with its proper likelihood.

The 512-way head defines a joint model over bytes and their patch-end flags. Three byte models come from it, named
so in sample.py's and eval.py's --byte_model and the byte_model= of the Python calls:
- joint (ByteGeneration(byte_model="joint"), the default of sample.py and eval.py; its likelihood is marginal.py's
  sum over every flag sequence, bench/fidelity.py's headline): byte and flag drawn together as one of the 512 entries;
- greedy (ByteGeneration, greedy_flag_logprobs): the byte drawn from the two halves summed, its flag the likelier
  half for it;
- late (LateFlagGeneration, late_flag_logprobs): each flag decided one byte late, once the next byte is known.
The last two are exact likelihoods of byte models of their own (every flag a function of the bytes already seen); each
commits to one patching while it writes, and pays for that in bits. Each row's state, and the steps that advance it,
is a RowState: generation, its beam search and marginal.py's beam over patchings step their rows through it.
"""
import math
import os
from dataclasses import dataclass

import torch

from model import BOS_BYTE, byte_logprobs
from targets import patch_prefix_nodes
from transformer import KVCache, sample_from_logits


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
        lengths = torch.tensor([len(texts[i]) for i in chunk], device=gen.rows.device)
        for rows, t, new, logits in gen.run(lengths, force=x):  # rows out of step: one main-network call for many rows
            rows, t = rows.cpu(), t.cpu()
            logp[rows, t] = byte_logprobs(logits).gather(1, new[:, None].to(logits.device))[:, 0].cpu()
            ends = gen.state.pending[rows.to(logits.device)]
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
    a function of the bytes already seen, so the product is the exact likelihood of that model (sample.py
    --byte_model=late draws from it); a flag the next byte contradicts costs little here, where greedy flags
    (greedy_flag_logprobs) pay a dead end. eps as in LateFlagGeneration (None: LATE_EPS; 0: every flag waits).
    Texts in one lockstep batch, each from a fresh document start. -> per text (log p(byte) (n,), flags (n,) bool;
    the last byte's flag is never decided), fp32, natural log."""
    B, L = len(texts), max(map(len, texts))
    x = torch.full((B, L), ord(" "), dtype=torch.long)  # after a short text: never used
    for i, t in enumerate(texts):
        x[i, :len(t)] = torch.tensor(list(t), dtype=torch.long)
    gen = LateFlagGeneration(model, [b""] * B, L, eps)
    x, logp = x.to(gen.rows.device), torch.zeros(B, L, device=gen.rows.device)
    for t in range(L):
        new, mixed = gen.step(force=x[:, t])
        logp[:, t] = mixed.gather(1, new[:, None])[:, 0]
    return [(logp[i, :len(t)].cpu(), gen.state.ends[i, 1:len(t) + 1].cpu()) for i, t in enumerate(texts)]


@dataclass(eq=False)
class RowState:
    """What each row of cached decoding carries (a row: one hypothesis, bytes from 0xFE with a flag per byte), and the
    steps that advance a row: ByteGeneration, LateFlagGeneration, beam_search and marginal.StudentBeam all step their
    rows through these. A beam's slots share their text's bytes (marginal.StudentBeam): there x, lens, enc and h are
    None, and the steps take the newest byte and its encoder state from the text."""
    model: object
    ends: torch.Tensor         # (R, T) bool: each byte's flag, as far as decided (ByteGeneration: once the decoder
                               # has read the byte or its patch has closed; a beam's slot: as soon as it is chosen)
    main: KVCache              # the main network's keys and values, one entry per closed patch
    dec: KVCache               # the decoder's, one per byte it has read
    y: torch.Tensor            # (R, D) the newest patch output (model.null_patch before the first)
    pending: torch.Tensor      # (R,) bool: the newest byte's flag (it closes its patch)
    cum: torch.Tensor = None   # with the prior: (R, V + 1) the newest patch's prefix sums (model.prior_cumulative)
    node: torch.Tensor = None  # with the prior: (R,) the trie node of the patch's bytes before the newest (-1: none)
    x: torch.Tensor = None     # (R, T) long: the bytes, 0xFE first, of which lens (R,) are read
    lens: torch.Tensor = None
    enc: KVCache = None        # the encoder's keys and values, one per byte read
    h: torch.Tensor = None     # (R, D) the newest byte's encoder state

    @classmethod
    def empty(cls, model, rows, width, main_len, text=True, dtype=None):
        """`rows` rows with room for `width` bytes and `main_len` patches, nothing read: no flags, the null patch as
        the newest patch output (with its prior), no trie node. text=False: without x, lens, enc and h."""
        m, dev = model, model.head.weight.device
        y = m.null_patch.detach().to(dtype or m.null_patch.dtype).expand(rows, -1).clone()
        state = cls(m, torch.zeros(rows, width, dtype=torch.bool, device=dev), m.main.new_cache(rows, main_len),
                    m.decoder.new_cache(rows, width), y, torch.zeros(rows, dtype=torch.bool, device=dev))
        if m.has_prior:
            state.cum = m.prior_cumulative(y[:1]).expand(rows, -1).clone()
            state.node = torch.full((rows,), -1, dtype=torch.long, device=dev)
        if text:
            state.x = torch.zeros(rows, width, dtype=torch.long, device=dev)
            state.lens = torch.zeros(rows, dtype=torch.long, device=dev)
            state.enc, state.h = m.encoder.new_cache(rows, width), torch.zeros_like(y)
        return state

    def copy_rows(self, dst, src, source=None):
        """Rows dst (R,) take rows src (R,) of source (default: this state), caches included: a hypothesis forks, or
        moves to another state. A part that either state lacks is left; of x and ends, the bytes both have room for."""
        source = self if source is None else source
        for mine, theirs in ((self.x, source.x), (self.ends, source.ends)):
            if mine is not None and theirs is not None:
                width = min(mine.shape[1], theirs.shape[1])
                mine[dst, :width] = theirs[src, :width]
        for mine, theirs in zip(self._parts(), source._parts()):
            if isinstance(mine, KVCache) and theirs is not None:
                mine.copy_rows(dst, src, theirs)
            elif mine is not None and theirs is not None:
                mine[dst] = theirs[src]

    def _parts(self):  # every part but x and ends (whose byte axes may differ in length), in one order
        return self.lens, self.enc, self.dec, self.main, self.y, self.h, self.pending, self.cum, self.node

    def cache_rows(self, cache, rows):
        """cache itself when rows (distinct, in order) are all of this state's rows, else a view of those rows alone
        (KVCache.select): the other rows' entries and positions do not move."""
        return cache if len(rows) == len(self.pending) else cache.select(rows)

    def patch_output(self, rows, z, advance=None):
        """The main network on patch vectors z (R, D) of rows (R,), through their cache entries alone -> (R, D).
        advance (R,): how far each row's cache moves (default 1; 0: a tentative step, LateFlagGeneration)."""
        return self.model.main.run_blocks(z[:, None], cache=self.cache_rows(self.main, rows), advance=advance)[:, 0]

    def close(self, rows, z):
        """Rows (R,) close their newest patch, z (R, D) the encoder state of its last byte: the main network takes it,
        and its output (with its prior's prefix sums) becomes the rows' newest patch output."""
        self.y[rows] = self.patch_output(rows, z)
        if self.cum is not None:
            self.cum[rows] = self.model.prior_cumulative(self.y[rows])

    def decoder(self, rows, last, h, y, prior=None, advance=None):
        """The decoder at the newest bytes last (R,) of rows (R,), their encoder states h (R, D) and patch outputs y
        (R, D), through the rows' cache entries -> logits (R, 512). advance as in patch_output."""
        return self.model.decode(last[:, None], h[:, None], y[:, None], prior=prior,
                                 cache=self.cache_rows(self.dec, rows), advance=advance)[:, 0]

    def logits(self, rows, last, h):
        """The head's logits (R, 512) for the byte after the newest, last (R,) with encoder states h (R, D), of rows
        (R,), whose newest patch has closed if their newest byte closes it: the decoder reads that byte, and the
        prior's trie node moves past it (to the root after a closed patch)."""
        prior = None
        if self.cum is not None:
            self.node[rows] = torch.where(self.pending[rows], 0, self.model.vocab.trie.step(self.node[rows], last))
            prior = self.model.prior_at(self.cum, rows, self.node[rows])[:, None]
        return self.decoder(rows, last, h, self.y[rows], prior)

    def append(self, rows, new):
        """Rows (R,) read their next bytes new (R,) through the encoder."""
        m, t = self.model, self.lens[rows] - 1
        self.x[rows, t + 1] = new
        self.lens[rows] = t + 2
        sub = m.vocab.subword_newest(self.x[rows], self.lens[rows]) if m.scfg.subword else None
        self.h[rows] = m.encode(new[:, None], cache=self.cache_rows(self.enc, rows), sub=sub)[:, 0]


@torch.no_grad()
def prefill(model, prompts, max_new_bytes, all_logits=True, given=None):
    """The rows of generation after prompts (each a bytes object; 0xFE is prepended), read along the patcher's flags
    (ByteGeneration) -> (RowState with room for max_new_bytes more bytes, per row the logits at its prompt positions
    but the last (L_i - 1, 512)); all_logits=False: only the newest of them (1, 512) (0 rows for a lone 0xFE), the
    prior computed there alone (what marginal.py needs). given: per prompt its bytes' flags (bool (len(prompt),), the
    newest byte's included) or None (the patcher's)."""
    m, dev = model, model.head.weight.device
    prompts = [bytes([BOS_BYTE]) + bytes(p) for p in prompts]
    rows, lens = torch.arange(len(prompts), device=dev), torch.tensor([len(p) for p in prompts], device=dev)
    L = int(lens.max())
    all_x = torch.zeros(len(prompts), L + max_new_bytes, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        all_x[i, :len(p)] = torch.tensor(list(p), device=dev)
    x, enc, dec = all_x[:, :L], m.encoder.new_cache(*all_x.shape), m.decoder.new_cache(*all_x.shape)
    h = m.encode(x, cache=enc, advance=lens)
    t = torch.arange(L, device=dev)[None]
    ends = (m.boundary_probs(h) > m.scfg.boundary_threshold) & (t < lens[:, None] - 1)
    newest, has = given_flags(given, ends, lens)
    # room for the prompt's patches, its newest one and one per new byte (a byte closes at most one): a patch is
    # ~4 bytes, so sizing by bytes would allocate (and zero) ~4x the main network's keys and values
    room = int(ends.sum(1).max()) + 1 + max_new_bytes
    main = m.main.new_cache(len(lens), min(room, m.tcfg.max_seq_len))
    y, patch_mask = m.run_main(h, ends, cache=main)
    at = (lens - 2).clamp(min=0)  # the position that predicts the newest prompt byte
    logits = m.decode(x, h, m.dechunk(y, ends), cache=dec, advance=lens - 1,
                      prior=m.sequence_prior(x, ends, y, patch_mask) if all_logits else None)
    if not all_logits and m.has_prior:
        prior = m.prior_scale * m.sequence_prior(x, ends, y, patch_mask, at=at)
        logits = logits.to(torch.promote_types(logits.dtype, prior.dtype))
        logits[rows, at] += prior
    counts = ends.sum(1)
    y = torch.where((counts > 0)[:, None], y[rows, (counts - 1).clamp(min=0)], m.null_patch.to(y.dtype))
    prev, last = logits[rows, at], x[rows, lens - 1]
    # The last prompt byte's flag: the head's more likely e for that byte; a lone BOS byte is its own patch.
    pending = torch.where(has, newest, (prev[rows, last + 256] > prev[rows, last]) | (lens == 1))
    state = RowState(m, torch.zeros_like(all_x, dtype=torch.bool), main, dec, y, pending, x=all_x, lens=lens, enc=enc,
                     h=h[rows, lens - 1])
    state.ends[:, :L] = ends
    if m.has_prior:  # the trie node before the newest byte, and each row's current patch distribution
        state.node = torch.where(lens >= 2, patch_prefix_nodes(m.vocab.trie, x, ends)[rows, at], -1)
        state.cum = m.prior_cumulative(y)
    first = torch.zeros_like(at) if all_logits else at
    return state, [logits[i, first[i]:lens[i] - 1] for i in range(len(lens))]


def given_flags(given, ends, lens):
    """Prefill's flags where a prompt's are given (per prompt bool (n,) or None): ends (B, L) takes them in place but
    the newest byte's -> (the newest byte's given flag (B,), whether it was given (B,))."""
    newest, has = torch.zeros_like(lens, dtype=torch.bool), torch.zeros_like(lens, dtype=torch.bool)
    t = torch.arange(ends.shape[1], device=ends.device)
    for i, flags in enumerate(given or []):
        if flags is not None:
            if len(flags) != int(lens[i]) - 1:
                raise ValueError(f"ends: {len(flags)} flags for a prompt of {int(lens[i]) - 1} bytes")
            row = torch.cat([torch.ones(1, dtype=torch.bool), torch.as_tensor(flags, dtype=torch.bool).cpu()])
            ends[i, :len(row)] = row.to(ends.device) & (t[:len(row)] < lens[i] - 1)
            newest[i], has[i] = row[-1], True
    return newest, has


def is_joint(byte_model):
    """ByteGeneration's byte model: "joint" -> True, "greedy" -> False."""
    if byte_model not in ("greedy", "joint"):
        raise ValueError(f"byte_model={byte_model!r}: greedy or joint")
    return byte_model == "joint"


class ByteGeneration:
    """Cached byte generation for a batch of prompts (each a bytes object; 0xFE is prepended), its rows a RowState.

    Encoder and decoder step once per byte; the main network steps only for rows whose newest byte closes a patch.
    Prefill: the patcher decides the boundaries of all prompt bytes but the last (its one-byte lookahead sees the
    next prompt byte); the last prompt byte's flag is the head's more likely e for that known byte at the previous
    position. ends (per prompt its bytes' flags, or None) gives a prompt's flags instead, the last byte's included.
    After that, every flag is the e half of the sampled index. `state.x[:, :state.lens]` and `state.ends` record the
    bytes and the boundaries used, so a full forward with those ends reproduces every logit.

    byte_model: "greedy" (the default) draws the byte from the head's two halves summed (temperature, top_k and top_p
    act on those 256 byte probabilities; temperature 0 takes the likeliest byte) and gives it the likelier flag;
    "joint" draws one of the 512 entries, byte and flag together (temperature, top_k and top_p act on the 512
    entries; temperature 0 takes the likeliest entry): ancestral sampling of the joint at temperature 1.
    Teacher-forced bytes (force) take the likelier flag under either.

    Two ways to drive it: step() gives every row one byte (rows in lockstep; the main network runs at a step for the
    rows that close a patch there), run() lets rows get out of step so that the main network runs once for many rows
    (in a batch nearly every byte closes some row's patch, and a CPU pays the main network's weight reads per call,
    however few rows it takes). Each row's bytes and logits are the same either way; only the order of work differs."""

    def __init__(self, model, prompts, max_new_bytes, byte_model="greedy", all_logits=True, ends=None):
        joint = is_joint(byte_model)
        state, self.prefill_logits = prefill(model, prompts, max_new_bytes, all_logits, ends)
        self._start(state, joint)

    @classmethod
    def resume(cls, state, byte_model="greedy"):
        """Generation that goes on from rows made elsewhere (a RowState with its bytes: marginal.StudentBeam.generation
        hands over hypotheses of the byte marginal over a prompt's patchings) instead of the patcher's prefill; rows
        then step as after a prefill."""
        self = cls.__new__(cls)
        self._start(state, is_joint(byte_model))
        self.prefill_logits = None
        return self

    def _start(self, state, joint):
        self.model, self.state, self.joint = state.model, state, joint
        self.rows = torch.arange(len(state.pending), device=state.pending.device)
        self.waiting = state.pending.clone()  # rows whose newest patch the main network has not yet taken
        self.done = torch.zeros_like(state.pending)  # rows that wrote 0xFE

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
        lens = self.state.lens
        start = lens.clone()
        self.live = torch.ones_like(self.done)
        while True:
            live = self.live & (lens - start < n)
            n_live = int(live.sum())
            if n_live == 0:
                return
            waiting = live & self.waiting
            n_wait = int(waiting.sum())
            if n_wait and (n_wait == n_live or n_wait >= wait * n_live):
                self.close_patches(waiting.nonzero()[:, 0])
                continue
            rows = (live & ~self.waiting).nonzero()[:, 0]
            offsets = lens[rows] - start[rows]
            forced = None if force is None else force.to(lens.device)[rows, offsets]
            new, logits = self.step_rows(rows, temperature, top_k, top_p, generator, forced)
            yield rows, offsets, new, logits

    @torch.no_grad()
    def close_patches(self, rows):
        """The main network takes the newest patch of these rows (R,) (each waiting: its newest byte closes a patch),
        stepping only their cache entries; the other rows' entries and positions do not move."""
        s = self.state
        s.ends[rows, s.lens[rows] - 1] = True
        s.close(rows, s.h[rows])
        self.waiting[rows] = False

    @torch.no_grad()
    def step_rows(self, rows, temperature=1.0, top_k=None, top_p=None, generator=None, force=None):
        """One byte for each of these rows (R,) (none waiting for the main network), through the encoder and decoder
        caches of only those rows -> (new bytes (R,), logits (R, 512)). force (R,) as in step()."""
        logits = self.next_logits(rows)
        if self.joint and force is None:  # one of the 512 entries: the byte and its flag together
            index = sample_from_logits(logits, temperature, top_k, top_p, generator)[:, 0]
            new, pending = index % 256, index >= 256
        else:  # the byte from both halves summed, then its likelier flag
            if force is not None:
                new = force.to(logits.device)
            elif temperature == 0:
                new = byte_logprobs(logits).argmax(-1)
            else:
                new = sample_from_logits(byte_logprobs(logits), temperature, top_k, top_p, generator)[:, 0]
            r = torch.arange(len(rows), device=logits.device)
            pending = logits[r, new + 256] > logits[r, new]
        self.append(rows, new, pending)
        return new, logits

    @torch.no_grad()
    def next_logits(self, rows):
        """The head's logits (R, 512) for the byte after each of these rows' newest (the decoder consumes that byte;
        none of the rows may be waiting for the main network). append() then gives each row its next byte."""
        if bool(self.waiting[rows].any()):
            raise RuntimeError("a row's newest patch has not gone through the main network (close_patches)")
        s = self.state
        t = s.lens[rows] - 1
        s.ends[rows, t] = s.pending[rows]
        return s.logits(rows, s.x[rows, t], s.h[rows])

    @torch.no_grad()
    def append(self, rows, new, pending):
        """Rows (R,) take their next bytes new (R,), with flags pending (R,) bool (the byte closes its patch), through
        the encoder."""
        self.state.pending[rows], self.waiting[rows] = pending, pending
        self.done[rows] |= new == BOS_BYTE  # 0xFE would start a new document: the row is finished
        self.state.append(rows, new)

    def fork(self, src):
        """Row i becomes a copy of row src[i] (B,), its caches and state included: a beam's hypotheses branch. Only
        the rows that change are copied."""
        dst = (src != self.rows).nonzero()[:, 0]
        if len(dst):
            src = src[dst]
            self.state.copy_rows(dst, src)
            self.waiting[dst], self.done[dst] = self.waiting[src], self.done[src]


@torch.no_grad()
def beam_search(model, prompt, max_bytes, beam=4, stop=b"", on_commit=None, start=None):
    """The likeliest continuation of prompt (bytes) under the greedy-flag byte model (each byte from the two halves
    summed, its flag the likelier half), by a beam of `beam` byte strings, at most max_bytes long: each step extends
    every hypothesis by every byte, and keeps the `beam` heaviest by total log-probability. A hypothesis that writes
    `stop` (the end-of-turn code) or 0xFE is finished; the search ends once no live one is heavier than the best
    finished one (scores only fall), or at max_bytes. Byte-greedy decoding can miss the likeliest string when the
    likeliest first byte leads to many strings that are each unlikely (the teacher's own first token "The" against
    its "L", "La", "Le" ...); a beam sees that. -> (bytes without the stop, ended: it wrote stop). on_commit(bytes)
    sees the bytes that every live hypothesis shares, as they become shared (streaming). start: (a ByteGeneration of
    `beam` rows after the prompt with room for max_bytes + 2 more, their scores (beam,) float64, -inf for an unused
    row): the search starts from those hypotheses of the prompt's flags (conditioning.search_start: the byte
    marginal's over the prompt's patchings, each scored by its weight); by default one, the patcher's flags."""
    if start is None:
        gen = ByteGeneration(model, [prompt] * beam, max_bytes + 2, byte_model="greedy", all_logits=False)
        score = torch.full((beam,), -math.inf, dtype=torch.float64, device=gen.rows.device)
        score[0] = 0.0  # the rows start as copies of one hypothesis
    else:
        gen, score = start
        score = score.to(torch.float64).clone()
    x, lens = gen.state.x, gen.state.lens  # gen.fork and gen.append write into these
    start, dev = int(lens[0]), x.device
    best, best_score, committed = (b"", False), -math.inf, 0
    for _ in range(max_bytes):
        closing = gen.waiting.nonzero()[:, 0]
        if len(closing):
            gen.close_patches(closing)
        logits = gen.next_logits(gen.rows)
        logp = byte_logprobs(logits).double()  # (beam, 256)
        cand = (score[:, None] + logp).view(-1)
        top = torch.topk(cand, beam)
        parent, new = top.indices // 256, top.indices % 256
        r = torch.arange(beam, device=dev)
        pending = logits[parent, new + 256] > logits[parent, new]
        gen.fork(parent)
        gen.append(r, new, pending)
        score = top.values.clone()
        for i in range(beam):
            text = bytes(x[i, start:lens[i]].tolist())
            ended = bool(stop) and text.endswith(stop)
            if (ended or new[i] == BOS_BYTE) and score[i] > best_score:
                best, best_score = (text[:-len(stop)] if ended else text[:-1], ended), float(score[i])
            if ended or new[i] == BOS_BYTE:
                score[i] = -math.inf
        live = score > -math.inf
        if not bool(live.any()) or float(score.max()) <= best_score:
            break
        if on_commit is not None:
            texts = [bytes(x[i, start:lens[i]].tolist()) for i in live.nonzero()[:, 0].tolist()]
            shared = os.path.commonprefix(texts + ([best[0]] if best_score > -math.inf else []))
            if stop:
                shared = shared[:len(shared) - next((k for k in range(len(stop) - 1, 0, -1)
                                                     if shared.endswith(stop[:k])), 0)]
            if len(shared) > committed:
                on_commit(shared[committed:])
                committed = len(shared)
    if best_score == -math.inf:  # nothing finished within max_bytes: the heaviest live hypothesis
        i = int(score.argmax())
        best = (bytes(x[i, start:start + max_bytes].tolist()), False)
    if on_commit is not None and len(best[0]) > committed:
        on_commit(best[0][committed:])
    return best


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
    mixture they were drawn from). state.x, lens and ends record the bytes and the flags decided, as in
    ByteGeneration."""

    def __init__(self, model, prompts, max_new_bytes, eps=None):
        super().__init__(model, prompts, max_new_bytes)
        self.eps = LATE_EPS if eps is None else eps
        rows, lens = self.rows, self.state.lens
        last = self.state.x[rows, lens - 1]
        prev = torch.stack([p[-1] if len(p) else torch.zeros(512, device=last.device, dtype=p.dtype)
                            for p in self.prefill_logits])
        log_e = torch.log_softmax(torch.stack([prev[rows, last], prev[rows, last + 256]], 1).float(), 1)
        ends = torch.tensor([-math.inf, 0.0], device=last.device)
        self.log_e = torch.where((lens == 1)[:, None], ends, log_e)  # a lone 0xFE is its own patch

    def _decoder_at(self, r, y, cum, cum_rows, node):
        """The decoder at the newest byte of rows r given that byte's patch state: its cache slot is written, not
        kept (the position does not advance) -> logits (R, 512)."""
        s = self.state
        prior = None if cum is None else self.model.prior_at(cum, cum_rows, node)[:, None]
        return s.decoder(r, s.x[r, s.lens[r] - 1], s.h[r], y, prior, advance=torch.zeros_like(r))

    @torch.no_grad()
    def step(self, temperature=1.0, top_k=None, top_p=None, generator=None, force=None):
        """One byte per row; force (B,) appends those bytes instead of sampling (teacher-forced scoring)."""
        m, s, rows, B = self.model, self.state, self.rows, len(self.rows)
        log_e, prior = self.log_e, s.cum is not None
        at_once = log_e[:, 1] > log_e[:, 0]
        sure = torch.isinf(log_e).any(1) | (log_e.min(1).values < math.log(self.eps) if self.eps > 0 else False)
        weight = torch.where(sure[:, None], torch.stack([~at_once, at_once], 1).float().log(), log_e)
        logits = torch.zeros(B, 2, 512, device=log_e.device)
        logp = torch.full((B, 2, 256), -math.inf, device=log_e.device)  # -inf where a hypothesis is not needed
        # "ends" first, so that the decoder slot of a row that needs both is left holding "continues"
        r1 = (~sure | at_once).nonzero()[:, 0]
        cum1, node1 = None, None
        if len(r1):
            y1 = s.patch_output(r1, s.h[r1], advance=torch.zeros_like(r1))
            if prior:
                cum1, node1 = m.prior_cumulative(y1), torch.zeros_like(r1)
            logits[r1, 1] = self._decoder_at(r1, y1, cum1, torch.arange(len(r1), device=r1.device), node1).float()
            logp[r1, 1] = byte_logprobs(logits[r1, 1])
        r0 = (~sure | ~at_once).nonzero()[:, 0]
        if len(r0):
            node0 = m.vocab.trie.step(s.node[r0], s.x[r0, s.lens[r0] - 1]) if prior else None
            logits[r0, 0] = self._decoder_at(r0, s.y[r0], s.cum, r0, node0).float()
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
        s.main.advance(e.long())
        kept = e[r1]
        if len(r1):
            s.y[r1[kept]] = y1[kept]
            if prior:
                s.cum[r1[kept]] = cum1[kept]
        if prior:
            if len(r0):
                s.node[r0] = node0
            s.node[e] = 0
        redo = r1[kept & ~sure[r1]]  # rows that needed both and ended: their decoder slot holds "continues"
        if len(redo):
            self._decoder_at(redo, s.y[redo], s.cum, redo, torch.zeros_like(redo) if prior else None)
        s.dec.advance(torch.ones_like(rows))
        s.ends[rows, s.lens - 1] = e
        chosen = logits[rows, e.long()]
        self.log_e = torch.log_softmax(torch.stack([chosen[rows, new], chosen[rows, new + 256]], 1), 1)
        self.done |= new == BOS_BYTE
        s.append(rows, new)
        return new, mixed
