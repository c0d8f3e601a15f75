"""Memory per GPU of each teacher preset with and without --fsdp, and the weight bytes each model reads per generated
byte: ARITHMETIC from the model configurations, not a measurement (nothing is allocated: the student and teacher are
built on the meta device to count their parameters). Then the activations saved for backward per byte, MEASURED on
this CPU (saved_per_byte), and the largest per-rank batch that fits a GPU with them, with and without
--checkpoint_blocks.

    python bench/memory.py [--gpus=8] [--n_enc=4] [--n_dec=4] [--bytes_per_token=4.3] [--prior_rows=16384] [--json=PATH]

Per GPU, for the two phases that hold the most: stage 1 distill with the main network trained (--distill_main_lr > 0;
the frozen teacher is there too) and stage 2 e2e (everything trained, no teacher).
  without FSDP  every GPU holds the fp32 student, fp32 gradients and AdamW's two fp32 moments (+ a step) of the
                parameters the phase trains, and the bf16 teacher: 16 bytes per trained parameter, 4 per frozen one
  with FSDP     each GPU holds 1/gpus of the units distributed.shard_student / shard_frozen make, and whole what stays
                whole (the student's dechunk null vector, the teacher's embedding and final norm), plus what is
                gathered for a moment: two units' bf16 weights (the one running and the next, prefetched) and one
                unit's fp32 gradient before its reduce-scatter
Both add the byte model's buffers, nearly all of them those of the defaults (--prior and --subword: the teacher's
output layer and input embedding rows, one per vocabulary entry, fp32; the rest are RoPE tables), whole on every
GPU (FSDP shards parameters, not buffers); the vocabulary is counted as vocab_size entries (the entries that spell
bytes are nearly all of them). Activations, the chunked KL's buffers and the CUDA context come on top of both.
Weight reads (bench/generate.py counts the same for a checkpoint and times it): a cached decoding step at batch 1 is
bound by reading weights, so the student/teacher speed ratio at batch 1 is at most about teacher bytes read per byte /
student's. The student reads its main network (the teacher's blocks, plus the teacher's output layer for the prior)
once per patch and its byte path once per byte; the teacher all its weights once per token. With patches as long as
tokens (--bytes_per_token, what the demo's student and teacher write after its prompt), that ratio is
teacher per token / (student per call + byte path x bytes_per_token); the break-even patch length is where the two
reads per byte are equal. Beside it, the same ratio without the prior's output layer, and with a prior over only its
most used rows, as many as --prior_rows (bench/fidelity.py --prior_rows measures what such a prior costs in bits).
The configurations are those of the preset folders (teachers/NAME/config.json) when downloaded, else the published
config.json values below.
"""
import importlib.util
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import cli  # noqa: E402
import distributed  # noqa: E402
import model  # noqa: E402
import teacher as teachers  # noqa: E402

# bench/generate.py's weight counts, loaded by path (bench/ holds data.py and teacher.py: never put it on sys.path)
_spec = importlib.util.spec_from_file_location("bench_generate", os.path.join(REPO, "bench", "generate.py"))
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)

# The fields config_from_hf reads, from each Hub repo's config.json (teacher.PRESETS; smollm2 = the embedded teacher).
PUBLISHED = {
    "smollm2": {"architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
                "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "max_position_embeddings": 8192, "tie_word_embeddings": True},
    "olmo": {"architectures": ["Olmo2ForCausalLM"], "vocab_size": 100352, "hidden_size": 2048,
             "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 16,
             "num_key_value_heads": 16, "max_position_embeddings": 4096, "tie_word_embeddings": False},
    "llama": {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 3072,
              "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
              "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 131072,
              "tie_word_embeddings": True},
    "qwen": {"architectures": ["Qwen3ForCausalLM"], "vocab_size": 151936, "hidden_size": 2560,
             "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
             "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 32768,
             "tie_word_embeddings": True},
}
GIB = 2 ** 30


@dataclass
class Config:
    gpus: int = 8                     # ranks that FSDP shards over
    n_enc: int = 4                    # byte blocks of the student (the README's GPU recipe)
    n_dec: int = 4
    gpu_gib: float = 80.0             # the activation table: the largest per-rank batch that fits this, with 10% margin
    seq_len: int = 8192               # ... in rows of this many bytes
    activations: bool = True          # measure activations (minutes of CPU); False: the arithmetic alone
    mfu: float = 0.4                  # the GPU-hours table: model FLOP utilisation assumed
    peak_tflops: float = 989.0        # ... of this peak (an H100's bf16 dense)
    bytes_per_token: float = 4.3      # the weight-read table: patches and tokens this long (bytes)
    prior_rows: int = 16384           # the weight-read table: also a prior over only this many rows of the output layer
    json: str = ""                    # also write the rows here


def teacher_config(name):
    """(TeacherConfig, where it came from) for a preset name."""
    path = os.path.join(teachers.TEACHERS_DIR, name, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return teachers.config_from_hf(json.load(f), path), "its config.json"
    return teachers.config_from_hf(PUBLISHED[name]), "published config"


def numel(params):
    return sum(p.numel() for p in params)


def own_numel(unit):
    """Parameters of an FSDP unit that no inner unit holds (a stack's own: its final norm)."""
    inner = numel(unit.layers.parameters()) if hasattr(unit, "run_blocks") else 0
    return numel(unit.parameters()) - inner


def per_gpu(student, teacher, trained, gpus):
    """-> (GiB per GPU without FSDP, with FSDP over `gpus`) for a phase training the names starting with `trained`
    (teacher None: stage 2, no teacher)."""
    params = dict(student.named_parameters())
    n_all = numel(params.values())
    n_trained = numel(p for n, p in params.items() if n.startswith(trained))
    tensors_trained = sum(1 for n in params if n.startswith(trained))
    student_whole = numel(student.parameters(recurse=False))  # outside every unit: stays whole
    teacher_all = numel(teacher.parameters()) if teacher is not None else 0
    teacher_blocks = numel(teacher.layers.parameters()) if teacher is not None else 0
    adam_steps = distributed.ADAMW_STATE_BYTES * tensors_trained
    buffers = sum(b.numel() * b.element_size() for b in student.buffers())
    ddp = 4 * n_all + 12 * n_trained + adam_steps + 2 * teacher_all + buffers
    # trained parameters are spread like the rest; the null vector (trained in e2e) is a rounding error here
    sharded = (4 * (n_all - student_whole) + 12 * n_trained) / gpus + 4 * student_whole + adam_steps
    frozen = 2 * (teacher_blocks / gpus + teacher_all - teacher_blocks)
    largest = max(own_numel(u) for u in distributed.fsdp_units(student))
    largest_teacher = max((numel(b.parameters()) for b in teacher.layers), default=0) if teacher is not None else 0
    gathered = 2 * 2 * largest + 4 * largest + 2 * 2 * largest_teacher
    return ddp / GIB, (sharded + frozen + gathered + buffers) / GIB


def rows(cfg):
    out = []
    for name in ("smollm2", *teachers.PRESETS):
        tcfg, source = teacher_config(name)
        scfg = model.StudentConfig.for_teacher(tcfg, n_enc=cfg.n_enc, n_dec=cfg.n_dec, prior_vocab=tcfg.vocab_size,
                                               subword=True)
        with torch.device("meta"):
            student, teacher = model.ByteLM(scfg, tcfg), teachers.Teacher(tcfg)
        s1 = per_gpu(student, teacher, model.ByteLM.ENCODER_SIDE + model.ByteLM.MAIN, cfg.gpus)
        s2 = per_gpu(student, None, ("",), cfg.gpus)
        per_call, per_byte = generate.student_weight_bytes(student)
        per_token = generate.teacher_weight_bytes(teacher)
        prior = generate.nbytes([student.prior_head])
        prior_kept = prior * min(1.0, cfg.prior_rows / len(student.prior_head))  # a prior over its most used rows

        def ratio(call):  # teacher / student weight bytes per byte, patches as long as tokens
            return per_token / (call + per_byte * cfg.bytes_per_token)
        out.append({"preset": name, "config": source, "teacher_params": numel(teacher.parameters()),
                    "flops_per_byte": flops_per_byte(student, teacher, cfg.bytes_per_token),
                    "student_params": numel(student.parameters()),
                    "buffers_gib": sum(b.numel() * b.element_size() for b in student.buffers()) / GIB,
                    "stage1_distill_gib": s1[0],
                    "stage1_distill_fsdp_gib": s1[1], "stage2_e2e_gib": s2[0], "stage2_e2e_fsdp_gib": s2[1],
                    "student_read_per_main_call": per_call, "student_read_per_byte_step": per_byte,
                    "teacher_read_per_token": per_token,
                    "reads_ratio": ratio(per_call), "reads_ratio_no_prior": ratio(per_call - prior),
                    "reads_ratio_prior_rows": ratio(per_call - prior + prior_kept),
                    "break_even_patch_bytes": generate.break_even_patch_bytes(per_call, per_byte, per_token,
                                                                              cfg.bytes_per_token)})
    return out


def saved_per_byte(tcfg, cfg, main_layers, phase, recompute, bytes_per_patch=4, T=(128, 256)):
    """Bytes autograd saves for backward per byte of a window (the slope between two window lengths), measured by
    saved_tensors_hooks on a random-weight student of the preset's widths with `main_layers` main blocks, on this CPU
    in fp32 (bf16 autocast on a GPU saves about half). phase "distill": the encoder side and the main network trained,
    the loss on the main network's outputs (stage 1 with --distill_main_lr > 0; the chunked KL frees its chunks);
    "e2e": everything trained, the stage-2 loss on the head. The prior and the subword embedding add no saved tensors
    (buffers, no gradient) and are left out; patches every bytes_per_patch bytes."""
    scfg = model.StudentConfig.for_teacher(tcfg, n_enc=cfg.n_enc, n_dec=cfg.n_dec, prior=False)
    torch.manual_seed(0)
    student = model.ByteLM(scfg, replace(tcfg, n_layers=main_layers)).init_weights().recompute_blocks(recompute)
    saved = []
    for n in T:
        x = torch.randint(0, 256, (1, n))
        ends = (torch.arange(n) % bytes_per_patch == bytes_per_patch - 1)[None]
        storages = {}

        def pack(t):  # a tensor saved by several ops (or views of one) is held once
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if phase == "distill":
                y, _ = student.run_main(student.encode(x), ends)
                loss = y.float().pow(2).mean()
            else:
                logits, p, _ = student(x, ends)
                loss = logits.float().logsumexp(-1).mean() + p.mean()
        saved.append(sum(storages.values()))
        del loss
    return (saved[1] - saved[0]) / (T[1] - T[0])


def activation_rows(cfg, table):
    """Per preset and phase: activation bytes per byte (plain and --checkpoint_blocks, the main network scaled from
    1 and 2 measured blocks to its real depth) and the largest per-rank batch of seq_len-byte rows that fits gpu_gib
    with 10% margin beside the weights, gradients and AdamW state of `table` (with and without FSDP)."""
    out = []
    for r in table:
        tcfg, _ = teacher_config(r["preset"])
        for phase, static in (("distill", (r["stage1_distill_gib"], r["stage1_distill_fsdp_gib"])),
                              ("e2e", (r["stage2_e2e_gib"], r["stage2_e2e_fsdp_gib"]))):
            row = {"preset": r["preset"], "phase": phase}
            for recompute in (False, True):
                # each measurement in a fresh process: the larger presets' students would otherwise pile up in this
                # one's heap (freed memory is not returned to the system)
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    one, two = pool.map(saved_per_byte, *zip(*[(tcfg, cfg, n, phase, recompute) for n in (1, 2)]))
                per_byte = one + (two - one) * (tcfg.n_layers - 1)
                key = "ckpt" if recompute else "plain"
                row[f"{key}_per_byte"] = per_byte
                for name, gib in zip(("ddp", "fsdp"), static):
                    room = (0.9 * cfg.gpu_gib - gib) * GIB
                    row[f"{key}_{name}_rows"] = max(0, int(room // (per_byte * cfg.seq_len)))
            out.append(row)
    return out


# The README's paper-scale plan: training bytes per phase (about 125B in all; Bolmo put 43B into its stage 1)
PLAN_BYTES = {"align": 10e9, "distill": 45e9, "boundary": 2e9, "warmup": 8e9, "e2e": 60e9}


def flops_per_byte(student, teacher, bytes_per_patch):
    """Matmul FLOPs per training byte of each phase, ARITHMETIC from parameter counts (2 per weight and row forward,
    4 more backward where the weights train, 2 more where only the gradient passes through them; attention scores
    left out): the encoder side runs per byte (its projection per token in align), the main network, the teacher,
    the teacher-vocabulary heads and the prior once per patch."""
    n = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
    enc, proj = n(student.encoder.parameters()), n(student.enc_proj.parameters())
    patcher = n(student.patcher_q.parameters()) + n(student.patcher_k.parameters())
    out = n(student.decoder.parameters()) + n(student.head.parameters()) + n(student.residual.parameters()) + \
        n(student.main_to_local.parameters())
    main = n(student.main.parameters())
    head = teacher.head_weight.numel()  # the teacher-vocabulary output layer (the prior's too)
    k = 1 / bytes_per_patch
    return {"align": 6 * enc + 6 * proj * k,
            "distill": 6 * (enc + proj) + (6 * main + 2 * main + 2 * head + 4 * head) * k,  # + teacher fwd, both heads
            "boundary": 2 * (enc + proj) + 6 * patcher,
            "warmup": 2 * (enc + proj + patcher) + 6 * out + (2 * main + 2 * head) * k,  # the prior: forward only
            "e2e": 6 * (enc + proj + patcher + out) + (6 * main + 2 * head) * k}


def print_budget(cfg, table):
    print(f"\ntraining FLOPs per byte and GPU-hours of the README's plan ({sum(PLAN_BYTES.values()) / 1e9:.0f}B bytes: "
          + ", ".join(f"{k} {v / 1e9:g}B" for k, v in PLAN_BYTES.items()) + f"), ARITHMETIC at {cfg.mfu:.0%} of "
          f"{cfg.peak_tflops:g} TFLOP/s (an H100's bf16 dense peak); patches of {cfg.bytes_per_token:g} bytes")
    print("| teacher | " + " | ".join(f"{k} GFLOP/byte" for k in PLAN_BYTES) + " | GPU-hours |")
    print("|---|" + "---|" * (len(PLAN_BYTES) + 1))
    for r in table:
        flops = r["flops_per_byte"]
        hours = sum(flops[k] * PLAN_BYTES[k] for k in PLAN_BYTES) / (cfg.mfu * cfg.peak_tflops * 1e12) / 3600
        r["plan_gpu_hours"] = hours
        print(f"| {r['preset']} | " + " | ".join(f"{flops[k] / 1e9:.2f}" for k in PLAN_BYTES) + f" | {hours:,.0f} |")


def print_activations(cfg, act):
    print(f"\nactivations saved for backward, MEASURED per byte (bench/memory.py's saved_per_byte: this CPU, fp32, the "
          f"main network measured at 1 and 2 blocks and scaled to its depth), and the largest per-rank batch of "
          f"{cfg.seq_len}-byte rows that fits {cfg.gpu_gib:g} GB with 10% margin beside the table above (arithmetic)")
    print(f"| teacher | phase | KiB per byte | same, --checkpoint_blocks | rows per rank | same, --fsdp x{cfg.gpus} "
          f"| rows, --checkpoint_blocks | same, --fsdp x{cfg.gpus} |")
    print("|---|---|---|---|---|---|---|---|")
    for a in act:
        print(f"| {a['preset']} | {a['phase']} | {a['plain_per_byte'] / 1024:.0f} | {a['ckpt_per_byte'] / 1024:.1f} "
              f"| {a['plain_ddp_rows']} | {a['plain_fsdp_rows']} | {a['ckpt_ddp_rows']} | {a['ckpt_fsdp_rows']} |")


def main(argv):
    cfg = cli.parse_args(Config, argv)
    table = rows(cfg)
    print(f"GiB per GPU, arithmetic from the configurations (not measured): weights, gradients and AdamW state; "
          f"activations in the last table. Student byte blocks {cfg.n_enc}+{cfg.n_dec}; FSDP over {cfg.gpus} GPUs.")
    print(f"| teacher | teacher params | student params | buffers | stage 1 distill (main trained) "
          f"| same, --fsdp x{cfg.gpus} "
          f"| stage 2 e2e | same, --fsdp x{cfg.gpus} |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['preset']} ({r['config']}) | {r['teacher_params'] / 1e9:.2f}B | {r['student_params'] / 1e9:.2f}B "
              f"| {r['buffers_gib']:.2f} | {r['stage1_distill_gib']:.1f} | {r['stage1_distill_fsdp_gib']:.1f} "
              f"| {r['stage2_e2e_gib']:.1f} "
              f"| {r['stage2_e2e_fsdp_gib']:.1f} |")
    print(f"\nweight bytes read per generated byte at batch 1, arithmetic (one dtype for every weight; the ratios do not "
          f"depend on which): the speed ratio a memory-bound step allows with patches as long as tokens, "
          f"{cfg.bytes_per_token:g} bytes each")
    print("| teacher | student per main call | byte path per byte | teacher per token | student/teacher "
          f"| same, without the prior's output layer | same, the prior over {cfg.prior_rows:,} rows "
          "| break-even bytes per patch |")
    print("|---|---|---|---|---|---|---|---|")
    gb = 1e-9
    for r in table:
        even = r["break_even_patch_bytes"]
        print(f"| {r['preset']} | {r['student_read_per_main_call'] * gb:.3f} GB "
              f"| {r['student_read_per_byte_step'] * gb:.4f} GB | {r['teacher_read_per_token'] * gb:.3f} GB "
              f"| {r['reads_ratio']:.2f} | {r['reads_ratio_no_prior']:.2f} | {r['reads_ratio_prior_rows']:.2f} "
              f"| {f'{even:.2f}' if even else 'none'} |")
    print_budget(cfg, table)
    act = activation_rows(cfg, table) if cfg.activations else []
    if act:
        print_activations(cfg, act)
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump({"gpus": cfg.gpus, "n_enc": cfg.n_enc, "n_dec": cfg.n_dec, "bytes_per_token": cfg.bytes_per_token,
                       "prior_rows": cfg.prior_rows, "rows": table, "activations": act}, f, indent=1)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
