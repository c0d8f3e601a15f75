"""The losses and their kernels: the byte head's cross-entropy and the teacher-vocabulary reverse KL.

Two losses dominate the cost of this project's training steps (README, Method):

- byte_cross_entropy: stage 2's loss on every byte, over the 512-way joint head (index v + 256*e = "next byte
  is v, and it ends a patch iff e = 1"; a 256-way head also works). One Triton program takes a tile of whole
  rows, does the softmax in fp32, writes the loss *and the gradient* in the same pass, so backward is a single
  multiply by grad_output. The PyTorch reference beside it is the oracle in tests and the path without Triton.
- chunked_reverse_kl: stage 1b's distillation loss, KL(student || teacher) over the teacher's vocabulary
  (49K-152K classes). It runs in row chunks (head matmul -> log-softmax -> KL -> gradient), so memory grows with
  chunk_rows * V and full (N, V) logits never exist; the per-chunk softmax/KL/gradient has a Triton version on CUDA.

`import triton` is optional: without it everything runs through the PyTorch paths. On CPU the Triton kernels run
in the interpreter when TRITON_INTERPRET=1 is set before this module is imported (tests/conftest.py does that).
"""
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton: the reference paths below still work
    triton = None

# The interpreter is chosen when triton is imported; read the same variable to know which mode we are in.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_KERNEL_VOCAB = 4096  # a whole row lives in one block; the teacher vocabulary goes to chunked_reverse_kl


# ----------------------------------------------------------------------------------------------------------------
# Byte head cross-entropy: reference

def byte_cross_entropy_reference(logits, targets, ignore_index=-100, z_loss=0.0, soft_targets=None, soft_weight=0.0):
    """Mean over non-ignored rows of CE(logits, target) + z_loss * lse^2 + soft_weight * KL(soft_targets || p).

    Plain PyTorch in fp32 whatever the input dtype; gradients come from autograd (in the logits' dtype).
    logits (..., V), targets (...) int; soft_targets, if given, has the logits' shape and holds probabilities
    (rows summing to 1) that are treated as constants. Returns an fp32 scalar, 0 when every row is ignored."""
    vocab = logits.shape[-1]
    x = logits.reshape(-1, vocab).float()  # (N, V) fp32 math
    targets = targets.reshape(-1)
    valid = targets != ignore_index
    lse = torch.logsumexp(x, dim=-1)  # (N,)
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))  # ignore_index is no valid gather index
    row_loss = lse - x.gather(1, safe_targets[:, None]).squeeze(1)
    if z_loss:
        row_loss = row_loss + z_loss * lse.square()  # PaLM's z-loss keeps log Z near 0
    if soft_targets is not None and soft_weight:
        q = soft_targets.reshape(-1, vocab).detach().float()
        log_p = x - lse[:, None]
        row_loss = row_loss + soft_weight * (torch.xlogy(q, q) - q * log_p).sum(-1)  # xlogy: 0 log 0 = 0
    count = valid.sum().clamp(min=1)  # stays on the device
    return torch.where(valid, row_loss, 0.0).sum() / count


# ----------------------------------------------------------------------------------------------------------------
# Byte head cross-entropy: Triton kernel

if triton is not None:

    @triton.jit
    def _byte_cross_entropy_kernel(
            logits_ptr, logits_row_stride, targets_ptr, soft_ptr, soft_row_stride, grad_ptr, grad_row_stride,
            valid_count_ptr, partial_loss_ptr, n_rows, n_cols, tiles_per_program, ignore_index, z_loss, soft_weight,
            BLOCK_ROWS: tl.constexpr, BLOCK_V: tl.constexpr, HAS_SOFT: tl.constexpr, WRITE_GRAD: tl.constexpr):
        """Each program walks tiles of BLOCK_ROWS whole rows; per row: softmax, loss, gradient, all in fp32.

        The gradient of the *mean* loss is written, so it is divided by the number of valid rows, which is read
        from device memory (no host sync). Each program writes its partial loss sum; the host side adds them up
        (a fixed order, so the result is deterministic, unlike atomics)."""
        pid = tl.program_id(0)
        n_programs = tl.num_programs(0)
        inv_count = 1.0 / tl.load(valid_count_ptr).to(tl.float32)
        cols = tl.arange(0, BLOCK_V)
        col_ok = cols < n_cols
        loss_acc = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        for i in range(tiles_per_program):
            rows = (pid + i * n_programs) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
            row_ok = rows < n_rows
            rows64 = rows.to(tl.int64)  # row * stride can pass 2^31 at stage-2 sizes
            tile_ok = row_ok[:, None] & col_ok[None, :]
            target = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index)
            valid = row_ok & (target != ignore_index)
            # Upcast at once: fp32 math (and bf16 arithmetic is wrong in the interpreter). Padding rows load 0 so
            # nothing below produces inf - inf; padding columns are -inf so they vanish from the softmax.
            x = tl.load(logits_ptr + rows64[:, None] * logits_row_stride + cols[None, :], mask=tile_ok, other=0.0)
            x = tl.where(col_ok[None, :], x.to(tl.float32), float("-inf"))
            row_max = tl.max(x, axis=1)
            exps = tl.exp(x - row_max[:, None])
            sum_exp = tl.sum(exps, axis=1)
            lse = row_max + tl.log(sum_exp)  # (BLOCK_ROWS,)
            probs = exps / sum_exp[:, None]
            is_target = cols[None, :] == target[:, None]
            target_logit = tl.sum(tl.where(is_target, x, 0.0), axis=1)
            row_loss = lse - target_logit + z_loss * lse * lse
            # d/dx [lse - x_t + z lse^2] = p (1 + 2 z lse) - onehot(t)
            grad = probs * (1.0 + 2.0 * z_loss * lse)[:, None] - tl.where(is_target, 1.0, 0.0)
            if HAS_SOFT:
                q = tl.load(soft_ptr + rows64[:, None] * soft_row_stride + cols[None, :], mask=tile_ok, other=0.0)
                q = q.to(tl.float32)
                log_p = x - lse[:, None]
                kl = tl.sum(tl.where(q > 0.0, q * (tl.log(tl.where(q > 0.0, q, 1.0)) - log_p), 0.0), axis=1)
                row_loss += soft_weight * kl
                grad += soft_weight * (probs - q)  # d/dx KL(q || softmax(x)) = p - q (rows of q sum to 1)
            # A target outside [0, V) is a bug upstream: make the loss NaN (loud) rather than read out of bounds.
            bad_target = valid & ((target < 0) | (target >= n_cols))
            row_loss = tl.where(bad_target, float("nan"), row_loss)
            loss_acc += tl.where(valid, row_loss, 0.0)
            if WRITE_GRAD:
                grad = tl.where(valid[:, None], grad * inv_count, 0.0)  # ignored rows get exactly 0
                tl.store(grad_ptr + rows64[:, None] * grad_row_stride + cols[None, :],
                         grad.to(grad_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(partial_loss_ptr + pid, tl.sum(loss_acc, axis=0) * inv_count)


def _launch_shape(n_rows, block_v, device):
    """(rows per tile, programs, tiles per program). The interpreter pays ~1.3 ms per program, so it gets big
    tiles and few programs; a GPU gets tiles of ~4K elements and enough programs to fill every SM."""
    if INTERPRET or device.type != "cuda":
        block_rows, max_programs = max(1, 65536 // block_v), 4
    else:
        block_rows = max(1, 4096 // block_v)
        max_programs = 8 * torch.cuda.get_device_properties(device).multi_processor_count
    n_tiles = triton.cdiv(max(n_rows, 1), block_rows)
    n_programs = min(n_tiles, max_programs)
    return block_rows, n_programs, triton.cdiv(n_tiles, n_programs)


def _byte_cross_entropy_forward(logits, targets, ignore_index, z_loss, soft_targets, soft_weight, want_grad, inplace):
    """Runs the kernel on (N, V) logits. Returns (loss, grad of the mean loss w.r.t. logits or None)."""
    n_rows, vocab = logits.shape
    if vocab > MAX_KERNEL_VOCAB:
        raise ValueError(f"byte_cross_entropy keeps a whole row in one block (V <= {MAX_KERNEL_VOCAB}); got V={vocab}. "
                         "Use chunked_reverse_kl for teacher-vocabulary losses.")
    if logits.stride(1) != 1:  # rows may be strided (a slice of a wider tensor); columns must be contiguous
        logits = logits.contiguous()
    targets = targets.contiguous()
    has_soft = soft_targets is not None and soft_weight != 0.0
    if has_soft:
        soft_targets = soft_targets.detach()
        if soft_targets.shape != logits.shape:
            raise ValueError(f"soft_targets shape {tuple(soft_targets.shape)} != logits shape {tuple(logits.shape)}")
        if soft_targets.stride(1) != 1:
            soft_targets = soft_targets.contiguous()
    grad = None
    if want_grad:
        if INTERPRET and logits.dtype == torch.bfloat16:
            # The interpreter's fp32 -> bf16 store does not round correctly: store fp32, let torch round below.
            grad = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        elif inplace:
            grad = logits  # the logits are dead after the loss: overwrite them with their gradient
        else:
            grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    # Count of valid rows, on the device; clamp so an all-ignored batch gives loss 0 and gradient 0.
    valid_count = (targets != ignore_index).sum().clamp_(min=1).to(torch.float32)
    block_v = triton.next_power_of_2(vocab)
    block_rows, n_programs, tiles_per_program = _launch_shape(n_rows, block_v, logits.device)
    partial_loss = torch.empty(n_programs, dtype=torch.float32, device=logits.device)
    _byte_cross_entropy_kernel[(n_programs,)](
        logits, logits.stride(0), targets,
        soft_targets if has_soft else logits, soft_targets.stride(0) if has_soft else 0,
        grad if grad is not None else logits, grad.stride(0) if grad is not None else 0,
        valid_count, partial_loss, n_rows, vocab, tiles_per_program, ignore_index, float(z_loss), float(soft_weight),
        BLOCK_ROWS=block_rows, BLOCK_V=block_v, HAS_SOFT=has_soft, WRITE_GRAD=grad is not None,
        num_warps=4 if block_v <= 512 else 8)
    if grad is not None and grad.dtype != logits.dtype:  # the interpreter's bf16 detour
        grad = logits.copy_(grad) if inplace else grad.to(logits.dtype)
    return partial_loss.sum(), grad


class _ByteCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, z_loss, soft_targets, soft_weight, inplace):
        want_grad = ctx.needs_input_grad[0]
        loss, grad = _byte_cross_entropy_forward(logits, targets, ignore_index, z_loss, soft_targets, soft_weight,
                                                 want_grad, inplace)
        if grad is not None and grad.data_ptr() == logits.data_ptr():
            # Tell autograd the logits changed, so any op that saved them for its backward fails loudly.
            torch.autograd.graph.increment_version(logits)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        # In place: the buffer is ours alone. A second backward through the graph then fails autograd's version
        # check instead of silently reusing a scaled gradient.
        return grad.mul_(grad_loss), None, None, None, None, None, None


def _use_triton(tensor):
    return triton is not None and (tensor.is_cuda or (INTERPRET and tensor.device.type == "cpu"))


def byte_cross_entropy(logits, targets, ignore_index=-100, z_loss=0.0, soft_targets=None, soft_weight=0.0,
                       inplace=False):
    """Mean cross-entropy of the byte head over non-ignored rows, in fp32, for any float dtype of logits.

    logits (N, V) or (..., V) with V = 512 (joint boundary head) or 256; targets (N,) or (...) int64.
    z_loss > 0 adds z_loss * logsumexp(logits)^2 per row. soft_targets (same shape as logits, probabilities,
    treated as constants) with soft_weight > 0 adds soft_weight * KL(soft_targets || softmax(logits)) per row,
    e.g. for distilling a byte distribution; ignored rows are excluded from every term. Returns an fp32 scalar
    (0, with gradient 0, when every row is ignored).

    Runs the Triton kernel on CUDA tensors (and on CPU under TRITON_INTERPRET=1), the PyTorch reference otherwise.
    inplace=True lets the kernel overwrite the logits with their gradient (saves one (N, V) buffer): use it only
    when nothing reads the logits after this call. Autograd's version counter catches ops that saved them."""
    vocab = logits.shape[-1]
    if not _use_triton(logits):
        return byte_cross_entropy_reference(logits, targets, ignore_index, z_loss, soft_targets, soft_weight)
    flat_logits = logits.reshape(-1, vocab)  # a view when contiguous: inplace reaches the caller's buffer
    flat_targets = targets.reshape(-1)
    if flat_targets.shape[0] != flat_logits.shape[0]:
        raise ValueError(f"{flat_targets.shape[0]} targets for {flat_logits.shape[0]} rows of logits")
    if soft_targets is not None:
        soft_targets = soft_targets.reshape(-1, vocab)
    return _ByteCrossEntropy.apply(flat_logits, flat_targets, ignore_index, z_loss, soft_targets, soft_weight, inplace)


# ----------------------------------------------------------------------------------------------------------------
# Teacher-vocabulary reverse KL: reference

def reverse_kl_reference(student_hidden, teacher_hidden, head_weight, mask=None):
    """KL(student || teacher) = sum_v p_s (log p_s - log p_t) with p = softmax(h @ W.T), mean over masked rows.

    The plain formula with full (N, V) fp32 logits; the oracle for chunked_reverse_kl. Gradients flow to
    student_hidden only. Returns (loss, number of masked rows whose student and teacher argmax agree)."""
    weight = head_weight.detach().float()
    log_ps = torch.log_softmax(student_hidden.float() @ weight.t(), dim=-1)  # (N, V)
    log_pt = torch.log_softmax(teacher_hidden.detach().float() @ weight.t(), dim=-1)  # (N, V)
    kl_rows = (log_ps.exp() * (log_ps - log_pt)).sum(-1)  # (N,)
    row_mask = torch.ones_like(kl_rows, dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
    loss = torch.where(row_mask, kl_rows, 0.0).sum() / row_mask.sum().clamp(min=1)
    matches = ((log_ps.argmax(-1) == log_pt.argmax(-1)) & row_mask).sum()
    return loss, matches.detach()


# ----------------------------------------------------------------------------------------------------------------
# Teacher-vocabulary reverse KL: the per-chunk step, in PyTorch and in Triton

def _kl_chunk_torch(student_logits, teacher_logits, row_scale):
    """One chunk of rows: (c, V) fp32 logits of student and teacher (both consumed: overwritten in place).
    Returns (KL per row (c,), d loss / d student logits (c, V) scaled per row by row_scale, argmax agreement (c,))."""
    agree = student_logits.argmax(-1) == teacher_logits.argmax(-1)
    log_ps = student_logits.sub_(torch.logsumexp(student_logits, dim=-1, keepdim=True))
    log_pt = teacher_logits.sub_(torch.logsumexp(teacher_logits, dim=-1, keepdim=True))
    probs = log_ps.exp()
    log_ratio = log_ps.sub_(log_pt)  # log p_s - log p_t, reusing the student buffer
    kl_rows = torch.linalg.vecdot(probs, log_ratio)  # (c,)
    # d KL(p_s || p_t) / d z_s = p_s * (log p_s - log p_t - KL): the softmax Jacobian applied to (log_ratio + 1)
    grad = probs.mul_(log_ratio.sub_(kl_rows[:, None])).mul_(row_scale[:, None])
    return kl_rows, grad, agree


if triton is not None:

    @triton.jit
    def _reverse_kl_chunk_kernel(student_ptr, teacher_ptr, grad_ptr, row_scale_ptr, kl_ptr, agree_ptr,
                                 n_rows, n_cols, student_stride, teacher_stride, grad_stride,
                                 BLOCK_ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
        """Three sweeps over each row (V too long for one block): online max/sum-exp (and argmax) of both
        distributions, then the KL, then the gradient. The gradient may overwrite the student logits: each element
        is read before it is written, by the same program. Reads 3 x 2 x (c, V), writes 1 x (c, V); the PyTorch
        version makes ~12 passes and holds ~4 (c, V) buffers."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)
        s_offsets = rows64[:, None] * student_stride
        t_offsets = rows64[:, None] * teacher_stride
        max_s = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
        max_t = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
        sum_s = tl.zeros([BLOCK_ROWS], tl.float32)
        sum_t = tl.zeros([BLOCK_ROWS], tl.float32)
        arg_s = tl.zeros([BLOCK_ROWS], tl.int32)
        arg_t = tl.zeros([BLOCK_ROWS], tl.int32)
        # Sweep 1: running max and rescaled sum of exponentials (the online softmax), plus the running argmax
        # (a strict > keeps the first maximum, as torch.argmax does). Padding rows load 0 and stay finite.
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            col_ok = cols < n_cols
            ok = row_ok[:, None] & col_ok[None, :]
            s = tl.load(student_ptr + s_offsets + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            t = tl.load(teacher_ptr + t_offsets + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            s = tl.where(col_ok[None, :], s, float("-inf"))
            t = tl.where(col_ok[None, :], t, float("-inf"))
            block_max_s = tl.max(s, axis=1)
            block_max_t = tl.max(t, axis=1)
            arg_s = tl.where(block_max_s > max_s, start + tl.argmax(s, axis=1), arg_s)
            arg_t = tl.where(block_max_t > max_t, start + tl.argmax(t, axis=1), arg_t)
            new_max_s = tl.maximum(max_s, block_max_s)
            new_max_t = tl.maximum(max_t, block_max_t)
            sum_s = sum_s * tl.exp(max_s - new_max_s) + tl.sum(tl.exp(s - new_max_s[:, None]), axis=1)
            sum_t = sum_t * tl.exp(max_t - new_max_t) + tl.sum(tl.exp(t - new_max_t[:, None]), axis=1)
            max_s = new_max_s
            max_t = new_max_t
        lse_s = max_s + tl.log(sum_s)
        lse_t = max_t + tl.log(sum_t)
        # Sweep 2: KL = sum p_s (log p_s - log p_t). Padding columns stay at 0 here (masked out of the sum).
        kl = tl.zeros([BLOCK_ROWS], tl.float32)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            ok = row_ok[:, None] & (cols < n_cols)[None, :]
            log_ps = tl.load(student_ptr + s_offsets + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            log_ps -= lse_s[:, None]
            log_pt = tl.load(teacher_ptr + t_offsets + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            log_pt -= lse_t[:, None]
            kl += tl.sum(tl.where(ok, tl.exp(log_ps) * (log_ps - log_pt), 0.0), axis=1)
        # Sweep 3: gradient p_s (log p_s - log p_t - KL), times the row's weight / count.
        scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            ok = row_ok[:, None] & (cols < n_cols)[None, :]
            log_ps = tl.load(student_ptr + s_offsets + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            log_ps -= lse_s[:, None]
            log_pt = tl.load(teacher_ptr + t_offsets + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            log_pt -= lse_t[:, None]
            grad = tl.exp(log_ps) * (log_ps - log_pt - kl[:, None]) * scale[:, None]
            tl.store(grad_ptr + rows64[:, None] * grad_stride + cols[None, :], grad, mask=ok)
        tl.store(kl_ptr + rows, kl, mask=row_ok)
        tl.store(agree_ptr + rows, (arg_s == arg_t).to(tl.int32), mask=row_ok)


def _kl_chunk_triton(student_logits, teacher_logits, row_scale):
    """Same contract as _kl_chunk_torch; the gradient overwrites student_logits."""
    n_rows, vocab = student_logits.shape
    kl_rows = torch.empty(n_rows, dtype=torch.float32, device=student_logits.device)
    agree = torch.empty(n_rows, dtype=torch.int32, device=student_logits.device)
    block_rows, block_v = (16, 1024) if INTERPRET else (1, 4096)
    _reverse_kl_chunk_kernel[(triton.cdiv(n_rows, block_rows),)](
        student_logits, teacher_logits, student_logits, row_scale.contiguous(), kl_rows, agree,
        n_rows, vocab, student_logits.stride(0), teacher_logits.stride(0), student_logits.stride(0),
        BLOCK_ROWS=block_rows, BLOCK_V=block_v, num_warps=8)
    return kl_rows, student_logits, agree.bool()


# ----------------------------------------------------------------------------------------------------------------
# Teacher-vocabulary reverse KL: chunked autograd function

_MM_OUT_DTYPE_OK = {}  # device type -> whether torch.mm(..., out_dtype=float32) works for 16-bit inputs there


def _mm_fp32(a, b):
    """a @ b with an fp32 result. 16-bit b is multiplied in its own dtype with fp32 output where torch supports it
    (CUDA), which avoids an fp32 copy of the (V, C) head; elsewhere the caller passes an fp32 b."""
    if b.dtype == torch.float32:
        return a.float() @ b
    return torch.mm(a.to(b.dtype), b, out_dtype=torch.float32)


def _head_for_matmul(head_weight):
    """The head in the dtype _mm_fp32 will use: as is when it is fp32 or when mm can output fp32 from it, else an
    fp32 copy (one (V, C) buffer per call, independent of N)."""
    weight = head_weight.detach()
    if weight.dtype == torch.float32:
        return weight
    device_type = weight.device.type
    if device_type not in _MM_OUT_DTYPE_OK:
        try:  # both layouts the chunk loop uses: h @ W.t() and grad @ W
            a = torch.ones(8, 16, dtype=weight.dtype, device=weight.device)
            b = torch.ones(24, 16, dtype=weight.dtype, device=weight.device)
            products = (torch.mm(a, b.t(), out_dtype=torch.float32), torch.mm(a.t(), a, out_dtype=torch.float32))
            _MM_OUT_DTYPE_OK[device_type] = all(p.dtype == torch.float32 and (p == p[0, 0]).all() for p in products)
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_OUT_DTYPE_OK[device_type] = False
    return weight if _MM_OUT_DTYPE_OK[device_type] else weight.float()


class _ChunkedReverseKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, teacher_hidden, head_weight, mask, chunk_rows, use_triton):
        n_rows = student_hidden.shape[0]
        weight = _head_for_matmul(head_weight)  # (V, C)
        row_weight = (torch.ones(n_rows, device=student_hidden.device) if mask is None
                      else mask.reshape(-1).to(device=student_hidden.device, dtype=torch.float32))
        count = row_weight.sum().clamp(min=1)  # masked rows, on the device
        row_scale = row_weight / count  # each row's share of the mean
        loss_sum = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
        matches = torch.zeros((), dtype=torch.int64, device=student_hidden.device)
        grad_student = torch.empty_like(student_hidden) if ctx.needs_input_grad[0] else None
        kl_chunk = _kl_chunk_triton if use_triton else _kl_chunk_torch
        for start in range(0, n_rows, chunk_rows):
            rows = slice(start, min(start + chunk_rows, n_rows))
            student_logits = _mm_fp32(student_hidden[rows], weight.t())  # (c, V) fp32
            teacher_logits = _mm_fp32(teacher_hidden[rows], weight.t())  # (c, V) fp32
            kl_rows, grad_logits, agree = kl_chunk(student_logits, teacher_logits, row_scale[rows])
            del teacher_logits
            loss_sum += (kl_rows * row_scale[rows]).sum()
            matches += (agree & (row_weight[rows] > 0)).sum()
            if grad_student is not None:
                grad_student[rows] = _mm_fp32(grad_logits, weight).to(grad_student.dtype)  # (c, C)
        ctx.save_for_backward(grad_student)
        ctx.mark_non_differentiable(matches)
        return loss_sum, matches

    @staticmethod
    def backward(ctx, grad_loss, grad_matches):
        (grad_student,) = ctx.saved_tensors
        return grad_student.mul_(grad_loss), None, None, None, None, None


def chunked_reverse_kl(student_hidden, teacher_hidden, head_weight, mask=None, chunk_rows=1024, use_triton=None):
    """Stage 1b's loss: mean over masked rows of KL(student || teacher) over the teacher vocabulary (temperature 1).

    student_hidden, teacher_hidden (N, C): final-norm outputs at N patch/token positions; head_weight (V, C): the
    teacher's frozen LM head; mask (N,) bool or None. Works chunk_rows rows at a time (logits in fp32,
    log-softmax, KL and the gradient w.r.t. student_hidden, all in the forward), so peak memory grows with
    chunk_rows * V, never N * V. Gradients flow to student_hidden only. Returns (loss fp32 scalar, number of
    masked rows where argmax student == argmax teacher, a detached int64 tensor).
    use_triton=None picks the fused Triton chunk step on CUDA and PyTorch elsewhere (True forces it, e.g. in tests
    under the interpreter)."""
    if (student_hidden.dim() != 2 or student_hidden.shape != teacher_hidden.shape
            or student_hidden.shape[-1] != head_weight.shape[-1]):
        raise ValueError(f"shapes: student {tuple(student_hidden.shape)}, teacher {tuple(teacher_hidden.shape)}, "
                         f"head {tuple(head_weight.shape)}")
    if use_triton is None:
        use_triton = triton is not None and student_hidden.is_cuda
    if use_triton and triton is None:
        raise RuntimeError("use_triton=True but triton is not installed")
    with torch.autocast(student_hidden.device.type, enabled=False):  # our fp32 logits must stay fp32
        return _ChunkedReverseKL.apply(student_hidden, teacher_hidden.detach(), head_weight.detach(), mask,
                                       int(chunk_rows), bool(use_triton))
