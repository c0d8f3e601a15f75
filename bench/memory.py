"""Memory per GPU of each teacher preset with and without --fsdp, and the weight bytes each model reads per generated
byte: ARITHMETIC from the model configurations, not a measurement (nothing is allocated: the student and teacher are
built on the meta device to count their parameters).

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
import os
import sys
from dataclasses import dataclass

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


def main(argv):
    cfg = cli.parse_args(Config, argv)
    table = rows(cfg)
    print(f"GiB per GPU, arithmetic from the configurations (not measured): weights, gradients and AdamW state; "
          f"activations not included. Student byte blocks {cfg.n_enc}+{cfg.n_dec}; FSDP over {cfg.gpus} GPUs.")
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
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump({"gpus": cfg.gpus, "n_enc": cfg.n_enc, "n_dec": cfg.n_dec, "bytes_per_token": cfg.bytes_per_token,
                       "prior_rows": cfg.prior_rows, "rows": table}, f, indent=1)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
