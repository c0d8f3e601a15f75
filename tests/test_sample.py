"""sample.py, run as a user runs it (a subprocess from the repo root) on a tiny saved student.

Oracle: generation in this process on the same checkpoint, with the same seed and settings, gives the bytes that
sample.py must print: conditioning.generation_after (a hypothesis of the beam over the prompt's patchings drawn by
its weight, then ByteGeneration from its state; the default) or, with --context=patcher, ByteGeneration's prefill. The checkpoint names a teacher folder that does not exist, so sample.py skips prompt
normalisation. All the runs start at once (they are independent) and each test waits for the ones it reads."""
import codecs
import os
import runpy
import subprocess
import sys

import pytest
import torch

from checkpoint import load_student, save_student
import conditioning
from decoding import ByteGeneration, LateFlagGeneration
from model import BOS_BYTE
import sample
import teacher as teachers
import transformer
from test_student import build_student, build_teacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "To be, or not"
MAX_BYTES = 20
SEED = 0  # with this checkpoint (joint model): 20 bytes for PROMPT, the text ending inside a UTF-8 sequence
BATCH_SEED = 5  # in the batch one row samples 0xFE early (the oracle below adapts if the model changes; the tests
                # say where they rely on it)
BATCH = dict(prompts=["Hi", "Ünïcode"], num_samples=2, max_bytes=12)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny matmuls on one thread


class Run:
    def __init__(self, args):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")  # tiny model: one thread is fastest
        env.pop("PYTHONUNBUFFERED", None)  # stdout buffered as a user's pipe is: text and raw writes must not reorder
        self.proc = subprocess.Popen([sys.executable, "sample.py", *args], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.done = False

    def wait(self):
        if not self.done:
            self.stdout, self.stderr = self.proc.communicate(timeout=120)
            self.rc, self.done = self.proc.returncode, True
        return self


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    student = build_student(build_teacher())
    path = str(tmp_path_factory.mktemp("sample") / "student")
    save_student(path, student, {"stage": 1, "config": {}, "teacher": "/no/such/teacher/folder", "phase": "align",
                                 "step": 1, "phase_done": True, "results": {}})
    return path


@pytest.fixture(scope="module")
def bad_prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "bad.txt"
    path.write_bytes(b"valid start \xff\xfe then invalid")
    return str(path)


@pytest.fixture(scope="module")
def runs(ckpt, bad_prompt_file):
    common = [f"--ckpt={ckpt}", f"--max_bytes={MAX_BYTES}", "--temperature=1", "--dtype=float32"]  # fp32 = expected()
    batch = [f"--ckpt={ckpt}", "--temperature=1", "--dtype=float32", f"--seed={BATCH_SEED}",
             f"--max_bytes={BATCH['max_bytes']}",
             *[f"--prompt={p}" for p in BATCH["prompts"]], f"--num_samples={BATCH['num_samples']}"]
    commands = {
        "text": [*common, f"--prompt={PROMPT}", f"--seed={SEED}"],
        "raw": [*common, f"--prompt={PROMPT}", f"--seed={SEED}", "--raw"],
        "batch": batch,
        "batch_raw": [*batch, "--raw"],
        "error": [*common, f"--prompt_file={bad_prompt_file}"],
        "greedy": [*batch, "--byte_model=greedy"],
        "late": [*batch, "--byte_model=late"],
        "patcher": [*batch, "--context=patcher"],
        "bf16": [*common[:-1], f"--prompt={PROMPT}", f"--seed={SEED}", "--dtype=bfloat16", "--raw"],
    }
    started = {name: Run(args) for name, args in commands.items()}
    yield started
    for run in started.values():
        if not run.done:
            run.proc.kill()
            run.proc.communicate()


def expected(ckpt, prompts, max_bytes, seed, byte_model="joint", context="marginal"):
    """What sample.py must generate at temperature 1 with a generator seeded by --seed: ByteGeneration.run (rows out
    of step) with the joint rule (the default) or the greedy one, each row from a hypothesis of its prompt's beam
    drawn with that generator (context="patcher": from the patcher's prefill), or with --byte_model=late
    LateFlagGeneration.step in lockstep; each row stops at its first 0xFE (a new document), which is not printed."""
    student, _ = load_student(ckpt)
    g = torch.Generator().manual_seed(seed)
    outs, live = [bytearray() for _ in prompts], [True] * len(prompts)
    if byte_model == "late":
        gen = LateFlagGeneration(student, [p.encode("utf-8") for p in prompts], max_bytes)
        steps = [(gen.rows, gen.step(1.0, None, 1.0, g)[0]) for _ in range(max_bytes)]
    else:
        texts = [p.encode("utf-8") for p in prompts]
        gen = (conditioning.generation_after(student, texts, max_bytes, byte_model, 1.0, g) if context == "marginal"
               else ByteGeneration(student, texts, max_bytes, byte_model=byte_model))
        steps = ((rows, new) for rows, _, new, _ in gen.run(max_bytes, 1.0, None, 1.0, g))
    for rows, new in steps:
        for i, b in zip(rows.tolist(), new.tolist()):
            if not live[i]:
                continue
            if b == BOS_BYTE:
                live[i] = False
                if byte_model != "late":
                    gen.live[i] = False
            else:
                outs[i].append(b)
    return [bytes(o) for o in outs]


def ok(run):
    run.wait()
    assert run.rc == 0, run.stderr.decode(errors="replace")
    assert b"Traceback" not in run.stderr
    return run


def test_bf16_weights_generate(runs):
    """--dtype=bfloat16 (what auto picks on a CPU that is faster in it): the same model with bf16 weights generates,
    and says so; its bytes are not compared with fp32's (rounding changes what is sampled)."""
    run = ok(runs["bf16"])
    assert b"; weights in bfloat16 (--dtype))" in run.stderr and run.stdout.startswith(PROMPT.encode())
    assert len(run.stdout) > len(PROMPT.encode())


def test_raw_output_is_prompt_then_generated_bytes(runs, ckpt):
    out = ok(runs["raw"]).stdout
    [gen] = expected(ckpt, [PROMPT], MAX_BYTES, seed=SEED)
    assert len(gen) == MAX_BYTES  # this seed never samples 0xFE: exactly max_bytes come out
    assert out.startswith(PROMPT.encode() + gen)
    assert out[len(PROMPT.encode()) + MAX_BYTES:] in (b"", b"\n")  # (a closing newline at most)
    assert f"--- {MAX_BYTES} bytes in".encode() in runs["raw"].stderr  # the speed line goes to stderr


def test_same_seed_same_output(runs):
    """Two runs with the same seed (one --raw, one text) print the same bytes."""
    raw, text = ok(runs["raw"]).stdout, ok(runs["text"]).stdout.decode("utf-8")
    assert text == raw.decode("utf-8", errors="replace")


def test_text_output_decodes_incrementally(runs, ckpt):
    """Text mode: the prompt, then the generated bytes as UTF-8 with invalid sequences as U+FFFD."""
    out = ok(runs["text"]).stdout.decode("utf-8")
    [gen] = expected(ckpt, [PROMPT], MAX_BYTES, seed=SEED)
    assert out.startswith(PROMPT)
    tail = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tail.decode(PROMPT.encode() + gen, final=False)
    assert tail.getstate()[0]  # (this seed ends inside a UTF-8 sequence: it must still show, as U+FFFD)
    assert out == (PROMPT.encode() + gen).decode("utf-8", errors="replace") + "\n"


def test_batch_of_prompts_and_samples(runs, ckpt):
    """Two prompts x --num_samples=2: four samples in one batch, in order A, A, B, B, each printed whole."""
    out = ok(runs["batch"]).stdout.decode("utf-8")
    prompts = [p for p in BATCH["prompts"] for _ in range(BATCH["num_samples"])]
    gens = expected(ckpt, prompts, BATCH["max_bytes"], seed=BATCH_SEED)
    assert out.count("--- sample ") == 4
    want = "".join(f"--- sample {i}\n" + (p.encode() + g).decode("utf-8", errors="replace") + "\n"
                   for i, (p, g) in enumerate(zip(prompts, gens)))
    assert out == want


def test_the_patcher_context_batch(runs, ckpt):
    """--context=patcher (the old rule): the prompt prefilled along the patcher's flags, told apart from the default."""
    out = ok(runs["patcher"]).stdout.decode("utf-8")
    prompts = [p for p in BATCH["prompts"] for _ in range(BATCH["num_samples"])]
    gens = expected(ckpt, prompts, BATCH["max_bytes"], seed=BATCH_SEED, context="patcher")
    assert gens != expected(ckpt, prompts, BATCH["max_bytes"], seed=BATCH_SEED)
    assert out == "".join(f"--- sample {i}\n" + (p.encode() + g).decode("utf-8", errors="replace") + "\n"
                          for i, (p, g) in enumerate(zip(prompts, gens)))


@pytest.mark.parametrize("byte_model", ["greedy", "late"])
def test_the_other_byte_models_batch(byte_model, runs, ckpt):
    """--byte_model=greedy (rows out of step) and --byte_model=late (lockstep): the same batch from the other two byte
    models."""
    out = ok(runs[byte_model]).stdout.decode("utf-8")
    prompts = [p for p in BATCH["prompts"] for _ in range(BATCH["num_samples"])]
    gens = expected(ckpt, prompts, BATCH["max_bytes"], seed=BATCH_SEED, byte_model=byte_model)
    assert gens != expected(ckpt, prompts, BATCH["max_bytes"], seed=BATCH_SEED)  # the two models told apart
    assert out == "".join(f"--- sample {i}\n" + (p.encode() + g).decode("utf-8", errors="replace") + "\n"
                          for i, (p, g) in enumerate(zip(prompts, gens)))


def test_batch_raw(runs, ckpt):
    """--raw with several samples: each sample's raw bytes under its header, in order."""
    out = ok(runs["batch_raw"]).stdout
    prompts = [p for p in BATCH["prompts"] for _ in range(BATCH["num_samples"])]
    gens = expected(ckpt, prompts, BATCH["max_bytes"], seed=BATCH_SEED)
    assert min(map(len, gens)) < BATCH["max_bytes"]  # (this seed stops a row early at 0xFE)
    assert out == b"".join(b"--- sample %d\n" % i + p.encode() + g + b"\n" for i, (p, g) in enumerate(zip(prompts, gens)))


def test_error_exits_with_one_line(runs):
    """End to end: a prompt file that is not UTF-8 -> exit status 1, one 'error:' line on stderr, nothing else."""
    run = runs["error"].wait()
    assert run.rc == 1
    err = run.stderr.decode("utf-8", errors="replace")
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not valid UTF-8" in lines[0], err
    assert run.stdout == b""


@pytest.mark.parametrize("args, message", [
    (["--no_such_option=1"], "unknown option --no_such_option"),
    (["--max_bytes=many"], "--max_bytes='many' is not a valid int"),
    (["--ckpt=/no/such/file.pt"], "no checkpoint at /no/such/file.pt"),
    (["--ckpt=CKPT", "--teacher=smollm2"], "exactly one of --ckpt"),
    ([], "exactly one of --ckpt"),
    (["--ckpt=CKPT", "--prompt_file=BAD"], "not valid UTF-8 (byte 12"),
    (["--ckpt=GARBAGE"], "not a byte-student checkpoint"),
    (["--ckpt=CKPT", "--top_p=0"], "--top_p must be in (0, 1]"),
    (["--ckpt=CKPT", "--top_k=-1"], "--top_k >= 0"),
    (["--ckpt=CKPT", "--prompt_file=TMP"], "cannot read the prompt file"),
    (["--ckpt=CKPT", "--device=tpu"], "unknown device 'tpu'"),
    (["--ckpt=CKPT", "--dtype=half"], "--dtype must be auto, bfloat16 or float32"),
    (["--ckpt=CKPT", "--context=tokens"], "--context='tokens': marginal or patcher"),
    (["--ckpt=CKPT", "--byte_model=marginal"], "--byte_model='marginal': joint, greedy or late"),
    (["--ckpt=CKPT", "--flags=late"], "--flags is now --byte_model"),
    *([(["--ckpt=CKPT", "--device=cuda"], "no CUDA GPU")] if not torch.cuda.is_available() else []),
])
def test_errors_are_one_clear_line(args, message, ckpt, bad_prompt_file, tmp_path, monkeypatch, capsys):
    """The same __main__ wrapper in this process (a subprocess costs seconds of torch import): a user error ends
    in SystemExit("error: ...") -- Python prints that one line and exits with status 1 -- never in a traceback."""
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint\n")
    subst = {"CKPT": ckpt, "BAD": bad_prompt_file, "GARBAGE": str(garbage), "TMP": str(tmp_path)}  # TMP: a folder
    argv = [a.split("=")[0] + "=" + subst.get(a.split("=", 1)[1], a.split("=", 1)[1]) for a in args]
    monkeypatch.setattr(sys, "argv", [os.path.join(REPO, "sample.py"), *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(REPO, "sample.py"), run_name="__main__")
    code = exit_info.value.code
    assert isinstance(code, str) and code.startswith("error: ") and "\n" not in code and message in code, code
    assert capsys.readouterr().out == ""


def test_teacher_never_samples_ids_the_tokenizer_cannot_spell(monkeypatch, capsys):
    """Real teachers pad the embedding matrix past the tokenizer (Qwen3: 151,936 rows for ~151.7K ids). Here the padded
    rows get the largest logits, so greedy sampling would pick one at every step unless sample.py masks them."""
    import stage_fixtures as sf
    teacher, tok = teachers.load_teacher(sf.teacher_dir())
    extra = 5

    class Padded:  # the same teacher with `extra` unspellable rows that always win
        head_weight = torch.cat([teacher.head_weight, torch.zeros(extra, teacher.cfg.d_model)])
        new_cache = teacher.new_cache

        def __call__(self, ids, cache=None):
            logits = teacher(ids, cache=cache)
            return torch.cat([logits, torch.full((*logits.shape[:-1], extra), 1e4)], dim=-1)

    seen = []
    sample_from_logits = transformer.sample_from_logits
    monkeypatch.setattr(sample, "load_teacher", lambda *a, **k: (Padded(), tok))
    monkeypatch.setattr(sample, "sample_from_logits", lambda logits, *a: seen.append(logits) or sample_from_logits(logits, *a))
    sample.main(["--teacher=tiny", f"--prompt={PROMPT}", "--temperature=0", "--max_bytes=24"])
    out = capsys.readouterr().out
    assert seen and all(bool((l[:, tok.n_vocab:] == float("-inf")).all()) for l in seen)
    assert out.startswith(PROMPT) and len(out.rstrip("\n").encode()) - len(PROMPT) >= 1
