"""stage1_kd.py end to end on a tiny random teacher (tests/stage_fixtures.py): the three phases learn, checkpoints hold
what each phase trained, --resume continues exactly, two gloo ranks match one process with the same global batch, and
configuration errors are one clean line.

Oracles: a run that never stopped, for resume; a single process with the same global batch, for DDP; the validation
batches the script itself evaluates on, re-scored from the align checkpoint, for "distill lowers the KL"."""
import json
import os
import shutil
import sys

import pytest
import torch

import checkpoint
import data
import distributed
import model
import stage1_kd
import stage_fixtures as sf
import teacher as teachers
import train

# Test 1's budgets: ~230 align, ~60 distill, ~80 boundary steps of 256 bytes (about 8 s on one thread).
LEARNING_RUN = ["--align_bytes=60000", "--align_lr=1e-2", "--distill_bytes=16000", "--distill_lr=3e-3",
                "--boundary_bytes=20000", "--boundary_lr=3e-2", "--eval_batches=8"]
# Resume and DDP runs use TINY_STAGE1's budgets: 10 align, 5 distill and 5 boundary steps.
ALIGN_STEPS, DISTILL_STEPS, BOUNDARY_STEPS = 10, 5, 5


@pytest.fixture(scope="module")
def learning_run():
    out = sf.tmp_dir("learn")
    results, log = sf.run_stage1(out, *LEARNING_RUN)
    return out, results, log


def distill_val_kl(folder, eval_batches=8):
    """The distill evaluation of stage1_kd (same validation batches, same sums) for the student in folder; the
    loader's sizes are TINY_STAGE1's, eval_batches LEARNING_RUN's."""
    student, _ = checkpoint.load_student(folder)
    teacher, tok = teachers.load_teacher(sf.teacher_dir())
    loader = data.ShardLoader(sf.shard_dir(), "val", tok, batch_size=4, seq_len=64, seed=0,
                              max_tokens=teacher.cfg.max_seq_len)
    sums = {}
    with torch.no_grad(), sf.threads(1):
        for _ in range(eval_batches):
            train.add_sums(sums, stage1_kd.distill_step(student, teacher, loader.next_batch(), 64)[1])
    return stage1_kd.summarize("distill", distributed.all_reduce_sum(sums))["kl"]


def mean(xs):
    return sum(xs) / len(xs)


def assert_params(a, b, at_most=0.0, at_least=None, prefixes=("",)):
    """Parameters of two state dicts (the names starting with `prefixes`) are equal within at_most, or differ
    somewhere by at least at_least."""
    diff, name = sf.worst_param_diff(a, b, prefixes)
    if at_least is not None:
        assert diff >= at_least, f"{prefixes}: nothing changed by {at_least} (largest change {diff:.3g} in {name})"
    else:
        assert diff <= at_most, f"{name} differs by {diff:.3g}"


# ----------------------------------------------------------------------------------------------------------------
# 1. The three phases learn.

def test_align_halves_its_loss(learning_run):
    out, results, _ = learning_run
    rel_mse = [r["rel_mse"] for r in sf.read_metrics(out, "align")]
    assert len(rel_mse) == 60000 // 256
    assert 0.9 < rel_mse[0] < 1.2, "the projection starts at the mean embedding row: relative MSE ~1"
    # Per-step figures are noisy (different batches): the last 10 steps' mean, and the validation figure.
    assert mean(rel_mse[-10:]) < 0.5 * rel_mse[0], rel_mse[-10:]
    assert results["align"]["val"]["rel_mse"] < 0.5 * rel_mse[0], results["align"]["val"]
    assert results["align"]["val"]["cos"] > 0.6


def test_distill_lowers_the_kl(learning_run):
    """Per-step KLs vary by +-20% from batch to batch, more than the phase lowers them in 60 steps, so the figure
    compared is the KL on the fixed validation batches: of out/align (before distill) and of the phase's end."""
    out, results, _ = learning_run
    after = results["distill"]["val"]["kl"]
    assert after == pytest.approx(distill_val_kl(os.path.join(out, "distill")), rel=1e-6)  # the same figure
    before = distill_val_kl(os.path.join(out, "align"))
    assert after < 0.93 * before, (before, after)
    assert results["distill"]["val"]["top1"] > 0.5


def test_boundary_f1_on_validation(learning_run):
    out, results, _ = learning_run
    first = sf.read_metrics(out, "boundary")[0]
    assert first["f1"] < 0.6, "the identity patcher should start far from the token boundaries"
    val = results["boundary"]["val"]
    assert val["f1"] > 0.9, val
    assert val["precision"] > 0.85 and val["recall"] > 0.85, val


def test_checkpoints_hold_what_each_phase_trained(learning_run):
    out, results, log = learning_run
    for name in ("model.safetensors", "config.json", "resume/optimizer.safetensors", "resume/state.json",
                 *(f"{phase}/{f}" for phase in stage1_kd.PHASES for f in ("model.safetensors", "config.json"))):
        assert os.path.isfile(os.path.join(out, name)), name
    for phase in stage1_kd.PHASES:  # per-phase folders hold the byte model only
        assert sorted(os.listdir(os.path.join(out, phase))) == ["config.json", "model.safetensors"], phase
    leftovers = [f for _, dirs, files in os.walk(out) for f in dirs + files if f.endswith(".tmp") or f.startswith(".")]
    assert not leftovers, "atomic writes leave no temporary files"
    sidecar = sf.read_json(os.path.join(out, "config.json"))
    assert sidecar["phase"] == "boundary" and sidecar["phase_done"] and sidecar["stage"] == 1
    assert sidecar["config"]["align_bytes"] == 60000 and sidecar["config"]["teacher"] == sf.teacher_dir()
    assert sidecar["results"]["boundary"]["val"] == pytest.approx(results["boundary"]["val"])
    assert "stage 1 finished" in log and "| boundary |" in log

    student, meta = checkpoint.load_student(out)
    final = sf.load_params(out)
    assert_params(student.state_dict(), final)
    assert meta["phase"] == "boundary" and meta["phase_done"]

    # Each phase changes exactly the parameters it trains (no update and no weight decay on anything else).
    align, distill, boundary = (sf.load_params(os.path.join(out, p)) for p in stage1_kd.PHASES)
    encoder_side, patcher = model.ByteLM.ENCODER_SIDE, model.ByteLM.PATCHER
    eye = torch.eye(align["patcher_q.weight"].shape[0])
    assert torch.equal(distill["patcher_q.weight"], eye) and torch.equal(distill["patcher_k.weight"], eye)
    assert_params(align, distill, at_least=1e-4, prefixes=encoder_side)  # distill moved the encoder side
    assert_params(distill, boundary, prefixes=encoder_side)  # boundary: the encoder output is detached
    assert_params(distill, boundary, at_least=1e-3, prefixes=patcher)
    assert_params(boundary, final)
    assert_params(align, boundary, prefixes=model.ByteLM.MAIN + model.ByteLM.OUTPUT_SIDE)  # stage 2 trains these
    teacher, _ = teachers.load_teacher(sf.teacher_dir())  # main = the teacher's blocks (distill_main_lr=0: frozen)
    teacher_blocks = {"main." + k: v for k, v in teacher.state_dict().items() if not k.startswith("embed_tokens")}
    assert_params(teacher_blocks, {k: final[k] for k in teacher_blocks})


# ----------------------------------------------------------------------------------------------------------------
# 2. Resume: stopped after k steps and resumed == never stopped, step for step and bit for bit.

@pytest.fixture(scope="module")
def reference_run():
    out = sf.tmp_dir("reference")
    results, _ = sf.run_stage1(out)
    return out, results


_stopped_runs = {}


def stopped_and_resumed(k):
    """A run stopped with --stop_after=k, then resumed in the same folder -> (folder, metrics lines the stopped run
    wrote, its checkpoint's phase and step, the resumed run's results). Cached: two tests read the k=10 case."""
    if k not in _stopped_runs:
        out = sf.tmp_dir(f"stop{k}")
        _, log = sf.run_stage1(out, f"--stop_after={k}")
        assert "stopped after" in log and "stage 1 finished" not in log
        n_lines = len(sf.read_metrics(out))
        ckpt = sf.read_json(os.path.join(out, "config.json"))
        results, log = sf.run_stage1(out, "--resume")
        assert "resuming from" in log and "stage 1 finished" in log
        _stopped_runs[k] = out, n_lines, (ckpt["phase"], ckpt["step"], ckpt["phase_done"]), results
    return _stopped_runs[k]


@pytest.mark.parametrize("k", [4, ALIGN_STEPS, ALIGN_STEPS + 2, ALIGN_STEPS + DISTILL_STEPS + 3],
                         ids=["mid-align", "end-of-align", "mid-distill", "mid-boundary"])
def test_resume_is_exact(reference_run, k):
    ref_dir, ref_results = reference_run
    out, n_stopped, _, results = stopped_and_resumed(k)
    reference = sf.read_metrics(ref_dir)
    assert len(reference) == ALIGN_STEPS + DISTILL_STEPS + BOUNDARY_STEPS
    assert n_stopped in (k, k + 1)  # k + 1 when k ends a phase: see test_stop_after_stops_after_k_steps
    # The folder's metrics.jsonl: the stopped run's lines, then the resumed run's; every field bit for bit
    # (fp32 on CPU, the same operations in the same order), grad_norm included.
    assert sf.read_metrics(out) == reference
    for phase in stage1_kd.PHASES:
        assert results[phase]["val"] == ref_results[phase]["val"], phase
        assert results[phase]["bytes"] == ref_results[phase]["bytes"]
    for name in ("", "align", "distill"):  # out_dir itself: the latest weights
        assert_params(sf.load_params(os.path.join(out, name)), sf.load_params(os.path.join(ref_dir, name)))
    ref_state, state = (sf.read_json(os.path.join(d, "resume", "state.json")) for d in (ref_dir, out))
    assert state["loader"] == ref_state["loader"]


def test_stop_after_stops_after_k_steps():
    out, n_stopped, (phase, step, done), _ = stopped_and_resumed(ALIGN_STEPS)
    assert n_stopped == ALIGN_STEPS, f"--stop_after={ALIGN_STEPS} ran {n_stopped} steps (stopped in {phase} at {step})"


def test_stop_mid_phase_checkpoints_the_position():
    out, n_stopped, (phase, step, done), _ = stopped_and_resumed(ALIGN_STEPS + 2)
    assert (n_stopped, phase, step, done) == (ALIGN_STEPS + 2, "distill", 2, False)


def test_a_budget_of_zero_skips_the_phase():
    out = sf.tmp_dir("stage1_no_distill")
    results, log = sf.run_stage1(out, "--distill_bytes=0")
    assert list(results) == ["align", "boundary"] and "skipping distill (a budget of 0 bytes)" in log
    assert not os.path.exists(os.path.join(out, "distill"))
    assert {row["phase"] for row in sf.read_metrics(out)} == {"align", "boundary"}


def test_budget_study_variants_scale_one_phase():
    sys.path.insert(0, os.path.join(sf.REPO, "bench"))
    import budget
    s1, s2 = budget.budgets(budget.Config(), "prior+align_x2+e2e_x0", 0.5)
    assert (s1["align_bytes"], s1["distill_bytes"], s2["e2e_bytes"]) == (800_000, 24_576, 0) and "decoder_bytes" not in s1
    for bad in ("prior+align", "prior+foo_x2", "prior+align_x-1", "nope+align_x2"):
        with pytest.raises(ValueError):
            budget.parse_variant(bad)


def test_resume_after_a_crash_drops_the_lost_steps_lines(reference_run):
    """A run that died after its last checkpoint left metrics lines of steps that the resumed run takes again: they
    are dropped, so metrics.jsonl still equals the uninterrupted run's, line for line."""
    ref_dir, _ = reference_run
    out = sf.tmp_dir("crash")
    sf.run_stage1(out, f"--stop_after={ALIGN_STEPS + 2}")  # checkpoint at distill step 2
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:  # distill steps 2 and 3 logged, then the crash
        for step in (2, 3):
            f.write(json.dumps({"phase": "distill", "step": step, "kl": 9.9}) + "\n")
    sf.run_stage1(out, "--resume")
    assert sf.read_metrics(out) == sf.read_metrics(ref_dir)


@pytest.fixture(scope="module")
def stopped_mid_align():
    out = sf.tmp_dir("stopped-mid-align")
    sf.run_stage1(out, "--stop_after=4")
    return out


@pytest.mark.parametrize("args, match", [
    (["--warmup_frac=0.2"], "stopped mid-phase with other settings.*warmup_frac: 0.1 -> 0.2"),
    (["--distill_main_lr=1e-5"], "stopped mid-phase with other settings.*distill_main_lr"),
    (["--local_window=16"], "holds another model \\(student: local_window: 32 -> 16"),
    (["--d_local=32"], "holds another model \\(student: d_local"),
])
def test_resume_refuses_other_settings(stopped_mid_align, args, match):
    with pytest.raises(ValueError, match=match):
        sf.run_stage1(stopped_mid_align, "--resume", *args)
    sf.run_stage1(stopped_mid_align, "--resume", "--stop_after=1", "--log_interval=1")  # what may change, may


@pytest.mark.parametrize("name, match", [("model.safetensors", "not a valid safetensors file"),
                                         ("resume/optimizer.safetensors", "not a valid safetensors file"),
                                         ("config.json", "not a byte-student checkpoint"),
                                         ("resume/state.json", "not a JSON file")])
def test_resume_from_a_corrupt_checkpoint_is_a_clear_error(stopped_mid_align, tmp_path, name, match):
    out = str(tmp_path / "corrupt")
    sf.copy_checkpoint(stopped_mid_align, out)
    path = os.path.join(out, name)
    with open(path, "rb") as f:
        head = f.read(100)
    with open(path, "wb") as f:
        f.write(b"\x80\x02 garbage" + head[10:])  # a bad header length (safetensors), not UTF-8 (JSON)
    with pytest.raises(ValueError, match=match):
        sf.run_stage1(out, "--resume")


def test_a_missing_validation_split_fails_before_training(tmp_path):
    shards = str(tmp_path / "shards")
    shutil.copytree(sf.shard_dir(), shards)
    for name in os.listdir(shards):
        if name.startswith("val_"):
            os.remove(os.path.join(shards, name))
    out = sf.tmp_dir("no-val")
    with pytest.raises((ValueError, FileNotFoundError), match="val"):
        sf.run_stage1(out, f"--data_dir={shards}")
    assert not os.path.exists(os.path.join(out, "metrics.jsonl")), "no step was trained"


# ----------------------------------------------------------------------------------------------------------------
# 3. DDP: two gloo ranks with batch 2 each == one process with batch 4 (the same windows: rank r takes every
# world-th window of each global batch).
#
# Every phase's loss is a mean over a count that differs between ranks (token ends, patches, bytes); train.py
# backpropagates the sums and divides the all-reduced gradient by the global count, so the update is the one a single
# process makes over the whole global batch, up to the order of float sums. Both phases below are compared at rel 1e-5
# (seen: ~1e-7), grad_norm included. Distill is left out to keep the test short; it goes through the same code.

DDP_ALIGN = ["--phase=align", "--align_bytes=2048", "--align_lr=1e-2"]       # 8 steps
DDP_BOUNDARY = ["--phase=boundary", "--resume", "--boundary_bytes=2048", "--boundary_lr=3e-2"]


@pytest.fixture(scope="module")
def ddp_runs():
    """One torchrun (2 ranks, batch 2 each) doing two runs: align from scratch, and boundary resumed from a
    single-process align checkpoint (a fresh student's h is the same vector at every byte, so the patcher's
    gradient is exactly zero there: boundary needs an aligned encoder). The same two runs in this process, batch 4."""
    single_align, ddp_align = sf.tmp_dir("single-align"), sf.tmp_dir("ddp-align")
    sf.run_stage1(single_align, "--batch_size=4", *DDP_ALIGN)
    single_boundary, ddp_boundary = sf.tmp_dir("single-boundary"), sf.tmp_dir("ddp-boundary")
    for folder in (single_boundary, ddp_boundary):
        sf.copy_checkpoint(single_align, folder)
    result = sf.run_torchrun("stage1_kd", (ddp_align, "--batch_size=2", *DDP_ALIGN),
                             (ddp_boundary, "--batch_size=2", *DDP_BOUNDARY))
    sf.run_stage1(single_boundary, "--batch_size=4", *DDP_BOUNDARY)
    return {"single_align": single_align, "ddp_align": ddp_align, "single_boundary": single_boundary,
            "ddp_boundary": ddp_boundary, "stdout": result.stdout, "stderr": result.stderr}


def compare_metrics(ddp, single, rel, skip=("grad_norm",)):
    assert [(r["phase"], r["step"]) for r in ddp] == [(r["phase"], r["step"]) for r in single]
    for a, b in zip(ddp, single):
        for key in b:
            if key not in ("phase", "step", *skip):
                assert a[key] == pytest.approx(b[key], rel=rel, abs=rel), (a["phase"], a["step"], key, a[key], b[key])


def test_ddp_runs_two_ranks(ddp_runs):
    assert "2 rank(s)" in ddp_runs["stdout"]
    assert ddp_runs["stdout"].count("== align done") == 1, "only rank 0 logs"
    assert "Traceback" not in ddp_runs["stderr"]


def test_ddp_boundary_matches_single_process(ddp_runs):
    ddp = sf.read_metrics(ddp_runs["ddp_boundary"], "boundary")
    single = sf.read_metrics(ddp_runs["single_boundary"], "boundary")
    assert len(single) == 2048 // 256
    compare_metrics(ddp, single, rel=1e-5, skip=())  # grad_norm too: the averaged gradient is the global one
    assert_params(sf.load_params(ddp_runs["ddp_boundary"]),
                  sf.load_params(ddp_runs["single_boundary"]), at_most=1e-5)  # seen: 1e-6
    # The evaluation: each rank scores its stride of the same validation windows; the sums are all-reduced.
    ddp_val, single_val = (sf.read_json(os.path.join(ddp_runs[run], "config.json"))["results"]["boundary"]["val"]
                           for run in ("ddp_boundary", "single_boundary"))
    assert ddp_val == pytest.approx(single_val, rel=1e-5)


def test_grad_accum_matches_bigger_batch(ddp_runs):
    """Two micro-steps of 2 windows == one step of 4 (the loader hands out the same windows in the same order)."""
    out = sf.tmp_dir("accum")
    sf.copy_checkpoint(ddp_runs["single_align"], out)
    sf.run_stage1(out, "--batch_size=2", "--grad_accum=2", *DDP_BOUNDARY)
    compare_metrics(sf.read_metrics(out, "boundary"), sf.read_metrics(ddp_runs["single_boundary"], "boundary"),
                    rel=1e-5, skip=())
    assert_params(sf.load_params(out), sf.load_params(ddp_runs["single_boundary"]), at_most=1e-5)


@pytest.mark.parametrize("run", ["ddp_align", "ddp_boundary"])
def test_ddp_ranks_hold_identical_parameters(ddp_runs, run):
    rank0, rank1 = (sf.load_params(sf.rank_state_path(ddp_runs[run], r)) for r in (0, 1))
    assert_params(rank0, rank1)  # bit for bit: every rank applies the same averaged update
    assert_params(rank0, sf.load_params(ddp_runs[run]))


def test_ddp_align_matches_single_process(ddp_runs):
    """Align's loss is a mean over each rank's own token ends, and the ranks hold different numbers of them: only the
    division by the global count (not an average of the ranks' means) makes the two runs agree."""
    ddp, single = sf.read_metrics(ddp_runs["ddp_align"]), sf.read_metrics(ddp_runs["single_align"])
    assert len(single) == 2048 // 256
    compare_metrics(ddp, single, rel=1e-5, skip=())
    assert_params(sf.load_params(ddp_runs["ddp_align"]),
                  sf.load_params(ddp_runs["single_align"]), at_most=1e-4)  # seen: 1.6e-5
    # (Adam at lr 1e-2 turns float-order noise in near-zero gradient entries into weight differences of ~lr * 1e-3)


# ----------------------------------------------------------------------------------------------------------------
# 4. Configuration errors: main raises ValueError / FileNotFoundError; the command line prints one line.

@pytest.mark.parametrize("args, error, match", [
    (["--nope=1"], ValueError, "unknown option --nope"),
    (["--batch_size=four"], ValueError, "--batch_size='four' is not a valid int"),
    (["--resume=maybe"], ValueError, "is not a valid bool"),
    (["--phase=finetune"], ValueError, "--phase must be all, align, distill, boundary or decoder"),
    (["--dtype=fp8"], ValueError, "--dtype must be"),
    (["--distill_lr=0"], ValueError, "--distill_lr and --boundary_lr must be > 0"),
    (["--teacher=/nonexistent/teacher"], FileNotFoundError, "unknown teacher"),
    (["--resume"], FileNotFoundError, "no checkpoint at"),
])
def test_config_errors(args, error, match):
    with pytest.raises(error, match=match):
        sf.run_stage1(sf.tmp_dir("error"), *args)


def test_command_line_error_is_one_line():
    result = sf.run_script("stage1_kd.py", "--phase=finetune", "--device=cpu")
    assert result.returncode == 1
    assert result.stderr.startswith("error: --phase must be") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
