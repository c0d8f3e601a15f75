"""The byte-head prior through both stages (stage1_kd.py --prior=True, then stage2_sft.py): the prior's buffers are
the teacher's output layer and vocabulary and no phase trains them, stage 2 resumes exactly and 2 DDP ranks match one
process, as without the prior. Oracles: the teacher's own weights and tokenizer; an uninterrupted run; a single
process (test_stage2.run_ddp_and_single, its tolerances)."""
import os

import pytest
import torch

import checkpoint
import model
import stage_fixtures as sf
from teacher import load_teacher
from test_stage2 import STAGE1, load_bench, run_ddp_and_single, run_stage2

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


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
    run_ddp_and_single(stage1, "prior-stage2")


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
