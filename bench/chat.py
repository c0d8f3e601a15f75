"""Chat: does the byte student answer held-out prompts as its teacher does, and does it end its turn?

    python bench/chat.py --ckpt=out/stage2 [--n=40] [--max_bytes=400] [--json=OUT]

The prompts are data.py --chat's held-out ones (data.chat_prompts("val"): questions about the held-out plays and
standard-library modules; stages never train on them), each asked as one user turn in the teacher's template (its
default system turn included), the student's in byte space with the special-token codes. Both answer as
`sample.py --chat --temperature=0` does: the teacher greedily (its likeliest token), the student by a beam search over bytes of
width --student_beam (decoding.beam_search; 1: the likeliest of its 512 entries at each byte, no search), each for
at most --max_bytes bytes, stopping at the end-of-turn code. The student reads the prompt as --context says:
marginal (the default: the search starts from the hypotheses of the beam over the prompt's patchings, each with its
weight; greedy: from the heaviest) or patcher (the old rule: the prompt prefilled along the patcher's flags). Printed:
  ended          the share of answers that end their turn within --max_bytes bytes (the end code not counted)
  exact          the share of prompts where the student's answer is the teacher's, byte for byte
  prefix         the mean share of the teacher's answer that the student's starts with
  bits per byte  on the teacher's answers that ended (each answer's bytes and its end-of-turn code, after the prompt):
                 the teacher's own (its canonical tokens) and the student's byte marginal over patchings, a beam of
                 --beam, conditioned both ways: log A(prompt + answer) - log A(prompt) (conditioning.py; the canonical
                 token ends of prompt and answer kept in the beam) and, the old rule, after the prompt prefilled
                 along the patcher's flags (marginal.py; its last byte's flag summed over, no path kept)
and a few answers side by side. Weights in fp32 by default: this small quantised teacher's greedy answers degrade in
bf16.
"""
import json
import math
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import chat  # noqa: E402
import checkpoint  # noqa: E402
import cli  # noqa: E402
import conditioning  # noqa: E402
import data  # noqa: E402
from decoding import beam_search  # noqa: E402
import marginal  # noqa: E402
from sample import chat_format, generate_student  # noqa: E402
from teacher import load_teacher, resolve_teacher_dir  # noqa: E402


@dataclass
class Config:
    ckpt: str = "out/stage2"    # a byte-model folder that records its special codes and chat template (stage 1 does)
    n: int = 40                 # held-out prompts (data.chat_prompts("val", n); data.py --chat answered the first 40)
    max_bytes: int = 400        # an answer's budget, for both models
    student_beam: int = 4       # the student's answers: beam search width (1 = greedy, the joint's likeliest entry)
    beam: int = marginal.BEAM   # the student's marginal: flag prefixes kept
    context: str = "marginal"   # how the student's answers read the prompt: marginal | patcher (the old rule)
    show: int = 3               # answers printed side by side
    dtype: str = "float32"      # weights of both models: float32 | bfloat16
    json: str = ""


@torch.no_grad()
def teacher_bits(teacher, tok, prompt, answer):
    """-log2 p(answer bytes, then the end-of-turn code | prompt) under the teacher, on canonical tokens."""
    context, ids = tok.encode_bytes(prompt), tok.encode_bytes(answer)
    logp = torch.log_softmax(teacher(torch.tensor([context + ids[:-1]])).float()[0], -1)
    return -logp[len(context) - 1:].gather(1, torch.tensor(ids)[:, None]).sum().item() / math.log(2)


def measure(student, fmt, teacher, tok, prompts, max_bytes=400, beam=marginal.BEAM, student_beam=4, progress=print,
            context="marginal"):
    started = time.time()
    asks = [fmt.render([{"role": "user", "content": tok.normalize(p)}]) for p in prompts]
    progress(f"the teacher answers {len(asks)} prompts")
    end_id = tok.code_ids[fmt.end_of_turn]
    ids = [tok.encode_bytes(a) for a in asks]
    answers = chat.teacher_answers(teacher, ids, max_bytes, {end_id, *({tok.eos_id} - {None})})
    teacher_out, teacher_ended = [], []
    for a in answers:
        ended = bool(a) and a[-1] in (end_id, tok.eos_id)
        text = tok.decode(a[:-1] if ended else a)
        teacher_ended.append(ended and len(text) <= max_bytes)
        teacher_out.append(text[:max_bytes])
    t_teacher = time.time() - started
    progress(f"the student answers ({t_teacher:.0f} s so far)")
    keep = [conditioning.token_ends(tok, a) for a in asks]
    if student_beam > 1:
        student_out, student_ended = map(list, zip(*[beam_search(
            student, a, max_bytes, student_beam, fmt.end_of_turn, start=conditioning.search_start(
                student, a, max_bytes, student_beam, beam, keep=k) if context == "marginal" else None)
            for a, k in zip(asks, keep)]))
    else:
        student_out, student_ended, _ = generate_student(student, asks, max_bytes, (0.0, None, 1.0, None), "joint",
                                                         fmt.end_of_turn, context=context, keep=keep)
    t_student = time.time() - started - t_teacher
    scored = [i for i, e in enumerate(teacher_ended) if e]
    progress(f"bits per byte on the teacher's {len(scored)} ended answers ({time.time() - started:.0f} s so far)")
    conts = [teacher_out[i] + fmt.end_of_turn for i in scored]
    old = marginal.marginal_logprobs(student, conts, beam, prompts=[asks[i] for i in scored])
    kept = [(keep[i], conditioning.token_ends(tok, c)) for i, c in zip(scored, conts)]
    new = conditioning.conditional_logprobs(student, [(asks[i], c) for i, c in zip(scored, conts)], beam, keep=kept)
    n_bytes = sum(map(len, conts))
    s_bits, s_bits_old = (-sum(float(s.sum()) for s in shares) / math.log(2) for shares in (new, old))
    t_bits = sum(teacher_bits(teacher, tok, asks[i], c) for i, c in zip(scored, conts))

    def prefix(a, b):
        k = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return k / max(len(b), 1)
    return {
        "n": len(prompts), "max_bytes": max_bytes, "beam": beam, "student_beam": student_beam, "context": context,
        "teacher_ended": sum(teacher_ended) / len(prompts), "student_ended": sum(student_ended) / len(prompts),
        "exact": sum(s == t for s, t in zip(student_out, teacher_out)) / len(prompts),
        "prefix": sum(prefix(s, t) for s, t in zip(student_out, teacher_out)) / len(prompts),
        "scored_answers": len(scored), "scored_bytes": n_bytes,
        "teacher_bpb": t_bits / max(n_bytes, 1), "student_bpb": s_bits / max(n_bytes, 1),
        "student_bpb_patcher_context": s_bits_old / max(n_bytes, 1),
        "teacher_answer_bytes": sum(map(len, teacher_out)) / len(prompts),
        "student_answer_bytes": sum(map(len, student_out)) / len(prompts),
        "seconds": {"teacher_answers": t_teacher, "student_answers": t_student,
                    "bits": time.time() - started - t_teacher - t_student},
        "answers": [{"prompt": p, "teacher": fmt.show(t), "student": fmt.show(s), "teacher_ended": te,
                     "student_ended": se} for p, t, s, te, se in zip(prompts, teacher_out, student_out, teacher_ended,
                                                                     student_ended)],
    }


def print_report(r, show=3):
    how = f"a beam of {r['student_beam']} over bytes" if r["student_beam"] > 1 else "greedy"
    print(f"\nchat on {r['n']} held-out prompts, the teacher greedy, the student by {how} (--context="
          f"{r['context']}), at most {r['max_bytes']} bytes per answer")
    print("| model | turns ended | mean answer bytes | bits per byte on the teacher's answers |")
    print("|---|---|---|---|")
    print(f"| teacher | {r['teacher_ended']:.0%} | {r['teacher_answer_bytes']:.0f} | {r['teacher_bpb']:.3f} |")
    print(f"| byte student | {r['student_ended']:.0%} | {r['student_answer_bytes']:.0f} | {r['student_bpb']:.3f} "
          f"(marginal, beam {r['beam']}; {r['student_bpb_patcher_context']:.3f} after the patcher's prompt flags) |")
    print(f"student = teacher byte for byte: {r['exact']:.0%} of answers; the student's answer starts with "
          f"{r['prefix']:.0%} of the teacher's on average; bits on the {r['scored_answers']} answers the teacher "
          f"ended ({r['scored_bytes']:,} bytes with their end codes)")
    s = r["seconds"]
    print(f"seconds: teacher answers {s['teacher_answers']:.0f}, student answers {s['student_answers']:.0f}, "
          f"bits {s['bits']:.0f}")
    for a in r["answers"][:show]:
        print(f"\n> {a['prompt'][:300]}\n  teacher{'' if a['teacher_ended'] else ' (no end)'}: {a['teacher'][:300]}"
              f"\n  student{'' if a['student_ended'] else ' (no end)'}: {a['student'][:300]}")


def main(argv):
    cfg = cli.parse_args(Config, argv)
    if cfg.n < 1 or cfg.max_bytes < 1 or cfg.beam < 1 or cfg.student_beam < 1:
        raise ValueError("--n, --max_bytes, --beam and --student_beam must be at least 1")
    if cfg.context not in ("marginal", "patcher"):
        raise ValueError(f"--context must be marginal or patcher, not {cfg.context!r}")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be float32 or bfloat16, not {cfg.dtype!r}")
    cli.print_config(cfg)
    dtype = getattr(torch, cfg.dtype)
    student, meta = checkpoint.load_student(cfg.ckpt, "cpu", dtype)
    fmt = chat_format(meta, cfg.ckpt)
    teacher, tok = load_teacher(meta["teacher"], "cpu", dtype)
    if {n: c for n, c in tok.codes.items()} != checkpoint.special_codes(meta, cfg.ckpt):
        raise ValueError(f"{cfg.ckpt}: its special codes are not those of teacher {meta['teacher']!r}'s tokenizer")
    if chat.read_chat_template(resolve_teacher_dir(meta["teacher"])) != meta.get("chat_template"):
        print("note: the teacher folder's chat template differs from the one the checkpoint recorded; using the "
              "checkpoint's for both models")
    started = time.time()
    r = measure(student, fmt, teacher, tok, data.chat_prompts("val", cfg.n), cfg.max_bytes, cfg.beam,
                cfg.student_beam, chat.timed_progress(started), cfg.context)
    print_report(r, cfg.show)
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump({"config": vars(cfg), **r}, f, indent=1, ensure_ascii=False)
        print(f"\nwrote {cfg.json}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
