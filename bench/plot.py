"""Pictures of a run, from the files the steps wrote (no new measurement): PNGs beside them, paths printed.

    python bench/plot.py [--out=out] [--runs=DIR,DIR] [--fidelity=FILE] [--budget=FILE]

  training.png  every phase's training figures against its optimizer step (metrics.jsonl of each stage's out_dir),
                with the phase's validation figures (config.json "results") as markers at its last step
  fidelity.png  bench/fidelity.py's decomposition (its --json): bits per byte of teacher and student on the same
                bytes, one bar group per figure, one bar per text
  budget.png    bench/budget.py's study (its --json): retention and the student/teacher bits ratio against
                training bytes
  retention.png eval.py --compare's retention table (its --json): per task the teacher's and the student's score
                (accuracy or exact match) with one standard error, and student/teacher with the multiple-choice mean
Defaults: --runs = every folder under --out with a metrics.jsonl (out/stage1, out/stage2); --fidelity =
out/fidelity.json, --budget = out/budget.json and --eval = out/eval.json where they exist. Needs matplotlib (setup.sh installs it).
"""
import json
import math
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: E402

# bench/fidelity.py's figures, in the order its docstring explains them (teacher side, then student side)
FIDELITY_BARS = ("teacher_bpb", "teacher_byte_bpb", "teacher_byte_bpb_greedy", "student_token_bpb",
                 "teacher_bpb_marginal", "student_bpb_true_patches", "student_bpb_marginal", "student_bpb_late",
                 "student_bpb_greedy", "student_bpb_lookahead")
NOT_PLOTTED = ("phase", "step", "grad_norm")


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt
    return plt


def read_run(folder):
    """-> ({phase: [metrics.jsonl rows]} in the order phases ran, {phase: validation figures})."""
    phases = {}
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                phases.setdefault(row["phase"], []).append(row)
    results = {}
    if os.path.exists(os.path.join(folder, "config.json")):
        with open(os.path.join(folder, "config.json")) as f:
            results = json.load(f).get("results", {})
    return phases, {p: r.get("val", {}) for p, r in results.items()}


def training_figure(folders):
    """One panel per (stage, phase): each figure of metrics.jsonl against the step, validation as markers."""
    plt = pyplot()
    panels = []
    for folder in folders:
        phases, val = read_run(folder)
        panels += [(os.path.basename(os.path.normpath(folder)), p, rows, val.get(p, {})) for p, rows in phases.items()]
    cols = min(3, max(len(panels), 1))
    nrows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 3.8 * nrows), squeeze=False)
    for ax, (stage, phase, rows, figures) in zip(axes.flat, panels):
        steps = [r["step"] for r in rows]
        names = [k for k in rows[0] if k not in NOT_PLOTTED]
        for i, name in enumerate(names):
            line, = ax.plot(steps, [r.get(name, float("nan")) for r in rows], label=name, color=f"C{i}",
                            marker="." if len(steps) < 30 else None)  # a phase of one step is one point
            if name in figures:  # the validation figure of the phase's final checkpoint
                ax.plot([steps[-1]], [figures[name]], "o", color=line.get_color(), label=f"val {name}")
        ax.set_title(f"{stage} / {phase}")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("training figures per phase (lines: each step's batch; dots: validation at the phase's end)")
    fig.tight_layout()
    return fig


def fidelity_figure(fidelity):
    """Grouped bars: bench/fidelity.py's figures, one bar per text."""
    plt = pyplot()
    texts = fidelity["texts"]
    fig, ax = plt.subplots(figsize=(12, 4.8))
    width = 0.8 / max(len(texts), 1)
    for i, (name, r) in enumerate(texts.items()):
        xs = [j + (i - (len(texts) - 1) / 2) * width for j in range(len(FIDELITY_BARS))]
        bars = ax.bar(xs, [r.get(k, math.nan) for k in FIDELITY_BARS], width, label=f"{name} ({r.get('bytes', 0):,} bytes)")
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(FIDELITY_BARS)), [k.replace("_bpb", "").replace("_", " ") or k for k in FIDELITY_BARS],
                  rotation=20, fontsize=8)
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title(f"where the bits go: {fidelity.get('ckpt', '')} against teacher {fidelity.get('teacher', '')} "
                 "(student = the proper likelihood; lookahead is not a likelihood)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def budget_figure(rows):
    """Against training bytes (log scale), one mark per variant: retention (the multiple-choice tasks' mean, solid, and
    each task, dotted; where the rows have it) and student/teacher bits per byte on each fidelity text (and, dashed,
    on the tasks' true continuations where the rows have it)."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    variants = sorted({r.get("variant", "prior") for r in rows})
    for mark, variant in zip("os^dvPX*h", variants):  # as many marks as budget.VARIANTS
        runs = sorted((r for r in rows if r.get("variant", "prior") == variant),
                      key=lambda r: r["training_bytes_budget"])
        xs = [r["training_bytes_budget"] for r in runs]
        scored = [r for r in runs if r.get("retention")]
        if scored:
            at = [r["training_bytes_budget"] for r in scored]
            left.plot(at, [r["retention"]["mean_mc_acc"] for r in scored], f"{mark}-", color="k",
                      label=f"mean ({variant})")
            tasks = [x["task"] for x in scored[0]["retention"]["rows"] if x["metric"] == "acc"]
            for i, task in enumerate(tasks):
                acc = [next((x["retention"] for x in r["retention"]["rows"] if x["task"] == task
                             and x["metric"] == "acc"), math.nan) for r in scored]
                left.plot(at, acc, f"{mark}:", color=f"C{i}", alpha=0.7, label=f"{task} ({variant})")
        for i, name in enumerate(runs[0]["texts"]):
            right.plot(xs, [r["texts"][name]["ratio"] for r in runs], f"{mark}-", color=f"C{i}",
                       label=f"{name} ({variant})")
        if any("bpb_ratio" in r["retention"] for r in scored):
            right.plot(at, [r["retention"].get("bpb_ratio", math.nan) for r in scored], f"{mark}--", color="k",
                       label=f"the tasks' continuations, mean ({variant})")
    left.axhline(0.95, color="gray", lw=0.8, ls="--")  # the recipe's goal
    for ax in (left, right):
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")  # the teacher itself
        ax.set_xscale("log")
        ax.set_xlabel("training bytes (both stages)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    left.set_ylabel("retention: student acc / teacher acc")
    right.set_ylabel("student bpb / teacher bpb (marginal)")
    fig.suptitle("budget study (bench/budget.py)")
    fig.tight_layout()
    return fig


def retention_figure(report):
    """eval.py --json's retention rows with a score in [0, 1] (acc, exact_match; acc_norm left out)."""
    plt = pyplot()
    rows = [r for r in report["retention"]["rows"] if r["metric"] in ("acc", "exact_match")]
    if not rows:
        raise ValueError("the eval report has no accuracy rows to draw")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = list(range(len(rows)))
    for k, (who, shift) in enumerate((("teacher", -0.2), ("student", 0.2))):
        left.bar([i + shift for i in x], [r[who] for r in rows], 0.4, label=who,
                 yerr=[r[f"{who}_se"] or 0 for r in rows], capsize=3)
    right.bar(x, [r["retention"] for r in rows], 0.6, yerr=[r["retention_se"] or 0 for r in rows], capsize=3,
              color="tab:green")
    right.axhline(1.0, color="gray", lw=1)
    mean = report["retention"].get("mean_mc_acc")
    if mean is not None:
        right.axhline(mean, color="tab:red", ls="--", lw=1, label=f"multiple-choice mean {mean:.3f}")
        right.legend(fontsize=8)
    for ax, title in ((left, "score (one standard error)"), (right, "student / teacher")):
        ax.set_xticks(x)
        ax.set_xticklabels([f"{r['task']}\n{r['metric']}" for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    left.legend(fontsize=8)
    limit = report.get("config", {}).get("limit") or 0
    fig.suptitle("task retention (eval.py --compare)" + (f", first {limit:g} items per task" if limit else ""))
    fig.tight_layout()
    return fig


@dataclass
class Config:
    out: str = "out"        # where the PNGs go, and where the default inputs are looked for
    runs: str = ""          # comma-separated stage out_dirs; default: every folder under --out with a metrics.jsonl
    fidelity: str = ""      # bench/fidelity.py --json output; default: out/fidelity.json if it exists
    budget: str = ""        # bench/budget.py --json output; default: out/budget.json if it exists
    eval: str = ""          # eval.py --compare --json output; default: out/eval.json if it exists


def main(argv):
    cfg = cli.parse_args(Config, argv)
    runs = [r for r in cfg.runs.split(",") if r] or sorted(
        os.path.join(cfg.out, d) for d in os.listdir(cfg.out) if os.path.isfile(os.path.join(cfg.out, d, "metrics.jsonl")))
    fidelity = cfg.fidelity or (os.path.join(cfg.out, "fidelity.json") if os.path.exists(os.path.join(cfg.out, "fidelity.json")) else "")
    budget = cfg.budget or (os.path.join(cfg.out, "budget.json") if os.path.exists(os.path.join(cfg.out, "budget.json")) else "")
    report = cfg.eval or (os.path.join(cfg.out, "eval.json") if os.path.exists(os.path.join(cfg.out, "eval.json")) else "")
    figures = {}
    if runs:
        figures["training.png"] = training_figure(runs)
    for name, path, draw in (("fidelity.png", fidelity, fidelity_figure), ("budget.png", budget, budget_figure),
                             ("retention.png", report, retention_figure)):
        if path:
            with open(path) as f:
                figures[name] = draw(json.load(f))
    if not figures:
        raise FileNotFoundError(f"nothing to plot under {cfg.out}: no metrics.jsonl, fidelity.json, budget.json "
                                "or eval.json")
    os.makedirs(cfg.out, exist_ok=True)
    for name, fig in figures.items():
        path = os.path.join(cfg.out, name)
        fig.savefig(path, dpi=110)
        print(path)
    return list(figures)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(f"error: {e}")
