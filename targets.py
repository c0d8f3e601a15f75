"""Teacher-exact byte targets: a teacher's next-token distribution turned into the distribution of every byte of the
next token, as 512-way targets in the byte head's layout (index v + 256 * e: next byte v, and whether it ends the token).

With p the teacher's next-token distribution (over the ids that spell bytes, renormalised), s the bytes of the next
token seen so far, P(x) the total p of tokens whose bytes start with x and p(=x) that of tokens whose bytes are x:

    q(v, end) = p(= s+v) / Z        q(v, not end) = (P(s+v) - p(= s+v)) / Z        Z = P(s) - p(= s)

Along a token's true bytes the product of the targets telescopes to p(token), so the teacher scored through its own
targets has exactly its token bits. In lexicographic byte order the tokens that start with x are one contiguous range,
so prefix sums C of p in that order give every P(x) as C[hi] - C[lo] (in float64: rare prefixes are differences of
numbers near 1). The targets are sparse, a prefix's children only; they are written out dense over the 512 entries,
the size of the byte head's logits, and the vocabulary-sized work is done per patch in row chunks.
"""
import os
from types import SimpleNamespace

import numpy as np
import torch


class ByteTrie:
    """Every prefix of every vocabulary entry is a node (node 0 = the empty prefix). For node n with string s:
    entries [lo[n], hi[n]) of the sorted vocabulary start with s, entries [lo[n], exact_hi[n]) are s itself; its
    children s+v are child_node[child_start[n] : child_start[n] + n_children[n]], in increasing v = byte_of[child].
    For token id w, prefix_nodes[prefix_offset[w] + j] is the node of its first j bytes (j < its length), and
    token_node[w] the node of all of them. Ids that spell no bytes are left out (sorted_ids holds the rest)."""

    def __init__(self, id_to_bytes):
        entries = sorted((b, i) for i, b in enumerate(id_to_bytes) if b)
        self.sorted_ids = torch.tensor([i for _, i in entries], dtype=torch.long)
        self.in_order = bool((self.sorted_ids == torch.arange(len(entries))).all())  # ids already in byte order
        lo, hi, exact_hi, parent, byte_of = [0], [len(entries)], [0], [-1], [-1]
        n_ids = len(id_to_bytes)
        token_node, prefix_offset = np.full(n_ids, -1, np.int64), np.zeros(n_ids + 1, np.int64)
        lengths = np.array([len(b) for b in id_to_bytes], np.int64)
        prefix_offset[1:] = np.cumsum(lengths)
        prefix_nodes = np.zeros(int(prefix_offset[-1]), np.int64)
        stack, prev = [0], b""  # stack[d] = the node of the current entry's first d bytes
        for k, (key, w) in enumerate(entries):  # one pass over the sorted entries builds the trie (as a sorted merge)
            common = len(os.path.commonprefix([prev, key]))
            while len(stack) - 1 > common:  # nodes that no later entry shares end here
                hi[stack.pop()] = k
            for d in range(common + 1, len(key) + 1):
                stack.append(len(lo))
                lo.append(k), hi.append(-1), exact_hi.append(k), parent.append(stack[-2]), byte_of.append(key[d - 1])
            exact_hi[stack[len(key)]] = k + 1  # shorter strings sort first, so entries equal to s open s's range
            prefix_nodes[prefix_offset[w]:prefix_offset[w] + len(key)] = stack[:len(key)]
            token_node[w] = stack[len(key)]
            prev = key
        for n in stack[1:]:
            hi[n] = len(entries)
        as_long = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))  # noqa: E731
        self.lo, self.hi, self.exact_hi, self.byte_of = as_long(lo), as_long(hi), as_long(exact_hi), as_long(byte_of)
        parents = np.asarray(parent[1:])
        order = np.argsort(parents, kind="stable") + 1  # children grouped by parent, in byte order within a group
        self.child_node = as_long(order)
        counts = np.bincount(parents, minlength=len(lo))
        self.n_children = as_long(counts)
        self.child_start = as_long(np.concatenate([[0], np.cumsum(counts)[:-1]]))
        self.token_node, self.prefix_offset, self.prefix_nodes = map(as_long, (token_node, prefix_offset, prefix_nodes))
        self.n_nodes = len(lo)
        # host constants, so that device code never reads a size back: the widest fan-out pads targets()' child slots,
        # the longest entry bounds every walk (no node lies deeper)
        self.max_children = max(int(counts.max()), 1)
        self.longest = max((len(key) for key, _ in entries), default=0)
        self._tables = {}

    def tables(self, device):
        """The trie's arrays on a device, copied there once and kept (a GPU forward must not copy constant tables per
        call): the fields above plus keys = parent * 256 + byte of every child node, sorted (children are grouped by
        parent in byte order), for step()."""
        key = str(device)
        if "cpu" not in self._tables:
            parents = torch.repeat_interleave(torch.arange(self.n_nodes), self.n_children)
            self._tables["cpu"] = SimpleNamespace(
                keys=parents * 256 + self.byte_of[self.child_node], child_node=self.child_node,
                n_children=self.n_children, child_start=self.child_start, lo=self.lo, hi=self.hi,
                exact_hi=self.exact_hi, byte_of=self.byte_of, prefix_offset=self.prefix_offset,
                prefix_nodes=self.prefix_nodes)
        if key not in self._tables:
            self._tables[key] = SimpleNamespace(**{name: t.to(device) for name, t in vars(self._tables["cpu"]).items()})
        return self._tables[key]

    def child_table(self):
        """{(node, byte): child node} for walking the trie one byte at a time in plain Python (built once)."""
        if getattr(self, "_child_table", None) is None:
            parents = torch.repeat_interleave(torch.arange(self.n_nodes), self.n_children).tolist()
            kids, byte_of = self.child_node.tolist(), self.byte_of.tolist()
            self._child_table = {(p, byte_of[k]): k for p, k in zip(parents, kids)}
        return self._child_table

    def step(self, nodes, v):
        """child() for many at once: nodes (N,) (-1 stays -1), bytes v (N,) -> the nodes of s+v, -1 where no entry
        starts with s+v. Children are stored grouped by parent in byte order, so parent * 256 + byte is a sorted key."""
        tab = self.tables(nodes.device)
        query = nodes.clamp(min=0) * 256 + v
        at = torch.searchsorted(tab.keys, query).clamp(max=max(len(tab.keys) - 1, 0))
        return torch.where((tab.keys[at] == query) & (nodes >= 0), tab.child_node[at], -1)

    def child(self, node, v):
        """The node of s+v for node s and byte v (ints), or -1 where no entry starts with s+v."""
        start, count = int(self.child_start[node]), int(self.n_children[node])
        kids = self.child_node[start:start + count]
        at = int(torch.searchsorted(self.byte_of[kids], v)) if count else 0
        return int(kids[at]) if at < count and int(self.byte_of[kids[at]]) == v else -1

    def sorted_head(self, head_weight):
        """The output layer's rows of the spelled ids in sorted order (kept for the last weight seen: the teacher's
        is frozen), so that hidden @ sorted_head.T comes out in trie order with no vocabulary-sized gather."""
        if self.in_order and len(head_weight) == len(self.sorted_ids):
            return head_weight.detach()  # already in trie order (the byte model's prior buffers)
        key = (head_weight.data_ptr(), tuple(head_weight.shape), head_weight.dtype, head_weight._version)
        if getattr(self, "_head_key", None) != key:
            self._head_key, self._head = key, head_weight.detach().index_select(0, self.sorted_ids.to(head_weight.device))
        return self._head

    def cumulative(self, sorted_logits):
        """(R, n_sorted) logits of the spelled ids in sorted order -> (R, n_sorted + 1) float64 prefix sums of p.
        The softmax is fp32 (each p to 1e-7 of itself; fp64 for fp64 logits); the sums are fp64, so P(x) = C[hi] - C[lo] stays exact to
        ~1e-16 even for rare prefixes."""
        p = torch.softmax(sorted_logits.to(at_least_fp32(sorted_logits.dtype)), dim=-1).double()
        return torch.nn.functional.pad(p.cumsum(-1), (1, 0))

    def targets(self, cum, rows, nodes):
        """cum (R, n_sorted + 1) from cumulative(); for each position, the row of its patch and the node of the
        next token's bytes seen so far -> (N, 512) float64 targets (each row sums to 1 where Z > 0). Every node's
        children get max_children slots (a build-time constant, so no size is read back from the device)."""
        dev = cum.device
        tab = self.tables(dev)
        nodes = nodes.to(dev)
        count = tab.n_children[nodes]
        slot = torch.arange(self.max_children, device=dev)
        real = slot < count[:, None]  # (N, K)
        kids = tab.child_node[torch.where(real, tab.child_start[nodes][:, None] + slot, 0)]
        flat = cum.reshape(-1)
        base = rows.to(dev)[:, None] * cum.shape[1]
        at = lambda index: flat[base + index[kids]]  # noqa: E731
        start = at(tab.lo)
        prefix = torch.where(real, at(tab.hi) - start, 0.0)   # P(s+v)
        exact = torch.where(real, at(tab.exact_hi) - start, 0.0)  # p(= s+v)
        z = prefix.sum(-1, keepdim=True)  # = P(s) - p(= s): every longer entry lies under exactly one child
        v = torch.where(real, tab.byte_of[kids], 0)
        out = torch.zeros(len(nodes), 512, dtype=torch.float64, device=dev)
        out.scatter_add_(1, v, (prefix - exact) / z.clamp(min=1e-300))
        out.scatter_add_(1, v + 256, exact / z.clamp(min=1e-300))
        return out


def next_token_nodes(trie, token_end, token_id):
    """Where each byte position of a batch stands in the next teacher token. Position t predicts byte t+1, which
    belongs to the token that ends at the first token end after t; the patch (token) ending at or before t gives the
    teacher distribution. -> (patch index within the row (B, T), trie node (B, T), has_target (B, T)): has_target is
    False before the first token end and after the last one (no teacher distribution, or no next token in the window)."""
    B, T = token_end.shape
    dev = token_end.device
    t = torch.arange(T, device=dev).expand(B, T)
    patch = token_end.long().cumsum(1) - 1
    prev_end = torch.where(token_end, t, -1).cummax(1).values
    upcoming = torch.where(token_end, t, T).flip(1).cummin(1).values.flip(1)  # first end at or after t
    next_end = torch.cat([upcoming[:, 1:], torch.full((B, 1), T, device=dev)], dim=1)
    has_target = (patch >= 0) & (next_end < T)
    w = token_id.gather(1, next_end.clamp(max=T - 1)).clamp(min=0)
    tab = trie.tables(dev)
    index = tab.prefix_offset[w] + (t - prev_end)
    index = torch.where(has_target, index, 0).clamp(max=len(trie.prefix_nodes) - 1)
    return patch, tab.prefix_nodes[index], has_target


def batch_byte_targets(trie, hidden, patch_mask, token_end, token_id, valid, head_weight, chunk_rows=None):
    """The teacher's exact 512-way targets at every byte of a batch: hidden (B, P, D) its final hidden states at the
    tokens whose ends are token_end (B, T) (patch_mask (B, P): the real ones, model.patch_order's). -> (targets
    (B, T, 512), zero rows where there is none; has (B, T): position t has the target for byte t+1, both real)."""
    patch, nodes, has = next_token_nodes(trie, token_end, token_id)
    has = has & valid & torch.cat([valid[:, 1:], torch.zeros_like(valid[:, :1])], 1)
    counts = patch_mask.sum(1)
    first_patch = counts.cumsum(0) - counts  # each row's offset among the real patches
    soft = torch.zeros(*token_end.shape, 512, device=hidden.device)
    soft[has] = exact_byte_targets(trie, hidden[patch_mask], head_weight, (patch + first_patch[:, None])[has],
                                   nodes[has], chunk_rows)
    return soft, has


def patch_prefix_nodes(trie, x, ends):
    """Where each position of a batch stands in the trie: for bytes x (B, T) and patch ends (B, T), the node of the
    bytes since the latest patch end at or before t (node 0 where t itself ends a patch; -1 before the first end and
    where no vocabulary entry starts with those bytes). -> (B, T) long.
    The node at t depends only on the k = t - (latest end) bytes since that end, and no node is deeper than the longest
    entry, so the walk loops over k (all positions at once, those k bytes into their patch taking one step from the
    node of the byte before), never over t: at most trie.longest passes, positions further in stay -1."""
    B, T = x.shape
    t = torch.arange(T, device=x.device).expand(B, T)
    offset = t - torch.where(ends, t, -1).cummax(1).values  # bytes since the latest end (t + 1 before the first)
    nodes = torch.where(ends, 0, -1)  # before the first end every step starts from -1 (the -1 shifted in at t = 0)
    for k in range(1, min(trie.longest, T - 1) + 1):
        before = torch.cat([nodes.new_full((B, 1), -1), nodes[:, :-1]], dim=1)  # (B, T): the node at t - 1
        nodes = torch.where(offset == k, trie.step(before.reshape(-1), x.reshape(-1)).view(B, T), nodes)
    return nodes


def patch_prefix_nodes_reference(trie, x, ends):
    """patch_prefix_nodes as the recurrence that cached generation steps through, one byte at a time (the oracle)."""
    nodes = torch.empty(x.shape, dtype=torch.long, device=x.device)
    node = torch.full(x.shape[:1], -1, dtype=torch.long, device=x.device)
    for t in range(x.shape[1]):
        node = torch.where(ends[:, t], 0, trie.step(node, x[:, t]))
        nodes[:, t] = node
    return nodes


def exact_byte_targets(trie, hidden, head_weight, rows, nodes, chunk_rows=None, budget=None):
    """Teacher-exact 512-way targets for N byte positions: hidden (P, D) final hidden states at the patches (token
    ends), head_weight (V, D) the teacher's output layer, rows (N,) the patch of each position, nodes (N,) its trie
    node. Chunked over patches, so at most chunk_rows x V probabilities exist at once; chunk_rows=None sizes the
    chunks by budget (elements of that block; default chunk_budget(device)). -> (N, 512) float32 (float64 for a
    float64 hidden). One chunk reads nothing back from the device; several read all their bounds at once (one sync)."""
    dtype = at_least_fp32(hidden.dtype)
    head = trie.sorted_head(head_weight).to(dtype)
    if chunk_rows is None:
        chunk_rows = max(1, (budget or chunk_budget(hidden.device)) // max(len(head), 1))
    if len(hidden) <= chunk_rows:
        if not len(hidden):
            return torch.zeros(len(rows), 512, dtype=dtype, device=hidden.device)
        return trie.targets(trie.cumulative(hidden.to(dtype) @ head.T), rows, nodes).to(dtype)
    out = torch.zeros(len(rows), 512, dtype=dtype, device=hidden.device)
    order = torch.argsort(rows, stable=True)
    firsts = range(0, len(hidden), chunk_rows)
    cuts = torch.arange(0, len(hidden) + chunk_rows, chunk_rows, device=rows.device)
    bounds = torch.searchsorted(rows[order], cuts).tolist()  # every chunk's positions, in one read
    for first, lo, hi in zip(firsts, bounds, bounds[1:]):
        if lo == hi:
            continue
        pick = order[lo:hi]
        cum = trie.cumulative(hidden[first:first + chunk_rows].to(dtype) @ head.T)
        out[pick] = trie.targets(cum, rows[pick] - first, nodes[pick]).to(dtype)
    return out


def chunk_budget(device):
    """Elements of the (chunk_rows x V) probability block that exact_byte_targets holds at once: 2^26 on a GPU (a
    few hundred patches of a 100K vocabulary, ~2 GB with the float64 prefix sums), 2^21 on the CPU (a few dozen
    patches of a 50K vocabulary: little memory, matmuls still large enough to run at full speed)."""
    return 1 << (21 if torch.device(device).type == "cpu" else 26)


def at_least_fp32(dtype):
    """bf16/fp16/fp32 -> fp32, fp64 -> fp64: the precision the targets are computed in."""
    return torch.promote_types(dtype, torch.float32)


def longest_match(trie, text):
    """Split bytes into vocabulary entries, longest first from the left -> token ids (each byte of a byte-level
    vocabulary is an entry, so this always succeeds there)."""
    ids, at, child = [], 0, trie.child_table()
    while at < len(text):
        node, best, j = 0, None, at
        while j < len(text) and (node := child.get((node, text[j]), -1)) >= 0:
            j += 1
            if trie.exact_hi[node] > trie.lo[node]:
                best = (j, int(trie.sorted_ids[trie.lo[node]]))
        if best is None:
            raise ValueError(f"byte {text[at]:#04x} is in no vocabulary entry")
        at, w = best
        ids.append(w)
    return ids


@torch.no_grad()
def teacher_greedy_logprobs(teacher, trie, doc_start_id, texts, eps=1e-6):
    """The teacher itself as a byte model: its exact targets, with every flag decided causally as greedy generation
    decides it (byte t known -> the token ends there iff q(t, end) > q(t, not end)); a token that ends is fed to the
    teacher, whose next distribution serves the following bytes. The byte distribution is (1 - eps) q + eps uniform:
    q alone gives zero to a byte that continues no token after a wrong 'not end' (a dead end); there the bytes of the
    unfinished token are fed as their longest-match entries. Many texts in one batch (the teacher steps the rows
    that end a token; the others' caches do not advance).
    -> per text (log p(byte) (n,) float64, flags (n,) bool, number of dead ends)."""
    head = trie.sorted_head(teacher.head_weight).float()
    lo, hi, exact_hi, child = trie.lo.numpy(), trie.hi.numpy(), trie.exact_hi.numpy(), trie.child_table()
    B, L = len(texts), max(len(t) for t in texts)
    cache = teacher.new_cache(B, L + 2)
    cum = [None] * B

    def feed(pending):  # pending[b]: token ids to feed row b; afterwards cum[b] is its next distribution
        while any(pending):
            has = [bool(q) for q in pending]
            step = torch.tensor([[q.pop(0) if q else 0] for q in pending], device=head.device)
            hidden = teacher(step, cache=cache, advance=torch.tensor(has, device=head.device).long(),
                             return_hidden=True)[:, 0]
            done = [b for b in range(B) if has[b] and not pending[b]]
            for b, row in zip(done, trie.cumulative(hidden[done].float() @ head.T).cpu().numpy()):
                cum[b] = row
    out = [(torch.zeros(len(t), dtype=torch.float64), torch.zeros(len(t), dtype=torch.bool), 0) for t in texts]
    node, start, dead = [0] * B, [0] * B, [0] * B
    feed([[doc_start_id] for _ in range(B)])
    for t in range(L):
        pending = [[] for _ in range(B)]
        for b, text in enumerate(texts):
            if t >= len(text):
                continue
            c, n = child.get((node[b], text[t]), -1), node[b]
            C = cum[b]
            z = (C[hi[n]] - C[lo[n]]) - (C[exact_hi[n]] - C[lo[n]])
            q_all = (C[hi[c]] - C[lo[c]]) / z if c >= 0 else 0.0
            q_end = (C[exact_hi[c]] - C[lo[c]]) / z if c >= 0 else 0.0
            out[b][0][t] = np.log((1 - eps) * q_all + eps * 2 / 512)
            if q_end > q_all - q_end:
                pending[b] = [int(trie.sorted_ids[lo[c]])]
            elif q_all > 0:
                node[b] = c
                continue
            else:
                pending[b], dead[b] = longest_match(trie, text[start[b]:t + 1]), dead[b] + 1
            out[b][1][t], node[b], start[b] = True, 0, t + 1
        feed(pending)
    return [(logp, flags, d) for (logp, flags, _), d in zip(out, dead)]
