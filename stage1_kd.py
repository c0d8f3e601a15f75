"""Stage 1: progressive knowledge distillation of a token teacher into a byte student (README: Method).

    python stage1_kd.py                                   # embedded default: SmolLM2-135M on Shakespeare, CPU, ~10 min
    torchrun --standalone --nproc_per_node=8 stage1_kd.py --teacher=olmo --batch_size=32 --seq_len=8192 ...

Patches are forced to the teacher tokenizer's token boundaries. Three phases, each with its own byte budget,
learning rate, warm-up + cosine schedule, and an optimizer over only the parameters it trains:
  align     byte embedding, encoder, projection    MSE(h_t, E_teacher[token]) at token-end bytes (relative MSE)
  distill   encoder side (+ main network)          reverse KL(student || teacher) over the teacher vocabulary
  boundary  patcher only (encoder output detached) BCE(p_t, token_end_t)
  decoder   the output side, on the teacher's   CE(head, next byte + flag) + w x KL(exact byte targets || head)
            hidden states (optional)
"""
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import checkpoint
import cli
import data
import distributed
from losses import byte_cross_entropy, chunked_reverse_kl
import model
from targets import ByteTrie, batch_byte_targets
from teacher import load_teacher, resolve_teacher_dir
import train


@dataclass
class Config(train.RunConfig):  # the settings both stages share (out_dir, seed, batch shape, ...) are train.RunConfig's
    # stage 1: the teacher, its data, the student, the phases
    teacher: str = "smollm2"          # preset (smollm2, olmo, llama, qwen) or an HF-layout folder
    data: str = ""                    # weighted mixture of shard folders, DIR_A:0.7,DIR_B:0.3 (each from python data.py
                                      # --out=DIR; chat shards are a folder too), in place of data_dir and chat_data
    data_dir: str = ""                # shard folder; default shards/<teacher>, prepared from the default corpus if missing
    chat_data: str = ""               # chat shard folder (python data.py --chat: shards/<teacher>-chat), mixed in by rows
    chat_fraction: float = 0.25       # with chat_data: this share of every batch's rows are chat windows
    out_dir: str = "out/stage1"
    phase: str = "all"                # all | align | distill | boundary | decoder
    # student size (0 / -1 = the default for the teacher's width, StudentConfig.for_teacher)
    d_local: int = 0
    n_enc: int = 2
    n_dec: int = 2
    local_window: int = 256
    proj_hidden: int = -1             # SwiGLU hidden width of the projection to the teacher; 0 = linear, -1 = default
    prior: bool = True                # the byte head adds a learned multiple of the teacher's own prior for each byte
                                      # of a patch (README: Method, Results); False = the paper's pure learned head
    subword: bool = True              # h adds the teacher's input embedding of the longest vocabulary entry ending at
                                      # each byte (Bolmo's subword embedding; README: Method, Results)
    # phases: budgets in training bytes (all ranks together) and learning rates
    align_bytes: int = 1_000_000     # the defaults: the CPU demo's budgets (docs/method.md: Training; README: GPU's)
    align_lr: float = 3e-3            # not 1e-3: it got further in the same CPU minutes (docs/method.md: Training)
    distill_bytes: int = 36_864
    distill_lr: float = 3e-4          # encoder side
    distill_main_lr: float = 0.0      # main network; 0 keeps it frozen (CPU demo). Paper scale: 2e-5
    boundary_bytes: int = 500_000
    boundary_lr: float = 1e-3
    decoder_bytes: int = 0            # the optional decoder phase (0 = skip): the output side learns to spell from the
                                      # teacher's own hidden states and exact byte targets
    decoder_lr: float = 1e-3
    decoder_soft_weight: float = 10.0  # loss = CE(hard labels) + this x KL(exact targets || head)
    kl_chunk_rows: int = 1024         # rows whose teacher-vocabulary logits exist at once (KL, bits, byte targets)


PHASES = ("align", "distill", "boundary")  # always run; "decoder" follows them when --decoder_bytes > 0


# ----------------------------------------------------------------------------------------------------------------
# The losses. Each returns (loss to backpropagate, {name: 0-dim tensor} of metric sums for logging and evaluation):
# the loss is a mean over stats["n"] elements (train.train_step's contract). The sums stay on the device; products
# that a person reads are formed in float64, as Python's floats did when these were read at every step.

def align_step(student, batch, embed, embed_var):
    """Relative MSE between h at token-end bytes and the teacher's input embedding rows of those tokens."""
    ends = batch["token_end"] & batch["valid"]
    h = student.encode(batch["bytes"], at=ends).float()  # (N, D): projected at the token ends only
    target = embed[batch["token_id"][ends]].float()
    loss = (h - target).pow(2).mean() / embed_var  # 1.0 = as far off as the average row is from the mean row
    cos = F.cosine_similarity(h.detach(), target, dim=-1)
    n = ends.sum()  # h's rows, counted on the device
    return loss, {"rel_mse": loss.detach().double() * n, "cos": cos.sum().double(), "n": n}


def distill_step(student, teacher, batch, chunk_rows, with_nll=False):
    """Reverse KL(student || teacher) at every patch: patch i (the bytes of token i) and teacher token i both predict
    token i+1. The teacher sees the token ids of the same window; both start from the window's first token."""
    ends = batch["token_end"] & batch["valid"]
    h = student.encode(batch["bytes"])
    y, patch_mask = student.run_main(h, ends)  # (B, P, D)
    order, _ = model.patch_order(ends)
    token_ids = batch["token_id"].gather(1, order).clamp(min=0)  # (B, P); padding -> id 0, masked out below
    with torch.no_grad():
        teacher_hidden = teacher(token_ids, return_hidden=True)
    kl, agree = chunked_reverse_kl(y[patch_mask], teacher_hidden[patch_mask], teacher.head_weight,
                                   chunk_rows=chunk_rows)
    n = patch_mask.sum()
    stats = {"kl": kl.detach().double() * n, "top1": agree, "n": n}
    if with_nll:  # evaluation: bits of the true next token under student and teacher, per byte of that token
        stats.update(next_token_bits(y, teacher_hidden, token_ids, patch_mask, order, teacher.head_weight, chunk_rows))
    return kl, stats


@torch.no_grad()
def next_token_bits(y, teacher_hidden, token_ids, patch_mask, order, head_weight, chunk_rows):
    """Token-level bits per byte of both models on the same tokens: position i scores token i+1, whose bytes are
    order[i]+1 .. order[i+1]. Chunked over rows so the full logits never exist at once."""
    scored = patch_mask[:, 1:]  # positions whose next token is in the window
    targets = token_ids[:, 1:][scored]
    n_bytes = (order[:, 1:] - order[:, :-1])[scored].sum()
    bits = {}
    for name, hidden in (("student_bits", y), ("teacher_bits", teacher_hidden)):
        rows = hidden[:, :-1][scored]
        total = torch.zeros((), dtype=torch.float64, device=rows.device)
        for i in range(0, len(rows), chunk_rows):
            logits = rows[i:i + chunk_rows].float() @ head_weight.float().T
            total += F.cross_entropy(logits, targets[i:i + chunk_rows], reduction="sum").double()
        bits[name] = total / math.log(2)
    return {**bits, "token_bytes": n_bytes}


def boundary_step(student, batch):
    """BCE of the patcher's p_t against token ends (train.boundary_bce); the encoder output is detached (only the
    patcher learns). The last byte of each window is excluded: its p is fixed at 1 (no next byte to look at)."""
    with torch.no_grad():
        h = student.encode(batch["bytes"])
    p = student.boundary_probs(h.detach())
    loss, prob, target, sel = train.boundary_bce(p, batch["valid"], batch["token_end"])
    counts = train.boundary_counts(prob > student.scfg.boundary_threshold, target)
    n = sel.sum()  # prob's rows, counted on the device
    return loss, {"bce": loss.detach().double() * n, **counts, "n": n}


def decoder_step(student, teacher, trie, batch, chunk_rows, soft_weight):
    """The output side learns to spell from the teacher itself: the teacher's final hidden states at the true token
    ends stand in for the main network's output (Bolmo's stage 1: "oracle patch representations", arXiv 2512.15586),
    and the head is trained against the teacher's exact byte targets (KL) plus the hard labels next byte + 256 x
    token end. One frozen teacher forward per batch; the encoder's h (for the residual) is computed without grad."""
    x, valid = batch["bytes"], batch["valid"]
    ends = batch["token_end"] & valid
    with torch.no_grad():
        h = student.encode(x)
        order, patch_mask = model.patch_order(ends)
        hidden = teacher(batch["token_id"].gather(1, order).clamp(min=0), return_hidden=True)  # (B, P, D)
        soft, has = batch_byte_targets(trie, hidden, patch_mask, ends, batch["token_id"], valid, teacher.head_weight,
                                       chunk_rows)
    logits = student.decode(x, h, student.dechunk(hidden, ends),
                            prior=student.sequence_prior(x, ends, hidden, patch_mask))
    labels = (x[:, 1:] + 256 * ends[:, 1:].long()).masked_fill(~has[:, :-1], -100)
    loss = byte_cross_entropy(logits[:, :-1].reshape(-1, 512), labels.reshape(-1),
                              soft_targets=soft[:, :-1].reshape(-1, 512), soft_weight=soft_weight)
    with torch.no_grad():
        n = has[:, :-1].sum()
        logp = torch.log_softmax(logits[:, :-1].float(), -1)[has[:, :-1]]
        hard = labels[has[:, :-1]]
        q = soft[:, :-1][has[:, :-1]]
        stats = {"ce": -logp.gather(1, hard[:, None]).sum().double(), "n": n,
                 "kl": (torch.xlogy(q, q) - q * logp).sum().double(),
                 "teacher_ce": -q.gather(1, hard[:, None]).clamp(min=1e-30).log().sum().double()}
    return loss, stats


def summarize(phase, sums):
    """Metric sums (over batches and ranks, read to the host: floats) -> the figures a person reads."""
    n = max(sums["n"], 1)
    if phase == "align":
        return {"rel_mse": sums["rel_mse"] / n, "cos": sums["cos"] / n}
    if phase == "distill":
        out = {"kl": sums["kl"] / n, "top1": sums["top1"] / n}
        if sums.get("token_bytes"):
            s_bpb, t_bpb = sums["student_bits"] / sums["token_bytes"], sums["teacher_bits"] / sums["token_bytes"]
            out.update(student_bpb=s_bpb, teacher_bpb=t_bpb, bpb_ratio=s_bpb / t_bpb)
        return out
    if phase == "decoder":  # bits per byte at the true patches, byte and flag together (joint), head and teacher
        ln2 = math.log(2)
        return {"bpb_joint": sums["ce"] / n / ln2, "teacher_bpb_joint": sums["teacher_ce"] / n / ln2,
                "kl_bits": sums["kl"] / n / ln2}
    precision, recall, f1 = train.boundary_f1(sums)
    return {"bce": sums["bce"] / n, "precision": precision, "recall": recall, "f1": f1}


# ----------------------------------------------------------------------------------------------------------------

def check_config(cfg):
    """Stage 1's own settings (train.setup_run checks the shared ones)."""
    if cfg.phase not in ("all", *PHASES, "decoder"):
        raise ValueError(f"--phase must be all, align, distill, boundary or decoder, not {cfg.phase!r}")
    if cfg.phase == "decoder" and cfg.decoder_bytes <= 0:
        raise ValueError("--phase=decoder needs --decoder_bytes > 0")
    if min(cfg.align_lr, cfg.distill_lr, cfg.boundary_lr) <= 0 or cfg.distill_main_lr < 0:
        raise ValueError("--align_lr, --distill_lr and --boundary_lr must be > 0 (--distill_main_lr >= 0; 0 freezes "
                         "the main network)")
    if cfg.phase in ("distill", "boundary", "decoder") and not cfg.resume:
        raise ValueError(f"--phase={cfg.phase} continues from the earlier phases: add --resume (it loads "
                         f"the checkpoint in {cfg.out_dir}), or run --phase=all")


def build_student(cfg, teacher, tok, device):
    """The byte student for this teacher: StudentConfig.for_teacher with the command line's sizes, initialised from
    the teacher (init_weights), with the teacher's prior and subword embedding attached where asked for."""
    overrides = {k: v for k, v in dict(d_local=cfg.d_local, proj_hidden=cfg.proj_hidden).items()
                 if not (k == "d_local" and v == 0 or k == "proj_hidden" and v == -1)}
    scfg = model.StudentConfig.for_teacher(teacher.cfg, n_enc=cfg.n_enc, n_dec=cfg.n_dec,
                                           local_window=cfg.local_window, **overrides)
    if "d_local" in overrides:
        scfg.n_local_heads = max(1, scfg.d_local // 64)
    if cfg.prior or cfg.subword:  # the teacher's vocabulary (and output layer, input embedding) join the byte model
        entries, _ = model.prior_vocabulary(tok.id_to_bytes)
        scfg.prior_vocab, scfg.prior_bytes = len(entries), sum(map(len, entries))
    scfg.prior, scfg.subword = cfg.prior, cfg.subword
    student = model.ByteLM(scfg, teacher.cfg).to(device)
    student.init_weights(teacher)
    student.recompute_blocks(cfg.checkpoint_blocks)
    if cfg.prior or cfg.subword:
        student.attach_prior(teacher.head_weight, tok.id_to_bytes, teacher.embed_tokens.weight, tok.doc_start_id)
    return student


def main(argv):
    cfg = cli.parse_args(Config, argv)
    check_config(cfg)
    rank, world, device, dtype_line = train.setup_run(cfg)
    master = rank == 0
    t_start = time.time()

    # -- teacher (frozen, every rank its own copy) and data --
    teacher_dtype = torch.bfloat16 if device.type == "cuda" and cfg.dtype == "bfloat16" else torch.float32
    teacher, tok = load_teacher(cfg.teacher, device, teacher_dtype)
    teacher.requires_grad_(False)
    if tok is None:
        raise ValueError(f"teacher {cfg.teacher!r} has no tokenizer; stage 1 needs its token boundaries")
    data_dir = cfg.data_dir or data.default_shard_dir(cfg.teacher if not os.path.isdir(cfg.teacher) else tok.name)
    if master and not cfg.data_dir and not cfg.data:
        data.prepare(resolve_teacher_dir(cfg.teacher), None, data_dir)  # idempotent: returns at once when the shards are up to date
    if world > 1:
        torch.distributed.barrier()
    loader_args = dict(tokenizer=tok, batch_size=cfg.batch_size, seq_len=cfg.seq_len, rank=rank, world_size=world,
                       max_tokens=teacher.cfg.max_seq_len)

    # -- student --
    student = build_student(cfg, teacher, tok, device)
    distributed.broadcast_params(student)
    embed = teacher.embed_tokens.weight.detach()
    embed_var = (embed.float() - embed.float().mean(0)).pow(2).mean().item()  # align's loss scale
    if master:
        n_params, scfg = sum(p.numel() for p in student.parameters()), student.scfg
        print(f"teacher {cfg.teacher} ({teacher.cfg.family}, {sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M) | "
              f"student {n_params / 1e6:.1f}M parameters, byte blocks d={scfg.d_local} x {scfg.n_enc}+{scfg.n_dec} | "
              f"device {device}, {world} rank(s), {dtype_line}")

    # -- the phases --
    if master and cfg.chat_data:
        print(f"chat shards {cfg.chat_data}: {cfg.chat_fraction:.0%} of every batch's rows")

    def make_loader(seed, split="train"):
        return data.make_loader(data_dir, split, seed=seed, chat_dir=cfg.chat_data, chat_fraction=cfg.chat_fraction,
                                mixture=cfg.data,
                                **loader_args)

    def evaluate(phase, step_fn):  # () -> the phase's figures on the validation batches
        return lambda: summarize(phase, train.validate(step_fn, make_loader, cfg, device))

    align = lambda batch: align_step(student, batch, embed, embed_var)  # noqa: E731
    distill = lambda batch, nll=False: distill_step(student, teacher, batch, cfg.kl_chunk_rows, nll)  # noqa: E731
    boundary = lambda batch: boundary_step(student, batch)  # noqa: E731
    main_scale = cfg.distill_main_lr / cfg.distill_lr
    all_phases = [
        train.Phase("align", cfg.align_bytes, cfg.align_lr, model.ByteLM.ENCODER_SIDE, align,
                    lambda s: summarize("align", s), evaluate("align", align), seed=cfg.seed),
        train.Phase("distill", cfg.distill_bytes, cfg.distill_lr,
                    model.ByteLM.ENCODER_SIDE + (model.ByteLM.MAIN if cfg.distill_main_lr > 0 else ()), distill,
                    lambda s: summarize("distill", s), evaluate("distill", lambda b: distill(b, True)),
                    lr_scale=lambda name: main_scale if name.startswith("main.") else 1.0, seed=cfg.seed + 1),
        train.Phase("boundary", cfg.boundary_bytes, cfg.boundary_lr, model.ByteLM.PATCHER, boundary,
                    lambda s: summarize("boundary", s), evaluate("boundary", boundary), seed=cfg.seed + 2),
    ]
    if cfg.decoder_bytes > 0:
        trie = ByteTrie(tok.id_to_bytes)
        decoder = lambda batch: decoder_step(student, teacher, trie, batch, cfg.kl_chunk_rows,  # noqa: E731
                                             cfg.decoder_soft_weight)
        all_phases.append(train.Phase("decoder", cfg.decoder_bytes, cfg.decoder_lr, model.ByteLM.OUTPUT_SIDE, decoder,
                                      lambda s: summarize("decoder", s), evaluate("decoder", decoder),
                                      seed=cfg.seed + 3))
    phases = [p for p in all_phases if cfg.phase in ("all", p.name)]
    meta = {"student_config": asdict(student.scfg), "teacher_config": asdict(teacher.cfg), "teacher": cfg.teacher,
            **checkpoint.chat_meta(tok, resolve_teacher_dir(cfg.teacher))}
    return train.finish_run(1, phases, student, cfg, meta, make_loader, device, t_start, frozen=teacher)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
