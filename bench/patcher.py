"""The patcher against the teacher's token ends on the validation split: precision, recall and F1 of its decisions
at several thresholds (the checkpoint's own, --boundary_threshold, is what stage 2's training patches and the
patcher-flag rule use; the marginal over patchings uses p itself), and which token ends it misses.

    python bench/patcher.py --ckpt=out/stage1 [--thresholds=0.5,0.4,0.3,0.2,0.1] [--batches=8] [--json=OUT]

p_t looks at byte t and the byte after it only, so an end that the bytes further on decide (a merge the tokenizer
makes or not depending on what follows) is out of its reach: the table of misses sorts them by the kind of byte
that follows the missed end.
"""
import json
import os
import sys
from dataclasses import dataclass

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import checkpoint  # noqa: E402
import cli  # noqa: E402
import data  # noqa: E402
import shards  # noqa: E402
from teacher import load_teacher  # noqa: E402
import train  # noqa: E402


@dataclass
class Config:
    ckpt: str = "out/stage1"
    data_dir: str = ""              # shard folder; default shards/<the checkpoint's teacher>
    thresholds: str = "0.5,0.4,0.3,0.2,0.1"
    batches: int = 8                # validation batches (the stages' loader, seed 0)
    batch_size: int = 8
    seq_len: int = 512
    json: str = ""


def kind(byte):
    c = chr(byte)
    return "letter" if c.isalpha() else "digit" if c.isdigit() else "space" if c.isspace() else \
        "other" if byte >= 128 else "punctuation"


@torch.no_grad()
def main(argv):
    cfg = cli.parse_args(Config, argv)
    student, meta = checkpoint.load_student(cfg.ckpt)
    student.eval()
    _, tok = load_teacher(meta["teacher"], "cpu", torch.float32)
    if tok is None:
        raise ValueError(f"{cfg.ckpt}: its teacher {meta['teacher']!r} has no tokenizer, so no token ends to compare with")
    data_dir = cfg.data_dir or data.default_shard_dir(meta["teacher"] if not os.path.isdir(meta["teacher"]) else tok.name)
    loader = shards.make_loader(data_dir, "val", tok, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=0)
    probs, ends, after = [], [], []
    for _ in range(cfg.batches):
        batch = loader.next_batch()
        p = student.boundary_probs(student.encode(batch["bytes"]))
        sel = batch["valid"][:, :-1] & batch["valid"][:, 1:]  # the last byte's p is fixed at 1: not a decision
        probs.append(p[:, :-1][sel].float())
        ends.append(batch["token_end"][:, :-1][sel])
        after.append(batch["bytes"][:, 1:][sel])
    p, t, nxt = torch.cat(probs), torch.cat(ends), torch.cat(after)
    print(f"{cfg.ckpt} (threshold {student.scfg.boundary_threshold:g}): {len(p):,} validation bytes, "
          f"{t.float().mean():.3f} of them token ends\n")
    rows = []
    print("| threshold | precision | recall | F1 | patches per token end |")
    print("|---|---|---|---|---|")
    for th in (float(x) for x in cfg.thresholds.split(",")):
        pred = p > th
        precision, recall, f1 = train.boundary_f1({k: v.item() for k, v in train.boundary_counts(pred, t).items()})
        rows.append({"threshold": th, "precision": precision, "recall": recall, "f1": f1,
                     "patches_per_end": pred.sum().item() / max(t.sum().item(), 1)})
        print(f"| {th:g} | {precision:.3f} | {recall:.3f} | {f1:.3f} | {rows[-1]['patches_per_end']:.3f} |")
    missed = t & (p <= student.scfg.boundary_threshold)
    kinds = {}
    for b, m in zip(nxt[t].tolist(), missed[t].tolist()):
        k = kinds.setdefault(kind(b), [0, 0])
        k[0] += 1
        k[1] += m
    print(f"\ntoken ends missed at threshold {student.scfg.boundary_threshold:g}, by the byte after the end "
          f"(median p of the missed: {p[missed].median().item():.3f}):\n")
    print("| next byte | token ends | missed | share of all misses |")
    print("|---|---|---|---|")
    n_missed = max(missed.sum().item(), 1)
    for name, (n, m) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
        print(f"| {name} | {n:,} | {m:,} ({m / n:.1%}) | {m / n_missed:.1%} |")
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump({"ckpt": cfg.ckpt, "bytes": len(p), "thresholds": rows,
                       "missed_by_next_byte": {k: {"ends": n, "missed": m} for k, (n, m) in kinds.items()}}, f, indent=2)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
