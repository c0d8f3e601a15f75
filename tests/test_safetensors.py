"""Our safetensors reader/writer (safetensors_io.py) against the `safetensors` library, plus a header fuzz test.

Oracles: the tensors we wrote (round trip), `safetensors.torch` (files written by the library read equal by ours,
and ours read equal by the library). Every malformed file must end in a ValueError naming the file and the problem."""
import json
import os
import random
import struct
import traceback

import pytest
import torch
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file as st_save_file

import safetensors_io
from safetensors_io import read_checkpoint, read_safetensors, read_safetensors_header, write_safetensors


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f64": torch.randn(4, generator=g, dtype=torch.float64),
        "f16": torch.randn(2, 3, 2, generator=g).half(),
        "bf16": torch.randn(7, 3, generator=g).bfloat16(),  # odd element count: the next tensor starts misaligned
        "i64": torch.tensor([0, -1, 2**40 + 3, -(2**62), 2**63 - 1]),
        "i32": torch.randint(-2**31, 2**31 - 1, (3, 3), generator=g, dtype=torch.int32),
        "i16": torch.randint(-2**15, 2**15 - 1, (5,), generator=g, dtype=torch.int16),
        "i8": torch.randint(-128, 127, (3,), generator=g, dtype=torch.int8),
        "u8": torch.arange(256, dtype=torch.uint8).reshape(16, 16),
        "bool": torch.rand(11, generator=g) > 0.5,
        "empty_f32": torch.zeros(0, 4),
        "empty_i64": torch.zeros(0, dtype=torch.int64),
        "empty_3d_bf16": torch.zeros(2, 0, 3, dtype=torch.bfloat16),
        "scalar_f32": torch.tensor(3.25),
        "scalar_i64": torch.tensor(-7),
        "scalar_bool": torch.tensor(True),
    }


def assert_same(got, want):
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("use_mmap", [False, True])
def test_round_trip_all_dtypes(tmp_path, use_mmap):
    want = sample_tensors()
    path = str(tmp_path / "t.safetensors")
    write_safetensors(want, path, metadata={"format": "pt", "n": 3})
    got = read_safetensors(path, use_mmap=use_mmap)
    assert_same(got, want)
    entries, metadata, data_start = read_safetensors_header(path)
    assert metadata == {"format": "pt", "n": "3"}
    assert data_start % 8 == 0  # the writer pads the header so the data section starts aligned
    assert {k: (v[0], v[1]) for k, v in entries.items()} == {
        k: (safetensors_io.DTYPE_NAMES[t.dtype], tuple(t.shape)) for k, t in want.items()}


def test_mmap_is_copy_on_write_and_fresh_tensors_are_independent(tmp_path):
    path = str(tmp_path / "t.safetensors")
    want = {"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(3, dtype=torch.int32)}
    write_safetensors(want, path)
    before = open(path, "rb").read()
    for use_mmap in (True, False):
        got = read_safetensors(path, use_mmap=use_mmap)
        got["a"] += 100
        got["b"].zero_()
    assert open(path, "rb").read() == before  # writing into a mapped tensor never reaches the file
    assert_same(read_safetensors(path), want)


def test_dtype_conversion_on_load(tmp_path):
    want = sample_tensors()
    path = str(tmp_path / "t.safetensors")
    write_safetensors(want, path)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for use_mmap in (False, True):
            got = read_safetensors(path, dtype=dtype, use_mmap=use_mmap)
            for k, t in want.items():
                if t.is_floating_point():  # floats converted, exactly as torch's own .to() would
                    assert got[k].dtype == dtype, k
                    assert torch.equal(got[k], t.to(dtype)), k
                else:  # integers and bools untouched
                    assert got[k].dtype == t.dtype and torch.equal(got[k], t), k


def test_names_subset(tmp_path):
    want = sample_tensors()
    path = str(tmp_path / "t.safetensors")
    write_safetensors(want, path)
    got = read_safetensors(path, names={"bf16", "u8"})
    assert_same(got, {"bf16": want["bf16"], "u8": want["u8"]})


def test_misaligned_data_section(tmp_path):
    """A header whose length is not a multiple of 8 (legal in the format) puts tensors at misaligned offsets."""
    a = torch.randn(3, 2)
    b = torch.tensor([1, -2, 3], dtype=torch.int64)
    c = torch.randn(5).bfloat16()
    blobs = [a.view(torch.uint8).numpy().tobytes(), b.view(torch.uint8).numpy().tobytes(),
             c.view(torch.uint8).numpy().tobytes()]
    o1, o2 = len(blobs[0]), len(blobs[0]) + len(blobs[1])
    header = {"a": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, o1]},
              "b": {"dtype": "I64", "shape": [3], "data_offsets": [o1, o2]},
              "c": {"dtype": "BF16", "shape": [5], "data_offsets": [o2, o2 + len(blobs[2])]}}
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8 + 3)  # data section starts at 8 + 8k + 3
    assert (8 + len(raw)) % 8 == 3
    path = str(tmp_path / "odd.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    for use_mmap in (False, True):
        assert_same(read_safetensors(path, use_mmap=use_mmap), {"a": a, "b": b, "c": c})


def test_write_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError, match="complex"):
        write_safetensors({"z": torch.zeros(2, dtype=torch.complex64)}, str(tmp_path / "z.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
# Interoperability with the safetensors library (the oracle for the format itself).

def test_library_written_files_read_equal(tmp_path):
    want = sample_tensors()
    path = str(tmp_path / "lib.safetensors")
    st_save_file(want, path, metadata={"format": "pt", "who": "library"})
    for use_mmap in (False, True):
        assert_same(read_safetensors(path, use_mmap=use_mmap), want)
    assert read_safetensors_header(path)[1] == {"format": "pt", "who": "library"}


def test_our_files_read_equal_by_library(tmp_path):
    want = sample_tensors()
    path = str(tmp_path / "ours.safetensors")
    write_safetensors(want, path, metadata={"format": "pt"})
    assert_same(st_load_file(path), want)


# ---------------------------------------------------------------------------------------------------------------
# Sharded checkpoints.

def write_sharded(folder, shards):
    """shards: {filename: {name: tensor}} -> the files plus model.safetensors.index.json."""
    weight_map = {}
    for fname, tensors in shards.items():
        write_safetensors(tensors, os.path.join(folder, fname))
        weight_map.update({k: fname for k in tensors})
    write_index(folder, weight_map)
    return weight_map


def write_index(folder, weight_map):
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def test_sharded_checkpoint(tmp_path):
    t = sample_tensors()
    names = sorted(t)
    shards = {"model-00001-of-00003.safetensors": {k: t[k] for k in names[:5]},
              "model-00002-of-00003.safetensors": {k: t[k] for k in names[5:11]},
              "model-00003-of-00003.safetensors": {k: t[k] for k in names[11:]}}
    write_sharded(str(tmp_path), shards)
    for use_mmap in (False, True):
        assert_same(read_checkpoint(str(tmp_path), use_mmap=use_mmap), t)
    got = read_checkpoint(str(tmp_path), dtype=torch.bfloat16)
    assert got["f32"].dtype == torch.bfloat16 and torch.equal(got["f32"], t["f32"].bfloat16())
    assert got["i64"].dtype == torch.int64


def test_sharded_checkpoint_ignores_unlisted_tensors(tmp_path):
    """A shard may hold more than the index lists (e.g. a stale copy); only what the index names is loaded."""
    write_safetensors({"a": torch.ones(2), "junk": torch.zeros(3)}, str(tmp_path / "s1.safetensors"))
    write_index(str(tmp_path), {"a": "s1.safetensors"})
    assert_same(read_checkpoint(str(tmp_path)), {"a": torch.ones(2)})


def test_single_file_checkpoint_and_missing_checkpoint(tmp_path):
    t = sample_tensors()
    write_safetensors(t, str(tmp_path / "model.safetensors"))
    assert_same(read_checkpoint(str(tmp_path)), t)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        read_checkpoint(str(empty))


def test_index_pointing_at_missing_shard(tmp_path):
    write_sharded(str(tmp_path), {"s1.safetensors": {"a": torch.ones(2)}})
    write_index(str(tmp_path), {"a": "s1.safetensors", "b": "s2.safetensors"})
    with pytest.raises(FileNotFoundError) as e:
        read_checkpoint(str(tmp_path))
    assert "s2.safetensors" in str(e.value) and "missing" in str(e.value)


@pytest.mark.parametrize("target", ["../x.safetensors", "sub/x.safetensors", "/etc/passwd", "..", 3, None])
def test_index_pointing_outside_the_folder(tmp_path, target):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    write_safetensors({"a": torch.ones(2)}, str(tmp_path / "x.safetensors"))  # exists, but outside the folder
    write_safetensors({"a": torch.ones(2)}, str(folder / "s1.safetensors"))
    write_index(str(folder), {"a": "s1.safetensors", "b": target})
    with pytest.raises(ValueError) as e:
        read_checkpoint(str(folder))
    msg = str(e.value)
    assert "model.safetensors.index.json" in msg and repr(target) in msg and "'b'" in msg


def test_index_listing_a_tensor_the_shard_lacks(tmp_path):
    write_safetensors({"a": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    write_index(str(tmp_path), {"a": "s1.safetensors", "ghost.weight": "s1.safetensors"})
    with pytest.raises(ValueError, match="ghost.weight"):
        read_checkpoint(str(tmp_path))


@pytest.mark.parametrize("content", ["{not json", "[]", '{"weight_map": [1, 2]}', '{"metadata": {}}', "null"])
def test_malformed_index(tmp_path, content):
    write_safetensors({"a": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(content)
    with pytest.raises(ValueError, match="index"):
        read_checkpoint(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# Malformed files: targeted cases (the message names the file and the problem).

def base_tensors():
    return {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16),
            "c": torch.tensor([5, -6], dtype=torch.int64)}


def base_header():
    """The valid header of base_tensors() as written by write_safetensors: a, b, c laid out in name order."""
    return {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
            "c": {"dtype": "I64", "shape": [2], "data_offsets": [32, 48]},
            "__metadata__": {"format": "pt"}}


def base_data():
    t = base_tensors()
    return b"".join(t[k].view(torch.uint8).numpy().tobytes() for k in "abc")


def craft(path, header, data=None, length=None):
    """A file with `header` (a dict, or raw bytes) and the base data section; `length` overrides the length prefix."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    data = base_data() if data is None else data
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return str(path)


def test_crafted_base_file_is_valid(tmp_path):
    """The fixture the targeted and fuzz cases mutate must itself load, and equal what it encodes."""
    path = craft(tmp_path / "ok.safetensors", base_header())
    assert_same(read_safetensors(path), base_tensors())


def _mutated(fn):
    h = base_header()
    fn(h)
    return h


BAD_HEADERS = [  # (id, header dict or raw bytes, length override, words the message must contain)
    ("overlap", _mutated(lambda h: h["b"].update(data_offsets=[20, 28])), None, ["overlap", "'a'", "'b'"]),
    ("overlap_same_span", _mutated(lambda h: h["b"].update(dtype="F32", shape=[2], data_offsets=[0, 8])), None,
     ["overlap"]),
    ("overlap_contained", _mutated(lambda h: h.update(d={"dtype": "U8", "shape": [2], "data_offsets": [4, 6]})), None,
     ["overlap"]),
    ("unknown_dtype", _mutated(lambda h: h["a"].update(dtype="F8_E4M3X")), None, ["unknown dtype", "F8_E4M3X"]),
    ("lowercase_dtype", _mutated(lambda h: h["a"].update(dtype="f32")), None, ["unknown dtype"]),
    ("missing_dtype", _mutated(lambda h: h["a"].pop("dtype")), None, ["dtype"]),
    ("list_dtype", _mutated(lambda h: h["a"].update(dtype=["F32"])), None, ["dtype"]),
    ("dict_dtype", _mutated(lambda h: h["a"].update(dtype={"F32": 1})), None, ["dtype"]),
    ("end_outside", _mutated(lambda h: h["c"].update(data_offsets=[40, 56])), None, ["outside"]),
    ("begin_after_end", _mutated(lambda h: h["a"].update(data_offsets=[24, 0])), None, ["outside"]),
    ("negative_offset", _mutated(lambda h: h["a"].update(data_offsets=[-24, 0])), None, ["outside"]),
    ("huge_offsets", _mutated(lambda h: h["c"].update(data_offsets=[2**64, 2**64 + 16])), None, ["outside"]),
    ("float_offsets", _mutated(lambda h: h["a"].update(data_offsets=[0.0, 24.0])), None, ["data_offsets"]),
    ("bool_offsets", _mutated(lambda h: h["a"].update(data_offsets=[False, 24])), None, ["data_offsets"]),
    ("three_offsets", _mutated(lambda h: h["a"].update(data_offsets=[0, 12, 24])), None, ["data_offsets"]),
    ("size_mismatch", _mutated(lambda h: h["a"].update(shape=[2, 2])), None, ["'a'", "24", "16"]),
    ("huge_shape", _mutated(lambda h: h["a"].update(shape=[2**40, 2**40])), None, ["'a'"]),
    ("huge_shape_zero_dim", _mutated(lambda h: h["a"].update(shape=[0, 2**64], data_offsets=[0, 0])), None,
     ["shape"]),
    ("huge_shape_zero_dim_2", _mutated(lambda h: h["a"].update(shape=[10**30, 0], data_offsets=[0, 0])), None,
     ["shape"]),
    ("zero_dim_stride_overflow", _mutated(lambda h: h["a"].update(shape=[0] + [2] * 64, data_offsets=[0, 0])), None,
     ["shape"]),
    ("zero_dim_numel_overflow", _mutated(lambda h: h["a"].update(shape=[2**62] * 3 + [0], data_offsets=[0, 0])), None,
     ["shape"]),
    ("negative_shape", _mutated(lambda h: h["a"].update(shape=[-2, -3])), None, ["shape"]),
    ("float_shape", _mutated(lambda h: h["a"].update(shape=[2.0, 3])), None, ["shape"]),
    ("bool_shape", _mutated(lambda h: h["a"].update(shape=[True, 6])), None, ["shape"]),
    ("shape_not_list", _mutated(lambda h: h["a"].update(shape="2,3")), None, ["shape"]),
    ("entry_not_object", _mutated(lambda h: h.update(a=[1, 2])), None, ["'a'", "not an object"]),
    ("metadata_not_strings", _mutated(lambda h: h.update(__metadata__={"n": 3})), None, ["__metadata__"]),
    ("metadata_list", _mutated(lambda h: h.update(__metadata__=["x"])), None, ["__metadata__"]),
    ("top_level_list", b"[1, 2, 3]", None, ["not an object"]),
    ("not_json", b"hello, world", None, ["JSON"]),
    ("not_utf8", b'{"a\xff\xfe": 1}', None, ["UTF-8"]),
    ("empty_header", b"", None, ["JSON"]),
    ("deep_nesting", b"[" * 100_000 + b"]" * 100_000, None, ["JSON"]),
    ("deep_nesting_objects", b'{"a":' * 50_000 + b"1" + b"}" * 50_000, None, ["JSON"]),
    ("huge_int_literal", b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 24]}}', None,
     []),
    ("length_past_end", base_header(), 10_000, ["header length", "past the end"]),
    ("length_huge", base_header(), 2**64 - 1, ["header length", "cap"]),
    ("length_over_cap", base_header(), safetensors_io.MAX_HEADER_BYTES + 1, ["header length", "cap"]),
]


@pytest.mark.parametrize("case", BAD_HEADERS, ids=[c[0] for c in BAD_HEADERS])
def test_malformed_header_is_a_clear_value_error(tmp_path, case):
    _, header, length, words = case
    path = craft(tmp_path / "bad.safetensors", header, length=length)
    for use_mmap in (False, True):
        with pytest.raises(ValueError) as e:
            read_safetensors(path, use_mmap=use_mmap)
        msg = str(e.value)
        assert path in msg, msg
        for w in words:
            assert w in msg, (w, msg)


@pytest.mark.parametrize("size", [0, 1, 7])
def test_file_shorter_than_the_length_prefix(tmp_path, size):
    path = str(tmp_path / "short.safetensors")
    with open(path, "wb") as f:
        f.write(b"\x10" * size)
    with pytest.raises(ValueError) as e:
        read_safetensors(path)
    assert path in str(e.value) and "8-byte" in str(e.value)


def test_truncated_data_section(tmp_path):
    path = craft(tmp_path / "trunc.safetensors", base_header(), data=base_data()[:-1])
    with pytest.raises(ValueError, match="outside") as e:
        read_safetensors(path)
    assert "'c'" in str(e.value) and path in str(e.value)


def test_lenient_but_valid_headers_load(tmp_path):
    """Things the format allows: trailing bytes after the last tensor, gaps between tensors, tensors out of order,
    whitespace padding, no metadata."""
    h = base_header()
    del h["__metadata__"]
    raw = (b"  " + json.dumps(dict(reversed(list(h.items())))).encode() + b"   \n")
    path = craft(tmp_path / "ok1.safetensors", raw, data=base_data() + b"\x00" * 13)
    assert_same(read_safetensors(path), base_tensors())
    h = base_header()  # gap of 8 bytes before c
    h["c"]["data_offsets"] = [40, 56]
    data = base_data()
    path = craft(tmp_path / "ok2.safetensors", h, data=data[:32] + b"\xee" * 8 + data[32:])
    assert_same(read_safetensors(path), base_tensors())


# ---------------------------------------------------------------------------------------------------------------
# Fuzz: mutate the header of a small valid file; every case must load or raise ValueError, nothing else.

EVIL_VALUES = [
    0, 1, -1, 7, 24, 48, 49, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 2**64 + 8, 10**30, -(2**63), -(2**64),
    0.5, 24.0, -0.0, 1e308, float("inf"), float("nan"), True, False, None, "", "F32", "24", "BF16 ", "\x00",
    [], [0], [0, 0], [24, 0], [-1, 23], [0, 2**64], [2**63, 2**63], [0.0, 24.0], [True, True], [None, None],
    [[0, 24]], {}, {"dtype": "F32"}, [2, 3], [0, 2**63], [2**63, 0], [0, 10**30], [10**30, 0], [3, -2],
]
EVIL_DTYPES = ["F8", "f32", "", "BF16 ", "F32\x00", "U16", "C64", "float32", "I128", None, 3, ["F32"], {"F32": 1}, True]


def _structural_mutation(rng):
    """A header dict with one to three random field-level mutations, serialised as JSON (sometimes with NaN etc.)."""
    h = base_header()
    names = ["a", "b", "c"]
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(12)
        name = rng.choice(names)
        entry = h.get(name)
        if not isinstance(entry, dict):
            continue
        if kind == 0:
            entry["dtype"] = rng.choice(EVIL_DTYPES + list(safetensors_io.SAFETENSORS_DTYPES))
        elif kind == 1:
            entry["shape"] = rng.choice(EVIL_VALUES)
        elif kind == 2:
            entry["data_offsets"] = rng.choice(EVIL_VALUES)
        elif kind == 3:  # one coordinate of shape or offsets replaced
            key = rng.choice(["shape", "data_offsets"])
            if isinstance(entry.get(key), list) and entry[key]:
                entry[key][rng.randrange(len(entry[key]))] = rng.choice(EVIL_VALUES[:24])
        elif kind == 4:  # overlapping / shifted offsets copied from another tensor
            other = h[rng.choice(names)]
            if isinstance(other, dict):
                entry["data_offsets"] = list(other.get("data_offsets") or [0, 0])
                if rng.random() < 0.5:
                    entry["shape"], entry["dtype"] = other.get("shape"), other.get("dtype")
        elif kind == 5:
            entry.pop(rng.choice(["dtype", "shape", "data_offsets"]), None)
        elif kind == 6:
            h[name] = rng.choice(EVIL_VALUES)
        elif kind == 7:
            h["__metadata__"] = rng.choice(EVIL_VALUES + [{"k": 1}, {"k": None}, {"k": "v"}, {"": ""}])
        elif kind == 8:  # a new tensor at a random place
            h[f"new{rng.randrange(100)}"] = {"dtype": rng.choice(list(safetensors_io.SAFETENSORS_DTYPES)),
                                             "shape": [rng.randrange(0, 9) for _ in range(rng.randrange(0, 3))],
                                             "data_offsets": sorted([rng.randrange(0, 60), rng.randrange(0, 60)])}
        elif kind == 9:  # zero-size tensor with huge or many dimensions
            shape = rng.choice([[0, 2**31], [0, 2**62], [0, 2**63], [0, 2**64], [10**30, 0], [2**62] * 3 + [0],
                                [0] + [2] * rng.choice([40, 63, 64, 200]), [1] * rng.choice([64, 1000])])
            entry.update(shape=shape, data_offsets=[0, 0])
        elif kind == 10:  # nested junk inside an entry
            entry[rng.choice(["dtype", "shape", "data_offsets", "extra"])] = [[[[rng.choice(EVIL_VALUES[:10])]]]]
        else:  # shape and offsets consistent with each other but not with the file
            n = rng.choice([1, 6, 12, 100, 2**20])
            entry.update(dtype="U8", shape=[n], data_offsets=[48 - n, 48] if n <= 48 else [0, n])
    return json.dumps(h).encode()  # json.dumps writes NaN/Infinity literals, which json.loads accepts


def _fuzz_case(rng, good):
    """(description, file bytes) for one random mutation of the valid file `good`."""
    (n,) = struct.unpack("<Q", good[:8])
    header, data = good[8:8 + n], good[8 + n:]
    kind = rng.randrange(10)
    if kind == 9:  # a valid rewrite of the same header (whitespace, key order, metadata): must load and be equal
        h = json.loads(header)
        items = list(h.items())
        rng.shuffle(items)
        if rng.random() < 0.5:
            h = dict(items, __metadata__={"x": "y" * rng.randrange(50)})
        raw = json.dumps(dict(items) if rng.random() < 0.5 else h, indent=rng.choice([None, 0, 3])).encode()
        raw += b" " * rng.randrange(20)
        return "valid: rewritten header", struct.pack("<Q", len(raw)) + raw + data
    if kind == 0:  # flipped bytes in the header
        b = bytearray(header)
        flips = [(rng.randrange(len(b)), rng.randrange(1, 256)) for _ in range(rng.randint(1, 4))]
        for i, x in flips:
            b[i] ^= x
        return f"flip header bytes {flips}", good[:8] + bytes(b) + data
    if kind == 1:  # truncation at a random point
        cut = rng.randrange(0, len(good))
        return f"truncate to {cut} bytes", good[:cut]
    if kind == 2:  # lying length prefix, small lie
        lie = max(0, n + rng.randint(-n, 64))
        return f"length {lie} instead of {n}", struct.pack("<Q", lie) + header + data
    if kind == 3:  # lying length prefix, huge or random 64-bit
        lie = rng.choice([2**64 - 1, 2**63, 2**32, safetensors_io.MAX_HEADER_BYTES, safetensors_io.MAX_HEADER_BYTES + 1,
                          rng.randrange(2**64)])
        return f"length {lie}", struct.pack("<Q", lie) + header + data
    if kind == 4:  # flipped bytes in the length prefix
        b = bytearray(good[:8])
        i = rng.randrange(8)
        b[i] ^= rng.randrange(1, 256)
        return f"flip length byte {i}", bytes(b) + header + data
    if kind == 5:  # structural mutation, correct length
        raw = _structural_mutation(rng)
        return f"structural {raw[:300]!r}", struct.pack("<Q", len(raw)) + raw + data
    if kind == 6:  # structural mutation and truncated data
        raw = _structural_mutation(rng)
        cut = rng.randrange(0, len(data) + 1)
        return f"structural {raw[:300]!r}, data cut to {cut}", struct.pack("<Q", len(raw)) + raw + data[:cut]
    if kind == 7:  # non-JSON / odd JSON / deep nesting replacing the header
        depth = rng.choice([10, 1000, 100_000])
        raw = rng.choice([
            b"not json at all", b"\xff\xfe\x00\x01", b"{}", b"[]", b"null", b"42", b'"str"', b"{" * depth,
            b"[" * depth + b"]" * depth, b'{"a":' * depth + b"0" + b"}" * depth, b'{"a": {"dtype": "F32"',
            bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))), b'{"a": NaN}', b'{"a": 1e99999}',
            b'{"a": {"dtype": "F32", "shape": [1' + b"0" * 5000 + b'], "data_offsets": [0, 24]}}',
        ])
        return f"header replaced by {raw[:80]!r}... ({len(raw)} bytes)", struct.pack("<Q", len(raw)) + raw + data
    # random bytes spliced into or deleted from the header, length prefix kept
    b = bytearray(header)
    i = rng.randrange(len(b))
    if rng.random() < 0.5:
        del b[i:i + rng.randint(1, 8)]
        desc = f"delete header bytes at {i}"
    else:
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        desc = f"insert header bytes at {i}"
    return desc, good[:8] + bytes(b) + data


def test_fuzz_header_mutations(tmp_path):
    good_path = str(tmp_path / "good.safetensors")
    write_safetensors(base_tensors(), good_path, metadata={"format": "pt"})
    good = open(good_path, "rb").read()
    rng = random.Random(20240229)
    path = str(tmp_path / "fuzz.safetensors")
    failures, outcomes = [], {"loaded": 0, "ValueError": 0}
    n_cases = 800
    for case in range(n_cases):
        desc, blob = _fuzz_case(rng, good)
        with open(path, "wb") as f:
            f.write(blob)
        try:
            out = read_safetensors(path, use_mmap=bool(case % 2), dtype=torch.float32 if case % 3 == 0 else None)
        except ValueError as e:
            outcomes["ValueError"] += 1
            if desc.startswith("valid:"):
                failures.append(f"case {case} ({desc}): a valid file was refused: {e}")
            if path not in str(e):
                failures.append(f"case {case} ({desc}): ValueError without the file name: {e}")
            continue
        except Exception as e:  # anything else is a bug in the reader's validation
            failures.append(f"case {case} ({desc}): {type(e).__name__}: {e}\n"
                            f"{''.join(traceback.format_exception_only(type(e), e))[:500]}")
            continue
        outcomes["loaded"] += 1
        if desc.startswith("valid:"):
            want = base_tensors()
            if case % 3 == 0:
                want = {k: v.float() if v.is_floating_point() else v for k, v in want.items()}
            assert_same(out, want)
        # a file that loads must describe tensors that fit in it
        entries, _, data_start = read_safetensors_header(path)
        assert out.keys() == entries.keys()
        for k, (dt, shape, begin, end) in entries.items():
            assert tuple(out[k].shape) == shape and data_start + end <= len(blob), (case, desc, k)
    assert not failures, f"{len(failures)} of {n_cases} fuzz cases raised something other than ValueError:\n" + \
        "\n".join(failures[:15])
    # the fuzzer must exercise both outcomes, or it is not testing anything
    assert outcomes["ValueError"] > n_cases // 2 and outcomes["loaded"] > n_cases // 20, outcomes
