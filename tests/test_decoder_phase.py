"""Stage 1's optional decoder phase: the output side learns from the teacher's hidden states and exact byte targets.
It trains only the output side and its losses fall."""
import math
import os

import pytest

import model
import stage_fixtures as sf

DECODER_RUN = ["--align_bytes=2560", "--distill_bytes=1280", "--boundary_bytes=1280", "--decoder_bytes=40000",
               "--decoder_lr=1e-2", "--eval_batches=4"]


@pytest.fixture(scope="module")
def decoder_run():
    out = sf.tmp_dir("decoder")
    results, _ = sf.run_stage1(out, *DECODER_RUN)
    return out, results


def test_decoder_phase_trains_only_the_output_side(decoder_run):
    out, _ = decoder_run
    before, after = sf.load_params(os.path.join(out, "boundary")), sf.load_params(os.path.join(out, "decoder"))
    changed = {name for name in after if (after[name] - before[name]).abs().max().item() > 0}
    assert changed and all(name.startswith(model.ByteLM.OUTPUT_SIDE) for name in changed), sorted(changed)[:5]
    assert any(name.startswith("decoder.") for name in changed) and any(name.startswith("head.") for name in changed)


def test_decoder_phase_loss_falls(decoder_run):
    out, results = decoder_run
    steps = sf.read_metrics(out, "decoder")
    first, last = steps[:5], steps[-5:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "bpb_joint") < 0.8 * mean(first, "bpb_joint")
    assert mean(last, "kl_bits") < 0.8 * mean(first, "kl_bits")
    val = results["decoder"]["val"]
    # the teacher through its own targets along the true flags (its token bits per byte: tests/test_targets.py)
    assert math.isfinite(val["teacher_bpb_joint"]) and val["teacher_bpb_joint"] > 0
    assert val["kl_bits"] < mean(first, "kl_bits")
