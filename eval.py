"""Benchmarks for a byte student and its teacher through lm-evaluation-harness, run the same way, side by side.

    python eval.py --ckpt=out/stage2 --tasks=blm_local --limit=50          # the byte student
    python eval.py --teacher=smollm2 --tasks=blm_local --limit=50          # the token teacher (our forward)
    python eval.py --compare --ckpt=out/stage2 --tasks=blm_local           # both (teacher: the checkpoint's own)
    python eval.py --compare --ckpt=out/stage2 --tasks=hellaswag,arc_easy  # standard tasks, on a machine with the Hub

Local tasks (tasks/*.yaml, built from the held-out plays, no download): shakespeare_cloze, shakespeare_bpb,
cute_spell, cute_count, cute_reverse, cute_contains; the tags blm_local (all six) and cute_local (the four probes).
Needs lm-eval (bash setup.sh installs it); nothing else in the repo imports it.

How each request is scored (text is normalised by the teacher's tokenizer first, as the training text was):
  byte student  by default (--flags=marginal) the joint model that sample.py writes from, scored by its byte
                marginal over patchings (marginal.marginal_logprobs, a beam of --beam flag prefixes: an upper bound
                on the exact marginal's bits); --flags=late the late-flag byte model (decoding.LateFlagGeneration:
                each flag decided once the next byte is known), --flags=greedy the greedy-flag one
                (decoding.ByteGeneration: each flag decided with its byte).
                loglikelihood: the continuation's likelihood given the context bytes: generation's prefill on
                [0xFE] + context (the patcher decides the context's boundaries except its last byte's), then the
                continuation's bytes. marginal: the last context byte's flag and every continuation flag summed
                over by the beam; late / greedy: that flag decided by the model, each continuation byte
                teacher-forced. is_greedy: every continuation byte was the likeliest byte (marginal: under the
                beam's next-byte distribution).
                loglikelihood_rolling: bench/fidelity.py's windows: the text tokenised once by the teacher, cut into
                runs of --window - 1 tokens, each run's bytes scored from a fresh document start: marginal with the
                true token ends kept in the beam, as bench/fidelity.py's headline student_bpb_marginal (late:
                student_bpb_late, greedy: student_bpb_greedy).
                generate_until: cached generation at the request's temperature (0: the likeliest entry of the joint,
                or of the late / greedy model), stopped at the first stop string (cut before it), at 0xFE (a new
                document) or after 4 bytes per max_gen_toks (a token of English is 3 to 4 bytes).
  teacher       our own forward and tokenizer (no transformers at run time); every sequence starts with the
                document-start token, as in training; the (context, continuation) split as lm-eval's HF model makes
                it (trailing spaces of the context move to the continuation; the continuation's tokens are those of
                the whole after the context's); rolling: teacher.bits over the same windows (fidelity's teacher_bpb).
"""
import logging
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field

import torch

import checkpoint
import cli
import decoding
import marginal
import model as byte_model
from teacher import check_device, load_teacher, resolve_teacher_dir
from tokenizer import align_document, load_tokenizer

try:
    from lm_eval import simple_evaluate
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table
except ImportError:  # an optional tool: setup.sh installs it
    sys.exit("eval.py needs lm-eval: bash setup.sh, or .venv/bin/pip install -r requirements-eval.txt")
from tqdm import tqdm

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
BYTES_PER_GEN_TOKEN = 4  # the byte student's generation limit: this many bytes per max_gen_toks


def normalized_pair(tok, context, continuation):
    """(context, continuation) as UTF-8 bytes after the tokenizer's normaliser. The whole is normalised at once (a
    normaliser may join characters across the seam) and split where the normalised context ends; if that is not a
    prefix of the whole, each part is normalised alone."""
    if tok is None:
        return context.encode("utf-8"), continuation.encode("utf-8")
    ctx, whole = tok.normalize(context), tok.normalize(context + continuation)
    if not whole.startswith(ctx):
        return ctx.encode("utf-8"), tok.normalize(continuation).encode("utf-8")
    return ctx.encode("utf-8"), whole[len(ctx):].encode("utf-8")


def keep_last(data, n):
    """The last n bytes of data, moved forward to a character start (never half a UTF-8 sequence)."""
    if len(data) <= n:
        return data
    start = len(data) - n
    while start < len(data) and 0x80 <= data[start] < 0xC0:
        start += 1
    return data[start:]


def rolling_windows(text, tok, window):
    """bench/fidelity.py's segments: the text tokenised once, canonically, cut into runs of window - 1 tokens ->
    [(segment bytes, the tokens' ids, each byte's token-end flag)]. Every text byte lies in exactly one segment."""
    aligned = align_document(text, tok)
    ends = aligned.token_end.nonzero()[0]  # byte index of every token's last byte; ends[0] is the document start
    cuts = list(range(0, len(ends), window - 1))  # a segment ends after every window - 1 tokens, and at the end
    if cuts[-1] != len(ends) - 1:
        cuts.append(len(ends) - 1)
    return [(bytes(aligned.bytes[ends[a] + 1:ends[b] + 1]), aligned.token_id[ends[a + 1:b + 1]].tolist(),
             torch.from_numpy(aligned.token_end[ends[a] + 1:ends[b] + 1].astype(bool))) for a, b in zip(cuts, cuts[1:])]


def stop_index(out, stops):
    """The byte offset where the first stop string (bytes) in out begins, or None."""
    hits = [i for i in (out.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def batches(items, size, desc):
    """Consecutive slices of items, with lm-eval's progress bar counting requests."""
    bar = tqdm(total=len(items), desc=desc, disable=len(items) < 2)
    for first in range(0, len(items), size):
        yield items[first:first + size]
        bar.update(len(items[first:first + size]))
    bar.close()


def parse_gen_kwargs(kwargs, default_max):
    """lm-eval's generation keywords -> (stop strings as bytes, max new tokens, temperature); greedy unless it
    asks to sample."""
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
    return tuple(s.encode("utf-8") for s in until), int(kwargs.get("max_gen_toks", default_max)), temperature


class StudentLM(LM):
    """lm-eval's model for a byte-model checkpoint (see the module docstring for the scoring)."""

    def __init__(self, model, tok, batch_size=16, window=512, flags="marginal", beam=marginal.BEAM):
        super().__init__()
        if flags not in ("marginal", "late", "greedy"):
            raise ValueError(f"flags={flags!r}: marginal, late or greedy")
        if int(beam) < 1:
            raise ValueError(f"beam={beam}: at least 1")
        self.model, self.tok, self.batch_size, self.flags, self.beam = model, tok, batch_size, flags, int(beam)
        self.window = min(window, model.tcfg.max_seq_len)  # as bench/fidelity.py caps it
        self.max_bytes = min(model.tcfg.max_seq_len, model.scfg.max_bytes) - 1  # a patch is at least one byte
        self._device = model.head.weight.device

    @classmethod
    def load(cls, ckpt, device="cpu", dtype="float32", batch_size=16, window=512, flags="marginal",
             beam=marginal.BEAM):
        student, meta = checkpoint.load_student(ckpt, check_device(device), getattr(torch, dtype))
        return cls(student, load_tokenizer(resolve_teacher_dir(meta["teacher"])), int(batch_size), int(window), flags,
                   beam)

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):  # simple_evaluate(model="byte-student")
        from lm_eval.utils import simple_parse_args_string
        args = {**simple_parse_args_string(arg_string), **{k: v for k, v in (additional_config or {}).items()
                                                           if k in ("device", "batch_size") and v is not None}}
        return cls.load(**args)

    def score(self, pairs):
        """[(context bytes, continuation bytes)] -> per pair (log p of each continuation byte (n,), whether each was
        the likeliest byte (n,), the bytes and boundary flags the model used (L,), (L,)), natural log, fp32 (marginal:
        each byte's share of the beam, float64, and no single flags: None)."""
        out = [None] * len(pairs)
        if self.flags == "marginal":  # the beam batches its own texts (up to 128 hypotheses in lockstep)
            ctxs = [keep_last(c, self.max_bytes - len(x)) for c, x in pairs]
            conts = [x for _, x in pairs]
            scored = marginal.marginal_logprobs(self.model, conts, self.beam, prompts=ctxs, argmax=True)
            return [(s, best, torch.tensor([byte_model.BOS_BYTE, *c, *x]), None)
                    for (s, best), c, x in zip(scored, ctxs, conts)]
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        for chunk in batches(order, self.batch_size, "byte student: loglikelihood"):
            conts = [pairs[i][1] for i in chunk]
            n = max(len(c) for c in conts)
            # each context cut to fit its own continuation, never the batch's longest: a score is the same in any batch
            ctxs = [keep_last(pairs[i][0], self.max_bytes - len(pairs[i][1])) for i in chunk]
            forced = torch.full((len(chunk), n), ord(" "), dtype=torch.long)  # after a short continuation: unscored
            for row, c in enumerate(conts):
                forced[row, :len(c)] = torch.tensor(list(c), dtype=torch.long)
            logp, greedy = torch.zeros(len(chunk), n), torch.zeros(len(chunk), n, dtype=torch.bool)
            if self.flags == "late":  # rows in lockstep
                gen = decoding.LateFlagGeneration(self.model, ctxs, n)
                steps = ((gen.rows, torch.full_like(gen.rows, t), *gen.step(force=forced[:, t])) for t in range(n))
            else:  # rows out of step (ByteGeneration.run)
                gen = decoding.ByteGeneration(self.model, ctxs, n)
                lengths = torch.tensor([len(c) for c in conts], device=gen.x.device)
                steps = ((rows, t, new, byte_model.byte_logprobs(logits))
                         for rows, t, new, logits in gen.run(lengths, force=forced))
            for rows, t, new, byte_logp in steps:
                rows, t = rows.cpu(), t.cpu()
                logp[rows, t] = byte_logp.gather(1, new[:, None])[:, 0].cpu()
                greedy[rows, t] = (byte_logp.argmax(-1) == new).cpu()
            for row, (i, c) in enumerate(zip(chunk, conts)):
                used = len(ctxs[row]) + 1 + len(c)  # 0xFE, the context, the continuation
                out[i] = (logp[row, :len(c)], greedy[row, :len(c)], gen.x[row, :used].cpu(), gen.ends[row, :used].cpu())
        return out

    def loglikelihood(self, requests):
        pairs = [normalized_pair(self.tok, *r.args) for r in requests]
        return [(float(logp.double().sum()), bool(greedy.all())) for logp, greedy, _, _ in self.score(pairs)]

    def loglikelihood_rolling(self, requests):
        segs = [(i, seg, ends) for i, r in enumerate(requests)
                for seg, _, ends in rolling_windows(r.args[0], self.tok, self.window)]
        segs.sort(key=lambda s: -len(s[1]))  # similar lengths share a batch
        totals = [0.0] * len(requests)
        if self.flags == "marginal":  # the true token ends kept in the beam, as bench/fidelity.py's headline
            scored = marginal.marginal_logprobs(self.model, [s for _, s, _ in segs], self.beam,
                                                keep=[e for _, _, e in segs])
            for (i, _, _), shares in zip(segs, scored):
                totals[i] += float(shares.sum())
            return totals
        for chunk in batches(segs, self.batch_size, "byte student: rolling"):
            try:
                texts = [s for _, s, _ in chunk]
                scored = (decoding.late_flag_logprobs(self.model, texts) if self.flags == "late"
                          else decoding.greedy_flag_logprobs(self.model, texts, self.batch_size))
            except ValueError as e:  # more patches in one window than the main network's context holds
                raise ValueError(f"{e}: the student closed more patches in a window of {self.window} tokens than the "
                                 f"teacher's context ({self.model.tcfg.max_seq_len}) holds; use a smaller --window") from None
            for (i, _, _), (logp, *_) in zip(chunk, scored):
                totals[i] += float(logp.double().sum())
        return totals

    def generate_until(self, requests):
        out = [None] * len(requests)
        groups = {}  # one batch shares its generation settings
        for i, r in enumerate(requests):
            groups.setdefault(parse_gen_kwargs(r.args[1], 256), []).append(i)
        for (stops, max_tokens, temperature), rows in groups.items():
            for chunk in batches(rows, self.batch_size, "byte student: generate"):
                texts = self.generate([normalized_pair(self.tok, requests[i].args[0], "")[0] for i in chunk],
                                      stops, max_tokens * BYTES_PER_GEN_TOKEN, temperature)
                for i, text in zip(chunk, texts):
                    out[i] = text
        return out

    @torch.no_grad()
    def generate(self, prompts, stops, max_new_bytes, temperature=0.0):
        """Cached generation for a batch of prompts (bytes) -> the texts, each cut before its first stop string."""
        prompts = [keep_last(p, self.max_bytes - max_new_bytes) for p in prompts]
        outs, live = [bytearray() for _ in prompts], [True] * len(prompts)
        if self.flags == "late":  # rows in lockstep until every row is finished
            gen = decoding.LateFlagGeneration(self.model, prompts, max_new_bytes)
            steps = ((gen.rows, gen.step(temperature)[0]) for _ in range(max_new_bytes))
        else:  # rows out of step; a finished row stops (gen.live)
            gen = decoding.ByteGeneration(self.model, prompts, max_new_bytes,
                                          flags="joint" if self.flags == "marginal" else "greedy")
            steps = ((rows, new) for rows, _, new, _ in gen.run(max_new_bytes, temperature))
        for rows, new in steps:
            for row, b in zip(rows.tolist(), new.tolist()):
                if not live[row]:
                    continue
                ended = [s for s in stops if (outs[row] + bytes([b])).endswith(s)]  # every byte: the first occurrence
                if b == byte_model.BOS_BYTE or ended:  # 0xFE would begin a new document: the text is finished
                    live[row] = False
                    if self.flags != "late":
                        gen.live[row] = False
                    if ended:
                        del outs[row][len(outs[row]) + 1 - max(map(len, ended)):]
                    continue
                outs[row].append(b)
            if not any(live):
                break
        return [bytes(o).decode("utf-8", errors="replace") for o in outs]


class TeacherLM(LM):
    """lm-eval's model for a token teacher, through our forward and tokenizer."""

    def __init__(self, teacher, tok, batch_size=16, window=512):
        super().__init__()
        self.teacher, self.tok, self.batch_size = teacher, tok, batch_size
        self.window = min(window, teacher.cfg.max_seq_len)
        self._device = teacher.head_weight.device
        stops = (tok.eos_id, tok.bos_id)  # as sample.py: never generate ids that spell nothing (or padding rows)
        self.unspellable = torch.tensor([i >= tok.n_vocab or (not tok.token_bytes(i) and i not in stops)
                                         for i in range(teacher.head_weight.shape[0])], device=self._device)

    @classmethod
    def load(cls, teacher, device="cpu", dtype="float32", batch_size=16, window=512):
        model, tok = load_teacher(teacher, check_device(device), getattr(torch, dtype))
        if tok is None:
            raise ValueError(f"teacher {teacher!r} has no tokenizer")
        return cls(model, tok, int(batch_size), int(window))

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):  # simple_evaluate(model="token-teacher")
        from lm_eval.utils import simple_parse_args_string
        args = {**simple_parse_args_string(arg_string), **{k: v for k, v in (additional_config or {}).items()
                                                           if k in ("device", "batch_size") and v is not None}}
        return cls.load(**args)

    def encode_pair(self, context, continuation):
        """lm-eval's HF split -> (context ids, continuation ids), after the normaliser."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tok.encode(self.tok.normalize(context + continuation))
        n_context = len(self.tok.encode(self.tok.normalize(context))) if context else 0
        return whole[:n_context], whole[n_context:]

    @torch.no_grad()
    def loglikelihood(self, requests):
        pairs = [self.encode_pair(*r.args) for r in requests]
        out, limit = [None] * len(pairs), self.teacher.cfg.max_seq_len
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        for chunk in batches(order, self.batch_size, "teacher: loglikelihood"):
            seqs = [([self.tok.doc_start_id] + pairs[i][0] + pairs[i][1])[-limit - 1:] for i in chunk]
            ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)  # right padding: causal, never read
            for row, s in enumerate(seqs):
                ids[row, :len(s)] = torch.tensor(s)
            logp = torch.log_softmax(self.teacher(ids[:, :-1].to(self._device)).float(), -1).cpu()
            for row, (i, s) in enumerate(zip(chunk, seqs)):
                n = min(len(pairs[i][1]), len(s) - 1)  # a continuation longer than the context window: its end
                target = torch.tensor(s[len(s) - n:])
                rows = logp[row, len(s) - 1 - n:len(s) - 1]  # position p predicts token p + 1
                out[i] = (float(rows.gather(1, target[:, None]).double().sum()), bool((rows.argmax(-1) == target).all()))
        return out

    def loglikelihood_rolling(self, requests):
        out = []
        for r in tqdm(requests, desc="teacher: rolling", disable=len(requests) < 2):
            ids = [i for _, seg_ids, _ in rolling_windows(r.args[0], self.tok, self.window) for i in seg_ids]
            out.append(-self.teacher.bits(ids, self.tok.doc_start_id, self.window) * math.log(2) if ids else 0.0)
        return out

    @torch.no_grad()
    def generate_until(self, requests):
        out = []
        for r in tqdm(requests, desc="teacher: generate", disable=len(requests) < 2):
            stops, max_tokens, temperature = parse_gen_kwargs(r.args[1], 256)
            ids = [self.tok.doc_start_id] + self.tok.encode(self.tok.normalize(r.args[0]))
            ids = ids[-(self.teacher.cfg.max_seq_len - max_tokens):]
            cache = self.teacher.new_cache(1, len(ids) + max_tokens)
            logits, text = self.teacher(torch.tensor([ids], device=self._device), cache=cache)[:, -1], bytearray()
            for _ in range(max_tokens):
                logits = logits.masked_fill(self.unspellable, float("-inf"))
                next_id = logits.argmax(-1, keepdim=True) if temperature == 0 else \
                    torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1)
                if int(next_id) in (self.tok.eos_id, self.tok.bos_id):
                    break
                text += self.tok.token_bytes(int(next_id))
                cut = stop_index(text, stops)
                if cut is not None:
                    del text[cut:]
                    break
                logits = self.teacher(next_id, cache=cache)[:, -1]
            out.append(bytes(text).decode("utf-8", errors="replace"))
        return out


register_model("byte-student")(StudentLM)
register_model("token-teacher")(TeacherLM)


@dataclass
class Config:
    ckpt: str = ""             # a byte-model folder (stage1_kd.py / stage2_sft.py output)
    teacher: str = ""          # preset (smollm2, olmo, llama, qwen) or an HF-layout folder; --compare: default the
                               # checkpoint's own teacher
    compare: bool = False      # evaluate the checkpoint and the teacher and print them side by side
    tasks: str = "blm_local"   # comma-separated lm-eval task, group or tag names
    include_path: list = field(default_factory=list)  # more task folders (repeatable); tasks/ is always included
    num_fewshot: int = -1      # -1: each task's own (the local probes use 4, the others 0)
    limit: float = 0           # examples per task: 0 = all, >= 1 a count, < 1 a fraction
    batch_size: int = 16
    device: str = "cpu"        # cpu | cuda
    dtype: str = "float32"     # float32 | bfloat16 (weights and compute)
    window: int = 512          # tokens per rolling window, the document-start token included (bench/fidelity.py)
    flags: str = "marginal"    # the byte student's model: marginal (the joint, summed over patchings: the headline)
                               # | late | greedy
    beam: int = marginal.BEAM  # --flags=marginal: flag prefixes kept per text
    bootstrap_iters: int = 1000  # resamples for the standard errors (lm-eval's default is 100,000)
    seed: int = 1234
    json: str = ""             # write the results here


def task_manager(cfg):
    """Our task folder (and --include_path folders); lm-eval's own index only when a task is not among them
    (indexing its thousands of YAML files takes seconds)."""
    paths = [TASKS_DIR, *cfg.include_path]
    local = TaskManager(include_path=paths, include_defaults=False)
    wanted = [t for t in cfg.tasks.split(",") if t]
    return local if all(t in local.all_tasks for t in wanted) else TaskManager(include_path=paths)


def evaluate(lm, cfg, manager):
    limit = None if cfg.limit <= 0 else int(cfg.limit) if cfg.limit >= 1 else cfg.limit
    return simple_evaluate(model=lm, tasks=[t for t in cfg.tasks.split(",") if t], task_manager=manager,
                           num_fewshot=None if cfg.num_fewshot < 0 else cfg.num_fewshot, limit=limit,
                           bootstrap_iters=cfg.bootstrap_iters, log_samples=False, random_seed=cfg.seed,
                           numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)


def figures(results):
    """{(task, metric): value} from lm-eval's results (no stderr, no alias)."""
    return {(task, key.split(",")[0]): value for task, r in results["results"].items() for key, value in r.items()
            if "," in key and "_stderr" not in key and isinstance(value, (int, float))}


def print_side_by_side(teacher_results, student_results, teacher_name, ckpt):
    t, s = figures(teacher_results), figures(student_results)
    print(f"\n| task | metric | teacher ({teacher_name}) | byte student ({ckpt}) |")
    print("|---|---|---|---|")
    for key in sorted(t.keys() | s.keys()):
        cells = [f"{d[key]:.4f}" if key in d else "-" for d in (t, s)]
        print(f"| {key[0]} | {key[1]} | {cells[0]} | {cells[1]} |", flush=True)


def main(argv):
    cfg = cli.parse_args(Config, argv)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notices would bury the tables
    if not cfg.ckpt and not cfg.teacher:
        raise ValueError("give --ckpt=FOLDER (a byte student), --teacher=NAME|FOLDER, or both with --compare")
    if cfg.ckpt and cfg.teacher and not cfg.compare:
        raise ValueError("--ckpt and --teacher together need --compare")
    if cfg.compare and not cfg.ckpt:
        raise ValueError("--compare needs --ckpt (the teacher defaults to the checkpoint's own)")
    manager, runs = task_manager(cfg), {}
    kwargs = dict(device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size, window=cfg.window)
    if cfg.ckpt:
        teacher_name = cfg.teacher or checkpoint.read_student_config(cfg.ckpt)[0]["teacher"]
        print(f"== byte student {cfg.ckpt}", flush=True)
        runs["student"] = evaluate(StudentLM.load(cfg.ckpt, **kwargs, flags=cfg.flags, beam=cfg.beam), cfg, manager)
        print(make_table(runs["student"]), flush=True)
    if cfg.teacher or cfg.compare:
        teacher_name = cfg.teacher or teacher_name
        print(f"== teacher {teacher_name}", flush=True)
        runs["teacher"] = evaluate(TeacherLM.load(teacher_name, **kwargs), cfg, manager)
        print(make_table(runs["teacher"]), flush=True)
    if cfg.compare:
        print_side_by_side(runs["teacher"], runs["student"], teacher_name, cfg.ckpt)
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump({"config": asdict(cfg), **{k: {"results": r["results"], "n-samples": r.get("n-samples")}
                                                  for k, r in runs.items()}}, f, indent=2, default=str)
    return runs


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
