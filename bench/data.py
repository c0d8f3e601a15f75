"""Data pipeline throughput: preparation at scale with 1 and 2 workers, memory per worker, and the batch loader,
beside what stage-1 training consumes.

    python bench/data.py [--teacher=smollm2] [--corpus_mb=200] [--doc_bytes=4000] [--batch_size=16] [--seq_len=1024]
                         [--batches=300] [--json=OUT]

default corpus: `prepare` on the default corpus (the 38 Shakespeare plays and the standard library's modules, 10 MB),
  in this process: tokenizer load, UTF-8 repair, normalisation, tokenisation, the alignment check and shard writing,
  into a fresh temporary folder; align_mb_per_s times align_document alone.
at scale: a corpus of at least corpus_mb MB of text built here from the default corpus, cut into documents of about
  doc_bytes bytes (at line breaks; web pages of FineWeb-Edu are a few KB) and written again and again, each copy
  under its own names and with its copy number on every document: half the copies as Parquet (row groups of about 2
  MB), half as .jsonl.zst files of about 2.5 MB. `prepare --workers=N` on it, N = 1 and 2 worker processes (spawned
  in both cases, so each one's peak memory is its own: ru_maxrss), then 1 worker on its first half: memory per worker
  must not grow with the corpus (a worker holds at most one shard of SHARD_BYTES per stream). MB/s: MB (1e6 bytes) of
  document text per second of wall time, the whole `prepare` (spawning, reading, tokenizing, writing, the manifest).
The machine may be shared: "cores busy" is the workers' CPU seconds over the wall time (2.00 would be both cores
all the time), and "by CPU time" divides the 1 worker's CPU seconds by the busier of the 2 workers': the speedup the
2 workers would have with a core each (from measured CPU times; the wall-clock row is the one with PASS/FAIL); the
control row times a pure-Python loop in 1 and in 2 processes just before: on two free cores it reads about 2.00x.
125B bytes on 64 cores is ARITHMETIC, not measured: 125e9 / (64 x the per-worker rate of the 2-worker run).
loader_bytes_per_s: bytes per second delivered by ShardLoader.next_batch on the default corpus's train shards.
train_bytes_per_s is QUOTED, not measured: an earlier prototype measured ~16-18K bytes/s for stage-1 align on this CPU,
the fastest stage-1 phase (distill runs at ~1K bytes/s), so 18,000 is the most any stage-1 phase consumes. The loader
must be at least 100x faster than that.
The load average before and after is printed too.
"""
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's data.py, not this file
import cli  # noqa: E402
import data  # noqa: E402
from tokenizer import align_document, load_tokenizer  # noqa: E402

TRAIN_BYTES_PER_S = 18_000  # quoted from an earlier prototype's measurement (stage-1 align phase, 2 CPU threads)
PAPER_BYTES = 125e9         # the paper's stage-1 + stage-2 data, for the arithmetic row
CORES = 64
SPEEDUP_GOAL = 1.7          # 2 workers on 2 cores


@dataclass
class Config:
    teacher: str = "smollm2"
    corpus_mb: int = 200        # text of the at-scale corpus (MB, 1e6 bytes)
    doc_bytes: int = 4000       # about this many bytes per document of it
    batch_size: int = 16        # loader batch: windows x bytes
    seq_len: int = 1024
    batches: int = 300          # timed loader batches
    json: str = ""


def time_default_corpus(folder):
    files = data.default_corpus_files()
    text_bytes = sum(os.path.getsize(f) for f in files)
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):  # keep the table clean
        started = time.perf_counter()
        data.prepare(folder, None, out)
        prepare_s = time.perf_counter() - started
    tok = load_tokenizer(folder)
    texts = [open(f, "rb").read() for f in files]
    started = time.perf_counter()
    for text in texts:
        align_document(text, tok)
    align_s = time.perf_counter() - started
    return text_bytes, prepare_s, align_s


def documents(doc_bytes):
    """The default corpus cut into documents of about doc_bytes bytes, at line breaks."""
    docs = []
    for path in data.default_corpus_files():
        text = open(path, encoding="utf-8", errors="replace").read()
        while text:
            cut = text.find("\n", doc_bytes)
            cut = len(text) if cut < 0 else cut + 1
            docs.append(text[:cut])
            text = text[cut:]
    return docs


def build_corpus(root, corpus_mb, doc_bytes) -> list[tuple[str, int]]:
    """Copies of the cut default corpus, alternately Parquet and .jsonl.zst -> [(file, its text bytes)]."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
        import zstandard
    except ImportError:
        raise ImportError("bench/data.py writes Parquet and .jsonl.zst: pip install pyarrow zstandard") from None
    base, files, total, copy = documents(doc_bytes), [], 0, 0
    while total < corpus_mb * 1e6:
        docs = [f"[copy {copy}, document {i}]\n{doc}" for i, doc in enumerate(base)]  # no two documents the same
        sizes = [len(d.encode("utf-8")) for d in docs]
        folder = os.path.join(root, f"copy{copy:03d}")
        os.makedirs(folder)
        per_group = max(1, int(2e6 * len(docs) / sum(sizes)))  # rows of about 2 MB of text
        if copy % 2 == 0:
            path = os.path.join(folder, "docs.parquet")
            pq.write_table(pa.table({"text": docs}), path, row_group_size=per_group)
            files.append((path, sum(sizes)))
        else:
            step = int(1.25 * per_group)  # .jsonl.zst files of about 2.5 MB of text
            for k in range(0, len(docs), step):
                path = os.path.join(folder, f"docs-{k // step:03d}.jsonl.zst")
                lines = "".join(json.dumps({"text": d}) + "\n" for d in docs[k:k + step]).encode("utf-8")
                with open(path, "wb") as f:
                    f.write(zstandard.ZstdCompressor(level=3).compress(lines))
                files.append((path, sum(sizes[k:k + step])))
        total, copy = total + sum(sizes), copy + 1
    return files


def time_workers(folder, files, workers) -> dict:
    """prepare with `workers` spawned worker processes into a fresh folder -> rate and each worker's peak memory."""
    out, stats = tempfile.mkdtemp(prefix="bench-data-out-"), {}
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            started = time.perf_counter()
            data.prepare(folder, [f for f, _ in files], out, workers=workers, in_process=False, stats=stats)
            seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(out, ignore_errors=True)
    text_bytes, cpu = sum(size for _, size in files), [w["cpu_seconds"] for w in stats["workers"]]
    return {"workers": workers, "text_bytes": text_bytes, "seconds": seconds, "mb_per_s": text_bytes / 1e6 / seconds,
            "cpu_seconds": cpu, "cores_busy": sum(cpu) / seconds,  # below `workers`: other processes had the cores
            "peak_rss_mb": sorted(w["peak_rss_mb"] for w in stats["workers"])}


def spin(n) -> float:
    """A pure-Python loop: the CPU work of the control row."""
    x = 0
    for i in range(n):
        x += i * i
    return x


def parallel_headroom(n=20_000_000) -> float:
    """2 x the time of one loop in 1 spawned process / the time of two in 2: what any 2-process job can gain now."""
    import multiprocessing as mp
    walls = []
    for processes in (1, 2):
        with mp.get_context("spawn").Pool(processes) as pool:
            pool.map(spin, [1000] * processes)  # started and warm before the clock
            started = time.perf_counter()
            pool.map(spin, [n] * processes)
            walls.append(time.perf_counter() - started)
    return 2 * walls[0] / walls[1]


def time_loader(shard_dir, tok, cfg):
    loader = data.ShardLoader(shard_dir, "train", tok, cfg.batch_size, cfg.seq_len, max_tokens=cfg.seq_len)
    for _ in range(10):  # warm the page cache and the first permutation
        loader.next_batch()
    started = time.perf_counter()
    for _ in range(cfg.batches):
        loader.next_batch()
    return cfg.batches * cfg.batch_size * cfg.seq_len / (time.perf_counter() - started)


def main(argv):
    cfg = cli.parse_args(Config, argv)
    from teacher import resolve_teacher_dir  # here: the spawned workers import this file, and teacher.py imports torch
    folder = resolve_teacher_dir(cfg.teacher)
    tok = load_tokenizer(folder)
    load_before = os.getloadavg()
    text_bytes, prepare_s, align_s = time_default_corpus(folder)
    root = tempfile.mkdtemp(prefix="bench-data-corpus-")
    try:
        files = build_corpus(root, cfg.corpus_mb, cfg.doc_bytes)
        headroom = parallel_headroom()
        runs = [time_workers(folder, files, 1), time_workers(folder, files, 2),
                time_workers(folder, files[:len(files) // 2], 1)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    with contextlib.redirect_stdout(io.StringIO()):
        shard_dir = data.prepare(folder, None, os.path.join(tempfile.gettempdir(), f"bench-data-{tok.hash}"))
    loader_bytes_per_s = time_loader(shard_dir, tok, cfg)
    one, two, half = runs
    speedup, per_worker = two["mb_per_s"] / one["mb_per_s"], two["mb_per_s"] / 2
    cpu_speedup = max(one["cpu_seconds"]) / max(two["cpu_seconds"])  # were each worker alone on its core
    hours = PAPER_BYTES / (CORES * per_worker * 1e6) / 3600
    results = {
        "teacher": cfg.teacher, "tokenizer_hash": tok.hash, "corpus_bytes": text_bytes,
        "prepare_mb_per_s": text_bytes / 1e6 / prepare_s, "align_mb_per_s": text_bytes / 1e6 / align_s,
        "at_scale": runs, "speedup_2_workers": speedup, "speedup_2_workers_by_cpu_time": cpu_speedup,
        "control_2_processes_speedup": headroom,
        "paper_bytes_hours_64_cores_arithmetic": hours,
        "loader_bytes_per_s": loader_bytes_per_s, "loader_batch": [cfg.batch_size, cfg.seq_len],
        "train_bytes_per_s": TRAIN_BYTES_PER_S,
        "train_bytes_per_s_source": "quoted from an earlier prototype (stage-1 align, ~16-18K bytes/s), not measured",
        "loader_over_train": loader_bytes_per_s / TRAIN_BYTES_PER_S,
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],
    }
    mb = lambda run: f"{run['text_bytes'] / 1e6:.0f} MB"  # noqa: E731
    memory = lambda run: " and ".join(f"{m:.0f}" for m in run["peak_rss_mb"]) + " MB"  # noqa: E731
    rows = [
        ("prepare, default corpus", f"{results['prepare_mb_per_s']:.2f} MB/s",
         f"measured: {text_bytes / 1e6:.1f} MB (plays and modules) in {prepare_s:.1f} s, 1 worker in this process"),
        ("align_document only", f"{results['align_mb_per_s']:.2f} MB/s", "measured"),
        *[(f"prepare, {run['workers']} worker{'s' * (run['workers'] > 1)}", f"{run['mb_per_s']:.2f} MB/s",
           f"measured: {mb(run)} of Parquet and .jsonl.zst in {run['seconds']:.1f} s, {run['cores_busy']:.2f} cores "
           "busy") for run in (one, two)],
        ("2 workers / 1 worker", f"{speedup:.2f}x",
         f"PASS (>= {SPEEDUP_GOAL}x)" if speedup >= SPEEDUP_GOAL else f"FAIL (< {SPEEDUP_GOAL}x)"),
        ("... by CPU time", f"{cpu_speedup:.2f}x",
         "the 1 worker's CPU seconds / the busier of the 2 workers' (measured): the speedup with a core each"),
        ("control: 2 processes / 1", f"{headroom:.2f}x",
         "measured: the same pure-Python loop in 1 and in 2 processes, the most any 2-worker job gains now"),
        *[("peak memory per worker", memory(run), f"measured: {run['workers']} worker(s), {mb(run)} corpus")
          for run in (half, one, two)],
        (f"{PAPER_BYTES / 1e9:.0f}B bytes on {CORES} cores", f"{hours:.2f} hours",
         f"ARITHMETIC, not measured: {CORES} workers at the 2-worker run's {per_worker:.2f} MB/s each"),
        ("loader", f"{loader_bytes_per_s:,.0f} bytes/s",
         f"measured: {cfg.batches} batches of {cfg.batch_size} x {cfg.seq_len} bytes"),
        ("stage-1 training consumes", f"{TRAIN_BYTES_PER_S:,} bytes/s",
         "QUOTED from an earlier prototype, not measured"),
        ("loader / training", f"{results['loader_over_train']:,.0f}x",
         "PASS (>= 100x)" if results["loader_over_train"] >= 100 else "FAIL (< 100x)"),
    ]
    print(f"teacher {cfg.teacher} (tokenizer {tok.hash}); {os.cpu_count()} CPU cores, load average "
          f"{load_before[0]:.1f} before, {results['load_average_before_after'][1]:.1f} after")
    for name, value, note in rows:
        print(f"{name:<27} {value:>18}   {note}")
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
