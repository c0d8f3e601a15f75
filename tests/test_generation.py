"""Batched generation steps the main network per row (ByteGeneration, KVCache.select).

Oracles: each prompt generated alone (a batch of one) for the batched generator; the teacher's full forward of each
row's own sequence for a cache stepped through row subsets; the bytes whose flags close a patch, for the rows the
main network is handed. Rows are deterministic (temperature 0, or teacher-forced bytes) so that a batch and its rows
alone can be compared step by step. That comparison runs in fp64: in fp32 the two differ by up to ~1e-5 on these
sensitive random weights from rounding alone (different kernel shapes and cache lengths; 2e-5 with the attention written
out that SDPA replaced); in fp64 they agree to ~1e-15, so any leak between rows would stand out."""
import pytest
import torch

from decoding import ByteGeneration
from test_student import build_student, build_teacher, max_diff

PROMPTS = [b"", b"Hi", b"To be, or not to be: that is", b"\xc3\xa9t\xc3\xa9"]  # lengths 0..29, one past the window
N_NEW = 24


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny matmuls on one thread


@pytest.fixture(scope="module")
def teacher():
    return build_teacher()


@pytest.fixture(scope="module")
def student(teacher):
    return build_student(teacher)


@pytest.fixture(scope="module")
def student64(teacher):
    return build_student(teacher).double()


def forced_bytes(seed):
    return torch.randint(0, 256, (len(PROMPTS), N_NEW), generator=torch.Generator().manual_seed(seed))


def run(student, prompts, forced=None):
    """N_NEW steps, greedy or teacher-forced -> (generator, logits (B, N_NEW, 512), flags that closed (B, N_NEW))."""
    gen = ByteGeneration(student, prompts, N_NEW)
    logits, closed = [], []
    for t in range(N_NEW):
        closed.append(gen.state.pending.clone())
        _, step_logits = gen.step(0.0, force=None if forced is None else forced[:, t])
        logits.append(step_logits)
    return gen, torch.stack(logits, 1), torch.stack(closed, 1)


@pytest.mark.parametrize("forced", [False, True])
def test_batch_equals_each_row_alone(student64, forced):
    """Prompts of different lengths in one batch, whose rows close patches at different steps: every logit (prefill
    and each step), byte and boundary equals that prompt generated alone."""
    x = forced_bytes(5) if forced else None
    gen, logits, closed = run(student64, PROMPTS, x)
    mixed = closed.any(0) & ~closed.all(0)
    assert int(mixed.sum()) >= N_NEW // 4, closed  # many steps where only some rows step the main network
    for i, prompt in enumerate(PROMPTS):
        alone, row_logits, row_closed = run(student64, [prompt], None if x is None else x[i:i + 1])
        n = int(alone.state.lens[0])
        assert int(gen.state.lens[i]) == n
        assert torch.equal(gen.state.x[i, :n], alone.state.x[0, :n])
        assert torch.equal(gen.state.ends[i, :n], alone.state.ends[0, :n])
        assert torch.equal(closed[i], row_closed[0])
        assert max_diff(gen.prefill_logits[i], alone.prefill_logits[0]) < 1e-10
        assert max_diff(logits[i], row_logits[0]) < 1e-10
        assert int(gen.state.main.pos[i]) == int(alone.state.main.pos[0]) == int(gen.state.ends[i, :n].sum())


def test_main_network_gets_exactly_the_closing_rows(student, monkeypatch):
    """At each step the main network is handed the newest byte states of exactly the rows whose flag closes a patch
    (none when no row closes), and the other rows' main-network cache entries and positions stay as they were."""
    gen = ByteGeneration(student, PROMPTS, N_NEW)
    calls = []
    run_blocks = student.main.run_blocks
    monkeypatch.setattr(student.main, "run_blocks", lambda x, **k: calls.append(x.clone()) or run_blocks(x, **k))
    x = forced_bytes(6)
    sizes = []
    for t in range(N_NEW):
        closing = gen.state.pending.clone()
        want = gen.state.h[closing].clone()
        pos, keys = gen.state.main.pos.clone(), [k.clone() for k in gen.state.main.k]
        calls.clear()
        gen.step(force=x[:, t])
        if not closing.any():
            assert calls == []
            continue
        [got] = calls
        assert got.shape == (int(closing.sum()), 1, want.shape[-1]) and torch.equal(got[:, 0], want)
        assert gen.state.main.pos.tolist() == (pos + closing.long()).tolist()
        for before, after in zip(keys, gen.state.main.k):
            assert torch.equal(before[~closing], after[~closing])
        sizes.append(len(got))
    assert len(set(sizes)) > 1 and min(sizes) < len(PROMPTS)  # subsets of several sizes were exercised


def test_cache_stepped_through_row_subsets_equals_full_forward(teacher):
    """The teacher with one KVCache: a right-padded prefill, then steps on random subsets of the rows (select), on
    all rows, and on one row: each row's logits equal the full forward of that row's own token sequence."""
    g = torch.Generator().manual_seed(7)
    lens = [5, 2, 7, 3]
    seqs = [torch.randint(0, teacher.cfg.vocab_size, (n,), generator=g).tolist() for n in lens]
    padded = torch.zeros(len(seqs), max(lens), dtype=torch.long)
    for b, s in enumerate(seqs):
        padded[b, :len(s)] = torch.tensor(s)
    subsets = [[0, 2], [1], [0, 1, 2, 3], [3, 1], [2], [0, 3], [0, 1, 2, 3], [1, 2, 3]]
    with torch.no_grad():
        cache = teacher.new_cache(len(seqs), 16)
        teacher(padded, cache=cache, advance=torch.tensor(lens))
        for rows in subsets:
            tokens = torch.randint(0, teacher.cfg.vocab_size, (len(rows), 1), generator=g)
            step = cache if len(rows) == len(seqs) else cache.select(torch.tensor(rows))
            logits = teacher(tokens, cache=step)[:, 0]
            for r, b in enumerate(rows):
                seqs[b].append(int(tokens[r]))
                want = teacher(torch.tensor([seqs[b]]))[0, -1]
                assert max_diff(logits[r], want) < 1e-5, (rows, b)
        assert cache.pos.tolist() == [len(s) for s in seqs]


# -- rows out of step (ByteGeneration.run) ---------------------------------------------------------------------

def run_out_of_step(student, prompts, forced=None, wait=1.0):
    """ByteGeneration.run over N_NEW bytes -> (generator, logits (B, N_NEW, 512) by each row's own byte index)."""
    gen = ByteGeneration(student, prompts, N_NEW)
    logits = torch.zeros(len(prompts), N_NEW, 512, dtype=gen.state.y.dtype)
    seen = torch.zeros(len(prompts), N_NEW, dtype=torch.long)
    for rows, offsets, _, step_logits in gen.run(N_NEW, temperature=0.0, force=forced, wait=wait):
        logits[rows, offsets] = step_logits
        seen[rows, offsets] += 1
    assert bool((seen == 1).all())  # every row made each of its bytes exactly once
    return gen, logits


@pytest.mark.parametrize("wait", [1.0, 0.5])
@pytest.mark.parametrize("forced", [False, True])
def test_rows_out_of_step_equal_lockstep(student64, forced, wait):
    """run() lets rows wait for the main network while others go on: each row's bytes, boundaries, prefill and step
    logits and main-network positions equal lockstep step() (which equals each row alone, above), fp64."""
    x = forced_bytes(8) if forced else None
    lock, lock_logits, _ = run(student64, PROMPTS, x)
    gen, logits = run_out_of_step(student64, PROMPTS, x, wait)
    assert gen.state.lens.tolist() == lock.state.lens.tolist()
    for i in range(len(PROMPTS)):
        n = int(gen.state.lens[i])
        assert torch.equal(gen.state.x[i, :n], lock.state.x[i, :n])
        assert torch.equal(gen.state.ends[i, :n], lock.state.ends[i, :n])
        assert max_diff(logits[i], lock_logits[i]) < 1e-10
    assert torch.equal(gen.state.pending, lock.state.pending)
    assert gen.state.main.pos.tolist() == lock.state.main.pos.tolist()


def count_main_calls(student, monkeypatch, drive):
    """-> the row counts handed to the main network while drive() runs (prefill excluded by the caller)."""
    sizes = []
    run_blocks = student.main.run_blocks
    monkeypatch.setattr(student.main, "run_blocks", lambda x, **k: sizes.append(len(x)) or run_blocks(x, **k))
    drive()
    monkeypatch.setattr(student.main, "run_blocks", run_blocks)
    return sizes


def test_run_hands_the_main_network_exactly_the_waiting_rows(student, monkeypatch):
    """With wait=1.0 the main network runs only when no live row can make a byte, on exactly the rows waiting (their
    newest byte states); the other rows' main-network entries do not move. It runs fewer times than in lockstep."""
    x = forced_bytes(9)
    gen = ByteGeneration(student, PROMPTS, N_NEW)
    checked = []
    close = gen.close_patches

    def checked_close(rows):
        live = gen.live & (gen.state.lens - start < N_NEW)
        assert torch.equal(rows, (live & gen.waiting).nonzero()[:, 0])
        assert not bool((live & ~gen.waiting).any())  # nobody could go on
        want, pos = gen.state.h[rows].clone(), gen.state.main.pos.clone()
        keys = [k.clone() for k in gen.state.main.k]
        sizes = count_main_calls(student, monkeypatch, lambda: close(rows))
        assert sizes == [len(rows)] and torch.equal(want, gen.state.h[rows])
        others = torch.ones(len(PROMPTS), dtype=torch.bool)
        others[rows] = False
        assert gen.state.main.pos.tolist() == (pos + (~others).long()).tolist()
        for before, after in zip(keys, gen.state.main.k):
            assert torch.equal(before[others], after[others])
        checked.append(len(rows))

    start = gen.state.lens.clone()
    gen.close_patches = checked_close
    for _ in gen.run(N_NEW, force=x):
        pass
    lock = ByteGeneration(student, PROMPTS, N_NEW)
    lock_sizes = count_main_calls(student, monkeypatch, lambda: [lock.step(force=x[:, t]) for t in range(N_NEW)])
    assert sum(checked) == sum(lock_sizes) and gen.state.main.pos.tolist() == lock.state.main.pos.tolist()
    assert len(checked) < len(lock_sizes) and max(checked) > 1  # fewer calls, with several rows each


def test_run_with_sampling_equals_the_full_forward(student64):
    """Sampled bytes (temperature 1, seeded), rows out of step: every logit equals a full forward of that row's bytes
    with the boundaries the generator used; clearing live stops a row where it is; n per row."""
    n = torch.tensor([N_NEW, 5, N_NEW, 12])
    gen = ByteGeneration(student64, PROMPTS, N_NEW)
    logits = torch.zeros(len(PROMPTS), N_NEW, 512, dtype=torch.float64)
    for rows, offsets, new, step_logits in gen.run(n, 1.0, None, None, torch.Generator().manual_seed(2)):
        logits[rows, offsets] = step_logits
        if 2 in rows.tolist() and int(offsets[rows.tolist().index(2)]) == 7:
            gen.live[2] = False  # row 2 stops after its 8th byte
    made = (gen.state.lens - torch.tensor([len(p) + 1 for p in PROMPTS])).tolist()
    assert made == [N_NEW, 5, 8, 12]
    for i, prompt in enumerate(PROMPTS):
        L, total = len(prompt) + 1, int(gen.state.lens[i])
        with torch.no_grad():
            full, _, _ = student64(gen.state.x[i:i + 1, :total], ends=gen.state.ends[i:i + 1, :total])
        assert max_diff(gen.prefill_logits[i], full[0, :L - 1]) < 1e-10
        assert max_diff(logits[i, :made[i]], full[0, L - 1:total - 1]) < 1e-10


def test_sliding_window_steps_read_only_the_window(student64):
    """A byte block's cached step attends over the keys some row's window still holds, not the whole history: past
    the window, a step of a lone row reads exactly `local_window` keys (the logits equal the full forward, above)."""
    window = student64.scfg.local_window
    gen = ByteGeneration(student64, [b"x" * (3 * window)], N_NEW)
    seen = []
    write = gen.state.dec.write

    def counted(layer, k, v, w=None):
        keys, values = write(layer, k, v, w)
        seen.append(keys.shape[2])
        return keys, values

    gen.state.dec.write = counted
    for _ in range(4):
        gen.step(0.0)
    assert seen and set(seen) == {window}
