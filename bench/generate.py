"""Generation speed: a byte student against its teacher, both with KV caches, same machine, same run.

    python bench/generate.py --ckpt=out/stage2/ckpt.pt [--new_bytes=256] [--batch_sizes=1,8] [--json=OUT]

Student: bytes per second of ByteGeneration (encoder and decoder step per byte; the main network steps when the
sampled index says the byte closes a patch; at batch > 1 the main network runs for the whole batch whenever any row
closes a patch, and rows that did not close discard the result). Teacher: tokens per second of cached decoding times
the teacher's bytes per token on held-out text. The student figure only means something when its patches track the
teacher's tokens (mean patch bytes near bytes per token): that is printed beside it.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import data  # noqa: E402
import model  # noqa: E402

PROMPT = "HAMLET. To be, or not to be, that is the question:"


@torch.no_grad()
def student_speed(student, batch_size, new_bytes, seed=0):
    """-> (bytes per second, mean bytes per patch of the generated text)."""
    gen = torch.Generator().manual_seed(seed)
    run = model.ByteGeneration(student, [PROMPT.encode()] * batch_size, new_bytes)
    start_ends = int(run.ends.sum())
    t = time.perf_counter()
    for _ in range(new_bytes):
        run.step(1.0, None, None, gen)
    seconds = time.perf_counter() - t
    patches = int(run.ends.sum()) - start_ends
    return batch_size * new_bytes / seconds, batch_size * new_bytes / max(patches, 1)


@torch.no_grad()
def teacher_speed(teacher, tok, batch_size, new_tokens, bytes_per_token, seed=0):
    """-> bytes per second = cached-decoding tokens per second x bytes per token."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[tok.doc_start_id] + tok.encode(PROMPT)] * batch_size)
    cache = teacher.new_cache(batch_size, ids.shape[1] + new_tokens)
    logits = teacher(ids, cache=cache)[:, -1]
    t = time.perf_counter()
    for _ in range(new_tokens):
        next_id = model.sample_from_logits(logits, 1.0, None, None, gen)
        logits = teacher(next_id, cache=cache)[:, -1]
    return batch_size * new_tokens / (time.perf_counter() - t) * bytes_per_token


def held_out_bytes_per_token(tok, max_bytes=20000):
    with open(data.play_path("hamlet"), encoding="utf-8") as f:
        text = tok.normalize(f.read())[:max_bytes]
    return len(text.encode("utf-8")) / len(tok.encode(text))


def measure(ckpt, new_bytes=256, batch_sizes=(1, 8)):
    student, meta = model.load_student(ckpt)
    teacher, tok = model.load_teacher(meta["teacher"])
    bpt = held_out_bytes_per_token(tok)
    out = {"student_bytes_per_s": {}, "teacher_bytes_per_s": {}, "ratio": {}, "student_patch_bytes": {},
           "teacher_bytes_per_token": bpt, "new_bytes": new_bytes}
    for b in batch_sizes:
        s, patch = student_speed(student, b, new_bytes)
        t = teacher_speed(teacher, tok, b, max(1, round(new_bytes / bpt)), bpt)
        out["student_bytes_per_s"][b], out["teacher_bytes_per_s"][b] = s, t
        out["ratio"][b], out["student_patch_bytes"][b] = s / t, patch
    return out


def main(argv):
    args = {"ckpt": "out/stage2/ckpt.pt", "new_bytes": "256", "batch_sizes": "1,8", "json": ""}
    for a in argv:
        key, _, value = a.removeprefix("--").partition("=")
        if key not in args:
            raise ValueError(f"unknown argument {a!r}; expected --ckpt= --new_bytes= --batch_sizes= --json=")
        args[key] = value
    batch_sizes = tuple(int(b) for b in args["batch_sizes"].split(","))
    out = measure(args["ckpt"], int(args["new_bytes"]), batch_sizes)
    print(f"generation, {out['new_bytes']} new bytes per row, CPU threads {torch.get_num_threads()}; "
          f"teacher bytes/token {out['teacher_bytes_per_token']:.2f} (held-out Hamlet)")
    print("| batch | student bytes/s | student bytes/patch | teacher bytes/s | student/teacher |")
    print("|---|---|---|---|---|")
    for b in batch_sizes:
        print(f"| {b} | {out['student_bytes_per_s'][b]:,.1f} | {out['student_patch_bytes'][b]:.2f} | "
              f"{out['teacher_bytes_per_s'][b]:,.1f} | {out['ratio'][b]:.2f} |")
    if args["json"]:
        with open(args["json"], "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
