"""Host syncs in a training step. On a GPU every Tensor.item / .tolist / bool / int / float of a device tensor waits
for the device to finish all queued work. The training loop (train.train_step, train.StepLog) keeps the metric sums and
the gradient norm as tensors and reads them to the host once per logging step, one .tolist(), never on the steps in
between; the gradient all-reduce (distributed.GradReducer) runs during backward.

The test counts the calls of those five methods (monkeypatched on torch.Tensor, on the CPU) during the non-logging
optimizer steps of every phase (log_interval is larger than the phase), in two settings that differ in batch size and
gradient accumulation: train.py, distributed.py and the stage scripts read nothing on such a step, and what remains is
inside the student's forward and the teacher's targets (files others own), once per micro-step, for shapes:
  stage 1 align     none (encode(at=ends) picks the token-end rows by a boolean mask)
  stage 1 distill   model.patch_order's int(counts.max()) (the most patches in a row), twice: run_main, and
                    distill_step's token ids
  stage 1 boundary  none
  stage 1 decoder   model.patch_order once; at the last commit also targets.py's widest trie node
                    (int(count.max())) and chunk bounds (.tolist()), once each (one chunk of kl_chunk_rows here)
  stage 2 warmup    model.patch_order once (run_main, in the student's forward)
  stage 2 e2e       the same
Not counted: the optimizer's own reads (non-fused AdamW reads its step counters, CPU tensors even when the
parameters are on a GPU, so no wait for the device; on CUDA make_optimizer picks fused AdamW, which reads none), and
boolean mask indexing (x[mask]), which waits for the device too (the mask's count sizes the result) but is no call.
The fixtures train the pure learned head (--prior=False --subword=False); the prior's and subword table's code in
model.py is outside this count.
"""
import collections
import contextlib
import json
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed
import stage_fixtures as sf
import train

COUNTED = ("item", "tolist", "__bool__", "__int__", "__float__")
HERE = os.path.dirname(os.path.abspath(__file__))
SHAPE_FILES = ("model.py", "targets.py", "transformer.py", "losses.py")  # the forward and the targets: shapes
# At most this many reads from SHAPE_FILES per micro-step (see the docstring; fewer is fine).
SHAPE_READS = {"align": 0, "distill": 2, "boundary": 0, "decoder": 3, "warmup": 1, "e2e": 1}
OPTIMIZER = "torch.optim"


def caller_site():
    """(file, function) of the innermost repo frame (outside torch and the tests) that made the call; ("torch.optim",
    function) for the optimizer's own reads (see OPTIMIZER)."""
    frame = sys._getframe(2)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if f"torch{os.sep}optim{os.sep}" in path:
            return "torch.optim", frame.f_code.co_name
        if path.startswith(sf.REPO) and not path.startswith(HERE) and ".venv" not in path:
            return os.path.relpath(path, sf.REPO), frame.f_code.co_name
        frame = frame.f_back
    return "?", "?"


@contextlib.contextmanager
def counting_syncs():
    """Counts COUNTED calls between the optimizer steps of run_phases -> {phase index: [Counter of sites, per step]}.
    A step runs from one set_lr call (run_phases's first call in a step) to the next one of the same optimizer."""
    calls, marks, originals = [], [], {name: getattr(torch.Tensor, name) for name in COUNTED}

    def counted(original):
        def wrapper(self, *args, **kwargs):
            calls.append(caller_site())
            return original(self, *args, **kwargs)
        return wrapper
    set_lr = train.set_lr

    def marked_set_lr(optimizer, lr):
        marks.append((id(optimizer), len(calls)))
        set_lr(optimizer, lr)
    steps = {}
    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counted(original))
        train.set_lr = marked_set_lr
        yield steps
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        train.set_lr = set_lr
    order = list(dict.fromkeys(opt for opt, _ in marks))  # optimizers in the order of their phases
    for (opt, start), (next_opt, end) in zip(marks, marks[1:]):
        if opt == next_opt:
            steps.setdefault(order.index(opt), []).append(collections.Counter(calls[start:end]))


STEPS = 4  # per phase: step 0 logs (step % log_interval == 0), steps 1 and 2 are counted, step 3 logs (the last)
SETTINGS = [(2, 1), (4, 2)]  # (batch_size, grad_accum)
SEQ = 64
STAGE1, STAGE2 = ("align", "distill", "boundary", "decoder"), ("warmup", "e2e")


def budgets(batch_size, grad_accum, names):
    return [f"--{name}_bytes={STEPS * batch_size * grad_accum * SEQ}" for name in names]


def stage1_counts(out, batch_size, grad_accum):
    """Stage 1's four phases, STEPS steps each -> {phase: [Counter of sites, per step but the last]}."""
    with counting_syncs() as steps:
        sf.run_stage1(out, f"--batch_size={batch_size}", f"--grad_accum={grad_accum}", f"--seq_len={SEQ}",
                      "--eval_batches=1", "--log_interval=1000", "--kl_chunk_rows=1024",
                      *budgets(batch_size, grad_accum, STAGE1))
    return {name: steps[i] for i, name in enumerate(STAGE1)}


def stage2_counts(init, out, batch_size, grad_accum):
    """Stage 2's two phases from the stage-1 folder init -> {phase: [Counter of sites, per step but the last]}."""
    import stage2_sft
    args = [f"--init={init}", f"--data_dir={sf.shard_dir()}", f"--out_dir={out}", "--dtype=float32", "--device=cpu",
            f"--batch_size={batch_size}", f"--grad_accum={grad_accum}", f"--seq_len={SEQ}", "--eval_batches=1",
            "--log_interval=1000", *budgets(batch_size, grad_accum, STAGE2)]
    with counting_syncs() as steps, sf.threads(1), sf.quiet():
        stage2_sft.main(args)
    return {name: steps[i] for i, name in enumerate(STAGE2)}


def all_counts():
    """{(batch_size, grad_accum): {phase: [Counter of sites, per step but the last]}} for both stages (~10 s)."""
    counts = {}
    for batch_size, grad_accum in SETTINGS:
        out = sf.tmp_dir(f"syncs{batch_size}x{grad_accum}")
        counts[batch_size, grad_accum] = stage1_counts(out, batch_size, grad_accum)
        counts[batch_size, grad_accum].update(stage2_counts(out, sf.tmp_dir("syncs2"), batch_size, grad_accum))
    return counts


@pytest.fixture(scope="module")
def counts():
    return all_counts()


def split(counter):
    """A step's Counter of sites -> (reads in the forward and targets, reads anywhere else but the optimizer)."""
    shapes = sum(k for (file, _), k in counter.items() if file in SHAPE_FILES)
    others = {site: k for site, k in counter.items() if site[0] not in SHAPE_FILES and site[0] != OPTIMIZER}
    return shapes, others


@pytest.mark.parametrize("phase", STAGE1 + STAGE2)
def test_a_non_logging_step_reads_only_shapes_in_the_forward(counts, phase):
    """Steps 1 and 2: nothing read by the training loop, the gradient sync or the phase's step function; the forward's
    shape reads once per micro-step, as many at batch 4 x 2 micro-steps as at batch 2 x 1, and no more than listed."""
    per_micro_step = set()
    for (batch_size, grad_accum), phases in counts.items():
        steps = phases[phase][1:STEPS - 1]
        assert len(steps) == STEPS - 2, (batch_size, grad_accum, len(phases[phase]))
        for counter in steps:
            shapes, others = split(counter)
            assert others == {}, (batch_size, grad_accum, others)
            assert shapes % grad_accum == 0, (batch_size, grad_accum, counter)
            per_micro_step.add(shapes // grad_accum)
    assert len(per_micro_step) == 1 and per_micro_step.pop() <= SHAPE_READS[phase], counts


@pytest.mark.parametrize("phase", STAGE1 + STAGE2)
def test_a_logging_step_reads_its_sums_once(counts, phase):
    """Step 0 logs: one .tolist() of the stacked sums and gradient norm (StepLog.flush), whatever the batch."""
    for setting, phases in counts.items():
        assert split(phases[phase][0])[1] == {("train.py", "flush"): 1}, (setting, phases[phase][0])


# ----------------------------------------------------------------------------------------------------------------
# GradReducer against the sum of both ranks' gradients, on two gloo processes: several buckets, gradient accumulation
# (no all-reduce before the last micro-step), a parameter used only in the first micro-step (its bucket starts in
# wait()), one never used (no gradient: stays None, as on one process), and two steps (the second reuses the buckets).

def toy_params():
    """Bucketed in reverse order at 600 bytes: [b3, w3], [w2], [b1, w1, unused], [first_only]."""
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape)) for shape in [(16,), (3,), (8, 16), (16,), (16, 16), (16, 4), (4,)]]


def toy_loss(params, step, micro, rank):
    first_only, _unused, w1, b1, w2, w3, b3 = params  # _unused never enters the loss
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(100 * step + 10 * micro + rank))
    h = torch.tanh(x @ w1 + b1)
    if micro == 0:
        h = h + first_only
    return ((torch.tanh(h @ w2) @ w3 + b3) ** 2).sum()


def reducer_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        params = toy_params()
        reducer = distributed.GradReducer(params, bucket_bytes=600)
        report = {"buckets": len(reducer.buckets), "grads": [], "started_in_backward": []}
        for step in range(2):
            for micro in range(2):
                reducer.sync = micro == 1
                toy_loss(params, step, micro, rank).backward()
                if reducer.sync:
                    report["started_in_backward"].append(reducer.next)
            reducer.wait()
            report["grads"].append([None if p.grad is None else p.grad.tolist() for p in params])
            for p in params:
                p.grad = None
        reducer.remove()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_grad_reducer_sums_the_ranks_gradients(tmp_path):
    # fork: the ranks start in a moment (no second import of torch); nothing here has touched a GPU
    mp.start_processes(reducer_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for step in range(2):  # the oracle: both ranks' losses, both micro-steps, backpropagated in this process
        params = toy_params()
        sum(toy_loss(params, step, micro, rank) for rank in range(2) for micro in range(2)).backward()
        for rank in range(2):
            got = results[rank]["grads"][step]
            assert got[1] is None and params[1].grad is None, "a parameter without a gradient keeps none"
            for i in (0, *range(2, len(params))):
                torch.testing.assert_close(torch.tensor(got[i]), params[i].grad, rtol=1e-6, atol=1e-6)
    for rank in range(2):
        # the buckets of parameters that the last micro-step reaches start during its backward, before wait()
        assert results[rank]["buckets"] == 4 and results[rank]["started_in_backward"] == [2, 2], results[rank]


if __name__ == "__main__":  # PYTHONPATH=. python tests/test_syncs.py: the counts per phase and setting
    for setting, phases in all_counts().items():
        for phase, per_step in phases.items():
            print(f"batch {setting[0]} x {setting[1]} micro-steps, {phase}: per step (the optimizer's step counters "
                  f"apart) {[sum(split(c)[1].values()) + split(c)[0] for c in per_step]}; "
                  f"{dict(sum(per_step, collections.Counter()))}")
