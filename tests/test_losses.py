"""losses.py against its oracles: F.cross_entropy / F.kl_div in fp32 for the byte loss, the full-logits formula
for the chunked reverse KL. On CPU the Triton kernels run in the interpreter (conftest sets TRITON_INTERPRET=1
before anything imports losses.py); on a GPU machine the same tests run the compiled kernels."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import losses

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not losses._use_triton(torch.empty(0, device=DEVICE)),
                                  reason="no CUDA and no TRITON_INTERPRET=1: the Triton path cannot run here")


def make_logits(n_rows, vocab, dtype, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_rows, vocab, generator=gen) * scale
    targets = torch.randint(0, vocab, (n_rows,), generator=gen)
    return logits.to(DEVICE, dtype), targets.to(DEVICE)


def loss_and_grad(fn, logits, targets, grad_output=1.0, **kwargs):
    """Runs fn(logits, targets, **kwargs), backward with grad_output; returns (loss fp32, grad in logits' dtype)."""
    x = logits.detach().clone().requires_grad_()
    loss = fn(x * 1, targets, **kwargs)  # `* 1`: a non-leaf, as the output of the byte head would be
    loss.backward(torch.tensor(grad_output, device=loss.device, dtype=loss.dtype))
    return loss.detach().float(), x.grad


def kernel_ce(logits, targets, **kwargs):
    loss = losses.byte_cross_entropy(logits, targets, **kwargs)
    assert type(loss.grad_fn).__name__ == "_ByteCrossEntropyBackward", "the Triton path was not taken"
    return loss


def torch_ce(logits, targets, ignore_index=-100):
    return F.cross_entropy(logits, targets, ignore_index=ignore_index)  # PyTorch in the input's own dtype


# ----------------------------------------------------------------------------------------------------------------
# byte_cross_entropy: the kernel

@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [256, 512])
@pytest.mark.parametrize("n_rows", [1, 7, 257, 1000])
def test_kernel_error_no_worse_than_pytorch_in_same_dtype(n_rows, vocab, dtype):
    logits, targets = make_logits(n_rows, vocab, dtype, seed=n_rows + vocab)
    if n_rows > 1:
        targets[::5] = -100  # some ignored rows in every case with more than one row
    # Oracle: F.cross_entropy in fp32 on exactly the same (already rounded) inputs.
    ref_loss, ref_grad = loss_and_grad(torch_ce, logits.float(), targets)
    k_loss, k_grad = loss_and_grad(kernel_ce, logits, targets)
    t_loss, t_grad = loss_and_grad(torch_ce, logits, targets)
    assert k_grad.dtype == dtype and k_loss.isfinite()
    k_loss_err, t_loss_err = (k_loss - ref_loss).abs().item(), (t_loss - ref_loss).abs().item()
    k_grad_err = (k_grad.float() - ref_grad).abs().max().item()
    t_grad_err = (t_grad.float() - ref_grad).abs().max().item()
    assert k_loss_err <= t_loss_err + 1e-5 * (1 + ref_loss.abs().item()), (k_loss_err, t_loss_err)
    assert k_grad_err <= t_grad_err + 1e-6, (k_grad_err, t_grad_err)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_peaked_and_extreme_logits(dtype):
    n_rows, vocab = 64, 512
    gen = torch.Generator().manual_seed(1)
    logits = (torch.rand(n_rows, vocab, generator=gen) * 2 - 1) * 1e4  # magnitudes up to 1e4: naive exp overflows
    peaks = torch.randint(0, vocab, (n_rows,), generator=gen)
    logits[torch.arange(n_rows), peaks] = 1e4  # a one-hot-like softmax in every row
    logits[: n_rows // 4] = -1e4  # uniform rows at a huge negative offset
    logits[n_rows // 4: n_rows // 2, 7] = 2e4
    targets = torch.where(torch.arange(n_rows) % 2 == 0, peaks, (peaks + 1) % vocab)  # right and far-off targets
    logits, targets = logits.to(DEVICE, dtype), targets.to(DEVICE)
    ref_loss, ref_grad = loss_and_grad(torch_ce, logits.float(), targets)
    k_loss, k_grad = loss_and_grad(kernel_ce, logits, targets)
    assert torch.isfinite(k_loss) and torch.isfinite(k_grad.float()).all()
    assert ref_loss.item() > 1e3  # the far-off targets cost ~1e4 nats: a case where overflow would show
    torch.testing.assert_close(k_loss, ref_loss, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(k_grad.float(), ref_grad, rtol=1e-2, atol=1e-6)  # bf16 storage: 2^-8 relative


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_ignored_rows(dtype):
    logits, targets = make_logits(300, 512, dtype, seed=3)
    ignored = torch.arange(300, device=DEVICE) % 3 == 1
    targets[ignored] = -1  # a non-default ignore_index
    k_loss, k_grad = loss_and_grad(kernel_ce, logits, targets, ignore_index=-1)
    ref_loss, ref_grad = loss_and_grad(lambda x, t: torch_ce(x, t, ignore_index=-1), logits.float(), targets)
    torch.testing.assert_close(k_loss, ref_loss, rtol=1e-5, atol=1e-5)  # the mean is over the 200 valid rows
    assert (k_grad[ignored] == 0).all() and (k_grad[~ignored] != 0).any()
    torch.testing.assert_close(k_grad.float(), ref_grad, rtol=1e-2, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_all_rows_ignored_gives_zero_not_nan(dtype):
    logits, targets = make_logits(257, 512, dtype, scale=1e4, seed=4)
    targets[:] = -100
    k_loss, k_grad = loss_and_grad(kernel_ce, logits, targets, z_loss=1e-4)
    assert k_loss.item() == 0.0 and (k_grad == 0).all()
    ref_loss, ref_grad = loss_and_grad(losses.byte_cross_entropy_reference, logits, targets, z_loss=1e-4)
    assert ref_loss.item() == 0.0 and (ref_grad == 0).all()


@needs_triton
@pytest.mark.parametrize("grad_output", [-0.25, 3.5])
def test_kernel_grad_output_scales_gradient(grad_output):
    logits, targets = make_logits(100, 512, torch.float32, seed=5)
    k_loss, k_grad = loss_and_grad(kernel_ce, logits, targets, grad_output=grad_output, z_loss=1e-3)
    ref_loss, ref_grad = loss_and_grad(losses.byte_cross_entropy_reference, logits, targets, grad_output=grad_output,
                                       z_loss=1e-3)
    torch.testing.assert_close(k_grad, ref_grad, rtol=1e-5, atol=1e-7)


@needs_triton
def test_kernel_grad_output_inside_a_larger_graph():
    """The loss is one term of a sum, scaled, through a Linear head: the gradient reaching the weight must match."""
    torch.manual_seed(6)
    hidden = torch.randn(50, 32, device=DEVICE)
    targets = torch.randint(0, 512, (50,), device=DEVICE)
    grads = []
    for fn in (kernel_ce, losses.byte_cross_entropy_reference):
        torch.manual_seed(7)  # the same head for both
        head = torch.nn.Linear(32, 512, device=DEVICE)
        (0.3 * fn(head(hidden), targets) + 0.1 * head.weight.square().sum()).backward()
        grads.append(head.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("z_loss,soft_weight", [(1e-2, 0.0), (0.0, 0.5), (1e-3, 0.7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_z_loss_and_soft_targets_match_reference(z_loss, soft_weight, dtype):
    logits, targets = make_logits(133, 512, dtype, seed=8)
    targets[::4] = -100
    gen = torch.Generator().manual_seed(9)
    soft = torch.softmax(torch.randn(133, 512, generator=gen) * 2, dim=-1)
    soft[:, ::3] = 0.0  # zero probabilities exercise the 0 * log 0 = 0 branch
    soft = (soft / soft.sum(-1, keepdim=True)).to(DEVICE)
    kwargs = dict(z_loss=z_loss, soft_targets=soft, soft_weight=soft_weight)
    k_loss, k_grad = loss_and_grad(kernel_ce, logits, targets, **kwargs)
    ref_loss, ref_grad = loss_and_grad(losses.byte_cross_entropy_reference, logits, targets, **kwargs)
    torch.testing.assert_close(k_loss, ref_loss, rtol=1e-5, atol=1e-5)
    # In bf16 both round the same fp32 gradient once (the reference's autograd casts back to bf16): 1 ulp apart.
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-7)
    torch.testing.assert_close(k_grad.float(), ref_grad.float(), **tol)


@needs_triton
def test_kernel_non_contiguous_inputs():
    logits, targets = make_logits(90, 512, torch.float32, seed=10)
    wide = torch.randn(90, 700, device=DEVICE)
    wide[:, 100:612] = logits  # rows with a stride of 700: handled in place by the kernel
    transposed = logits.t().contiguous().t()  # column stride 90: copied to contiguous first
    strided_targets = torch.stack([targets, targets], 1)[:, 0]  # a non-contiguous targets vector
    assert not wide[:, 100:612].is_contiguous() and not transposed.is_contiguous()
    assert not strided_targets.is_contiguous()
    ref_loss, ref_grad = loss_and_grad(torch_ce, logits, targets)
    for source in (wide, transposed):
        x = source.detach().clone().requires_grad_()
        view = x[:, 100:612] if source is wide else x
        loss = kernel_ce(view, strided_targets)
        loss.backward()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        grad = x.grad[:, 100:612] if source is wide else x.grad
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
        if source is wide:  # nothing leaks into the columns outside the view
            assert (x.grad[:, :100] == 0).all() and (x.grad[:, 612:] == 0).all()


@needs_triton
def test_kernel_accepts_batch_time_shape():
    logits, targets = make_logits(6 * 40, 256, torch.float32, seed=11)
    flat, flat_grad = loss_and_grad(kernel_ce, logits, targets)
    batched, batched_grad = loss_and_grad(kernel_ce, logits.view(6, 40, 256), targets.view(6, 40))
    torch.testing.assert_close(batched, flat)
    torch.testing.assert_close(batched_grad.view(-1, 256), flat_grad)
    torch.testing.assert_close(flat, torch_ce(logits, targets), rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_inplace_writes_gradient_into_logits(dtype):
    logits, targets = make_logits(77, 512, dtype, seed=12)
    ref_loss, ref_grad = loss_and_grad(kernel_ce, logits, targets, grad_output=2.0)
    x = logits.clone().requires_grad_()
    byte_logits = x * 1  # the head's output: its buffer is what inplace=True overwrites
    loss = kernel_ce(byte_logits, targets, inplace=True)
    loss.backward(torch.tensor(2.0, device=DEVICE))
    torch.testing.assert_close(loss.detach(), ref_loss)
    torch.testing.assert_close(x.grad, ref_grad)
    torch.testing.assert_close(byte_logits.detach(), ref_grad)  # the buffer now holds the (scaled) gradient


@needs_triton
def test_kernel_inplace_refused_by_autograd_when_logits_are_saved():
    """tanh saves its output for backward; overwriting it must be an error, not a silently wrong gradient."""
    logits, targets = make_logits(20, 256, torch.float32, seed=13)
    x = logits.clone().requires_grad_()
    loss = kernel_ce(torch.tanh(x), targets, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # Also when only another branch is differentiated (the loss's own backward, which scales in place, never runs).
    squashed = torch.tanh(x)
    kernel_ce(squashed, targets, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(squashed.sum(), x)


@needs_triton
def test_kernel_second_backward_is_an_error():
    """backward scales the stored gradient in place, so a second backward (retain_graph) must fail loudly."""
    logits, targets = make_logits(20, 256, torch.float32, seed=14)
    x = logits.clone().requires_grad_()
    loss = kernel_ce(x * 1, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@needs_triton
def test_kernel_any_vocabulary_up_to_its_limit():
    """Sizes that are not a power of two pad the block with -inf columns; too large a vocabulary is refused."""
    logits, targets = make_logits(37, 300, torch.float32, seed=26)
    targets[::4] = -100
    k_loss, k_grad = loss_and_grad(kernel_ce, logits, targets, z_loss=1e-3)
    ref_loss, ref_grad = loss_and_grad(losses.byte_cross_entropy_reference, logits, targets, z_loss=1e-3)
    torch.testing.assert_close(k_loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k_grad, ref_grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="chunked_reverse_kl"):
        losses.byte_cross_entropy(*make_logits(2, losses.MAX_KERNEL_VOCAB + 1, torch.float32))


@needs_triton
def test_kernel_out_of_range_target_gives_nan():
    logits, targets = make_logits(30, 512, torch.float32, seed=15)
    targets[3] = 512  # a label off the end of the head: NaN instead of a silent wrong loss
    assert torch.isnan(losses.byte_cross_entropy(logits, targets))


@needs_triton
def test_kernel_without_grad_matches_reference(monkeypatch):
    logits, targets = make_logits(40, 512, torch.bfloat16, seed=16)
    calls = []  # spy: the kernel path runs, and is told not to write a gradient
    forward = losses._byte_cross_entropy_forward
    monkeypatch.setattr(losses, "_byte_cross_entropy_forward", lambda *a: calls.append(a[-2]) or forward(*a))
    with torch.no_grad():
        loss = losses.byte_cross_entropy(logits, targets, z_loss=1e-3)
    assert calls == [False]
    ref = losses.byte_cross_entropy_reference(logits, targets, z_loss=1e-3)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs only exist with a CUDA device")
def test_kernel_has_no_host_sync():
    logits, targets = make_logits(4096, 512, torch.bfloat16, seed=17)
    x = logits.clone().requires_grad_()
    losses.byte_cross_entropy(x, targets).backward()  # compile outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses.byte_cross_entropy(x, targets, z_loss=1e-4).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------------------------------------------
# byte_cross_entropy: the reference and the dispatch

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_torch_formulas(dtype):
    logits, targets = make_logits(50, 512, dtype, seed=18)
    targets[::3] = -100
    gen = torch.Generator().manual_seed(19)
    soft = torch.softmax(torch.randn(50, 512, generator=gen), dim=-1).to(DEVICE)
    got = losses.byte_cross_entropy_reference(logits, targets, z_loss=0.01, soft_targets=soft, soft_weight=0.5)
    x, valid = logits.float(), targets != -100
    z_term = 0.01 * torch.logsumexp(x[valid], -1).square().mean()
    kl_term = 0.5 * F.kl_div(F.log_softmax(x[valid], -1), soft[valid], reduction="batchmean")
    expected = F.cross_entropy(x, targets) + z_term + kl_term
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_dispatch_uses_reference_without_triton(monkeypatch):
    logits, targets = make_logits(10, 256, torch.float32, seed=20)
    x = logits.clone().requires_grad_()
    monkeypatch.setattr(losses, "triton", None)
    loss = losses.byte_cross_entropy(x, targets)
    assert type(loss.grad_fn).__name__ != "_ByteCrossEntropyBackward"
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets))


def test_module_imports_and_works_without_triton():
    """A fresh interpreter in which `import triton` fails: losses.py imports and every loss runs on PyTorch."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, torch.nn.functional as F, losses\n"
        "assert losses.triton is None\n"
        "x, t = torch.randn(9, 512), torch.randint(0, 512, (9,))\n"
        "torch.testing.assert_close(losses.byte_cross_entropy(x, t), F.cross_entropy(x, t))\n"
        "h = torch.randn(5, 8); w = torch.randn(100, 8)\n"
        "loss, _ = losses.chunked_reverse_kl(h, h + 0.1, w, chunk_rows=2)\n"
        "torch.testing.assert_close(loss, losses.reverse_kl_reference(h, h + 0.1, w)[0])\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(losses.__file__), env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------------------
# chunked_reverse_kl

def make_hidden(n_rows, width, vocab, dtype=torch.float32, seed=0):
    """Student near the teacher, so that argmax agreement is neither 0 nor all rows."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n_rows, width, generator=gen)
    student = teacher + 0.7 * torch.randn(n_rows, width, generator=gen)
    head = torch.randn(vocab, width, generator=gen) / width ** 0.5 * 4
    mask = torch.rand(n_rows, generator=gen) > 0.3
    return [t.to(DEVICE) for t in (student.to(dtype), teacher.to(dtype), head.to(dtype), mask)]


def kl_loss_and_grads(fn, student, teacher, head, mask, grad_output=1.0, **kwargs):
    student, teacher, head = (t.detach().clone().requires_grad_() for t in (student, teacher, head))
    loss, matches = fn(student, teacher, head, mask, **kwargs)
    (grad_output * loss).backward()
    assert teacher.grad is None and head.grad is None, "only the student gets a gradient"
    return loss.detach(), matches, student.grad


@pytest.mark.parametrize("chunk_rows,use_triton", [(1, False), (7, False), (64, False), (1024, False)] + [
    pytest.param(rows, True, marks=needs_triton) for rows in (7, 1024)])  # the interpreter pays per chunk
def test_chunked_kl_matches_plain_formula(chunk_rows, use_triton):
    student, teacher, head, mask = make_hidden(64, 24, 3000, seed=21)  # 7 does not divide 64; 1024 > N
    ref = kl_loss_and_grads(losses.reverse_kl_reference, student, teacher, head, mask, grad_output=1.7)
    got = kl_loss_and_grads(losses.chunked_reverse_kl, student, teacher, head, mask, grad_output=1.7,
                            chunk_rows=chunk_rows, use_triton=use_triton)
    assert 0 < ref[1].item() < mask.sum().item()  # agreement counting is exercised both ways
    assert ref[0].item() > 0.1
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    assert got[1].item() == ref[1].item() and not got[1].requires_grad
    torch.testing.assert_close(got[2], ref[2], rtol=1e-4, atol=1e-6)
    assert (got[2][~mask] == 0).all()  # masked-out rows get no gradient


def test_chunked_kl_without_mask_and_all_masked():
    student, teacher, head, _ = make_hidden(20, 16, 500, seed=22)
    ref = kl_loss_and_grads(losses.reverse_kl_reference, student, teacher, head, None)
    got = kl_loss_and_grads(losses.chunked_reverse_kl, student, teacher, head, None, chunk_rows=6)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-4, atol=1e-6)
    nothing = torch.zeros(20, dtype=torch.bool, device=DEVICE)
    loss, matches, grad = kl_loss_and_grads(losses.chunked_reverse_kl, student, teacher, head, nothing, chunk_rows=6)
    assert loss.item() == 0.0 and matches.item() == 0 and (grad == 0).all()


def test_chunked_kl_bf16_inputs_match_fp32_formula():
    student, teacher, head, mask = make_hidden(40, 32, 2000, dtype=torch.bfloat16, seed=23)
    ref = kl_loss_and_grads(losses.reverse_kl_reference, student, teacher, head, mask)
    got = kl_loss_and_grads(losses.chunked_reverse_kl, student, teacher, head, mask, chunk_rows=16)
    assert got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], ref[0], rtol=1e-3, atol=1e-4)  # fp32 logits from the same bf16 operands
    # The gradient is stored in bf16 (and on CUDA its logits-gradient is rounded to bf16 before the matmul with the
    # head): compare in norm, where bf16 rounding is ~0.4%, and a wrong formula would be off by O(1).
    error = (got[2].float() - ref[2].float()).norm() / ref[2].float().norm()
    assert error < 1e-2, error.item()


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces (the forward of an autograd.Function included)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_chunked_kl_never_materialises_full_logits():
    n_rows, width, vocab, chunk_rows = 256, 8, 4000, 32
    student, teacher, head, mask = make_hidden(n_rows, width, vocab, seed=24)
    student.requires_grad_()
    for fn, kwargs in ((losses.chunked_reverse_kl, dict(chunk_rows=chunk_rows)), (losses.reverse_kl_reference, {})):
        with LargestTensor() as tracker:
            loss, _ = fn(student, teacher, head, mask, **kwargs)
            loss.backward()
        if fn is losses.reverse_kl_reference:
            assert tracker.numel >= n_rows * vocab  # the tracker sees the plain formula's full logits
        else:
            assert tracker.numel <= max(chunk_rows * vocab, vocab * width)


@needs_triton
def test_triton_kl_chunk_matches_torch_chunk_with_ties():
    """The fused chunk step directly: V not a multiple of its column block, rows not a multiple of its row block,
    and argmax ties inside a block and across blocks (the first maximum wins, as in torch.argmax)."""
    gen = torch.Generator().manual_seed(25)
    n_rows, vocab = 21, 2500
    student = torch.randn(n_rows, vocab, generator=gen) * 3
    teacher = torch.randn(n_rows, vocab, generator=gen) * 3
    student[0, [5, 2400]] = 50.0; teacher[0, 5] = 50.0  # tie across column blocks: argmax 5 -> agree
    student[1, [2400, 5]] = 50.0; teacher[1, 2400] = 50.0  # same tie, teacher picks the later one -> disagree
    student[2, [10, 11]] = 50.0; teacher[2, 10] = 50.0  # tie inside a block -> agree
    student[3, :] = 1.0; teacher[3, 0] = 50.0  # all equal: argmax 0 -> agree
    scale = torch.rand(n_rows, generator=gen)
    student, teacher, scale = student.to(DEVICE), teacher.to(DEVICE), scale.to(DEVICE)
    kl_t, grad_t, agree_t = losses._kl_chunk_torch(student.clone(), teacher.clone(), scale)
    kl_k, grad_k, agree_k = losses._kl_chunk_triton(student.clone(), teacher.clone(), scale)
    assert agree_t[:4].tolist() == [True, False, True, True]
    assert agree_k.tolist() == agree_t.tolist()
    torch.testing.assert_close(kl_k, kl_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_k, grad_t, rtol=1e-4, atol=1e-7)
