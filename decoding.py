"""Cached generation from the byte student, and the byte models built on it, each with its proper likelihood.

The 512-way head defines a joint model over bytes and their patch-end flags. Three byte models come from it:
- the joint (ByteGeneration(flags="joint"), sample.py's default; its likelihood is marginal.py's sum over every flag
  sequence, bench/fidelity.py's headline): byte and flag drawn together as one of the 512 entries;
- greedy flags (ByteGeneration, greedy_flag_logprobs): the byte drawn from the two halves summed, its flag the
  likelier half for it;
- late flags (LateFlagGeneration, late_flag_logprobs): each flag decided one byte late, once the next byte is known.
The last two are exact likelihoods of byte models of their own (every flag a function of the bytes already seen); each
commits to one patching while it writes, and pays for that in bits.
"""
import math
import os

import torch

from model import BOS_BYTE, byte_logprobs
from targets import patch_prefix_nodes
from transformer import sample_from_logits


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
    position. ends (per prompt its bytes' flags, or None) gives a prompt's flags instead, the last byte's included. After that, every flag is the e half of the sampled index. `x[:, :length]` and `ends` record the bytes
    and the boundaries used, so a full forward with those ends reproduces every logit.

    flags: "greedy" (the default) draws the byte from the head's two halves summed (temperature, top_k and top_p act on
    those 256 byte probabilities; temperature 0 takes the likeliest byte) and gives it the likelier flag; "joint"
    draws one of the 512 entries, byte and flag together (temperature, top_k and top_p act on the 512 entries;
    temperature 0 takes the likeliest entry): ancestral sampling of the joint at temperature 1. Teacher-forced
    bytes (force) take the likelier flag under either rule.

    Two ways to drive it: step() gives every row one byte (rows in lockstep; the main network runs at a step for the
    rows that close a patch there), run() lets rows get out of step so that the main network runs once for many rows
    (in a batch nearly every byte closes some row's patch, and a CPU pays the main network's weight reads per call,
    however few rows it takes). Each row's bytes and logits are the same either way; only the order of work differs."""

    def __init__(self, model, prompts, max_new_bytes, flags="greedy", all_logits=True, ends=None):
        if flags not in ("greedy", "joint"):
            raise ValueError(f"flags={flags!r}: greedy or joint")
        self.model, self.joint = model, flags == "joint"
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
        self.max_new_bytes = max_new_bytes  # the main network's cache is made in _prefill, once the patches are known
        self.prefill_logits = self._prefill(L, all_logits, ends)

    @classmethod
    def resume(cls, model, x, lens, ends, caches, y_cur, h_last, pending_end, node=None, cum=None, max_new_bytes=0,
               flags="greedy"):
        """Generation that goes on from a state made elsewhere (marginal.StudentBeam.generation: hypotheses of the
        byte marginal over a prompt's patchings) instead of the patcher's prefill: bytes x (B, T) of which lens (B,)
        are read, the flags so far ends (B, T), the (encoder, decoder, main network) caches, the newest patch output
        y_cur (B, D), the newest byte's encoder state h_last (B, D) and flag pending_end (B,), and with the prior
        the trie node before the newest byte and the patch's prefix sums. Rows then step as after a prefill."""
        if flags not in ("greedy", "joint"):
            raise ValueError(f"flags={flags!r}: greedy or joint")
        self = cls.__new__(cls)
        self.model, self.joint, self.max_new_bytes = model, flags == "joint", max_new_bytes
        self.x, self.lens, self.ends, self.rows = x, lens, ends, torch.arange(len(x), device=x.device)
        self.enc_cache, self.dec_cache, self.main_cache = caches
        self.y_cur, self.h_last, self.pending_end = y_cur, h_last, pending_end
        self.waiting = pending_end.clone()
        if model.has_prior:
            self.node, self.cum = node, cum
        self.done = torch.zeros_like(lens, dtype=torch.bool)
        self.prefill_logits = None
        return self

    @torch.no_grad()
    def _prefill(self, L, all_logits=True, given=None):
        """-> per row the logits at its prompt positions but the last (L_i - 1, 512); all_logits=False: only the
        newest of them (1, 512) (0 rows for a lone 0xFE), the prior computed there alone (what marginal.py needs).
        given: per prompt its bytes' flags (bool (len(prompt),), the newest byte's included) or None (the patcher's)."""
        m, x, lens, rows = self.model, self.x[:, :L], self.lens, self.rows
        h = m.encode(x, cache=self.enc_cache, advance=lens)
        t = torch.arange(L, device=x.device)[None]
        ends = (m.boundary_probs(h) > m.scfg.boundary_threshold) & (t < lens[:, None] - 1)
        newest = torch.zeros_like(lens, dtype=torch.bool)  # the given flag of each row's newest byte
        has = torch.zeros_like(newest)
        for i, flags in enumerate(given or []):
            if flags is not None:
                if len(flags) != int(lens[i]) - 1:
                    raise ValueError(f"ends: {len(flags)} flags for a prompt of {int(lens[i]) - 1} bytes")
                row = torch.cat([torch.ones(1, dtype=torch.bool), torch.as_tensor(flags, dtype=torch.bool).cpu()])
                ends[i, :len(row)] = row.to(x.device) & (t[0, :len(row)] < lens[i] - 1)
                newest[i], has[i] = row[-1], True
        # room for the prompt's patches, its newest one and one per new byte (a byte closes at most one): a patch is
        # ~4 bytes, so sizing by bytes would allocate (and zero) ~4x the main network's keys and values
        room = int(ends.sum(1).max()) + 1 + self.max_new_bytes
        self.main_cache = m.main.new_cache(len(lens), min(room, m.tcfg.max_seq_len))
        y, patch_mask = m.run_main(h, ends, cache=self.main_cache)
        at = (lens - 2).clamp(min=0)  # the position that predicts the newest prompt byte
        logits = m.decode(x, h, m.dechunk(y, ends), cache=self.dec_cache, advance=lens - 1,
                          prior=m.sequence_prior(x, ends, y, patch_mask) if all_logits else None)
        if not all_logits and m.has_prior:
            prior = m.prior_scale * m.sequence_prior(x, ends, y, patch_mask, at=at)
            logits = logits.to(torch.promote_types(logits.dtype, prior.dtype))
            logits[rows, at] += prior
        counts = ends.sum(1)
        self.y_cur = torch.where((counts > 0)[:, None], y[rows, (counts - 1).clamp(min=0)], m.null_patch.to(y.dtype))
        if m.has_prior:  # the trie node before the newest byte, and each row's current patch distribution
            self.node = torch.where(lens >= 2, patch_prefix_nodes(m.vocab.trie, x, ends)[rows, (lens - 2).clamp(min=0)], -1)
            self.cum = m.prior_cumulative(self.y_cur)
        prev = logits[rows, (lens - 2).clamp(min=0)]
        last = x[rows, lens - 1]
        # The last prompt byte's flag: the head's more likely e for that byte; a lone BOS byte is its own patch.
        self.pending_end = torch.where(has, newest, (prev[rows, last + 256] > prev[rows, last]) | (lens == 1))
        self.waiting = self.pending_end.clone()  # rows whose newest patch the main network has not yet taken
        self.h_last = h[rows, lens - 1]
        self.ends[:, :L] = ends
        self.done = torch.zeros_like(lens, dtype=torch.bool)
        if not all_logits:
            return [logits[i, at[i]:lens[i] - 1] for i in range(len(lens))]
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
        logits = self.next_logits(rows)
        if self.joint and force is None:  # one of the 512 entries: the byte and its flag together
            index = sample_from_logits(logits, temperature, top_k, top_p, generator)[:, 0]
            new, pending = index % 256, index >= 256
        else:  # the byte from both halves summed, then its likelier flag
            if force is not None:
                new = force.to(self.x.device)
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
        m = self.model
        if bool(self.waiting[rows].any()):
            raise RuntimeError("a row's newest patch has not gone through the main network (close_patches)")
        t, closes = self.lens[rows] - 1, self.pending_end[rows]
        self.ends[rows, t] = closes
        last = self.x[rows, t]
        prior = None
        if m.has_prior:  # the prior at the newest byte: a closed patch starts the trie walk afresh
            node = torch.where(closes, 0, m.vocab.trie.step(self.node[rows], last))
            self.node[rows] = node
            prior = m.prior_at(self.cum, rows, node)[:, None]
        return m.decode(last[:, None], self.h_last[rows, None], self.y_cur[rows, None], prior=prior,
                        cache=self.dec_cache if len(rows) == len(self.rows) else self.dec_cache.select(rows))[:, 0]

    @torch.no_grad()
    def append(self, rows, new, pending):
        """Rows (R,) take their next bytes new (R,), with flags pending (R,) bool (the byte closes its patch), through
        the encoder."""
        m, t = self.model, self.lens[rows] - 1
        self.pending_end[rows], self.waiting[rows] = pending, pending
        self.done[rows] |= new == BOS_BYTE  # 0xFE would start a new document: the row is finished
        self.x[rows, t + 1] = new
        self.lens[rows] = t + 2
        enc = self.enc_cache if len(rows) == len(self.rows) else self.enc_cache.select(rows)
        sub = m.vocab.subword_newest(self.x[rows], self.lens[rows]) if m.scfg.subword else None
        self.h_last[rows] = m.encode(new[:, None], cache=enc, sub=sub)[:, 0]

    def fork(self, src):
        """Row i becomes a copy of row src[i] (B,), its caches and state included: a beam's hypotheses branch. Only
        the rows that change are copied."""
        dst = (src != self.rows).nonzero()[:, 0]
        if not len(dst):
            return
        src = src[dst]
        for cache in (self.enc_cache, self.dec_cache, self.main_cache):
            cache.copy_rows(dst, src)  # the sources are read before any row is written
        for name in ("x", "ends", "lens", "pending_end", "waiting", "h_last", "y_cur", "done", "node", "cum"):
            if hasattr(self, name):
                value = getattr(self, name)
                value[dst] = value[src]


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
        gen = ByteGeneration(model, [prompt] * beam, max_bytes + 2, flags="greedy", all_logits=False)
        score = torch.full((beam,), -math.inf, dtype=torch.float64, device=gen.x.device)
        score[0] = 0.0  # the rows start as copies of one hypothesis
    else:
        gen, score = start
        score = score.to(torch.float64).clone()
    start, dev = int(gen.lens[0]), gen.x.device
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
            text = bytes(gen.x[i, start:gen.lens[i]].tolist())
            ended = bool(stop) and text.endswith(stop)
            if (ended or new[i] == BOS_BYTE) and score[i] > best_score:
                best, best_score = (text[:-len(stop)] if ended else text[:-1], ended), float(score[i])
            if ended or new[i] == BOS_BYTE:
                score[i] = -math.inf
        live = score > -math.inf
        if not bool(live.any()) or float(score.max()) <= best_score:
            break
        if on_commit is not None:
            texts = [bytes(gen.x[i, start:gen.lens[i]].tolist()) for i in live.nonzero()[:, 0].tolist()]
            shared = os.path.commonprefix(texts + ([best[0]] if best_score > -math.inf else []))
            if stop:
                shared = shared[:len(shared) - next((k for k in range(len(stop) - 1, 0, -1)
                                                     if shared.endswith(stop[:k])), 0)]
            if len(shared) > committed:
                on_commit(shared[committed:])
                committed = len(shared)
    if best_score == -math.inf:  # nothing finished within max_bytes: the heaviest live hypothesis
        i = int(score.argmax())
        best = (bytes(gen.x[i, start:start + max_bytes].tolist()), False)
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
            node0 = m.vocab.trie.step(self.node[r0], self.x[r0, self.lens[r0] - 1]) if prior else None
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
        sub = m.vocab.subword_newest(self.x, self.lens) if m.scfg.subword else None
        self.h_last = m.encode(new[:, None], cache=self.enc_cache, sub=sub)[:, 0]
        return new, mixed
