"""Where the byte student's time goes on a multiple-choice task: cProfile of the marginal's beam on the first items of
a local task, the requests eval.py makes (each choice after its item's context, lm-eval's split, the token ends
kept), with the share of the whole each part takes.

    python bench/eval_profile.py --ckpt=out/stage2 --task=swag_plays --items=32 [--slots=128,512] [--context=patcher]

One row per slots value (hypotheses per lockstep batch; eval.py uses 128), each a fresh profile of the same requests.
--context=marginal (eval.py's default: the beam reads each context from the document start, then forks into its
choices; conditioning.py) or patcher (the old rule: the contexts prefilled along the patcher's flags, then the beam
over the choices). The parts (each a share of the whole; they overlap where one calls another): the beam over the
contexts (marginal) or their prefill (patcher); the main network in the beam's steps (contexts' and choices'); the
reads of cached keys and values (every network's, each row its own copy) and attention; copying cache rows at forks;
the decoder; the prior's prefix sums; the beam's bookkeeping (Beam.choose).
"""
import cProfile
import json
import os
import pstats
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tasks"))
import torch  # noqa: E402

import cli  # noqa: E402
import conditioning  # noqa: E402
import marginal  # noqa: E402

MULTIPLE_CHOICE = {"swag_plays": "", "code_nextline": "", "shakespeare_cloze": " "}  # each task's target_delimiter


@dataclass
class Config:
    ckpt: str = "out/stage2"
    task: str = "swag_plays"   # swag_plays | code_nextline | shakespeare_cloze
    items: int = 32
    slots: str = "128"         # comma-separated
    beam: int = marginal.BEAM
    context: str = "marginal"  # marginal | patcher (eval.py --context)
    threads: int = 0           # 0: torch's default


def cumtime(stats, file, name, caller=None):
    """Seconds spent in a function, callees included (from one caller only, given as (file, name))."""
    total = 0.0
    for (f, _, n), (_, _, _, ct, callers) in stats.stats.items():
        if f.endswith(file) and n == name:
            total += ct if caller is None else sum(v[3] for (cf, _, cn), v in callers.items()
                                                   if cf.endswith(caller[0]) and cn == caller[1])
    return total


def choice_requests(lm, task, items):
    """The first `items` items of a local multiple-choice task as eval.py asks them of the student lm (eval.StudentLM):
    -> (the items, [(context bytes, choice bytes)] every choice of every item in order, each pair's item index)."""
    import build
    import eval as ev
    path = os.path.join(build.OUT, f"{task}.test.jsonl")
    if not os.path.exists(path):
        build.build()
    with open(path, encoding="utf-8") as f:
        docs = [json.loads(line) for line in f][:items]
    pairs, owner = [], []
    for i, d in enumerate(docs):
        for c in d["choices"]:
            context, choice = ev.normalized_pair(lm.tok, *ev.lm_eval_split(d["context"], MULTIPLE_CHOICE[task] + c))
            pairs.append((ev.keep_last(context, lm.max_bytes - len(choice)), choice))
            owner.append(i)
    return docs, pairs, owner


def main(argv):
    cfg = cli.parse_args(Config, argv)
    if cfg.context not in ("marginal", "patcher"):
        raise ValueError(f"--context={cfg.context}: marginal or patcher")
    if cfg.task not in MULTIPLE_CHOICE:
        raise ValueError(f"--task={cfg.task}: one of swag_plays, code_nextline, shakespeare_cloze")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    import eval as ev
    lm = ev.StudentLM.load(cfg.ckpt)
    docs, pairs, _ = choice_requests(lm, cfg.task, cfg.items)
    ctxs, conts = [c for c, _ in pairs], [x for _, x in pairs]
    keep = [ev.token_ends(lm.tok, x) for x in conts]
    ends = {c: ev.token_ends(lm.tok, c) for c in dict.fromkeys(ctxs)}
    print(f"{cfg.task}: {len(docs)} items, {len(pairs)} requests, {sum(map(len, conts)):,} choice bytes, "
          f"{sum(map(len, dict.fromkeys(ctxs))):,} context bytes, beam {cfg.beam}, --context={cfg.context}, "
          f"{torch.get_num_threads()} threads\n")
    print("| slots | seconds | contexts | main in beam steps | cache reads | attention | forks | decoder | "
          "prior sums | bookkeeping | main rows (contexts + choices) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for slots in map(int, cfg.slots.split(",")):
        work, profile = {}, cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        if cfg.context == "marginal":
            conditioning.conditional_logprobs(lm.model, list(zip(ctxs, conts)), cfg.beam,
                                              keep=[(ends[c], k) for c, k in zip(ctxs, keep)], slots=slots, stats=work)
        else:
            marginal.marginal_logprobs(lm.model, conts, cfg.beam, prompts=ctxs, keep=keep, slots=slots, stats=work)
        profile.disable()
        total = time.perf_counter() - start
        s = pstats.Stats(profile)
        attention = sum(v[3] for k, v in s.stats.items() if "scaled_dot_product_attention" in k[2])
        contexts = cumtime(s, "conditioning.py", "context_beam") + cumtime(s, "decoding.py", "_prefill")
        parts = [contexts, cumtime(s, "transformer.py", "run_blocks", ("marginal.py", "step")),
                 cumtime(s, "transformer.py", "_read"), attention, cumtime(s, "marginal.py", "fork"),
                 cumtime(s, "model.py", "decode"), cumtime(s, "model.py", "prior_cumulative"),
                 cumtime(s, "marginal.py", "choose")]
        context_rows = work.get("context_rows", 0) + work.get("prefill_rows", 0)
        print(f"| {slots} | {total:.1f} | " + " | ".join(f"{p / total:.0%}" for p in parts) +
              f" | {context_rows + work['main_rows']:,} ({context_rows:,} + {work['main_rows']:,}) |")
    print("\n(cache reads and attention count every network, contexts included; the decoder counts the prefill's pass)")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
