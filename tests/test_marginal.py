"""The byte marginal over patchings (marginal.py), for the student and for the teacher.

Oracles: brute force over every flag sequence (the student: a full forward per sequence, with those flags) and over
every tokenization of a tiny vocabulary (the teacher: a full forward per token sequence); the greedy-flag joint
(decoding.greedy_flag_logprobs) for K = 1."""
import itertools
import math

import pytest
import torch

from decoding import ByteGeneration, greedy_flag_logprobs
from marginal import marginal_logprobs, teacher_marginal_logprobs
from model import BOS_BYTE
from targets import ByteTrie
from test_prior import vocabulary
from test_student import build_teacher
from test_subword import START_ID, subword_student

TEXTS = [b"the ston", b"a note", b"ring", b"t"]  # at most 8 bytes: 2^8 flag sequences at most


@pytest.fixture(scope="module")
def teacher():
    return build_teacher().double()


@pytest.fixture(scope="module")
def student(teacher):
    return subword_student(teacher).double()


@torch.no_grad()
def student_paths(student, text, prompt=b""):
    """{flag sequence: log p(text, flags)} over every flag sequence, by one full forward per sequence (fp64). From a
    fresh document start the flags are one per byte of text; after a prompt, whose flags are the patcher's, the
    prompt's last byte's flag comes first, weighted by the head's two halves for that byte (renormalised)."""
    x = torch.tensor([[BOS_BYTE, *prompt, *text]])
    n_p = len(prompt)
    fixed = [True]  # a lone document start is its own patch; before a prompt, the patcher decides (as for the rest)
    if n_p:
        fixed = (student.boundary_probs(student.encode(x[:, :n_p + 1]))[0, :n_p] > student.scfg.boundary_threshold).tolist()
    out = {}
    for flags in itertools.product((False, True), repeat=len(text) + (1 if n_p else 0)):
        ends = fixed + list(flags)
        logits, _, _ = student(x, ends=torch.tensor([ends + [False] * (x.shape[1] - len(ends))]))
        w = 0.0
        if n_p:
            prev, last = logits[0, n_p - 1], int(x[0, n_p])
            w += float(torch.log_softmax(torch.stack([prev[last], prev[last + 256]]), 0)[int(ends[n_p])])
        logp = torch.log_softmax(logits[0], -1)
        for t in range(n_p, x.shape[1] - 1):  # position t predicts byte t + 1 and its flag
            w += float(logp[t, int(x[0, t + 1]) + 256 * ends[t + 1]])
        out[flags] = w
    return out


def logsumexp(values):
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def beam_sum(shares):
    return float(shares.sum())


def test_full_width_equals_the_sum_over_every_flag_sequence(student):
    shares = marginal_logprobs(student, TEXTS, beam=256, floor=math.inf)
    for text, s in zip(TEXTS, shares):
        exact = logsumexp(list(student_paths(student, text).values()))
        assert abs(beam_sum(s) - exact) < 1e-9, (text, beam_sum(s), exact)


def test_small_beams_are_upper_bounds_on_the_bits(student):
    exact = [logsumexp(list(student_paths(student, t).values())) for t in TEXTS]
    for beam, floor in [(1, math.inf), (2, math.inf), (3, 2.0), (4, 0.5), (8, math.log(1e6))]:
        for text, s, want in zip(TEXTS, marginal_logprobs(student, TEXTS, beam=beam, floor=floor), exact):
            assert beam_sum(s) <= want + 1e-12, (beam, floor, text)
    wide = marginal_logprobs(student, TEXTS[:1], beam=16)[0]
    narrow = marginal_logprobs(student, TEXTS[:1], beam=1)[0]
    assert beam_sum(narrow) < beam_sum(wide) - 1e-3  # the bound is not trivially the same: K matters here


def test_width_one_is_the_greedy_flag_joint(student):
    shares = marginal_logprobs(student, TEXTS, beam=1)
    for s, (_, joint, _) in zip(shares, greedy_flag_logprobs(student, TEXTS)):
        assert torch.allclose(s, joint.double(), atol=1e-5), (s, joint)


def test_shares_are_causal(student):
    """Changing byte t+1 never changes the kept sums up to byte t; the shares add up to the figure."""
    base = b"the stone then"
    for t in (3, 7, 12):
        changed = base[:t + 1] + bytes([base[t + 1] ^ 1]) + base[t + 2:]
        a, b = marginal_logprobs(student, [base, changed], beam=4)
        assert torch.equal(a[:t + 1], b[:t + 1])
        assert not torch.equal(a[t + 1], b[t + 1])


def test_after_a_prompt_equals_the_sum_over_the_continuations_flags(student):
    """eval.py's case: the prompt's flags from the patcher, its last byte's flag summed over."""
    prompts, texts = [b"the", b"a no", b"ri"], [b" sto", b"te", b"ng"]
    shares = marginal_logprobs(student, texts, beam=64, floor=math.inf, prompts=prompts)
    for prompt, text, s in zip(prompts, texts, shares):
        exact = logsumexp(list(student_paths(student, text, prompt).values()))
        assert abs(beam_sum(s) - exact) < 1e-9, (prompt, text)



def test_a_shared_prompt_is_prefilled_once_and_scores_as_alone(student):
    """The choices of a multiple-choice item share their prompt's prefill (and a batch) and each scores what it
    scores alone; prompts of different lengths mixed in one batch change nothing either."""
    prompts = [b"the st", b"the st", b"the st", b"a", b"the st", b"a"]
    texts = [b"on", b"one", b"ring", b" note", b"", b"t"][:4] + [b"o", b"t"]
    together = marginal_logprobs(student, texts, beam=4, prompts=prompts)
    for prompt, text, s in zip(prompts, texts, together):
        (alone,) = marginal_logprobs(student, [text], beam=4, prompts=[prompt])
        assert torch.allclose(s, alone, atol=1e-9, rtol=0), (prompt, text)

# -- the teacher: a beam over tokenizations --

def entries_by_bytes():
    """{bytes: [ids that spell them]} of the tiny vocabulary (one entry, "to", has two ids: targets.py's rule sums
    their probabilities and continues with the first)."""
    out = {}
    for i, b in enumerate(vocabulary()):
        if b:
            out.setdefault(b, []).append(i)
    return out


@torch.no_grad()
def teacher_paths(teacher, text):
    """{flag sequence: log p(text, flags)} over every tokenization, by a full forward per token sequence (fp64): a flag
    ends a token; complete tokens must be entries, the bytes after the last end a prefix of a longer entry; the
    probability is the softmax over the ids that spell bytes (the exact targets' normalisation)."""
    spelled = entries_by_bytes()
    ids = [i for i, b in enumerate(vocabulary()) if b]
    out = {}
    for flags in itertools.product((False, True), repeat=len(text)):
        pieces, start = [], 0
        for t, e in enumerate(flags):
            if e:
                pieces.append(text[start:t + 1])
                start = t + 1
        tail = text[start:]
        if any(p not in spelled for p in pieces):
            continue
        longer = [i for b, js in spelled.items() if len(b) > len(tail) and b.startswith(tail) for i in js]
        if tail and not longer:
            continue
        tokens = [START_ID] + [spelled[p][0] for p in pieces]
        logp = torch.full((len(tokens), len(vocabulary())), -math.inf, dtype=torch.float64)
        logp[:, ids] = torch.log_softmax(teacher(torch.tensor([tokens]))[0][:, ids], -1)
        w = sum(float(torch.logsumexp(logp[i, spelled[p]], 0)) for i, p in enumerate(pieces))
        if tail:
            w += float(torch.logsumexp(logp[len(pieces), longer], 0))
        out[flags] = w
    return out


def teacher_beam(teacher, texts, **kw):
    return teacher_marginal_logprobs(teacher, ByteTrie(vocabulary()), START_ID, texts, **kw)


def test_teacher_full_width_equals_the_sum_over_every_tokenization(teacher):
    for text, s in zip(TEXTS, teacher_beam(teacher, TEXTS, beam=256, floor=math.inf)):
        exact = logsumexp(list(teacher_paths(teacher, text).values()))
        assert abs(beam_sum(s) - exact) < 1e-9, (text, beam_sum(s), exact)


def test_teacher_small_beams_are_upper_bounds_and_width_one_is_greedy(teacher):
    finite = 0
    for text in TEXTS:
        exact = logsumexp(list(teacher_paths(teacher, text).values()))
        for beam, floor in [(1, math.inf), (2, math.inf), (3, 1.0), (8, math.log(1e6))]:
            assert beam_sum(teacher_beam(teacher, [text], beam=beam, floor=floor)[0]) <= exact + 1e-12
        flags, greedy = (), None  # the oracle's greedy path: the heavier child at every byte, ties "continues"
        for t in range(1, len(text) + 1):
            prefix = teacher_paths(teacher, text[:t])
            w0, w1 = prefix.get(flags + (False,), -math.inf), prefix.get(flags + (True,), -math.inf)
            flags, greedy = (flags + (True,), w1) if w1 > w0 else (flags + (False,), w0)
        got = beam_sum(teacher_beam(teacher, [text], beam=1)[0])
        assert got == greedy or abs(got - greedy) < 1e-9, text  # -inf both where greedy flags reach a dead end
        finite += math.isfinite(greedy)
    assert 0 < finite < len(TEXTS)  # some greedy paths live, and one dies ("the ston": a "not end" no byte continues)


def test_teacher_shares_are_causal(teacher):
    base = b"the stone then"
    for t in (3, 7, 12):
        changed = base[:t + 1] + b"x" + base[t + 2:]
        a, b = teacher_beam(teacher, [base, changed], beam=4)
        assert torch.equal(a[:t + 1], b[:t + 1])
        assert not torch.equal(a[t + 1], b[t + 1])


def test_a_cache_that_grows_keeps_its_entries(teacher):
    """KVCache.grow (the beams start their caches small): generation across the growth equals a full forward."""
    ids = torch.randint(2, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    cache = teacher.new_cache(2, 4)
    first = teacher(ids[:, :4], cache=cache)
    cache.grow(9)
    rest = teacher(ids[:, 4:], cache=cache)
    full = teacher(ids)
    assert torch.allclose(torch.cat([first, rest], 1), full, atol=1e-10)


def test_forks_copy_every_cache_row(student):
    """Texts long enough that hypotheses fork many times and the main network's cache grows past its start: a beam
    of width 2 equals the same beam run on each text alone, and it is never above the width-1 figure's bits."""
    texts = [b"the stone then there, and the note is done. " * 4, b"a ring to the chair. " * 6]
    stats = {}
    together = marginal_logprobs(student, texts, beam=2, stats=stats)
    assert stats["forks"] > 20
    for text, s in zip(texts, together):
        alone = marginal_logprobs(student, [text], beam=2)[0]
        assert torch.allclose(s, alone, atol=1e-9)
        assert beam_sum(s) >= beam_sum(marginal_logprobs(student, [text], beam=1)[0])


def test_a_kept_path_is_never_pruned(student):
    """keep forces one flag sequence into the beam: at width 1 the figure is that path's joint exactly (even the
    lightest path), and at width 2 it lies between that path and the exact marginal."""
    for text in TEXTS[:3]:
        paths = student_paths(student, text)
        exact = logsumexp(list(paths.values()))
        lightest = min(paths, key=paths.get)
        keep = [torch.tensor(lightest)]
        alone = beam_sum(marginal_logprobs(student, [text], beam=1, keep=keep)[0])
        assert abs(alone - paths[lightest]) < 1e-9, text
        two = beam_sum(marginal_logprobs(student, [text], beam=2, floor=0.1, keep=keep)[0])
        assert paths[lightest] - 1e-12 <= two <= exact + 1e-12 and two > alone
    with pytest.raises(ValueError, match="flags for a text"):
        marginal_logprobs(student, [b"ab"], keep=[torch.tensor([True])])


def test_teacher_kept_tokenization_is_never_pruned(teacher):
    """The same for the teacher's beam: kept, any tokenization (here the lightest one that lives) gives its own
    weight at width 1, and the greedy path's dead end ("the ston") no longer kills the figure."""
    for text in TEXTS:
        paths = teacher_paths(teacher, text)
        lightest = min(paths, key=paths.get)
        keep = [torch.tensor(lightest)]
        alone = beam_sum(teacher_beam(teacher, [text], beam=1, keep=keep)[0])
        assert abs(alone - paths[lightest]) < 1e-9, text
        two = beam_sum(teacher_beam(teacher, [text], beam=2, floor=0.1, keep=keep)[0])
        assert paths[lightest] - 1e-12 <= two <= logsumexp(list(paths.values())) + 1e-12


def test_joint_sampler_draws_from_the_marginal(teacher):
    """sample.py's default (ByteGeneration(byte_model="joint")) at temperature 1 is ancestral sampling of the joint:
    with the head masked to three byte values, the first 3 bytes of 20,000 samples match the marginal over every flag
    sequence (the beam at full width; its 27 strings sum to 1) in total variation below 0.02. The greedy-flag rule,
    which commits to a flag, is told apart."""
    student = subword_student(teacher)
    allowed = torch.tensor([ord("a"), ord("t"), ord(" ")])
    mask = torch.full((512,), -math.inf, dtype=torch.float64)
    mask[allowed], mask[allowed + 256] = 0.0, 0.0
    decode = student.decode
    student.decode = lambda *a, **k: decode(*a, **k) + mask.to(student.head.weight.dtype)
    strings = [bytes(s) for s in itertools.product(allowed.tolist(), repeat=3)]
    exact = torch.tensor([beam_sum(s) for s in marginal_logprobs(student, strings, beam=8, floor=math.inf)]).exp()
    assert abs(float(exact.sum()) - 1) < 1e-5
    index = {s: i for i, s in enumerate(strings)}

    def tv(byte_model, n=20_000):
        gen = ByteGeneration(student, [b""] * n, 3, byte_model=byte_model)
        for _ in gen.run(3, 1.0, None, 1.0, torch.Generator().manual_seed(0)):
            pass
        counts = torch.bincount(torch.tensor([index[bytes(r)] for r in gen.state.x[:, 1:4].tolist()]), minlength=27)
        return 0.5 * float((counts.double() / n - exact.double()).abs().sum())
    assert tv("joint") < 0.02
    assert tv("greedy") > 0.04


def test_beam_search_finds_the_likeliest_finished_string(teacher):
    """decoding.beam_search at full width on a head masked to three byte values, " " the stop: the string it returns
    is the likeliest finished one under the greedy-flag model, by brute force over every string of up to 4 bytes
    (greedy_flag_logprobs, fp64); at width 1 it is greedy generation's text."""
    from decoding import beam_search
    student = subword_student(teacher).double()
    allowed = torch.tensor([ord("a"), ord("t"), ord(" ")])
    mask = torch.full((512,), -math.inf, dtype=torch.float64)
    mask[allowed], mask[allowed + 256] = 0.0, 0.0
    decode = student.decode
    student.decode = lambda *a, **k: decode(*a, **k) + mask
    finished = [bytes(s) + b" " for n in range(4) for s in itertools.product(b"at", repeat=n)]
    scores = {s: float(lp.sum()) for s, (lp, _, _) in zip(finished, greedy_flag_logprobs(student, finished))}
    out, ended = beam_search(student, b"", 4, beam=16, stop=b" ")
    assert ended and out + b" " == max(scores, key=scores.get)
    gen = ByteGeneration(student, [b""], 4, byte_model="greedy")
    greedy = bytearray()
    for _, _, new, _ in gen.run(4, 0.0, None, 1.0, None):
        greedy.append(int(new[0]))
    first, ended1 = beam_search(student, b"", 4, beam=1, stop=b" ")
    cut = bytes(greedy).split(b" ")[0]
    assert first == cut and ended1 == (b" " in greedy)
