"""The byte student (model.py): causality, padding, cached generation, the wiring of the main network,
byte likelihoods and checkpoint loading.

Oracles: a full forward for every batched or cached path; the teacher's own logits for the main network's wiring;
a naive float64 computation for byte_logprobs. The models are stage_fixtures.py's tiny ones (build_teacher,
build_student): every weight is perturbed after init_weights, so the zero-initialised parts (residual, enc_proj output,
null vector) matter and the identity patcher is not degenerate; the byte blocks' sliding window (8) is shorter than
every sequence, so the window is exercised."""
import json
import pickle
from dataclasses import asdict

import pytest
import torch

from checkpoint import load_student, save_student
from decoding import ByteGeneration
from model import BOS_BYTE, ByteLM, StudentConfig, byte_logprobs, patch_order
from safetensors_io import write_safetensors
from stage_fixtures import SCFG, TCFG, build_student, build_teacher, max_diff, random_bytes, random_ends
from transformer import sample_from_logits

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
T = 40  # bytes per test sequence: five times the sliding window


@pytest.fixture(scope="module")
def teacher():
    return build_teacher()


@pytest.fixture(scope="module")
def student(teacher):
    return build_student(teacher)


def test_fixture_is_not_degenerate(student):
    """The tests below only mean something if the patcher makes mixed decisions and the zero-initialised parts are
    live: check that once."""
    x = random_bytes((4, T), seed=0)
    with torch.no_grad():
        logits, p, ends = student(x)
    rate = ends[:, :-1].float().mean().item()
    assert 0.15 < rate < 0.85, rate
    assert bool(ends[:, -1].all())  # the last byte always closes a patch
    assert logits.shape == (4, T, 512) and logits.std() > 0.1
    # the parts that init_weights zeroes (and the second byte embedding) are live: zeroing each changes the logits of
    # the bytes before the first patch
    ends = random_ends((4, T), seed=1)
    ends[:, :5] = False
    with torch.no_grad():
        base, _, _ = student(x, ends=ends)
        for part in (student.residual.weight, student.enc_proj.out.weight, student.null_patch,
                     student.byte_embed_dec.weight):
            saved = part.clone()
            part.zero_()
            changed, _, _ = student(x, ends=ends)
            part.copy_(saved)
            assert max_diff(changed[:, :5], base[:, :5]) > 1e-3


# -- causality ----------------------------------------------------------------------------------------------------

def changed_after(x, t, seed):
    """x with every byte after position t replaced by different random bytes."""
    y = x.clone()
    new = torch.randint(1, 256, x[:, t + 1:].shape, generator=torch.Generator().manual_seed(seed))
    y[:, t + 1:] = (x[:, t + 1:] + new) % 256  # never equal to the old byte
    return y


@pytest.mark.parametrize("t", [0, 3, 8, 17, T - 2])
def test_causal_with_given_patches(student, t):
    """Ground-truth patches: with ends[:t+1] kept, changing bytes t+1.. (and the ends after t) changes nothing at
    positions <= t: not the encoder states h, not the main network's output for patches ending <= t, not the logits."""
    x = random_bytes((2, T), seed=10 + t)
    ends = random_ends((2, T), seed=20 + t)
    x2 = changed_after(x, t, seed=30 + t)
    ends2 = ends.clone()
    ends2[:, t + 1:] = random_ends((2, T), seed=40 + t)[:, t + 1:]
    with torch.no_grad():
        logits, _, _ = student(x, ends=ends)
        logits2, _, _ = student(x2, ends=ends2)
        h, h2 = student.encode(x), student.encode(x2)
        y, mask = student.run_main(h, ends)
        y2, mask2 = student.run_main(h2, ends2)
    assert max_diff(h[:, :t + 1], h2[:, :t + 1]) < 1e-6
    assert max_diff(logits[:, :t + 1], logits2[:, :t + 1]) < 1e-5
    for b in range(2):
        n = int(ends[b, :t + 1].sum())  # patches that end at or before t
        assert max_diff(y[b, :n], y2[b, :n]) < 1e-5
    # ... and the change is visible right after t (the test can see a leak in the other direction)
    assert max_diff(h[:, t + 1], h2[:, t + 1]) > 1e-3
    assert max_diff(logits[:, t + 1], logits2[:, t + 1]) > 1e-3


def test_causal_with_patcher_patches(student):
    """Patches from the patcher (ends=None). p_t looks at h_t and h_{t+1}, so the boundary flag b_t depends on bytes
    <= t+1. Exactly what that allows, when bytes t+1.. change:
    (a) logits at positions <= t-1 and (c) p at positions <= t-1 never change;
    (b) the logits at t change only through b_t: unchanged if b_t is unchanged; changed (in general) if b_t flips."""
    x = random_bytes((1, T), seed=5)
    with torch.no_grad():
        logits, p, ends = student(x)
    seen_same = seen_flip = 0
    for t in range(1, T - 2):
        for trial in range(12):
            x2 = changed_after(x, t, seed=1000 * t + trial)
            with torch.no_grad():
                logits2, p2, ends2 = student(x2)
            assert max_diff(logits[:, :t], logits2[:, :t]) < 1e-5  # (a)
            assert max_diff(p[:, :t], p2[:, :t]) < 1e-6  # (c)
            assert torch.equal(ends[:, :t], ends2[:, :t])
            if bool(ends[0, t] == ends2[0, t]):  # (b) b_t kept: the logits at t are unchanged
                assert max_diff(logits[:, t], logits2[:, t]) < 1e-5
                seen_same += 1
            else:  # (b) b_t flipped: the byte at t now reads a different patch, and its logits show it
                assert max_diff(logits[:, t], logits2[:, t]) > 1e-3
                seen_flip += 1
    assert seen_same > 20 and seen_flip > 20, (seen_same, seen_flip)  # both cases were really exercised


def test_patcher_rule(student):
    """p_t = (1 - cos(W_q h_t, W_k h_{t+1})) / 2, the last byte forced to 1; b_t = p_t > threshold."""
    x = random_bytes((2, T), seed=6)
    with torch.no_grad():
        h = student.encode(x)
        _, p, ends = student(x)
    q, k = h[:, :-1] @ student.patcher_q.weight.T, h[:, 1:] @ student.patcher_k.weight.T
    cos = (q * k).sum(-1) / (q.norm(dim=-1) * k.norm(dim=-1))
    assert max_diff(p[:, :-1], (1 - cos) / 2) < 1e-5
    assert bool((p[:, -1] == 1).all())
    assert torch.equal(ends, p > SCFG.boundary_threshold)


# -- padding and batching -----------------------------------------------------------------------------------------

def test_patch_order():
    ends = torch.tensor([[1, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 1]], dtype=torch.bool)
    order, mask = patch_order(ends)
    assert order.shape == (3, 3)
    assert order[0].tolist() == [0, 3, 4] and order[2, :2].tolist() == [1, 5]
    assert mask.tolist() == [[True, True, True], [False, False, False], [True, True, False]]
    order, mask = patch_order(torch.zeros(2, 4, dtype=torch.bool))
    assert order.shape == (2, 1) and not bool(mask.any())


@pytest.mark.parametrize("given", [False, True])
def test_batch_rows_equal_single_rows(student, given):
    """A batch whose rows hold very different numbers of patches (1 up to T) gives, per row, the logits of that row
    run alone: nothing leaks between rows or from the padding patches."""
    x = random_bytes((4, T), seed=7)
    if given:
        ends = random_ends((4, T), seed=8)
        ends[1] = False
        ends[1, 0] = True  # one patch only
        ends[2] = True  # a patch per byte
        ends[3, 1:] = random_ends((T - 1,), seed=9, rate=0.1)
    else:
        ends = None
    with torch.no_grad():
        logits, p, used = student(x, ends=ends)
        counts = used.sum(1).tolist()
        assert len(set(counts)) == 4, counts
        for b in range(4):
            row_logits, row_p, row_used = student(x[b:b + 1], ends=None if ends is None else ends[b:b + 1])
            assert torch.equal(row_used, used[b:b + 1])
            assert max_diff(row_logits, logits[b:b + 1]) < 1e-5
            assert max_diff(row_p, p[b:b + 1]) < 1e-5


# -- cached generation --------------------------------------------------------------------------------------------

PROMPTS = [b"", b"Hello", b"To be, or not to be: that is the question"]  # the last is longer than the window


def test_generation_equals_full_forward(student):
    """Prefill + N sampled bytes (temperature 1, seeded): every logit the generator produced (prefill positions
    0..len-2, and each step's) equals a full forward over the same bytes with the boundaries the generator used.
    The boundaries themselves: the patcher's decisions on the prompt for all prompt bytes but the last; the head's
    more likely e for the last prompt byte (a lone BOS is its own patch); then the e half of each sampled index."""
    n_new = 24
    gen = ByteGeneration(student, PROMPTS, n_new, byte_model="joint")
    g = torch.Generator().manual_seed(3)
    step_logits, step_ends = [], []
    for _ in range(n_new):
        g_copy = torch.Generator().set_state(g.get_state())
        new, logits = gen.step(1.0, None, None, g)
        index = sample_from_logits(logits, 1.0, None, None, g_copy)[:, 0]  # replay the draw to see its e half
        assert torch.equal(index % 256, new)
        step_logits.append(logits)
        step_ends.append(index >= 256)
    step_logits = torch.stack(step_logits, dim=1)  # (B, n_new, 512)
    for i, prompt in enumerate(PROMPTS):
        n = int(gen.state.lens[i])
        L = len(prompt) + 1
        assert n == L + n_new
        x_row, ends_row = gen.state.x[i:i + 1, :n], gen.state.ends[i:i + 1, :n]
        assert x_row[0, :L].tolist() == [BOS_BYTE] + list(prompt)
        with torch.no_grad():
            full, _, _ = student(x_row, ends=ends_row)
            _, _, patcher_ends = student(x_row[:, :L])
        assert gen.prefill_logits[i].shape == (L - 1, 512)
        assert max_diff(gen.prefill_logits[i], full[0, :L - 1]) < 1e-5
        assert max_diff(step_logits[i], full[0, L - 1:n - 1]) < 1e-5
        # boundaries: patcher on the prompt (one-byte lookahead inside the prompt) ...
        assert torch.equal(ends_row[0, :L - 1], patcher_ends[0, :L - 1])
        # ... the last prompt byte from the head's prediction at the position before ...
        if L == 1:
            assert bool(ends_row[0, 0])
        else:
            prev, last = gen.prefill_logits[i][-1], int(x_row[0, L - 1])
            assert bool(ends_row[0, L - 1]) == bool(prev[last + 256] > prev[last])
        # ... and each generated byte's flag = the e half of the index it was sampled from (the newest byte's flag
        # is still pending)
        assert ends_row[0, L:n - 1].tolist() == [bool(e[i]) for e in step_ends[:-1]]
        assert bool(gen.state.pending[i]) == bool(step_ends[-1][i])
        # the main network ran once per closed patch; the encoder once per byte; the decoder once per scored byte
        assert int(gen.state.main.pos[i]) == int(ends_row.sum())
        assert int(gen.state.enc.pos[i]) == n and int(gen.state.dec.pos[i]) == n - 1
    mixed = float(gen.state.ends[:, :int(gen.state.lens.min()) - 1].float().mean())
    assert 0 < mixed < 1  # mixed boundaries were exercised


def test_generation_main_network_runs_only_for_closing_bytes(student, monkeypatch):
    """Batch of one: the main network is called once in prefill and then once for each byte that closes a patch."""
    calls = []
    run_blocks = student.main.run_blocks
    monkeypatch.setattr(student.main, "run_blocks", lambda *a, **k: calls.append(a[0].shape[1]) or run_blocks(*a, **k))
    gen = ByteGeneration(student, [b"abcdefgh"], 30)
    g = torch.Generator().manual_seed(4)
    for _ in range(30):
        gen.step(1.0, None, None, g)
    n, L = int(gen.state.lens[0]), 9
    closed = int(gen.state.ends[0, L - 1:n].sum())  # flags decided during the steps (from the last prompt byte on)
    assert 0 < closed < n - L + 1
    assert calls == [max(int(gen.state.ends[0, :L - 1].sum()), 1)] + [1] * closed


def test_generation_stops_rows_at_bos(teacher):
    """A sampled 0xFE (BOS) would start a new document: the row is marked done. A head that always says BOS forces it."""
    student = build_student(teacher, seed=2)
    gen = ByteGeneration(student, [b"ab", b"c"], 3)
    with torch.no_grad():
        student.head.weight.zero_()
        bias = torch.full((512,), -1e4)
        bias[BOS_BYTE] = 0.0
        student.head.bias = torch.nn.Parameter(bias)
    new, _ = gen.step(1.0, None, None, torch.Generator().manual_seed(0))
    assert new.tolist() == [BOS_BYTE, BOS_BYTE] and bool(gen.done.all())


def test_greedy_picks_the_likeliest_byte_not_the_likeliest_pair(teacher):
    """temperature 0: the byte of largest p(v) = p(v, e=0) + p(v, e=1), then the likelier flag for it. The head below
    gives 'A' the largest single entry, but 'B' more probability over both halves."""
    student = build_student(teacher, seed=2)
    gen = ByteGeneration(student, [b"ab", b"c"], 3)
    with torch.no_grad():
        student.head.weight.zero_()
        bias = torch.full((512,), -30.0)
        bias[ord("A")] = 1.0                       # the largest joint entry: (A, no end)
        bias[ord("B")], bias[ord("B") + 256] = 0.9, 0.95  # B: 2x the mass of A; (B, end) the likelier half
        student.head.bias = torch.nn.Parameter(bias)
    new, logits = gen.step(0.0)
    assert new.tolist() == [ord("B"), ord("B")]
    assert torch.equal(new, byte_logprobs(logits).argmax(-1))
    assert gen.state.pending.tolist() == [True, True]


# -- the main network's wiring ------------------------------------------------------------------------------------

def test_wiring_oracle_matches_teacher(teacher):
    """A freshly built student (main network = the teacher's blocks), its encoder replaced by an exact oracle: h = 0
    except at token-end bytes, where it is the teacher's embedding row of that token. Then run_main + the teacher's
    head must give the teacher's own logits for the token ids, row by row, with different token counts per row."""
    student = ByteLM(SCFG, TCFG).init_weights(teacher).eval()
    ends = random_ends((3, T), seed=11, rate=0.3)
    ends[1, 10:] = False  # fewer tokens in row 1
    ends[2, 1:] = True  # one token per byte in row 2
    g = torch.Generator().manual_seed(12)
    token_ids = torch.randint(0, TCFG.vocab_size, (3, T), generator=g)
    h = torch.zeros(3, T, TCFG.d_model)
    h[ends] = teacher.embed_tokens.weight[token_ids[ends]]
    with torch.no_grad():
        y, mask = student.run_main(h, ends)
        got = teacher.logits(y[mask])  # (total tokens, V), rows in order
        want = torch.cat([teacher(token_ids[b][ends[b]][None])[0] for b in range(3)])
    assert len(set(ends.sum(1).tolist())) == 3
    assert got.shape == want.shape and want.abs().max() > 1.0
    assert max_diff(got, want) < 1e-5


# -- byte likelihood ----------------------------------------------------------------------------------------------

def test_byte_logprobs():
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(3, 5, 512, generator=g) * torch.tensor([1.0, 10.0, 100.0])[:, None, None]  # up to extreme
    logp = byte_logprobs(logits)
    assert logp.shape == (3, 5, 256) and logp.dtype == torch.float32
    assert max_diff(logp.exp().sum(-1), torch.ones(3, 5)) < 1e-5
    prob = torch.softmax(logits.double(), dim=-1)
    naive = torch.log(prob[..., :256] + prob[..., 256:])
    finite = naive.isfinite()
    assert bool(finite[:2].all())
    assert torch.allclose(logp.double()[finite], naive[finite], rtol=1e-5, atol=1e-5)
    assert bool(logp.isfinite().all())  # no -inf even where float64 underflows


def test_byte_logprobs_sums_both_halves():
    """A byte that is likely only as 'ends a patch' must still be likely (not max-then-softmax, not one half)."""
    logits = torch.full((512,), -30.0)
    logits[ord("a") + 256] = 5.0
    logits[ord("b")] = 5.0
    logits[ord("b") + 256] = 5.0
    logp = byte_logprobs(logits)
    assert abs(logp[ord("a")].exp().item() - 1 / 3) < 1e-5
    assert abs(logp[ord("b")].exp().item() - 2 / 3) < 1e-5


# -- checkpoints --------------------------------------------------------------------------------------------------

META = {"stage": 1, "config": {"lr": 1e-3}, "teacher": "/no/such/teacher", "phase": "align", "step": 5,
        "phase_done": True, "results": {}}


def save_ckpt(folder, student, **changes):
    """A byte-model folder of `student` (save_student), then config.json's fields changed (None deletes one) and,
    with weights=, model.safetensors rewritten with those tensors (under the same save_id)."""
    weights = changes.pop("weights", None)
    save_student(str(folder), student, META)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config = {k: v for k, v in {**config, **changes}.items() if v is not None}
    path.write_text(json.dumps(config))
    if weights is not None:
        write_safetensors(weights, str(folder / "model.safetensors"), {"save_id": config["save_id"]})
    return folder


def test_load_student_round_trip(student, tmp_path):
    path = save_ckpt(tmp_path / "s", student)
    loaded, meta = load_student(str(path))
    assert not loaded.training
    assert meta["teacher"] == "/no/such/teacher" and meta["step"] == 5 and "model" not in meta
    assert loaded.scfg == SCFG and loaded.tcfg == TCFG
    x = random_bytes((2, T), seed=14)
    with torch.no_grad():
        a, pa, ea = student(x)
        b, pb, eb = loaded(x)
    assert torch.equal(a, b) and torch.equal(pa, pb) and torch.equal(ea, eb)
    gen_a, gen_b = ByteGeneration(student, [b"hi"], 5), ByteGeneration(loaded, [b"hi"], 5)
    for _ in range(5):
        na, la = gen_a.step(1.0, None, None, torch.Generator().manual_seed(0))
        nb, lb = gen_b.step(1.0, None, None, torch.Generator().manual_seed(0))
        assert torch.equal(na, nb) and torch.equal(la, lb)


def test_load_student_errors(student, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_student(str(tmp_path / "missing"))
    for name, content in [("text.pt", b"this is not a checkpoint\n"), ("empty.pt", b""),
                          ("zip.pt", b"PK\x03\x04" + b"\0" * 40), ("list.pt", pickle.dumps([1, 2, 3]))]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match="not a byte-student checkpoint"):
            load_student(str(tmp_path / name))
    no_weights = save_ckpt(tmp_path / "nomodel", student)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_student(str(no_weights))
    with pytest.raises(ValueError, match="not a byte-student checkpoint"):
        load_student(str(save_ckpt(tmp_path / "nocfg", student, student_config=None)))
    with pytest.raises(ValueError, match="not a byte-student checkpoint"):
        load_student(str(save_ckpt(tmp_path / "badcfg", student,
                                   student_config={**asdict(SCFG), "no_such_field": 1})))
    state = dict(student.state_dict())
    del state["head.weight"]
    with pytest.raises(ValueError, match="do not fit"):
        load_student(str(save_ckpt(tmp_path / "missingkey", student, weights=state)))
    with pytest.raises(ValueError, match="do not fit"):
        load_student(str(save_ckpt(tmp_path / "wrongsize", student,
                                   student_config=asdict(StudentConfig(d_local=64, n_local_heads=2, proj_hidden=64)))))
