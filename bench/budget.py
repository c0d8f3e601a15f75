"""Budget study: the whole pipeline at several byte budgets, so the trend of student/teacher bits per byte against
training bytes is visible rather than one point.

    python bench/budget.py [--scales=0.25,0.5,1] [--out=out/budget] [--max_bytes=20000] [--json=OUT] [--reuse=1]
                           [--known=1:out]

Scale s multiplies every phase budget of the stage-1 and stage-2 defaults (the demo's run is scale 1). Each scale
runs stage1_kd.py, stage2_sft.py and bench/fidelity.py as separate processes, one after the other (two CPU-heavy
processes at once on 2 cores slow each other down several times). --reuse=1 skips a scale whose fidelity JSON
already exists, so an interrupted study continues. --known=SCALE:FOLDER adds a run made earlier with the same
defaults scaled by SCALE (demo.sh's out/ is scale 1, with fidelity.json at the same --max_bytes); its wall time is
not known and shows as "-".
"""
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import stage1_kd  # noqa: E402
import stage2_sft  # noqa: E402
import train  # noqa: E402

STAGE1_BUDGETS = ("align_bytes", "distill_bytes", "boundary_bytes")
STAGE2_BUDGETS = ("warmup_bytes", "e2e_bytes")


def run(cmd):
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run([sys.executable, *cmd], cwd=REPO, check=True)


def one_scale(scale, out, max_bytes, reuse, folder=None):
    known = folder is not None
    folder = folder or os.path.join(out, f"scale{scale:g}")
    fid = os.path.join(folder, "fidelity.json")
    if not known and not (reuse and os.path.exists(fid)):
        t = time.time()
        s1 = [f"--{k}={int(getattr(stage1_kd.Config, k) * scale)}" for k in STAGE1_BUDGETS]
        s2 = [f"--{k}={int(getattr(stage2_sft.Config, k) * scale)}" for k in STAGE2_BUDGETS]
        run(["stage1_kd.py", f"--out_dir={folder}/stage1", *s1])
        run(["stage2_sft.py", f"--init={folder}/stage1", f"--out_dir={folder}/stage2", *s2])
        run(["bench/fidelity.py", f"--ckpt={folder}/stage2", f"--max_bytes={max_bytes}", f"--json={fid}"])
        with open(os.path.join(folder, "wall_s.json"), "w") as f:
            json.dump({"wall_s": time.time() - t}, f)
    with open(fid) as f:
        texts = json.load(f)["texts"]
    training_bytes = sum(int(getattr(stage1_kd.Config, k) * scale) for k in STAGE1_BUDGETS) + \
        sum(int(getattr(stage2_sft.Config, k) * scale) for k in STAGE2_BUDGETS)
    wall = None
    if os.path.exists(os.path.join(folder, "wall_s.json")):
        with open(os.path.join(folder, "wall_s.json")) as f:
            wall = json.load(f)["wall_s"]
    return {"scale": scale, "training_bytes_budget": training_bytes, "wall_s": wall, "texts": texts}


@dataclass
class Config:
    scales: str = "0.25,0.5,1"  # multiples of the stage-1 and stage-2 default budgets
    out: str = "out/budget"
    max_bytes: int = 20000      # bench/fidelity.py --max_bytes
    json: str = ""
    reuse: bool = True          # skip a scale whose fidelity JSON already exists
    known: str = ""             # SCALE:FOLDER[,...] runs made earlier with the defaults scaled by SCALE


def main(argv):
    cfg = train.parse_args(Config, argv)
    rows = [one_scale(float(s), cfg.out, cfg.max_bytes, cfg.reuse) for s in cfg.scales.split(",") if s]
    for item in filter(None, cfg.known.split(",")):
        scale, _, folder = item.partition(":")
        rows.append(one_scale(float(scale), cfg.out, cfg.max_bytes, True, folder))
    rows.sort(key=lambda r: r["scale"])
    print("\n| scale | training bytes (budget, both stages) | wall s | text | teacher bpb | student bpb | ratio | "
          "head-flag F1 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        for name, t in r["texts"].items():
            wall = f"{r['wall_s']:.0f}" if r["wall_s"] is not None else "-"
            print(f"| {r['scale']:g} | {r['training_bytes_budget']:,} | {wall} | {name} | "
                  f"{t['teacher_bpb']:.3f} | {t['student_bpb']:.3f} | {t['ratio']:.2f} | {t['head_f1']:.3f} |")
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, subprocess.CalledProcessError) as e:
        sys.exit(f"error: {e}")
