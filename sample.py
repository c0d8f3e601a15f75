"""Generate bytes from a trained byte student (or tokens from a teacher, for comparison).

    python sample.py --ckpt=out/stage2 --prompt="To be, or not to be" --max_bytes=300
    python sample.py --ckpt=... --prompt="First prompt" --prompt="Second prompt" --num_samples=2   # one batch
    python sample.py --teacher=smollm2 --prompt="To be, or not to be"
    python sample.py --ckpt=out/stage2 --chat                                   # a conversation (REPL)
    python sample.py --ckpt=out/stage2 --chat --prompt="What is the capital of France?" --temperature=0

With --chat, the teacher's chat template goes around the prompt, in byte space: each special token (<|im_start|>,
<|im_end|>, ...) is its two-byte code, 0xFF and an index (tokenizer.py), which no UTF-8 text contains. The reply
stops at the end-of-turn code. At --temperature=0 the student's reply is the likeliest string a beam search over
bytes finds (--beam, 4 by default with --chat; decoding.beam_search), streamed as its hypotheses agree: byte by byte,
the likeliest byte is often not the start of the likeliest answer. With --prompt, one turn per prompt; without, a
REPL that keeps the conversation (an empty line or end of input ends it). --system= gives a system message (default: the template's own, if any).
Codes print as their tokens' names; --raw writes the raw bytes, codes included.

Output streams as it is generated (batch of one), decoded incrementally as UTF-8 with invalid sequences shown as
U+FFFD and special codes as names; --raw writes the raw bytes instead. A batch of several prompts/samples prints
each sample when done.
The student writes from its joint model by default (--byte_model=joint; decoding.ByteGeneration(byte_model="joint")):
each step draws one of the head's 512 entries, a byte and whether it ends a patch, so that at --temperature=1 this is
ancestral sampling of the joint, whose likelihood (the sum over every patching, marginal.py) is bench/fidelity.py's
headline. The settings --temperature, --top_k and --top_p act on those 512 entries, and --temperature=0 takes the
likeliest entry. The other two byte models: --byte_model=greedy draws the byte from the two halves summed and gives it
the likelier flag (settings act on the 256 byte probabilities; 0 takes the likeliest byte); --byte_model=late
(decoding.LateFlagGeneration) decides each flag once the next byte is known (settings act on the 256 bytes of the
mixture over the open flag). joint and greedy run rows out of step in a batch (one main-network call serves many
rows); late runs them in lockstep.
"""
import codecs
import re
import sys
import time
from dataclasses import dataclass, field

import torch

import checkpoint
from cli import parse_args
import conditioning
import decoding
import model
from chat import ChatFormat, read_chat_template
from teacher import check_device, load_teacher, resolve_teacher_dir
from tokenizer import SPECIAL_BYTE
from train import inference_dtype
from transformer import sample_from_logits


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
    chat: bool = False           # the teacher's chat template around each prompt; without --prompt, a REPL
    beam: int = 0                # at --temperature=0: the student's answer by a beam search over bytes of this width
                                 # (decoding.beam_search); 0 = 4 with --chat, else 1 (greedy, no search)
    system: str = ""             # with --chat: a system message (empty: the template's default, if it has one)
    device: str = "cpu"
    byte_model: str = "joint"    # the student's byte model: joint | greedy | late (see above)
    context: str = "marginal"    # how the student reads the prompt (joint, greedy): marginal (a beam over its
                                 # patchings, one hypothesis drawn by its weight) | patcher (the patcher's flags)
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


class Printer:
    """Streams bytes to stdout: UTF-8 decoded incrementally (U+FFFD for what is invalid), each special code as its
    token's name; with raw, the bytes as they are."""

    def __init__(self, cfg, names):
        self.raw, self.names, self.pending = cfg.raw, names, b""
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, data, final=False):
        if self.raw:
            sys.stdout.flush()  # whatever print() wrote (a sample's header) must come before these bytes
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
            return
        data, out = self.pending + data, []
        hold = self.names and data[-1:] == bytes([SPECIAL_BYTE]) and not final  # a code may be cut in two
        self.pending, data = (data[-1:], data[:-1]) if hold else (b"", data)
        for piece in re.split(b"(\xff.)", data, flags=re.S):
            if piece in self.names:
                out.append(self.decoder.decode(b"", True) + self.names[piece])
            elif piece:
                out.append(self.decoder.decode(piece))
        out.append(self.decoder.decode(self.pending, True) if final else "")
        sys.stdout.write("".join(out))
        sys.stdout.flush()


def generate_student(student, texts, max_bytes, settings, byte_model="joint", stop=None, on_byte=None,
                     context="marginal", keep=None):
    """Bytes from the byte student after each prompt (bytes) -> (outputs, ended, n bytes). context="marginal" (joint
    and greedy): each row continues a hypothesis of the beam over its prompt's patchings, drawn by its weight with
    the settings' generator (the heaviest at temperature 0; keep: per prompt the flags its beam keeps, or None);
    "patcher" (and late): the prompt prefilled along the patcher's flags. A row stops at its first 0xFE (a new
    document: not kept) or, given stop, once its output ends with those bytes (the end-of-turn code: not kept,
    ended=True). on_byte(row, byte) sees every byte kept, as soon as it is known not to begin the stop."""
    if byte_model == "late":  # rows in lockstep, every row one byte per step
        run = decoding.LateFlagGeneration(student, texts, max_bytes)
        steps = ((run.rows, run.step(*settings)[0]) for _ in range(max_bytes))
    else:  # rows out of step (ByteGeneration.run): one main-network call serves many rows
        if context == "marginal":
            run = conditioning.generation_after(student, texts, max_bytes, byte_model, settings[0], settings[3],
                                                keep=keep)
        else:
            run = decoding.ByteGeneration(student, texts, max_bytes, byte_model=byte_model)
        steps = ((rows, new) for rows, _, new, _ in run.run(max_bytes, *settings))
    stop = stop or b""
    outputs, held = [bytearray() for _ in texts], [b""] * len(texts)  # held: a proper prefix of stop, maybe its start
    live, ended = [True] * len(texts), [False] * len(texts)

    def keep(i, data):
        outputs[i].extend(data)
        for b in data if on_byte else ():
            on_byte(i, b)

    for rows, new in steps:
        for i, b in zip(rows.tolist(), new.tolist()):
            if not live[i]:
                continue
            if b == model.BOS_BYTE or stop and held[i] + bytes([b]) == stop:
                live[i], ended[i] = False, b != model.BOS_BYTE  # 0xFE: a new document would begin, not kept either
                if not ended[i]:
                    keep(i, held[i])
                held[i] = b""
                if byte_model != "late":
                    run.live[i] = False
                continue
            pending = held[i] + bytes([b])
            cut = next((k for k in range(len(pending)) if stop.startswith(pending[k:])), len(pending))
            keep(i, pending[:cut])  # what can no longer begin the stop
            held[i] = pending[cut:]
        if not any(live):
            break
    for i in range(len(texts)):
        keep(i, held[i])  # out of budget inside what could have become the stop: those bytes are output
        held[i] = b""
    return [bytes(o) for o in outputs], ended, sum(map(len, outputs))


def chat_format(meta, where):
    """The chat template that a byte-model folder recorded (checkpoint.chat_meta)."""
    codes = checkpoint.special_codes(meta, where)
    if not codes:
        raise ValueError(f"{where} was written before special tokens had byte codes: it cannot chat (train it again)")
    return ChatFormat(meta.get("chat_template"), codes)


def conversation(cfg, fmt, normalize):
    """The prompts as chat: each --prompt one user turn of its own; without --prompt, turns read from stdin, the
    conversation kept. Yields (prompt bytes, messages so far); send() the reply (text) back."""
    system = [{"role": "system", "content": normalize(cfg.system)}] if cfg.system else []
    if cfg.prompt or cfg.prompt_file:
        for p in read_prompts(cfg):
            messages = system + [{"role": "user", "content": normalize(p)}]
            yield fmt.render(messages), messages
        return
    messages = list(system)
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # an invalid byte becomes a lone surrogate, refused below
    while True:
        try:
            line = input("you> ")
            line.encode("utf-8")
        except EOFError:
            return
        except (UnicodeDecodeError, UnicodeEncodeError):  # bytes that are not UTF-8
            print("that line is not valid UTF-8; type it again")
            continue
        if not line.strip():
            return
        messages.append({"role": "user", "content": normalize(line)})
        reply = yield fmt.render(messages), messages
        messages.append({"role": "assistant", "content": reply})


def sample_student(cfg, prompts, dtype=torch.float32):
    student, meta = checkpoint.load_student(cfg.ckpt, cfg.device, dtype)
    tok = tokenizer_for(meta.get("teacher", ""))
    normalize = tok.normalize if tok else (lambda p: p)
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    settings = (cfg.temperature, cfg.top_k or None, cfg.top_p, gen)
    names = {c: n for n, c in checkpoint.special_codes(meta, cfg.ckpt).items()}
    if cfg.chat:
        fmt = chat_format(meta, cfg.ckpt)
        beam = cfg.beam or 4
        if cfg.temperature == 0 and beam > 1:
            def reply(text, on_bytes):
                start = conditioning.search_start(student, text, cfg.max_bytes, beam, keep=conditioning.token_ends(
                    tok, text)) if cfg.context == "marginal" else None
                out, ended = decoding.beam_search(student, text, cfg.max_bytes, beam, fmt.end_of_turn, on_bytes, start)
                return [out], [ended], len(out)
        else:
            def reply(text, on_bytes):
                return generate_student(student, [text], cfg.max_bytes, settings, cfg.byte_model, fmt.end_of_turn,
                                        lambda i, b: on_bytes(bytes([b])), cfg.context,
                                        [conditioning.token_ends(tok, text)])
        return chat_turns(cfg, fmt, normalize, reply, names)
    texts = [normalize(p).encode("utf-8") for p in prompts]
    printer = Printer(cfg, names)
    if len(texts) == 1:
        printer.write(texts[0])
    t0 = time.perf_counter()
    outputs, _, n = generate_student(student, texts, cfg.max_bytes, settings, cfg.byte_model,
                                     on_byte=(lambda i, b: printer.write(bytes([b]))) if len(texts) == 1 else None,
                                     context=cfg.context, keep=[conditioning.token_ends(tok, t) for t in texts])
    if len(texts) == 1:
        printer.write(b"", final=True)  # a sequence cut off at the end shows as U+FFFD
    return texts, outputs, n, time.perf_counter() - t0, names


def chat_turns(cfg, fmt, normalize, reply_fn, names):
    """Runs conversation(): each turn's reply streamed (reply_fn(prompt bytes, on_bytes) -> ([bytes], [ended], n))."""
    texts, outputs, n, seconds, turns = [], [], 0, 0.0, conversation(cfg, fmt, normalize)
    reply = None
    while True:
        try:
            text, messages = turns.send(reply) if reply is not None else next(turns)
        except StopIteration:
            break
        if cfg.prompt or cfg.prompt_file:
            print(f"you> {messages[-1]['content']}")
        printer = Printer(cfg, names)
        sys.stdout.write("bot> ")
        t0 = time.perf_counter()
        out, ended, k = reply_fn(text, printer.write)
        printer.write(b"", final=True)
        seconds += time.perf_counter() - t0
        print("" if ended[0] else f"\n[no end of turn within --max_bytes={cfg.max_bytes}]")
        texts.append(text)
        outputs.append(out[0])
        n += k
        reply = out[0].decode("utf-8", "replace")
    return texts, outputs, n, seconds, names


def sample_teacher(cfg, prompts, dtype=torch.float32):
    teacher, tok = load_teacher(cfg.teacher, cfg.device, dtype)
    if tok is None:
        raise ValueError(f"teacher {cfg.teacher!r} has no tokenizer to sample with")
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    # Never sample ids the tokenizer cannot spell: padding rows of the embedding matrix (Qwen3 has 151,936 rows for
    # ~151.7K ids) and ids with no bytes (holes), which would add nothing and never end the loop.
    stops = {tok.eos_id, tok.bos_id} - {None}
    unspellable = torch.tensor([i >= tok.n_vocab or not tok.token_bytes(i) for i in range(teacher.head_weight.shape[0])],
                               device=cfg.device)
    names = {c: n for n, c in tok.codes.items()}

    def reply(text, on_byte=None, stop_ids=stops, start=()):  # a prompt (bytes, codes) -> ([bytes], [ended], n)
        ids = torch.tensor([[*start, *tok.encode_bytes(text)]], device=cfg.device)
        cache = teacher.new_cache(1, ids.shape[1] + cfg.max_bytes)
        logits, out, ended = teacher(ids, cache=cache)[:, -1], bytearray(), False
        while len(out) < cfg.max_bytes:  # every sampleable token is at least one byte: this ends within max_bytes steps
            next_id = int(sample_from_logits(logits.masked_fill(unspellable, float("-inf")), cfg.temperature,
                                             cfg.top_k or None, cfg.top_p, gen))
            if next_id in stop_ids:
                ended = True
                break
            out += tok.token_bytes(next_id)
            if on_byte:
                for b in tok.token_bytes(next_id):
                    on_byte(0, b)
            logits = teacher(torch.tensor([[next_id]], device=cfg.device), cache=cache)[:, -1]
        return [bytes(out)], [ended], len(out)

    if cfg.chat:
        fmt = ChatFormat(read_chat_template(resolve_teacher_dir(cfg.teacher)), tok.codes)
        end_id = tok.code_ids[fmt.end_of_turn]
        return chat_turns(cfg, fmt, tok.normalize, lambda text, on_bytes: reply(
            text, lambda i, b: on_bytes(bytes([b])), stops | {end_id}), names)  # the template writes its own start
                                                                                # token, if any (HF adds none to it)
    texts, outputs, n, seconds = [], [], 0, 0.0
    for p in prompts:  # one prompt at a time: token prompts differ in length
        text = tok.normalize(p).encode("utf-8")
        printer = Printer(cfg, names)
        if len(prompts) == 1:
            printer.write(text)
        t0 = time.perf_counter()
        out, _, k = reply(text, (lambda i, b: printer.write(bytes([b]))) if len(prompts) == 1 else None,
                          start=[tok.doc_start_id])
        if len(prompts) == 1:
            printer.write(b"", final=True)
        seconds += time.perf_counter() - t0
        texts.append(text)
        outputs.append(out[0])
        n += k
    return texts, outputs, n, seconds, names


def main(argv):
    if any(arg.partition("=")[0] == "--flags" for arg in argv):  # the option's old name
        raise ValueError("--flags is now --byte_model (joint | greedy | late)")
    cfg = parse_args(Config, argv)
    if bool(cfg.ckpt) == bool(cfg.teacher):
        raise ValueError("give exactly one of --ckpt=PATH (a byte student) or --teacher=NAME (the token teacher)")
    if cfg.max_bytes < 1 or cfg.num_samples < 1 or cfg.temperature < 0:
        raise ValueError("--max_bytes and --num_samples must be >= 1 and --temperature >= 0")
    if not 0 < cfg.top_p <= 1 or cfg.top_k < 0:
        raise ValueError("--top_p must be in (0, 1] and --top_k >= 0 (0 = off)")
    if cfg.byte_model not in ("joint", "greedy", "late"):
        raise ValueError(f"--byte_model={cfg.byte_model!r}: joint, greedy or late")
    if cfg.context not in ("marginal", "patcher"):
        raise ValueError(f"--context={cfg.context!r}: marginal or patcher")
    if cfg.beam < 0 or cfg.beam > 1 and (cfg.temperature != 0 or not cfg.chat):
        raise ValueError("--beam is a width (0 = the default), and a search only with --chat at --temperature=0")
    try:
        cfg.system.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("--system is not valid UTF-8") from None
    torch.manual_seed(cfg.seed)
    prompts = read_prompts(cfg)
    dtype, why = inference_dtype(cfg.dtype, check_device(cfg.device))
    texts, outputs, n, seconds, names = (sample_student if cfg.ckpt else sample_teacher)(cfg, prompts, dtype)
    if len(texts) > 1 and not cfg.chat:
        for i, (t, o) in enumerate(zip(texts, outputs)):
            print(f"--- sample {i}")
            Printer(cfg, names).write(t + o, final=True)
            print()
    elif not cfg.chat:
        print()
    print(f"--- {n} bytes in {seconds:.2f} s: {n / max(seconds, 1e-9):.1f} bytes/s "
          f"({'byte student' if cfg.ckpt else 'teacher, tokens'}, "
          f"{f'{len(texts)} turns' if cfg.chat else f'batch {len(texts)}'}; {why})", file=sys.stderr)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
