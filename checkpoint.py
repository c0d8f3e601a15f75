"""Byte-model folders: model.safetensors (the weights) and config.json (both configurations, stage, phase, training
config, teacher name, results), the unit that the stages write and everything else reads. Weights and JSON only: a
pickle (torch.save / torch.load) can run any code when it is loaded, so a checkpoint that someone shares could too.
"""
import json
import os
import shutil
import typing
import uuid
from dataclasses import asdict, fields

import torch

from model import ByteLM, StudentConfig
from safetensors_io import is_int, read_safetensors, read_safetensors_header, write_safetensors
from teacher import TeacherConfig, check_device

FORMAT = "byte-model/1"
CONFIG_FIELDS = {"format": str, "save_id": str, "stage": int, "teacher": str, "student_config": dict,
                 "teacher_config": dict, "config": dict, "phase": str, "step": int, "phase_done": bool,
                 "results": dict}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
INTEGER_BUFFERS = {"prior_vocab_bytes": ("U8",), "prior_vocab_ends": ("I64",)}  # the prior's vocabulary
MAX_JSON_BYTES = 64 * 1024 * 1024  # ours are kilobytes; anything far larger is not one


def save_student(folder, model, meta, extra=None):
    """Write the byte-model folder `folder`: model.safetensors (the weights as they are, fp32 in training) and
    config.json (meta, with the model's own configurations). extra(staging, save_id), if given, writes more files
    beside them (train.py: the resume state). Atomic as a whole: everything goes into folder/.saving, which is renamed
    to folder/.saved once complete (the commit), then moved into place file by file (finish_save). A crash before the
    commit leaves the previous save as it was; one after it is completed by the next save or --resume. Every file
    carries the save's random save_id, so files of two different saves never load as one."""
    os.makedirs(folder, exist_ok=True)
    finish_save(folder)
    staging = os.path.join(folder, ".saving")
    shutil.rmtree(staging, ignore_errors=True)  # a save that died before its commit
    os.makedirs(staging)
    save_id = uuid.uuid4().hex  # from os.urandom: draws nothing from the generators that resume restores
    config = {**meta, "format": FORMAT, "save_id": save_id, "student_config": asdict(model.scfg),
              "teacher_config": asdict(model.tcfg)}
    write_safetensors(model.state_dict(), os.path.join(staging, "model.safetensors"),
                      {"format": FORMAT, "save_id": save_id})
    with open(os.path.join(staging, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    if extra is not None:
        extra(staging, save_id)
    os.rename(staging, os.path.join(folder, ".saved"))
    finish_save(folder)


def finish_save(folder):
    """Move a committed save (folder/.saved) into place; each os.replace is atomic, and a crash midway is finished by
    the next call."""
    saved = os.path.join(folder, ".saved")
    if not os.path.isdir(saved):
        return
    for root, _, names in os.walk(saved):
        target = os.path.join(folder, os.path.relpath(root, saved))
        os.makedirs(target, exist_ok=True)
        for name in names:
            os.replace(os.path.join(root, name), os.path.join(target, name))
    shutil.rmtree(saved)


def read_json(path):
    """A JSON object from a file, or a ValueError naming the file: whatever else is there is only parsed as JSON."""
    try:
        if os.path.getsize(path) > MAX_JSON_BYTES:
            raise ValueError(f"larger than {MAX_JSON_BYTES} bytes")
        with open(path, "rb") as f:
            value = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{path}: not a JSON file ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a JSON object")
    return value


def has_type(value, kind):
    """JSON value against a field type: int excludes bool, a float may be written as an int, X | None allows null."""
    return any(value is None if k is type(None) else is_int(value) if k is int else
               (is_int(value) or isinstance(value, float)) if k is float else isinstance(value, k)
               for k in typing.get_args(kind) or (kind,))


def check_fields(values, spec, where):
    """Every key of spec {key: type} present in values with a value of that type, else a ValueError naming it."""
    for key, kind in spec.items():
        if key not in values:
            raise ValueError(f"{where}: {key!r} is missing")
        if not has_type(values[key], kind):
            raise ValueError(f"{where}: {key!r} is {str(values[key])[:60]!r}, not of type {kind}")


def chat_meta(tok, teacher_dir) -> dict:
    """What a byte-model folder records so that chatting needs no tokenizer: the special tokens' byte codes (name ->
    hex) and the teacher's chat template (text, read by chat.ChatFormat, never run)."""
    from chat import read_chat_template
    return {"specials": {name: code.hex() for name, code in tok.codes.items()},
            "chat_template": read_chat_template(teacher_dir)}


def special_codes(meta, where) -> dict[str, bytes]:
    """config.json's special codes (name -> bytes); {} for a folder written before they existed."""
    specials = meta.get("specials", {})
    try:
        codes = {str(n): bytes.fromhex(c) for n, c in specials.items()}
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"{where}: 'specials' must map token names to hex byte codes") from None
    if any(len(c) != 2 or c[0] != 0xFF for c in codes.values()):
        raise ValueError(f"{where}: a special code is not 0xFF and one index byte")
    return codes


# fields added after folders were written: the value that builds the model such a folder holds
LATER_FIELDS = {"StudentConfig": {"prior": True, "subword": False}}


def config_from_json(cls, values, where):
    """A StudentConfig / TeacherConfig from its JSON object: exactly the dataclass's fields (a default silently filled
    in could build another model that the weights happen to fit), each of its type, plain ints not negative."""
    types = {f.name: f.type for f in fields(cls)}
    values = {**LATER_FIELDS.get(cls.__name__, {}), **values}
    if values.keys() != types.keys():
        extra, missing = sorted(values.keys() - types.keys()), sorted(types.keys() - values.keys())
        raise ValueError(f"{where}: unknown fields {extra}, missing fields {missing}")
    check_fields(values, types, where)
    negative = [k for k, v in values.items() if types[k] is int and v < 0]
    if negative:
        raise ValueError(f"{where}: {negative[0]} is negative ({values[negative[0]]})")
    return cls(**{k: float(v) if is_int(v) and float in (typing.get_args(types[k]) or (types[k],)) else v
                  for k, v in values.items()})


def read_student_config(folder):
    """config.json of a byte-model folder, checked: the folder holds both files, and every field has its type.
    -> (config.json's contents, StudentConfig, TeacherConfig)."""
    if not os.path.exists(folder):
        raise FileNotFoundError(f"no checkpoint at {folder}")
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: not a byte-student checkpoint: that is a file, and a checkpoint is a folder with "
                         "model.safetensors and config.json (pickled .pt checkpoints are never loaded: they run code)")
    missing = [name for name in ("model.safetensors", "config.json") if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        old = " (its ckpt.pt is a pickle from before byte-model folders: never loaded, it could run code)" \
            if os.path.exists(os.path.join(folder, "ckpt.pt")) else ""
        raise FileNotFoundError(f"no checkpoint at {folder} (no {' or '.join(missing)} in it){old}")
    path = os.path.join(folder, "config.json")
    try:
        meta = read_json(path)
        check_fields(meta, CONFIG_FIELDS, path)
        if meta["format"] != FORMAT:
            raise ValueError(f"{path}: format {meta['format']!r}, not {FORMAT!r}")
        scfg = config_from_json(StudentConfig, meta["student_config"], f"{path}: student_config")
        tcfg = config_from_json(TeacherConfig, meta["teacher_config"], f"{path}: teacher_config")
    except ValueError as e:
        raise ValueError(f"{folder}: not a byte-student checkpoint ({e})") from None
    return meta, scfg, tcfg


def check_weights(path, entries, model):
    """The safetensors header against the model that config.json describes: the same names, the same shapes, floats."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unknown = sorted(expected.keys() - entries.keys()), sorted(entries.keys() - expected.keys())
    wrong = [f"{k} is {list(entries[k][1])}, config.json says {list(expected[k])}"
             for k in sorted(expected.keys() & entries.keys()) if entries[k][1] != expected[k]]
    not_float = [f"{k} is {entries[k][0]}" for k in sorted(entries)
                 if entries[k][0] not in INTEGER_BUFFERS.get(k, FLOAT_DTYPES)]
    if missing or unknown or wrong or not_float:
        parts = [f"missing {missing[:3]}" if missing else "", f"unexpected {unknown[:3]}" if unknown else "",
                 "; ".join(wrong[:3]), "; ".join(not_float[:3])]
        raise ValueError(f"{path}: weights do not fit config.json: " + "; ".join(p for p in parts if p))


def load_student(folder, device="cpu", dtype=torch.float32):
    """A ByteLM from a byte-model folder (save_student; stage1_kd.py, stage2_sft.py) -> (model, config.json's contents).
    config.json and the safetensors header are checked against each other before a tensor is read: anything else given
    as a checkpoint (a pickle, a folder without the two files, a header that lies, a config.json with wrong types,
    missing keys or sizes that disagree with the weights) is one ValueError / FileNotFoundError; nothing in it runs."""
    meta, scfg, tcfg = read_student_config(folder)
    device = check_device(device)
    path = os.path.join(folder, "model.safetensors")
    entries, metadata, _ = read_safetensors_header(path)
    if metadata.get("save_id") != meta["save_id"]:
        raise ValueError(f"{folder}: model.safetensors (save_id {metadata.get('save_id')!r}) and config.json (save_id "
                         f"{meta['save_id']!r}) come from different saves")
    try:  # on the meta device: no memory for the weights yet (RoPE tables are computed on the CPU even there)
        with torch.device("meta"):
            model = ByteLM(scfg, tcfg)
    except (ValueError, TypeError, KeyError, RuntimeError, ZeroDivisionError, OverflowError) as e:
        raise ValueError(f"{folder}: config.json does not describe a byte student ({type(e).__name__}: {e})") from None
    check_weights(path, entries, model)
    model.load_state_dict(read_safetensors(path, dtype=dtype, device=device), assign=True)
    return model.eval(), meta
