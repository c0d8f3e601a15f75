"""Training plumbing shared by stage1_kd.py and stage2_sft.py: the settings, start, validation and end of a run, the
patcher's boundary loss and figures, optimizer groups, the LR schedule, the dtype choice, resume, and the phase loop. The stage scripts stay top to bottom; the command line is cli.py, the checkpoint files
(and the exact-resume state beside them) are checkpoint.py, and the process group, gradient sync and FSDP2 sharding
are distributed.py.
"""
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import checkpoint
import cli
import distributed
from checkpoint import check_resume, load_optimizer_state, load_resume_state, save_checkpoint, set_rng_state
from distributed import (GradReducer, all_reduce_sums, clip_grad_norm, print_memory, memory_bytes, shard_frozen,
                         shard_like, shard_student, sharded, sync_grads)


# ----------------------------------------------------------------------------------------------------------------
# The settings, the start and the end of a run, the same in both stages.

@dataclass
class RunConfig:
    """The settings both stages share. Each stage's Config extends it with its own (teacher or init, data, student,
    phases) and may give a field here another default; every checkpoint's config.json stores them by these names."""
    # the run: where it writes, on what, in which precision, at which batch shape
    out_dir: str = "out"              # the byte model (model.safetensors, config.json), resume/, metrics.jsonl and a
                                      # byte-model folder per phase
    resume: bool = False              # continue from the checkpoint in out_dir exactly where it stopped
    seed: int = 1337
    device: str = "auto"              # auto | cpu | cuda
    dtype: str = "auto"               # autocast dtype: bfloat16 | float32 | auto (bf16 on CUDA; on CPU whichever a
                                      # short timing at start shows faster: bf16 pays on AMX CPUs, not on AVX2-only)
    batch_size: int = 8               # windows per micro-step per rank
    seq_len: int = 512                # bytes per window
    grad_accum: int = 1               # micro-steps per optimizer update (gradients sync on the last one only)
    fsdp: bool = False                # shard the student's parameters, gradients and AdamW state (and stage 1's
                                      # teacher's blocks) over the ranks with FSDP2 (README: FSDP)
    checkpoint_blocks: bool = False   # recompute every transformer block in backward (activation checkpointing): at
                                      # paper-scale windows the saved activations, not the weights, fill a GPU
    # every phase's schedule and update (its budget and learning rate are the stage's)
    warmup_frac: float = 0.05         # share of a phase's steps of linear warm-up before the cosine decay
    weight_decay: float = 0.1         # AdamW's, on matrices only (not on norms, biases, embeddings)
    grad_clip: float = 1.0            # clip the gradient's norm (the phase's trained parameters together) to this
    # evaluation, logging, checkpoints
    eval_batches: int = 4             # validation batches per rank at the end of each phase (the same every time)
    log_interval: int = 10            # a progress line every N steps (metrics.jsonl has a line for every step)
    ckpt_interval: int = 0            # also checkpoint every N steps (0: only at the end of each phase)
    stop_after: int = 0               # stop (with a checkpoint) after N steps of this run; for resume tests


def setup_run(cfg):
    """The start of a stage after its own checks: the process group (distributed.py), --dtype=auto resolved, the
    resolved config printed by rank 0, the seed set -> (rank, world size, device, a line saying which dtype and why)."""
    if cfg.dtype not in ("auto", "bfloat16", "float32"):  # before a process group starts
        raise ValueError(f"--dtype must be auto, bfloat16 or float32, not {cfg.dtype!r}")
    rank, world, device = distributed.setup_distributed(cfg.device)
    cfg.dtype, dtype_line = resolve_dtype(cfg.dtype, device)
    if rank == 0:
        cli.print_config(cfg)
    torch.manual_seed(cfg.seed)
    return rank, world, device, dtype_line


def validate(step, make_loader, cfg, device):
    """A phase's metric sums on cfg.eval_batches validation batches, the same ones at every evaluation (the loader of
    seed 0; each rank its stride), summed over the ranks and read to the host once -> {name: float}."""
    loader, sums = make_loader(0, "val"), {}
    for _ in range(cfg.eval_batches):
        add_sums(sums, step({k: v.to(device) for k, v in loader.next_batch().items()})[1])
    return distributed.all_reduce_sum(sums)


def finish_run(stage, phases, student, cfg, meta, make_loader, device, started, frozen=None):
    """The rest of a stage: run_phases, the closing table (rank 0; none when --stop_after stopped the run early), the
    process group's end -> run_phases' results."""
    results, stopped = run_phases(stage, phases, student, cfg, meta, make_loader, device, frozen=frozen)
    if (not dist.is_initialized() or dist.get_rank() == 0) and not stopped:
        print_results(stage, results, time.time() - started)
    distributed.cleanup_distributed()  # through the module: tests/stage_fixtures.py holds it back between runs
    return results


# ----------------------------------------------------------------------------------------------------------------
# The patcher against the teacher's token ends: its loss in stage 1's boundary phase and stage 2's e2e, and its
# figures in both.

def boundary_bce(p, valid, token_end):
    """BCE of the patcher's boundary probabilities p (B, T) against the token ends, a mean over every real byte but
    the last of each window (its p is fixed at 1: there is no next byte to look at).
    -> (bce, the scored bytes' p clamped (N,), their token ends as 0 / 1 (N,), where they are (B, T-1))."""
    sel = valid[:, :-1]
    target = token_end[:, :-1][sel].float()
    prob = p[:, :-1][sel].clamp(1e-6, 1 - 1e-6)
    bce = -(target * prob.log() + (1 - target) * (1 - prob).log()).mean()  # F.binary_cross_entropy refuses autocast
    return bce, prob, target, sel


def boundary_counts(pred, target):
    """True positives, false positives, false negatives of the patcher's decisions pred (N,) against the token ends
    target (N,) -> {name: 0-dim tensor}, on the device."""
    truth = target > 0
    return {"tp": (pred & truth).sum(), "fp": (pred & ~truth).sum(), "fn": (~pred & truth).sum()}


def boundary_f1(sums):
    """Summed counts (floats, boundary_counts' names) -> (precision, recall, F1)."""
    precision = sums["tp"] / max(sums["tp"] + sums["fp"], 1)
    recall = sums["tp"] / max(sums["tp"] + sums["fn"], 1)
    return precision, recall, 2 * precision * recall / max(precision + recall, 1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Optimizer and schedule.

def make_optimizer(named_params, lr, weight_decay, betas=(0.9, 0.95), lr_scale=None):
    """AdamW over the given (name, param) pairs only. Weight decay on matrices; none on norms, biases, embeddings and
    the dechunk null vector. lr_scale(name) -> multiplier gives a parameter group its own learning rate (stage 2b runs
    the byte-level parts at twice the main network's rate)."""
    groups = {}
    for name, p in named_params:
        no_decay = p.dim() < 2 or "embed" in name or "norm" in name
        scale = lr_scale(name) if lr_scale else 1.0
        key = (no_decay, scale)
        groups.setdefault(key, []).append(p)
    param_groups = [{"params": ps, "weight_decay": 0.0 if nd else weight_decay, "lr": lr * s, "lr_scale": s}
                    for (nd, s), ps in sorted(groups.items())]
    everything = [p for g in param_groups for p in g["params"]]
    # FSDP leaves a few parameters whole (plain tensors) beside its DTensor shards, and fused / foreach AdamW refuse
    # lists that mix the two: those take the per-tensor loop
    mixed = len({isinstance(p, DTensor) for p in everything}) > 1
    fused = (all(p.is_cuda for p in everything) and not mixed) or None
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=fused, foreach=False if mixed else None)


def lr_at(step, total_steps, base_lr, warmup_steps):
    """Linear warm-up, then cosine decay to 10% of the base rate at the last step."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


def select_params(model, prefixes):
    """(name, param) pairs whose names start with one of `prefixes`; sets requires_grad on exactly those."""
    chosen = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
        if p.requires_grad:
            chosen.append((name, p))
    return chosen


# ----------------------------------------------------------------------------------------------------------------
# Progress lines.

class Progress:
    """One log line per interval: phase, step, loss parts, bytes/s, ETA."""

    def __init__(self, phase, total_steps, bytes_per_step, start_step=0, enabled=True):
        self.phase, self.total, self.bytes_per_step, self.enabled = phase, total_steps, bytes_per_step, enabled
        self.t0, self.start = time.perf_counter(), start_step

    def bytes_per_s(self, step):  # over the steps this process has run (step is the 0-based step just finished)
        return (step + 1 - self.start) * self.bytes_per_step / max(time.perf_counter() - self.t0, 1e-9)

    def log(self, step, parts):
        rate = self.bytes_per_s(step)
        eta = (self.total - step - 1) * self.bytes_per_step / max(rate, 1e-9)
        if self.enabled:
            text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in parts.items())
            print(f"{self.phase} step {step + 1}/{self.total} | {text} | {rate:,.0f} bytes/s | eta {eta:.0f}s", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# The phase loop both stages share.

@dataclass
class Phase:
    name: str
    budget: int                       # training bytes, all ranks together
    lr: float
    prefixes: tuple                   # names of the student's parameters this phase trains (prefixes)
    step: Callable                    # batch -> (loss, {name: 0-dim tensor of a metric sum}): see train_step
    summarize: Callable               # {name: float} metric sums -> figures to print
    evaluate: Callable                # () -> validation figures, at the end of the phase
    lr_scale: Callable | None = None  # parameter name -> multiplier of lr
    seed: int = 0                     # the loader's shuffling seed


def resolve_dtype(dtype, device):
    """--dtype=auto -> "bfloat16" or "float32". On CUDA bf16. On CPU whichever a short timing of a training-sized
    matmul (forward and backward) shows faster here: CPUs with AMX / AVX512-BF16 run bf16 autocast several times
    faster than fp32, AVX2-only ones several times slower, and the same code runs on both. Every rank takes rank 0's
    choice. -> (dtype, a line saying why)."""
    if dtype not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"--dtype must be auto, bfloat16 or float32, not {dtype!r}")
    if dtype != "auto":
        return dtype, f"autocast {dtype} (--dtype)"
    if device.type == "cuda":
        return "bfloat16", "autocast bfloat16 (--dtype=auto on CUDA)"
    seconds = {"float32": cpu_matmul_seconds(False)}
    seconds["bfloat16"] = cpu_matmul_seconds(True, give_up=2 * seconds["float32"])  # AVX2: one slow run says enough
    choice = torch.tensor([seconds["bfloat16"] < 0.8 * seconds["float32"]])  # bf16 only where it clearly pays
    if dist.is_initialized():
        dist.broadcast(choice, 0)
    dtype = "bfloat16" if bool(choice) else "float32"
    return dtype, (f"autocast {dtype} (--dtype=auto: a 512x1024x1024 matmul, forward and backward, took "
                   f"{seconds['float32'] * 1e3:.1f} ms in fp32 and {seconds['bfloat16'] * 1e3:.1f} ms in bf16 here)")


def cpu_matmul_seconds(bf16, repeats=3, give_up=float("inf")):
    """Best warm time of one forward + backward of a (512 x 1024) @ (1024 x 1024) linear layer on the CPU; the time
    of the first run that takes longer than give_up seconds, if one does."""
    layer = torch.nn.Linear(1024, 1024, bias=False)
    x = torch.randn(512, 1024, requires_grad=True)
    best = float("inf")
    for i in range(repeats + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            layer(x).float().sum().backward()
        took = time.perf_counter() - start
        if took > give_up:  # even a cold run this slow settles the choice
            return took
        if i > 0:  # the first run warms up the kernels
            best = min(best, took)
    return best


def inference_dtype(dtype, device):
    """--dtype of generation (sample.py, bench/generate.py) -> (the weights' torch dtype, a line saying why). auto: bf16
    on CUDA; on CPU bf16 weights where a short timing of decoding-sized products (1 and 8 rows times a 4096 x 1024
    matrix: memory-bound, as a cached step is) shows bf16 clearly faster at both, else fp32 (AVX2-only CPUs)."""
    if dtype not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"--dtype must be auto, bfloat16 or float32, not {dtype!r}")
    if dtype != "auto":
        return getattr(torch, dtype), f"weights in {dtype} (--dtype)"
    if device.type == "cuda":
        return torch.bfloat16, "weights in bfloat16 (--dtype=auto on CUDA)"
    ms = {(kind, rows): decode_matmul_ms(kind, rows) for kind in (torch.float32, torch.bfloat16) for rows in (1, 8)}
    bf16 = all(ms[torch.bfloat16, r] < 0.8 * ms[torch.float32, r] for r in (1, 8))
    return (torch.bfloat16 if bf16 else torch.float32), (
        f"weights in {'bfloat16' if bf16 else 'float32'} (--dtype=auto: 1 and 8 rows x a 4096 x 1024 matrix took "
        f"{ms[torch.float32, 1]:.2f} / {ms[torch.float32, 8]:.2f} ms in fp32, {ms[torch.bfloat16, 1]:.2f} / "
        f"{ms[torch.bfloat16, 8]:.2f} ms in bf16 here)")


def decode_matmul_ms(dtype, rows, repeats=5):
    """Best warm time, ms, of `rows` rows times a 4096 x 1024 matrix in `dtype` on the CPU (a decoding step's shape)."""
    w, x, best = torch.randn(4096, 1024).to(dtype), torch.randn(rows, 1024).to(dtype), float("inf")
    for i in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        for _ in range(4):
            torch.nn.functional.linear(x, w)
        if i:
            best = min(best, (time.perf_counter() - start) / 4)
    return best * 1e3


def autocast(cfg, device):
    """bf16 autocast unless the run is fp32 (cfg.dtype is resolved from "auto" by then)."""
    return nullcontext() if cfg.dtype == "float32" else torch.autocast(device.type, dtype=torch.bfloat16)


def print_results(stage, results, seconds):
    """The closing table of a stage: per phase, bytes trained, bytes/s and the validation figures."""
    print(f"\nstage {stage} finished in {seconds:.0f} s")
    print("| phase | bytes | bytes/s | validation |")
    print("|---|---|---|---|")
    for phase, r in results.items():
        rate = f"{r['bytes_per_s']:,.0f}" if r["bytes_per_s"] else "-"
        print(f"| {phase} | {r['bytes']:,} | {rate} | " + ", ".join(f"{k} {v:.4f}" for k, v in r["val"].items()) + " |")


def trim_metrics(path, names, phase, step):
    """Drop the metrics.jsonl lines of steps after the checkpoint (a run that died after it): the resumed run
    writes them again. Lines of phases outside `names` (not run this time) are kept."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    order = {name: i for i, name in enumerate(names)}
    at = order.get(phase, -1)

    def before_checkpoint(line):
        r = json.loads(line)
        i = order.get(r["phase"], -1)
        return i < 0 or i < at or (i == at and r["step"] < step)
    kept = [line for line in lines if before_checkpoint(line)]
    if len(kept) < len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


def resume_from(folder, student, stage, cfg, meta, world, names):
    """--resume: folder's config.json, checked by check_resume, and its weights into `student`; plus the resume state
    when it stopped mid-phase in a phase this run trains -> (config.json's contents, resume state or None)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        checkpoint.finish_save(folder)  # a save that died after its commit: complete it before reading
    if dist.is_initialized():
        dist.barrier()
    saved, resume = checkpoint.load_student(folder)
    check_resume(folder, resume, stage, cfg, meta, world)
    mid_phase = resume["phase"] in names and not resume["phase_done"]
    state = load_resume_state(folder, resume["save_id"]) if mid_phase else None
    student.load_state_dict(saved.state_dict())
    return resume, state


def add_sums(total, stats):
    """Add a step's stats ({name: 0-dim tensor}) into total, on the device, in float64: the sums add up the figures of
    many micro-batches, as Python's floats did when the stats were read at every step. -> total."""
    for k, v in stats.items():
        v = v.detach().to(torch.float64)
        total[k] = total[k] + v if k in total else v
    return total


def train_step(phase, loader, cfg, device, trainable, optimizer, reducer=None):
    """One optimizer update: cfg.grad_accum micro-steps, the gradients summed over micro-steps and ranks and divided
    by the global count, clipped, applied. -> (metric names; their sums over the micro-steps and ranks, one float64
    tensor; the gradient norm before clipping), all on the device: nothing here reads a tensor to the host.

    The loss contract of phase.step(batch) -> (loss, stats): stats maps names to 0-dim tensors, the micro-batch's
    metric sums, and stats["n"] is the number of elements (token ends, patches, bytes) that `loss` is a mean over.
    Those counts differ between micro-batches and ranks, so loss * n (the micro-batch's sum) is backpropagated and the
    summed gradient is divided by the global count n afterwards, a tensor on the device: the update is the one a
    single process makes over the whole global batch. A loss term that is a mean over another count (stage 2's
    patcher BCE, over its n_p boundary decisions) enters the update weighted by the micro-batch's n like the rest."""
    sums = {}
    for micro in range(cfg.grad_accum):
        batch = {k: v.to(device) for k, v in loader.next_batch().items()}
        if reducer is not None:  # all-reduce during the last micro-step's backward only (DDP's no_sync before it)
            reducer.sync = micro == cfg.grad_accum - 1
        with autocast(cfg, device):
            loss, stats = phase.step(batch)
        (loss * stats["n"]).backward()  # the micro-batch's sum; sync_grads divides by the global n
        add_sums(sums, stats)
    keys, totals = all_reduce_sums(sums)
    sync_grads(trainable, totals[keys.index("n")], reducer)
    grad_norm = clip_grad_norm(trainable, cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return keys, totals, grad_norm


class StepLog:
    """metrics.jsonl, one line per step, written in batches: each step's sums and gradient norm stay on the device in
    a short list until a logging step (or a checkpoint), when one host read (.tolist() of one stacked tensor) serves
    them all; a step in between reads nothing. Only rank 0 reads and writes; the other ranks drop theirs."""

    def __init__(self, path, phase, master):
        self.path, self.phase, self.master, self.pending = path, phase, master, []

    def add(self, step, keys, totals, grad_norm):
        self.pending.append((step, keys, torch.cat([totals, grad_norm.detach().to(totals).reshape(1)])))

    def flush(self):
        """Write the pending steps' lines -> the latest step's figures, {} if there is none or this is not rank 0."""
        pending, self.pending = self.pending, []
        if not self.master or not pending:
            return {}
        rows = torch.stack([row for _, _, row in pending]).tolist()  # the one host read
        lines = []
        for (step, keys, _), row in zip(pending, rows):
            figures = self.phase.summarize(dict(zip(keys, row[:-1])))
            lines.append(json.dumps({"phase": self.phase.name, "step": step, **figures, "grad_norm": row[-1]}) + "\n")
        with open(self.path, "a") as f:
            f.writelines(lines)
        return figures


def start_run(stage, phases, student, cfg, meta, world, master):
    """run_phases' start: the phases with a budget above 0 (the others skipped); with cfg.resume, the checkpoint's
    weights into `student` and the phases still to run; a fresh metrics.jsonl for a fresh run, the lines of steps
    after the checkpoint dropped for a resumed one.
    -> (phases to run, resume (config.json's contents) or None, resume state or None, results so far)."""
    if master and any(p.budget <= 0 for p in phases):
        print("skipping " + ", ".join(p.name for p in phases if p.budget <= 0) + " (a budget of 0 bytes)", flush=True)
    phases = [p for p in phases if p.budget > 0]
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    names = [p.name for p in phases]
    resume, resume_state = None, None
    if cfg.resume:
        resume, resume_state = resume_from(cfg.out_dir, student, stage, cfg, meta, world, names)
    os.makedirs(cfg.out_dir, exist_ok=True)
    if master and not cfg.resume and os.path.exists(metrics_path):
        os.remove(metrics_path)  # a fresh run starts a fresh log; a resumed one appends
    if resume is None:
        return phases, None, None, {}
    if master:
        trim_metrics(metrics_path, names, resume["phase"], resume["step"])
    if resume["phase"] in names:  # skip what the checkpoint already finished
        done = names.index(resume["phase"]) + (1 if resume["phase_done"] else 0)
        phases = phases[done:]
    if master:
        print(f"resuming from {cfg.out_dir}: phase {resume['phase']} step {resume['step']}"
              f"{' (finished)' if resume['phase_done'] else ''}")
    return phases, resume, resume_state, dict(resume.get("results", {}))


def start_phase(phase, student, cfg, make_loader, resume=None, resume_state=None):
    """A phase's trained parameters, its optimizer over them and its loader, at the checkpoint's position (and RNG state)
    when the run resumes in this phase -> (trained parameters, optimizer, loader, first step)."""
    params = select_params(student, phase.prefixes)
    optimizer = make_optimizer(params, phase.lr, cfg.weight_decay, lr_scale=phase.lr_scale)
    loader = make_loader(phase.seed)
    start = 0
    if resume is not None and resume["phase"] == phase.name and not resume["phase_done"]:
        load_optimizer_state(optimizer, {p: n for n, p in params}, shard_like(resume_state["optimizer"], params),
                             resume_state["optimizer_groups"])
        loader.load_state_dict(resume_state["loader"])
        set_rng_state(resume_state["rng"])
        start = resume["step"]
    return [p for _, p in params], optimizer, loader, start


def run_phases(stage, phases, student, cfg, meta, make_loader, device, frozen=None):
    """Train `phases` in order, each with its own optimizer over only its parameters, warm-up + cosine schedule,
    gradient accumulation (gradients summed over the ranks during the last micro-step's backward), a log line per
    interval, a metrics.jsonl line per step (written at logging steps), an evaluation and a checkpoint at the end, and
    a checkpoint every cfg.ckpt_interval steps.
    With cfg.fsdp on more than one rank, the student and the blocks of `frozen` (stage 1's teacher) are sharded with
    FSDP2 after any resume has loaded the whole weights, and every phase starts with a line of memory per rank.
    The checkpoints: out_dir itself, a byte-model folder of the latest weights with out_dir/resume/ beside them, and
    out_dir/<phase>/, the byte-model folder of each phase's end. With cfg.resume, continues from out_dir exactly:
    model, optimizer, loader position and RNG state. A phase with a budget of 0 bytes is skipped (start_run).
    Returns {phase: {"bytes", "steps", "val", "bytes_per_s"}} and whether the run stopped early (cfg.stop_after)."""
    master = not dist.is_initialized() or dist.get_rank() == 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    make_loader(0, "val")  # every phase ends with an evaluation on it: fail now, not after a phase of training
    phases, resume, resume_state, results = start_run(stage, phases, student, cfg, meta, world, master)
    steps_run = 0
    fsdp = getattr(cfg, "fsdp", False)
    if fsdp and world > 1:
        shard_student(student, device, bf16=cfg.dtype == "bfloat16")
        if frozen is not None:
            shard_frozen(frozen)
    for phase in phases:
        bytes_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world
        total = max(1, phase.budget // bytes_per_step)
        warmup = max(1, int(cfg.warmup_frac * total))
        trainable, optimizer, loader, start = start_phase(phase, student, cfg, make_loader, resume, resume_state)
        resume = None
        progress = Progress(phase.name, total, bytes_per_step, start, enabled=master)
        if master:
            print(f"== {phase.name}: {total} steps x {bytes_per_step:,} bytes, lr {phase.lr:g}, "
                  f"{sum(p.numel() for p in trainable) / 1e6:.2f}M trainable parameters", flush=True)
        if fsdp:
            print_memory(phase.name, memory_bytes(student, trainable, frozen), device)
        log = StepLog(os.path.join(cfg.out_dir, "metrics.jsonl"), phase, master)

        def save(step, done, folder=cfg.out_dir, full=True):
            log.flush()  # the lines of every step the checkpoint holds, before it
            if master or sharded(student):  # FSDP: every rank takes part in gathering the shards
                info = {"stage": stage, "config": asdict(cfg), **meta, "world_size": world, "phase": phase.name,
                        "step": step, "phase_done": done, "results": results}
                save_checkpoint(folder, student, info, (optimizer, loader) if full else None)  # full: exact resume

        # FSDP shards (DTensors) are summed by FSDP's own reduce-scatter; the reducer takes the whole parameters
        whole = [p for p in trainable if not isinstance(p, DTensor)]
        reducer = GradReducer(whole) if world > 1 and whole else None
        try:
            for step in range(start, total):
                lr = lr_at(step, total, phase.lr, warmup)
                set_lr(optimizer, lr)
                log.add(step, *train_step(phase, loader, cfg, device, trainable, optimizer, reducer))
                if step % cfg.log_interval == 0 or step == total - 1:
                    progress.log(step, {**log.flush(), "lr": lr})
                steps_run += 1
                if step + 1 < total and cfg.ckpt_interval and (step + 1) % cfg.ckpt_interval == 0:
                    save(step + 1, False)
                if step + 1 < total and cfg.stop_after and steps_run >= cfg.stop_after:
                    save(step + 1, False)
                    if master:
                        print(f"stopped after {steps_run} steps (--stop_after); continue with --resume", flush=True)
                    return results, True
        finally:
            if reducer is not None:
                reducer.remove()

        stop_here = cfg.stop_after and steps_run >= cfg.stop_after and phase is not phases[-1]
        with torch.no_grad(), autocast(cfg, device):
            figures = phase.evaluate()
        rate = progress.bytes_per_s(total - 1) if total > start else None
        results[phase.name] = {"bytes": total * bytes_per_step, "steps": total, "val": figures, "bytes_per_s": rate}
        if master:
            print(f"== {phase.name} done | val " + " ".join(f"{k} {v:.4f}" for k, v in figures.items()), flush=True)
        save(total, True)
        save(total, True, os.path.join(cfg.out_dir, phase.name), full=False)
        if stop_here:  # --stop_after landed on the end of a phase
            if master:
                print(f"stopped after {steps_run} steps (--stop_after); continue with --resume", flush=True)
            return results, True
    return results, False
