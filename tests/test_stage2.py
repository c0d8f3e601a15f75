"""stage2_sft.py end to end on the tiny random teacher of stage_fixtures.py, then sample.py, bench/fidelity.py and
bench/generate.py on its checkpoint.

One short stage-1 run (its patcher trained far enough to cut real patches, so the main network matters in stage 2)
is the --init of every stage-2 run here. Oracles: the learning rates AdamW actually applied (its first update moves
every weight that has a gradient by exactly lr, with weight decay off); the stage-1 weights for what warm-up must leave
alone; an uninterrupted run for resume; a single process for DDP; the teacher's own Teacher.bits on HF-tokenizers ids
and a direct student forward for the fidelity benchmark."""
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import checkpoint
import decoding
import model
import stage_fixtures as sf
import teacher as teachers

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

STAGE1 = ("--align_bytes=8192", "--align_lr=1e-2", "--distill_bytes=1024", "--boundary_bytes=8192",
          "--boundary_lr=1e-2")
BATCH, SEQ = 4, 64
STEP_BYTES = BATCH * SEQ
STEPS = 12  # per stage-2 phase in the main run
TINY_STAGE2 = ["--dtype=float32", "--device=cpu", f"--batch_size={BATCH}", f"--seq_len={SEQ}", "--eval_batches=2",
               "--log_interval=1000", "--warmup_frac=0.1", "--warmup_lr=3e-3", "--e2e_lr=1e-3",
               f"--warmup_bytes={STEPS * STEP_BYTES}", f"--e2e_bytes={STEPS * STEP_BYTES}"]
PROMPT = "MACBETH. So foul and fair a day"
SAMPLE_BYTES = 24
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=sf.REPO)


def stage2_args(init_dir, out_dir, *args):
    return [f"--init={init_dir}", f"--data_dir={sf.shard_dir()}", f"--out_dir={out_dir}",
            *TINY_STAGE2, *args]


def run_stage2(init_dir, out_dir, *args):
    """stage2_sft.main in this process (one thread) -> (results, captured stdout)."""
    import stage2_sft
    with sf.threads(1), sf.quiet() as log:
        results = stage2_sft.main(stage2_args(init_dir, out_dir, *args))
    return results, log.getvalue()


def load_bench(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(sf.REPO, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def stage1():
    out = sf.tmp_dir("stage2-init")
    results, _ = sf.run_stage1(out, *STAGE1)
    assert results["boundary"]["val"]["f1"] > 0.5, results  # real patches: the main network matters in stage 2
    return out


@pytest.fixture(scope="module")
def full(stage1):
    """The uninterrupted stage-2 run (warmup then e2e) -> (out_dir, results)."""
    out = sf.tmp_dir("stage2-full")
    results, _ = run_stage2(stage1, out)
    return out, results


def mean(xs):
    return sum(xs) / len(xs)


# ----------------------------------------------------------------------------------------------------------------

def test_stage2_loss_falls_in_each_phase_then_sample_writes_the_bytes(full):
    out, results = full
    for phase in ("warmup", "e2e"):
        ce = [r["ce"] for r in sf.read_metrics(out, phase)]
        assert len(ce) == STEPS
        assert all(math.isfinite(c) for c in ce)
        first, last = mean(ce[:3]), mean(ce[-3:])
        assert last < first - 0.2, (phase, ce)  # measured: warmup 6.16 -> 5.10, e2e 4.72 -> 3.96
    assert results["e2e"]["val"]["ce"] < results["warmup"]["val"]["ce"]

    proc = subprocess.run([sys.executable, "sample.py", f"--ckpt={out}", f"--prompt={PROMPT}",
                           f"--max_bytes={SAMPLE_BYTES}", "--raw", "--seed=2"],
                          cwd=sf.REPO, env=ENV, capture_output=True, timeout=120)
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
    out_bytes = proc.stdout
    assert out_bytes.startswith(PROMPT.encode()) and out_bytes.endswith(b"\n")  # prompt, bytes, closing newline
    generated = out_bytes[len(PROMPT.encode()):-1]
    assert model.BOS_BYTE not in generated
    count = int(re.search(rb"--- (\d+) bytes in", proc.stderr).group(1))
    if len(generated) == SAMPLE_BYTES:  # this seed: the full count (the usual case)
        assert count == SAMPLE_BYTES
    else:  # the model sampled 0xFE (end of document) early: the speed line counts it, the output does not show it
        assert len(generated) < SAMPLE_BYTES and count == len(generated) + 1, (generated, proc.stderr)


def test_sft_step_loss_against_a_direct_computation(stage1):
    """The stage-2 loss on a real batch: patches from the patcher (p > 0.5), 512-way CE with label
    next_byte + 256 * token_end(next byte), plus boundary_weight x BCE of p against token ends (last byte excluded);
    bits per byte from p(byte) = p(byte, 0) + p(byte, 1)."""
    import torch.nn.functional as F

    import data
    import stage2_sft
    import tokenizer
    student, meta = checkpoint.load_student(stage1)
    tok = tokenizer.load_tokenizer(meta["teacher"])
    batch = data.ShardLoader(sf.shard_dir(), "train", tok, BATCH, SEQ, seed=5).next_batch()
    x, end = batch["bytes"], batch["token_end"]
    assert batch["valid"].all()
    loss, stats = stage2_sft.sft_step(student, batch, boundary_weight=0.5)
    with torch.no_grad():
        h = student.encode(x)
        p = student.boundary_probs(h)
        logits = student.decode(x, h, student.dechunk(student.run_main(h, p > 0.5)[0], p > 0.5))
        labels = x[:, 1:] + 256 * end[:, 1:].long()
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, 512).double(), labels.reshape(-1))
        bce = F.binary_cross_entropy(p[:, :-1].double(), end[:, :-1].double())
        probs = torch.softmax(logits[:, :-1].double(), dim=-1)
        p_byte = probs.gather(-1, x[:, 1:, None]) + probs.gather(-1, x[:, 1:, None] + 256)
    n = BATCH * (SEQ - 1)
    assert loss.item() == pytest.approx((ce + 0.5 * bce).item(), rel=1e-5)
    assert stats["n"] == n and stats["ce"] / n == pytest.approx(ce.item(), rel=1e-5)
    assert stats["byte_nats"] == pytest.approx(-p_byte.log().sum().item(), rel=1e-5)
    assert stats["bce"] / stats["n_p"] == pytest.approx(bce.item(), rel=1e-5)
    assert stats["patches"] == (p > 0.5).sum().item() and 0 < stats["patches"] < BATCH * SEQ / 2


def test_soft_targets_add_the_teacher_kl(stage1, tmp_path):
    """--soft_weight: the teacher's exact byte targets (rows summing to 1 where a byte has one, zero elsewhere) enter
    the loss as soft_weight x KL(targets || head) per scored byte, on top of the hard labels' CE, which the stats
    still report alone; a run with it trains (the loss falls) and its validation figures are the hard CE's."""
    import torch.nn.functional as F

    import data
    import stage2_sft
    import tokenizer
    from targets import ByteTrie
    student, meta = checkpoint.load_student(stage1)
    tok = tokenizer.load_tokenizer(meta["teacher"])
    teacher, _ = teachers.load_teacher(meta["teacher"])
    batch = data.ShardLoader(sf.shard_dir(), "train", tok, BATCH, SEQ, seed=5).next_batch()
    soft = stage2_sft.teacher_targets(teacher, ByteTrie(tok.id_to_bytes), batch, 1024)
    mass = soft.sum(-1)
    assert ((mass - 1).abs() < 1e-5).sum() > BATCH * SEQ / 2 and ((mass == 0) | ((mass - 1).abs() < 1e-5)).all()
    hard_loss, hard = stage2_sft.sft_step(student, batch)
    loss, stats = stage2_sft.sft_step(student, batch, soft=soft, soft_weight=2.0)
    with torch.no_grad():
        logits, _, _ = student(batch["bytes"])
        logp = torch.log_softmax(logits[:, :-1].double(), -1)
        q = soft[:, :-1].double()
        kl = (torch.xlogy(q, q) - q * logp).sum(-1).sum() / (BATCH * (SEQ - 1))
    assert loss.item() == pytest.approx(hard_loss.item() + 2.0 * kl.item(), rel=1e-5)
    assert stats["ce"].item() == pytest.approx(hard["ce"].item(), rel=1e-5)
    out = tmp_path / "soft"
    results, _ = run_stage2(stage1, out, "--soft_weight=1", f"--warmup_bytes={6 * STEP_BYTES}", "--e2e_bytes=0")
    ce = [r["ce"] for r in sf.read_metrics(out, "warmup")]
    assert len(ce) == 6 and mean(ce[-2:]) < mean(ce[:2]), ce


def test_warmup_trains_only_the_output_side_and_e2e_trains_everything(stage1, full):
    out, _ = full
    before = sf.load_params(stage1)
    warm = sf.load_params(os.path.join(out, "warmup"))
    after = sf.load_params(os.path.join(out, "e2e"))
    output_side = [k for k in before if k.startswith(model.ByteLM.OUTPUT_SIDE)]
    others = [k for k in before if k not in output_side]
    assert output_side and any(k.startswith("main.") for k in others) and any(k.startswith("encoder.") for k in others)
    changed_in_warmup = [k for k in before if not torch.equal(before[k], warm[k])]
    assert sorted(changed_in_warmup) == sorted(output_side)
    unchanged_in_e2e = [k for k in before if torch.equal(warm[k], after[k])]
    assert unchanged_in_e2e == []


def test_e2e_byte_level_parts_run_at_the_lr_multiple(stage1):
    """One e2e step from the stage-1 weights with weight decay off and a 1-step LR warm-up: AdamW's first update is
    lr * g / (|g| + eps), so every tensor that has a gradient moves by at most lr, and its largest move equals lr up
    to eps / |g| and fp32 rounding. The main network must move by e2e_lr, everything else by mult x e2e_lr."""
    lr, mult = 1e-3, 3.0
    out = sf.tmp_dir("stage2-lr")
    run_stage2(stage1, out, "--phase=e2e", "--stop_after=1", "--weight_decay=0", "--warmup_frac=0.01",
               f"--e2e_lr={lr}", f"--e2e_byte_lr_mult={mult}")
    ckpt = sf.read_json(os.path.join(out, "config.json"))
    assert (ckpt["phase"], ckpt["step"]) == ("e2e", 1)
    before, after = sf.load_params(stage1), sf.load_params(out)
    n_main = sum(1 for k in before if k.startswith("main."))
    groups = sf.read_json(os.path.join(out, "resume", "state.json"))["optimizer_groups"]
    by_scale = {}
    for g in groups:
        assert g["lr"] == pytest.approx(lr * g["lr_scale"], rel=1e-12)
        by_scale[g["lr_scale"]] = by_scale.get(g["lr_scale"], 0) + len(g["params"])
    assert by_scale == {1.0: n_main, mult: len(before) - n_main}
    for name in before:
        expected = lr * (1.0 if name.startswith("main.") else mult)
        moved = (after[name] - before[name]).abs().max().item()
        assert expected * 0.99 < moved < expected * 1.001, (name, moved, expected)


def test_resume_continues_exactly(stage1, full):
    """Stopped mid-warmup, resumed and stopped mid-e2e, resumed to the end: the same metrics lines, validation
    figures and final weights as the uninterrupted run (fp32, one thread)."""
    ref_out, ref_results = full
    out = sf.tmp_dir("stage2-resume")
    run_stage2(stage1, out, "--stop_after=5")
    ckpt = sf.read_json(os.path.join(out, "config.json"))
    assert (ckpt["phase"], ckpt["step"], ckpt["phase_done"]) == ("warmup", 5, False)
    n_output_side = sum(1 for k in sf.load_params(out) if k.startswith(model.ByteLM.OUTPUT_SIDE))
    groups = sf.read_json(os.path.join(out, "resume", "state.json"))["optimizer_groups"]
    assert sum(len(g["params"]) for g in groups) == n_output_side  # warmup's optimizer
    run_stage2(stage1, out, "--resume", "--stop_after=10")  # the 7 remaining warmup steps, then 3 of e2e
    ckpt = sf.read_json(os.path.join(out, "config.json"))
    assert (ckpt["phase"], ckpt["step"], ckpt["phase_done"]) == ("e2e", 3, False)
    results, log = run_stage2(stage1, out, "--resume")
    assert "resuming from" in log
    assert sf.read_metrics(out) == sf.read_metrics(ref_out)
    assert {p: r["val"] for p, r in results.items()} == {p: r["val"] for p, r in ref_results.items()}
    assert sf.max_param_diff(sf.load_params(out), sf.load_params(ref_out)) == 0.0


# DDP: 2 ranks x batch 2 against 1 process x batch 4 over the same windows (rank r takes every 2nd window of the single
# process's batch). Tolerances as in test_stage1.py's boundary comparison: stage 2's losses are means over all
# B * (T - 1) bytes of a rank's batch (every window is full here), so the average of the ranks' gradients is the
# gradient of the global mean and only the order of float sums differs: metrics (grad_norm included) to rel 1e-5
# (measured <= 2e-7). The weights get a looser bound than stage 1's 1e-5: these runs take 8 steps at lrs up to 3e-3
# through every part of the student, and Adam's g / sqrt(v) turns a rounding-level difference in a near-zero
# gradient into a visible update difference; measured 8e-6, bound 1e-4, a tenth of the smallest step (e2e_lr 1e-3),
# which any real divergence (unsynced or mis-scaled gradients) exceeds in one step.
DDP_STEPS = 4
DDP_ARGS = ("--phase=all", f"--warmup_bytes={DDP_STEPS * STEP_BYTES}", f"--e2e_bytes={DDP_STEPS * STEP_BYTES}")
DDP_REL = 1e-5
DDP_PARAM_ATOL = 1e-4


def run_ddp_and_single(stage1, name, args=DDP_ARGS):
    """The run of `args` from stage1 in one process and on 2 ranks with half the batch each (under torchrun, with
    stage_fixtures.py as the entry: it runs stage2_sft.main and saves every rank's final parameters), every
    metrics.jsonl line and the final weights compared -> (single out_dir, DDP out_dir, torchrun's stdout)."""
    single, ddp = sf.tmp_dir(f"{name}-single"), sf.tmp_dir(f"{name}-ddp")
    run_stage2(stage1, single, *args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", sf.__file__,
           "stage2_sft", *stage2_args(stage1, ddp, *args, f"--batch_size={BATCH // 2}")]
    proc = subprocess.run(cmd, cwd=sf.REPO, env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = sf.read_metrics(single), sf.read_metrics(ddp)
    assert [(r["phase"], r["step"]) for r in a] == [(r["phase"], r["step"]) for r in b] and a
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra.keys() - {"phase", "step"}:
            assert rb[key] == pytest.approx(ra[key], rel=DDP_REL, abs=DDP_REL), (ra["phase"], ra["step"], key)
    assert sf.max_param_diff(sf.load_params(single), sf.load_params(ddp)) < DDP_PARAM_ATOL
    return single, ddp, proc.stdout


def test_ddp_matches_single_process(stage1):
    single, ddp, stdout = run_ddp_and_single(stage1, "stage2")
    assert "2 rank(s)" in stdout and stdout.count("== e2e done") == 1  # two ranks, only rank 0 logs
    assert len(sf.read_metrics(single)) == 2 * DDP_STEPS
    # the ranks hold identical weights (the averaged gradient, applied by every rank)
    rank0, rank1 = (sf.load_params(sf.rank_state_path(ddp, r)) for r in (0, 1))
    assert sf.max_param_diff(rank0, rank1) == 0.0
    assert sf.max_param_diff(rank0, sf.load_params(ddp)) == 0.0


CHAT_ARGS = (f"--chat_data={sf.chat_shard_dir()}", "--chat_fraction=0.5", f"--warmup_bytes={4 * STEP_BYTES}",
             f"--e2e_bytes={4 * STEP_BYTES}")


def test_resume_with_chat_shards_is_exact(stage1):
    """With chat shards mixed in (half of every batch): stopped mid-warmup and resumed, the same metrics and final
    weights as the uninterrupted run; and the chat rows are really chat (their windows hold special codes)."""
    ref, out = sf.tmp_dir("stage2-chat"), sf.tmp_dir("stage2-chat-resume")
    run_stage2(stage1, ref, *CHAT_ARGS)
    run_stage2(stage1, out, *CHAT_ARGS, "--stop_after=3")
    state = sf.read_json(os.path.join(out, "resume", "state.json"))["loader"]
    assert state["chat"]["consumed"] == 3 * BATCH // 2
    run_stage2(stage1, out, *CHAT_ARGS, "--resume")
    assert sf.read_metrics(out) == sf.read_metrics(ref)
    assert sf.max_param_diff(sf.load_params(out), sf.load_params(ref)) == 0.0
    assert sf.read_json(os.path.join(out, "config.json"))["config"]["chat_data"] == sf.chat_shard_dir()


def test_ddp_with_chat_shards_matches_single_process(stage1):
    """2 ranks x (1 corpus row + 1 chat row) against 1 process x (2 + 2): the same windows, the same updates."""
    single, _, _ = run_ddp_and_single(stage1, "stage2-chat", CHAT_ARGS)
    assert len(sf.read_metrics(single)) == 8


# ----------------------------------------------------------------------------------------------------------------
# The benchmarks on the stage-2 checkpoint. The teacher is loaded by the name stored in the checkpoint: here the tiny
# teacher's folder.

SHORT_TEXT = ("Fair is foul, and foul is fair:\nHover through the fog and filthy air.\n"
              "When shall we three meet again\nIn thunder, lightning, or in rain?\n")


def long_text():
    with open(sf.corpus_file(), encoding="utf-8") as f:
        return f.read()[20_000:20_600]


def teacher_oracle(text, window):
    """Teacher bits per byte by Teacher.bits on ids from HF tokenizers (the test-only oracle tokenizer)
    -> (bpb, HF encoding)."""
    from tokenizers import Tokenizer
    encoding = Tokenizer.from_file(os.path.join(sf.teacher_dir(), "tokenizer.json")).encode(text)
    teacher, tok = teachers.load_teacher(sf.teacher_dir())
    return teacher.bits(encoding.ids, tok.doc_start_id, window=window) / len(text.encode()), encoding


def run_fidelity(ckpt, tmp_path):
    """bench/fidelity.py on SHORT_TEXT, on long_text() in windows of 16 tokens, and on SHORT_TEXT without the
    greedy-flag passes -> the three texts' JSON records."""
    fidelity = load_bench("fidelity")
    short, long = tmp_path / "short.txt", tmp_path / "long.txt"
    short.write_text(SHORT_TEXT, encoding="utf-8")
    long.write_text(long_text(), encoding="utf-8")
    js = tmp_path / "fidelity.json"
    with sf.quiet():
        fidelity.main([f"--ckpt={ckpt}", f"--text={short}", "--max_bytes=4000", f"--json={js}"])
    with sf.quiet():  # a small window: the long text is scored in many segments
        fidelity.main([f"--ckpt={ckpt}", f"--text={long}", "--max_bytes=4000", "--window=16", f"--json={js}.w16"])
    with sf.quiet():  # without the greedy-flag passes: the same headline, no greedy figures
        fidelity.main([f"--ckpt={ckpt}", f"--text={short}", "--max_bytes=4000", "--greedy=False", f"--json={js}.late"])
    return (json.loads(js.read_text())["texts"]["short.txt"],
            json.loads((tmp_path / "fidelity.json.w16").read_text())["texts"]["long.txt"],
            json.loads((tmp_path / "fidelity.json.late").read_text())["texts"]["short.txt"])


def f1_score(pred, truth):
    """F1 of boolean decisions against the truth (both (N,))."""
    tp = (pred & truth).sum().item()
    precision, recall = tp / max(pred.sum().item(), 1), tp / truth.sum().item()
    return 2 * precision * recall / max(precision + recall, 1e-12)


def test_fidelity_json_against_teacher_and_student_oracles(full, tmp_path):
    out, _ = full
    ckpt = out  # the byte-model folder
    got, got_w16, late_only = run_fidelity(ckpt, tmp_path)
    assert late_only["student_bpb_late"] == got["student_bpb_late"] and late_only["teacher_bpb"] == got["teacher_bpb"]
    assert not any("greedy" in k or "dead_ends" in k for k in late_only)
    for r in (got, got_w16):
        for key in ("teacher_bpb", "teacher_byte_bpb", "teacher_byte_bpb_greedy", "student_token_bpb",
                    "student_bpb_true_patches", "student_bpb_marginal", "teacher_bpb_marginal", "student_bpb_late",
                    "student_bpb_greedy", "student_bpb_greedy_joint",
                    "student_bpb_lookahead", "ratio", "ratio_marginal", "ratio_late", "ratio_greedy",
                    "patcher_f1", "head_f1", "mean_patch_bytes", "bytes_per_token"):
            assert math.isfinite(r[key]), (key, r)
        assert r["ratio"] == pytest.approx(r["student_bpb_marginal"] / r["teacher_bpb"], rel=1e-12)
        assert r["ratio_late"] == pytest.approx(r["student_bpb_late"] / r["teacher_bpb"], rel=1e-12)
        # the marginals keep the true patches and the canonical tokenization: never above those paths' figures
        assert r["student_bpb_marginal"] <= r["student_bpb_true_patches"] * (1 + 1e-5)
        assert r["teacher_bpb_marginal"] <= r["teacher_byte_bpb"] * (1 + 1e-5) <= r["teacher_bpb"] * (1 + 2e-5)
        assert r["ratio_greedy"] == pytest.approx(r["student_bpb_greedy"] / r["teacher_bpb"], rel=1e-12)

    # teacher side: one window of [doc_start] + ids, every token scored; and the same in segments of 15 tokens
    teacher_bpb, encoding = teacher_oracle(SHORT_TEXT, window=512)
    ids = encoding.ids
    assert len(ids) < 511
    assert got["teacher_bpb"] == pytest.approx(teacher_bpb, rel=1e-5)
    assert got["bytes"] == len(SHORT_TEXT.encode()) and got["tokens"] == len(ids)
    assert got["bytes_per_token"] == pytest.approx(len(SHORT_TEXT.encode()) / len(ids), rel=1e-12)
    teacher_bpb_w16, encoding_long = teacher_oracle(long_text(), window=16)
    assert len(encoding_long.ids) > 5 * 15
    assert got_w16["teacher_bpb"] == pytest.approx(teacher_bpb_w16, rel=1e-5)

    # the teacher's exact byte targets along the true flags: its token bits, renormalised over the ids that spell
    # bytes (a random teacher gives its special tokens real probability)
    teacher, tok = teachers.load_teacher(sf.teacher_dir())
    with torch.no_grad():
        logp = torch.log_softmax(teacher(torch.tensor([[tok.doc_start_id, *ids]]))[0, :-1].double(), -1)
    spelled = torch.tensor([i for i in range(tok.n_vocab) if tok.id_to_bytes[i]])
    renormalised = logp.gather(1, torch.tensor(ids)[:, None])[:, 0] - torch.logsumexp(logp[:, spelled], -1)
    assert got["teacher_byte_bpb"] == pytest.approx(-renormalised.sum().item() / math.log(2) / len(SHORT_TEXT.encode()),
                                                    rel=1e-4)
    # the headline: the late-flag model's proper likelihood, and the greedy-flag model's beside it (both tested
    # against full-forward oracles in test_scoring.py)
    student, _ = checkpoint.load_student(ckpt)
    late_logp, late_flags = decoding.late_flag_logprobs(student, [SHORT_TEXT.encode()], decoding.LATE_EPS)[0]
    greedy_logp, greedy_joint, _ = decoding.greedy_flag_logprobs(student, [SHORT_TEXT.encode()])[0]
    n_bytes = len(SHORT_TEXT.encode())
    assert got["student_bpb_late"] == pytest.approx(-late_logp.double().sum().item() / math.log(2) / n_bytes, rel=1e-5)
    assert got["student_bpb_greedy"] == pytest.approx(-greedy_logp.double().sum().item() / math.log(2) / n_bytes,
                                                      rel=1e-5)
    assert got["student_bpb_greedy_joint"] >= got["student_bpb_greedy"]
    assert got["mean_patch_bytes"] == pytest.approx(n_bytes / (late_flags[:-1].sum().item() + 1), rel=1e-12)
    # the old figure, now labelled as lookahead: p(byte) = p(byte, not end) + p(byte, end), patches from the patcher
    x = torch.tensor([[model.BOS_BYTE, *SHORT_TEXT.encode()]])
    with torch.no_grad():
        logits, _, ends = student(x)
    probs = torch.softmax(logits[0, :-1].double(), dim=-1)
    nxt = x[0, 1:]
    p_byte = probs.gather(-1, nxt[:, None])[:, 0] + probs.gather(-1, nxt[:, None] + 256)[:, 0]
    assert got["student_bpb_lookahead"] == pytest.approx(-torch.log2(p_byte).sum().item() / n_bytes, rel=1e-4)
    # boundaries: the patcher's ends against the token ends (HF offsets: byte offsets, the text being ASCII), the
    # last byte excluded (forced to end a patch)
    assert SHORT_TEXT.isascii()
    truth = torch.zeros(n_bytes, dtype=torch.bool)
    truth[torch.tensor([stop - 1 for _, stop in encoding.offsets])] = True
    pred = ends[0, 1:]
    assert 0 < pred.sum().item() < n_bytes  # the patcher cuts real patches
    assert got["patcher_f1"] == pytest.approx(f1_score(pred[:-1], truth[:-1]), rel=1e-9)
    flags = late_flags[:-1]  # the late model's flags, its last byte's never decided
    assert got["head_f1"] == pytest.approx(f1_score(flags, truth[:-1]), rel=1e-9)


def test_fidelity_window_is_capped_at_the_teacher_context(full, tmp_path):
    out, _ = full
    fidelity = load_bench("fidelity")
    text = tmp_path / "context.txt"
    with open(sf.corpus_file(), encoding="utf-8") as f:
        text.write_text(f.read()[20_000:21_100], encoding="utf-8")
    context = teachers.load_teacher(sf.teacher_dir())[0].cfg.max_seq_len
    teacher_bpb, encoding = teacher_oracle(text.read_text(encoding="utf-8"), window=context)
    assert context < len(encoding.ids) < 511  # one default window, two of the teacher's context
    with sf.quiet():
        got = fidelity.main([f"--ckpt={out}", f"--text={text}"])["context.txt"]
    assert got["teacher_bpb"] == pytest.approx(teacher_bpb, rel=1e-5)


def test_generate_json_has_speeds_by_batch_size(full, tmp_path):
    out, _ = full
    generate = load_bench("generate")
    js = tmp_path / "generate.json"
    with sf.quiet():
        generate.main([f"--ckpt={out}", "--new_bytes=8", "--batch_sizes=1,2", f"--json={js}"])
    got = json.loads(js.read_text())
    main_w, byte_w = got["student_weight_bytes"]["per_main_call"], got["student_weight_bytes"]["per_byte_step"]
    assert main_w > 0 and byte_w > 0 and got["teacher_weight_bytes_per_step"] > 0
    for b in ("1", "2"):
        s, t = got["student_bytes_per_s"][b], got["teacher_bytes_per_s"][b]
        assert math.isfinite(s) and s > 0 and math.isfinite(t) and t > 0
        assert got["ratio"][b] == pytest.approx(s / t, rel=1e-12)
        assert 1.0 <= got["student_rows_per_main_call"][b] <= int(b)
        # every generated byte took one byte step of its row, and a byte step serves at most b rows
        assert got["student_reads_per_byte"][b] >= byte_w / int(b)
        assert got["reads_ratio"][b] == pytest.approx(got["teacher_reads_per_byte"][b] / got["student_reads_per_byte"][b])
        assert got["lockstep_ratio"][b] == pytest.approx(got["lockstep_bytes_per_s"][b] / t, rel=1e-12)
        assert got["late_ratio"][b] == pytest.approx(got["late_bytes_per_s"][b] / t, rel=1e-12)
        assert 0.0 < got["late_main_rows_per_byte"][b] <= 1.0  # at most one main-network step per row and byte
        assert got["held_out_ratio"][b] == pytest.approx(s / got["held_out_teacher_bytes_per_s"][b], rel=1e-12)
    assert got["steady_student_rows_per_main_call"]["2"] == 2.0  # a full batch: every call takes both rows
    assert got["steady_ratio"]["2"] == pytest.approx(
        got["steady_student_bytes_per_s"]["2"] / got["steady_teacher_bytes_per_s"]["2"], rel=1e-12)
    assert "1" not in got["steady_ratio"]
    assert 1.0 < got["teacher_bytes_per_token"] < 10.0


def test_preset_weight_reads(tmp_path):
    """bench/memory.py's weight-read arithmetic for every preset: with the prior the student's main-network call reads
    what the teacher reads per token but its one input-embedding row (the prior is the teacher's output layer); the
    break-even patch length makes the two reads per byte equal; the ratio is the one at patches as long as tokens."""
    js = tmp_path / "memory.json"
    with sf.quiet():
        memory = load_bench("memory")
        memory.main(["--n_enc=2", "--n_dec=2", "--bytes_per_token=4.3", "--prior_rows=16384", "--activations=False",
                     f"--json={js}"])
    rows = json.loads(js.read_text())["rows"]
    # the README's paper-scale plan adds up to its "about 125B bytes", and a larger teacher costs more GPU-hours
    assert sum(memory.PLAN_BYTES.values()) == 125e9
    hours = {r["preset"]: r["plan_gpu_hours"] for r in rows}
    assert hours["smollm2"] < hours["olmo"] < hours["llama"] < hours["qwen"]
    assert {r["preset"] for r in rows} == {"smollm2", *teachers.PRESETS}
    for r in rows:
        call, byte_step, token = (r["student_read_per_main_call"], r["student_read_per_byte_step"],
                                  r["teacher_read_per_token"])
        d_model = memory.teacher_config(r["preset"])[0].d_model
        assert token - call == 4 * d_model, r["preset"]  # fp32 on the meta device: one embedding row of d_model
        assert r["reads_ratio"] == pytest.approx((token / 4.3) / (call / 4.3 + byte_step), rel=1e-12)
        assert r["reads_ratio_no_prior"] > r["reads_ratio_prior_rows"] > r["reads_ratio"]  # 16,384 of 49K+ rows
        p = r["break_even_patch_bytes"]
        assert call / p + byte_step == pytest.approx(token / 4.3, rel=1e-12)


# ----------------------------------------------------------------------------------------------------------------

def test_bad_init_is_one_clear_error_line(tmp_path):
    """As a user runs it: a missing --init and a file that is not a checkpoint end with one 'error:' line."""
    not_ckpt = tmp_path / "notes.txt"
    not_ckpt.write_text("not a checkpoint\n")
    cases = {"missing": (tmp_path / "missing", "no checkpoint at"),
             "text file": (not_ckpt, "not a byte-student checkpoint")}
    procs = {name: subprocess.Popen([sys.executable, "stage2_sft.py", f"--init={path}", f"--data_dir={sf.shard_dir()}",
                                     f"--out_dir={tmp_path / 'out'}", *TINY_STAGE2], cwd=sf.REPO, env=ENV,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (path, _) in cases.items()}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode != 0, (name, stdout, stderr)
        assert "Traceback" not in stderr, (name, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, stderr)
        assert cases[name][1] in stderr and str(cases[name][0]) in stderr, (name, stderr)
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


def test_other_bad_inputs_raise_the_errors_the_script_reports(stage1, tmp_path):
    """More cases in this process: the script turns ValueError / FileNotFoundError into its 'error:' line (above)."""
    import stage2_sft
    not_student = tmp_path / "dict"  # both files, but config.json describes no byte student
    not_student.mkdir()
    (not_student / "config.json").write_text(json.dumps({"stage": 1, "weights": [1, 2, 3]}))
    shutil.copy(os.path.join(stage1, "model.safetensors"), not_student / "model.safetensors")
    stage7 = tmp_path / "stage7"
    sf.copy_checkpoint(stage1, str(stage7))
    (stage7 / "config.json").write_text(json.dumps({**sf.read_json(os.path.join(stage1, "config.json")), "stage": 7}))
    cases = [  # --init, extra args, expected error, message
        (not_student, (), ValueError, "not a byte-student checkpoint"),
        (os.path.join(sf.teacher_dir(), "model.safetensors"), (), ValueError, "not a byte-student checkpoint"),
        (sf.teacher_dir(), (), ValueError, "not a byte-student checkpoint"),  # an HF folder: the same two file names
        (stage7, (), ValueError, "is not a stage-1 checkpoint"),
        (stage1, ("--resume", f"--out_dir={stage1}"), ValueError, "not a stage-2 checkpoint"),
        (stage1, ("--resume", f"--out_dir={tmp_path / 'empty'}"), FileNotFoundError,
         "no checkpoint at"),
        (stage1, ("--phase=decoder",), ValueError, "--phase must be"),
    ]
    for init, extra, error, message in cases:
        argv = [f"--init={init}", f"--data_dir={sf.shard_dir()}", f"--out_dir={tmp_path / 'out'}", *TINY_STAGE2, *extra]
        with sf.threads(1), sf.quiet(), pytest.raises(error, match=re.escape(message)):
            stage2_sft.main(argv)
