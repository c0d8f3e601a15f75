"""The retention table: a byte student's lm-eval results beside its teacher's (eval.py --compare prints it and
writes it to --json for bench/summary.py and bench/plot.py). Plain functions of lm-eval's result dictionaries."""
import math


def figures(results):
    """{(task, metric): value} from lm-eval's results (no stderr, no alias)."""
    return {(task, key.split(",")[0]): value for task, r in results["results"].items() for key, value in r.items()
            if "," in key and "_stderr" not in key and isinstance(value, (int, float))}


def print_side_by_side(teacher_results, student_results, teacher_name, ckpt):
    t, s = figures(teacher_results), figures(student_results)
    print(f"\n| task | metric | teacher ({teacher_name}) | byte student ({ckpt}) |")
    print("|---|---|---|---|")
    for key in sorted(t.keys() | s.keys()):
        cells = [f"{d[key]:.4f}" if key in d else "-" for d in (t, s)]
        print(f"| {key[0]} | {key[1]} | {cells[0]} | {cells[1]} |", flush=True)


def own_text_bits(samples):
    """The proper-likelihood bits per byte of a task's own text, from its logged samples: each item's true
    continuation (multiple choice: the gold choice; loglikelihood: the target; rolling: the document) given its
    context, over the UTF-8 bytes of those continuations as lm-eval splits them -> bits per byte, or None where the
    task scores no likelihood (generation)."""
    nats, n_bytes = 0.0, 0
    for sample in samples:
        args, resps = sample["arguments"], sample["filtered_resps"]
        if not args or len(args[0]) != 2 or isinstance(args[0][1], dict):
            if args and len(args[0]) == 1:  # rolling: the whole document
                nats, n_bytes = nats - float(resps[0]), n_bytes + len(args[0][0].encode("utf-8"))
                continue
            return None
        gold = int(sample["target"]) if len(args) > 1 else 0
        ll = resps[gold][0] if isinstance(resps[gold], (list, tuple)) else resps[gold]
        nats, n_bytes = nats - float(ll), n_bytes + len(args[gold][1].encode("utf-8"))
    return nats / math.log(2) / n_bytes if n_bytes else None


HEADLINE = {"multiple_choice": ("acc", "acc_norm"), "loglikelihood": ("acc", "perplexity"),
            "generate_until": ("exact_match",), "loglikelihood_rolling": ("bits_per_byte",)}
LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "byte_perplexity", "word_perplexity")


def retention(teacher, student):
    """The retention table: per task and headline metric, teacher and student with lm-eval's standard errors, and
    student/teacher (for a lower-is-better figure teacher/student; its standard error by the delta method with the
    two taken as independent, an overestimate: both models answer the same items), beside the bits per byte of
    each on the task's own text. -> (rows, mean retention over the multiple-choice tasks' acc, those tasks)."""
    rows = []
    for task in sorted(teacher["results"].keys() & student["results"].keys()):
        kind = teacher.get("configs", {}).get(task, {}).get("output_type")
        t, s = teacher["results"][task], student["results"][task]
        bits = [own_text_bits(run.get("samples", {}).get(task, [])) for run in (teacher, student)]
        for metric in HEADLINE.get(kind, ()):
            if f"{metric},none" not in t or f"{metric},none" not in s:
                continue
            (tv, tse), (sv, sse) = ((d[f"{metric},none"], d.get(f"{metric}_stderr,none")) for d in (t, s))
            lower = metric in LOWER_IS_BETTER
            ratio = (tv / sv if sv else float("nan")) if lower else (sv / tv if tv else float("nan"))
            se = None
            if isinstance(tse, (int, float)) and isinstance(sse, (int, float)) and tv and sv:
                se = abs(ratio) * math.sqrt((tse / tv) ** 2 + (sse / sv) ** 2)
            rows.append({"task": task, "kind": kind, "metric": metric, "n": teacher.get("n-samples", {}).get(task, {})
                         .get("effective"), "teacher": tv, "teacher_se": tse, "student": sv, "student_se": sse,
                         "retention": ratio, "retention_se": se, "teacher_bpb": bits[0], "student_bpb": bits[1]})
    mc = [r for r in rows if r["kind"] == "multiple_choice" and r["metric"] == "acc"]
    mean = sum(r["retention"] for r in mc) / len(mc) if mc else None
    return rows, mean, [r["task"] for r in mc]


def retention_text(rows, mean, mc_tasks, seconds=None):
    """The retention table as markdown (eval.py prints it, and writes it to --json for bench/summary.py)."""
    def cell(v, se=None):
        if not isinstance(v, (int, float)):
            return "-"
        return f"{v:.3f}" + (f" ± {se:.3f}" if isinstance(se, (int, float)) else "")
    lines = ["| task | n | metric | teacher | student | student/teacher | teacher bpb | student bpb |"
             + (" seconds (teacher, student) |" if seconds else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if seconds else "")]
    for r in rows:
        times = ""
        if seconds:
            times = " " + ", ".join(f"{seconds[k].get(r['task'], 0):,.0f}" for k in ("teacher", "student")) + " |"
        lines.append(f"| {r['task']} | {r['n'] or '-'} | {r['metric']} | {cell(r['teacher'], r['teacher_se'])} | "
                     f"{cell(r['student'], r['student_se'])} | {cell(r['retention'], r['retention_se'])} | "
                     f"{cell(r['teacher_bpb'])} | {cell(r['student_bpb'])} |{times}")
    if mean is not None:
        lines.append(f"\nmean retention (acc) over the {len(mc_tasks)} multiple-choice tasks ({', '.join(mc_tasks)}): "
                     f"{mean:.3f}")
    return "\n".join(lines)
