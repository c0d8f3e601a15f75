"""How much of the teacher the byte student keeps: bits per byte of both on the same bytes, and how well the
student's patches track the teacher's tokens.

    python bench/fidelity.py --ckpt=out/stage2/ckpt.pt [--text=FILE ...] [--max_bytes=20000] [--json=OUT]

Scoring conventions (identical for both models, printed with the results):
- the text is normalised by the teacher's tokenizer and cut to --max_bytes (at a character boundary);
- it is tokenised once, canonically, and cut into segments of --window - 1 tokens; each segment is scored on its
  own, the teacher seeing [document-start token] + its tokens, the student [0xFE] + the same bytes; every text byte
  (every text token) is scored once, the first one given only the document-start symbol;
- teacher bpb = total NLL of the tokens in bits / text bytes;
- student bpb = total of -log2 p(byte), p(byte) = sum over both halves of the 512-way head (DESIGN.md 1), with the
  student's own patches (patcher, p > 0.5; the last byte of a segment is forced to end a patch);
- student bpb_joint = -log2 of the head's probability of (byte, the boundary flag the patcher then used). It is an
  upper bound on the student's true bits per byte; the marginal figure conditions on boundary flags that the
  patcher set with a one-byte lookahead, so it can be optimistic. Both are printed;
- boundary precision/recall/F1: the patcher's ends against the teacher's token ends over the text bytes (the forced
  last byte of each segment excluded); mean patch bytes against the teacher's bytes per token.
Default texts: held-out Hamlet (a validation play, never trained on) and the Python reference topics
(pydoc_data.topics, English and code).
"""
import json
import math
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import data  # noqa: E402
import model  # noqa: E402
import train  # noqa: E402
from teacher import load_teacher  # noqa: E402
from tokenizer import align_document  # noqa: E402


def default_texts():
    import pydoc_data.topics
    with open(data.play_path("hamlet"), encoding="utf-8") as f:
        hamlet = f.read()
    return {"hamlet (held out)": hamlet, "pydoc topics": "\n\n".join(pydoc_data.topics.topics.values())}


def segments(aligned, window):
    """Cut an aligned document into runs of window - 1 whole tokens -> list of (text bytes, token_end, token ids)."""
    ends = aligned.token_end.nonzero()[0]  # byte index of each token's last byte; ends[0] is the 0xFE/BOS byte
    out = []
    for first in range(1, len(ends), window - 1):
        last = min(first + window - 1, len(ends)) - 1
        lo, hi = ends[first - 1] + 1, ends[last] + 1
        out.append((aligned.bytes[lo:hi], aligned.token_end[lo:hi], aligned.token_id[ends[first:last + 1]]))
    return out


@torch.no_grad()
def score(student, teacher, tok, text, window):
    aligned = align_document(text, tok)
    if len(aligned.bytes) < 2:
        raise ValueError("empty text: nothing to score")
    ln2 = math.log(2)
    t_nats = s_nats = s_joint_nats = 0.0
    tp = fp = fn = patches = 0
    for seg_bytes, seg_ends, seg_ids in segments(aligned, window):
        ids = torch.tensor([[tok.doc_start_id, *seg_ids.tolist()]])
        t_logp = torch.log_softmax(teacher(ids[:, :-1]).float(), dim=-1)
        t_nats -= t_logp.gather(-1, ids[:, 1:, None]).sum().item()
        x = torch.tensor([[model.BOS_BYTE, *seg_bytes.tolist()]])
        logits, _, ends = student(x)
        s_nats -= model.byte_logprobs(logits[:, :-1]).gather(-1, x[:, 1:, None]).sum().item()
        joint = x[:, 1:] + 256 * ends[:, 1:].long()
        s_joint_nats -= torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, joint[..., None]).sum().item()
        pred, truth = ends[0, 1:-1], torch.from_numpy(seg_ends[:-1])
        tp += (pred & truth).sum().item()
        fp += (pred & ~truth).sum().item()
        fn += (~pred & truth).sum().item()
        patches += ends[0, 1:].sum().item()
    n_bytes, n_tokens = len(aligned.bytes) - 1, int(aligned.token_end.sum()) - 1
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    result = {"bytes": n_bytes, "tokens": n_tokens, "teacher_bpb": t_nats / ln2 / n_bytes,
              "student_bpb": s_nats / ln2 / n_bytes, "student_bpb_joint": s_joint_nats / ln2 / n_bytes,
              "boundary_precision": precision, "boundary_recall": recall,
              "boundary_f1": 2 * precision * recall / max(precision + recall, 1e-12),
              "mean_patch_bytes": n_bytes / max(patches, 1), "bytes_per_token": n_bytes / n_tokens}
    result["ratio"] = result["student_bpb"] / result["teacher_bpb"]
    result["ratio_joint"] = result["student_bpb_joint"] / result["teacher_bpb"]
    return result


@dataclass
class Config:
    ckpt: str = "out/stage2/ckpt.pt"
    text: list = field(default_factory=list)  # repeatable; default: held-out Hamlet and the pydoc topics
    max_bytes: int = 20000      # score the first max_bytes of each text
    window: int = 512           # tokens per segment, the document-start token included (capped at the teacher's)
    json: str = ""


def main(argv):
    cfg = train.parse_args(Config, argv)
    files = cfg.text
    student, meta = model.load_student(cfg.ckpt)
    teacher, tok = load_teacher(meta["teacher"])
    if files:
        texts = {}
        for path in files:
            with open(path, "rb") as f:
                texts[os.path.basename(path)] = f.read().decode("utf-8", errors="replace")
    else:
        texts = default_texts()
    # segments never exceed the teacher's context (DESIGN.md 1: windows are capped at it)
    max_bytes, window = cfg.max_bytes, min(cfg.window, teacher.cfg.max_seq_len)
    if window < 2:
        raise ValueError("--window must be at least 2 tokens (the document-start token and one to score)")
    print(f"fidelity of {cfg.ckpt} (teacher {meta['teacher']}): first {max_bytes:,} bytes of each text, "
          f"segments of {window - 1} tokens, each scored from a fresh document start (see the docstring)")
    print("| text | bytes | teacher bpb | student bpb | ratio | student bpb (joint, upper bound) | boundary P / R / F1 "
          "| bytes/patch | bytes/token |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = {}
    for name, text in texts.items():
        text = tok.normalize(text).encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
        r = results[name] = score(student, teacher, tok, text, window)
        print(f"| {name} | {r['bytes']:,} | {r['teacher_bpb']:.3f} | {r['student_bpb']:.3f} | {r['ratio']:.2f} | "
              f"{r['student_bpb_joint']:.3f} | {r['boundary_precision']:.3f} / {r['boundary_recall']:.3f} / "
              f"{r['boundary_f1']:.3f} | {r['mean_patch_bytes']:.2f} | {r['bytes_per_token']:.2f} |", flush=True)
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump({"ckpt": cfg.ckpt, "teacher": meta["teacher"], "max_bytes": max_bytes, "window": window,
                       "texts": results}, f, indent=2)
    return results


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
