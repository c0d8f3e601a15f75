"""Teacher tokenizers and byte/token alignment.

The student reads bytes; stage 1 needs, for every byte, whether it is the last byte of a teacher token and which
token that is. Everything here exists to get that alignment exactly right:

  Tokenizer        one interface over tiktoken (byte-level BPE from tokenizer.json, or a tiktoken rank file such
                   as Llama-3's tokenizer.model) and sentencepiece (Llama-2 style .model with byte fallback)
  load_tokenizer   a teacher folder -> its Tokenizer (None if it has none)
  align_document   text -> (bytes, token_end, token_id), built from the tokens' own byte lengths

Special tokens (<|im_start|>, <|im_end|>, <s>, ...) spell no text. In byte space each gets a code of two bytes,
0xFF and its index among the specials (in id order): 0xFF never occurs in UTF-8, so no text produces a code, and a
code is the special's spelling everywhere (alignment, the prior's trie, the subword rows, generation, scoring). Text
that reads "<|im_end|>" is that text, ordinary tokens (HF's encode_special_tokens=True); only a code is the special.

HF tokenizers/transformers are test oracles only (tests/test_tokenizers.py); nothing here imports them.
"""
import base64
import hashlib
import json
import os
import re
import unicodedata
from dataclasses import dataclass

import numpy as np

from sentencepiece_proto import without_normalizer

DOC_START_BYTE = 0xFE  # never occurs in UTF-8, so it can mark a document start without escaping anything
SPECIAL_BYTE = 0xFF    # never occurs in UTF-8 either: it leads the two-byte code of a special token
MAX_SPECIALS = 256     # one index byte after 0xFF (Llama-3 has exactly 256 specials)


def special_code(index: int) -> bytes:
    """The byte-space code of the index-th special token (in id order)."""
    return bytes([SPECIAL_BYTE, index])

# Pre-tokenizer split patterns. GPT-2's is what HF's ByteLevel(use_regex=True) applies; the cl100k one is what
# Llama-3 and OLMo-2 write into their Split pre-tokenizer (and Llama-3's tiktoken tokenizer.model implies).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Meta's Llama 3.1+ special tokens, used when a tiktoken rank file comes without a tokenizer_config.json.
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(LLAMA3_SPECIALS))]


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers

class Tokenizer:
    """The one interface the rest of the repo sees. Subclasses fill in the vocabulary and the encoder.

    encode() takes text that normalize() has already produced, so that the document bytes we train on are exactly
    the bytes the tokens spell (a normalizer that changes text would otherwise shift every boundary)."""
    name: str
    hash: str
    n_vocab: int
    bos_id: int | None
    eos_id: int | None

    def __init__(self, name, hash, id_to_bytes, bos_id, eos_id, specials=None):
        self.name, self.hash = name, hash
        self.bos_id, self.eos_id = bos_id, eos_id
        if bos_id is None and eos_id is None:
            raise ValueError(f"tokenizer {name!r} has neither a BOS nor an EOS token to start documents with")
        # specials: name -> id; each id gets its code as its spelling (see the module docstring)
        self.specials = dict(sorted((specials or {}).items(), key=lambda item: item[1]))
        if len(self.specials) > MAX_SPECIALS:
            raise ValueError(f"tokenizer {name!r} has {len(self.specials)} special tokens; byte codes exist for "
                             f"{MAX_SPECIALS}")
        self.special_names = {i: n for n, i in self.specials.items()}  # id -> name
        self.codes = {n: special_code(k) for k, n in enumerate(self.specials)}  # name -> code
        self.code_ids = {special_code(k): i for k, i in enumerate(self.specials.values())}  # code -> id
        id_to_bytes = list(id_to_bytes)
        for code, token_id in self.code_ids.items():
            id_to_bytes[token_id] = code
        self.id_to_bytes = id_to_bytes  # list: token id -> its bytes (a special's code; b"" for ids that spell nothing)
        self.n_vocab = len(id_to_bytes)
        # Byte length of every token: alignment is a cumulative sum over these (never character offsets).
        self.token_lengths = np.array([len(b) for b in id_to_bytes], dtype=np.int64)
        self.unspellable = None  # regex of characters with no tokens at all (see TiktokenTokenizer)

    @property
    def doc_start_id(self) -> int:
        return self.bos_id if self.bos_id is not None else self.eos_id  # Qwen has no BOS and starts with EOS

    def normalize(self, text: str) -> str:
        return text

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def encode_bytes(self, raw: bytes) -> list[int]:
        """Bytes in byte space (normalised UTF-8 text with special codes between) -> token ids."""
        ids = []
        for piece in split_codes(raw, self.code_ids):
            ids += [piece] if isinstance(piece, int) else self.encode(piece.decode("utf-8"))
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        return self.id_to_bytes[token_id]

    def decode(self, ids) -> bytes:
        return b"".join([self.id_to_bytes[i] for i in np.asarray(ids, dtype=np.int64).tolist()])

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, hash={self.hash}, n_vocab={self.n_vocab})"


class TiktokenTokenizer(Tokenizer):
    """Byte-level BPE run by tiktoken. tiktoken returns *ranks*; rank_to_id maps them to the teacher's ids.

    Added/special tokens are split out here rather than by tiktoken, because tiktoken tries them in hash-map order,
    while HF matches the longest one first (GPT-NeoX has added tokens for runs of 2, 3, ... 24 spaces)."""

    def __init__(self, name, hash, encoding, rank_to_id, id_to_bytes, added_tokens, normalizers, bos_id, eos_id,
                 specials=None):
        super().__init__(name, hash, id_to_bytes, bos_id, eos_id, specials)
        self.encoding = encoding
        self.rank_to_id = rank_to_id  # (n_ranks,) int64
        self.added_tokens = added_tokens  # content -> id: the added tokens that are not special, matched in text
        self.normalizers = normalizers  # e.g. ["NFC"], applied in order
        by_length = sorted(added_tokens, key=len, reverse=True)  # longest first, as HF does
        self.added_pattern = re.compile("(" + "|".join(map(re.escape, by_length)) + ")") if by_length else None
        self.unspellable = _unspellable_characters(name, [b for b in range(256) if rank_to_id[b] < 0])

    def normalize(self, text):
        for form in self.normalizers:
            text = unicodedata.normalize(form, text)
        return text

    def encode_array(self, text):
        if self.unspellable is not None:
            # HF would silently delete these bytes and even merge the bytes on either side of the gap, leaving tokens
            # that do not spell the text; we remove the characters first, so tokens always spell what they encode.
            text = self.unspellable.sub("", text)
        pieces = self.added_pattern.split(text) if self.added_pattern else [text]
        out = []
        for i, piece in enumerate(pieces):  # re.split with one group alternates ordinary text, added token, ...
            if i % 2 == 1:
                out.append(np.array([self.added_tokens[piece]], dtype=np.int64))
            elif piece:
                out.append(self.rank_to_id[np.array(self.encoding.encode_ordinary(piece), dtype=np.int64)])
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _unspellable_characters(name, missing_bytes):
    """A regex of the characters whose UTF-8 needs a byte the vocabulary has no token for (SmolLM2 lacks a few
    control characters and the lead bytes of unassigned planes). align_document removes them from the document, so
    that the student never sees bytes the teacher cannot see. A missing continuation byte (0x80-0xBF) would hit
    characters all over Unicode, so such a vocabulary is refused."""
    if any(0x80 <= b < 0xC0 for b in missing_bytes):
        raise ValueError(f"tokenizer {name!r} has no token for byte(s) {[hex(b) for b in missing_bytes]}")
    ranges = []
    for b in missing_bytes:
        if b < 0x80:
            ranges.append((b, b))
        elif 0xC2 <= b < 0xE0:  # lead byte of a 2-byte sequence: 64 code points
            ranges.append(((b & 0x1F) << 6, ((b & 0x1F) << 6) + 0x3F))
        elif 0xE0 <= b < 0xF0:  # 3 bytes: 4,096 code points (0xE0: from U+0800, shorter forms are 2-byte)
            ranges.append((max((b & 0x0F) << 12, 0x800), ((b & 0x0F) << 12) + 0xFFF))
        elif 0xF0 <= b < 0xF5:  # 4 bytes: 262,144 code points (0xF0: from U+10000)
            ranges.append((max((b & 0x07) << 18, 0x10000), min(((b & 0x07) << 18) + 0x3FFFF, 0x10FFFF)))
        # 0xC0, 0xC1 and 0xF5-0xFF never occur in UTF-8
    if not ranges:
        return None
    return re.compile("[" + "".join(f"{re.escape(chr(lo))}-{re.escape(chr(hi))}" for lo, hi in ranges) + "]")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (Llama-2 style). normalize() is SentencePiece's own normalizer, which turns spaces into
    U+2581 and adds the dummy-prefix U+2581, so that the pieces spell the normalised text byte for byte.

    encode() must not normalise a second time: SentencePiece's normalizer is not idempotent (it would add a second
    dummy prefix, and its NFKC table maps U+0344 to U+0308 U+0301 without composing, which a second pass composes).
    So encode() runs a copy of the model whose normalizer is switched off."""

    def __init__(self, name, hash, model_bytes):
        import sentencepiece
        self.sp = sentencepiece.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(model_bytes)
        self.sp_unnormalized = sentencepiece.SentencePieceProcessor()
        self.sp_unnormalized.LoadFromSerializedProto(without_normalizer(model_bytes))
        id_to_bytes = [self._piece_bytes(i) for i in range(self.sp.get_piece_size())]
        bos, eos = self.sp.bos_id(), self.sp.eos_id()
        specials = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())
                    if self.sp.is_control(i) or self.sp.is_unknown(i)}
        super().__init__(name, hash, id_to_bytes, bos if bos >= 0 else None, eos if eos >= 0 else None, specials)

    def _piece_bytes(self, i):
        piece = self.sp.id_to_piece(i)
        if self.sp.is_byte(i):  # byte fallback pieces are spelled <0xAB>
            return bytes([int(piece[3:5], 16)])
        if self.sp.is_control(i) or self.sp.is_unknown(i):
            return b""  # a special: its code (Tokenizer); an <unk> in a document is caught by align_document
        return piece.encode("utf-8")

    def normalize(self, text):
        return self.sp.normalize(text)

    def encode_array(self, text):
        return np.array(self.sp_unnormalized.encode(text), dtype=np.int64)


def file_hash(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()[:16]


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's table from bytes to the printable characters that byte-level tokenizer.json files spell tokens with:
    printable Latin-1 bytes stand for themselves, the rest (controls, space, ...) move to chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_to_char, n_moved = {}, 0
    for b in range(256):
        if b in printable:
            byte_to_char[b] = chr(b)
        else:
            byte_to_char[b] = chr(256 + n_moved)
            n_moved += 1
    return byte_to_char


BYTE_TO_CHAR = _byte_level_alphabet()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
# str.translate table that turns a vocabulary string into Latin-1 characters whose code points are the bytes; any
# other character becomes U+FFFF, which then fails to encode as Latin-1 (so a non-byte-level token is an error).
_SPELLING = {**{cp: 0xFFFF for cp in range(0x200)}, **{ord(c): b for c, b in CHAR_TO_BYTE.items()}}


def _pre_tokenizer_pattern(spec) -> str:
    """The tiktoken split pattern equivalent to a tokenizer.json pre_tokenizer (the three layouts teachers use)."""
    def is_byte_level(p, use_regex):
        return (p.get("type") == "ByteLevel" and p.get("use_regex", True) == use_regex
                and not p.get("add_prefix_space", False))
    if spec is None:
        raise ValueError("tokenizer.json has no pre_tokenizer; only byte-level BPE tokenizers are supported")
    if is_byte_level(spec, True):
        return GPT2_PATTERN
    steps = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Split" and is_byte_level(steps[1], False):
        split = steps[0]
        if "Regex" not in split.get("pattern", {}) or split.get("behavior") != "Isolated" or split.get("invert"):
            raise ValueError(f"unsupported Split pre-tokenizer {split}")
        return split["pattern"]["Regex"]
    if len(steps) == 2 and steps[0].get("type") == "Digits" and is_byte_level(steps[1], True):
        # HF splits numerals out first and runs GPT-2's regex on each remaining span. In one pattern: numerals
        # never take a leading space, and a numeral ends a whitespace run the way the end of a span does.
        numerals = r"\p{N}" if steps[0].get("individual_digits") else r"\p{N}+"
        return (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|""" + numerals +
                r"""| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+""")
    raise ValueError(f"unsupported pre_tokenizer {json.dumps(spec)[:200]} (expected ByteLevel, "
                     "Split+ByteLevel or Digits+ByteLevel, without add_prefix_space)")


def _normalizer_forms(spec) -> list[str]:
    if spec is None:
        return []
    steps = spec.get("normalizers", []) if spec.get("type") == "Sequence" else [spec]
    forms = [s.get("type") for s in steps]
    if not all(f in ("NFC", "NFD", "NFKC", "NFKD") for f in forms):
        raise ValueError(f"unsupported normalizer {json.dumps(spec)[:200]} (only Unicode normal forms)")
    return forms


def _special_ids(folder, token_to_id) -> tuple[int | None, int | None]:
    """BOS/EOS ids: tokenizer_config.json's bos_token/eos_token when it names them (Qwen says bos_token: null),
    otherwise config.json's bos_token_id/eos_token_id."""
    def read(name):
        path = os.path.join(folder, name)
        return json.load(open(path, encoding="utf-8")) if os.path.exists(path) else {}
    tokenizer_config, model_config = read("tokenizer_config.json"), read("config.json")
    ids = []
    for key in ("bos", "eos"):
        if f"{key}_token" in tokenizer_config:
            token = tokenizer_config[f"{key}_token"]
            token = token.get("content") if isinstance(token, dict) else token
            if token is not None and token not in token_to_id:
                raise ValueError(f"{key}_token {token!r} of {folder} is not in its vocabulary")
            ids.append(None if token is None else token_to_id[token])
        else:
            token_id = model_config.get(f"{key}_token_id")
            ids.append(token_id[0] if isinstance(token_id, list) else token_id)
    return ids[0], ids[1]


def _id_table(n_vocab, entries) -> list[bytes]:
    id_to_bytes = [b""] * n_vocab
    for token_id, token in entries:
        id_to_bytes[token_id] = token
    return id_to_bytes


def _load_tokenizer_json(path, folder, spec, raw) -> TiktokenTokenizer:
    model = spec["model"]
    pattern = _pre_tokenizer_pattern(spec.get("pre_tokenizer"))  # first: an unsupported layout is the likely error
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError(f"{path}: BPE options byte_fallback/continuing_subword_prefix/end_of_word_suffix are "
                         "not byte-level BPE")
    added, specials = {}, {}
    for token in spec.get("added_tokens", []):
        if token.get("special"):  # a special token: reached only through its code, never from text
            specials[token["content"]] = token["id"]
            continue
        if token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            # These would drop whitespace from the text, and then token bytes no longer spell the document.
            raise ValueError(f"{path}: added token {token['content']!r} uses lstrip/rstrip/single_word")
        added[token["content"]] = token["id"]
    vocab = model["vocab"]
    spelled = {}  # vocabulary string -> its bytes
    for token in vocab:
        if token not in added and token not in specials:
            try:
                spelled[token] = token.translate(_SPELLING).encode("latin-1")
            except UnicodeEncodeError:
                raise ValueError(f"{path}: token {token!r} is not byte-level") from None

    # Ranks: the 256 single bytes, then every merge result in merge order (tiktoken merges by rank of the result).
    # tiktoken needs all 256 bytes; a byte without a token (SmolLM2 has none for a few control bytes) gets id -1,
    # and the characters that need it are removed before encoding (see _unspellable_characters).
    ranks = {bytes([b]): b for b in range(256)}
    rank_ids = [vocab.get(BYTE_TO_CHAR[b], -1) for b in range(256)]
    for merge in model["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        merged = left + right
        if merged not in spelled:
            raise ValueError(f"{path}: merge {left!r} + {right!r} gives {merged!r}, which is not in the vocab")
        if spelled[merged] not in ranks:  # a token reachable by two merges keeps the first (lowest) rank
            ranks[spelled[merged]] = len(ranks)
            rank_ids.append(vocab[merged])
    n_vocab = max([*vocab.values(), *added.values(), *specials.values()]) + 1
    entries = [(vocab[t], b) for t, b in spelled.items()]
    entries += [(i, t.encode("utf-8")) for t, i in added.items()]  # added tokens spell their own text
    encoding = _tiktoken_encoding(os.path.basename(folder), pattern, ranks)
    token_to_id = {**vocab, **added, **specials}
    return TiktokenTokenizer(os.path.basename(folder), file_hash(raw), encoding, np.array(rank_ids),
                             _id_table(n_vocab, entries), added, _normalizer_forms(spec.get("normalizer")),
                             *_special_ids(folder, token_to_id), specials=specials)


def _tiktoken_encoding(name, pattern, ranks):
    import tiktoken  # imported here so that reading shards never needs it
    return tiktoken.Encoding(f"{name}-{len(ranks)}", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})


def _load_rank_file(path, folder, raw) -> TiktokenTokenizer:
    """A tiktoken rank file ("base64-token rank" per line), e.g. Llama-3's original tokenizer.model."""
    ranks = {}
    for line_no, line in enumerate(raw.decode("ascii", errors="replace").splitlines(), 1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{path}:{line_no}: expected 'base64-token rank', got {line[:60]!r}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1}")
    specials = _rank_file_specials(folder, len(ranks))
    n_vocab = max([len(ranks) - 1, *specials.values()]) + 1
    entries = [(r, t) for t, r in ranks.items()]
    definition = json.dumps(sorted(specials.items())).encode("utf-8")
    encoding = _tiktoken_encoding(os.path.basename(folder), LLAMA3_PATTERN, ranks)
    bos, eos = _special_ids(folder, {**specials})
    if bos is None and eos is None:  # a bare Meta folder: Llama-3's convention
        bos, eos = specials.get("<|begin_of_text|>"), specials.get("<|end_of_text|>")
    return TiktokenTokenizer(os.path.basename(folder), file_hash(raw, definition), encoding,
                             np.arange(len(ranks)), _id_table(n_vocab, entries), {}, [], bos, eos, specials)


def _rank_file_specials(folder, n_ranks) -> dict[str, int]:
    config_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(config_path):
        decoder = json.load(open(config_path, encoding="utf-8")).get("added_tokens_decoder", {})
        specials = {entry["content"]: int(i) for i, entry in decoder.items() if int(i) >= n_ranks}
        if specials:
            return specials
    return {token: n_ranks + i for i, token in enumerate(LLAMA3_SPECIALS)}


def _is_rank_file(raw: bytes) -> bool:
    first_line = raw[:4096].split(b"\n", 1)[0]
    return re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", first_line) is not None


def load_tokenizer(folder: str) -> Tokenizer | None:
    """The tokenizer of an HF-layout folder: a byte-level BPE tokenizer.json, else tokenizer.model (a tiktoken rank
    file or a SentencePiece model). None if the folder has neither."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"teacher folder {folder} does not exist")
    folder = os.path.abspath(folder)
    json_path, model_path = os.path.join(folder, "tokenizer.json"), os.path.join(folder, "tokenizer.model")
    if os.path.exists(json_path):
        raw = open(json_path, "rb").read()
        try:
            spec = json.loads(raw)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            raise ValueError(f"{json_path}: not valid JSON ({e})") from None
        if not isinstance(spec, dict):
            raise ValueError(f"{json_path}: not a tokenizer (the JSON is not an object)")
        if spec.get("model", {}).get("type") == "BPE" and '"ByteLevel"' in json.dumps(spec.get("pre_tokenizer")):
            return _load_tokenizer_json(json_path, folder, spec, raw)
        if not os.path.exists(model_path):  # e.g. Llama-2's SentencePiece-style tokenizer.json without its .model
            raise ValueError(f"{json_path} is not a byte-level BPE tokenizer and there is no tokenizer.model")
    if os.path.exists(model_path):
        raw = open(model_path, "rb").read()
        if _is_rank_file(raw):
            return _load_rank_file(model_path, folder, raw)
        try:
            return SentencePieceTokenizer(os.path.basename(folder), file_hash(raw), raw)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on a broken file
            raise ValueError(f"{model_path} is neither a tiktoken rank file nor a SentencePiece model ({e})") from e
    return None


# ----------------------------------------------------------------------------------------------------------------
# Alignment

@dataclass
class Aligned:
    bytes: np.ndarray      # (N,) uint8: 0xFE, then the UTF-8 of the normalised text
    token_end: np.ndarray  # (N,) bool: byte t is the last byte of a teacher token (the 0xFE byte is the BOS token)
    token_id: np.ndarray   # (N,) int32: the token ending at byte t, -1 where no token ends
    n_repaired: int        # invalid UTF-8 sequences (and lone surrogates) replaced by U+FFFD
    n_dropped: int = 0     # characters removed because the vocabulary has no token for them (e.g. U+0004)


def repair_utf8(text: str | bytes) -> tuple[str, int]:
    """Valid text and the number of U+FFFD it gained: bytes and tokens must describe one and the same string."""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)  # lone surrogates too
    repaired = raw.decode("utf-8", errors="replace")
    return repaired, repaired.count("\ufffd") - raw.count("\ufffd".encode("utf-8"))


def split_codes(raw: bytes, code_ids: dict[bytes, int]) -> list:
    """Bytes in byte space -> pieces: bytes of text, and the ids of the special codes between them. A 0xFF that does
    not start a code of this vocabulary is a ValueError (it is not text either)."""
    pieces, start = [], 0
    while (at := raw.find(SPECIAL_BYTE, start)) >= 0:
        code = raw[at:at + 2]
        if code not in code_ids:
            raise ValueError(f"byte 0xFF at offset {at} does not start a special-token code of this vocabulary "
                             f"({code.hex(' ')})")
        if at > start:
            pieces.append(raw[start:at])
        pieces.append(code_ids[code])
        start = at + 2
    if start < len(raw):
        pieces.append(raw[start:])
    return pieces


def show(raw: bytes, names: dict[bytes, str], raw_codes=False) -> str:
    """Bytes in byte space as text: each special code as its token's name (or, raw_codes, as its hex); a 0xFF that
    starts no code, and invalid UTF-8, as U+FFFD."""
    out, start = [], 0
    while (at := raw.find(SPECIAL_BYTE, start)) >= 0:
        code = raw[at:at + 2]
        out.append(raw[start:at].decode("utf-8", "replace"))
        if code in names:
            out.append(f"<{code.hex(' ')}>" if raw_codes else names[code])
            start = at + 2
        else:
            out.append("\ufffd")
            start = at + 1
    return "".join(out) + raw[start:].decode("utf-8", "replace")


def align_document(text: str | bytes, tok: Tokenizer, codes=False) -> Aligned:
    """One document -> Aligned. codes=True: text is bytes in byte space (a chat transcript), whose special codes
    align with their tokens' ids; otherwise every byte is text (a 0xFF is invalid UTF-8 and becomes U+FFFD)."""
    pieces = split_codes(bytes(text), tok.code_ids) if codes else [text]
    ids, docs, n_repaired, n_dropped = [], [], 0, 0
    for piece in pieces:
        if isinstance(piece, int):
            ids.append(np.array([piece], dtype=np.int64))
            docs.append(tok.token_bytes(piece))
            continue
        piece, repaired = repair_utf8(piece)
        piece, dropped = tok.normalize(piece), 0
        if tok.unspellable is not None:
            piece, dropped = tok.unspellable.subn("", piece)
        ids.append(tok.encode_array(piece))
        docs.append(piece.encode("utf-8"))
        n_repaired, n_dropped = n_repaired + repaired, n_dropped + dropped
    ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    doc = b"".join(docs)
    lengths = tok.token_lengths[ids]
    # Exactness check: the tokens must spell the document byte for byte, each token at least one byte long.
    if (lengths == 0).any() or int(lengths.sum()) != len(doc) or tok.decode(ids) != doc:
        raise ValueError(f"tokenizer {tok.name!r}: tokens do not spell the text exactly (unknown tokens?) "
                         f"near {show(doc[:60], {})!r}")
    n = len(doc) + 1
    token_end = np.zeros(n, dtype=bool)
    token_id = np.full(n, -1, dtype=np.int32)
    ends = np.cumsum(lengths)  # with the 0xFE byte at 0, token k's last byte sits at index ends[k]
    token_end[0], token_id[0] = True, tok.doc_start_id
    token_end[ends], token_id[ends] = True, ids
    all_bytes = np.empty(n, dtype=np.uint8)
    all_bytes[0] = DOC_START_BYTE
    all_bytes[1:] = np.frombuffer(doc, dtype=np.uint8)
    return Aligned(all_bytes, token_end, token_id, n_repaired, n_dropped)
