"""The byte-head prior (model.py: log_prior): the main network's output through the teacher's output layer, turned
into a 512-way distribution for every byte of a patch by the exact-target rule (targets.py).

Oracles: targets.exact_byte_targets on the teacher's own output layer and token ids (an independent path: the trie
nodes come from the token ids, not from walking the bytes) for "a zero learned part reproduces the exact targets";
a full forward for cached generation; the saved folder loaded back for the round trip."""
import random

import pytest
import torch

from checkpoint import load_student, save_student
from decoding import ByteGeneration
from model import ByteLM, StudentConfig, prior_vocabulary
from targets import ByteTrie, exact_byte_targets, next_token_nodes, patch_prefix_nodes, patch_prefix_nodes_reference
from test_student import TCFG, build_teacher, max_diff

ALPHABET = b"acdehinorst .,"


def vocabulary():
    """97 ids (the tiny teacher's vocabulary): ids 0 and 1 spell nothing (special tokens), then the alphabet's
    single bytes, then words and word pieces that share prefixes ("th", "the", "then", ...) and one duplicate."""
    words = [b"th", b"the", b"then", b"there", b"he", b"her", b"here", b"in", b"ing", b"on", b"one", b"or", b"ore",
             b"st", b"sto", b"stone", b"to", b"a ", b" a", b" the", b" then", b"is", b" is", b"it", b"nd", b"and",
             b" and", b"es", b"est", b"re", b"ri", b"rin", b"ring", b"do", b"don", b"done", b"no", b"not", b"note",
             b"to", b"ch", b"cha", b"chair", b"e.", b", ", b"s.", b"r ", b"ss", b"tt", b"oo", b"ee", b"ea", b"eat",
             b"at", b"ate", b"ha", b"hat", b"hate", b"ai", b"air", b"sa", b"sai", b"said", b"ti", b"tio", b"tion",
             b"on.", b" t", b" s", b" d", b" h", b" o", b" n", b" r", b" c", b" e", b" i", b" ea", b"ter", b"ten", b"sh"]
    out = [b"", b""] + [bytes([v]) for v in ALPHABET] + words
    assert len(out) == TCFG.vocab_size, len(out)
    return out


def tokenize(n_tokens, seed):
    """A random token sequence -> (bytes (T,), token_end (T,), token_id (T,), -1 off the ends)."""
    vocab, rng = vocabulary(), random.Random(seed)
    ids = [rng.randrange(2, len(vocab)) for _ in range(n_tokens)]
    x, ends, token_id = [], [], []
    for w in ids:
        x += list(vocab[w])
        ends += [False] * (len(vocab[w]) - 1) + [True]
        token_id += [-1] * (len(vocab[w]) - 1) + [w]
    return torch.tensor(x), torch.tensor(ends), torch.tensor(token_id)


def prior_student(teacher, floor=1e-5, seed=1):
    entries, _ = prior_vocabulary(vocabulary())
    scfg = StudentConfig(d_local=32, n_local_heads=2, proj_hidden=64, local_window=8, prior_vocab=len(entries),
                         prior_bytes=sum(map(len, entries)), prior_floor=floor)
    torch.manual_seed(seed)
    student = ByteLM(scfg, TCFG).init_weights(teacher).attach_prior(teacher.head_weight, vocabulary())
    return perturbed(student, seed).eval()


@torch.no_grad()
def perturbed(student, seed):
    """Every parameter moved off its initialisation, so that no part is zero or exact (as test_student.build_student)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in student.named_parameters():
        matrix = p.dim() == 2 and p.shape[0] != 256
        p.add_((1.0 / p.shape[1] ** 0.5 if matrix else 0.1) * torch.randn(p.shape, generator=g))
    return student


@pytest.fixture(scope="module")
def teacher():
    return build_teacher()


@pytest.fixture(scope="module")
def student(teacher):
    return prior_student(teacher)


def test_trie_walk_matches_the_token_ids():
    """patch_prefix_nodes, walking the bytes, lands where next_token_nodes, reading the token ids, says."""
    trie = ByteTrie(vocabulary())
    x, ends, ids = tokenize(60, seed=0)
    walked = patch_prefix_nodes(trie, x[None], ends[None])[0]
    _, nodes, has = next_token_nodes(trie, ends[None], ids[None])
    assert int(has.sum()) > 100
    assert torch.equal(walked[has[0]], nodes[0][has[0]])
    assert bool((walked[: int(ends.nonzero()[0])] == -1).all())  # before the first end: no patch
    off = patch_prefix_nodes(trie, torch.tensor([[ord("t"), ord("h"), ord("x")]]), torch.tensor([[True, False, False]]))
    assert off.tolist() == [[0, trie.child(0, ord("h")), -1]]  # "hx" starts no entry


def test_walk_over_offsets_equals_the_byte_recurrence():
    """patch_prefix_nodes (a loop over the offset within a patch, bounded by the longest entry) equals the per-byte
    recurrence on: token bytes with every end, the same with most ends dropped (patches longer than the longest
    entry), random bytes with some off the vocabulary (walks that die), a row with no end; and on short prefixes."""
    trie = ByteTrie(vocabulary())
    g = torch.Generator().manual_seed(0)
    x, ends, _ = tokenize(80, seed=7)
    T = len(x)
    noise = torch.tensor(list(ALPHABET + b"xyz"))[torch.randint(len(ALPHABET) + 3, (T,), generator=g)]
    longest = torch.tensor(list(b".stone.chair.there." * T)[:T])  # patches that are the longest entries (5 bytes)
    xs = torch.stack([x, x, noise, x, longest])
    kept = ends & (torch.rand(T, generator=g) < 0.3)
    ends_b = torch.stack([ends, kept, torch.rand(T, generator=g) < 0.2, torch.zeros_like(ends), longest == ord(".")])
    want = patch_prefix_nodes_reference(trie, xs, ends_b)
    for n in (T, 1, 2, trie.longest + 1):
        assert torch.equal(patch_prefix_nodes(trie, xs[:, :n], ends_b[:, :n]), want[:, :n]), n
    since = [min([t - s for s in range(t + 1) if ends_b[1, s]], default=-1) for t in range(T)]  # bytes since the end
    deep = [t for t in range(T) if since[t] > trie.longest]
    assert deep and (want[1, deep] == -1).all()  # past the longest entry: no node
    assert (want[1] > 0).sum() > 20 and (want[2] == -1).sum() > 20 and (want[3] == -1).all()
    assert trie.longest == 5 and int(want[4, 5]) == int(trie.token_node[vocabulary().index(b"stone")])
    assert trie.tables(x.device) is trie.tables(x.device)  # the tables are kept, not copied per call


def test_zero_learned_part_reproduces_the_exact_targets(teacher):
    """With the learned logits at zero and prior_scale 1, the head's distribution at the true patches is the exact
    targets of the student's own main-network output through the teacher's output layer (up to the floor)."""
    student = prior_student(teacher, floor=1e-12)
    with torch.no_grad():
        student.head.weight.zero_()
        student.prior_scale.fill_(1.0)
    rows = [tokenize(40, seed) for seed in (1, 2)]
    T = min(len(r[0]) for r in rows)
    x, ends, ids = (torch.stack([r[k][:T] for r in rows]) for k in range(3))
    with torch.no_grad():
        logits, _, _ = student(x, ends=ends)
        y, patch_mask = student.run_main(student.encode(x), ends)
    patch, nodes, has = next_token_nodes(ByteTrie(vocabulary()), ends, ids)
    first = patch_mask.sum(1).cumsum(0) - patch_mask.sum(1)
    q = exact_byte_targets(ByteTrie(vocabulary()), y[patch_mask], teacher.head_weight, (patch + first[:, None])[has],
                           nodes[has])
    assert int(has.sum()) > 100 and float((q > 1e-3).sum(1).float().mean()) > 1.5  # not one-hot: a real test
    assert max_diff(torch.softmax(logits[has].double(), -1), q) < 1e-6


def test_generation_with_the_prior_equals_the_full_forward(student):
    """Prefill + sampled bytes with the prior: every logit equals a full forward with the boundaries used."""
    prompts, n_new = [b"", b"the", b"then there is a stone, said"], 20
    gen = ByteGeneration(student, prompts, n_new)
    g, step_logits = torch.Generator().manual_seed(3), []
    for _ in range(n_new):
        _, logits = gen.step(1.0, None, None, g)
        step_logits.append(logits)
    step_logits = torch.stack(step_logits, 1)
    for i, prompt in enumerate(prompts):
        n, L = int(gen.state.lens[i]), len(prompt) + 1
        with torch.no_grad():
            full, _, _ = student(gen.state.x[i:i + 1, :n], ends=gen.state.ends[i:i + 1, :n])
        tol = 1e-6 * float(full.abs().max())  # fp32 rounding, relative to logits of ~15 (1e-5 absolute or so)
        assert max_diff(gen.prefill_logits[i], full[0, :L - 1]) < tol
        assert max_diff(step_logits[i], full[0, L - 1:n - 1]) < tol


def test_the_prior_shapes_the_head(student):
    """The prior is live: the same model without it (prior_scale 0) gives other logits, and with it the bytes
    that continue no entry from the patch's prefix get less probability than from the learned part alone."""
    x, ends, _ = tokenize(30, seed=4)
    with torch.no_grad():
        with_prior, _, _ = student(x[None], ends=ends[None])
        scale = student.prior_scale.item()
        student.prior_scale.fill_(0.0)
        without, _, _ = student(x[None], ends=ends[None])
        student.prior_scale.fill_(scale)
    assert max_diff(with_prior, without) > 1.0
    outside = torch.tensor([v not in ALPHABET for v in range(256)] * 2)
    mass = lambda logits: torch.softmax(logits[0].double(), -1)[:, outside].sum(-1).mean()  # noqa: E731
    assert mass(with_prior) < 0.1 * mass(without)


def test_round_trip_keeps_the_prior(student, tmp_path):
    save_student(str(tmp_path / "m"), student, {"stage": 2, "teacher": "tiny", "config": {}, "phase": "e2e",
                                                "step": 0, "phase_done": True, "results": {}})
    loaded, _ = load_student(str(tmp_path / "m"))
    for name in ("prior_vocab_bytes", "prior_vocab_ends", "prior_head"):
        assert torch.equal(getattr(loaded, name), getattr(student, name))
    x, ends, _ = tokenize(20, seed=5)
    with torch.no_grad():
        assert max_diff(loaded(x[None])[0], student(x[None])[0]) == 0.0
