"""Teacher-exact byte targets (targets.py) against a brute-force computation, and their defining property: along a
token's true bytes their product is the teacher's probability of that token."""
import math

import pytest
import torch

import tokenizer
import targets
from targets import ByteTrie, exact_byte_targets, next_token_nodes

# Prefixes of each other, a duplicate spelling, ids that spell nothing, bytes >= 0x80, a lone single byte.
VOCAB = [b"a", b"ab", b"abc", b"abd", b"b", b"ba", b"", b"ab", b"c", b"\xe2\x82", b"\xe2\x82\xac", b"\xff", b"", b"bab"]


def brute_force(vocab, p, s):
    """The 512-way targets for prefix s, straight from the definition (p renormalised over spelled ids)."""
    spelled = [i for i, b in enumerate(vocab) if b]
    total = sum(p[i] for i in spelled)
    P = lambda x: sum(p[i] for i in spelled if vocab[i].startswith(x)) / total  # noqa: E731
    exact = lambda x: sum(p[i] for i in spelled if vocab[i] == x) / total  # noqa: E731
    z = P(s) - exact(s)
    out = torch.zeros(512, dtype=torch.float64)
    for v in range(256):
        x = s + bytes([v])
        out[v], out[v + 256] = (P(x) - exact(x)) / z, exact(x) / z
    return out


def node_of(trie, s):
    node = 0
    for v in s:
        node = trie.child(node, v)
    return node


def test_targets_equal_brute_force_on_a_tiny_vocabulary():
    torch.manual_seed(0)
    trie = ByteTrie(VOCAB)
    logits = torch.randn(3, len(VOCAB)) * 2
    cum = trie.cumulative(logits[:, trie.sorted_ids])
    p = torch.zeros(3, len(VOCAB), dtype=torch.float64)  # the probabilities cumulative() sums (an fp32 softmax over
    p[:, trie.sorted_ids] = torch.softmax(logits[:, trie.sorted_ids], -1).double()  # the spelled ids): exact check
    prefixes = [b"", b"a", b"ab", b"b", b"ba", b"\xe2", b"\xe2\x82"]  # every node with children
    for row in range(3):
        nodes = torch.tensor([node_of(trie, s) for s in prefixes])
        got = trie.targets(cum, torch.full((len(prefixes),), row), nodes)
        for s, g in zip(prefixes, got):
            assert torch.allclose(g, brute_force(VOCAB, p[row].tolist(), s), rtol=0, atol=1e-12), s
            assert abs(g.sum().item() - 1) < 1e-12


def test_trie_structure():
    trie = ByteTrie(VOCAB)
    assert trie.child(0, ord("z")) == -1 and trie.child(node_of(trie, b"ab"), ord("z")) == -1
    for w, b in enumerate(VOCAB):
        if b:
            assert int(trie.token_node[w]) == node_of(trie, b)
            for j in range(len(b)):
                assert int(trie.prefix_nodes[trie.prefix_offset[w] + j]) == node_of(trie, b[:j])
        else:
            assert int(trie.token_node[w]) == -1
    ab = node_of(trie, b"ab")
    assert int(trie.exact_hi[ab] - trie.lo[ab]) == 2  # two ids spell b"ab"


def test_chunks_sized_by_a_budget_equal_one_chunk():
    """exact_byte_targets split into chunks (a tiny element budget: one patch per chunk; a few patches; a row count)
    equals one chunk and the targets read straight from every patch's prefix sums: positions in no order, several per
    patch, a patch with none, a last chunk of one patch."""
    torch.manual_seed(0)
    trie = ByteTrie(VOCAB)
    hidden, head = torch.randn(9, 6, dtype=torch.float64), torch.randn(len(VOCAB), 6, dtype=torch.float64)
    rows = torch.randint(0, 9, (60,))
    rows[rows == 4] = 8  # patch 4 has no position
    with_children = torch.nonzero(trie.n_children > 0)[:, 0]
    nodes = with_children[torch.randint(len(with_children), (60,))]
    want = trie.targets(trie.cumulative(hidden @ head[trie.sorted_ids].T), rows, nodes)
    n_spelled, sizes = len(trie.sorted_ids), []
    trie.cumulative = lambda logits: (sizes.append(len(logits)), ByteTrie.cumulative(trie, logits))[1]  # noqa: E731
    for kwargs, most in (({}, 9), ({"budget": 1}, 1), ({"budget": 4 * n_spelled + 1}, 4), ({"chunk_rows": 2}, 2),
                         ({"chunk_rows": 9}, 9)):
        sizes.clear()
        got = exact_byte_targets(trie, hidden, head, rows, nodes, **kwargs)
        assert torch.allclose(got, want, rtol=0, atol=1e-12), kwargs
        assert max(sizes) == most and sum(sizes) == 9 - (most == 1), kwargs  # the budget bounds the block
    assert torch.allclose(want.sum(-1), torch.ones(60, dtype=torch.float64), atol=1e-12)  # a real distribution
    assert exact_byte_targets(trie, hidden[:0], head, rows[:0], nodes[:0], budget=1).shape == (0, 512)


def product_along_tokens(trie, logits, token_ids, vocab):
    """log of the product of the targets along each token's true bytes, the token predicted from `logits` row i."""
    cum = trie.cumulative(logits[:, trie.sorted_ids])
    out = []
    for i, w in enumerate(token_ids):
        b = vocab[w]
        nodes = trie.prefix_nodes[trie.prefix_offset[w]:trie.prefix_offset[w] + len(b)]
        q = trie.targets(cum, torch.full((len(b),), i), nodes)
        labels = torch.tensor(list(b)) + 256 * (torch.arange(len(b)) == len(b) - 1).long()
        out.append(q.gather(1, labels[:, None]).log().sum().item())
    return out


def test_embedded_teacher_targets_give_its_token_bits():
    """The real SmolLM2 teacher on a sentence: bits of its canonical tokens = bits along the exact targets with the
    true token ends as flags, computed through next_token_nodes and exact_byte_targets as training uses them."""
    try:
        from teacher import load_teacher
        teacher, tok = load_teacher("smollm2")
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"embedded teacher not available: {e}")
    aligned = tokenizer.align_document("To be, or not to be, that is the question: whether 'tis nobler.", tok)
    trie = ByteTrie(tok.id_to_bytes)
    x = torch.from_numpy(aligned.bytes).long()[None]
    ends, ids = torch.from_numpy(aligned.token_end)[None], torch.from_numpy(aligned.token_id).long()[None]
    token_ids = ids[ends][None]
    with torch.no_grad():
        hidden = teacher(token_ids, return_hidden=True)[0]
        token_nats = -torch.log_softmax(teacher.logits(hidden[:-1]).float(), -1).gather(1, token_ids[0, 1:, None]).sum()
    patch, nodes, has = next_token_nodes(trie, ends, ids)
    q = exact_byte_targets(trie, hidden, teacher.head_weight, patch[has], nodes[has], chunk_rows=5)
    assert torch.allclose(q.sum(-1), torch.ones(len(q)), atol=1e-5)
    labels = (x[:, 1:] + 256 * ends[:, 1:].long())[has[:, :-1]]
    byte_nats = -q.double().gather(1, labels[:, None]).log().sum()
    assert int(has.sum()) == x.shape[1] - 1  # every byte after the document start has a target
    assert abs(byte_nats.item() - token_nats.item()) < 1e-3 * max(1.0, token_nats.item() / 100), (byte_nats, token_nats)
    assert math.isfinite(byte_nats.item())


def test_teacher_greedy_byte_model_against_a_plain_reimplementation():
    """teacher_greedy_logprobs (cached teacher, trie targets) against the definition written out: the teacher run
    from scratch on the tokens fed so far, brute-force targets, the greedy flag rule, longest-match at dead ends."""
    from test_student import TCFG, build_teacher
    teacher = build_teacher()
    vocab = [b"", b"a", b"b", b"c", b"ab", b"abc", b"ba", b"bc", b"ca", b"cab", b"aa", b"bb"]
    vocab += [b""] * (TCFG.vocab_size - len(vocab))
    trie = ByteTrie(vocab)
    text = b"abcabbacabcaabcbbcab"
    (logp, flags, dead), again = targets.teacher_greedy_logprobs(teacher, trie, 0, [text, text[:7]], eps=1e-3)
    assert torch.equal(again[0], logp[:7]) and torch.equal(again[1], flags[:7])  # rows in a batch do not interact
    fed, prefix, want, ends, dead_ends = [0], b"", [], [], 0
    for v in text:
        p = torch.softmax(teacher(torch.tensor([fed]))[0, -1].double(), -1).tolist()
        q = brute_force(vocab, p, prefix)
        want.append(math.log((1 - 1e-3) * float(q[v] + q[v + 256]) + 1e-3 * 2 / 512))
        prefix += bytes([v])
        ends.append(bool(q[v + 256] > q[v]) or q[v] == 0)
        if q[v + 256] > q[v]:
            fed, prefix = fed + [vocab.index(prefix)], b""
        elif q[v] == 0:  # a dead end
            fed, prefix, dead_ends = fed + targets.longest_match(trie, prefix), b"", dead_ends + 1
    assert torch.allclose(logp, torch.tensor(want, dtype=torch.float64), atol=1e-5)
    assert flags.tolist() == ends and dead == dead_ends > 0  # the text is made to hit dead ends
    assert targets.longest_match(trie, b"abcab") == [5, 4]
