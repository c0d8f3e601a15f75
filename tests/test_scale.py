"""What a paper-scale step needs, checked on CPU against the plain code path: sliding-window attention in blocks
equals the dense (T, T)-mask attention it replaces, and its saved activations grow linearly in T; activation
checkpointing (ByteLM.recompute_blocks) gives the same losses and gradients while saving far fewer activations."""
import pytest
import torch
import torch.nn.functional as F

from model import byte_logprobs
from test_student import build_student, build_teacher, random_bytes
from transformer import banded_attention


def dense_window_attention(q, k, v, window):
    """The oracle: one (T, T) mask, query i sees keys i - window < j <= i."""
    T = q.shape[2]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (j > i - window), enable_gqa=True)


def saved_bytes(fn):
    """Bytes of the tensors autograd saves for backward while fn() runs (storage counted once)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.parametrize("T, window, heads, kv_heads", [(37, 8, 4, 2), (16, 8, 2, 2), (9, 8, 2, 1), (100, 7, 2, 2),
                                                        (8, 8, 1, 1)])
def test_banded_attention_equals_the_dense_mask(T, window, heads, kv_heads):
    g = torch.Generator().manual_seed(T)
    q = torch.randn(2, heads, T, 6, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(2, kv_heads, T, 6, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(2, kv_heads, T, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(2, heads, T, 6, dtype=torch.float64, generator=g)
    ref = dense_window_attention(q, k, v, window)
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    got = banded_attention(q, k, v, window)
    got_grads = torch.autograd.grad((got * w).sum(), (q, k, v))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_banded_attention_memory_is_linear_in_T():
    """The dense mask's memory grows as T^2; the blocks' as T: saved bytes per position stay flat from 8 to 32 windows."""
    def per_position(T, window=16):
        q, k, v = (torch.randn(1, 2, T, 8, requires_grad=True) for _ in range(3))
        total, _ = saved_bytes(lambda: banded_attention(q, k, v, window))
        return total / T
    assert per_position(32 * 16) == pytest.approx(per_position(8 * 16), rel=0.02)


def stage2_loss(student, x):
    logits, p, _ = student(x)
    logp = byte_logprobs(logits[:, :-1]).gather(-1, x[:, 1:, None])
    return -logp.mean() + p.mean()


def test_checkpointing_gives_the_same_losses_and_gradients():
    teacher = build_teacher()
    student = build_student(teacher).double()
    x = random_bytes((2, 40), seed=5)  # five sliding windows: the banded path runs
    plain = {}
    for recompute in (False, True):
        student.recompute_blocks(recompute)
        student.zero_grad()
        saved, loss = saved_bytes(lambda: stage2_loss(student, x))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        if not recompute:
            plain = {"loss": loss.detach(), "grads": grads, "saved": saved}
            continue
        torch.testing.assert_close(loss.detach(), plain["loss"], rtol=0, atol=1e-12)
        assert grads.keys() == plain["grads"].keys() and len(grads) > 20
        for n, g in grads.items():
            torch.testing.assert_close(g, plain["grads"][n], rtol=0, atol=1e-9, msg=n)
        assert saved < plain["saved"] / 2  # what the blocks' insides saved is gone (the full measurement: bench/scale.py)
    student.recompute_blocks(False)
    with torch.no_grad():  # no gradient, no recomputation: inference is unaffected
        student.recompute_blocks(True)
        torch.testing.assert_close(student(x)[0], student.recompute_blocks(False)(x)[0], rtol=0, atol=0)


def test_gpu_step_script_runs_every_phase_on_cpu(tmp_path):
    """bench/gpu_step.py is meant for a lent GPU: its plumbing (every phase's step through the stage scripts' step
    functions, the FLOP count, the JSON) is checked here at a toy shape, so that device time is not spent on a typo."""
    import importlib.util
    import json
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "gpu_step.py")
    spec = importlib.util.spec_from_file_location("bench_gpu_step", path)
    gpu_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_step)
    out = tmp_path / "step.json"
    gpu_step.main(["--device=cpu", "--preset=smollm2", "--batch_size=1", "--seq_len=64", "--main_layers=1",
                   "--n_enc=1", "--n_dec=1", "--vocab_entries=300", "--kl_chunk_rows=16", f"--json={out}"])
    rows = json.loads(out.read_text())["phases"]
    assert list(rows) == ["align", "distill", "boundary", "warmup", "e2e"]
    for r in rows.values():
        assert r["bytes_per_s"] > 0 and r["model_tflops"] > 0
    # the main network runs in distill and e2e only: they cost the most FLOPs per step
    assert min(rows["distill"]["model_tflops"], rows["e2e"]["model_tflops"]) > rows["boundary"]["model_tflops"]
