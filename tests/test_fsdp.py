"""--fsdp (FSDP2 fully_shard, train.py) with two gloo ranks on the CPU against one process (tests/stage_fixtures.py's
tiny teacher): stage 1 (align, distill with the main network trained, boundary) and stage 2 (warmup, e2e) give the
validation figures, per-step metrics and final weights of one process with the same global batch; each rank holds
about half of the parameter, gradient and AdamW bytes; the checkpoint an FSDP run writes is the folder one process
writes, loads in one process, and --resume continues an FSDP run exactly.

Oracles: single-process runs (the same windows: rank r takes every world-th window of each global batch); the byte
counts of the single-process checkpoint's tensors for the memory lines; an uninterrupted FSDP run for resume; the
tensors AdamW actually allocates for memory_bytes' arithmetic."""
import os
import re
import subprocess
import sys

import pytest
import torch

import checkpoint
import distributed
import model
import safetensors_io
import stage_fixtures as sf
import teacher as teachers
import train

# TINY_STAGE1's budgets at 256 bytes a step: 10 align, 5 distill, 5 boundary steps; distill trains the main network.
STAGE1 = ("--distill_main_lr=1e-3",)
STOP = 12  # the interrupted FSDP run stops in distill (2 of its 5 steps done), with the main network's AdamW state
TINY_STAGE2 = ["--dtype=float32", "--device=cpu", "--seq_len=64", "--eval_batches=2", "--log_interval=1000",
               "--warmup_frac=0.1", "--warmup_lr=3e-3", "--e2e_lr=1e-3", "--warmup_bytes=1024", "--e2e_bytes=1024"]
REL = 1e-5
# Two ranks add gradients in another order than one process; AdamW's first steps divide by sqrt(v) ~ |g| and turn that
# float-order noise in near-zero entries into weight differences of a fraction of one step (lr = 1e-3 here): 1.2e-4 seen
# on an AVX512 CPU, under 1e-4 on AVX2 ones. So: no entry off by more than one step, almost all equal to float noise.
PARAM_ATOL = 1e-3
# The gradient norm of a later phase inherits that weight noise: 3.7e-5 relative seen at boundary step 1 on an
# AVX512-BF16 CPU (2026-12-07), where losses and figures still agree at REL.
GRAD_NORM_REL = 1e-4
NOISE, NOISY_SHARE = 1e-6, 1e-3  # at most this share of the entries differ by more than NOISE


def assert_params_close(a, b):
    diff, name = sf.worst_param_diff(a, b)
    assert diff < PARAM_ATOL, f"{name} differs by {diff:.3g}"
    off = sum(int(((a[k].float() - b[k].float()).abs() > NOISE).sum()) for k in a)
    assert off <= NOISY_SHARE * sum(v.numel() for v in a.values()), f"{off} entries differ by more than {NOISE:g}"
MEMORY = re.compile(r"memory (\w+) rank (\d+): parameters ([\d.e+-]+) MiB, gradients ([\d.e+-]+) MiB, "
                    r"optimizer state ([\d.e+-]+) MiB \| teacher ([\d.e+-]+) MiB")


def stage2_args(init_dir, out_dir, *args):
    return [f"--init={init_dir}", f"--data_dir={sf.shard_dir()}", f"--out_dir={out_dir}", *TINY_STAGE2, *args]


def runs_of(stdout):
    """A torchrun's stdout -> one chunk per run (each starts with its config line)."""
    return ["config: " + chunk for chunk in stdout.split("config: ")[1:]]


@pytest.fixture(scope="module")
def stage1():
    """One process (batch 4) and one torchrun of four runs on 2 ranks (--fsdp, batch 2 each): uninterrupted, stopped
    mid-distill, that one resumed, and align alone with two micro-steps of one window per update."""
    single = sf.tmp_dir("fsdp-single1")
    _, single_log = sf.run_stage1(single, "--batch_size=4", *STAGE1)
    fsdp, resumed, accum = sf.tmp_dir("fsdp1"), sf.tmp_dir("fsdp1-resumed"), sf.tmp_dir("fsdp1-accum")
    args = ("--batch_size=2", "--fsdp=True", *STAGE1)
    result = sf.run_torchrun("stage1_kd", (fsdp, *args), (resumed, *args, f"--stop_after={STOP}"),
                             (resumed, *args, "--resume"), (accum, *args, "--batch_size=1", "--grad_accum=2",
                                                            "--phase=align"))
    assert "Traceback" not in result.stderr
    return {"single": single, "single_log": single_log, "fsdp": fsdp, "resumed": resumed, "accum": accum,
            "logs": runs_of(result.stdout)}


def compare_runs(fsdp, single, phase=None, validation=True):
    """Per-step metrics (losses, figures, grad_norm) and the validation figures in config.json agree at REL; the
    final weights within PARAM_ATOL. phase: compare that phase only (single's out_dir/<phase> for the weights)."""
    a, b = sf.read_metrics(fsdp), sf.read_metrics(single, phase)
    assert [(r["phase"], r["step"]) for r in a] == [(r["phase"], r["step"]) for r in b] and b
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra.keys() - {"phase", "step"}:
            tol = GRAD_NORM_REL if key == "grad_norm" else REL
            assert ra[key] == pytest.approx(rb[key], rel=tol, abs=tol), (ra["phase"], ra["step"], key)
    if validation:
        val_a, val_b = (sf.read_json(os.path.join(run, "config.json"))["results"] for run in (fsdp, single))
        assert val_a.keys() == val_b.keys()
        for name in val_b:
            assert val_a[name]["val"] == pytest.approx(val_b[name]["val"], rel=REL), name
    assert_params_close(sf.load_params(fsdp), sf.load_params(os.path.join(single, phase or "")))


def test_stage1_under_fsdp_equals_one_process(stage1):
    log = stage1["logs"][0]
    assert "2 rank(s)" in log and log.count("== boundary done") == 1
    compare_runs(stage1["fsdp"], stage1["single"])
    # the main network did train in distill (else the comparison would not cover its shards)
    before, after = (sf.load_params(os.path.join(stage1["single"], phase)) for phase in ("align", "distill"))
    assert sf.max_param_diff(before, after, model.ByteLM.MAIN) > 1e-4


def test_gradient_accumulation_into_the_shards(stage1):
    """Two micro-steps of one window per rank (FSDP adds each micro-step's reduce-scattered gradient into the shards)
    == one process with the 4 windows in one batch. The validation batches differ with the batch size: not compared."""
    compare_runs(stage1["accum"], stage1["single"], phase="align", validation=False)


def test_every_rank_ends_with_the_saved_weights(stage1):
    """The per-rank files (gathered from each rank's shards) agree bit for bit with each other and the checkpoint."""
    rank0, rank1 = (sf.load_params(sf.rank_state_path(stage1["fsdp"], r)) for r in (0, 1))
    assert sf.max_param_diff(rank0, rank1) == 0.0
    assert sf.max_param_diff(rank0, sf.load_params(stage1["fsdp"])) == 0.0


def test_the_fsdp_checkpoint_is_the_folder_one_process_writes(stage1):
    """The same tensors (names, dtypes, shapes) in model.safetensors and resume/optimizer.safetensors, whole (the
    moments of AdamW gathered from the shards: equal to one process's), and checkpoint.load_student reads it."""
    for name in ("model.safetensors", os.path.join("resume", "optimizer.safetensors")):
        headers = [safetensors_io.read_safetensors_header(os.path.join(stage1[run], name))[0]
                   for run in ("fsdp", "single")]
        assert {k: v[:2] for k, v in headers[0].items()} == {k: v[:2] for k, v in headers[1].items()}, name
    moments = [safetensors_io.read_safetensors(os.path.join(stage1[run], "resume", "optimizer.safetensors"))
               for run in ("fsdp", "single")]
    assert sf.max_param_diff(*moments) < 1e-6
    student, meta = checkpoint.load_student(stage1["fsdp"])
    assert meta["phase"] == "boundary" and meta["phase_done"] and meta["world_size"] == 2
    assert_params_close(student.state_dict(), sf.load_params(stage1["single"]))


def test_resume_under_fsdp_is_exact(stage1):
    """Stopped mid-distill (its AdamW moments of the main network gathered into the checkpoint), then resumed on two
    ranks (cut into shards again): the same steps and weights as the run that never stopped, bit for bit."""
    stopped, resumed = stage1["logs"][1], stage1["logs"][2]
    assert f"stopped after {STOP} steps" in stopped
    assert "resuming from" in resumed and "phase distill step 2" in resumed
    assert sf.read_metrics(stage1["resumed"]) == sf.read_metrics(stage1["fsdp"])
    assert sf.max_param_diff(sf.load_params(stage1["resumed"]), sf.load_params(stage1["fsdp"])) == 0.0


def full_bytes(state, prefixes=("",)):
    """(bytes, tensors) of the entries of a whole state dict whose names start with prefixes."""
    chosen = [t for k, t in state.items() if k.startswith(prefixes)]
    return sum(t.numel() * t.element_size() for t in chosen), len(chosen)


def test_each_rank_holds_about_half(stage1):
    """The memory lines of the FSDP run against the single-process checkpoint's tensors: per rank about half of the
    student's parameters, of the phase's gradients and AdamW state (two moments + a step per tensor), and of the
    teacher's blocks (its embedding and final norm stay whole)."""
    figures = {(m[1], int(m[2])): [float(x) * 2 ** 20 for x in m.groups()[2:]]
               for m in MEMORY.finditer(stage1["logs"][0])}
    assert sorted(figures) == sorted((p, r) for p in ("align", "distill", "boundary") for r in (0, 1))
    state = sf.load_params(stage1["single"])
    trained = {"align": model.ByteLM.ENCODER_SIDE, "distill": model.ByteLM.ENCODER_SIDE + model.ByteLM.MAIN,
               "boundary": model.ByteLM.PATCHER}
    teacher = safetensors_io.read_safetensors(os.path.join(sf.teacher_dir(), "model.safetensors"))
    teacher_whole, _ = full_bytes(teacher, ("model.embed_tokens.", "model.norm."))
    teacher_blocks, _ = full_bytes(teacher, ("model.layers.",))
    params, _ = full_bytes(state)
    for (phase, rank), (p, g, o, t) in figures.items():
        grads, count = full_bytes(state, trained[phase])
        optimizer = 2 * grads + 4 * count
        for got, whole in ((p, params), (g, grads), (o, optimizer), (t - teacher_whole, teacher_blocks)):
            assert got == pytest.approx(whole / 2, rel=0.03), (phase, rank, got, whole)  # uneven rows, 4 digits
    assert "memory align" not in stage1["single_log"], "without --fsdp the output is as it was"


def test_memory_bytes_is_what_adamw_allocates():
    """memory_bytes' gradient and optimizer figures against the tensors one AdamW step actually allocates."""
    tcfg = teachers.TeacherConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16,
                                  d_ff=64)
    student = model.ByteLM(model.StudentConfig(d_local=32, n_enc=1, n_dec=1, n_local_heads=2, proj_hidden=0), tcfg)
    params = train.select_params(student, model.ByteLM.ENCODER_SIDE)
    trainable = [p for _, p in params]
    figures = distributed.memory_bytes(student, trainable)
    optimizer = train.make_optimizer(params, 1e-3, 0.1)
    sum(p.sum() for p in trainable).backward()
    optimizer.step()
    held = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
    assert figures["optimizer"] == held
    assert figures["gradients"] == sum(p.grad.numel() * p.grad.element_size() for p in trainable)
    assert figures["parameters"] == sum(t.numel() * t.element_size() for t in student.state_dict().values())
    assert figures["teacher"] == 0


def test_stage2_under_fsdp_equals_one_process(stage1):
    """Stage 2 from the single-process stage-1 checkpoint: warmup (output side) and e2e (everything, the byte-level
    parts at twice the rate) on two FSDP ranks == one process."""
    import stage2_sft
    single, fsdp = sf.tmp_dir("fsdp-single2"), sf.tmp_dir("fsdp2")
    with sf.threads(1), sf.quiet():
        stage2_sft.main(stage2_args(stage1["single"], single, "--batch_size=4"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", sf.__file__,
           "stage2_sft", *stage2_args(stage1["single"], fsdp, "--batch_size=2", "--fsdp=True")]
    proc = subprocess.run(cmd, cwd=sf.REPO, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 rank(s)" in proc.stdout and "memory e2e rank 1" in proc.stdout
    compare_runs(fsdp, single)
    assert sf.read_metrics(fsdp, "e2e")  # e2e ran (all of the student trained under FSDP)
