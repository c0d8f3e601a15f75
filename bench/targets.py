"""What the teacher-exact byte targets (targets.py) cost inside a training step: building the vocabulary trie, and
computing the 512-way targets of one batch, beside the plain teacher head + log-softmax over the same patches (the
work a distillation step does anyway). Vocabularies: the embedded teacher's (49,152) and, where the quicktok-v1
package is installed, Qwen3's (151,669 entries), the largest preset's.

    python bench/targets.py [--batch_size=8] [--seq_len=512] [--json=OUT]

Hidden states and the output layer are random (the cost does not depend on them); the batches' token layouts are
real: the embedded teacher's validation shards, and Hamlet tokenised by Qwen3 cut into windows. Best of --repeats.
"""
import json
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import cli  # noqa: E402
import data  # noqa: E402
from targets import ByteTrie, exact_byte_targets, next_token_nodes  # noqa: E402
from teacher import load_teacher, resolve_teacher_dir  # noqa: E402


@dataclass
class Config:
    batch_size: int = 8     # windows per batch
    seq_len: int = 512      # bytes per window
    chunk_rows: int = 64    # patches per chunk of the vocabulary-sized work
    repeats: int = 3
    json: str = ""


def best_of(repeats, fn):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(name, id_to_bytes, batch, width, cfg):
    """-> one row: trie build seconds, targets seconds per batch, head + log-softmax seconds, positions, patches."""
    start = time.perf_counter()
    trie = ByteTrie(id_to_bytes)
    build = time.perf_counter() - start
    ends = batch["token_end"]
    patch, nodes, has = next_token_nodes(trie, ends, batch["token_id"])
    counts = ends.sum(1)
    rows = (patch + (counts.cumsum(0) - counts)[:, None])[has]
    hidden = torch.randn(int(counts.sum()), width)
    head = torch.randn(len(id_to_bytes), width) / width ** 0.5
    targets_s = best_of(cfg.repeats, lambda: exact_byte_targets(trie, hidden, head, rows, nodes[has], cfg.chunk_rows))
    plain_s = best_of(cfg.repeats, lambda: [torch.log_softmax(hidden[i:i + cfg.chunk_rows] @ head.T, -1)
                                            for i in range(0, len(hidden), cfg.chunk_rows)])
    return {"vocabulary": name, "entries": len(id_to_bytes), "trie_nodes": trie.n_nodes, "trie_build_s": build,
            "targets_s": targets_s, "head_logsoftmax_s": plain_s, "positions": int(has.sum()), "patches": len(hidden)}


def qwen_batch(cfg):
    """Qwen3's vocabulary (quicktok-v1) and a batch of Hamlet cut into windows at its own token ends, or None."""
    try:
        import quicktok
    except ImportError:
        return None
    encoding = quicktok.get_encoding("qwen3")
    vocab = [encoding.decode_single_token_bytes(i) for i in range(encoding.n_vocab)]
    with open(data.play_path("hamlet"), encoding="utf-8") as f:
        ids = encoding.encode_ordinary(f.read())
    ends = torch.tensor([len(vocab[i]) for i in ids]).cumsum(0) - 1  # last byte of each token
    n = cfg.batch_size * cfg.seq_len
    token_end, token_id = torch.zeros(n, dtype=torch.bool), torch.full((n,), -1)
    keep = ends < n
    token_end[ends[keep]], token_id[ends[keep]] = True, torch.tensor(ids)[keep]
    shape = (cfg.batch_size, cfg.seq_len)
    return vocab, {"token_end": token_end.view(shape), "token_id": token_id.view(shape)}


def main(argv):
    cfg = cli.parse_args(Config, argv)
    torch.manual_seed(0)
    teacher, tok = load_teacher("smollm2")
    shards = data.default_shard_dir(tok.name)
    data.prepare(resolve_teacher_dir("smollm2"), None, shards)
    batch = data.ShardLoader(shards, "val", tok, cfg.batch_size, cfg.seq_len).next_batch()
    rows = [measure("smollm2", tok.id_to_bytes, batch, teacher.cfg.d_model, cfg)]
    qwen = qwen_batch(cfg)
    if qwen is not None:  # Qwen3-4B's width
        rows.append(measure("qwen3", *qwen, 2560, cfg))
    print(f"\nexact byte targets for one batch of {cfg.batch_size} x {cfg.seq_len} bytes ({cfg.chunk_rows}-patch chunks, "
          f"{torch.get_num_threads()} threads, best of {cfg.repeats})")
    print("| vocabulary | entries | trie nodes | trie build s | targets s | teacher head + log-softmax s | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['vocabulary']} | {r['entries']:,} | {r['trie_nodes']:,} | {r['trie_build_s']:.2f} | "
              f"{r['targets_s']:.3f} | {r['head_logsoftmax_s']:.3f} | {r['targets_s'] / r['head_logsoftmax_s']:.2f} |")
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
