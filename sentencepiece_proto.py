"""SentencePiece model files are protocol buffers. To switch a model's normalizer off (tokenizer.py applies the
normalisation to the document itself, so that token bytes and document bytes stay identical), one field is rewritten
with these few lines of wire format (https://protobuf.dev/programming-guides/encoding/) rather than a dependency on
the protobuf package.
"""


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _proto_fields(buf: bytes):
    """Yields (field number, encoded field bytes, payload of a length-delimited field or None)."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        wire_type, payload = key & 7, None
        if wire_type == 0:
            _, pos = _read_varint(buf, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos)
            payload, pos = buf[pos:pos + length], pos + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        yield key >> 3, buf[start:pos], payload


def without_normalizer(model_bytes: bytes) -> bytes:
    """The model with its normalizer_spec (ModelProto field 3) made an identity: no character map (field 2), no
    dummy prefix (3), whitespace kept (4); whether spaces are escaped to U+2581 (5) stays as it was."""
    out = bytearray()
    for field, encoded, payload in _proto_fields(model_bytes):
        if field != 3:
            out += encoded
            continue
        spec = b"".join(enc for f, enc, _ in _proto_fields(payload) if f not in (1, 2, 3, 4, 6))
        spec += _varint(1 << 3 | 2) + _varint(8) + b"identity" + _varint(3 << 3) + b"\0" + _varint(4 << 3) + b"\0"
        out += _varint(3 << 3 | 2) + _varint(len(spec)) + spec
    return bytes(out)
