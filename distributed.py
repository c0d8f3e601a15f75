"""Where a training run runs: the process group that torchrun asks for, gradient sync and metric sums over ranks, and
FSDP2 sharding of the student and the frozen teacher (--fsdp) with the memory each rank holds.

Data parallelism is explicit: every rank holds a full student, computes gradients on its own batches, and the
gradients of the parameters that the current phase trains are summed over the ranks by GradReducer while backward
runs (on the last micro-step of gradient accumulation), then divided by the global element count. We do this rather
than wrap the student in DistributedDataParallel because each phase calls a different part of the student (encoder
only, patcher only, ...), and DDP only syncs what goes through its forward(); GradReducer does what DDP's reducer
does (flat buckets of about 25 MB, each all-reduced asynchronously as soon as backward has filled it) with
post-accumulate-grad hooks on exactly the parameters a phase trains. The frozen teacher is never synchronised: every
rank loads its own copy.

With --fsdp (FSDP2, torch.distributed.fsdp.fully_shard) each rank keeps only its 1/N piece of the student's parameters,
gradients and AdamW state, and of the frozen teacher's blocks (see "FSDP2 sharding" below); checkpoints are gathered
into the same byte-model folder as without it.
"""
import os
import warnings

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor


# ----------------------------------------------------------------------------------------------------------------
# Distributed set-up (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE).

def setup_distributed(device_pref="auto"):
    """-> (rank, world_size, device). nccl on CUDA, gloo on CPU; a plain `python script.py` is rank 0 of 1."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if device_pref not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, not {device_pref!r}")
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device=cuda asked for, but this machine has no CUDA GPU (use --device=auto or cpu)")
    use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# Gradient sync. Every loss backpropagated is a sum over this rank's elements (train.py: loss * n); the update wants the
# mean over all ranks' elements: sum the gradients over the ranks, divide by the global count. The count stays on the
# device: nothing here reads a tensor to the host.

BUCKET_BYTES = 25 * 2 ** 20  # DDP's default bucket_cap_mb: big enough for full-bandwidth all-reduces, small enough to
                             # start the first ones early in backward


class GradReducer:
    """Sums the gradients of `params` over the ranks while backward runs, like DDP's reducer. The parameters are laid out
    in flat buckets of about bucket_bytes, in reverse order (backward produces the last layers' gradients first); each
    parameter's .grad becomes a view into its bucket the first time a step accumulates it (gradients then accumulate in
    place there: no copy of all gradients at sync time), and as soon as the last gradient of a bucket is accumulated
    on the syncing micro-step (a post-accumulate-grad hook), that bucket's all-reduce starts asynchronously while
    backward goes on. Buckets start in their order on every rank, as collectives must. `sync` is DDP's no_sync() the
    other way round: set it for the last micro-step of gradient accumulation only; wait() before the optimizer step.
    The buckets stay allocated while the reducer lives (as DDP's do); remove() drops the hooks and buckets."""

    def __init__(self, params, bucket_bytes=BUCKET_BYTES):
        self.sync, self.handles, self.next = False, [], 0
        self.buckets, open_buckets = [], {}
        for p in reversed(list(params)):
            key = (p.device, p.dtype)
            bucket = open_buckets.get(key)
            if bucket is not None and bucket["bytes"] + p.numel() * p.element_size() > bucket_bytes:
                self.buckets.append(open_buckets.pop(key))
                bucket = None
            if bucket is None:
                bucket = open_buckets[key] = {"params": [], "bytes": 0}
            bucket["params"].append(p)
            bucket["bytes"] += p.numel() * p.element_size()
        self.buckets += open_buckets.values()
        self.hooks = []
        for b, bucket in enumerate(self.buckets):
            first = bucket["params"][0]
            bucket["flat"] = torch.zeros(sum(p.numel() for p in bucket["params"]), dtype=first.dtype,
                                         device=first.device)
            bucket["views"], bucket["ready"], offset = [], 0, 0
            for i, p in enumerate(bucket["params"]):
                bucket["views"].append(bucket["flat"][offset:offset + p.numel()].view_as(p))
                offset += p.numel()
                self.hooks.append(p.register_post_accumulate_grad_hook(
                    lambda p, b=b, i=i: self._accumulated(p, b, i)))

    def _accumulated(self, p, b, i):
        bucket = self.buckets[b]
        view = bucket["views"][i]
        if p.grad.data_ptr() != view.data_ptr():  # the step's first gradient of p: move it into its bucket
            view.copy_(p.grad)
            p.grad = view
        if self.sync:
            bucket["ready"] += 1
            while self.next < len(self.buckets) and \
                    self.buckets[self.next]["ready"] == len(self.buckets[self.next]["params"]):
                self._start(self.buckets[self.next])

    def _start(self, bucket):
        for p, view in zip(bucket["params"], bucket["views"]):
            if p.grad is None:  # no gradient this step on this rank: its slot holds an earlier step's
                view.zero_()
        self.handles.append(dist.all_reduce(bucket["flat"], async_op=True))
        self.next += 1

    def wait(self):
        """Start the buckets that backward left unfinished (parameters without a gradient in the last micro-step),
        wait for every all-reduce; the gradients then hold the sums over the ranks."""
        while self.next < len(self.buckets):
            self._start(self.buckets[self.next])
        for handle in self.handles:
            handle.wait()
        self.handles, self.next, self.sync = [], 0, False
        for bucket in self.buckets:
            bucket["ready"] = 0

    def remove(self):
        for hook in self.hooks:
            hook.remove()
        self.hooks, self.buckets = [], []


def sync_grads(params, total, reducer=None):
    """Gradients hold sums over this rank's loss elements; turn them into the mean over all ranks' elements: the sums
    over the ranks (reducer's all-reduces, started during backward; None on one process), then a division by the global
    element count `total` (a tensor, on the device). FSDP shards (DTensors) arrive already summed over the ranks by
    FSDP's reduce-scatter (shard_student): only divided here."""
    if reducer is not None:
        reducer.wait()
    scale = total.clamp(min=1).to(torch.float32)
    for p in params:
        if p.grad is not None:
            local(p.grad).div_(scale)


def all_reduce_sums(sums):
    """{name: 0-dim tensor} summed over ranks -> (the names, sorted; one float64 tensor of their sums), on the device:
    one all-reduce, no host read."""
    keys = sorted(sums)
    stacked = torch.stack([sums[k].to(torch.float64) for k in keys])
    if dist.is_initialized():
        dist.all_reduce(stacked)
    return keys, stacked


def all_reduce_sum(sums):
    """{name: 0-dim tensor} summed over ranks -> {name: float}, read to the host at once (evaluations)."""
    keys, stacked = all_reduce_sums(sums)
    return dict(zip(keys, stacked.tolist()))


def broadcast_params(module):
    """Make every rank start from rank 0's weights."""
    if dist.is_initialized():
        for p in module.parameters():
            dist.broadcast(p.data, 0)


# ----------------------------------------------------------------------------------------------------------------
# FSDP2 sharding (--fsdp). fully_shard turns each parameter into a DTensor that holds this rank's 1/N slice (dim 0);
# a unit's parameters are all-gathered just before its forward and freed after it, gradients are reduce-scattered
# in backward, and AdamW, built over the DTensors, keeps its moments as slices too: ZeRO-3 (the paper's code uses
# DeepSpeed ZeRO-2, which shards gradients and optimizer state but keeps whole weights on every GPU).
#
# The units: every block of the three stacks (encoder, main network, decoder), then each stack (its final norm; its
# run_blocks is registered as a forward, since the student calls that, not forward()), then every other part of the
# student on its own (byte_embed, enc_proj, patcher_q, ...). Not one unit for the whole student, as FSDP usually ends
# with: the phases call parts (student.encode, boundary_probs, run_main, decode), never only ByteLM.forward, and FSDP
# gathers a unit's parameters only around the forward methods it knows. The student's own parameters outside any part
# (the dechunk null vector, d_model floats) stay whole on every rank and are averaged like DDP's (sync_grads). Of the
# frozen teacher only the blocks are sharded: its embedding (also the tied head, which the chunked KL reads as a
# plain matrix) and final norm stay whole.

def sharded(module):
    """Whether `module` holds FSDP shards (shard_student was applied)."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def local(t):
    """The part of `t` this rank holds: an FSDP shard's slice, or all of a plain tensor."""
    return t.to_local() if isinstance(t, DTensor) else t


def _shard(module, mp_policy):
    fully_shard(module, mp_policy=mp_policy, reshard_after_forward=True)  # True even for a root: free after forward
    # Sum the ranks' gradients (FSDP averages by default): like DDP here, every loss is a sum over this rank's
    # elements, divided by the global count afterwards (sync_grads). Plain sums: gloo has no pre-multiplied sum.
    module.set_gradient_divide_factor(1.0)
    module.set_force_sum_reduction_for_comms(True)


def shard_student(student, device, bf16):
    """FSDP2 over the student in place (units as above). On CUDA with bf16, units gather bf16 copies of their fp32
    shards and reduce gradients in fp32 (the shards and AdamW stay fp32); elsewhere everything stays as it is."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" and bf16 else MixedPrecisionPolicy()
    # FSDP warns when a unit returns a view (a Linear on 3-D input does), because an in-place op on it would skip the
    # unit's backward hook. The student never writes into a part's output in place; the test against one process
    # (tests/test_fsdp.py) would see the wrong gradients if it did.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for unit in fsdp_units(student):
        _shard(unit, mp)
        if hasattr(unit, "run_blocks"):  # a stack: the student calls run_blocks, not forward
            register_fsdp_forward_method(unit, "run_blocks")


def fsdp_units(student):
    """The student's FSDP units, inner ones first: each block of a stack (transformer.Transformer: encoder, main, decoder),
    then the stack itself (its final norm), and every other part that has parameters."""
    for part in student.children():
        if not any(True for _ in part.parameters()):
            continue
        if hasattr(part, "run_blocks"):
            yield from part.layers
        yield part


def shard_frozen(teacher):
    """FSDP2 over the frozen teacher's blocks: each gathered for its forward and freed right after."""
    for block in teacher.layers:
        fully_shard(block, reshard_after_forward=True)


def shard_like(tensors, named_params):
    """Whole AdamW state tensors ({"<name>.exp_avg": ...}, from a checkpoint) cut into this rank's slices, laid out as
    the FSDP parameters they belong to; everything else (steps, state of whole parameters) as it is."""
    params, out = dict(named_params), {}
    for key, t in tensors.items():
        name, _, field = key.rpartition(".")
        p = params.get(name)
        if isinstance(p, DTensor) and field != "step" and tuple(t.shape) == tuple(p.shape):
            t = distribute_tensor(t.to(device=local(p).device, dtype=p.dtype), p.device_mesh, p.placements)
        out[key] = t  # a shape that does not fit is left for load_optimizer_state to refuse
    return out


def gather_full(tensors, keep=True):
    """{name: tensor} with every FSDP shard all-gathered into the whole tensor, on the CPU. Collective: every rank
    calls it with the same names in the same order. keep=False drops the result on this rank (only rank 0 writes
    checkpoints, and other ranks need not hold a whole model at once)."""
    out = {}
    for name, t in tensors.items():
        whole = t.full_tensor() if isinstance(t, DTensor) else t
        if keep:
            out[name] = whole.detach().cpu()
    return out


def clip_grad_norm(params, max_norm):
    """torch.nn.utils.clip_grad_norm_, also over FSDP shards: each rank sums the squares of its slices, one all-reduce
    adds the ranks' sums, and the whole (replicated) gradients count once. -> the total norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    with torch.no_grad():
        squares = [local(g).float().pow(2).sum() for g in grads if isinstance(g, DTensor)]
        sliced = torch.stack(squares).sum()
        dist.all_reduce(sliced)
        whole = sum((g.float().pow(2).sum() for g in grads if not isinstance(g, DTensor)), torch.zeros(()))
        total = (sliced + whole.to(sliced.device)).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s rule
        for g in grads:
            local(g).mul_(coef.to(local(g).dtype))
    return total


ADAMW_STATE_BYTES = 4  # AdamW's step count: one fp32 scalar per parameter


def memory_bytes(student, trainable, frozen=None):
    """Bytes this rank holds: the student's parameters and buffers (its slices, or all of them), the gradients and
    AdamW state (two moments of the parameter's dtype, and a step) that a phase training `trainable` fills, the frozen
    teacher's parameters. Gathered units (one or two at a time, freed after use) and activations are not counted."""
    def nbytes(ps):
        return sum(local(p).numel() * local(p).element_size() for p in ps)
    grads = nbytes(trainable)
    return {"parameters": nbytes([*student.parameters(), *student.buffers()]), "gradients": grads,
            "optimizer": 2 * grads + ADAMW_STATE_BYTES * len(trainable),
            "teacher": nbytes(frozen.parameters()) if frozen is not None else 0}


def print_memory(phase, figures, device):
    """Every rank's memory_bytes, printed by rank 0: one line per rank."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    keys = list(figures)
    table = torch.zeros(world, len(keys), dtype=torch.float64, device=device)
    table[rank] = torch.tensor([float(figures[k]) for k in keys], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(table)
    if rank == 0:
        for r, row in enumerate(table.tolist()):
            mib = dict(zip(keys, (v / 2 ** 20 for v in row)))
            print(f"memory {phase} rank {r}: parameters {mib['parameters']:.4g} MiB, gradients {mib['gradients']:.4g} "
                  f"MiB, optimizer state {mib['optimizer']:.4g} MiB | teacher {mib['teacher']:.4g} MiB", flush=True)
