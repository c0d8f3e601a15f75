"""The least time the retention suite could take here: the work `eval.py --compare --json` recorded per task (the
teacher's tokens; the student's main-network rows over the contexts, by the beam or the old prefill, and over
the continuations) at the main network's best measured throughput.

    python bench/eval_floor.py --json=out/eval_full.json [--rows=16] [--length=512]

The throughput: the teacher's forward to its hidden states (no output layer, no cache) on one batch of rows x
length tokens (the options), best of 3, on this machine's threads: the most rows per second the network both models
share runs at. Either model does more per row than that (the teacher's output layer where it scores, the student's
byte encoder, decoder, prior and beam bookkeeping, both models' cached attention), so each floor is a lower bound on
that model's time. The student's generation tasks (cute_count, cute_reverse, cute_spell) record no rows: their floor is 0.
"""
import json
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import cli  # noqa: E402
from teacher import load_teacher  # noqa: E402


@dataclass
class Config:
    json: str = "out/eval_full.json"  # eval.py --compare --json output (with per-task work)
    teacher: str = ""                 # default: the teacher the report's checkpoint names
    rows: int = 16
    length: int = 512
    threads: int = 0                  # 0: torch's default


def rows_per_second(teacher, rows, length, repeats=3):
    """Best-of-N tokens per second of the teacher's forward to hidden states on one (rows, length) batch."""
    ids = torch.randint(0, teacher.cfg.vocab_size, (rows, length))
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            teacher(ids, return_hidden=True)
            best = min(best, time.perf_counter() - start)
    return rows * length / best


def main(argv):
    cfg = cli.parse_args(Config, argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not os.path.exists(cfg.json):
        raise FileNotFoundError(f"{cfg.json}: run eval.py --compare --json={cfg.json} first")
    with open(cfg.json) as f:
        report = json.load(f)
    if not all(report.get(k, {}).get("work") for k in ("teacher", "student")):
        raise ValueError(f"{cfg.json} records no per-task work: it comes from an older eval.py; run it again")
    name = cfg.teacher or report["config"]["teacher"]
    if not name:
        import checkpoint
        name = checkpoint.read_student_config(report["config"]["ckpt"])[0]["teacher"]
    teacher, _ = load_teacher(name, "cpu", torch.float32)
    rate = rows_per_second(teacher, cfg.rows, cfg.length)
    print(f"teacher {name}: {rate:,.0f} rows/s through the network ({cfg.rows} x {cfg.length} tokens, best of 3, "
          f"{torch.get_num_threads()} threads)\n")
    print("| task | teacher tokens | student main rows (contexts + continuations) | floor s (teacher, student) | "
          "measured s (teacher, student) |")
    print("|---|---|---|---|---|")
    total = {"floor_t": 0.0, "floor_s": 0.0, "t": 0.0, "s": 0.0}
    t_work, s_work = report["teacher"]["work"], report["student"]["work"]
    for task in sorted(report["teacher"]["seconds"]):
        tokens = t_work.get(task, {}).get("tokens", 0)
        work = s_work.get(task, {})  # the contexts' rows: the beam's over them (context_rows), or the old prefill's
        prefill, beam = work.get("prefill_rows", 0) + work.get("context_rows", 0), work.get("main_rows", 0)
        ft, fs = tokens / rate, (prefill + beam) / rate
        t, s = report["teacher"]["seconds"][task], report["student"]["seconds"].get(task, 0.0)
        for k, v in zip(total, (ft, fs, t, s)):
            total[k] += v
        print(f"| {task} | {tokens:,} | {prefill + beam:,} ({prefill:,} + {beam:,}) | {ft:,.0f}, {fs:,.0f} | "
              f"{t:,.0f}, {s:,.0f} |")
    print(f"| all | | | {total['floor_t']:,.0f}, {total['floor_s']:,.0f} | {total['t']:,.0f}, {total['s']:,.0f} |")
    print(f"\nfloor for both models: {total['floor_t'] + total['floor_s']:,.0f} s; measured: "
          f"{total['t'] + total['s']:,.0f} s")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
