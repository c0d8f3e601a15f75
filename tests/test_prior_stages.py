"""The byte-head prior through both stages (stage1_kd.py --prior=True, then stage2_sft.py): the prior's buffers are
the teacher's output layer and vocabulary and no phase trains them, stage 2 resumes exactly and 2 DDP ranks match one
process, as without the prior. Oracles: the teacher's own weights and tokenizer; an uninterrupted run; a single
process (the same tolerances as tests/test_stage2.py)."""
import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import model
import stage_fixtures as sf
from teacher import load_teacher
from test_stage2 import DDP_ARGS, DDP_PARAM_ATOL, DDP_REL, ENV, STAGE1, BATCH, load_bench, run_stage2, stage2_args


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def stage1():
    out = sf.tmp_dir("prior-stage1")
    sf.run_stage1(out, *STAGE1, "--prior=True", "--subword=True", "--decoder_bytes=1024")
    return out


@pytest.fixture(scope="module")
def full(stage1):
    out = sf.tmp_dir("prior-stage2-full")
    results, _ = run_stage2(stage1, out)
    return out, results


def test_the_prior_is_the_teachers_output_layer_and_no_phase_trains_it(stage1, full):
    teacher, tok = load_teacher(sf.teacher_dir())
    entries, ids = model.prior_vocabulary(tok.id_to_bytes)
    student, meta = checkpoint.load_student(full[0])
    assert meta["student_config"]["prior_vocab"] == len(entries) > 0
    assert torch.equal(student.prior_head, teacher.head_weight.float()[torch.tensor(ids)])
    assert bytes(student.prior_vocab_bytes.tolist()) == b"".join(entries)
    assert student.vocab.trie.n_nodes > len(entries) // 2
    assert "prior_head" not in dict(student.named_parameters())  # a buffer: never in an optimizer
    assert student.scfg.subword  # the default: the input embedding rows of the same entries, then the start token's
    rows = torch.tensor(ids + [tok.doc_start_id])
    assert torch.equal(student.subword_embed, teacher.embed_tokens.weight.float()[rows])
    first = checkpoint.load_student(os.path.join(stage1, "align"))[0]
    assert first.prior_scale.item() == 1.0 and student.prior_scale.item() != 1.0  # learned in the output-side phases
    assert full[1]["warmup"]["val"]["bpb_joint"] < 8.0


def test_resume_with_the_prior_continues_exactly(stage1, full):
    ref_out, ref_results = full
    out = sf.tmp_dir("prior-stage2-resume")
    run_stage2(stage1, out, "--stop_after=5")
    run_stage2(stage1, out, "--resume", "--stop_after=10")
    results, log = run_stage2(stage1, out, "--resume")
    assert "resuming from" in log
    assert sf.read_metrics(out) == sf.read_metrics(ref_out)
    assert {p: r["val"] for p, r in results.items()} == {p: r["val"] for p, r in ref_results.items()}
    assert sf.max_param_diff(sf.load_params(out), sf.load_params(ref_out)) == 0.0


def test_ddp_with_the_prior_matches_single_process(stage1):
    single, ddp = sf.tmp_dir("prior-stage2-single"), sf.tmp_dir("prior-stage2-ddp")
    run_stage2(stage1, single, *DDP_ARGS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", sf.__file__,
           "stage2_sft", *stage2_args(stage1, ddp, *DDP_ARGS, f"--batch_size={BATCH // 2}")]
    proc = subprocess.run(cmd, cwd=sf.REPO, env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = sf.read_metrics(single), sf.read_metrics(ddp)
    assert [(r["phase"], r["step"]) for r in a] == [(r["phase"], r["step"]) for r in b] and a
    for ra, rb in zip(a, b):
        for key in ra.keys() - {"phase", "step"}:
            assert rb[key] == pytest.approx(ra[key], rel=DDP_REL, abs=DDP_REL), (ra["phase"], ra["step"], key)
    assert sf.max_param_diff(sf.load_params(single), sf.load_params(ddp)) < DDP_PARAM_ATOL


def test_fidelity_prior_rows_restricts_the_prior(full, tmp_path):
    """--prior_rows: keeping every entry scores as the full prior does; keeping the single bytes only changes the
    student's figures (and not the teacher's), and the kept entries are the single bytes plus the requested rows."""
    out, _ = full
    fidelity = load_bench("fidelity")
    text = tmp_path / "prose.txt"
    with open(sf.corpus_file(), encoding="utf-8") as f:
        text.write_text(f.read()[5_000:5_400], encoding="utf-8")
    args = [f"--ckpt={out}", f"--text={text}", "--greedy=False", f"--shards={sf.shard_dir()}"]
    with sf.quiet():
        full_prior = fidelity.main(args)["prose.txt"]
        every = fidelity.main(args + ["--prior_rows=1000000"])["prose.txt"]
        bytes_only = fidelity.main(args + ["--prior_rows=1"])["prose.txt"]
    assert every["student_bpb_late"] == full_prior["student_bpb_late"]
    assert bytes_only["teacher_bpb"] == full_prior["teacher_bpb"]
    assert bytes_only["student_bpb_late"] != pytest.approx(full_prior["student_bpb_late"], rel=1e-4)
    student = checkpoint.load_student(out)[0]
    tok = load_teacher(sf.teacher_dir())[1]
    singles = sum(len(e) == 1 for e in student.vocab.entries)
    kept, share = fidelity.restrict_prior(student, tok, sf.shard_dir(), 5)
    assert singles < kept <= singles + 5 and 0.0 < share < 1.0
    with pytest.raises(FileNotFoundError, match="no training shards"):
        fidelity.restrict_prior(student, tok, str(tmp_path), 5)
