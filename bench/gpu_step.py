"""One training step of every phase at the paper's per-rank shape, on a random-weight student and teacher of a preset's
shape (nothing to download): peak GPU memory, bytes per second and model FLOP utilisation per phase. bench/gpu_check.sh
runs it on a lent GPU; on a CPU it runs the same code at a toy shape (a check of the plumbing, nothing more).

    python bench/gpu_step.py [--preset=olmo] [--batch_size=32] [--seq_len=8192] [--checkpoint_blocks=True] [--json=PATH]

Each phase: a warm-up step, then a timed one, through the stage scripts' own step functions (align, distill with the
main network trained, boundary, warmup, e2e), AdamW over what the phase trains, bf16 autocast on CUDA. The bytes are
random and patches end every --patch_bytes bytes on average (the teacher's token ends in stage 1; in stage 2 the
patcher's threshold is set so that its patches are that long, as a trained patcher's are). The prior and the subword
embedding use a synthetic vocabulary of --vocab_entries entries (the 256 bytes and random strings of 2-16 bytes).
Model FLOPs: counted by torch's FlopCounterMode on one row without recomputation (matmuls and attention; what
--checkpoint_blocks recomputes is not model FLOPs), times the batch; utilisation = those FLOPs per second over
--peak_tflops (default: 989 bf16 dense on an H100 or H200, unknown elsewhere).
"""
import importlib.util
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import cli  # noqa: E402
import model  # noqa: E402
import stage1_kd  # noqa: E402
import stage2_sft  # noqa: E402
import train  # noqa: E402
from transformer import Transformer  # noqa: E402

# bench/memory.py's preset shapes (published config.json values), loaded by path (bench/ holds data.py and teacher.py:
# never on sys.path)
_spec = importlib.util.spec_from_file_location("bench_memory", os.path.join(REPO, "bench", "memory.py"))
memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memory)


@dataclass
class Config:
    preset: str = "olmo"              # olmo | llama | qwen | smollm2 (a small CPU check)
    batch_size: int = 32              # rows per rank (the README's paper-scale shape)
    seq_len: int = 8192
    main_layers: int = 0              # 0: the preset's depth
    n_enc: int = 4
    n_dec: int = 4
    patch_bytes: float = 4.3          # mean bytes per patch (token)
    vocab_entries: int = 50000
    checkpoint_blocks: bool = True
    kl_chunk_rows: int = 4096
    phases: str = "align,distill,boundary,warmup,e2e"
    device: str = "cuda"
    peak_tflops: float = 0.0          # 0: 989 on an H100 / H200 (bf16 dense), else utilisation is not printed
    seed: int = 0
    json: str = ""                    # also write the rows here


def synthetic_vocabulary(n, seed):
    """The 256 single bytes, then random byte strings of 2-16 bytes: id -> bytes."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 17, (max(0, n - 256),), generator=g).tolist()
    return [bytes([i]) for i in range(256)] + [bytes(torch.randint(0, 256, (k,), generator=g).tolist()) for k in lengths]


def build(cfg, device):
    tcfg, _ = memory.teacher_config(cfg.preset)
    if cfg.main_layers:
        tcfg.n_layers = cfg.main_layers
    vocab = synthetic_vocabulary(min(cfg.vocab_entries, tcfg.vocab_size), cfg.seed)
    entries, _ = model.prior_vocabulary(vocab)
    scfg = model.StudentConfig.for_teacher(tcfg, n_enc=cfg.n_enc, n_dec=cfg.n_dec, prior_vocab=len(entries),
                                           prior_bytes=sum(map(len, entries)), subword=True)
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        teacher = Transformer(tcfg).eval()
        student = model.ByteLM(scfg, tcfg).init_weights(teacher)
    student.attach_prior(teacher.head_weight, vocab, teacher.embed_tokens.weight, 0)
    if device.type == "cuda":
        teacher.to(torch.bfloat16)
    return student.recompute_blocks(cfg.checkpoint_blocks), teacher.requires_grad_(False)


def batch(cfg, device, rows, g):
    x = torch.randint(0, 256, (rows, cfg.seq_len), generator=g).to(device)
    ends = (torch.rand(rows, cfg.seq_len, generator=g) < 1 / cfg.patch_bytes).to(device)
    ends[:, -1] = True
    token_id = torch.where(ends, torch.randint(0, cfg.vocab_entries, ends.shape, generator=g).to(device), -1)
    return {"bytes": x, "valid": torch.ones_like(ends), "token_end": ends, "token_id": token_id}


def calibrate_patcher(student, cfg, sample):
    """Stage 2 runs on the patcher's own patches: set its threshold to the quantile that makes them patch_bytes long."""
    with torch.no_grad():
        p = student.boundary_probs(student.encode(sample["bytes"][:1]))
    student.scfg.boundary_threshold = float(p.flatten().float().quantile(1 - 1 / cfg.patch_bytes))


def phases(cfg, student, teacher):
    embed = teacher.embed_tokens.weight.detach()
    embed_var = float((embed.float() - embed.float().mean(0)).pow(2).mean())
    B = model.ByteLM
    return {
        "align": (B.ENCODER_SIDE, lambda b: stage1_kd.align_step(student, b, embed, embed_var)),
        "distill": (B.ENCODER_SIDE + B.MAIN,
                    lambda b: stage1_kd.distill_step(student, teacher, b, cfg.kl_chunk_rows)),
        "boundary": (B.PATCHER, lambda b: stage1_kd.boundary_step(student, b)),
        "warmup": (B.OUTPUT_SIDE, lambda b: stage2_sft.sft_step(student, b)),
        "e2e": (("",), lambda b: stage2_sft.sft_step(student, b, boundary_weight=1.0)),
    }


def model_flops(student, step, one_row):
    """FLOPs of one row's forward and backward as written (no recomputation)."""
    on = student.encoder.checkpoint_blocks
    student.recompute_blocks(False)
    with FlopCounterMode(display=False) as counter:
        loss, stats = step(one_row)
        (loss * stats["n"]).backward()
    student.recompute_blocks(on)
    return counter.get_total_flops()


def run_phase(cfg, device, student, step, prefixes, batches):
    params = train.select_params(student, prefixes)
    optimizer = train.make_optimizer(params, 1e-5, 0.1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for b in batches:  # a warm-up step, then the timed one
        start = time.perf_counter()
        with autocast:
            loss, stats = step(b)
        (loss * stats["n"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    with autocast:
        flops = model_flops(student, step, {k: v[:1] for k, v in batches[-1].items()}) * cfg.batch_size
    optimizer.zero_grad(set_to_none=True)
    del optimizer
    return {"seconds": seconds[-1], "peak_gib": peak / 2 ** 30, "bytes_per_s": cfg.batch_size * cfg.seq_len / seconds[-1],
            "model_tflops": flops / 1e12}


def main(argv):
    cfg = cli.parse_args(Config, argv)
    if cfg.preset not in memory.PUBLISHED:
        raise SystemExit(f"error: --preset must be one of {', '.join(memory.PUBLISHED)}, not {cfg.preset!r}")
    device = torch.device(cfg.device if cfg.device != "cuda" or torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = cfg.peak_tflops or (989.0 if any(k in name for k in ("H100", "H200")) else 0.0)
    student, teacher = build(cfg, device)
    g = torch.Generator().manual_seed(cfg.seed)
    batches = [batch(cfg, device, cfg.batch_size, g) for _ in range(2)]
    print(f"{name}: random {cfg.preset}-shape student ({sum(p.numel() for p in student.parameters()) / 1e9:.2f}B "
          f"parameters, main network {student.tcfg.n_layers} blocks, byte blocks {cfg.n_enc} + {cfg.n_dec}), "
          f"{cfg.batch_size} x {cfg.seq_len} bytes per step, --checkpoint_blocks={cfg.checkpoint_blocks}", flush=True)
    print("| phase | step s | peak GiB | bytes/s | model TFLOP per step | utilisation |\n|---|---|---|---|---|---|")
    rows = {}
    for phase, (prefixes, step) in phases(cfg, student, teacher).items():
        if phase not in cfg.phases.split(","):
            continue
        if phase == "warmup":
            calibrate_patcher(student, cfg, batches[0])
        try:
            r = rows[phase] = run_phase(cfg, device, student, step, prefixes, batches)
        except torch.OutOfMemoryError as e:  # the other phases still say what they hold
            student.zero_grad(set_to_none=True)
            rows[phase] = {"error": f"out of memory: {str(e)[:200]}"}
            print(f"| {phase} | out of memory | | | | |", flush=True)
            continue
        mfu = f"{r['model_tflops'] / r['seconds'] / peak:.1%}" if peak else "-"
        print(f"| {phase} | {r['seconds']:.2f} | {r['peak_gib']:.1f} | {r['bytes_per_s']:,.0f} | "
              f"{r['model_tflops']:.3g} | {mfu} |", flush=True)
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump({"config": asdict(cfg), "device": name, "peak_tflops": peak, "phases": rows}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
