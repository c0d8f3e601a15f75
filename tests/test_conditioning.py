"""Conditioning the byte student on a context by the marginal over the context's patchings (conditioning.py).

Oracles: brute force over every flag sequence of the whole string from the document start (test_marginal's
student_paths: a full forward per flag sequence, fp64), for log A(context + continuation) - log A(context), for one
kept path's joint, and for the conditional distribution that sampling after a prompt must match; a full forward with
the flags generation used, for generation continued from a hypothesis' state."""
import itertools
import math

import pytest
import torch

import conditioning
from decoding import ByteGeneration, beam_search
from test_marginal import logsumexp, student_paths
from test_student import build_teacher, max_diff
from test_subword import subword_student

PAIRS = [(b"the", b" st"), (b"a n", b"ote"), (b"ri", b"ng"), (b"the", b"n"), (b"", b"ring"), (b"t", b"")]


@pytest.fixture(scope="module")
def student():
    return subword_student(build_teacher().double()).double()


def log_a(student, text):
    return logsumexp(list(student_paths(student, text).values())) if text else 0.0


def test_full_width_is_the_ratio_of_two_marginals(student):
    """At full width every pair's figure is log A(context + continuation) - log A(context), both sums over every flag
    sequence from the document start (1e-9, fp64); contexts of different lengths share a batch, one of them twice."""
    got = conditioning.conditional_logprobs(student, PAIRS, beam=256, floor=math.inf)
    for (ctx, cont), shares in zip(PAIRS, got):
        assert len(shares) == len(cont)
        want = log_a(student, ctx + cont) - log_a(student, ctx)
        assert abs(float(shares.sum()) - want) < 1e-9, (ctx, cont)


def test_choices_fork_the_context_once_and_score_as_alone(student):
    """A multiple-choice item: its choices share one beam over the context (its rows counted once) and each scores
    what it scores as the only request, at a width that prunes (4), in batches of 2 contexts and 3 continuations."""
    items = [(b"the stone th", [b"en", b"ere", b" a", b"e"]), (b"a ring", [b" to", b"s"]), (b"to", [b" the"])]
    pairs = [(c, x) for c, xs in items for x in xs]
    stats = {}
    together = conditioning.conditional_logprobs(student, pairs, beam=4, slots=12, stats=stats)
    alone_rows = 0
    for pair, shares in zip(pairs, together):
        one = {}
        [alone] = conditioning.conditional_logprobs(student, [pair], beam=4, stats=one)
        assert torch.allclose(shares, alone, atol=1e-12, rtol=0), pair
        alone_rows += one["context_rows"]
    assert 0 < stats["context_rows"] < alone_rows  # each context's beam ran once, not once per choice


def test_kept_path_at_width_one_is_its_joint(student):
    """keep: the context's flags and the continuation's are forced into the beam; at K = 1 the figure is that path's
    conditional joint, log p(context + continuation, flags) - log p(context, its flags), even for the lightest path;
    kept at full width, the figure is the exact ratio still."""
    ctx, cont = b"a no", b"te"
    paths = student_paths(student, ctx + cont)
    ctx_paths = student_paths(student, ctx)
    lightest = min(paths, key=paths.get)
    keep = [(torch.tensor(lightest[:len(ctx)]), torch.tensor(lightest[len(ctx):]))]
    [one] = conditioning.conditional_logprobs(student, [(ctx, cont)], beam=1, keep=keep)
    assert abs(float(one.sum()) - (paths[lightest] - ctx_paths[lightest[:len(ctx)]])) < 1e-9
    [wide] = conditioning.conditional_logprobs(student, [(ctx, cont)], beam=256, floor=math.inf, keep=keep)
    assert abs(float(wide.sum()) - (log_a(student, ctx + cont) - log_a(student, ctx))) < 1e-9


def test_context_tail_fixes_the_flags_before_it(student):
    """tail: a context's bytes before its last `tail` are read along its kept flags (one prefill), the beam sums over
    the flags after them: at full width each figure is the ratio of the two sums over the flag sequences that agree
    with the kept flags before the tail (1e-9, fp64), kept flags the lightest path's. Contexts with a cut, one no
    longer than the tail and one with no flags to keep (read from the document start) share a batch; generation
    continued after a cut context equals a full forward with the flags it used."""
    paths = student_paths(student, b"a note")
    lightest = min(paths, key=paths.get)
    pairs = [(b"a no", b"te"), (b"the st", b"on"), (b"ri", b"ng"), (b"to", b" a")]
    keep = [(torch.tensor(lightest[:4]), None), (torch.tensor([True, False, True, False, True, False]), None),
            (torch.tensor([False, True]), None), (None, None)]
    got = conditioning.conditional_logprobs(student, pairs, beam=256, floor=math.inf, keep=keep, tail=2)
    for (ctx, cont), (flags, _), shares in zip(pairs, keep, got):
        n = len(ctx) - 2 if flags is not None else 0
        fixed = tuple(flags[:n].tolist()) if flags is not None else ()
        whole = [w for f, w in student_paths(student, ctx + cont).items() if f[:n] == fixed]
        alone = [w for f, w in student_paths(student, ctx).items() if f[:n] == fixed]
        assert abs(float(shares.sum()) - (logsumexp(whole) - logsumexp(alone))) < 1e-9, ctx
    g = torch.Generator().manual_seed(3)
    gen = conditioning.generation_after(student, [b"the st"], 5, "joint", 1.0, g, keep=[keep[1][0]], tail=2)
    logits = torch.cat([step for _, _, _, step in gen.run(5, 1.0, None, 1.0, g)])
    with torch.no_grad():
        full, _, _ = student(gen.state.x[:, :int(gen.state.lens[0])], ends=gen.state.ends[:, :int(gen.state.lens[0])])
    assert max_diff(logits, full[0, 6:int(gen.state.lens[0]) - 1]) < 1e-10
    assert gen.state.ends[0, 1:5].tolist() == [True, False, True, False]  # the bytes before the tail: their kept flags


def test_generation_from_a_hypothesis_equals_the_full_forward(student):
    """generation_after: rows continue hypotheses of their prompt's beam (two rows of one prompt draw apart); every
    logit of the generated bytes equals a full forward with the bytes and flags the row used, and each row's prompt
    flags are those of a hypothesis the beam kept."""
    g = torch.Generator().manual_seed(1)
    prompts = [b"the stone then", b"a", b"the stone then", b""]
    gen = conditioning.generation_after(student, prompts, 6, "joint", 1.0, g, beam=4)
    logits = torch.zeros(len(prompts), 6, 512, dtype=torch.float64)
    for rows, offsets, _, step in gen.run(6, 1.0, None, 1.0, g):
        logits[rows, offsets] = step
    state = conditioning.context_beam(student, list(dict.fromkeys(prompts)))
    kept = {tuple(state.slots.ends[s, :len(state.x[0])].tolist()) for s in state.beam.alive.nonzero()[:, 0].tolist()}
    for i, p in enumerate(prompts):
        total, L = int(gen.state.lens[i]), len(p) + 1
        with torch.no_grad():
            full, _, _ = student(gen.state.x[i:i + 1, :total], ends=gen.state.ends[i:i + 1, :total])
        assert max_diff(logits[i], full[0, L - 1:total - 1]) < 1e-10
        if i == 0:
            assert tuple(gen.state.ends[i, :L].tolist()) + (False,) * (len(state.x[0]) - L) in kept


def test_sampling_after_a_prompt_draws_from_the_conditional_marginal(student):
    """generation_after at temperature 1 (the joint, full width): with the head masked to three byte values, the
    first 3 bytes of 20,000 samples after a prompt match the exact conditional p(y | prompt) = A(prompt + y) /
    A(prompt) over every flag sequence (27 strings summing to 1) in total variation below 0.02."""
    student = subword_student(build_teacher())
    allowed = torch.tensor([ord("a"), ord("t"), ord(" ")])
    mask = torch.full((512,), -math.inf)
    mask[allowed], mask[allowed + 256] = 0.0, 0.0
    decode = student.decode
    student.decode = lambda *a, **k: decode(*a, **k) + mask.to(student.head.weight.dtype)
    prompt = b"ta a"
    strings = [bytes(s) for s in itertools.product(allowed.tolist(), repeat=3)]
    exact = torch.tensor([float(s.sum()) for s in conditioning.conditional_logprobs(
        student, [(prompt, y) for y in strings], beam=64, floor=math.inf)]).exp()
    assert abs(float(exact.sum()) - 1) < 1e-4
    index = {s: i for i, s in enumerate(strings)}
    n = 20_000
    g = torch.Generator().manual_seed(0)
    gen = conditioning.generation_after(student, [prompt] * n, 3, "joint", 1.0, g, beam=64, floor=math.inf)
    for _ in gen.run(3, 1.0, None, 1.0, g):
        pass
    counts = torch.bincount(torch.tensor([index[bytes(r)] for r in gen.state.x[:, 5:8].tolist()]), minlength=27)
    assert 0.5 * float((counts.double() / n - exact.double()).abs().sum()) < 0.02


def test_search_starts_from_the_heaviest_hypotheses(student):
    """search_start: the search's rows are the beam's hypotheses, heaviest first, scored by their weights (the
    unused rows -inf); beam_search from them at width 1 writes greedy generation's text after the heaviest one."""
    gen, scores = conditioning.search_start(student, b"the st", 4, 6, beam=4)
    state = conditioning.context_beam(student, [b"the st"], 6)
    w = torch.sort(state.beam.w, descending=True).values
    assert torch.equal(scores, w) and scores[0] > -math.inf
    one = conditioning.search_start(student, b"the st", 4, 1, beam=4)
    out, _ = beam_search(student, b"the st", 4, 1, b"\xff", start=one)
    greedy = conditioning.search_start(student, b"the st", 4, 1, beam=4)[0]
    assert isinstance(greedy, ByteGeneration)
    text = bytearray()
    for _, _, new, _ in greedy.run(4, 0.0):
        text.append(int(new[0]))
    assert out == bytes(text)
