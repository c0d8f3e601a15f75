"""Budget study and ablation: the whole pipeline at several byte budgets and with several byte heads, so the trend of
student/teacher bits per byte against training bytes is visible rather than one point, and the heads are compared on
the same bytes by the same measure.

    python bench/budget.py [--scales=0.25,0.5,1] [--variants=prior] [--out=out/budget] [--max_bytes=2000]
                           [--window=256] [--json=OUT] [--reuse=1] [--known=prior:1:out] [--retention_limit=100]

Scale s multiplies every phase budget of demo.sh's run (the Config fields below; demo.sh is scale 1 of "prior").
The variants (the byte head and how its decoder learns; the input side with or without the subword embedding):
  prior       the default: learned logits plus a learned multiple of the teacher's own prior for each byte of a
              patch, and h with the subword embedding (the longest vocabulary entry ending at each byte)
  pure        --prior=False: the paper's pure learned head, hard labels only (its decoder learns in stage 2's warm-up)
  pure_exact  --prior=False plus stage 1's decoder phase (--decoder_bytes, scaled too): the output side learns to
              spell from the teacher's hidden states at the true token ends, 10 x KL to the exact byte targets plus CE
  X_nosub     variant X with --subword=False (the encoder alone makes h)
  prior_soft  prior, with stage 2 distilling as well: --soft_weight=1 (KL to the teacher's exact byte targets added
              to the hard labels' CE in both of its phases)
  X+P_xM      the phase study: variant X with phase P's budget (align, distill, boundary, warmup, e2e, decoder) times M
              on top of the scale, e.g. prior+align_x2 doubles align, prior+distill_x0 skips distill; several may
              follow one another (prior+align_x2+e2e_x0); decoder_xM adds that phase to a variant without it
Each (variant, scale) runs stage1_kd.py, stage2_sft.py, bench/fidelity.py (the headline: the student's marginal over
patchings, --greedy=False) and eval.py --compare on the first --retention_limit items of each multiple-choice task of
the retention suite (retention: student/teacher accuracy, through eval.py's default conditioning) as separate
processes, one after the other (two CPU-heavy processes at once on
2 cores slow each other down several times). --reuse=1 skips a run whose fidelity JSON already exists, so an
interrupted study continues. --known=VARIANT:SCALE:FOLDER adds a run made earlier (demo.sh's out/ is prior:1, its
fidelity.json at the same --max_bytes and --window); its wall time is not known here and shows as "-".
"""
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import cli  # noqa: E402

HEADS = {"prior": [], "pure": ["--prior=False"], "pure_exact": ["--prior=False"]}
VARIANTS = {**HEADS, **{f"{k}_nosub": [*v, "--subword=False"] for k, v in HEADS.items()}}  # stage 1's flags
STAGE2 = {"prior_soft": ["--soft_weight=1"]}  # variants of the default with stage 2's flags
VARIANTS.update({k: [] for k in STAGE2})


@dataclass
class Config:
    scales: str = "0.25,0.5,1"     # multiples of the budgets below
    variants: str = "prior"         # comma-separated names from VARIANTS
    out: str = "out/budget"
    max_bytes: int = 2000           # bench/fidelity.py --max_bytes (demo.sh's)
    window: int = 256               # bench/fidelity.py --window (demo.sh's)
    json: str = ""
    retention_limit: int = 100      # items per task for the retention (eval.py --compare --limit; 0: no retention)
    retention_tasks: str = "code_nextline,cute_contains,shakespeare_cloze,swag_plays"  # blm_retention's multiple choice
    reuse: bool = True              # skip a run (or its retention) whose JSON already exists
    known: str = ""                 # VARIANT:SCALE:FOLDER[,...] runs made earlier with these budgets scaled by SCALE
    chat_data: str = "shards/smollm2-chat"  # as demo.sh: data.py --chat's transcripts in a quarter of the rows ("": none)
    # scale 1 = demo.sh's budgets, in training bytes
    align_bytes: int = 800_000
    distill_bytes: int = 49_152
    boundary_bytes: int = 250_000
    decoder_bytes: int = 200_000    # pure_exact(_nosub) only
    warmup_bytes: int = 150_000
    e2e_bytes: int = 49_152


PHASES = ("align", "distill", "boundary", "decoder", "warmup", "e2e")


def parse_variant(name):
    """"X+P_xM+..." -> (X, {"P_bytes": M}); raises ValueError naming what is wrong."""
    base, *parts = name.split("+")
    if base not in VARIANTS:
        raise ValueError(f"unknown variant {base!r}; choose from {', '.join(VARIANTS)}")
    times = {}
    for part in parts:
        phase, _, m = part.rpartition("_x")
        try:
            times[f"{phase}_bytes"] = float(m)
        except ValueError:
            phase = ""
        if phase not in PHASES or times[f"{phase}_bytes"] < 0:
            raise ValueError(f"variant {name!r}: expected PHASE_xM after '+' (PHASE one of {', '.join(PHASES)}, M >= 0)")
    return base, times


def budgets(cfg, variant, scale):
    """-> ({stage-1 flag: bytes}, {stage-2 flag: bytes}) for one run."""
    base, times = parse_variant(variant)
    exact = base.startswith("pure_exact")
    decoder = exact or "decoder_bytes" in times  # prior+decoder_x1: the prior variant with the decoder phase
    names1 = ["align_bytes", "distill_bytes", "boundary_bytes"] + (["decoder_bytes"] if decoder else [])
    s1 = {k: int(getattr(cfg, k) * scale * times.get(k, 1)) for k in names1}
    s2 = {k: int(getattr(cfg, k) * scale * times.get(k, 1)) for k in ("warmup_bytes", "e2e_bytes")}
    return s1, s2


def run(cmd):
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run([sys.executable, *cmd], cwd=REPO, check=True)


def one_run(cfg, variant, scale, folder=None):
    known = folder is not None
    folder = folder or os.path.join(cfg.out, f"{variant}-scale{scale:g}")
    fid = os.path.join(folder, "fidelity.json")
    s1, s2 = budgets(cfg, variant, scale)
    if not known and not (cfg.reuse and os.path.exists(fid)):
        t = time.time()
        chat = [f"--chat_data={cfg.chat_data}"] if cfg.chat_data else []
        base = parse_variant(variant)[0]
        run(["stage1_kd.py", f"--out_dir={folder}/stage1", *chat, *VARIANTS[base],
             *(f"--{k}={v}" for k, v in s1.items())])
        run(["stage2_sft.py", f"--init={folder}/stage1", f"--out_dir={folder}/stage2", *STAGE2.get(base, []),
             *(f"--{k}={v}" for k, v in s2.items())])
        trained = time.time() - t
        run(["bench/fidelity.py", f"--ckpt={folder}/stage2", f"--max_bytes={cfg.max_bytes}", f"--window={cfg.window}",
             "--greedy=False", f"--json={fid}"])
        with open(os.path.join(folder, "wall_s.json"), "w") as f:
            json.dump({"wall_s": trained}, f)  # both stages' training, not the measurements
    if not os.path.exists(fid):
        raise FileNotFoundError(f"{fid}: no fidelity JSON for {variant}:{scale:g} (run bench/fidelity.py --json=...)")
    with open(fid) as f:
        texts = json.load(f)["texts"]
    wall = None
    if os.path.exists(os.path.join(folder, "wall_s.json")):
        with open(os.path.join(folder, "wall_s.json")) as f:
            wall = json.load(f)["wall_s"]
    return {"variant": variant, "scale": scale, "training_bytes_budget": sum(s1.values()) + sum(s2.values()),
            "wall_s": wall, "texts": texts, "retention": retention(cfg, folder)}


def retention(cfg, folder):
    """eval.py --compare on the first --retention_limit items of each task (reused where its JSON exists) -> its
    retention rows and mean, or None without --retention_limit."""
    if cfg.retention_limit <= 0:
        return None
    out = os.path.join(folder, f"eval{cfg.retention_limit}.json")
    if not (cfg.reuse and os.path.exists(out)):
        run(["eval.py", "--compare", f"--ckpt={folder}/stage2", f"--tasks={cfg.retention_tasks}",
             f"--limit={cfg.retention_limit}", "--batch_size=64", f"--json={out}"])
    with open(out) as f:
        report = json.load(f)
    rows = [r for r in report["retention"]["rows"] if r["metric"] == "acc" and r.get("teacher_bpb")]
    return {"rows": report["retention"]["rows"], "mean_mc_acc": report["retention"]["mean_mc_acc"],
            "bpb_ratio": sum(r["student_bpb"] / r["teacher_bpb"] for r in rows) / max(len(rows), 1),
            "seconds": sum(report["student"]["seconds"].values())}


def main(argv):
    cfg = cli.parse_args(Config, argv)
    variants = [v for v in cfg.variants.split(",") if v]
    for v in variants + [k.split(":")[0] for k in cfg.known.split(",") if k]:
        parse_variant(v)
    rows = []
    for item in filter(None, cfg.known.split(",")):
        variant, scale, folder = (item.split(":", 2) + ["", ""])[:3]
        if not folder:
            raise ValueError(f"--known={item!r}: expected VARIANT:SCALE:FOLDER")
        rows.append(one_run(cfg, variant, float(scale), folder))
    done = {(r["variant"], r["scale"]) for r in rows}
    for variant in variants:
        for s in filter(None, cfg.scales.split(",")):
            if (variant, float(s)) not in done:
                rows.append(one_run(cfg, variant, float(s)))
    rows.sort(key=lambda r: (r["variant"], r["scale"]))
    print("\n| variant | scale | training bytes (budget, both stages) | wall s | text | teacher bpb | student bpb (marginal) "
          "| ratio | token-level ratio | flag F1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for name, t in r["texts"].items():
            wall = f"{r['wall_s']:.0f}" if r["wall_s"] is not None else "-"
            print(f"| {r['variant']} | {r['scale']:g} | {r['training_bytes_budget']:,} | {wall} | {name} | "
                  f"{t['teacher_bpb']:.3f} | {t['student_bpb_marginal']:.3f} | {t['ratio']:.2f} | "
                  f"{t['student_token_bpb'] / t['teacher_bpb']:.2f} | {t['head_f1']:.3f} |")
    scored = [r for r in rows if r["retention"]]
    if scored:
        tasks = [t for t in cfg.retention_tasks.split(",") if t]
        print(f"\nretention (acc, student/teacher) on the first {cfg.retention_limit} items of each task, through "
              "eval.py's default conditioning (± one standard error), and the mean over the tasks of student/teacher "
              "bits per byte on their true continuations:\n")
        print("| variant | scale | training bytes | wall s | " + " | ".join(tasks) + " | mean | task bits ratio "
              "| student eval s |")
        print("|---|---|---|---|" + "---|" * (len(tasks) + 3))
        for r in scored:
            acc = {x["task"]: x for x in r["retention"]["rows"] if x["metric"] == "acc"}
            cells = [f"{acc[t]['retention']:.3f} ± {acc[t]['retention_se'] or 0:.3f}" if t in acc else "-"
                     for t in tasks]
            wall = f"{r['wall_s']:.0f}" if r["wall_s"] is not None else "-"
            print(f"| {r['variant']} | {r['scale']:g} | {r['training_bytes_budget']:,} | {wall} | " + " | ".join(cells)
                  + f" | {r['retention']['mean_mc_acc']:.3f} | {r['retention']['bpb_ratio']:.3f} "
                  f"| {r['retention']['seconds']:.0f} |")
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, subprocess.CalledProcessError) as e:
        sys.exit(f"error: {e}")
