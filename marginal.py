"""The byte marginal over patchings: the likelihood of the model that writes the samples, by a beam over flag sequences.

The student's 512-way head is a joint model over bytes and their patch-end flags, p(x, e) = prod_t p(x_t, e_t | x_<t,
e_<t), and ancestral sampling of it (sample.py's default) writes byte string x with probability p(x) = sum_e p(x, e).
The teacher, read through its exact byte targets (targets.py), is the same kind of model with "this byte ends a token"
for the flag, and its byte string probability is the sum over tokenizations. Neither sum can be taken in full (2^n
terms), so a beam keeps the K heaviest flag prefixes of each text:

- a hypothesis is a flag prefix with its weight log p(bytes so far, its flags) and everything that depends on its flags
  (the student: the main network's KV cache, the latest patch output and its prior, the trie node, the decoder's KV
  cache; the teacher: its KV cache and next-token distribution); what depends on bytes alone (the student's encoder
  and subword rows) is shared by the text's hypotheses;
- at each byte every hypothesis splits on the byte's flag; the heaviest K children are kept (ties: "continues" first),
  less any lighter than the heaviest by more than `floor` nats; a hypothesis whose two children are both kept forks
  into a free slot of its text (its KV rows are copied);
- A_t, the summed weight of the kept hypotheses after byte t, starts at A_0 = 1. A text's figure is -log A_n: an upper
  bound on the exact marginal's bits (the kept paths are a subset of all paths), equal to it when nothing is pruned,
  and causal (A_t depends on bytes up to t alone). Byte t's share is log A_t - log A_{t-1}: the shares add up exactly
  to log A_n, and what pruning loses is charged to the byte where it happens.

With K = 1 the beam follows the greedy flags and gives the greedy-flag joint (decoding.greedy_flag_logprobs' second
output). The last byte's flag is summed over like the others (pruning applies there too): the figure is the
probability that the model's output starts with the text.
"""
import math

import torch

from decoding import ByteGeneration, RowState
from model import BOS_BYTE
from targets import at_least_fp32

BEAM = 4               # the default beam width (bench/fidelity.py's study picks it)
FLOOR = math.log(1e3)  # the default floor: children 10^3 times lighter than their text's heaviest are dropped


class Beam:
    """The bookkeeping the two beams share: n texts with K slots each (slot s belongs to text s // K), each slot's
    weight (float64, -inf: the slot is free), the running log A_t of every text, and which slot holds the path that
    `keep` flags force into the beam (forced; only the first slot to start with)."""

    def __init__(self, n, K, floor, device):
        self.n, self.K, self.floor = n, K, floor
        self.w = torch.full((n * K,), -math.inf, dtype=torch.float64, device=device)
        self.w[::K] = 0.0  # one hypothesis per text to start from
        self.owner = torch.arange(n * K, device=device) // K
        self.log_sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.forced = self.w == 0.0

    @property
    def alive(self):
        return self.w > -math.inf

    def choose(self, child, active, force=None):
        """child (S, 2): log p(new byte, flag e | the slot's hypothesis) for e = 0, 1 (-inf where not computed);
        active (n,): the texts that take a byte now (the others keep their slots as they are); force (n,) long or
        None: the flag the forced path takes at this byte (-1: none), its child kept whatever its weight.
        -> (each slot's flag (S,) bool, forks (src, dst): a slot whose two children are kept keeps "continues" and its
        "ends" child goes to slot dst, a copy of src; each text's share log A_t - log A_{t-1} (n,))."""
        n, K, S = self.n, self.K, self.n * self.K
        W = (self.w[:, None] + child.to(torch.float64)).view(n, K, 2)
        W = torch.where(active[:, None, None], W, -math.inf)
        key = W
        if force is not None:  # the forced child ranks first
            e = torch.arange(2, device=W.device)
            pick = self.forced.view(n, K, 1) & (e == force.to(W.device)[:, None, None]) & (W > -math.inf)
            key = torch.where(pick, math.inf, W)
        flat = key.transpose(1, 2).reshape(n, 2 * K)  # every "continues" child first: a stable sort prefers it on ties
        ranked = torch.sort(flat, dim=1, descending=True, stable=True)
        values = W.transpose(1, 2).reshape(n, 2 * K).gather(1, ranked.indices)
        kept_ranked = (torch.arange(2 * K, device=W.device) < K) & (values > -math.inf)
        if self.floor < math.inf:
            kept_ranked &= (values >= values.max(1, keepdim=True).values - self.floor) | (ranked.values == math.inf)
        kept = torch.zeros_like(kept_ranked).scatter(1, ranked.indices, kept_ranked)
        kept = kept.view(n, 2, K).transpose(1, 2).reshape(S, 2)
        W = W.reshape(S, 2)
        both = kept[:, 0] & kept[:, 1]
        free = ~(kept[:, 0] | kept[:, 1])
        src = both.nonzero()[:, 0]
        rank = (both.view(n, K).long().cumsum(1) - 1).view(-1)[src]  # the i-th fork of a text takes its i-th free slot
        free_first = torch.argsort((~free).view(n, K).to(torch.int8), dim=1, stable=True)
        dst = free_first[self.owner[src], rank] + self.owner[src] * K
        w = torch.where(kept[:, 0], W[:, 0], torch.where(kept[:, 1], W[:, 1], -math.inf))
        flag = kept[:, 1] & ~kept[:, 0]
        w[dst], flag[dst] = W[src, 1], True
        still = ~active[self.owner]  # texts that took no byte keep their slots
        if force is not None:  # the forced path moves to its "ends" child's slot where that one forked
            forced = self.forced & (key.reshape(S, 2) == math.inf).any(1)
            moved = forced[src] & (force[self.owner[src]] == 1)
            forced[src[moved]], forced[dst[moved]] = False, True
            self.forced = torch.where(still, self.forced, forced)
        self.w = torch.where(still, self.w, w)
        log_sum = torch.logsumexp(self.w.view(n, K), 1)
        share = torch.where(active & (self.log_sum > -math.inf), log_sum - self.log_sum, 0.0)  # a dead text: -inf once
        self.log_sum = torch.where(active, log_sum, self.log_sum)
        return flag, (src, dst), share


def make_room(cache, rows, cap):
    """Grow cache (doubling, at most cap positions) so that each of rows can take one more position."""
    need = int(cache.pos[rows].max()) + 1 if len(rows) else 0
    if need > cache.max_len:
        cache.grow(min(cap, max(need, 2 * cache.max_len)))


def forced_flags(keep, texts, L, device):
    """keep: None, or per text its flags to force into the beam (bool (len(text),), or None) -> (n, L) long, -1 where
    nothing is forced; None when nothing is."""
    if keep is None or all(k is None for k in keep):
        return None
    force = torch.full((len(texts), L), -1, dtype=torch.long, device=device)
    for i, (k, t) in enumerate(zip(keep, texts)):
        if k is not None:
            if len(k) != len(t):
                raise ValueError(f"keep: {len(k)} flags for a text of {len(t)} bytes")
            force[i, :len(t)] = torch.as_tensor(k, dtype=torch.long, device=device)
    return force


def chunks(lengths, per_chunk, groups=None):
    """Indices of texts grouped per_chunk at a time, longest first (similar lengths share a lockstep batch); with
    groups (a key per text), a group's texts are next to each other (ordered by the group's longest)."""
    if groups is None:
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    else:
        longest = {}
        for g, n in zip(groups, lengths):
            longest[g] = max(longest.get(g, 0), n)
        first = {g: i for i, g in reversed(list(enumerate(groups)))}
        order = sorted(range(len(lengths)), key=lambda i: (-longest[groups[i]], first[groups[i]], -lengths[i]))
    return [order[i:i + per_chunk] for i in range(0, len(order), per_chunk)]


@torch.no_grad()
def marginal_logprobs(model, texts, beam=BEAM, floor=FLOOR, prompts=None, keep=None, slots=128, stats=None,
                      argmax=False, progress=None):
    """The student's byte marginal over patchings, by the beam (see the module docstring). texts: byte strings, each
    scored from a fresh document start (0xFE), or after its prompt (prompts: byte strings; the prompt's flags are the
    patcher's, its last byte's flag is summed over with the head's two halves as weights: the old way to condition on
    a context, kept for comparison; conditioning.py conditions on the marginal over the prompt's patchings). Texts go
    in lockstep batches of at most `slots` hypotheses (slots // beam texts); texts with the same prompt (the choices of
    a multiple-choice item) share a batch where they fit, and their prompt is prefilled once and copied. keep: per
    text, flags (len(text),) of one path that the beam keeps whatever its weight (the prompt's last byte ends a patch
    on it), so that the figure is never worse than that path's joint (bench/fidelity.py keeps the true patches);
    causal only if those flags are. -> per text, each byte's share (n,) float64, natural log: their sum is log A_n, the
    text's figure; with argmax, (shares, whether each byte was the likeliest under the beam's predictive distribution
    (n,) bool: the kept hypotheses' byte probabilities, both flags summed, mixed by their weights). stats (a dict):
    adds main-network row steps (main_rows; the prompts' prefill: prefill_rows, its patches, and prefill_bytes),
    decoder row steps and forks. progress (e.g. a tqdm bar): its update(n) is called as each batch of n texts ends."""
    prompts = [b""] * len(texts) if prompts is None else prompts
    keep = [None] * len(texts) if keep is None else keep
    out = [None] * len(texts)
    for chunk in chunks([len(t) for t in texts], max(1, slots // beam), prompts):
        args = ([texts[i] for i in chunk], beam, floor, [keep[i] for i in chunk], stats)
        if all(not prompts[i] for i in chunk):
            state = StudentBeam.from_document_start(model, *args)
        else:
            state = after_prefill(model, [prompts[i] for i in chunk], *args)
        for i, s in zip(chunk, state.run(argmax)):
            out[i] = s
        if progress is not None:
            progress.update(len(chunk))
    return out


class StudentBeam:
    """The student's beam as a state that reads bytes, forks into texts that continue it, and hands hypotheses to
    generation. n texts, each with the bytes it has read (x[:, :lens]) and the bytes it reads next (target; their
    encoder states h precomputed in one pass, since the encoder is flag-free: h[:, j] is the state of the newest
    byte before target byte j; enc its encoder cache); n * K slots (Beam), each a row of `slots`
    (decoding.RowState without bytes of its own) with what its flags decide: the main network's and the decoder's KV
    caches, the newest patch output (and its prior), the newest byte's flag, and every flag so far. Build with
    from_document_start, after_prefill (the patcher's flags for a prompt) or spawn (continuations of this beam's
    texts)."""

    def __init__(self, m, beam, x, lens, target, n_target, h, enc, slots, cap, force, stats, rows_key="main_rows"):
        self.m, self.beam, self.x, self.lens, self.enc, self.stats = m, beam, x, lens, enc, stats
        self.target, self.n_target, self.h, self.force, self.j = target, n_target, h, force, 0
        self.slots, self.cap = slots, cap  # cap: the most patches a slot's main-network cache may grow to
        self.rows_key = rows_key  # the stats key for main-network rows (conditioning.py counts contexts apart)

    @classmethod
    def from_document_start(cls, m, texts, K, floor, keep=None, stats=None, room=0, rows_key="main_rows"):
        """texts read from a fresh document start: one hypothesis per text, the lone 0xFE its own patch (forced as the
        kept path's first flag). room: bytes more that generation or spawn may add."""
        n, L = len(texts), max(map(len, texts), default=0)
        dev = m.head.weight.device
        x = torch.zeros(n, 1 + L + room, dtype=torch.long, device=dev)
        x[:, 0] = BOS_BYTE
        target = _padded(texts, L, dev)
        x[:, 1:1 + L] = target
        n_target = torch.tensor([len(t) for t in texts], device=dev)
        enc = m.encoder.new_cache(n, 1 + L + room)
        h = m.encode(x[:, :1 + L], cache=enc, advance=1 + n_target)  # (n, 1 + L, D), BOS first
        cap = min(m.tcfg.max_seq_len, 1 + L + room)  # at most one patch per byte
        slots = RowState.empty(m, n * K, 1 + L + room, min(cap, L // 2 + 8), text=False, dtype=h.dtype)
        first = torch.arange(n, device=dev) * K
        slots.pending[first], slots.ends[first, 0] = True, True
        return cls(m, Beam(n, K, floor, dev), x, torch.ones(n, dtype=torch.long, device=dev), target, n_target, h,
                   enc, slots, cap, forced_flags(keep, texts, L, dev), stats, rows_key)

    def fork(self, src, dst):
        """Slots dst take copies of slots src (a hypothesis whose two children are both kept)."""
        if len(src):
            self.slots.copy_rows(dst, src)
            if self.stats is not None:
                self.stats["forks"] = self.stats.get("forks", 0) + len(src)

    def step(self, argmax=False):
        """Every text with bytes left reads its next one -> (each text's share log A_t - log A_t-1 (n,) float64,
        whether the byte was the likeliest of the beam's next-byte mixture (n,) bool, or None)."""
        beam, j, slots = self.beam, self.j, self.slots
        owner, S = beam.owner, len(beam.w)
        active = j < self.n_target
        live = beam.alive & active[owner]
        closing = (live & slots.pending).nonzero()[:, 0]
        if len(closing):  # hypotheses whose newest byte ends a patch: the main network takes it, in one call
            make_room(slots.main, closing, self.cap)
            slots.close(closing, self.h[owner[closing], j])
        r = live.nonzero()[:, 0]
        text = owner[r]
        logits = slots.logits(r, self.x[text, self.lens[text] - 1], self.h[text, j])
        logp = torch.log_softmax(logits.to(at_least_fp32(logits.dtype)), -1)
        b = self.target[text, j]
        child = torch.full((S, 2), -math.inf, dtype=torch.float64, device=r.device)
        child[r] = torch.stack([logp.gather(1, b[:, None]), logp.gather(1, b[:, None] + 256)], 1)[..., 0].double()
        best = None
        if argmax:  # the beam's next-byte distribution: each hypothesis' bytes, both flags summed, by its weight
            mixed = torch.full((S, 256), -math.inf, dtype=torch.float64, device=r.device)
            mixed[r] = beam.w[r, None] + torch.logaddexp(logp[:, :256], logp[:, 256:]).double()
            best = torch.logsumexp(mixed.view(beam.n, beam.K, 256), 1).argmax(-1) == self.target[:, j]
        flag, forks, share = beam.choose(child, active, None if self.force is None else self.force[:, j])
        self.fork(*forks)
        slots.pending = torch.where(active[owner], flag, slots.pending)  # a text that is done keeps its newest flag
        moved = (beam.alive & active[owner]).nonzero()[:, 0]
        slots.ends[moved, self.lens[owner[moved]]] = slots.pending[moved]
        a = active.nonzero()[:, 0]
        self.x[a, self.lens[a]] = self.target[a, j]
        self.lens[a] += 1
        self.j += 1
        if self.stats is not None:
            self.stats[self.rows_key] = self.stats.get(self.rows_key, 0) + len(closing)
            self.stats["decoder_rows"] = self.stats.get("decoder_rows", 0) + len(r)
        return share, best

    def run(self, argmax=False):
        """Read every text to its end -> per text its bytes' shares (float64, on the CPU); with argmax, (shares,
        whether each byte was the likeliest) as marginal_logprobs gives them."""
        n, L = self.target.shape
        shares = torch.zeros(n, L, dtype=torch.float64, device=self.x.device)
        best = torch.zeros(n, L, dtype=torch.bool, device=self.x.device)
        for j in range(self.j, L):
            shares[:, j], b = self.step(argmax)
            if argmax:
                best[:, j] = b
        counts = self.n_target.tolist()
        if argmax:
            return [(shares[i, :c].cpu(), best[i, :c].cpu()) for i, c in enumerate(counts)]
        return [shares[i, :c].cpu() for i, c in enumerate(counts)]

    def spawn(self, src, texts, keep=None, room=0, rows_key="main_rows"):
        """New texts that continue this beam's texts (all read): text i reads texts[i] after everything text src[i]
        has read, starting from all of src[i]'s hypotheses with their weights and its running log A, so that its
        shares are log A(read + texts[i]) - log A(read) (the choices of an item fork their context once). keep: per
        text the flags of the path to keep (the forced path goes on from the context's kept one)."""
        m, K, dev = self.m, self.beam.K, self.x.device
        src = torch.as_tensor(src, dtype=torch.long, device=dev)
        n, L = len(texts), max(map(len, texts), default=0)
        lens = self.lens[src].clone()
        T = int(lens.max()) + L + room
        x = torch.zeros(n, T, dtype=torch.long, device=dev)
        width = min(T, self.x.shape[1])
        x[:, :width] = self.x[src, :width]
        target = _padded(texts, L, dev)
        n_target = torch.tensor([len(t) for t in texts], device=dev)
        enc = m.encoder.new_cache(n, T)
        enc.copy_rows(torch.arange(n, device=dev), src, self.enc)
        newest = self.h[src, self.n_target[src]]  # the state of each context's last byte
        h = torch.cat([newest[:, None], _encode_after(m, enc, x, lens, target, n_target)], 1)
        beam = Beam(n, K, self.beam.floor, dev)
        parent = (src[:, None] * K + torch.arange(K, device=dev)).reshape(-1)  # each new slot's parent slot
        beam.w, beam.forced, beam.log_sum = self.beam.w[parent].clone(), self.beam.forced[parent].clone(), \
            self.beam.log_sum[src].clone()
        cap = min(m.tcfg.max_seq_len, T)
        slots = RowState.empty(m, n * K, T, min(cap, int(self.slots.main.pos[parent].max()) + L // 2 + 8), text=False,
                               dtype=self.slots.y.dtype)
        alive = beam.alive.nonzero()[:, 0]
        slots.copy_rows(alive, parent[alive], self.slots)
        return StudentBeam(m, beam, x, lens, target, n_target, h, enc, slots, cap, forced_flags(keep, texts, L, dev),
                           self.stats, rows_key)

    def generation(self, slots, max_new_bytes, byte_model="joint"):
        """Cached generation (decoding.ByteGeneration) whose row i continues hypothesis slots[i] (R,) from its state:
        the slot's row (flags, caches, newest patch output and flag) with its text's bytes and encoder cache."""
        m, dev = self.m, self.x.device
        slots = torch.as_tensor(slots, dtype=torch.long, device=dev)
        text, rows = self.beam.owner[slots], torch.arange(len(slots), device=dev)
        T = int(self.lens[text].max()) + max_new_bytes
        main_len = min(m.tcfg.max_seq_len, int(self.slots.main.pos[slots].max()) + 1 + max_new_bytes)
        state = RowState.empty(m, len(slots), T, main_len, dtype=self.slots.y.dtype)
        state.copy_rows(rows, slots, self.slots)
        width = min(T, self.x.shape[1])
        state.x[:, :width], state.lens = self.x[text, :width], self.lens[text].clone()
        state.enc.copy_rows(rows, text, self.enc)
        state.h = self.h[text, self.n_target[text]]  # the state of each text's last byte
        return ByteGeneration.resume(state, byte_model)


def after_prefill(m, prompts, texts, K, floor, keep=None, stats=None, prompt_ends=None, room=0, rows_key="main_rows"):
    """A StudentBeam of texts read after prompts whose flags are the patcher's (generation's prefill, each distinct
    prompt once), the prompt's last byte's flag summed over with the head's two halves as weights (the old
    conditioning); or, with prompt_ends (per prompt its bytes' flags, the last byte's included), after prompts read
    along those flags (conditioning.py's context tail: the bytes before it along their canonical token ends). Either
    way the texts' shares start from A_0 = 1 after the prompt. room: bytes more that generation or spawn may add."""
    n, L = len(texts), max(map(len, texts), default=0)
    keys = prompts if prompt_ends is None else [(p, tuple(map(bool, e))) for p, e in zip(prompts, prompt_ends)]
    unique = {k: i for i, k in enumerate(dict.fromkeys(keys))}  # each distinct prompt (with its flags) once
    given = None if prompt_ends is None else [k[1] for k in unique]
    gen = ByteGeneration(m, [k if given is None else k[0] for k in unique], max(L, 1) + room, all_logits=False,
                         ends=given)
    g, dev, S = gen.state, gen.rows.device, n * K
    src = torch.tensor([unique[k] for k in keys], device=dev)  # each text's prefill row
    if stats is not None:
        stats["prefill_rows"] = stats.get("prefill_rows", 0) + int(g.main.pos.sum())
        stats["prefill_bytes"] = stats.get("prefill_bytes", 0) + int(g.lens.sum())
    patches = int(g.main.pos.max())
    cap = min(m.tcfg.max_seq_len, patches + L + room + 1)
    slots = RowState.empty(m, S, g.x.shape[1], min(cap, patches + L // 2 + 8), text=False, dtype=g.y.dtype)
    rows = torch.arange(n, device=dev)
    first = rows * K
    slots.copy_rows(first, src, g)  # each text's first slot: its prompt's flags, caches and newest patch
    x, lens = g.x[src].clone(), g.lens[src].clone()
    enc = m.encoder.new_cache(n, g.enc.max_len)
    enc.copy_rows(rows, src, g.enc)
    target = _padded(texts, L, dev)
    n_target = torch.tensor([len(t) for t in texts], device=dev)
    h = torch.cat([g.h[src][:, None], _encode_after(m, enc, x, lens, target, n_target)], 1)
    beam = Beam(n, K, floor, dev)
    state = StudentBeam(m, beam, x, lens, target, n_target, h, enc, slots, cap, forced_flags(keep, texts, L, dev),
                        stats, rows_key)
    if given is not None:  # the newest prompt byte's flag is given: one hypothesis per text, as at a document start
        slots.ends[first, lens - 1] = slots.pending[first]
        return state
    # the newest prompt byte's flag (a lone 0xFE is its own patch): its two values are the first two children
    last = x[rows, lens - 1]
    log_e = torch.full((S, 2), -math.inf, dtype=torch.float64, device=dev)
    for i, r in enumerate(src.tolist()):
        logits = gen.prefill_logits[r]
        if len(logits):
            two = torch.stack([logits[-1, last[i]], logits[-1, last[i] + 256]]).to(torch.float64)
            log_e[i * K] = torch.log_softmax(two, 0)
        else:
            log_e[i * K, 1] = 0.0
    force = state.force
    flag, forks, _ = beam.choose(log_e, torch.ones(n, dtype=torch.bool, device=dev),
                                 None if force is None else torch.where(force[:, 0] >= 0, 1, -1))
    state.fork(*forks)
    slots.pending = flag
    slots.ends[torch.arange(S, device=dev), lens[beam.owner] - 1] = flag
    beam.log_sum.zero_()  # A_0 = 1: what pruning the prompt's flag loses is charged to the first byte
    return state


def _padded(texts, L, device):
    """Byte strings -> (n, L) long, zero after each one's end."""
    out = torch.zeros(len(texts), L, dtype=torch.long, device=device)
    for i, t in enumerate(texts):
        out[i, :len(t)] = torch.tensor(list(t), dtype=torch.long)
    return out


def _encode_after(m, enc, x, lens, target, n_target):
    """The encoder states of target (n, L) read after x[:, :lens] (whose states enc holds), in one pass -> (n, L, D).
    The subword rows look back into x, up to the longest vocabulary entry."""
    n, L = target.shape
    if L == 0:
        return torch.zeros(n, 0, m.tcfg.d_model, device=x.device, dtype=m.null_patch.dtype)
    sub = None
    if m.scfg.subword:
        span = m.vocab.suffix_tables(x.device)[3]
        cols = torch.arange(span + L, device=x.device)
        at = lens[:, None] - span + cols  # the span bytes before, then the targets
        seen = torch.where((at >= lens[:, None]), target.gather(1, (at - lens[:, None]).clamp(0, L - 1)),
                           x.gather(1, at.clamp(min=0)))
        sub = m.vocab.subword_rows(seen)[:, span:]
    return m.encode(target, cache=enc, advance=n_target, sub=sub)


@torch.no_grad()
def teacher_marginal_logprobs(teacher, trie, doc_start_id, texts, beam=BEAM, floor=FLOOR, keep=None, slots=128,
                              stats=None):
    """The teacher's byte marginal over tokenizations by the same beam: a hypothesis is a token prefix and the bytes
    of the unfinished token after it (a trie node); a byte's two children are "the token goes on" and "the token ends
    here" with the exact targets' probabilities (targets.py), and a token that ends is fed to the teacher before the
    next byte. Each text is scored after the document-start token. keep: per text, token-end flags (len(text),) of
    one tokenization the beam keeps (bench/fidelity.py keeps the canonical one: the figure is then never worse than
    its exact byte targets'). -> per text, each byte's share (n,) float64, natural log (as marginal_logprobs)."""
    keep = [None] * len(texts) if keep is None else keep
    out = [None] * len(texts)
    for chunk in chunks([len(t) for t in texts], max(1, slots // beam)):
        shares = _teacher_beam(teacher, trie, doc_start_id, [texts[i] for i in chunk], beam, floor,
                               [keep[i] for i in chunk], stats)
        for i, s in zip(chunk, shares):
            out[i] = s
    return out


def _teacher_beam(teacher, trie, doc_start_id, texts, K, floor, keep, stats):
    n, L = len(texts), max(map(len, texts))
    dev = teacher.head_weight.device
    force = forced_flags(keep, texts, L, dev)
    dtype = at_least_fp32(teacher.head_weight.dtype)
    head = trie.sorted_head(teacher.head_weight).to(dtype)
    lo, sorted_ids = trie.lo.to(dev), trie.sorted_ids.to(dev)
    S = n * K
    beam = Beam(n, K, floor, dev)
    owner = beam.owner
    cache = teacher.new_cache(S, min(L + 2, L // 4 + 64))  # grows when a hypothesis needs more
    cum = torch.zeros(S, len(sorted_ids) + 1, dtype=torch.float64, device=dev)
    node = torch.zeros(S, dtype=torch.long, device=dev)
    token = torch.full((S,), doc_start_id, dtype=torch.long, device=dev)  # what a pending slot feeds next
    pending = beam.alive.clone()
    target = torch.zeros(n, L, dtype=torch.long, device=dev)
    for i, t in enumerate(texts):
        target[i, :len(t)] = torch.tensor(list(t), dtype=torch.long)
    n_bytes = torch.tensor([len(t) for t in texts], device=dev)
    shares = torch.zeros(n, L, dtype=torch.float64, device=dev)
    for t in range(L):
        active = t < n_bytes
        live = beam.alive & active[owner]
        feeding = (live & pending).nonzero()[:, 0]
        if len(feeding):  # hypotheses whose last byte ended a token: the teacher reads it, in one call
            make_room(cache, feeding, L + 2)
            hidden = teacher(token[feeding, None], cache=cache.select(feeding), return_hidden=True)[:, 0]
            cum[feeding] = trie.cumulative(hidden.to(dtype) @ head.T)
            node[feeding] = 0
        r = live.nonzero()[:, 0]
        b = target[owner[r], t]
        q = trie.targets(cum, r, node[r])
        child = torch.full((S, 2), -math.inf, dtype=torch.float64, device=dev)
        child[r] = torch.stack([q.gather(1, b[:, None]), q.gather(1, b[:, None] + 256)], 1)[..., 0].log()
        walked = torch.zeros_like(node)
        walked[r] = trie.step(node[r], b)  # the unfinished token's bytes with b (a kept child always has one)
        pending, (src, dst), shares[:, t] = beam.choose(child, active, None if force is None else force[:, t])
        if len(src):
            cache.copy_rows(dst, src)
            cum[dst], walked[dst] = cum[src], walked[src]
            if stats is not None:
                stats["forks"] = stats.get("forks", 0) + len(src)
        moved = beam.alive & active[owner]
        node = torch.where(moved, walked, node)
        ends = moved & pending
        token[ends] = sorted_ids[lo[node[ends]]]  # the entry that is those bytes (exact: "ends" had probability > 0)
        if stats is not None:
            stats["teacher_rows"] = stats.get("teacher_rows", 0) + len(feeding)
    return [shares[i, :len(t)].cpu() for i, t in enumerate(texts)]
