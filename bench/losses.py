"""Measures losses.py: the byte-head loss (speed and memory, GPU) and the chunked teacher-vocabulary KL (peak memory).

    python bench/losses.py                      # CPU: correctness checks + KL peak memory; GPU: everything
    python bench/losses.py --json=out/losses.json

1. correctness: the byte-loss kernel and the chunked KL against their fp32 oracles (max errors). On CPU the
   Triton kernel runs in the interpreter, so timings there would mean nothing and are not taken.
2. byte-head loss at stage-2 sizes (CUDA only): forward+backward milliseconds and peak memory above the inputs for
   the Triton kernel (with and without inplace), the eager PyTorch reference, torch.compile of the reference, and
   F.cross_entropy on the upcast logits.
3. reverse KL over the teacher vocabulary (V = 49,152 SmolLM2/OLMo-class, 151,936 Qwen): peak memory of the
   chunked function against the plain full-logits formula, forward+backward. On CUDA from
   torch.cuda.max_memory_allocated; on CPU each case runs in a fresh subprocess that resets the kernel's
   peak-RSS mark (/proc/self/clear_refs) after building its inputs and reads VmHWM after the backward.
"""
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton` (inside losses.py)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[0] = REPO  # this file is also called losses.py: make `import losses` find the repo's module
import cli  # noqa: E402
import losses  # noqa: E402
import torch.nn.functional as F  # noqa: E402


@dataclass
class Config:
    json: str = ""  # write the measurements here
    ce_rows: int = 16 * 8192  # stage-2 micro-batch: 16 sequences x 8192 bytes
    ce_vocab: int = 512
    ce_iters: int = 20
    kl_vocabs: str = "49152,151936"
    kl_rows: int = 0  # 0: 8192 on CUDA, 1024 on CPU
    kl_width: int = 0  # 0: 2048 on CUDA, 256 on CPU (the width barely matters for the logits' memory)
    kl_chunk_rows: int = 0  # 0: 1024 on CUDA, 128 on CPU
    kl_case: str = ""  # internal: run one CPU memory case in this process ("chunked:49152") and print JSON


# ----------------------------------------------------------------------------------------------------------------
# 1. correctness

def check_correctness(device):
    """Max |error| of the byte-loss kernel and of the chunked KL against fp32 oracles, next to PyTorch's own."""
    results = {}
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(1000, 512, generator=gen) * 3).to(device, dtype)
        targets = torch.randint(0, 512, (1000,), generator=gen).to(device)
        targets[::7] = -100
        errors = {}
        for name, fn, x in (("kernel", losses.byte_cross_entropy, logits),
                            ("torch_same_dtype", F.cross_entropy, logits),
                            ("oracle", F.cross_entropy, logits.float())):
            x = x.detach().clone().requires_grad_()
            loss = fn(x, targets)
            loss.backward()
            errors[name] = (loss.detach().float(), x.grad.float())
        ref_loss, ref_grad = errors.pop("oracle")
        for name, (loss, grad) in errors.items():
            results[f"ce_{str(dtype)[6:]}_{name}"] = {"loss_err": (loss - ref_loss).abs().item(),
                                                      "grad_err": (grad - ref_grad).abs().max().item()}
    student = torch.randn(300, 64, generator=gen)
    teacher = student + 0.5 * torch.randn(300, 64, generator=gen)
    head = torch.randn(5000, 64, generator=gen) / 2
    mask = torch.rand(300, generator=gen) > 0.2
    outputs = []
    for fn, kwargs in ((losses.chunked_reverse_kl, {"chunk_rows": 77}), (losses.reverse_kl_reference, {})):
        h = student.to(device).requires_grad_()
        loss, matches = fn(h, teacher.to(device), head.to(device), mask.to(device), **kwargs)
        loss.backward()
        outputs.append((loss.detach(), matches.item(), h.grad))
    (loss, matches, grad), (ref_loss, ref_matches, ref_grad) = outputs
    results["kl_chunked_vs_plain"] = {"loss_err": (loss - ref_loss).abs().item(),
                                      "grad_err": (grad - ref_grad).abs().max().item(),
                                      "matches": matches, "matches_plain": ref_matches}
    return results


# ----------------------------------------------------------------------------------------------------------------
# 2. byte-head loss speed and memory (CUDA)

def time_and_peak_cuda(step, iters):
    """(median ms of step(), peak MB allocated above what was live before the first call)."""
    for _ in range(3):  # warm-up: Triton/inductor compilation, allocator caching
        step()
    torch.cuda.synchronize()
    live = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak_mb = (torch.cuda.max_memory_allocated() - live) / 2**20
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], peak_mb


def bench_byte_loss_cuda(config):
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(config.ce_rows, config.ce_vocab, device="cuda", generator=gen).to(torch.bfloat16) * 3
    targets = torch.randint(0, config.ce_vocab, (config.ce_rows,), device="cuda", generator=gen)
    targets[::50] = -100
    compiled = torch.compile(losses.byte_cross_entropy_reference, dynamic=False)
    variants = {
        "triton kernel": lambda x: losses.byte_cross_entropy(x, targets),
        "triton kernel, inplace": lambda x: losses.byte_cross_entropy(x * 1, targets, inplace=True),
        "eager reference (fp32 math)": lambda x: losses.byte_cross_entropy_reference(x, targets),
        "torch.compile(reference)": lambda x: compiled(x, targets),
        "F.cross_entropy(x.float())": lambda x: F.cross_entropy(x.float(), targets),
    }
    results = {}
    for name, loss_fn in variants.items():
        def step():
            x = logits.detach().requires_grad_()
            loss_fn(x).backward()
        # The inplace variant pays for its `x * 1` (a stand-in for the head's output buffer) in time and memory.
        ms, peak_mb = time_and_peak_cuda(step, config.ce_iters)
        results[name] = {"ms_fwd_bwd": ms, "peak_mb": peak_mb}
    return results


# ----------------------------------------------------------------------------------------------------------------
# 3. reverse KL peak memory

def kl_inputs(vocab, rows, width, device, dtype):
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(rows, width, generator=gen)
    student = teacher + 0.5 * torch.randn(rows, width, generator=gen)
    head = torch.randn(vocab, width, generator=gen) / width ** 0.5 * 4
    mask = torch.rand(rows, generator=gen) > 0.1
    return (student.to(device, dtype).requires_grad_(), teacher.to(device, dtype), head.to(device, dtype),
            mask.to(device))


def kl_step(impl, inputs, chunk_rows):
    student, teacher, head, mask = inputs
    student.grad = None
    if impl == "plain":
        loss, _ = losses.reverse_kl_reference(student, teacher, head, mask)
    else:
        loss, _ = losses.chunked_reverse_kl(student, teacher, head, mask, chunk_rows=chunk_rows,
                                             use_triton=(impl == "chunked_triton"))
    loss.backward()
    return loss.item()


def read_status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def kl_case_cpu(config):
    """Child process: one (impl, vocab) case; prints {"peak_mb": ..., "seconds": ...} as its last line."""
    impl, vocab = config.kl_case.split(":")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    inputs = kl_inputs(int(vocab), config.kl_rows, config.kl_width, "cpu", torch.float32)
    kl_step(impl, kl_inputs(64, 8, config.kl_width, "cpu", torch.float32), 4)  # warm up code paths, not memory
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS mark to the current RSS (Linux >= 4.0)
    before_kb = read_status_kb("VmRSS")
    start = time.time()
    kl_step(impl, inputs, config.kl_chunk_rows)
    peak_kb = read_status_kb("VmHWM")
    print(json.dumps({"peak_mb": (peak_kb - before_kb) / 1024, "seconds": time.time() - start}))


def bench_kl(config, device):
    vocabs = [int(v) for v in config.kl_vocabs.split(",")]
    impls = ["chunked", "plain"] + (["chunked_triton"] if device == "cuda" and losses.triton is not None else [])
    results = {impl: {} for impl in impls}
    for vocab in vocabs:
        for impl in impls:
            if device == "cuda":
                inputs = kl_inputs(vocab, config.kl_rows, config.kl_width, "cuda", torch.bfloat16)
                ms, peak_mb = time_and_peak_cuda(lambda: kl_step(impl, inputs, config.kl_chunk_rows), 5)
                results[impl][vocab] = {"peak_mb": peak_mb, "ms_fwd_bwd": ms}
                del inputs
                torch.cuda.empty_cache()
            else:
                command = [sys.executable, os.path.abspath(__file__), f"--kl_case={impl}:{vocab}",
                           f"--kl_rows={config.kl_rows}", f"--kl_width={config.kl_width}",
                           f"--kl_chunk_rows={config.kl_chunk_rows}"]
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                case = json.loads(done.stdout.strip().splitlines()[-1])
                results[impl][vocab] = {"peak_mb": case["peak_mb"], "s_fwd_bwd": case["seconds"]}
            print(f"  kl {impl:15s} V={vocab:7d}: {results[impl][vocab]}", flush=True)
    return results


# ----------------------------------------------------------------------------------------------------------------

def main():
    config = cli.parse_args(Config, sys.argv[1:])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config.kl_rows = config.kl_rows or (8192 if device == "cuda" else 1024)
    config.kl_width = config.kl_width or (2048 if device == "cuda" else 256)
    config.kl_chunk_rows = config.kl_chunk_rows or (1024 if device == "cuda" else 128)
    if config.kl_case:
        return kl_case_cpu(config)
    print(f"config: {asdict(config)}")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton in the interpreter)"
    print(f"device: {name}, torch {torch.__version__}, triton "
          f"{getattr(losses.triton, '__version__', 'absent')}")
    report = {"device": name, "config": asdict(config)}

    report["correctness"] = check_correctness(device)
    print("\ncorrectness (max |error| against the fp32 oracle)")
    for key, value in report["correctness"].items():
        print(f"  {key:28s} " + "  ".join(f"{k}={v:.3g}" for k, v in value.items()))

    if device == "cuda":
        report["byte_loss"] = bench_byte_loss_cuda(config)
        print(f"\nbyte-head loss, N={config.ce_rows} rows, V={config.ce_vocab}, bf16 logits, forward+backward")
        print(f"  {'implementation':30s} {'ms':>8s} {'peak MB':>9s}")
        for impl, row in report["byte_loss"].items():
            print(f"  {impl:30s} {row['ms_fwd_bwd']:8.3f} {row['peak_mb']:9.1f}")
    else:
        report["byte_loss"] = None
        print("\nbyte-head loss timings need a CUDA GPU (the interpreter's speed means nothing): skipped")

    print(f"\nreverse KL, N={config.kl_rows} rows, C={config.kl_width}, chunk_rows={config.kl_chunk_rows}, "
          f"{'bf16' if device == 'cuda' else 'fp32'} inputs, forward+backward")
    kl = bench_kl(config, device)
    report["kl"] = kl
    report["kl_peak_mb_chunked"] = {v: row["peak_mb"] for v, row in kl["chunked"].items()}
    report["kl_peak_mb_plain"] = {v: row["peak_mb"] for v, row in kl["plain"].items()}
    if "chunked_triton" in kl:
        report["kl_peak_mb_chunked_triton"] = {v: row["peak_mb"] for v, row in kl["chunked_triton"].items()}
    print(f"\n  {'V':>8s} " + " ".join(f"{impl + ' MB':>20s}" for impl in kl)
          + f" {'N*V fp32 MB':>12s} {'plain/chunked':>14s}")
    for vocab in kl["plain"]:
        ratio = kl["plain"][vocab]["peak_mb"] / max(kl["chunked"][vocab]["peak_mb"], 1e-9)
        print(f"  {vocab:8d} " + " ".join(f"{kl[impl][vocab]['peak_mb']:20.1f}" for impl in kl)
              + f" {config.kl_rows * vocab * 4 / 2**20:12.1f} {ratio:14.1f}")

    if config.json:
        os.makedirs(os.path.dirname(os.path.abspath(config.json)), exist_ok=True)
        with open(config.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"\nwrote {config.json}")


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
