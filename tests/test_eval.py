"""eval.py's lm-evaluation-harness models, the local tasks (tasks/) and bench/plot.py.

Oracles: a full forward of the byte student with the boundaries the adapter used (and those boundaries checked
against the rules: patcher flags in the context, the likelier half of the head after it); decoding.greedy_flag_logprobs
for an empty context; bench/fidelity.py's scorer for the rolling likelihood; the teacher's plain forward for its token
log-probabilities; plain greedy generation for the stop strings; the play text and the probes' definitions for the task
files; metrics.jsonl for the plotted curves. The models are tiny and random (tests/stage_fixtures.py's teacher, with a
real BPE tokenizer, and a student whose every weight is perturbed), the comparisons of cached and full paths in fp64."""
import importlib.util
import json
import math
import os
import re
import types

import pytest
import torch

pytest.importorskip("lm_eval")
import checkpoint  # noqa: E402
import conditioning  # noqa: E402
import decoding  # noqa: E402
import eval as ev  # noqa: E402
import marginal  # noqa: E402
import model  # noqa: E402
import stage_fixtures as sf  # noqa: E402
from teacher import load_teacher  # noqa: E402

TASKS_DIR = os.path.join(sf.REPO, "tasks")
SCFG = model.StudentConfig(d_local=32, n_enc=1, n_dec=1, n_local_heads=2, proj_hidden=64, local_window=16)
TEXT = ("**MACBETH**  \nIf it were done when 'tis done, then 'twere well  \nIt were done quickly: if the assassination  \n"
        "Could trammel up the consequence, and catch  \nWith his surcease success; that but this blow  \n")


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny matmuls on one thread


@pytest.fixture(scope="module")
def teacher_and_tok():
    return load_teacher(sf.teacher_dir())


@pytest.fixture(scope="module")
def student(teacher_and_tok):
    """init_weights(teacher), then noise on every weight, so that boundaries vary and no part is zero."""
    teacher = teacher_and_tok[0]
    torch.manual_seed(3)
    student = model.ByteLM(SCFG, teacher.cfg).init_weights(teacher)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in student.parameters():
            matrix = p.dim() == 2 and p.shape[0] != 256
            p.add_((1.0 / p.shape[1] ** 0.5 if matrix else 0.1) * torch.randn(p.shape, generator=g))
    return student.eval()


@pytest.fixture(scope="module")
def student_lm(student, teacher_and_tok):
    return ev.StudentLM(student, teacher_and_tok[1], batch_size=3)  # the marginal over patchings, the default


@pytest.fixture(scope="module")
def student_lm_greedy(student, teacher_and_tok):
    return ev.StudentLM(student, teacher_and_tok[1], batch_size=3, byte_model="greedy")


@pytest.fixture(scope="module")
def student64(student):
    import copy
    return copy.deepcopy(student).double()


@pytest.fixture(scope="module")
def teacher_lm(teacher_and_tok):
    return ev.TeacherLM(*teacher_and_tok, batch_size=2)


def max_abs(a, b):
    return (a - b).abs().max().item()


def requests(*args):
    return [types.SimpleNamespace(args=a) for a in args]


# ---------------------------------------------------------------------------------------------------------------
# The byte student

@pytest.mark.parametrize("byte_model", ["late", "greedy"])
def test_loglikelihood_empty_context_is_the_proper_likelihood(byte_model, student, teacher_and_tok):
    """With no context the continuation is scored from a fresh document start: late_flag_logprobs (or
    greedy_flag_logprobs) of its bytes (batches of 3 with continuations of different lengths)."""
    conts = ["If it were done", " when", "'tis done, then 'twere well", "\u00e9t\u00e9", "x"]
    got = ev.StudentLM(student, teacher_and_tok[1], batch_size=3, byte_model=byte_model).loglikelihood(
        requests(*[("", c) for c in conts]))
    scorer = decoding.late_flag_logprobs if byte_model == "late" else decoding.greedy_flag_logprobs
    want = scorer(student, [c.encode() for c in conts])
    for (ll, _), (logp, *_) in zip(got, want):
        assert ll == pytest.approx(float(logp.double().sum()), abs=1e-4)


def test_marginal_loglikelihood_equals_the_beam(student64, teacher_and_tok):
    """The default: loglikelihood is log A(context + continuation) - log A(context) by the beam over the whole
    string's patchings (conditioning.conditional_logprobs; tested against brute force in test_conditioning.py), the
    canonical token ends of context and continuation kept in the beam (keep_tokens=False: the beam alone; at width 1
    that path's conditional joint), contexts empty, one byte, past the byte blocks' window and ending in whitespace
    (lm-eval's split moves it to the continuation); --context=patcher, the old rule: the beam after the context
    prefilled along the patcher's flags (marginal.marginal_logprobs with prompts). is_greedy is every continuation
    byte being the argmax of the beam's next-byte mixture, checked here at full width against brute force over
    every flag sequence of context + continuation."""
    from test_marginal import logsumexp, student_paths
    pairs = [("", " done"), ("I", "f it"), (TEXT[:90], TEXT[90:110]), (TEXT[:40], " quickly"), (TEXT[:14], "If it")]
    lm = ev.StudentLM(student64, teacher_and_tok[1], batch_size=3)
    got = lm.loglikelihood(requests(*pairs))
    split = [ev.lm_eval_split(*p) for p in pairs]  # lm-eval's: the context's trailing whitespace goes with the continuation
    assert split[-1] == (TEXT[:11], TEXT[11:14] + "If it")
    tok = teacher_and_tok[1]
    keep = [ev.token_ends(tok, c.encode()) for _, c in split]
    assert all(k is not None and bool(k[-1]) for k in keep)  # the tokens spell each continuation; the last byte ends one
    encoded = [(c.encode(), x.encode()) for c, x in split]
    want = conditioning.conditional_logprobs(student64, encoded, keep=[(ev.token_ends(tok, c), k)
                                                                       for (c, _), k in zip(encoded, keep)])
    for (ll, _), shares in zip(got, want):
        assert ll == pytest.approx(float(shares.sum()), abs=1e-9)
    alone = ev.StudentLM(student64, tok, keep_tokens=False).loglikelihood(requests(*pairs))  # the beam alone
    for (ll, _), shares in zip(alone, conditioning.conditional_logprobs(student64, encoded)):
        assert ll == pytest.approx(float(shares.sum()), abs=1e-9)
    old = ev.StudentLM(student64, tok, context="patcher").loglikelihood(requests(*pairs))
    want = marginal.marginal_logprobs(student64, [x for _, x in encoded], prompts=[c for c, _ in encoded], keep=keep)
    for (ll, _), shares in zip(old, want):
        assert ll == pytest.approx(float(shares.sum()), abs=1e-9)
    # at width 1 the kept path is the only one: the joint of context + continuation along their token ends, less
    # the context's along its own
    ctx, cont = "It", " it"
    ends = tuple(bool(e) for e in ev.token_ends(tok, ctx.encode())) + \
        tuple(bool(e) for e in ev.token_ends(tok, cont.encode()))
    [(ll, _)] = ev.StudentLM(student64, tok, beam=1).loglikelihood(requests((ctx, cont)))
    paths = student_paths(student64, (ctx + cont).encode())
    assert ll == pytest.approx(paths[ends] - student_paths(student64, ctx.encode())[ends[:len(ctx)]], abs=1e-9)
    wide = ev.StudentLM(student64, teacher_and_tok[1], beam=64, keep_tokens=False)
    ctx, cont = b"I", b"f i"
    logp, best, _, _ = wide.score([(ctx, cont)])[0]
    a_ctx = logsumexp(list(student_paths(student64, ctx).values()))
    assert float(logp.sum()) == pytest.approx(logsumexp(list(student_paths(student64, ctx + cont).values())) - a_ctx,
                                              abs=1e-9)
    for t in range(len(cont)):  # the exact next-byte distribution after ctx + cont[:t]: brute force over the flags
        scores = [logsumexp(list(student_paths(student64, ctx + cont[:t] + bytes([b])).values())) for b in range(256)]
        assert bool(best[t]) == (max(range(256), key=scores.__getitem__) == cont[t])


@pytest.mark.parametrize("byte_model", ["joint", "late", "greedy"])
def test_loglikelihood_does_not_depend_on_the_batch(byte_model, student, teacher_and_tok):
    """Contexts longer than the student's reach are cut to fit each request's own continuation, never the longest in
    its batch: a request scores the same alone as in a batch of three."""
    ctx = (TEXT * 3)[:400]
    reqs = requests(*[(ctx, c) for c in (" If", " it were done when 'tis done, then 'twere well", " x")])
    alone = [ev.StudentLM(student, teacher_and_tok[1], batch_size=1, byte_model=byte_model).loglikelihood(reqs)]
    batched = [ev.StudentLM(student, teacher_and_tok[1], batch_size=3, byte_model=byte_model).loglikelihood(reqs)]
    assert len(ctx.encode()) > ev.StudentLM(student, teacher_and_tok[1]).max_bytes
    for (a, _), (b, _) in zip(alone[0], batched[0]):
        assert a == pytest.approx(b, abs=1e-4)


def test_late_loglikelihood_equals_the_late_oracle(student64, teacher_and_tok):
    """Late flags with a context (empty, one byte, past the byte blocks' window): the adapter's per-byte
    log-probabilities equal the full-forward oracle of the late-flag model started from the context with the flags
    the patcher gave it, and the flags it decided equal the oracle's."""
    from test_scoring import late_reference
    lm = ev.StudentLM(student64, teacher_and_tok[1], batch_size=3, byte_model="late")
    pairs = [(b"", b" done"), (b"I", b"f it"), (TEXT[:90].encode(), TEXT[90:110].encode()),
             (TEXT[:40].encode(), b" quickly")]
    for (ctx, cont), (logp, greedy, x, ends) in zip(pairs, lm.score(pairs)):
        L = len(ctx) + 1
        assert bytes(x[1:].tolist()) == ctx + cont
        want, flags, _ = late_reference(student64, cont, decoding.LATE_EPS, ctx, ends[:L - 1].tolist())
        assert max_abs(logp.double(), want) < 1e-6
        first = L - 1 if ctx else L
        assert ends[first:L + len(cont) - 1].tolist() == flags.tolist()


def test_loglikelihood_equals_full_forward_with_the_boundaries_used(student64, teacher_and_tok):
    """Greedy flags, contexts of several lengths (empty, one byte, past the byte blocks' window): the adapter's
    per-byte log-probabilities and is_greedy equal a full forward with the flags it used, and those flags follow the
    rules: the patcher's (on the context alone) for every context byte but the last, then the likelier half of the
    head."""
    student_lm64 = ev.StudentLM(student64, teacher_and_tok[1], batch_size=3, byte_model="greedy")
    m = student_lm64.model
    pairs = [(b"", b" done"), (b"I", b"f it"), (TEXT[:90].encode(), TEXT[90:110].encode()),
             (TEXT[:40].encode(), b" quickly")]
    for (ctx, cont), (logp, greedy, x, ends) in zip(pairs, student_lm64.score(pairs)):
        L = len(ctx) + 1
        assert bytes(x[1:].tolist()) == ctx + cont
        with torch.no_grad():
            logits = m(x[None], ends=ends[None])[0][0]
            patcher = m.boundary_probs(m.encode(x[None, :L]))[0] > m.scfg.boundary_threshold
        assert torch.equal(ends[:L - 1], patcher[:L - 1])
        for p in range(max(L - 1, 1), len(x) - 1):  # each flag from the last context byte on: the likelier half
            assert bool(ends[p]) == bool(logits[p - 1, x[p] + 256] > logits[p - 1, x[p]])
        assert bool(ends[0]) or L > 1  # a lone 0xFE is its own patch
        want = model.byte_logprobs(logits[L - 1:-1]).gather(1, x[L:, None])[:, 0]
        assert torch.allclose(logp.double(), want.double(), atol=1e-5)
        assert torch.equal(greedy, model.byte_logprobs(logits[L - 1:-1]).argmax(-1) == x[L:])


def test_rolling_equals_bench_fidelity(student_lm, teacher_lm, student, teacher_and_tok):
    """loglikelihood_rolling of both adapters equals bench/fidelity.py's student_bpb_marginal (the default; late
    flags: student_bpb_late) and teacher_bpb times the bytes, over several windows (32 tokens each)."""
    fidelity = load_module(os.path.join(sf.REPO, "bench", "fidelity.py"), "fidelity_for_test")
    teacher, tok = teacher_and_tok
    r = fidelity.score(student, teacher, tok, fidelity.ByteTrie(tok.id_to_bytes), TEXT, 32)
    old = student_lm.window, teacher_lm.window
    student_lm.window = teacher_lm.window = 32
    try:
        [s_ll], [t_ll] = student_lm.loglikelihood_rolling(requests((TEXT,))), \
            teacher_lm.loglikelihood_rolling(requests((TEXT,)))
        [late_ll] = ev.StudentLM(student, teacher_and_tok[1], window=32, byte_model="late").loglikelihood_rolling(
            requests((TEXT,)))
    finally:
        student_lm.window, teacher_lm.window = old
    assert r["tokens"] > 2 * 31  # several windows, the last one short
    n_bits = r["bytes"] * math.log(2)
    assert -s_ll / n_bits == pytest.approx(r["student_bpb_marginal"], abs=1e-5)
    assert -late_ll / n_bits == pytest.approx(r["student_bpb_late"], abs=1e-5)
    assert -t_ll / n_bits == pytest.approx(r["teacher_bpb"], abs=1e-5)


@pytest.mark.parametrize("byte_model", ["joint", "late", "greedy"])
def test_generate_until_cuts_before_the_first_stop_string(byte_model, student, teacher_and_tok):
    """Two prompts in one batch: each output is the greedy generation of that prompt alone (joint: from the
    heaviest hypothesis of the beam over the prompt), cut before the first occurrence of a stop string; without a
    stop string it runs to 4 bytes per max_gen_toks."""
    student_lm = ev.StudentLM(student, teacher_and_tok[1], batch_size=3, byte_model=byte_model)
    prompts = [b"**MACBETH**  \n", b"If it"]
    full = []
    for p in prompts:
        gen = (decoding.LateFlagGeneration(student_lm.model, [p], 40) if byte_model == "late" else
               conditioning.generation_after(student_lm.model, [p], 40, "joint", 0.0, keep=[ev.token_ends(
                   teacher_and_tok[1], p)]) if byte_model == "joint" else
               decoding.ByteGeneration(student_lm.model, [p], 40, byte_model="greedy"))
        out = bytes(gen.step(0.0)[0].tolist()[0] for _ in range(40))
        full.append(out.split(bytes([model.BOS_BYTE]))[0])  # 0xFE would start a new document: the text ends
    stops = []
    for out in full:
        k = next(i for i in range(3, len(out)) if out[i] < 128 and out.index(out[i]) == i)  # an ASCII byte, first seen at k
        stops.append(out[k:k + 1].decode())
    got = student_lm.generate_until(requests(*[(p.decode(), {"until": stops, "max_gen_toks": 10}) for p in prompts]))
    for out, text in zip(full, got):
        cut = min(out.index(s.encode()) for s in stops if s.encode() in out)
        assert text == out[:cut].decode("utf-8", errors="replace")
    [text] = student_lm.generate_until(requests((prompts[0].decode(), {"until": [], "max_gen_toks": 10})))
    assert text == full[0].decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------------------------
# The teacher

def test_teacher_loglikelihood_equals_token_logprobs(teacher_lm, teacher_and_tok):
    """Pairs whose tokens split cleanly at the seam: the continuation's tokens' log-probabilities from a plain
    forward of [document start] + context + continuation; a trailing space of the context moves to the continuation
    (lm-eval's convention), and an empty context scores everything after the document start."""
    teacher, tok = teacher_and_tok
    pairs = [("If it were done", " when"), ("If it were done ", "when"), ("", "If it were"), ("It were", " done quickly")]
    got = teacher_lm.loglikelihood(requests(*pairs))
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        ctx, cont = (ctx[:-1], " " + cont) if ctx.endswith(" ") else (ctx, cont)
        ctx_ids, cont_ids = tok.encode(ctx), tok.encode(cont)
        assert ctx_ids + cont_ids == tok.encode(ctx + cont)  # the oracle's precondition: a clean seam
        ids = torch.tensor([[tok.doc_start_id, *ctx_ids, *cont_ids]])
        with torch.no_grad():
            logp = torch.log_softmax(teacher(ids)[0, :-1].float(), -1)[len(ctx_ids):]
        target = torch.tensor(cont_ids)
        assert ll == pytest.approx(float(logp.gather(1, target[:, None]).sum()), abs=1e-4)
        assert greedy == bool((logp.argmax(-1) == target).all())


def test_a_shared_context_scores_each_choice_as_alone(student, teacher_lm, teacher_and_tok):
    """Multiple-choice items: the choices share their context's prefill (student: marginal.py copies the prefilled
    rows; teacher: after_contexts copies the context's cache rows), mixed with other items in one batch, and each
    choice scores what it scores as the only request (1e-5)."""
    items = [(TEXT[:70], [" It were", " If it", " but", "\u00e9t\u00e9 done"]), (TEXT[:21], [" done", " when 'tis"]),
             ("", ["If it", "Could"])]
    reqs = requests(*[(ctx, c) for ctx, choices in items for c in choices])
    for lm in (ev.StudentLM(student, teacher_and_tok[1], batch_size=3), teacher_lm):
        together = lm.loglikelihood(reqs)
        for r, (ll, greedy) in zip(reqs, together):
            [(alone, alone_greedy)] = lm.loglikelihood([r])
            assert ll == pytest.approx(alone, abs=1e-5) and greedy == alone_greedy, (type(lm).__name__, r.args)


def test_teacher_generate_until_cuts_before_the_stop_string(teacher_lm, teacher_and_tok):
    """The output is greedy decoding by full forwards (no cache; ids that spell nothing never chosen), cut before the
    stop string, for prompts of different lengths batched together (right-padded in one cache, batch_size 2)."""
    teacher, tok = teacher_and_tok
    prompts = ["**MACBETH**  \nIf it were", "To be", "Tomorrow, and tomorrow, and tomorrow,  \nCreeps in"]
    outs = []
    for prompt in prompts:
        ids, out = [tok.doc_start_id, *tok.encode(prompt)], b""
        with torch.no_grad():
            for _ in range(12):
                logits = teacher(torch.tensor([ids]))[0, -1].masked_fill(teacher_lm.unspellable, float("-inf"))
                ids.append(int(logits.argmax()))
                if ids[-1] in (tok.eos_id, tok.bos_id):
                    break
                out += tok.token_bytes(ids[-1])
        outs.append(out)
    cut = [next(i for i in range(2, len(o)) if o[i] < 128 and o.index(o[i]) == i) for o in outs]
    texts = teacher_lm.generate_until(requests(*[(p, {"until": [o[k:k + 1].decode()], "max_gen_toks": 12})
                                                 for p, o, k in zip(prompts, outs, cut)]))
    assert texts == [o[:k].decode("utf-8", errors="replace") for o, k in zip(outs, cut)]
    texts = teacher_lm.generate_until(requests(*[(p, {"until": [], "max_gen_toks": 12}) for p in prompts]))
    assert texts == [o.decode("utf-8", errors="replace") for o in outs]


# ---------------------------------------------------------------------------------------------------------------
# The local tasks, end to end

def test_task_files_hold_what_they_claim(tmp_path):
    """tasks/build.py is deterministic, and every item is right by construction: the cloze context and answer are the
    play's own text, the distractors differ; the rolling documents are Hamlet, whole and in order; each probe's answer
    follows from its word; the retention tasks: the LAMBADA word ends a speech right after its context, each
    next-line item has one true choice (the line that follows its context in the source) and three that differ
    from it and from each other, of about its length (and, on code, with its indentation)."""
    import data
    build = load_module(os.path.join(TASKS_DIR, "build.py"), "build_for_test")
    counts = build.build(str(tmp_path / "a"))
    build.build(str(tmp_path / "b"))
    files = sorted(os.listdir(tmp_path / "a"))
    assert files == sorted(os.listdir(tmp_path / "b")) and len(files) == len(counts) == 13
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    def read(name):
        with open(tmp_path / "a" / f"{name}.jsonl", encoding="utf-8") as f:
            return [json.loads(line) for line in f]
    plays = "\n".join(open(data.play_path(p), encoding="utf-8").read() for p in data.HELD_OUT_PLAYS)
    for d in read("shakespeare_cloze.test"):
        answer = d["choices"][d["answer"]]
        assert re.search(r"(?:^|\n)" + re.escape(d["context"] + " " + answer) + r"[,.;:!?']*  \n", plays)
        assert len(d["context"]) <= 400 and not d["context"].startswith("\n")  # at most 400 bytes, from a line start
        assert len(set(d["choices"])) == 4 and all(abs(len(c) - len(answer)) <= 2 for c in d["choices"])
    assert "".join(d["text"] for d in read("shakespeare_bpb.test")) == open(data.play_path("hamlet"), encoding="utf-8").read()
    for split in ("test", "train"):
        assert all(d["answer"] == " ".join(d["word"]) for d in read(f"cute_spell.{split}"))
        assert all(d["answer"] == d["word"][::-1] for d in read(f"cute_reverse.{split}"))
        assert all(d["answer"] == str(d["word"].count(d["letter"])) for d in read(f"cute_count.{split}"))
        for d in read(f"cute_contains.{split}"):
            assert [d["letter"] in c for c in d["choices"]] == [i == d["answer"] for i in range(4)]
    lambada = read("lambada_plays.test")
    assert len(lambada) == 500 and len({(d["context"], d["word"]) for d in lambada}) == 500
    for d in lambada:
        assert re.search(r"(?:^|\n)" + re.escape(d["context"] + " " + d["word"]) + r"[.!?]?\n\n", plays)
        assert len(d["context"]) >= 400 and not d["context"].startswith("\n")  # at least 400 bytes, from a line start
    modules = {m: open(data.module_path(m), encoding="utf-8").read() for m in data.HELD_OUT_MODULES}
    for name, source in (("swag_plays", plays), ("code_nextline", "\n".join(modules.values()))):
        items = read(f"{name}.test")
        assert len(items) == 500
        for d in items:
            true = d["choices"][d["answer"]]
            assert (d["context"] + true + "\n") in source or (d["context"] + true + "  \n") in source
            assert len({c.strip() for c in d["choices"]}) == 4 and d["context"].endswith("\n")
            assert not any(d["context"] + c + "\n" in source for c in d["choices"] if c != true)  # one true choice
            assert all(abs(len(c.strip()) - len(true.strip())) <= max(3, len(true.strip()) // 5) for c in d["choices"])
            if name == "code_nextline":
                indent = true[:len(true) - len(true.lstrip())]
                assert all(c[:len(c) - len(c.lstrip())] == indent for c in d["choices"])
    test_words = {d["word"] for d in read("cute_spell.test")}
    assert not test_words & {d["word"] for d in read("cute_spell.train")}  # few-shot examples are other words


def test_model_args_and_the_old_option_name(student, tmp_path):
    """lm-eval's model_args string for the byte student takes eval.py's option names (byte_model=, beam=, ...); the
    old --flags is a clear error that names --byte_model, before anything is loaded."""
    ckpt = str(tmp_path / "ckpt")
    checkpoint.save_student(ckpt, student, {"stage": 2, "teacher": sf.teacher_dir(), "config": {}, "phase": "e2e",
                                       "step": 0, "phase_done": True, "results": {}})
    lm = ev.StudentLM.create_from_arg_string(f"ckpt={ckpt},byte_model=late,beam=2", {"batch_size": 3})
    assert (lm.byte_model, lm.beam, lm.batch_size) == ("late", 2, 3)
    with pytest.raises(ValueError, match="byte_model='marginal': joint, late or greedy"):
        ev.StudentLM.create_from_arg_string(f"ckpt={ckpt},byte_model=marginal")
    with pytest.raises(ValueError, match="--flags is now --byte_model"):
        ev.main(["--flags=marginal", f"--ckpt={ckpt}"])


def test_cli_compare_runs_local_tasks_end_to_end(student, student_lm, teacher_lm, tmp_path, capsys):
    """`eval.py --compare` (its main, in this process) on a saved tiny checkpoint runs lm-eval's simple_evaluate on
    local tasks of the three request types and prints both models side by side; its figures are the adapters' own:
    the cloze accuracy is the argmax of loglikelihood over the choices of the first items, bits_per_byte the rolling
    likelihood of the first documents (checked on the teacher, whose rolling is cheap; the student's is checked
    against bench/fidelity.py above)."""
    ckpt = str(tmp_path / "ckpt")
    checkpoint.save_student(ckpt, student, {"stage": 2, "teacher": sf.teacher_dir(), "config": {}, "phase": "e2e",
                                       "step": 0, "phase_done": True, "results": {}})
    out = tmp_path / "results.json"
    ev.main(["--compare", f"--ckpt={ckpt}", "--tasks=blm_retention,shakespeare_bpb", "--limit=3",
             "--batch_size=4", "--window=64", f"--json={out}"])
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    for task, metric in (("shakespeare_cloze", "acc"), ("shakespeare_bpb", "bits_per_byte"), ("cute_spell", "exact_match"),
                         ("lambada_plays", "perplexity"), ("swag_plays", "acc_norm"), ("code_nextline", "acc")):
        t, s = (results[k]["results"][task][f"{metric},none"] for k in ("teacher", "student"))
        assert f"| {task} | {metric} | {t:.4f} | {s:.4f} |" in printed
    every = ["code_nextline", "cute_contains", "cute_count", "cute_reverse", "cute_spell", "lambada_plays",
             "shakespeare_bpb", "shakespeare_cloze", "swag_plays"]
    assert sorted(results["student"]["seconds"]) == sorted(results["teacher"]["seconds"]) == every
    rows = {(r["task"], r["metric"]): r for r in results["retention"]["rows"]}
    for (task, metric), r in rows.items():
        t, s = (results[k]["results"][task][f"{metric},none"] for k in ("teacher", "student"))
        want = t / s if metric in ("perplexity", "bits_per_byte") else s / t if t else None
        assert (r["teacher"], r["student"]) == (t, s)
        assert r["retention"] == pytest.approx(want) if want is not None else math.isnan(r["retention"])
    mc = ["code_nextline", "cute_contains", "shakespeare_cloze", "swag_plays"]
    assert results["retention"]["mc_tasks"] == mc
    mc_rows = [rows[(task, "acc")]["retention"] for task in mc]
    if all(not math.isnan(x) for x in mc_rows):
        assert results["retention"]["mean_mc_acc"] == pytest.approx(sum(mc_rows) / 4)
    assert "mean retention (acc) over the 4 multiple-choice tasks" in printed
    assert rows[("cute_spell", "exact_match")]["teacher_bpb"] is None  # generation scores no likelihood

    def read(name, n):
        with open(os.path.join(TASKS_DIR, "data", f"{name}.test.jsonl"), encoding="utf-8") as f:
            return [json.loads(line) for line in f][:n]
    cloze = read("shakespeare_cloze", 3)
    for key, lm in (("student", student_lm), ("teacher", teacher_lm)):
        r = results[key]["results"]
        ll = [x for x, _ in lm.loglikelihood(requests(*[(d["context"], " " + c) for d in cloze for c in d["choices"]]))]
        acc = sum(max(range(4), key=lambda j: ll[4 * i + j]) == d["answer"] for i, d in enumerate(cloze)) / 3
        assert r["shakespeare_cloze"]["acc,none"] == pytest.approx(acc)
        gold = [ll[4 * i + d["answer"]] for i, d in enumerate(cloze)]  # the task's own text: the true words
        n_bytes = sum(len((" " + d["choices"][d["answer"]]).encode()) for d in cloze)
        assert rows[("shakespeare_cloze", "acc")][f"{key}_bpb"] == pytest.approx(-sum(gold) / n_bytes / math.log(2))
        assert r["cute_spell"]["exact_match,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
    # the work recorded per task: the teacher's tokens are its contexts (after the document start) once and each
    # choice's tokens after them; the student's main-network rows, prefill and beam
    pairs = [teacher_lm.encode_pair(d["context"], " " + c) for d in cloze for c in d["choices"]]
    tokens = sum(1 + len(pairs[4 * i][0]) for i in range(3)) + sum(len(cont) - 1 for _, cont in pairs)
    assert results["teacher"]["work"]["shakespeare_cloze"] == {"tokens": tokens}
    assert all(results["student"]["work"][task]["context_rows"] > 0 and results["student"]["work"][task]["main_rows"] > 0
               for task in mc)
    floor = load_module(os.path.join(sf.REPO, "bench", "eval_floor.py"), "eval_floor_for_test")
    floor.main([f"--json={out}", "--rows=2", "--length=16"])
    printed = capsys.readouterr().out
    rate = float(re.search(r": ([\d,]+) rows/s", printed).group(1).replace(",", ""))
    work = results["student"]["work"]["shakespeare_cloze"]
    contexts = work.get("prefill_rows", 0) + work["context_rows"]  # a context tail: the bytes before it prefilled
    rows_s = contexts + work["main_rows"]
    line = next(x for x in printed.splitlines() if x.startswith("| shakespeare_cloze |"))
    assert line.startswith(f"| shakespeare_cloze | {tokens:,} | {rows_s:,} ({contexts:,} + {work['main_rows']:,}) | "
                           f"{tokens / rate:,.0f}, {rows_s / rate:,.0f} |")
    docs, old = read("shakespeare_bpb", 3), teacher_lm.window
    teacher_lm.window = 64
    try:
        rolling = teacher_lm.loglikelihood_rolling(requests(*[(d["text"],) for d in docs]))
    finally:
        teacher_lm.window = old
    n_bytes = sum(len(d["text"].encode()) for d in docs)
    assert results["teacher"]["results"]["shakespeare_bpb"]["bits_per_byte,none"] == \
        pytest.approx(-sum(rolling) / n_bytes / math.log(2), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# bench/plot.py

def test_plot_draws_every_phase_from_metrics(tmp_path):
    """The training-curve figure holds one line per (phase, figure) of metrics.jsonl with exactly its points, and the
    validation figures of config.json as markers; the fidelity figure one bar group per text."""
    pytest.importorskip("matplotlib")
    plot = load_module(os.path.join(sf.REPO, "bench", "plot.py"), "plot_for_test")
    run = tmp_path / "stage1"
    run.mkdir()
    rows = [{"phase": "align", "step": s, "rel_mse": 2.0 - 0.1 * s, "cos": 0.1 * s, "grad_norm": 1.0} for s in range(4)]
    rows += [{"phase": "distill", "step": s, "kl": 5.0 - s, "top1": 0.1, "grad_norm": 1.0} for s in range(3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.json").write_text(json.dumps({"results": {"align": {"bytes": 10, "val": {"rel_mse": 1.5}},
                                                             "distill": {"bytes": 10, "val": {"kl": 2.5}}}}))
    fig = plot.training_figure([str(run)])
    lines = {ax.get_title(): {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}
             for ax in fig.axes}
    assert lines["stage1 / align"]["rel_mse"] == ([0, 1, 2, 3], [2.0, 1.9, 1.8, 1.7])
    assert lines["stage1 / distill"]["kl"] == ([0, 1, 2], [5.0, 4.0, 3.0])
    assert lines["stage1 / align"]["val rel_mse"] == ([3], [1.5])
    fidelity = {"texts": {"a": {k: 1.0 + i for i, k in enumerate(plot.FIDELITY_BARS)},
                          "b": {k: 2.0 for k in plot.FIDELITY_BARS}}}
    fig = plot.fidelity_figure(fidelity)
    heights = sorted(round(p.get_height(), 6) for p in fig.axes[0].patches)
    assert heights == sorted([1.0 + i for i in range(len(plot.FIDELITY_BARS))] + [2.0] * len(plot.FIDELITY_BARS))


def test_plot_draws_the_retention_table():
    """retention.png: one bar per accuracy row and model (acc_norm and perplexity rows left out), and one
    student/teacher bar per row, with the multiple-choice mean as a line."""
    pytest.importorskip("matplotlib")
    plot = load_module(os.path.join(sf.REPO, "bench", "plot.py"), "plot_for_test")
    rows = [{"task": t, "metric": m, "teacher": tv, "teacher_se": 0.02, "student": sv, "student_se": 0.02,
             "retention": sv / tv, "retention_se": 0.03} for t, m, tv, sv in
            (("a", "acc", 0.8, 0.6), ("a", "acc_norm", 0.7, 0.7), ("b", "exact_match", 0.5, 0.25),
             ("c", "perplexity", 10.0, 20.0))]
    fig = plot.retention_figure({"retention": {"rows": rows, "mean_mc_acc": 0.75}, "config": {"limit": 20}})
    left, right = fig.axes
    assert sorted(round(p.get_height(), 6) for p in left.patches) == [0.25, 0.5, 0.6, 0.8]
    assert sorted(round(p.get_height(), 6) for p in right.patches) == [0.5, 0.75]
    assert 0.75 in [ln.get_ydata()[0] for ln in right.get_lines()]
