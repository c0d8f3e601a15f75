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

from decoding import ByteGeneration
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
    patcher's, its last byte's flag is summed over with the head's two halves as weights). Texts go in lockstep
    batches of at most `slots` hypotheses (slots // beam texts); texts with the same prompt (the choices of a
    multiple-choice item) share a batch where they fit, and their prompt is prefilled once and copied. keep: per text, flags (len(text),) of one path that
    the beam keeps whatever its weight (the prompt's last byte ends a patch on it), so that the figure is never worse
    than that path's joint (bench/fidelity.py keeps the true patches); causal only if those flags are. -> per text,
    each byte's share (n,) float64, natural log: their sum is log A_n, the text's figure; with argmax, (shares,
    whether each byte was the likeliest under the beam's predictive distribution (n,) bool: the kept hypotheses'
    byte probabilities, both flags summed, mixed by their weights). stats (a dict): adds main-network row steps
    (main_rows; the prompts' prefill: prefill_rows, its patches, and prefill_bytes), decoder row steps and forks. progress (e.g. a tqdm bar): its update(n) is called as each batch of n texts ends."""
    prompts = [b""] * len(texts) if prompts is None else prompts
    keep = [None] * len(texts) if keep is None else keep
    out = [None] * len(texts)
    for chunk in chunks([len(t) for t in texts], max(1, slots // beam), prompts):
        shares = _student_beam(model, [texts[i] for i in chunk], [prompts[i] for i in chunk], beam, floor,
                               [keep[i] for i in chunk], stats, argmax)
        for i, s in zip(chunk, shares):
            out[i] = s
        if progress is not None:
            progress.update(len(chunk))
    return out


def _student_beam(m, texts, prompts, K, floor, keep, stats, argmax):
    n, L = len(texts), max(map(len, texts))
    unique = list(dict.fromkeys(prompts))  # each distinct prompt prefilled once: its caches, flags and newest states
    gen = ByteGeneration(m, unique, max(L, 1), all_logits=False)
    dev, prior, S = gen.x.device, m.has_prior, n * K
    src = torch.tensor([unique.index(p) for p in prompts], device=dev)  # each text's prefill row
    if stats is not None:
        stats["prefill_rows"] = stats.get("prefill_rows", 0) + int(gen.main_cache.pos.sum())
        stats["prefill_bytes"] = stats.get("prefill_bytes", 0) + int(gen.lens.sum())
    force = forced_flags(keep, texts, L, dev)
    beam = Beam(n, K, floor, dev)
    first = torch.arange(n, device=dev) * K
    # the main network's KV cache starts small and grows (most hypotheses patch sparsely), up to one patch per byte
    cap = min(m.tcfg.max_seq_len, int(gen.main_cache.pos.max()) + L + 1)
    main = m.main.new_cache(S, min(cap, int(gen.main_cache.pos.max()) + L // 2 + 8))
    main.copy_rows(first, src, gen.main_cache)
    dec = m.decoder.new_cache(S, gen.dec_cache.max_len)
    dec.copy_rows(first, src, gen.dec_cache)
    owner = beam.owner
    y = gen.y_cur[src][owner].clone()
    cum, node = (gen.cum[src][owner].clone(), gen.node[src][owner].clone()) if prior else (None, None)
    x, lens, h_last = gen.x[src].clone(), gen.lens[src].clone(), gen.h_last[src].clone()
    enc = m.encoder.new_cache(n, gen.enc_cache.max_len)
    enc.copy_rows(torch.arange(n, device=dev), src, gen.enc_cache)
    prefill_logits = [gen.prefill_logits[i] for i in src.tolist()]
    rows = torch.arange(n, device=dev)
    del gen

    def fork(src, dst):
        if len(src):
            main.copy_rows(dst, src)
            dec.copy_rows(dst, src)
            y[dst] = y[src]
            if prior:
                cum[dst], node[dst] = cum[src], node[src]
            if stats is not None:
                stats["forks"] = stats.get("forks", 0) + len(src)

    # the newest prompt byte's flag (a lone 0xFE is its own patch): its two values are the first two children
    last = x[rows, lens - 1]
    log_e = torch.full((S, 2), -math.inf, dtype=torch.float64, device=dev)
    for i, logits in enumerate(prefill_logits):
        if len(logits):
            two = torch.stack([logits[-1, last[i]], logits[-1, last[i] + 256]]).to(torch.float64)
            log_e[i * K] = torch.log_softmax(two, 0)
        else:
            log_e[i * K, 1] = 0.0
    pending, forks, _ = beam.choose(log_e, torch.ones(n, dtype=torch.bool, device=dev),
                                    None if force is None else torch.where(force[:, 0] >= 0, 1, -1))
    fork(*forks)
    beam.log_sum.zero_()  # A_0 = 1: what pruning the prompt's flag loses is charged to the first byte
    target = torch.zeros(n, L, dtype=torch.long, device=dev)
    for i, t in enumerate(texts):
        target[i, :len(t)] = torch.tensor(list(t), dtype=torch.long)
    n_bytes = torch.tensor([len(t) for t in texts], device=dev)
    shares = torch.zeros(n, L, dtype=torch.float64, device=dev)
    best = torch.zeros(n, L, dtype=torch.bool, device=dev)
    for t in range(L):
        active = t < n_bytes
        live = beam.alive & active[owner]
        closing = (live & pending).nonzero()[:, 0]
        if len(closing):  # hypotheses whose newest byte ends a patch: the main network takes it, in one call
            make_room(main, closing, cap)
            y[closing] = m.main.run_blocks(h_last[owner[closing], None], cache=main.select(closing))[:, 0]
            if prior:
                cum[closing] = m.prior_cumulative(y[closing])
        r = live.nonzero()[:, 0]
        text = owner[r]
        newest = x[text, lens[text] - 1]
        p = None
        if prior:
            node[r] = torch.where(pending[r], 0, m.vocab.trie.step(node[r], newest))
            p = m.prior_at(cum, r, node[r])[:, None]
        logits = m.decode(newest[:, None], h_last[text, None], y[r, None], prior=p,
                          cache=dec if len(r) == S else dec.select(r))[:, 0]
        logp = torch.log_softmax(logits.to(at_least_fp32(logits.dtype)), -1)
        b = target[text, t]
        child = torch.full((S, 2), -math.inf, dtype=torch.float64, device=dev)
        child[r] = torch.stack([logp.gather(1, b[:, None]), logp.gather(1, b[:, None] + 256)], 1)[..., 0].double()
        if argmax:  # the beam's next-byte distribution: each hypothesis' bytes, both flags summed, by its weight
            mixed = torch.full((S, 256), -math.inf, dtype=torch.float64, device=dev)
            mixed[r] = beam.w[r, None] + torch.logaddexp(logp[:, :256], logp[:, 256:]).double()
            best[:, t] = torch.logsumexp(mixed.view(n, K, 256), 1).argmax(-1) == target[:, t]
        pending, forks, shares[:, t] = beam.choose(child, active, None if force is None else force[:, t])
        fork(*forks)
        if stats is not None:
            stats["main_rows"] = stats.get("main_rows", 0) + len(closing)
            stats["decoder_rows"] = stats.get("decoder_rows", 0) + len(r)
        if t + 1 < L:  # the new byte through the encoder, once per text
            a = active.nonzero()[:, 0]
            x[a, lens[a]] = target[a, t]
            lens[a] += 1
            sub = m.vocab.subword_newest(x[a], lens[a]) if m.scfg.subword else None
            h_last[a] = m.encode(target[a, t, None], cache=enc if len(a) == n else enc.select(a), sub=sub)[:, 0]
    if argmax:
        return [(shares[i, :len(t)].cpu(), best[i, :len(t)].cpu()) for i, t in enumerate(texts)]
    return [shares[i, :len(t)].cpu() for i, t in enumerate(texts)]


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
