"""How much of a context the beam has to read: conditioning on the marginal over the patchings of a context's last N
bytes only (the bytes before along their canonical token ends, in one prefill; conditioning.context_beam's tail)
against the beam over the whole context, on the first items of the local multiple-choice tasks.

    python bench/context_tail.py --ckpt=out/stage2 [--tasks=code_nextline,swag_plays] [--items=60]
                                 [--tails=0,128,64,32,16] [--patcher=True]

Each row scores every choice of the same items as eval.py does (lm-eval's split, the tokenizer's normaliser, the
token ends of the context and of each choice kept in the beam, beam 4): tail 0 reads the whole context (the exact
rule), "patcher" the old one (the context prefilled along the patcher's flags). Columns: the items' accuracy (the
choice with the highest log-likelihood), the student's bits per byte on the true choices, the mean absolute change
of a true choice's bits against tail 0, how often the picked choice differs from tail 0's, the seconds and the main
network's rows (contexts' prefill and beam + choices' beam).
"""
import json
import math
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: E402
import conditioning  # noqa: E402
from eval_profile import MULTIPLE_CHOICE, choice_requests  # noqa: E402  (bench/, this script's folder)
import marginal  # noqa: E402


@dataclass
class Config:
    ckpt: str = "out/stage2"
    tasks: str = "code_nextline,swag_plays"
    items: int = 60
    tails: str = "0,128,64,32,16"  # 0: the whole context
    patcher: bool = True           # also the old rule, for reference
    beam: int = marginal.BEAM
    json: str = ""


def score(lm, pairs, tail, beam):
    """-> (log-likelihood per pair in nats, seconds, main rows)."""
    ctxs, conts = [c for c, _ in pairs], [x for _, x in pairs]
    kept = [conditioning.token_ends(lm.tok, x) for x in conts]
    work, start = {}, time.perf_counter()
    if tail == "patcher":
        shares = marginal.marginal_logprobs(lm.model, conts, beam, prompts=ctxs, keep=kept, stats=work)
    else:
        ends = {c: conditioning.token_ends(lm.tok, c) for c in dict.fromkeys(ctxs)}
        shares = conditioning.conditional_logprobs(lm.model, pairs, beam, keep=[(ends[c], k) for c, k in
                                                                                 zip(ctxs, kept)],
                                                   stats=work, tail=int(tail) or None)
    seconds = time.perf_counter() - start
    rows = sum(work.get(k, 0) for k in ("context_rows", "prefill_rows", "main_rows"))
    return [float(s.sum()) for s in shares], seconds, rows


def main(argv):
    cfg = cli.parse_args(Config, argv)
    import eval as ev
    lm = ev.StudentLM.load(cfg.ckpt)
    rows = []
    settings = [t for t in cfg.tails.split(",") if t] + (["patcher"] if cfg.patcher else [])
    for task in cfg.tasks.split(","):
        if task not in MULTIPLE_CHOICE:
            raise ValueError(f"--tasks: {task} is not one of {', '.join(MULTIPLE_CHOICE)}")
        docs, pairs, owner = choice_requests(lm, task, cfg.items)
        context_bytes = sum(map(len, dict.fromkeys(c for c, _ in pairs))) / len(docs)
        print(f"{task}: {len(docs)} items, {len(pairs)} requests, contexts {context_bytes:.0f} bytes on average",
              flush=True)
        base = None
        for tail in settings:
            ll, seconds, work = score(lm, pairs, tail, cfg.beam)
            picks, true_bits, true_bytes = [], [], 0
            for i, d in enumerate(docs):
                mine = [k for k, o in enumerate(owner) if o == i]
                picks.append(max(range(len(mine)), key=lambda j: ll[mine[j]]))
                true = mine[int(d["answer"])]
                true_bits.append(-ll[true] / math.log(2))
                true_bytes += len(pairs[true][1])
            if base is None:
                base = (picks, true_bits)
            row = {"task": task, "tail": tail, "acc": sum(p == int(d["answer"]) for p, d in zip(picks, docs)) / len(docs),
                   "bpb_true": sum(true_bits) / true_bytes,
                   "mean_abs_change_bits": sum(abs(a - b) for a, b in zip(true_bits, base[1])) / len(docs),
                   "picks_changed": sum(a != b for a, b in zip(picks, base[0])) / len(docs),
                   "seconds": seconds, "main_rows": work}
            rows.append(row)
            print(f"  tail {tail}: acc {row['acc']:.3f}, bpb {row['bpb_true']:.3f}, {seconds:.1f} s", flush=True)
    print("\n| task | tail (bytes; 0: whole context) | acc | bits per byte, true choices | mean abs change, bits "
          "(vs 0) | picks changed (vs 0) | seconds | main rows |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['tail']} | {r['acc']:.3f} | {r['bpb_true']:.3f} | {r['mean_abs_change_bits']:.3f} | "
              f"{r['picks_changed']:.3f} | {r['seconds']:.1f} | {r['main_rows']:,} |")
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump({"config": vars(cfg), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
