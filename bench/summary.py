"""The demo's closing table, from what the steps before it wrote (no new measurement):
out/stage1/config.json and out/stage2/config.json (training bytes/s and validation figures), out/fidelity.json (bits per
byte of teacher and student on held-out text), out/generate.json (generation bytes/s) and, where it exists,
out/eval.json (eval.py --compare's retention table) and out/chat.json (bench/chat.py).

    python bench/summary.py [--out=out]
"""
import json
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: E402


def load(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: run the step that writes it first (see demo.sh)")
    with open(path) as f:
        return json.load(f)


@dataclass
class Config:
    out: str = "out"  # the folder demo.sh wrote


def main(argv):
    out = cli.parse_args(Config, argv).out
    s1, s2 = load(f"{out}/stage1/config.json"), load(f"{out}/stage2/config.json")  # the byte-model folders' JSON
    fidelity, generate = load(f"{out}/fidelity.json"), load(f"{out}/generate.json")
    print(f"\n== summary: teacher {fidelity['teacher']}, student {fidelity['ckpt']}")
    print("| training phase | bytes | bytes/s | validation |")
    print("|---|---|---|---|")
    for results in (s1["results"], s2["results"]):
        for phase, r in results.items():
            rate = f"{r['bytes_per_s']:,.0f}" if r.get("bytes_per_s") else "-"
            print(f"| {phase} | {r['bytes']:,} | {rate} | " + ", ".join(f"{k} {v:.3f}" for k, v in r["val"].items()) + " |")
    print(f"\n| text | teacher bpb | teacher bpb (marginal) | student bpb (marginal, beam {fidelity['beam']}) | ratio "
          f"| student bpb (late flags) | ratio | flag F1 | bytes/patch | bytes/token |   (first "
          f"{fidelity['max_bytes']:,} bytes)")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in fidelity["texts"].items():
        print(f"| {name} | {r['teacher_bpb']:.3f} | {r['teacher_bpb_marginal']:.3f} | {r['student_bpb_marginal']:.3f} | "
              f"{r['ratio']:.3f} | {r['student_bpb_late']:.3f} | {r['ratio_late']:.2f} | {r['head_f1']:.3f} | "
              f"{r['mean_patch_bytes']:.2f} | {r['bytes_per_token']:.2f} |")
    print("\n| generation, batch | student bytes/s (joint, sample.py's default) | student/teacher | greedy flags "
          "| student/teacher | late flags | student/teacher | teacher bytes/s | student bytes/patch | teacher bytes/token "
          "|   (the same byte budget)")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for b, rate in generate["student_bytes_per_s"].items():
        print(f"| {b} | {rate:,.1f} | {generate['ratio'][b]:.2f} | {generate['greedy_bytes_per_s'][b]:,.1f} | "
              f"{generate['greedy_ratio'][b]:.2f} | {generate['late_bytes_per_s'][b]:,.1f} | "
              f"{generate['late_ratio'][b]:.2f} | {generate['teacher_bytes_per_s'][b]:,.1f} | "
              f"{generate['student_patch_bytes'][b]:.2f} | {generate['teacher_generated_bytes_per_token'][b]:.2f} |")
    if os.path.exists(f"{out}/eval.json"):
        report = load(f"{out}/eval.json")
        config, limit = report["config"], report["config"]["limit"]
        # a report written before --byte_model names it flags (marginal: the joint)
        used = config.get("byte_model") or {"marginal": "joint"}.get(config["flags"], config["flags"])
        print(f"\n== task retention (eval.py --compare, student --byte_model={used}"
              + (f", a subset: the first {limit:g} items of each task)" if limit else ", every item)"))
        print(report["retention"]["table"])
    if os.path.exists(f"{out}/chat.json"):
        r = load(f"{out}/chat.json")
        how = f"a beam of {r['student_beam']} over bytes" if r.get("student_beam", 1) > 1 else "greedy"
        print(f"\n== chat (bench/chat.py: {r['n']} held-out prompts in the teacher's template; the teacher greedy, "
              f"the student by {how}; at most {r['max_bytes']} bytes per answer)")
        print("| model | turns ended | mean answer bytes | bits per byte on the teacher's ended answers |")
        print("|---|---|---|---|")
        print(f"| teacher | {r['teacher_ended']:.0%} | {r['teacher_answer_bytes']:.0f} | {r['teacher_bpb']:.3f} |")
        print(f"| byte student | {r['student_ended']:.0%} | {r['student_answer_bytes']:.0f} | {r['student_bpb']:.3f} |")
        print(f"the student's answer is the teacher's byte for byte in {r['exact']:.0%} of prompts")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(f"error: {e}")
