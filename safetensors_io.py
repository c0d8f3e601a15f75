"""Our own safetensors reader and writer (every header field checked against the file), and the HF-layout folder
reader (one file, or shards listed in model.safetensors.index.json). Teachers and byte-model folders both use it.

Format: 8-byte little-endian header length N, N bytes of JSON
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the data section.
Offsets are relative to the start of the data section. A file that does not describe itself exactly is a
ValueError naming the file and the problem, never an out-of-bounds read.
"""
import json
import math
import mmap
import os
import struct

import torch


SAFETENSORS_DTYPES = {  # name -> (torch dtype, itemsize). BF16 is read as raw 16-bit words and viewed as bfloat16.
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
DTYPE_NAMES = {dt: name for name, (dt, _) in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own reference implementation caps headers at 100 MB too


def is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def read_safetensors_header(path):
    """Parse and validate the header. Returns (entries {name: (dtype_name, shape, begin, end)}, metadata, data_start).
    Raises ValueError naming the file and the problem for anything that does not describe the file exactly."""
    size = os.path.getsize(path)

    def bad(msg):
        return ValueError(f"{path}: not a valid safetensors file: {msg}")

    if size < 8:
        raise bad(f"file is {size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise bad(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte cap")
        if 8 + n > size:
            raise bad(f"header length {n} runs past the end of the {size}-byte file")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(f"header is not valid UTF-8 JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise bad("header JSON is not an object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise bad("__metadata__ must map strings to strings")
    data_start, data_len = 8 + n, size - 8 - n
    entries = {}
    for name, info in header.items():
        if not isinstance(info, dict):
            raise bad(f"entry {name!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise bad(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
            raise bad(f"tensor {name!r} has an invalid shape {shape!r}")
        if math.prod(max(d, 1) for d in shape) >= 2**63:  # torch cannot even describe it (even with a zero dim)
            raise bad(f"tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)):
            raise bad(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise bad(f"tensor {name!r} data_offsets {offsets} fall outside the {data_len}-byte data section")
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype][1]
        if end - begin != nbytes:
            raise bad(f"tensor {name!r} spans {end - begin} bytes but {dtype}{shape} needs {nbytes}")
        entries[name] = (dtype, tuple(shape), begin, end)
    spans = sorted((b, e, k) for k, (_, _, b, e) in entries.items() if e > b)
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise bad(f"tensors {prev!r} and {name!r} overlap")
    return entries, metadata, data_start


def read_safetensors(path, dtype=None, device="cpu", use_mmap=False, names=None):
    """Read tensors from one .safetensors file -> {name: tensor}. use_mmap=True returns tensors backed by the file's
    pages (copy-on-write, loaded lazily); otherwise fresh tensors. Float tensors are converted to `dtype` if given."""
    entries, _, data_start = read_safetensors_header(path)
    with open(path, "rb") as f:
        size = os.path.getsize(path)
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 0 else b""
    out = {}
    for name, (dt_name, shape, begin, end) in entries.items():
        if names is not None and name not in names:
            continue
        torch_dtype, itemsize = SAFETENSORS_DTYPES[dt_name]
        start = data_start + begin
        if start % itemsize == 0 and end > begin:  # aligned: view the mapped bytes directly
            raw = torch.frombuffer(buf, dtype=torch.uint8, count=end - begin, offset=start)
        else:  # misaligned or empty: copy the bytes out first (frombuffer needs itemsize alignment for the view)
            raw = torch.tensor(bytearray(buf[start:data_start + end]), dtype=torch.uint8)
        t = raw.view(torch_dtype).reshape(shape)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        elif not use_mmap:
            t = t.clone()
        out[name] = t.to(device) if str(device) != "cpu" else t
    return out


def write_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} as one .safetensors file (tensors laid out in name order, 8-byte aligned header)."""
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"cannot write tensor {name!r} of dtype {t.dtype} to safetensors")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the data section starts 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for data in blobs:
            f.write(data)
    os.replace(tmp, path)


def read_checkpoint(folder, dtype=None, device="cpu", use_mmap=False):
    """All tensors of an HF-layout folder: model.safetensors, or shards listed in model.safetensors.index.json."""
    index_path = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            assert isinstance(weight_map, dict)
        except (ValueError, KeyError, TypeError, AssertionError):
            raise ValueError(f"{index_path}: not a valid index (expected a JSON object with a 'weight_map')") from None
        by_file = {}
        for name, fname in weight_map.items():
            if not isinstance(fname, str) or os.path.basename(fname) != fname or fname in ("", ".", ".."):
                raise ValueError(f"{index_path}: tensor {name!r} points to {fname!r}, not a file in this folder")
            by_file.setdefault(fname, set()).add(name)
        tensors = {}
        for fname, names in sorted(by_file.items()):
            path = os.path.join(folder, fname)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{index_path} lists shard {fname}, which is missing")
            part = read_safetensors(path, dtype, device, use_mmap, names)
            if names - part.keys():
                raise ValueError(f"{path}: index lists tensors missing from the shard: {sorted(names - part.keys())[:5]}")
            tensors.update(part)
        return tensors
    if os.path.exists(single):
        return read_safetensors(single, dtype, device, use_mmap)
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
