"""The shard file format, and the batch loaders that read it.

  write_shard     aligned documents -> one shard file (data.py's preparation writes them)
  Shard           a memory-mapped shard, checked against its header
  manifest_parts  a prepared folder's shards -> the parts of each split that its manifest.json lists
  ShardLoader     seeded windows of T bytes from one split's shards, a disjoint stride per DDP rank, resumable
  MixedLoader     a fixed share of every batch's rows from a second source (--chat_data, --chat_fraction)
  WeightedLoader  every row drawn from one of several sources by weight (--data=DIR_A:0.7,DIR_B:0.3)
  make_loader     the stages' entry: one of the three

A split is the list of shard parts that the folder's manifest.json names ((file, split, lo, hi): a part is a byte
range of a file from one document start to another, e.g. what a candidate shard keeps for training once its first
documents went to the validation shard); a folder without that list (chat shards, shards written before it) is its
{split}_*.bin files, whole, in name order. torch is imported only where rows become tensors: preparation workers
never load it.
"""
import glob
import json
import os

import numpy as np

from tokenizer import DOC_START_BYTE, file_hash

# ----------------------------------------------------------------------------------------------------------------
# Format
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
COUNTS = ("n_docs", "n_bytes", "n_tokens", "n_repaired", "n_dropped")


def _layout(n_bytes, n_tokens) -> dict[str, tuple[int, int]]:
    """Section name -> (offset, size in bytes); the file is exactly as long as the end of the last section."""
    sizes = {"bytes": n_bytes, "token_end": (n_bytes + 7) // 8, "token_ids": 4 * n_tokens,
             "rank_index": 8 * (n_bytes // RANK_BLOCK + 1)}
    layout, offset = {}, HEADER_SIZE
    for name, size in sizes.items():
        layout[name] = (offset, size)
        offset = (offset + size + 63) // 64 * 64
    return layout


def write_shard(path, docs, tok) -> dict:
    """Aligned documents (tokenizer.Aligned) -> a shard file; returns its header."""
    return write_shard_arrays(path, [(d.bytes, d.token_end, d.token_id[d.token_end]) for d in docs], tok,
                              sum(d.n_repaired for d in docs), sum(d.n_dropped for d in docs))


def write_shard_arrays(path, docs, tok, n_repaired=0, n_dropped=0) -> dict:
    """docs: (bytes uint8, token_end bool, token ids at the ends) per document. The bytes and ids are written document
    by document, so the only whole-shard array is the token-end flags (1 byte per byte, then 1 bit)."""
    token_end = np.concatenate([end for _, end, _ in docs])
    n_tokens = sum(len(ids) for _, _, ids in docs)
    n_blocks = len(token_end) // RANK_BLOCK  # per-block counts, not a cumsum over every byte (8 bytes per byte)
    ends_per_block = token_end[:n_blocks * RANK_BLOCK].reshape(n_blocks, RANK_BLOCK).sum(axis=1)
    header = {"version": VERSION, "tokenizer_name": tok.name, "tokenizer_hash": tok.hash,
              "n_bytes": len(token_end), "n_tokens": n_tokens, "n_docs": len(docs),
              "n_repaired": int(n_repaired), "n_dropped": int(n_dropped)}
    encoded = json.dumps(header).encode("utf-8")
    assert len(MAGIC) + len(encoded) <= HEADER_SIZE, "shard header too long"
    layout = _layout(header["n_bytes"], header["n_tokens"])
    with open(path + ".tmp", "wb") as f:  # written under another name and renamed: never a half shard
        f.write(MAGIC + encoded + b"\0" * (HEADER_SIZE - len(MAGIC) - len(encoded)))
        f.seek(layout["bytes"][0])
        for doc_bytes, _, _ in docs:
            f.write(doc_bytes.tobytes())
        f.seek(layout["token_end"][0])
        f.write(np.packbits(token_end, bitorder="little").tobytes())
        f.seek(layout["token_ids"][0])
        for _, _, ids in docs:
            f.write(ids.astype(np.int32).tobytes())
        f.seek(layout["rank_index"][0])
        f.write(np.concatenate([[0], np.cumsum(ends_per_block)]).astype(np.int64).tobytes())
        f.truncate(sum(layout["rank_index"]))
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


# ----------------------------------------------------------------------------------------------------------------
# Manifest

def split_parts(shard_dir, split) -> list[tuple[str, int, int | None]]:
    """(path, lo, hi) of each part of a split, in the manifest's order; hi None: to the end of the file."""
    manifest_path = os.path.join(shard_dir, "manifest.json")
    manifest = json.load(open(manifest_path)) if os.path.exists(manifest_path) else {}
    if "shards" not in manifest:
        return [(p, 0, None) for p in sorted(glob.glob(os.path.join(shard_dir, f"{split}_*.bin")))]
    return [(os.path.join(shard_dir, s["file"]), s["lo"], s["hi"]) for s in manifest["shards"] if s["split"] == split]


def _part(out_dir, line, split, lo, hi, repairs) -> dict:
    """A manifest entry: bytes [lo, hi) of a shard and their counts. A shard counts its repairs and drops as a whole,
    so a shard cut in parts gives them to its first part (repairs=True)."""
    counts = line["counts"]
    if (lo, hi) != (0, counts["n_bytes"]):
        shard, kept = Shard(os.path.join(out_dir, line["shard"])), int(repairs)
        counts = {"n_docs": int(np.count_nonzero(shard.bytes[lo:hi] == DOC_START_BYTE)),  # one per document
                  "n_bytes": hi - lo, "n_tokens": shard.ends_before(hi) - shard.ends_before(lo),
                  "n_repaired": kept * counts["n_repaired"], "n_dropped": kept * counts["n_dropped"]}
    return {"file": line["shard"], "split": split, "lo": lo, "hi": hi, **{k: counts[k] for k in COUNTS}}


def write_validation(out_dir, written, val_ranges, tok) -> dict:
    """The chosen validation documents copied into one shard (at most --val_bytes: cheap), so that its windows run
    across documents as every split's do, however few of them each cand shard gives -> its manifest entry."""
    name = f"selected_val_{file_hash(json.dumps(sorted(val_ranges.items())).encode())}.bin"
    path = os.path.join(out_dir, name)
    if not os.path.exists(path):  # else: the same choice as the last run's, already written
        docs = []
        for line in (line for line in written if line["shard"] in val_ranges):
            lo, hi = val_ranges[line["shard"]]
            shard = Shard(os.path.join(out_dir, line["shard"]))
            token_end = shard.token_end(lo, hi)
            ids = shard.token_ids[shard.ends_before(lo):][:int(token_end.sum())]
            ends_before = np.concatenate([[0], np.cumsum(token_end)])
            starts = [*np.flatnonzero(shard.bytes[lo:hi] == DOC_START_BYTE), hi - lo]
            docs += [(shard.bytes[lo + a:lo + b], token_end[a:b], ids[ends_before[a]:ends_before[b]])
                     for a, b in zip(starts[:-1], starts[1:])]
        write_shard_arrays(path, docs, tok)
    shard = Shard(path)
    return {"file": name, "split": "val", "lo": 0, "hi": shard.n_bytes, **{k: shard.header[k] for k in COUNTS}}


def manifest_parts(out_dir, written, val_ranges, tok) -> tuple[list, dict]:
    """A prepared folder's manifest entries -> (parts, totals per split). written: its shards' journal lines in order
    ({"shard", "stream", "counts"}); val_ranges: {shard: (lo, hi)}, validation documents to take out of shards whose
    stream is not "val" (copied into one shard, listed last)."""
    parts = []
    for line in written:
        n = line["counts"]["n_bytes"]
        lo, hi = val_ranges.get(line["shard"], (0, 0))  # a chosen range leaves the shard's train text around it
        split = "val" if line["stream"] == "val" else "train"
        pieces = [(a, b) for a, b in ((0, lo), (hi, n)) if b > a]
        parts += [_part(out_dir, line, split, a, b, repairs=i == 0) for i, (a, b) in enumerate(pieces)]
    if val_ranges:
        parts.append(write_validation(out_dir, written, val_ranges, tok))
    splits = {split: {**dict.fromkeys(COUNTS, 0), "n_shards": 0} for split in ("train", "val")}
    for part in parts:
        for key in COUNTS:
            splits[part["split"]][key] += part[key]
        splits[part["split"]]["n_shards"] += 1
    return parts, splits


def _allow_open_files(n):
    """Each memory-mapped shard holds a file descriptor (Python's mmap keeps one): a 100 GB corpus has ~1,600
    shards of 64 MiB, more than the usual soft limit of 1,024, so raise it towards the hard limit when needed."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if n + 256 > soft and soft != resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard == resource.RLIM_INFINITY else min(hard, n + 1024),
                                                    hard))


# ----------------------------------------------------------------------------------------------------------------
# Loaders

def as_batch(rows) -> dict:
    import torch  # here, not at the top: see the module docstring
    return {key: torch.from_numpy(np.stack([row[key] for row in rows]))
            for key in ("bytes", "token_end", "token_id", "valid")}


class ShardLoader:
    """Batches of B windows of T bytes from one split's shards (memory-mapped).

    An epoch is a seeded permutation of all windows (window j of a part [lo, hi) nominally covers bytes
    [lo + jT, lo + (j+1)T); it is moved back to the token start at or before, never before lo, so it still fits).
    Each step consumes B * world_size windows of the permutation and rank r takes every world_size-th of them, so
    ranks never share a window. The state is (epoch, windows consumed), which a checkpoint saves."""

    def __init__(self, shard_dir, split, tokenizer, batch_size, seq_len, seed=0, rank=0, world_size=1,
                 max_tokens=None):
        parts = split_parts(shard_dir, split)
        if not parts:
            raise FileNotFoundError(f"no {split} shards in {shard_dir}; run python data.py --teacher=... first")
        _allow_open_files(len({path for path, _, _ in parts}))
        opened = {}
        for path, _, _ in parts:
            if path not in opened:
                opened[path] = shard = Shard(path)
                if shard.header["tokenizer_hash"] != tokenizer.hash:
                    raise ValueError(f"{shard.path} was prepared for tokenizer {shard.header['tokenizer_name']!r} "
                                     f"(hash {shard.header['tokenizer_hash']}), but this teacher's tokenizer is "
                                     f"{tokenizer.name!r} (hash {tokenizer.hash}); prepare shards for this teacher "
                                     "with python data.py --teacher=...")
        self.shards = [opened[path] for path, _, _ in parts]  # one per part (a file split in parts appears twice)
        self.bounds = [(lo, shard.n_bytes if hi is None else hi) for shard, (_, lo, hi) in zip(self.shards, parts)]
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.max_tokens = rank, world_size, max_tokens
        windows = np.array([(hi - lo) // seq_len for lo, hi in self.bounds])
        self.first_window = np.concatenate([[0], np.cumsum(windows)])  # global window index of each part's first
        self.n_windows = int(self.first_window[-1])
        if self.n_windows < batch_size * world_size:
            raise ValueError(f"the {split} split of {shard_dir} has {self.n_windows} windows of {seq_len} bytes, "
                             f"fewer than one step needs ({batch_size} x {world_size} ranks)")
        self.epoch, self.consumed = 0, 0
        self._order_epoch, self._order = None, None

    def _epoch_order(self):
        if self._order_epoch != self.epoch:  # one permutation per epoch, the same on every rank
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)
            self._order_epoch = self.epoch
        return self._order

    def take(self, count) -> np.ndarray:
        """The next `count` windows of the permutation (all ranks'); an epoch's incomplete remainder is dropped."""
        if self.consumed + count > self.n_windows:
            self.epoch, self.consumed = self.epoch + 1, 0
        windows = self._epoch_order()[self.consumed: self.consumed + count]
        self.consumed += count
        return windows

    def next_batch(self) -> dict:
        windows = self.take(self.batch_size * self.world_size)[self.rank::self.world_size]
        return as_batch([self.window(int(w)) for w in windows])

    def window(self, window) -> dict:
        """One window (by its global index) as numpy arrays, plus where it starts: (part index, byte offset)."""
        part = int(np.searchsorted(self.first_window, window, side="right")) - 1
        shard, (lo, _) = self.shards[part], self.bounds[part]
        nominal = lo + (window - int(self.first_window[part])) * self.seq_len
        start = max(lo, shard.token_start_at_or_before(nominal))  # lo starts a document, so a token
        stop = start + self.seq_len
        token_end = shard.token_end(start, stop)
        token_id = np.full(self.seq_len, -1, dtype=np.int64)
        first_token = shard.ends_before(start)
        token_id[token_end] = shard.token_ids[first_token: first_token + int(token_end.sum())]
        tokens_before = np.cumsum(token_end) - token_end  # teacher tokens that end before byte t in this window
        valid = tokens_before < self.max_tokens if self.max_tokens else np.ones(self.seq_len, dtype=bool)
        return {"bytes": shard.bytes[start:stop].astype(np.int64), "token_end": token_end, "token_id": token_id,
                "valid": valid, "start": (part, start)}

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
        import torch
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


class WeightedLoader:
    """Rows drawn from several sources by weight. Each step draws a source for every one of its B * world_size rows
    from a generator seeded by (seed, step), the same on every rank; a source's rows are its next windows in its own
    permutation (ShardLoader.take), and rank r takes rows r, r + world_size, ...: ranks never share a window, and the
    state (the step and each source's position) resumes the same rows exactly."""

    def __init__(self, sources: list, weights: list[float], seed=0):
        self.sources, self.seed, self.step = sources, seed, 0
        self.weights = [w / sum(weights) for w in weights]
        self.last_sources = []  # the source of each of this rank's rows in the last batch (tests and logs)

    def next_batch(self) -> dict:
        head = self.sources[0]
        rows = head.batch_size * head.world_size
        draws = np.random.default_rng([self.seed, self.step, 0x6D6978]).choice(len(self.sources), rows, p=self.weights)
        self.step += 1
        windows = {s: iter(self.sources[s].take(int((draws == s).sum()))) for s in range(len(self.sources))}
        picked = [(s, int(next(windows[s]))) for s in draws]  # global row order: row j is its source's next window
        mine = picked[head.rank::head.world_size]
        self.last_sources = [s for s, _ in mine]
        return as_batch([self.sources[s].window(w) for s, w in mine])

    def state_dict(self) -> dict:
        """Source 0's position at the top level (the fields every loader state has, which a checkpoint checks), the
        mixture's in "mixture"."""
        return {**self.sources[0].state_dict(), "mixture": {
            "step": self.step, "seed": self.seed, "weights": self.weights,
            "sources": [s.state_dict() for s in self.sources]}}

    def load_state_dict(self, state):
        mixture = state.get("mixture", {})
        if len(mixture.get("sources", [])) != len(self.sources) or mixture["seed"] != self.seed or \
                not np.allclose(mixture["weights"], self.weights):
            raise ValueError("loader state is not of this mixture (other sources, weights or seed): resume with the "
                             "same --data")
        for source, source_state in zip(self.sources, mixture["sources"]):
            source.load_state_dict(source_state)
        self.step = mixture["step"]


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """'DIR_A:0.7,DIR_B:0.3' -> [(DIR_A, 0.7), (DIR_B, 0.3)]; a folder without a weight weighs 1."""
    sources = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        path, _, weight = item.rpartition(":") if ":" in item else (item, "", "1")
        try:
            value = float(weight)
        except ValueError:
            value = float("nan")
        if not path or not np.isfinite(value) or value <= 0:
            raise ValueError(f"--data: {item!r} is not FOLDER:WEIGHT with a positive weight (e.g. "
                             "--data=shards/web:0.7,shards/smollm2-chat:0.3)")
        sources.append((path, value))
    if not sources:
        raise ValueError("--data is empty: give FOLDER:WEIGHT,...")
    return sources


def make_loader(shard_dir, split, tokenizer, batch_size, seq_len, seed=0, rank=0, world_size=1, max_tokens=None,
                chat_dir="", chat_fraction=0.0, mixture=""):
    """The stages' loader. mixture ('DIR_A:0.7,DIR_B:0.3', --data): a WeightedLoader over those folders (source i
    seeded seed + i; one folder: its plain ShardLoader). Otherwise one ShardLoader of shard_dir, or with chat_dir a
    MixedLoader whose batches take round(chat_fraction * batch_size) rows (at least 1, at most B - 1) from it."""
    args = dict(tokenizer=tokenizer, batch_size=batch_size, seq_len=seq_len, rank=rank, world_size=world_size,
                max_tokens=max_tokens)
    if mixture:
        if chat_dir:
            raise ValueError("--data names every source of the mixture (chat shards too): drop --chat_data")
        sources = parse_mixture(mixture)
        loaders = [ShardLoader(path, split, seed=seed + i, **args) for i, (path, _) in enumerate(sources)]
        return loaders[0] if len(loaders) == 1 else WeightedLoader(loaders, [w for _, w in sources], seed)
    if not chat_dir or chat_fraction <= 0:
        return ShardLoader(shard_dir, split, seed=seed, **args)
    if batch_size < 2:
        raise ValueError("mixing in chat shards needs --batch_size of at least 2 (one row of each)")
    rows = min(max(round(chat_fraction * batch_size), 1), batch_size - 1)
    return MixedLoader(ShardLoader(shard_dir, split, seed=seed, **{**args, "batch_size": batch_size - rows}),
                       ShardLoader(chat_dir, split, seed=seed + 1, **{**args, "batch_size": rows}))
