"""Conditioning the byte student on a context the way its text is scored: by the marginal over the context's patchings.

The student is a joint model over bytes and patch-end flags, so a continuation's probability given a context is a
ratio of two marginals, p(y | x) = A(x + y) / A(x), where A sums over the patchings of the whole string from the
document start (marginal.py's beam: A is its kept sum, exact at full width). Prefilling x along one patching (the
patcher's) and continuing after it conditions on that path instead: where the patcher misses a token end, the main
network reads a merged token it never saw (DESIGN.md section 8).

- conditional_logprobs: log p(y | x) for many (context, continuation) pairs. The beam runs over each distinct context
  from the document start (many contexts in lockstep), keeping the context's canonical token ends as one path (as the
  fidelity headline keeps the true token ends); at the context's end its surviving hypotheses, with their weights and
  log A(x), are copied into the slots of every continuation of that context (the choices of a multiple-choice item
  fork the context's beam once), and the beam goes on over the continuations (in lockstep again). A continuation's
  shares add up to log A(x + y) - log A(x).
- generation_after: generation after prompts: the beam over each prompt, then one hypothesis drawn by its weight
  (temperature 0: the heaviest) and continued by decoding.ByteGeneration from its state. At full width and
  temperature 1 that is ancestral sampling of the joint given the prompt's bytes.
- search_start: the hypotheses decoding.beam_search starts from (sample.py --chat at temperature 0).
- token_ends: the canonical token ends of some bytes, the path the beam keeps; keep_last: a context cut to fit.
"""
import math

import torch

from marginal import BEAM, FLOOR, StudentBeam, after_prefill, chunks

TAIL = 64  # the default tail: bytes at a context's end the beam reads (None: the whole context; bench/context_tail.py)


def token_ends(tok, data):
    """Each byte's "a token ends here" flag (bool (len(data),)) under the canonical tokenization of data (normalised
    UTF-8, special codes allowed), or None where those tokens do not spell it byte for byte (or there is no
    tokenizer): the path the marginal's beam keeps, as bench/fidelity.py keeps the true token ends."""
    if tok is None or not data:
        return None
    try:
        ids = tok.encode_bytes(data)
    except UnicodeDecodeError:
        return None
    lengths = tok.token_lengths[ids] if len(ids) else tok.token_lengths[:0]
    if (lengths == 0).any() or int(lengths.sum()) != len(data):
        return None
    flags = torch.zeros(len(data), dtype=torch.bool)
    flags[torch.from_numpy(lengths.cumsum() - 1)] = True
    return flags


def keep_last(data, n):
    """The last n bytes of data, moved forward to a character start (never half a UTF-8 sequence)."""
    if len(data) <= n:
        return data
    start = len(data) - n
    while start < len(data) and 0x80 <= data[start] < 0xC0:
        start += 1
    return data[start:]


def context_beam(model, contexts, beam=BEAM, floor=FLOOR, keep=None, stats=None, room=0, tail=TAIL):
    """The beam over each context (bytes) from a fresh document start, read to its end (lockstep) -> StudentBeam
    (its log_sum: log A(context) per context, or with tail the log A of the context's tail). keep: per context its
    flags to keep (None: none). tail (bytes, or None: every byte): a context with flags to keep and longer than tail
    has the bytes before its last `tail` read along those flags in one prefill, and the beam sums over the flags of
    the last `tail` bytes alone (an approximation: the earlier flags are fixed to the canonical token ends, which is
    what the beam's heaviest path mostly is; a continuation's conditional is a ratio in which the fixed part
    cancels). The beam's cost then no longer grows with the context's length."""
    keep = [None] * len(contexts) if keep is None else keep
    cut = [len(c) - tail if tail is not None and k is not None and len(c) > tail else 0 for c, k in zip(contexts, keep)]
    if not any(cut):
        state = StudentBeam.from_document_start(model, contexts, beam, floor, keep, stats, room, rows_key="context_rows")
    else:
        state = after_prefill(
            model, [c[:n] for c, n in zip(contexts, cut)], [c[n:] for c, n in zip(contexts, cut)], beam, floor,
            [None if k is None else k[n:] for k, n in zip(keep, cut)], stats,
            [k[:n] if n else () for k, n in zip(keep, cut)], room, rows_key="context_rows")
    for _ in range(state.target.shape[1]):
        state.step()
    return state


@torch.no_grad()
def conditional_logprobs(model, pairs, beam=BEAM, floor=FLOOR, keep=None, slots=128, stats=None, argmax=False,
                         progress=None, tail=TAIL):
    """log p(continuation | context) by the marginal over the whole string's patchings (see the module docstring).
    pairs: [(context bytes, continuation bytes)]; keep: per pair (the context's flags, the continuation's) to keep in
    the beam (either None), or None. Contexts go in lockstep batches of slots // beam, and their continuations after
    them in batches of the same size. -> per pair, each continuation byte's share (n,) float64, natural log (their
    sum: log A(context + continuation) - log A(context)); with argmax, (shares, whether each byte was the likeliest
    under the beam's next-byte mixture), as marginal.marginal_logprobs. stats: adds context_rows (the main network's
    rows in the contexts' beam), main_rows (in the continuations'), decoder_rows and forks."""
    keep = [(None, None)] * len(pairs) if keep is None else keep
    contexts = list(dict.fromkeys(c for c, _ in pairs))
    index = {c: i for i, c in enumerate(contexts)}
    members = [[] for _ in contexts]
    for i, (c, _) in enumerate(pairs):
        members[index[c]].append(i)
    per = max(1, slots // beam)
    out = [None] * len(pairs)
    for chunk in chunks([len(c) for c in contexts], per):
        state = context_beam(model, [contexts[c] for c in chunk], beam, floor,
                             [keep[members[c][0]][0] for c in chunk], stats, tail=tail)
        requests = [(k, i) for k, c in enumerate(chunk) for i in members[c]]
        for part in chunks([len(pairs[i][1]) for _, i in requests], per):  # similar lengths share a batch
            part = [requests[p] for p in part]
            spawned = state.spawn([k for k, _ in part], [pairs[i][1] for _, i in part], [keep[i][1] for _, i in part])
            for (_, i), scored in zip(part, spawned.run(argmax)):
                out[i] = scored
            if progress is not None:
                progress.update(len(part))
        del state
    return out


def draw(weights, temperature=1.0, generator=None):
    """One slot per row of weights (R, K) float64 log weights, -inf for empty slots: by its weight, or the heaviest
    at temperature 0 (the row's slot index (R,))."""
    if temperature == 0:
        return weights.argmax(1)
    p = torch.softmax(weights, 1)
    return torch.multinomial(p.float() if p.device.type != "cpu" else p, 1, generator=generator)[:, 0]


@torch.no_grad()
def generation_after(model, prompts, max_new_bytes, byte_model="joint", temperature=1.0, generator=None, beam=BEAM,
                     floor=FLOOR, keep=None, tail=TAIL):
    """Cached generation (decoding.ByteGeneration of that byte_model) after each prompt (bytes), each row continuing one
    hypothesis of the beam over its prompt, drawn by its weight (temperature 0: the heaviest). Rows with the same
    prompt share its beam and draw apart. keep: per prompt, the flags to keep in its beam (or None)."""
    unique = list(dict.fromkeys(prompts))
    first = {p: prompts.index(p) for p in unique}
    keep = [None] * len(prompts) if keep is None else keep
    state = context_beam(model, unique, beam, floor, [keep[first[p]] for p in unique], tail=tail)
    weights = state.beam.w.view(len(unique), beam)
    text = torch.tensor([unique.index(p) for p in prompts], device=weights.device)
    slots = text * beam + draw(weights[text], temperature, generator)
    return state.generation(slots, max_new_bytes, byte_model)


@torch.no_grad()
def search_start(model, prompt, max_bytes, width, beam=BEAM, floor=FLOOR, keep=None, tail=TAIL):
    """decoding.beam_search's start after prompt: the beam over the prompt's patchings, its heaviest `width`
    hypotheses as the search's rows, each scored by its weight (rows beyond the live hypotheses: -inf) -> (gen,
    scores), for beam_search(..., start=)."""
    state = context_beam(model, [prompt], max(beam, width), floor, [keep], tail=tail)
    w = state.beam.w
    order = torch.argsort(w, descending=True, stable=True)[:width]
    order = torch.cat([order, order[:1].expand(width - len(order))])  # width past the beam: copies, never used
    scores = torch.where(torch.arange(width, device=w.device) < len(w), w[order], -math.inf)
    return state.generation(order, max_bytes + 2, "greedy"), scores
