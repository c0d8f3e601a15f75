"""Generate bytes from a trained byte student (or tokens from a teacher, for comparison).

    python sample.py --ckpt=out/stage2 --prompt="To be, or not to be" --max_bytes=300
    python sample.py --ckpt=... --prompt="First prompt" --prompt="Second prompt" --num_samples=2   # one batch
    python sample.py --teacher=smollm2 --prompt="To be, or not to be"

Output streams as it is generated (batch of one), decoded incrementally as UTF-8 with invalid sequences shown as
U+FFFD; --raw writes the raw bytes instead. A batch of several prompts/samples prints each sample when done.
The student writes from its joint model by default (--flags=joint; decoding.ByteGeneration(flags="joint")): each step
draws one of the head's 512 entries, a byte and whether it ends a patch, so that at --temperature=1 this is ancestral
sampling of the joint, whose likelihood (the sum over every patching, marginal.py) is bench/fidelity.py's headline.
The settings --temperature, --top_k and --top_p act on those 512 entries, and --temperature=0 takes the likeliest
entry. The other two byte models: --flags=greedy draws the byte from the two halves summed and gives it the likelier
flag (settings act on the 256 byte probabilities; 0 takes the likeliest byte); --flags=late
(decoding.LateFlagGeneration) decides each flag once the next byte is known (settings act on the 256 bytes of the
mixture over the open flag). joint and greedy
run rows out of step in a batch (one main-network call serves many rows); late runs them in lockstep.
"""
import codecs
import sys
import time
from dataclasses import dataclass, field

import torch

import checkpoint
from cli import parse_args
import decoding
import model
from teacher import check_device, load_teacher, resolve_teacher_dir, sample_from_logits
from train import inference_dtype


@dataclass
class Config:
    ckpt: str = ""               # a byte-model folder (out/stage2, out/stage1/boundary, ...), or empty and --teacher
    teacher: str = ""            # sample the teacher itself (preset name or folder), with its tokens
    prompt: list = field(default_factory=list)  # repeatable: --prompt=A --prompt=B is a batch of two
    prompt_file: str = ""
    max_bytes: int = 256         # bytes to generate per sample (teacher: stops once this many bytes are out)
    temperature: float = 0.8
    top_k: int = 0               # 0 = off
    top_p: float = 1.0           # 1 = off
    seed: int = 1337
    num_samples: int = 1
    raw: bool = False
    device: str = "cpu"
    flags: str = "joint"         # the student's byte model: joint | greedy | late (see above)
    dtype: str = "auto"          # weights: float32 | bfloat16 | auto (bf16 on CUDA, and on a CPU that a short timing
                                 # at start shows clearly faster in it: AMX / AVX512-BF16; fp32 on AVX2-only CPUs)


def read_prompts(cfg):
    prompts = list(cfg.prompt)
    if cfg.prompt_file:
        try:
            with open(cfg.prompt_file, "rb") as f:
                raw = f.read()
        except OSError as e:  # a folder, no permission, ...; a missing file stays a FileNotFoundError
            if isinstance(e, FileNotFoundError):
                raise
            raise ValueError(f"{cfg.prompt_file}: cannot read the prompt file ({e.strerror})") from None
        try:
            prompts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{cfg.prompt_file}: prompt is not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r})") from None
    prompts = prompts or [""]
    for p in prompts:  # argv strings carry undecodable bytes as lone surrogates
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"prompt {p!r} is not valid UTF-8") from None
    return [p for p in prompts for _ in range(cfg.num_samples)]


def tokenizer_for(teacher):
    """The teacher's tokenizer, to normalise prompts the way the student's training text was normalised."""
    from tokenizer import load_tokenizer
    try:
        return load_tokenizer(resolve_teacher_dir(teacher))
    except (FileNotFoundError, ValueError):
        return None


def emit(stream, data, cfg, final=False):
    if cfg.raw:
        sys.stdout.flush()  # whatever print() wrote (a sample's header) must come before these bytes
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        sys.stdout.write(stream.decode(data, final))
        sys.stdout.flush()


def sample_student(cfg, prompts, dtype=torch.float32):
    student, meta = checkpoint.load_student(cfg.ckpt, cfg.device, dtype)
    tok = tokenizer_for(meta.get("teacher", ""))
    texts = [(tok.normalize(p) if tok else p).encode("utf-8") for p in prompts]
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    settings = (cfg.temperature, cfg.top_k or None, cfg.top_p, gen)
    if cfg.flags == "late":  # rows in lockstep, every row one byte per step
        run = decoding.LateFlagGeneration(student, texts, cfg.max_bytes)
        steps = ((run.rows, run.step(*settings)[0]) for _ in range(cfg.max_bytes))
    else:  # rows out of step (ByteGeneration.run): one main-network call serves many rows
        run = decoding.ByteGeneration(student, texts, cfg.max_bytes, flags=cfg.flags)
        steps = ((rows, new) for rows, _, new, _ in run.run(cfg.max_bytes, *settings))
    streams = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in texts]
    outputs, live = [bytearray() for _ in texts], [True] * len(texts)
    if len(texts) == 1:
        emit(streams[0], texts[0], cfg)
    t0, n = time.perf_counter(), 0
    for rows, new in steps:  # a row stops at its first 0xFE
        for i, b in zip(rows.tolist(), new.tolist()):
            if not live[i]:
                continue
            if b == model.BOS_BYTE:  # 0xFE would begin a new document: not printed
                live[i] = False
                if cfg.flags != "late":
                    run.live[i] = False
                continue
            outputs[i].append(b)
            n += 1
            if len(texts) == 1:
                emit(streams[0], bytes([b]), cfg)
        if not any(live):
            break
    if len(texts) == 1:
        emit(streams[0], b"", cfg, final=True)  # a sequence cut off at the end shows as U+FFFD
    seconds = time.perf_counter() - t0
    return texts, [bytes(o) for o in outputs], n, seconds


def sample_teacher(cfg, prompts, dtype=torch.float32):
    teacher, tok = load_teacher(cfg.teacher, cfg.device, dtype)
    if tok is None:
        raise ValueError(f"teacher {cfg.teacher!r} has no tokenizer to sample with")
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    # Never sample ids the tokenizer cannot spell: padding rows of the embedding matrix (Qwen3 has 151,936 rows for
    # ~151.7K ids) and ids with no bytes (holes, control pieces), which would add nothing and never end the loop.
    stops = (tok.eos_id, tok.bos_id)
    unspellable = torch.tensor([i >= tok.n_vocab or (not tok.token_bytes(i) and i not in stops)
                                for i in range(teacher.head_weight.shape[0])], device=cfg.device)
    texts, outputs, n, seconds = [], [], 0, 0.0
    for p in prompts:  # one prompt at a time: token prompts differ in length
        text = tok.normalize(p)
        ids = torch.tensor([[tok.doc_start_id] + tok.encode(text)], device=cfg.device)
        cache = teacher.new_cache(1, ids.shape[1] + cfg.max_bytes)
        stream, out = codecs.getincrementaldecoder("utf-8")(errors="replace"), bytearray()
        if len(prompts) == 1:
            emit(stream, text.encode("utf-8"), cfg)
        t0 = time.perf_counter()
        logits = teacher(ids, cache=cache)[:, -1]
        while len(out) < cfg.max_bytes:  # every sampleable token is at least one byte: this ends within max_bytes steps
            logits = logits.masked_fill(unspellable, float("-inf"))
            next_id = sample_from_logits(logits, cfg.temperature, cfg.top_k or None, cfg.top_p, gen)
            if int(next_id) in (tok.eos_id, tok.bos_id):
                break
            piece = tok.token_bytes(int(next_id))
            out += piece
            if len(prompts) == 1:
                emit(stream, piece, cfg)
            logits = teacher(next_id, cache=cache)[:, -1]
        if len(prompts) == 1:
            emit(stream, b"", cfg, final=True)
        seconds += time.perf_counter() - t0
        texts.append(text.encode("utf-8"))
        outputs.append(bytes(out))
        n += len(out)
    return texts, outputs, n, seconds


def main(argv):
    cfg = parse_args(Config, argv)
    if bool(cfg.ckpt) == bool(cfg.teacher):
        raise ValueError("give exactly one of --ckpt=PATH (a byte student) or --teacher=NAME (the token teacher)")
    if cfg.max_bytes < 1 or cfg.num_samples < 1 or cfg.temperature < 0:
        raise ValueError("--max_bytes and --num_samples must be >= 1 and --temperature >= 0")
    if not 0 < cfg.top_p <= 1 or cfg.top_k < 0:
        raise ValueError("--top_p must be in (0, 1] and --top_k >= 0 (0 = off)")
    if cfg.flags not in ("joint", "greedy", "late"):
        raise ValueError(f"--flags={cfg.flags!r}: joint, greedy or late")
    torch.manual_seed(cfg.seed)
    prompts = read_prompts(cfg)
    dtype, why = inference_dtype(cfg.dtype, check_device(cfg.device))
    texts, outputs, n, seconds = (sample_student if cfg.ckpt else sample_teacher)(cfg, prompts, dtype)
    if len(texts) > 1:
        for i, (t, o) in enumerate(zip(texts, outputs)):
            print(f"--- sample {i}")
            emit(codecs.getincrementaldecoder("utf-8")(errors="replace"), t + o, cfg, final=True)
            print()
    else:
        print()
    print(f"--- {n} bytes in {seconds:.2f} s: {n / max(seconds, 1e-9):.1f} bytes/s "
          f"({'byte student' if cfg.ckpt else 'teacher, tokens'}, batch {len(texts)}; {why})", file=sys.stderr)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
