"""Byte-model folders: model.safetensors (the weights) and config.json (both configurations, stage, phase, training
config, teacher name, results), the unit that the stages write and everything else reads; and a training run's
resume/ folder beside one (optimizer moments, loader position, RNG states) with the check that a run may continue from
it. Weights and JSON only: a pickle (torch.save / torch.load) can run any code when it is loaded, so a checkpoint that
someone shares could too.
"""
import base64
import binascii
import json
import os
import random
import shutil
import typing
import uuid
from dataclasses import asdict, fields
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

from distributed import gather_full, sharded
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
    beside them (save_checkpoint: the resume state). Atomic as a whole: everything goes into folder/.saving, which is renamed
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


# ----------------------------------------------------------------------------------------------------------------
# A training run's checkpoint, for exact resume: the out_dir's byte-model folder (above) plus out_dir/resume/:
# optimizer.safetensors (AdamW's moments and step count, per parameter name) and state.json (the optimizer's
# parameter groups, the loader position, every RNG state). Safetensors and JSON only, no pickle: a checkpoint that is
# not what it should be is refused, and nothing in it can run.

def _b64(state):  # a uint8 RNG state tensor -> base64 text
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _from_b64(text):
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8)


def rng_state():
    """Every generator's state as JSON values: Python's and numpy's Mersenne Twister words, torch's bytes (base64)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(words), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state):
    """Set every generator from rng_state()'s values read back from JSON. The generators check what they are given
    (lengths, word ranges); whatever they refuse is a ValueError."""
    try:
        version, words, gauss = state["python"]
        random.setstate((version, tuple(words), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(_from_b64(state["torch"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([_from_b64(s) for s in state["cuda"]])
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError, binascii.Error) as e:
        raise ValueError(f"malformed RNG state in the resume state ({type(e).__name__}: {str(e)[:100]})") from None


def optimizer_state(optimizer, names):
    """AdamW's state by parameter name -> ({"<name>.exp_avg" / ".exp_avg_sq" / ".step": tensor}, the parameter
    groups as JSON values with their parameters as names). names: {parameter: its name in the student}."""
    sd = optimizer.state_dict()
    order = [names[p] for group in optimizer.param_groups for p in group["params"]]  # state_dict's numbering
    tensors = {f"{order[i]}.{key}": t for i, state in sd["state"].items() for key, t in state.items()}
    plain = (bool, int, float, str, list, tuple, type(None))  # hyper-parameters JSON holds (betas as a list)
    groups = [{**{k: v for k, v in g.items() if isinstance(v, plain)}, "params": [order[i] for i in g["params"]]}
              for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer_state(optimizer, names, tensors, groups):
    """optimizer_state's tensors into an optimizer built the same way (the same groups of the same parameters, which
    check_resume guarantees for its hyper-parameters); anything that does not fit it is a ValueError."""
    current = [[names[p] for p in group["params"]] for group in optimizer.param_groups]
    if [group.get("params") for group in groups] != current:
        raise ValueError("the resume state's optimizer holds other parameter groups than this phase trains")
    shapes = {names[p]: tuple(p.shape) for group in optimizer.param_groups for p in group["params"]}
    index = {name: i for i, name in enumerate(n for group in current for n in group)}
    state = {}
    for key, t in tensors.items():
        name, _, field = key.rpartition(".")
        shape = () if field == "step" else shapes.get(name)
        if name not in index or field not in ("step", "exp_avg", "exp_avg_sq") or tuple(t.shape) != shape:
            raise ValueError(f"optimizer.safetensors: {key} {list(t.shape)} is not a state of this phase's optimizer")
        state.setdefault(index[name], {})[field] = t
    if any(len(s) != 3 for s in state.values()):
        raise ValueError("optimizer.safetensors: a parameter lacks one of step, exp_avg, exp_avg_sq")
    sd = optimizer.state_dict()  # its own groups and hyper-parameters; the lr is set again before every step
    optimizer.load_state_dict({**sd, "state": state})


def save_checkpoint(folder, student, info, resume=None):
    """The byte-model folder `folder` (save_student: the weights, and info in config.json) and, given
    resume = (optimizer, loader), folder/resume/ with what exact resume needs. One atomic save (see save_student).
    A student sharded by FSDP: every rank calls it (the shards are gathered, a collective) and rank 0 writes the
    same folder that one process would."""
    master = not dist.is_initialized() or dist.get_rank() == 0
    if resume is not None:
        optimizer, loader = resume
        tensors, groups = optimizer_state(optimizer, {p: n for n, p in student.named_parameters()})
    if sharded(student):
        tensors = gather_full(tensors, keep=master) if resume is not None else None
        state = gather_full(student.state_dict(), keep=master)
        # what save_student reads of a student: its two configurations and its state dict, here the gathered one
        student = SimpleNamespace(scfg=student.scfg, tcfg=student.tcfg, state_dict=lambda: state)
        if not master:
            return

    def write_resume(staging, save_id):
        os.makedirs(os.path.join(staging, "resume"))
        write_safetensors(tensors, os.path.join(staging, "resume", "optimizer.safetensors"), {"save_id": save_id})
        with open(os.path.join(staging, "resume", "state.json"), "w") as f:
            json.dump({"save_id": save_id, "optimizer_groups": groups, "loader": loader.state_dict(),
                       "rng": rng_state()}, f)
    save_student(folder, student, info, write_resume if resume is not None else None)


LOADER_FIELDS = {"epoch": int, "consumed": int, "seed": int, "seq_len": int, "n_windows": int}


def load_resume_state(folder, save_id):
    """folder/resume/ of a run that stopped mid-phase, checked to come from the save that config.json describes (its
    save_id) and to be well formed -> {"optimizer": tensors, "optimizer_groups", "loader", "rng"}. The RNG state is
    checked by the generators themselves when the phase sets it (set_rng_state)."""
    path, tensors_path = (os.path.join(folder, "resume", name) for name in ("state.json", "optimizer.safetensors"))
    for p in (path, tensors_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{folder} stopped mid-phase, but {p} is missing: exact resume needs it")
    state = read_json(path)
    check_fields(state, {"save_id": str, "optimizer_groups": list, "loader": dict, "rng": dict}, path)
    check_fields(state["loader"], LOADER_FIELDS, f"{path}: loader")
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in state["optimizer_groups"]):
        raise ValueError(f"{path}: optimizer_groups must be objects with a list of params")
    _, metadata, _ = read_safetensors_header(tensors_path)
    if state["save_id"] != save_id or metadata.get("save_id") != save_id:
        raise ValueError(f"{folder}: resume/ holds the state of another save than config.json and model.safetensors")
    return {**state, "optimizer": read_safetensors(tensors_path)}


# Settings that a resumed run may change mid-phase: where it writes, how much it logs, when it stops. Every other one
# shapes the data order, the batches, the schedule or the model, and the run would no longer continue the same one.
RESUME_MAY_CHANGE = {"out_dir", "resume", "phase", "data_dir", "device", "log_interval", "ckpt_interval", "stop_after",
                     "eval_batches", "init", "teacher", "fsdp", "checkpoint_blocks"}


# Settings added after runs were saved, by stage: the value that continues such a run as it was.
LATER_SETTINGS = {1: {"subword": False, "chat_data": "", "chat_fraction": 0.25, "data": ""},
                  2: {"chat_data": "", "chat_fraction": 0.25, "data": ""}}


def check_resume(path, resume, stage, cfg, meta, world):
    """Refuse to resume from a checkpoint of another stage or another model, or mid-phase with other settings."""
    if resume.get("stage") != stage:
        raise ValueError(f"{path} is not a stage-{stage} checkpoint; resume it with its own stage script")
    for key in ("student_config", "teacher_config"):
        old, new = resume.get(key, {}), meta[key]
        if key == "student_config":  # a folder from before a field existed holds the model its default describes
            old = {**LATER_FIELDS["StudentConfig"], **old}
        changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v]
        if changed:
            raise ValueError(f"{path} holds another model ({key.split('_')[0]}: {', '.join(changed[:4])}); "
                             "resume with the settings it was trained with, or start a fresh --out_dir")
    if not resume["phase_done"]:  # mid-phase: the data order, batch shape and schedule must stay the same
        old, new = {**LATER_SETTINGS.get(stage, {}), **resume["config"]}, asdict(cfg)
        changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items()
                   if k not in RESUME_MAY_CHANGE and old.get(k) != v]
        if resume.get("world_size", world) != world:
            changed.append(f"ranks: {resume['world_size']} -> {world}")
        if changed:
            raise ValueError(f"{path} stopped mid-phase with other settings; resuming would not continue the "
                             "same run: " + ", ".join(changed))
