"""CPU proxies for a paper-scale GPU step: what grows with the window length T, measured here on a random-weight student
of the OLMo-2-1B shape (main network cut to --main_layers blocks; byte blocks --n_enc + --n_dec at the preset's width;
the prior and the subword embedding on, over the embedded teacher's vocabulary), fed held-out Hamlet with the
embedded tokenizer's token ends as patches (so patches are as long as real tokens).

    python bench/scale.py [--json=PATH]

One table, ratios measured side by side in this run:
- aten ops of one stage-2 forward at T = --t_long over T = --t_short, batch 1: a forward whose work is vectorised over
  bytes runs about the same ops at any T (on a GPU each op is a kernel launch); one that loops over bytes grows with T.
  The prior's vocabulary-sized work goes in chunks of a fixed number of elements (targets.chunk_budget), more chunks
  for more patches: counted with this CPU's budget and with a GPU's;
- forward + backward seconds per byte at T = --t_long over T = 512, the same bytes per call (batch t_long / 512 at
  512): flat when nothing costs T^2;
- activation bytes saved for backward per byte (torch.autograd.graph.saved_tensors_hooks; the slope between
  T = --t_mid and 2 x t_mid), without and with --checkpoint_blocks, and their ratio;
- host syncs (Tensor.item / tolist / __bool__ / __int__ / __float__ calls) in one stage-2 forward + backward.
Everything runs in fp32 on this machine's threads; the GPU script (bench/gpu_check.sh) measures the real step.
"""
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import cli  # noqa: E402
import data  # noqa: E402
import model  # noqa: E402
import targets  # noqa: E402
from teacher import config_from_hf, resolve_teacher_dir  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

# bench/memory.py's published preset shapes, loaded by path (bench/ holds data.py and teacher.py: never on sys.path)
_spec = importlib.util.spec_from_file_location("bench_memory", os.path.join(REPO, "bench", "memory.py"))
memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memory)


@dataclass
class Config:
    preset: str = "olmo"              # the teacher shape (bench/memory.py's published configs)
    main_layers: int = 2              # blocks of the main network kept (per-layer figures scale with the real count)
    n_enc: int = 4
    n_dec: int = 4
    t_short: int = 256
    t_mid: int = 1024
    t_long: int = 4096
    threads: int = 0                  # torch threads; 0 = as many as cores
    json: str = ""                    # also write the figures here


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that reach the kernels (each is a kernel launch on a GPU)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


class SyncCounter:
    """Counts the Tensor methods that read a value to the host (a device sync on a GPU) while active."""
    METHODS = ("item", "tolist", "__bool__", "__int__", "__float__")

    def __enter__(self):
        self.n, self.saved = 0, {m: getattr(torch.Tensor, m) for m in self.METHODS}
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, self._counting(original))
        return self

    def _counting(self, original):
        def counted(t, *args, **kwargs):
            self.n += 1
            return original(t, *args, **kwargs)
        return counted

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)


def build(cfg):
    """-> (random-weight student of the preset's shape, held-out bytes (N,), token ends (N,))."""
    tcfg, _ = memory.teacher_config(cfg.preset)
    tcfg.n_layers = cfg.main_layers
    tok = load_tokenizer(resolve_teacher_dir("smollm2"))
    entries, _ = model.prior_vocabulary(tok.id_to_bytes)
    scfg = model.StudentConfig.for_teacher(tcfg, n_enc=cfg.n_enc, n_dec=cfg.n_dec, prior_vocab=len(entries),
                                           prior_bytes=sum(map(len, entries)), subword=True)
    torch.manual_seed(0)
    student = model.ByteLM(scfg, tcfg).init_weights()
    rows = len(tok.id_to_bytes)
    student.attach_prior(torch.randn(rows, tcfg.d_model) * 0.02, tok.id_to_bytes, torch.randn(rows, tcfg.d_model) * 0.02,
                         tok.doc_start_id)
    text = open(data.play_path("hamlet"), encoding="utf-8").read()[:3 * cfg.t_long]
    ids = tok.encode(text)
    lengths = torch.tensor([len(tok.token_bytes(i)) for i in ids])
    x = torch.tensor(list(b"".join(tok.token_bytes(i) for i in ids)))
    ends = torch.zeros(len(x), dtype=torch.bool)
    ends[lengths.cumsum(0) - 1] = True
    return student, x, ends


def window(x, ends, batch, T):
    """batch rows of T bytes each, consecutive pieces of the text (the last byte of each row ends a patch)."""
    xs, es = x[:batch * T].view(batch, T), ends[:batch * T].view(batch, T).clone()
    es[:, -1] = True
    return xs, es


def stage2_loss(student, x, ends):
    logits, p, _ = student(x, ends)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 512).float(), x[:, 1:].reshape(-1)) + p.mean()


def measure(cfg, student, x, ends):
    out = {}
    cpu_budget = targets.chunk_budget
    with torch.no_grad():
        for key, budget in (("ops", cpu_budget), ("ops_gpu_budget", lambda device: cpu_budget("cuda"))):
            targets.chunk_budget = budget  # the prior's vocabulary-sized chunks as this CPU or a GPU sizes them
            for T in (cfg.t_short, cfg.t_long):
                counter = OpCounter()
                with counter:
                    student(*window(x, ends, 1, T))
                out[f"{key}_T{T}"] = counter.n
    targets.chunk_budget = cpu_budget
    for T in (512, cfg.t_long):  # the same bytes per call
        xs, es = window(x, ends, cfg.t_long // T, T)
        stage2_loss(student, xs, es).backward()  # warm-up
        start = time.perf_counter()
        stage2_loss(student, xs, es).backward()
        out[f"s_per_byte_T{T}"] = (time.perf_counter() - start) / xs.numel()
        student.zero_grad(set_to_none=True)
    for on in (False, True):
        student.recompute_blocks(on)
        saved = []
        for T in (cfg.t_mid, 2 * cfg.t_mid):
            storages = {}

            def pack(t):  # a tensor saved by several ops (or views of one) is held once
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = stage2_loss(student, *window(x, ends, 1, T))
            saved.append(sum(storages.values()))
            del loss
        out[f"saved_per_byte_{'ckpt' if on else 'plain'}"] = (saved[1] - saved[0]) / cfg.t_mid
    student.recompute_blocks(False)
    with SyncCounter() as syncs:
        stage2_loss(student, *window(x, ends, 1, cfg.t_mid)).backward()
    out["syncs_fwd_bwd"] = syncs.n
    return out


def main(argv):
    cfg = cli.parse_args(Config, argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    student, x, ends = build(cfg)
    r = measure(cfg, student, x, ends)
    print(f"random-weight student of the {cfg.preset} shape, main network {cfg.main_layers} blocks, byte blocks "
          f"{cfg.n_enc} + {cfg.n_dec} at width {student.scfg.d_local}, prior + subword on, fp32, "
          f"{torch.get_num_threads()} threads")
    print("| measure | value |\n|---|---|")
    print(f"| aten ops per stage-2 forward, T = {cfg.t_short} / {cfg.t_long} | {r[f'ops_T{cfg.t_short}']:,} / "
          f"{r[f'ops_T{cfg.t_long}']:,} (ratio {r[f'ops_T{cfg.t_long}'] / r[f'ops_T{cfg.t_short}']:.2f}) |")
    print(f"| same, the prior's chunks sized for a GPU | {r[f'ops_gpu_budget_T{cfg.t_short}']:,} / "
          f"{r[f'ops_gpu_budget_T{cfg.t_long}']:,} (ratio "
          f"{r[f'ops_gpu_budget_T{cfg.t_long}'] / r[f'ops_gpu_budget_T{cfg.t_short}']:.2f}) |")
    print(f"| forward + backward us per byte, T = 512 / {cfg.t_long} | {r['s_per_byte_T512'] * 1e6:.1f} / "
          f"{r[f's_per_byte_T{cfg.t_long}'] * 1e6:.1f} (ratio {r[f's_per_byte_T{cfg.t_long}'] / r['s_per_byte_T512']:.2f}) |")
    print(f"| saved activations KiB per byte, plain / --checkpoint_blocks | {r['saved_per_byte_plain'] / 1024:.1f} / "
          f"{r['saved_per_byte_ckpt'] / 1024:.1f} (ratio {r['saved_per_byte_ckpt'] / r['saved_per_byte_plain']:.3f}) |")
    print(f"| host syncs in one stage-2 forward + backward (T = {cfg.t_mid}) | {r['syncs_fwd_bwd']} |")
    print(f"(saved per byte at 32 x 8192 bytes with {cfg.main_layers} main blocks: plain "
          f"{r['saved_per_byte_plain'] * 32 * 8192 / 2 ** 30:.0f} GiB, checkpointed "
          f"{r['saved_per_byte_ckpt'] * 32 * 8192 / 2 ** 30:.1f} GiB per rank: arithmetic from the slope)")
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump({"config": vars(cfg), **r}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
