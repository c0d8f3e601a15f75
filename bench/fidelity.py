"""How much of the teacher the byte student keeps, and where the lost bits go: bits per byte of both on the same
bytes, by the proper likelihood, with a decomposition.

    python bench/fidelity.py --ckpt=out/stage2 [--text=FILE ...] [--max_bytes=20000] [--json=OUT]

Scoring conventions (identical for both models):
- the text is normalised by the teacher's tokenizer and cut to --max_bytes (at a character boundary);
- it is tokenised once, canonically, and cut into segments of --window - 1 tokens; each segment is scored on its
  own from a fresh document start (the teacher sees [document-start token] + its tokens, the student [0xFE] + the
  same bytes); every text byte is scored once; every figure is bits / text bytes.
The figures, per text:
  teacher_bpb              the teacher on its canonical tokens
  teacher_byte_bpb         the teacher's exact byte targets (targets.py) along the true token ends: equal to
                           teacher_bpb up to float error and the probability of ids that spell no bytes (a check)
  teacher_byte_bpb_greedy  with --greedy=True (the default): the teacher as a byte model, its exact targets with
                           every flag decided causally, greedily (targets.teacher_greedy_logprobs; mixed with 1e-6
                           uniform, for dead ends): the ceiling a student with a greedy-flag head can approach
  student_token_bpb        the student's main network at the true token ends through the teacher's output layer,
                           token-level: what stage 1 achieved
  student_bpb_true_patches the student's head at the true patches: -log2 p(byte, true flag) (joint, so it cannot
                           profit from the true flags' lookahead): one term of the marginal's sum
  student_bpb_marginal     THE HEADLINE: the byte marginal over patchings, -log2 sum_e p(bytes, e), of the joint model
                           that sample.py's default draws from, by a beam of --beam flag prefixes (marginal.py; children
                           lighter than the heaviest by more than --floor nats dropped, and the true patches always
                           kept, so that it is never above student_bpb_true_patches): an upper bound on the exact
                           marginal's bits; ratio = student_bpb_marginal / teacher_bpb
  teacher_bpb_marginal     the teacher's byte marginal over tokenizations by the same beam over its exact targets
                           (marginal.teacher_marginal_logprobs), the canonical tokenization always kept (never above
                           teacher_byte_bpb, so never above teacher_bpb): the fair comparison; ratio_marginal =
                           student_bpb_marginal / teacher_bpb_marginal
  student_bpb_late         the proper likelihood of the late-flag byte model
                           (decoding.late_flag_logprobs, LateFlagGeneration, sample.py --byte_model=late): each flag
                           decided once the next byte is known, that byte's probability summed over both flags of the
                           byte before (a flag the head is sure of, its other value below --eps, decided at once);
                           ratio_late = student_bpb_late / teacher_bpb
  student_bpb_greedy       with --greedy=True (the default): the proper likelihood of the greedy-flag model
                           (decoding.greedy_flag_logprobs; sample.py --byte_model=greedy), every flag decided as soon
                           as its byte is drawn, the byte's probability summed over both halves; ratio_greedy beside
                           it. A flag the next byte contradicts is a dead end here
  student_bpb_greedy_joint -log2 p(byte, flag used) along the greedy flags: an upper bound (flags as a latent variable)
  student_bpb_lookahead    NOT a likelihood, printed to compare with older figures: summed halves with the patcher's
                           flags, which look at the next byte (one bit of it leaks into the input)
  F1 of the patcher's ends and of the late-flag model's flags against the teacher's token ends (each segment's last
  byte excluded: the patcher is forced to end it, the late model never decides it); bytes per patch under those
  flags against the teacher's bytes per token.
With --prior_rows=K, an experiment toward a prior that reads fewer rows of the teacher's output layer per patch: the
student's prior over only the K vocabulary entries the teacher's tokenizer uses most in the training shards (--shards,
default shards/<tokenizer>), plus every one-byte entry so that every byte stays possible; the other entries get
probability 0 (logits -inf before the softmax). Nothing is retrained, and scoring still reads every row: this measures
what the restriction costs in bits per byte, not its speed (the prior would read K x d_model weights instead of the
vocabulary's; bench/memory.py counts reads).
With --study=1,2,4,8,16: the student's and the teacher's marginal at each beam width, with the seconds each took, by
the beam alone (no path kept: K = 1 is the greedy-flag joint, and a teacher's beam whose every hypothesis reaches a
dead end, a token prefix that no byte of the text continues, scores inf).
Default texts: held-out Hamlet (a validation play, never trained on), the held-out argparse.py of the standard
library (code; the default corpus trains on the other modules) and the Python reference topics (pydoc_data.topics,
English and code, of a kind the corpus does not hold).
"""
import glob
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import checkpoint  # noqa: E402
import cli  # noqa: E402
import data  # noqa: E402
import decoding  # noqa: E402
from decoding import greedy_flag_logprobs, late_flag_logprobs  # noqa: E402
import marginal  # noqa: E402
from marginal import marginal_logprobs, teacher_marginal_logprobs  # noqa: E402
import model  # noqa: E402
from targets import ByteTrie, exact_byte_targets, next_token_nodes, teacher_greedy_logprobs  # noqa: E402
from teacher import load_teacher  # noqa: E402
from tokenizer import align_document  # noqa: E402


def default_texts():
    import pydoc_data.topics
    with open(data.play_path("hamlet"), encoding="utf-8") as f:
        hamlet = f.read()
    with open(data.module_path("argparse.py"), encoding="utf-8") as f:
        argparse_source = f.read()
    return {"hamlet (held out)": hamlet, "argparse.py (held out)": argparse_source,
            "pydoc topics": "\n\n".join(pydoc_data.topics.topics.values())}


def segments(aligned, window):
    """Cut an aligned document into runs of window - 1 whole tokens -> list of (text bytes, token_end, token ids)."""
    ends = aligned.token_end.nonzero()[0]  # byte index of each token's last byte; ends[0] is the 0xFE/BOS byte
    out = []
    for first in range(1, len(ends), window - 1):
        last = min(first + window - 1, len(ends)) - 1
        lo, hi = ends[first - 1] + 1, ends[last] + 1
        out.append((aligned.bytes[lo:hi], aligned.token_end[lo:hi], aligned.token_id[ends[first:last + 1]]))
    return out


FIGURES = {"teacher": "teacher_bpb", "teacher_byte": "teacher_byte_bpb", "teacher_greedy": "teacher_byte_bpb_greedy",
           "student_token": "student_token_bpb", "student_true_patches": "student_bpb_true_patches",
           "student_marginal": "student_bpb_marginal", "teacher_marginal": "teacher_bpb_marginal",
           "student_late": "student_bpb_late", "student_greedy": "student_bpb_greedy",
           "student_greedy_joint": "student_bpb_greedy_joint", "student_lookahead": "student_bpb_lookahead"}


def f1(pred, truth):
    """precision, recall, F1 of boolean predictions against the truth (tensors of the same shape)."""
    tp, fp, fn = (pred & truth).sum().item(), (pred & ~truth).sum().item(), (~pred & truth).sum().item()
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return precision, recall, 2 * precision * recall / max(precision + recall, 1e-12)


@torch.no_grad()
def parallel_figures(student, teacher, trie, tok, seg):
    """The figures one full forward per model gives for a segment -> nats {name: float}, patcher ends (n,)."""
    seg_bytes, seg_ends, seg_ids = seg
    ids = torch.tensor([[tok.doc_start_id, *seg_ids.tolist()]])
    x = torch.tensor([[model.BOS_BYTE, *seg_bytes.tolist()]])
    ends = torch.tensor([[True, *seg_ends.tolist()]])
    token_id = torch.full_like(x, -1).masked_scatter(ends, ids)
    nats = {}
    hidden = teacher(ids, return_hidden=True)
    nats["teacher"] = -torch.log_softmax(teacher.logits(hidden[:, :-1]).float(), -1).gather(-1, ids[:, 1:, None]).sum()
    patch, nodes, has = next_token_nodes(trie, ends, token_id)
    q = exact_byte_targets(trie, hidden[0], teacher.head_weight, patch[has], nodes[has])
    joint_labels = x[:, 1:] + 256 * ends[:, 1:].long()
    nats["teacher_byte"] = -q.double().gather(1, joint_labels[has[:, :-1]][:, None]).log().sum()
    y, patch_mask = student.run_main(student.encode(x), ends)  # token level: patch i predicts token i + 1
    nats["student_token"] = F.cross_entropy(teacher.logits(y[:, :-1]).float()[0], ids[0, 1:], reduction="sum")
    logits, _, _ = student(x, ends=ends)
    nats["student_true_patches"] = -torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, joint_labels[..., None]).sum()
    logits, _, patcher_ends = student(x)
    nats["student_lookahead"] = -model.byte_logprobs(logits[:, :-1]).gather(-1, x[:, 1:, None]).sum()
    return {k: float(v) for k, v in nats.items()}, patcher_ends[0, 1:]


def score(student, teacher, tok, trie, text, window, **options):
    """One text's figures (see score_texts)."""
    return score_texts(student, teacher, tok, trie, {"text": text}, window, **options)["text"]


@torch.no_grad()
def score_texts(student, teacher, tok, trie, texts, window, greedy=True, eps=decoding.LATE_EPS, beam=marginal.BEAM,
                floor=marginal.FLOOR, study=()):
    """texts {name: str} -> {name: figures}. The byte-by-byte passes (the marginals' beams, the student's late flags,
    with greedy the teacher's and the student's greedy flags) run over the segments of all texts in one batch: a step
    costs about the same for 10 rows as for 40 on a CPU. study: beam widths for the K study (figures "study": {K:
    {student_bpb_marginal, teacher_bpb_marginal, student_s, teacher_s}})."""
    segs, parts = {}, {}
    for name, text in texts.items():
        aligned = align_document(text, tok)
        if len(aligned.bytes) < 2:
            raise ValueError(f"{name}: empty text, nothing to score")
        segs[name] = (aligned, segments(aligned, window))
    flat = [(name, bytes(seg[0].tolist())) for name, (_, ss) in segs.items() for seg in ss]
    rows = [t for _, t in flat]
    true_ends = [torch.from_numpy(seg[1].astype(bool)) for _, ss in segs.values() for seg in ss]
    started = time.perf_counter()

    def progress(what):
        print(f"  {what}: {len(rows)} segments, {max(map(len, rows)):,} byte steps "
              f"({time.perf_counter() - started:.0f} s so far)", flush=True)

    def beams(K, keep=None):
        t0 = time.perf_counter()
        s = marginal_logprobs(student, rows, beam=K, floor=floor, keep=keep)
        t1 = time.perf_counter()
        t = teacher_marginal_logprobs(teacher, trie, tok.doc_start_id, rows, beam=K, floor=floor, keep=keep)
        return s, t, t1 - t0, time.perf_counter() - t1
    progress(f"the marginals, beam {beam}")
    student_marginal, teacher_marginal, s_time, t_time = beams(beam, true_ends)
    timing = {"student_marginal_s": s_time, "teacher_marginal_s": t_time}
    progress("student, late flags")
    student_late = late_flag_logprobs(student, rows, eps)
    teacher_greedy, student_greedy = [None] * len(flat), [None] * len(flat)
    if greedy:
        progress("teacher as a greedy byte model")
        teacher_greedy = teacher_greedy_logprobs(teacher, trie, tok.doc_start_id, rows)
        progress("student, greedy flags")
        student_greedy = greedy_flag_logprobs(student, rows, batch_size=len(flat))
    studies = {}
    for K in study:
        progress(f"the study, beam {K}")
        studies[K] = beams(K)
    progress("done")
    for (name, _), *passes in zip(flat, teacher_greedy, student_late, student_greedy, student_marginal,
                                   teacher_marginal):
        parts.setdefault(name, []).append(passes)
    out = {}
    for name, (aligned, ss) in segs.items():
        out[name] = r = text_figures(student, teacher, tok, trie, aligned, ss, parts[name])
        r.update(timing)
        if studies:
            own = [i for i, (n, _) in enumerate(flat) if n == name]
            bits = lambda shares: -sum(float(shares[i].sum()) for i in own) / math.log(2) / r["bytes"]  # noqa: E731
            r["study"] = {K: {"student_bpb_marginal": bits(sm), "teacher_bpb_marginal": bits(tm), "student_s": st,
                              "teacher_s": tt} for K, (sm, tm, st, tt) in studies.items()}
    return out


def text_figures(student, teacher, tok, trie, aligned, segs, passes):
    """One text's figures from its segments and their byte-by-byte passes [(teacher's greedy flags or None, student's
    late flags, student's greedy flags or None, student's marginal shares, teacher's marginal shares)]."""
    nats, patcher, head, truth = {}, [], [], []
    for seg, (teacher_greedy, (logp, flags), greedy, s_marginal, t_marginal) in zip(segs, passes):
        part, patcher_ends = parallel_figures(student, teacher, trie, tok, seg)
        part.update(student_late=-logp.double().sum().item(), student_marginal=-float(s_marginal.sum()),
                    teacher_marginal=-float(t_marginal.sum()))
        if greedy is not None:
            part.update(teacher_greedy=-teacher_greedy[0].sum().item(), dead_ends=teacher_greedy[2],
                        student_greedy=-greedy[0].double().sum().item(),
                        student_greedy_joint=-greedy[1].double().sum().item())
        for k, v in part.items():
            nats[k] = nats.get(k, 0.0) + v
        # the last byte of a segment: the patcher is forced to end it, the late model never decides it
        truth.append(torch.from_numpy(seg[1])[:-1])
        patcher.append(patcher_ends[:-1])
        head.append(flags[:-1])
    n_bytes, n_tokens = len(aligned.bytes) - 1, int(aligned.token_end.sum()) - 1
    r = {FIGURES[k]: v / math.log(2) / n_bytes for k, v in nats.items() if k in FIGURES}
    r.update(bytes=n_bytes, tokens=n_tokens, bytes_per_token=n_bytes / n_tokens)
    if "dead_ends" in nats:
        r["teacher_dead_ends"] = int(nats["dead_ends"])
    r["ratio"] = r["student_bpb_marginal"] / r["teacher_bpb"]
    r["ratio_marginal"] = r["student_bpb_marginal"] / r["teacher_bpb_marginal"]
    r["ratio_late"] = r["student_bpb_late"] / r["teacher_bpb"]
    if "student_bpb_greedy" in r:
        r["ratio_greedy"] = r["student_bpb_greedy"] / r["teacher_bpb"]
    head, truth = torch.cat(head), torch.cat(truth)
    r["patcher_precision"], r["patcher_recall"], r["patcher_f1"] = f1(torch.cat(patcher), truth)
    r["head_precision"], r["head_recall"], r["head_f1"] = f1(head, truth)
    r["mean_patch_bytes"] = n_bytes / max(int(head.sum()) + len(segs), 1)  # each segment's last byte ends its patch
    return r


def print_tables(results, eps, beam):
    greedy = all("student_bpb_greedy" in r for r in results.values())
    print(f"\n| text | bytes | teacher bpb | student bpb (marginal, beam {beam}) | ratio | teacher bpb (marginal) | "
          "ratio (marginal) | student bpb, late flags | ratio | " + ("greedy flags | ratio | " if greedy else "")
          + "bytes/patch | bytes/token |")
    print("|---|---|---|---|---|---|---|---|---|" + ("---|---|" if greedy else "") + "---|---|")
    for name, r in results.items():
        extra = f"{r['student_bpb_greedy']:.3f} | {r['ratio_greedy']:.2f} | " if greedy else ""
        print(f"| {name} | {r['bytes']:,} | {r['teacher_bpb']:.3f} | {r['student_bpb_marginal']:.3f} | "
              f"{r['ratio']:.3f} | {r['teacher_bpb_marginal']:.3f} | {r['ratio_marginal']:.3f} | "
              f"{r['student_bpb_late']:.3f} | {r['ratio_late']:.2f} | {extra}{r['mean_patch_bytes']:.2f} | "
              f"{r['bytes_per_token']:.2f} |")
    first = next(iter(results.values()))
    print(f"(the marginals took {first['student_marginal_s']:.0f} s for the student and "
          f"{first['teacher_marginal_s']:.0f} s for the teacher, all texts together)")
    print(f"\nwhere the bits go (bits per byte on the same bytes; see the docstring; late flags with eps {eps:g}):")
    print("| text | teacher | teacher byte targets, true flags | teacher marginal | "
          + ("teacher byte targets, greedy flags (dead ends) | " if greedy else "")
          + "student token-level | student, true patches (joint) | student marginal | student, late flags | "
          + ("student, greedy flags (joint) | " if greedy else "") + "student lookahead (not a likelihood) "
          "| F1 patcher / late flags |")
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if greedy else ""))
    for name, r in results.items():
        t_greedy = f"{r['teacher_byte_bpb_greedy']:.3f} ({r['teacher_dead_ends']}) | " if greedy else ""
        s_greedy = f"{r['student_bpb_greedy']:.3f} ({r['student_bpb_greedy_joint']:.3f}) | " if greedy else ""
        print(f"| {name} | {r['teacher_bpb']:.3f} | {r['teacher_byte_bpb']:.3f} | {r['teacher_bpb_marginal']:.3f} | "
              f"{t_greedy}{r['student_token_bpb']:.3f} | {r['student_bpb_true_patches']:.3f} | "
              f"{r['student_bpb_marginal']:.3f} | {r['student_bpb_late']:.3f} | {s_greedy}"
              f"{r['student_bpb_lookahead']:.3f} | {r['patcher_f1']:.3f} / {r['head_f1']:.3f} |", flush=True)
    if "study" in first:
        print("\nthe beam width (bits per byte of the marginal, and the seconds each pass took over all texts):")
        print("| beam | " + " | ".join(f"{name}: student | teacher" for name in results) + " | seconds: student | teacher |")
        print("|---|" + "---|---|" * len(results) + "---|---|")
        for K, row in first["study"].items():
            cells = " | ".join(f"{r['study'][K]['student_bpb_marginal']:.4f} | {r['study'][K]['teacher_bpb_marginal']:.4f}"
                               for r in results.values())
            print(f"| {K} | {cells} | {row['student_s']:.0f} | {row['teacher_s']:.0f} |", flush=True)


@dataclass
class Config:
    ckpt: str = "out/stage2"    # a byte-model folder
    text: list = field(default_factory=list)  # repeatable; default: held-out Hamlet, argparse.py, pydoc topics
    max_bytes: int = 20000      # score the first max_bytes of each text
    window: int = 512           # tokens per segment, the document-start token included (capped at the teacher's)
    greedy: bool = True         # also the greedy-flag passes: the student's (student_bpb_greedy) and the teacher's
                                # (teacher_byte_bpb_greedy): where dead ends cost; two more byte-by-byte passes
    beam: int = marginal.BEAM   # the marginals' beam width (flag prefixes kept per segment)
    floor: float = marginal.FLOOR  # the beams drop children lighter than their segment's heaviest by more (nats)
    study: str = ""             # beam widths to compare, e.g. 1,2,4,8,16 (the K study table)
    eps: float = decoding.LATE_EPS  # the late-flag model decides a flag at once when its other value is less likely
    prior_rows: int = 0         # > 0: the student's prior restricted to this many entries (see the docstring)
    shards: str = ""            # where --prior_rows counts token frequencies; default shards/<tokenizer name>
    json: str = ""


def restrict_prior(student, tok, shard_dir, rows):
    """The student's prior over only the `rows` entries the teacher's tokens use most in shard_dir's training shards,
    plus every one-byte entry (ties: the trie's order) -> (entries kept, share of the training tokens they are): the
    other entries' logits become -inf in every prior the student computes from now on (its trie's cumulative)."""
    if not student.has_prior:
        raise ValueError("--prior_rows: this checkpoint's byte head has no prior")
    paths = sorted(glob.glob(os.path.join(shard_dir, "train_*.bin")))
    if not paths:
        raise FileNotFoundError(f"--prior_rows: no training shards in {shard_dir} (prepare them: python data.py, or "
                                "--shards=DIR)")
    counts = torch.zeros(tok.n_vocab, dtype=torch.float64)
    for path in paths:
        shard = data.Shard(path)
        if shard.header["tokenizer_hash"] != tok.hash:
            raise ValueError(f"--prior_rows: {path} was tokenized by another tokenizer than this checkpoint's teacher")
        counts += torch.bincount(torch.from_numpy(shard.token_ids.astype("int64")), minlength=tok.n_vocab).double()
    entries = student.vocab.entries
    index = {entry: i for i, entry in enumerate(entries)}
    freq = torch.zeros(len(entries), dtype=torch.float64)
    for token_id, spelled in enumerate(tok.id_to_bytes):
        if spelled in index:
            freq[index[spelled]] += counts[token_id]
    keep = torch.tensor([len(e) == 1 for e in entries])
    keep[torch.argsort(-freq, stable=True)[:rows]] = True
    bias = torch.where(keep, 0.0, float("-inf"))
    trie = student.vocab.trie
    cumulative = trie.cumulative
    trie.cumulative = lambda sorted_logits: cumulative(sorted_logits + bias.to(sorted_logits.device))
    return int(keep.sum()), float(freq[keep].sum() / freq.sum().clamp(min=1))


def main(argv):
    cfg = cli.parse_args(Config, argv)
    files = cfg.text
    student, meta = checkpoint.load_student(cfg.ckpt)
    teacher, tok = load_teacher(meta["teacher"])
    if files:
        texts = {}
        for path in files:
            with open(path, "rb") as f:
                texts[os.path.basename(path)] = f.read().decode("utf-8", errors="replace")
    else:
        texts = default_texts()
    # segments never exceed the teacher's context (windows are capped at it)
    max_bytes, window = cfg.max_bytes, min(cfg.window, teacher.cfg.max_seq_len)
    if window < 2:
        raise ValueError("--window must be at least 2 tokens (the document-start token and one to score)")
    print(f"fidelity of {cfg.ckpt} (teacher {meta['teacher']}): first {max_bytes:,} bytes of each text, "
          f"segments of {window - 1} tokens, each scored from a fresh document start (see the docstring)")
    texts = {name: tok.normalize(text).encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
             for name, text in texts.items()}
    if not 0 <= cfg.eps < 0.5:
        raise ValueError("--eps must be in [0, 0.5): below it, a flag's other value counts as impossible")
    study = tuple(int(k) for k in cfg.study.split(",")) if cfg.study else ()
    if cfg.beam < 1 or any(k < 1 for k in study):
        raise ValueError("--beam and --study widths must be at least 1")
    if not cfg.floor > 0:
        raise ValueError("--floor must be > 0 nats (inf: no floor)")
    if cfg.prior_rows < 0:
        raise ValueError("--prior_rows must be >= 0 (0: the whole vocabulary)")
    if cfg.prior_rows:
        kept, share = restrict_prior(student, tok, cfg.shards or data.default_shard_dir(tok.name), cfg.prior_rows)
        print(f"the student's prior restricted to {kept:,} of {student.scfg.prior_vocab:,} vocabulary entries, "
              f"{share:.2%} of the training shards' tokens (--prior_rows={cfg.prior_rows})")
    results = score_texts(student, teacher, tok, ByteTrie(tok.id_to_bytes), texts, window, cfg.greedy, cfg.eps,
                          cfg.beam, cfg.floor, study)
    print_tables(results, cfg.eps, cfg.beam)
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump({"ckpt": cfg.ckpt, "teacher": meta["teacher"], "max_bytes": max_bytes, "window": window,
                       "eps": cfg.eps, "beam": cfg.beam, "floor": cfg.floor, "prior_rows": cfg.prior_rows,
                       "texts": results}, f, indent=2)
    return results


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
