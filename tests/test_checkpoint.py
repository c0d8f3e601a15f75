"""Byte-model folders (checkpoint.py: save_student, load_student) and the resume state beside them (save_checkpoint):
nothing given as a checkpoint is ever unpickled, anything malformed is one clear error, and what is written reads back
exactly.

Oracles: pickle itself, which does run the same payload (so a missing marker means the code refused it, not that the
payload was dead); the saved student's own weights and outputs; the generators' own draws for RNG state; an AdamW that
never stopped, for optimizer state."""
import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

import checkpoint
import safetensors_io
import stage_fixtures as sf
from stage_fixtures import SCFG, TCFG, build_student, build_teacher
import train

RESUME_FILES = ("model.safetensors", "config.json", "resume/optimizer.safetensors", "resume/state.json")
META = {"stage": 1, "config": {"lr": 1e-3}, "teacher": "/no/such/teacher", "phase": "align", "step": 5,
        "phase_done": True, "results": {"align": {"val": {"rel_mse": 0.5}}}}


class MakesMarker:
    """Unpickling this creates the file `marker`: stands in for a shared checkpoint that runs code when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def write_payload(path, marker, zipped=False):
    """A pickle that creates `marker` when loaded: raw pickle bytes, or torch.save's zip format (old ckpt.pt files)."""
    if zipped:
        torch.save({"model": MakesMarker(marker)}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(MakesMarker(marker), f)
    return str(path)


@pytest.fixture(scope="module")
def student():
    return build_student(build_teacher())


@pytest.fixture(scope="module")
def stopped_run():
    """A real stage-1 output folder, stopped mid-align: model, config.json and resume/ all in use on --resume."""
    out = sf.tmp_dir("ckpt-stopped")
    sf.run_stage1(out, "--stop_after=3")
    return out


def saved(folder, student):
    checkpoint.save_student(str(folder), student, META)
    return str(folder)


# ----------------------------------------------------------------------------------------------------------------
# 1. A pickle anywhere a checkpoint goes runs nothing, and each entry point ends in one error line.

def test_the_payload_runs_when_unpickled(tmp_path):
    for zipped in (False, True):
        marker = tmp_path / f"marker{zipped}"
        path = write_payload(tmp_path / f"payload{zipped}.pt", str(marker), zipped)
        if zipped:
            torch.load(path, weights_only=False)  # what a loader of pickled checkpoints calls
        else:
            with open(path, "rb") as f:
                pickle.load(f)
        assert marker.exists(), "the payload must be live, or the tests below prove nothing"


def test_no_entry_point_runs_a_pickle(stopped_run, tmp_path):
    """Each checkpoint argument of each script given a pickle (a file, or an old-layout folder holding ckpt.pt), and
    each file of a real output folder replaced by one before --resume. All run at once, as a user runs them."""
    stage1 = sf.stage_args  # (out_dir, *args) -> a tiny stage-1 command line on the tiny teacher
    old_layout = tmp_path / "old-layout"
    old_layout.mkdir()
    cases = {}  # name -> (script, args, marker, what the error line says)

    def case(name, script, args, message, zipped=False, at=None):
        marker = str(tmp_path / f"marker-{name}")
        path = write_payload(at or tmp_path / f"{name}.pt", marker, zipped)
        cases[name] = (script, [a.replace("PAYLOAD", path) for a in args], marker, message)

    not_ckpt = "not a byte-student checkpoint"
    case("sample", "sample.py", ["--ckpt=PAYLOAD"], not_ckpt)
    case("stage2-init", "stage2_sft.py", ["--init=PAYLOAD", f"--data_dir={sf.shard_dir()}", "--device=cpu"], not_ckpt,
         zipped=True)
    case("fidelity", "bench/fidelity.py", ["--ckpt=PAYLOAD"], not_ckpt)
    case("generate", "bench/generate.py", ["--ckpt=PAYLOAD"], not_ckpt, zipped=True)
    case("stage-resume", "stage1_kd.py", stage1(str(old_layout), "--resume"), "its ckpt.pt is a pickle", zipped=True,
         at=old_layout / "ckpt.pt")  # an out_dir of the old layout; an out_dir that is a pickle: the test below
    for name, message in zip(RESUME_FILES, ("not a valid safetensors file", not_ckpt, "not a valid safetensors file",
                                            "not a JSON file")):
        folder = tmp_path / f"replaced-{name.replace('/', '-')}"
        sf.copy_checkpoint(stopped_run, str(folder))
        case(f"replaced {name}", "stage1_kd.py", stage1(str(folder), "--resume"), message, at=folder / name)

    procs = {name: subprocess.Popen([sys.executable, script, *args], cwd=sf.REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
             for name, (script, args, _, _) in cases.items()}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=180)
        marker, message = cases[name][2], cases[name][3]
        assert not os.path.exists(marker), f"{name}: the pickle ran"
        assert proc.returncode == 1 and "Traceback" not in stderr, (name, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (name, stderr)


def test_resume_from_an_out_dir_that_is_a_pickle(stopped_run, tmp_path):
    """--resume with out_dir a pickle file, for both stages (the same error line as above, in this process)."""
    import stage2_sft
    marker = str(tmp_path / "marker")
    payload = write_payload(tmp_path / "out.pt", marker, zipped=True)
    with pytest.raises(ValueError, match="not a byte-student checkpoint: that is a file"):
        sf.run_stage1(payload, "--resume")
    argv = [f"--init={stopped_run}", f"--data_dir={sf.shard_dir()}", f"--out_dir={payload}", "--resume",
            "--device=cpu", "--dtype=float32", "--batch_size=4", "--seq_len=64"]
    with sf.threads(1), sf.quiet(), pytest.raises(ValueError, match="not a byte-student checkpoint: that is a file"):
        stage2_sft.main(argv)
    assert not os.path.exists(marker)


def test_source_never_unpickles():
    """No runtime file calls a pickle loader (torch.load, pickle.load/loads, weights_only=False)."""
    files = [f for f in os.listdir(sf.REPO) if f.endswith(".py")]
    files += [os.path.join("bench", f) for f in os.listdir(os.path.join(sf.REPO, "bench")) if f.endswith(".py")]
    for name in files:
        with open(os.path.join(sf.REPO, name), encoding="utf-8") as f:
            source = f.read()
        assert not re.search(r"torch\.load\(|pickle\.loads?\(|weights_only\s*=\s*False|import pickle", source), name


# ----------------------------------------------------------------------------------------------------------------
# 2. The folder: round trip, atomic saves, and every way config.json or the weights can be wrong.

def test_save_and_load_round_trip(student, tmp_path):
    folder = saved(tmp_path / "s", student)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]  # no staging folders left behind
    loaded, meta = checkpoint.load_student(folder)
    assert not loaded.training and loaded.scfg == SCFG and loaded.tcfg == TCFG
    assert {k: meta[k] for k in META} == META and meta["format"] == checkpoint.FORMAT
    assert meta["student_config"] == asdict(SCFG) and meta["teacher_config"] == asdict(TCFG)
    for (name, a), (name_b, b) in zip(student.state_dict().items(), loaded.state_dict().items()):
        assert name == name_b and a.dtype == b.dtype and torch.equal(a, b), name
    half, _ = checkpoint.load_student(folder, dtype=torch.bfloat16)
    assert half.head.weight.dtype == torch.bfloat16
    assert torch.equal(half.head.weight, student.head.weight.to(torch.bfloat16))


def test_a_save_interrupted_before_or_after_its_commit(student, tmp_path):
    """Before the commit (.saving half written): the previous save stays whole and loads. After it (.saved complete,
    its files partly moved into place): the folder's files disagree, which is an error, and finish_save (the next
    save or --resume) completes the new save."""
    folder = saved(tmp_path / "s", student)
    old_head = student.head.weight.clone()
    os.makedirs(os.path.join(folder, ".saving"))
    with open(os.path.join(folder, ".saving", "model.safetensors"), "wb") as f:
        f.write(b"half a file")
    assert torch.equal(checkpoint.load_student(folder)[0].head.weight, old_head)

    other = build_student(build_teacher(), seed=7)
    new = saved(tmp_path / "new", other)
    shutil.copytree(new, os.path.join(folder, ".saved"))  # committed, then a crash while moving it into place
    os.replace(os.path.join(folder, ".saved", "model.safetensors"), os.path.join(folder, "model.safetensors"))
    with pytest.raises(ValueError, match="come from different saves"):
        checkpoint.load_student(folder)
    checkpoint.finish_save(folder)
    assert torch.equal(checkpoint.load_student(folder)[0].head.weight, other.head.weight)
    checkpoint.save_student(folder, student, META)  # the next save clears the stale .saving
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("key, value, match", [
    ("stage", "1", "'stage' is '1', not of type <class 'int'>"),
    ("step", 5.0, "'step' is"),
    ("phase_done", "yes", "'phase_done' is"),
    ("teacher", None, "'teacher' is missing"),
    ("student_config", None, "'student_config' is missing"),
    ("results", [1, 2], "'results' is"),
    ("format", "byte-model/0", "format 'byte-model/0'"),
    (("student_config", "d_local"), "32", "student_config: 'd_local' is '32'"),
    (("student_config", "n_enc"), True, "student_config: 'n_enc' is"),  # a bool is no int
    (("student_config", "n_enc"), -1, "n_enc is negative"),
    (("student_config", "d_local"), None, "missing fields \\['d_local'\\]"),
    (("student_config", "depth"), 3, "unknown fields \\['depth'\\]"),
    (("teacher_config", "norm_eps"), "small", "teacher_config: 'norm_eps' is"),
    (("teacher_config", "rope_scaling"), [8.0], "teacher_config: 'rope_scaling' is"),
    (("teacher_config", "head_dim"), None, "missing fields \\['head_dim'\\]"),
])
def test_malformed_config_json_is_a_clear_error(student, tmp_path, key, value, match):
    folder = saved(tmp_path / "s", student)
    config = sf.read_json(os.path.join(folder, "config.json"))
    section, key = (config[key[0]], key[1]) if isinstance(key, tuple) else (config, key)  # ("student_config", field)
    if value is None:
        del section[key]
    else:
        section[key] = value
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="not a byte-student checkpoint") as error:
        checkpoint.load_student(folder)
    assert re.search(match, str(error.value)) and "\n" not in str(error.value), str(error.value)


@pytest.mark.parametrize("section, changes", [
    ("student_config", dict(d_local=64, n_local_heads=2)),   # every byte block a different width
    ("student_config", dict(n_dec=3)),                      # a decoder block more than the weights hold
    ("teacher_config", dict(n_layers=1)),                   # a main-network block fewer
    ("teacher_config", dict(d_ff=96)),                      # MLP width
    ("student_config", dict(proj_hidden=0)),                # a linear projection: other tensor names
])
def test_sizes_that_disagree_with_the_weights(student, tmp_path, section, changes):
    folder = saved(tmp_path / "s", student)
    config = sf.read_json(os.path.join(folder, "config.json"))
    config[section] = {**config[section], **changes}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="weights do not fit config.json"):
        checkpoint.load_student(folder)


def test_weights_that_lie_or_do_not_fit(student, tmp_path):
    """A safetensors header that misdescribes its data, tensors of the wrong dtype, and files of different saves."""
    folder = saved(tmp_path / "s", student)
    path = os.path.join(folder, "model.safetensors")
    save_id = sf.read_json(os.path.join(folder, "config.json"))["save_id"]
    entries, metadata, start = safetensors_io.read_safetensors_header(path)
    with open(path, "rb") as f:
        raw = f.read()
    header = json.loads(raw[8:start])
    header["head.weight"]["shape"] = [512, 16]  # the data span says otherwise
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (start - 8 - len(text))
    with open(path, "wb") as f:
        f.write(raw[:8] + text + raw[start:])
    with pytest.raises(ValueError, match="not a valid safetensors file: tensor 'head.weight' spans"):
        checkpoint.load_student(folder)

    state = {k: v.clone() for k, v in student.state_dict().items()}
    state["head.weight"] = state["head.weight"].to(torch.int32)
    safetensors_io.write_safetensors(state, path, {"save_id": save_id})
    with pytest.raises(ValueError, match="do not fit config.json: head.weight is I32"):
        checkpoint.load_student(folder)
    safetensors_io.write_safetensors(student.state_dict(), path, {"save_id": "another"})
    with pytest.raises(ValueError, match="come from different saves"):
        checkpoint.load_student(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write("[1, 2, 3]")
    with pytest.raises(ValueError, match="not a JSON object"):
        checkpoint.load_student(folder)


# ----------------------------------------------------------------------------------------------------------------
# 3. The resume state: RNG and optimizer through JSON and safetensors, and a resume/ that does not belong.

def draws():
    return random.random(), random.gauss(0, 1), float(np.random.standard_normal()), torch.rand(3).tolist()


def test_rng_state_round_trips_through_json():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # both keep a cached second Gaussian: part of the state
    state = json.loads(json.dumps(checkpoint.rng_state()))
    first = draws()
    checkpoint.set_rng_state(state)
    assert draws() == first
    for broken in ({**state, "python": [3, [1, 2], None]}, {**state, "torch": "not base64!"},
                   {**state, "numpy": ["MT19937", ["a"], 0, 0, 0.0]}, {k: v for k, v in state.items() if k != "torch"}):
        with pytest.raises(ValueError, match="malformed RNG state"):
            checkpoint.set_rng_state(broken)


def test_optimizer_state_round_trips(tmp_path):
    """Three AdamW steps, the state saved and read back into a fresh optimizer, two more steps: the same weights, bit
    for bit, as five steps without a stop. Two groups (an lr_scale), as the stages use."""
    def build():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        named = list(net.named_parameters())
        return net, named, train.make_optimizer(named, 1e-2, 0.1, lr_scale=lambda n: 2.0 if n.startswith("1.") else 1.0)

    def steps(net, optimizer, seeds):
        for s in seeds:
            x = torch.randn(5, 4, generator=torch.Generator().manual_seed(s))
            net(x).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()

    reference, _, ref_opt = build()
    steps(reference, ref_opt, range(5))
    net, named, optimizer = build()
    steps(net, optimizer, range(3))
    names = {p: n for n, p in named}
    tensors, groups = checkpoint.optimizer_state(optimizer, names)
    safetensors_io.write_safetensors(tensors, str(tmp_path / "opt.safetensors"))
    groups = json.loads(json.dumps(groups))
    fresh_net, fresh_named, fresh = build()
    fresh_net.load_state_dict(net.state_dict())
    fresh_names = {p: n for n, p in fresh_named}
    checkpoint.load_optimizer_state(fresh, fresh_names,
                                    safetensors_io.read_safetensors(str(tmp_path / "opt.safetensors")), groups)
    steps(fresh_net, fresh, range(3, 5))
    for (name, a), b in zip(reference.state_dict().items(), fresh_net.state_dict().values()):
        assert torch.equal(a, b), name

    wrong_shape = {**tensors, "0.weight.exp_avg": torch.zeros(3)}
    with pytest.raises(ValueError, match="0.weight.exp_avg \\[3\\] is not a state"):
        checkpoint.load_optimizer_state(fresh, fresh_names, wrong_shape, groups)
    with pytest.raises(ValueError, match="lacks one of"):
        checkpoint.load_optimizer_state(fresh, fresh_names, {k: v for k, v in tensors.items() if k != "0.bias.step"},
                                        groups)
    with pytest.raises(ValueError, match="other parameter groups"):
        checkpoint.load_optimizer_state(fresh, fresh_names, tensors, groups[::-1])


def edit_json(path, **changes):
    with open(path) as f:
        value = json.load(f)
    with open(path, "w") as f:
        json.dump({**value, **changes}, f)


@pytest.mark.parametrize("damage, error, match", [
    ("missing", FileNotFoundError, "resume/state.json is missing: exact resume needs it"),
    ("save_id", ValueError, "resume/ holds the state of another save"),
    ("loader", ValueError, "loader: 'consumed' is '12', not of type"),
    ("groups", ValueError, "optimizer_groups must be objects"),
])
def test_a_resume_state_that_does_not_belong_is_refused(stopped_run, tmp_path, damage, error, match):
    out = str(tmp_path / "out")
    sf.copy_checkpoint(stopped_run, out)
    state = os.path.join(out, "resume", "state.json")
    if damage == "missing":
        os.remove(state)
    elif damage == "save_id":
        edit_json(state, save_id="0" * 32)
    elif damage == "loader":
        edit_json(state, loader={**sf.read_json(state)["loader"], "consumed": "12"})
    else:
        edit_json(state, optimizer_groups=[1, 2])
    with pytest.raises(error, match=match):
        sf.run_stage1(out, "--resume")
    assert not os.path.exists(os.path.join(out, "metrics.jsonl")), "refused before anything was written"
