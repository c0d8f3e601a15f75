"""Stage 2: byte-level fine-tuning, patches from the student's own patcher (README: Method).

    python stage2_sft.py                                  # from the byte-model folder out/stage1, embedded default, CPU
    torchrun --standalone --nproc_per_node=8 stage2_sft.py --init=out/stage1 --batch_size=32 --seq_len=8192 ...

Two phases, the loss a 512-way cross-entropy with label next_byte + 256 * is_token_end(next byte):
  warmup  the byte-level output side only: dechunk null vector, residual, projections, second byte embedding,
          decoder, head
  e2e     everything; the byte-level parts at e2e_byte_lr_mult x the main network's rate; plus BCE on the patcher
The final byte-model folder (out_dir itself: model.safetensors + config.json) is what sample.py and bench/fidelity.py
load.
"""
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

import checkpoint
import cli
import data
import distributed
from losses import byte_cross_entropy
import model
from targets import ByteTrie, batch_byte_targets
from teacher import load_teacher, resolve_teacher_dir
from tokenizer import load_tokenizer
import train


@dataclass
class Config(train.RunConfig):  # the settings both stages share (out_dir, seed, batch shape, ...) are train.RunConfig's
    # stage 2: the stage-1 model, its data, the phases
    init: str = "out/stage1"          # the stage-1 byte-model folder to start from
    data: str = ""                    # weighted mixture of shard folders, DIR_A:0.7,DIR_B:0.3, in place of data_dir and
                                      # chat_data; default: the stage-1 run's, if any
    data_dir: str = ""                # shard folder; default shards/<teacher of the stage-1 checkpoint>
    chat_data: str = ""               # chat shard folder (python data.py --chat); default: the stage-1 run's, if any
    chat_fraction: float = 0.25       # with chat data: this share of every batch's rows are chat windows
    out_dir: str = "out/stage2"
    phase: str = "all"                # all | warmup | e2e
    warmup_bytes: int = 400_000      # the defaults: the CPU demo's budgets (docs/method.md: Training; README: GPU's)
    warmup_lr: float = 1e-3
    e2e_bytes: int = 49_152
    e2e_lr: float = 2e-5              # the main network's rate (paper: 2e-5)
    e2e_byte_lr_mult: float = 2.0     # byte-level parts (encoder, patcher, decoder, ...) at this multiple of e2e_lr
    boundary_weight: float = 1.0      # weight of the patcher's BCE in e2e
    soft_weight: float = 0.0          # > 0: both phases add this x KL(the teacher's exact byte targets || head) to the
                                      # CE (loads the teacher; one frozen teacher forward per batch)
    kl_chunk_rows: int = 1024         # rows whose teacher-vocabulary probabilities exist at once (the exact targets)


def sft_step(student, batch, boundary_weight=0.0, soft=None, soft_weight=0.0):
    """Forward with the patcher's patches; loss = 512-way CE (+ soft_weight * KL(soft || head) where soft, the
    teacher's exact byte targets (B, T, 512) from teacher_targets, has a row; + boundary_weight * BCE of the patcher).
    Position t predicts byte t+1 and whether byte t+1 ends a teacher token. Returns (loss, {name: 0-dim tensor} of
    metric sums, on the device; "ce" the hard labels' alone). train.train_step's contract: the loss is a mean over
    stats["n"], the scored bytes, as the CE is. The patcher's BCE is a mean over another count, n_p (its decisions:
    every real byte but the last), and enters the update weighted by n all the same (train.train_step backpropagates
    loss * n)."""
    x, valid, token_end = batch["bytes"], batch["valid"], batch["token_end"]
    logits, p, ends = student(x)
    scored = valid[:, 1:] & valid[:, :-1]  # (B, T-1): both bytes real
    labels = (x[:, 1:] + 256 * token_end[:, 1:].long()).masked_fill(~scored, -100)
    with_soft = soft is not None and soft_weight > 0
    ce = byte_cross_entropy(logits[:, :-1].reshape(-1, 512), labels.reshape(-1),
                            soft_targets=soft[:, :-1].reshape(-1, 512) if with_soft else None,
                            soft_weight=soft_weight if with_soft else 0.0)
    n = scored.sum()
    with torch.no_grad():  # bits per byte: the byte's probability summed over both halves of the head
        logp = model.byte_logprobs(logits[:, :-1]).gather(-1, x[:, 1:, None])[..., 0]
        byte_nats = -(logp[scored]).sum().double()
        hard = ce.detach().double() * n
        if with_soft:  # the CE of the hard labels alone, for the logs
            hard = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, 512), labels.reshape(-1),
                                                     reduction="sum").double()
    # the patcher against token ends (the last byte's p is fixed at 1 and not scored), its decisions the patches it cut
    bce, _, target, sel = train.boundary_bce(p, valid, token_end)
    n_p = sel.sum()  # the BCE's rows, counted on the device
    stats = {"ce": hard, "byte_nats": byte_nats, "n": n, "bce": bce.detach().double() * n_p,
             "n_p": n_p, **train.boundary_counts(ends[:, :-1][sel], target), "patches": ends.sum(),
             "bytes": valid.sum()}
    return ce + boundary_weight * bce if boundary_weight else ce, stats


@torch.no_grad()
def teacher_targets(teacher, trie, batch, chunk_rows):
    """The teacher's exact byte targets at every byte of the batch (B, T, 512), from one frozen forward on its tokens."""
    ends = batch["token_end"] & batch["valid"]
    order, patch_mask = model.patch_order(ends)
    hidden = teacher(batch["token_id"].gather(1, order).clamp(min=0), return_hidden=True)
    return batch_byte_targets(trie, hidden, patch_mask, ends, batch["token_id"], batch["valid"], teacher.head_weight,
                              chunk_rows)[0]


def summarize(sums):
    """Metric sums (over batches and ranks, read to the host: floats) -> the figures a person reads."""
    n, ln2 = max(sums["n"], 1), math.log(2)
    # Validation is one parallel forward with the patcher's flags, which look at the next byte: bpb_lookahead (summed
    # halves) is therefore NOT a likelihood, only a fast training signal; bpb_joint (byte with the flag it was trained
    # to predict) is honest. bench/fidelity.py gives the proper figure (flags decided causally, byte by byte).
    return {"ce": sums["ce"] / n, "bpb_lookahead": sums["byte_nats"] / n / ln2, "bpb_joint": sums["ce"] / n / ln2,
            "bce": sums["bce"] / max(sums["n_p"], 1), "f1": train.boundary_f1(sums)[2],
            "patch_bytes": sums["bytes"] / max(sums["patches"], 1)}


def main(argv):
    cfg = cli.parse_args(Config, argv)
    if cfg.phase not in ("all", "warmup", "e2e"):
        raise ValueError(f"--phase must be all, warmup or e2e, not {cfg.phase!r}")
    rank, world, device, dtype_line = train.setup_run(cfg)
    master = rank == 0
    t_start = time.time()

    # -- the stage-1 student; stage 2 needs only the teacher's tokenizer (for token-end labels), not its weights --
    student, meta = checkpoint.load_student(cfg.init, device)
    if meta.get("stage") not in (1, 2):
        raise ValueError(f"{cfg.init} is not a stage-1 checkpoint")
    student.train()
    student.recompute_blocks(cfg.checkpoint_blocks)
    teacher_name = meta["teacher"]
    teacher_dir = resolve_teacher_dir(teacher_name)
    tok = load_tokenizer(teacher_dir)
    if tok is None:
        raise ValueError(f"teacher {teacher_name!r} has no tokenizer; stage 2 needs its token boundaries as labels")
    data_dir = cfg.data_dir or meta["config"].get("data_dir") or data.default_shard_dir(
        teacher_name if not os.path.isdir(teacher_name) else tok.name)
    mixture = cfg.data = cfg.data or ("" if cfg.data_dir or cfg.chat_data else meta["config"].get("data", ""))
    if master and not cfg.data_dir and not meta["config"].get("data_dir") and not mixture:
        data.prepare(teacher_dir, None, data_dir)
    if world > 1:
        torch.distributed.barrier()
    distributed.broadcast_params(student)
    if master:
        print(f"student from {cfg.init} ({sum(p.numel() for p in student.parameters()) / 1e6:.1f}M parameters, "
              f"teacher {teacher_name}) | device {device}, {world} rank(s), {dtype_line}")

    chat_dir = cfg.chat_data = cfg.chat_data or ("" if mixture else meta["config"].get("chat_data", ""))
    if master and chat_dir:
        print(f"chat shards {chat_dir}: {cfg.chat_fraction:.0%} of every batch's rows")

    def make_loader(seed, split="train"):
        return data.make_loader(data_dir, split, tok, cfg.batch_size, cfg.seq_len, seed=seed, rank=rank,
                                world_size=world, max_tokens=student.tcfg.max_seq_len, chat_dir=chat_dir,
                                chat_fraction=cfg.chat_fraction, mixture=mixture)

    def evaluate():  # the figures on the validation batches; sft_step's stats do not depend on its weights
        return summarize(train.validate(lambda b: sft_step(student, b), make_loader, cfg, device))

    soft = lambda batch: None  # noqa: E731
    if cfg.soft_weight > 0:  # the teacher, frozen, for its exact byte targets
        teacher, _ = load_teacher(teacher_name, device, torch.bfloat16 if device.type == "cuda" and
                                  cfg.dtype == "bfloat16" else torch.float32)
        teacher.requires_grad_(False)
        trie = ByteTrie(tok.id_to_bytes)
        soft = lambda batch: teacher_targets(teacher, trie, batch, cfg.kl_chunk_rows)  # noqa: E731

    everything = ("",)  # every parameter name starts with ""
    phases = [
        train.Phase("warmup", cfg.warmup_bytes, cfg.warmup_lr, model.ByteLM.OUTPUT_SIDE,
                    lambda b: sft_step(student, b, 0.0, soft(b), cfg.soft_weight), summarize, evaluate,
                    seed=cfg.seed + 10),
        train.Phase("e2e", cfg.e2e_bytes, cfg.e2e_lr, everything,
                    lambda b: sft_step(student, b, cfg.boundary_weight, soft(b), cfg.soft_weight), summarize, evaluate,
                    lr_scale=lambda name: 1.0 if name.startswith("main.") else cfg.e2e_byte_lr_mult, seed=cfg.seed + 11),
    ]
    phases = [p for p in phases if cfg.phase in ("all", p.name)]
    meta_out = {"student_config": asdict(student.scfg), "teacher_config": asdict(student.tcfg), "teacher": teacher_name,
                "init": cfg.init, **checkpoint.chat_meta(tok, teacher_dir)}
    return train.finish_run(2, phases, student, cfg, meta_out, make_loader, device, t_start)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
