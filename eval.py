"""Benchmarks for a byte student and its teacher through lm-evaluation-harness, run the same way, side by side.

    python eval.py --ckpt=out/stage2 --tasks=blm_local --limit=50          # the byte student
    python eval.py --teacher=smollm2 --tasks=blm_local --limit=50          # the token teacher (our forward)
    python eval.py --compare --ckpt=out/stage2 --tasks=blm_retention       # both (teacher: the checkpoint's own),
                                                                           # and the retention table
    python eval.py --compare --ckpt=out/stage2 --tasks=hellaswag,arc_easy  # standard tasks, on a machine with the Hub

Local tasks (tasks/*.yaml, built by tasks/build.py from held-out text, no download): shakespeare_cloze,
shakespeare_bpb, cute_spell, cute_count, cute_reverse, cute_contains, and in the formats of the zero-shot suite byte
models are judged on, lambada_plays (LAMBADA), swag_plays and code_nextline (HellaSwag's form on verse and on code);
the tags blm_local (all nine), blm_retention (all but shakespeare_bpb) and cute_local (the four probes). Each task
runs as its own simple_evaluate, timed. --compare prints the retention table: per task and headline metric, both
models with their standard errors, student/teacher, and the bits per byte of both on the task's own text (the true
continuations given their contexts); then the mean retention of acc over the multiple-choice tasks.
Needs lm-eval (bash setup.sh installs it); nothing else in the repo imports it.

Both models split a (context, continuation) request as lm-eval's HF model does: trailing whitespace of the context
moves to the continuation, so both score the same bytes. A multiple-choice item's choices share their context, and
both models run it once: the student's beam over the context forks into its choices (conditioning.py), the teacher
copies its cache rows.

How each request is scored (text is normalised by the teacher's tokenizer first, as the training text was; the
details: docs/method.md, "How eval.py answers each request type"):
  byte student  by default (--byte_model=joint) the joint model that sample.py writes from, scored by its byte
                marginal over patchings (a beam of --beam flag prefixes: an upper bound on the exact marginal's
                bits); --byte_model=late / greedy the late-flag / greedy-flag byte models (decoding.py).
                loglikelihood: joint: log A(context + continuation) - log A(context), A the beam's kept sum over
                the whole string's patchings from the document start (conditioning.py), the canonical token ends of
                both kept as one path (--keep_tokens); --context=patcher (the old rule) and late / greedy: the
                context prefilled along the patcher's flags, then the continuation. is_greedy: every continuation
                byte was the likeliest (joint: under the beam's next-byte mixture).
                loglikelihood_rolling: bench/fidelity.py's windows (runs of --window - 1 teacher tokens, each from
                a fresh document start, the true token ends kept): its student_bpb_marginal (late, greedy: theirs).
                generate_until: cached generation at the request's temperature after the prompt read as a context
                is (joint: from one hypothesis of its beam, the heaviest at temperature 0), cut before the first
                stop string, at 0xFE (a new document) or after 4 bytes per max_gen_toks.
  teacher       our own forward and tokenizer (no transformers at run time); every sequence starts with the
                document-start token, as in training; the (context, continuation) split as lm-eval's HF model makes
                it (the continuation's tokens are those of the whole after the context's); rolling: teacher.bits
                over the same windows (fidelity's teacher_bpb).
"""
import logging
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

import checkpoint
import cli
import conditioning
import decoding
import marginal
from chat import teacher_answers
from conditioning import conditional_logprobs, keep_last, token_ends
from model import BOS_BYTE, byte_logprobs
from retention import print_side_by_side, retention, retention_text
from teacher import check_device, load_teacher, resolve_teacher_dir
from tokenizer import align_document, load_tokenizer

try:
    from lm_eval import simple_evaluate
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table, simple_parse_args_string
except ImportError:  # an optional tool: setup.sh installs it
    sys.exit("eval.py needs lm-eval: bash setup.sh, or .venv/bin/pip install -r requirements-eval.txt")
from tqdm import tqdm

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
BYTES_PER_GEN_TOKEN = 4  # the byte student's generation limit: this many bytes per max_gen_toks


def lm_eval_split(context, continuation):
    """lm-eval's HF model's split, for both models: trailing whitespace of the context moves to the continuation, so
    that both score the same text (a verse line's "  \\n" before the next line, say)."""
    spaces = len(context) - len(context.rstrip())
    return (context[:-spaces], context[-spaces:] + continuation) if spaces else (context, continuation)


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


@torch.no_grad()
def flag_scores(model, byte_model, ctxs, conts):
    """(log p (B, n) fp32, whether it was the likeliest byte (B, n)) of each continuation byte after its context, read
    along the patcher's flags, under byte_model late | greedy (one batch); and the rows' RowState (bytes, flags used)."""
    n = max(map(len, conts))
    forced = torch.tensor([[*c] + [ord(" ")] * (n - len(c)) for c in conts], dtype=torch.long)  # a space: unscored
    logp, greedy = torch.zeros(len(conts), n), torch.zeros(len(conts), n, dtype=torch.bool)
    if byte_model == "late":  # rows in lockstep
        gen = decoding.LateFlagGeneration(model, ctxs, n)
        steps = ((gen.rows, torch.full_like(gen.rows, t), *gen.step(force=forced[:, t])) for t in range(n))
    else:  # rows out of step (ByteGeneration.run)
        gen = decoding.ByteGeneration(model, ctxs, n)
        lengths = torch.tensor([len(c) for c in conts], device=gen.rows.device)
        steps = ((rows, t, new, byte_logprobs(logits)) for rows, t, new, logits in gen.run(lengths, force=forced))
    for rows, t, new, byte_logp in steps:
        rows, t = rows.cpu(), t.cpu()
        logp[rows, t] = byte_logp.gather(1, new[:, None])[:, 0].cpu()
        greedy[rows, t] = (byte_logp.argmax(-1) == new).cpu()
    return logp, greedy, gen.state


@register_model("byte-student")
class StudentLM(LM):
    """lm-eval's model for a byte-model checkpoint (see the module docstring for the scoring)."""

    def __init__(self, model, tok, batch_size=16, window=512, byte_model="joint", beam=marginal.BEAM, keep_tokens=True,
                 context="marginal", context_tail=conditioning.TAIL or 0):
        super().__init__()
        if byte_model not in ("joint", "late", "greedy"):
            raise ValueError(f"byte_model={byte_model!r}: joint, late or greedy")
        if context not in ("marginal", "patcher"):
            raise ValueError(f"context={context!r}: marginal or patcher")
        self.context = context  # joint: the context read by the beam over its patchings, or the patcher's
        self.tail = int(context_tail) or None  # the beam's bytes at a context's end (None: all; conditioning.py)
        if self.tail is not None and self.tail < 0:
            raise ValueError(f"context_tail={context_tail}: 0 (the whole context) or a number of bytes")
        if int(beam) < 1:
            raise ValueError(f"beam={beam}: at least 1")
        self.model, self.tok, self.byte_model = model, tok, byte_model
        self.beam, self.batch_size = int(beam), int(batch_size)
        self.keep_tokens = keep_tokens not in (False, "False", "false", "0")  # also from lm-eval's model_args string
        self.work = {}  # joint: main-network rows (contexts, continuations) and more, summed (evaluate)
        self.window = min(int(window), model.tcfg.max_seq_len)  # as bench/fidelity.py caps it
        self.max_bytes = min(model.tcfg.max_seq_len, model.scfg.max_bytes) - 1  # a patch is at least one byte
        self._device = model.head.weight.device

    @classmethod
    def load(cls, ckpt, device="cpu", dtype="float32", **options):  # options: __init__'s (byte_model=, beam=, ...)
        student, meta = checkpoint.load_student(ckpt, check_device(device), getattr(torch, dtype))
        return cls(student, load_tokenizer(resolve_teacher_dir(meta["teacher"])), **options)

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):  # simple_evaluate(model="byte-student")
        args = {**simple_parse_args_string(arg_string), **{k: v for k, v in (additional_config or {}).items()
                                                           if k in ("device", "batch_size") and v is not None}}
        return cls.load(**args)

    def score(self, pairs):
        """[(context bytes, continuation bytes)] -> per pair (log p of each continuation byte (n,), whether each was
        the likeliest byte (n,), the bytes and boundary flags the model used (L,), (L,)), natural log, fp32 (joint:
        each byte's share of the beam, float64, and no single flags: None)."""
        out = [None] * len(pairs)
        if self.byte_model == "joint":  # the beam batches its own texts (up to 128 hypotheses in lockstep)
            ctxs = [keep_last(c, self.max_bytes - len(x)) for c, x in pairs]
            conts = [x for _, x in pairs]
            with tqdm(total=len(pairs), desc="byte student: loglikelihood (marginal)", disable=len(pairs) < 2) as bar:
                if self.context == "marginal":  # log A(context + continuation) - log A(context)
                    ends = {c: token_ends(self.tok, c) for c in dict.fromkeys(ctxs)} if self.keep_tokens else {}
                    keep = [(ends.get(c), token_ends(self.tok, x) if self.keep_tokens else None)
                            for c, x in zip(ctxs, conts)]
                    scored = conditional_logprobs(self.model, list(zip(ctxs, conts)), self.beam, keep=keep, argmax=True,
                                                  stats=self.work, progress=bar, tail=self.tail)
                else:  # the old way: the context prefilled along the patcher's flags
                    keep = [token_ends(self.tok, x) for x in conts] if self.keep_tokens else None
                    scored = marginal.marginal_logprobs(self.model, conts, self.beam, prompts=ctxs, keep=keep,
                                                        argmax=True, stats=self.work, progress=bar)
            return [(s, best, torch.tensor([BOS_BYTE, *c, *x]), None)
                    for (s, best), c, x in zip(scored, ctxs, conts)]
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        for chunk in batches(order, self.batch_size, "byte student: loglikelihood"):
            conts = [pairs[i][1] for i in chunk]
            # each context cut to fit its own continuation, never the batch's longest: a score is the same in any batch
            ctxs = [keep_last(pairs[i][0], self.max_bytes - len(pairs[i][1])) for i in chunk]
            logp, greedy, state = flag_scores(self.model, self.byte_model, ctxs, conts)
            for row, (i, c) in enumerate(zip(chunk, conts)):
                used = len(ctxs[row]) + 1 + len(c)  # 0xFE, the context, the continuation
                out[i] = (logp[row, :len(c)], greedy[row, :len(c)], state.x[row, :used].cpu(),
                          state.ends[row, :used].cpu())
        return out

    def loglikelihood(self, requests):
        pairs = [normalized_pair(self.tok, *lm_eval_split(*r.args)) for r in requests]
        return [(float(logp.double().sum()), bool(greedy.all())) for logp, greedy, _, _ in self.score(pairs)]

    def loglikelihood_rolling(self, requests):
        segs = [(i, seg, ends) for i, r in enumerate(requests)
                for seg, _, ends in rolling_windows(r.args[0], self.tok, self.window)]
        segs.sort(key=lambda s: -len(s[1]))  # similar lengths share a batch
        totals = [0.0] * len(requests)
        if self.byte_model == "joint":  # the true token ends kept in the beam, as bench/fidelity.py's headline
            with tqdm(total=len(segs), desc="byte student: rolling (marginal)", disable=len(segs) < 2) as bar:
                scored = marginal.marginal_logprobs(self.model, [s for _, s, _ in segs], self.beam,
                                                    keep=[e for _, _, e in segs], stats=self.work, progress=bar)
            for (i, _, _), shares in zip(segs, scored):
                totals[i] += float(shares.sum())
            return totals
        for chunk in batches(segs, self.batch_size, "byte student: rolling"):
            try:
                texts = [s for _, s, _ in chunk]
                scored = (decoding.late_flag_logprobs(self.model, texts) if self.byte_model == "late"
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
        if self.byte_model == "late":  # rows in lockstep until every row is finished
            gen = decoding.LateFlagGeneration(self.model, prompts, max_new_bytes)
            steps = ((gen.rows, gen.step(temperature)[0]) for _ in range(max_new_bytes))
        elif self.byte_model == "joint" and self.context == "marginal":  # from a hypothesis of the prompt's beam
            keep = [token_ends(self.tok, p) for p in prompts] if self.keep_tokens else None
            gen = conditioning.generation_after(self.model, prompts, max_new_bytes, "joint", temperature,
                                                beam=self.beam, keep=keep, tail=self.tail)
            steps = ((rows, new) for rows, _, new, _ in gen.run(max_new_bytes, temperature))
        else:  # rows out of step; a finished row stops (gen.live)
            gen = decoding.ByteGeneration(self.model, prompts, max_new_bytes, byte_model=self.byte_model)
            steps = ((rows, new) for rows, _, new, _ in gen.run(max_new_bytes, temperature))
        for rows, new in steps:
            for row, b in zip(rows.tolist(), new.tolist()):
                if not live[row]:
                    continue
                ended = [s for s in stops if (outs[row] + bytes([b])).endswith(s)]  # every byte: the first occurrence
                if b == BOS_BYTE or ended:  # 0xFE would begin a new document: the text is finished
                    live[row] = False
                    if self.byte_model != "late":
                        gen.live[row] = False
                    if ended:
                        del outs[row][len(outs[row]) + 1 - max(map(len, ended)):]
                    continue
                outs[row].append(b)
            if not any(live):
                break
        return [bytes(o).decode("utf-8", errors="replace") for o in outs]


@register_model("token-teacher")
class TeacherLM(LM):
    """lm-eval's model for a token teacher, through our forward and tokenizer."""

    def __init__(self, teacher, tok, batch_size=16, window=512):
        super().__init__()
        self.teacher, self.tok, self.batch_size = teacher, tok, batch_size
        self.window = min(window, teacher.cfg.max_seq_len)
        self._device = teacher.head_weight.device
        self.work = {}  # the tokens run through the network (padding not counted), summed (evaluate)
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
        args = {**simple_parse_args_string(arg_string), **{k: v for k, v in (additional_config or {}).items()
                                                           if k in ("device", "batch_size") and v is not None}}
        return cls.load(**args)

    def count(self, tokens):
        self.work["tokens"] = self.work.get("tokens", 0) + tokens

    def encode_pair(self, context, continuation):
        """lm-eval's HF split -> (context ids, continuation ids), after the normaliser."""
        context, continuation = lm_eval_split(context, continuation)
        whole = self.tok.encode(self.tok.normalize(context + continuation))
        n_context = len(self.tok.encode(self.tok.normalize(context))) if context else 0
        return whole[:n_context], whole[n_context:]

    @torch.no_grad()
    def loglikelihood(self, requests):
        """Requests with the same context (a multiple-choice item's choices) run it once: the context's keys and values
        are copied to one cache row per continuation, and each continuation runs after them. A pair longer than the
        context window keeps its last max_seq_len + 1 tokens and is run alone."""
        pairs = [self.encode_pair(*r.args) for r in requests]
        out, limit, groups = [None] * len(pairs), self.teacher.cfg.max_seq_len, {}
        fits = [0 < len(cont) and 1 + len(ctx) + len(cont) <= limit + 1 for ctx, cont in pairs]
        for i, (ctx, _) in enumerate(pairs):
            if fits[i]:
                groups.setdefault(tuple(ctx), []).append(i)
        shared = sorted(groups.values(), key=lambda g: -len(pairs[g[0]][0]) - max(len(pairs[i][1]) for i in g))
        alone = sorted((i for i in range(len(pairs)) if not fits[i]), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        for chunk in batches(shared, self.batch_size, "teacher: loglikelihood (contexts)"):
            for i, scored in zip([i for g in chunk for i in g], self.after_contexts(
                    [[self.tok.doc_start_id] + pairs[g[0]][0] for g in chunk], [[pairs[i][1] for i in g] for g in chunk])):
                out[i] = scored
        for chunk in batches(alone, self.batch_size, "teacher: loglikelihood"):
            seqs = [([self.tok.doc_start_id] + pairs[i][0] + pairs[i][1])[-limit - 1:] for i in chunk]
            self.count(sum(len(s) - 1 for s in seqs))
            ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)  # right padding: causal, never read
            for row, s in enumerate(seqs):
                ids[row, :len(s)] = torch.tensor(s)
            logp = torch.log_softmax(self.teacher(ids[:, :-1].to(self._device)).float(), -1).cpu()
            for row, (i, s) in enumerate(zip(chunk, seqs)):
                n = min(len(pairs[i][1]), len(s) - 1)  # a continuation longer than the context window: its end
                out[i] = self.judge(logp[row, len(s) - 1 - n:len(s) - 1], s[len(s) - n:])  # position p predicts p + 1
        return out

    @staticmethod
    def judge(logp, target):
        """Log-probability rows (n, V) that predict target (n ids) -> (their log-likelihood, whether each was the argmax)."""
        target = torch.tensor(target)
        return float(logp.gather(1, target[:, None]).double().sum()), bool((logp.argmax(-1) == target).all())

    def after_contexts(self, contexts, continuations):
        """contexts: id lists (each starting with the document start); continuations: per context, its id lists (each
        non-empty) -> (log-likelihood, is_greedy) per continuation, in order. One batched call for the contexts (right
        padding), their cache rows copied to one row per continuation, one batched call for the continuations."""
        lengths = torch.tensor([len(c) for c in contexts])
        owner = torch.tensor([g for g, conts in enumerate(continuations) for _ in conts])
        conts = [c for cs in continuations for c in cs]
        n_cont = max(map(len, conts))
        self.count(int(lengths.sum()) + sum(len(c) - 1 for c in conts))
        ctx_cache = self.teacher.new_cache(len(contexts), int(lengths.max()))
        ids = torch.zeros(len(contexts), int(lengths.max()), dtype=torch.long)
        for row, c in enumerate(contexts):
            ids[row, :len(c)] = torch.tensor(c)
        hidden = self.teacher(ids.to(self._device), cache=ctx_cache, advance=lengths.to(self._device), return_hidden=True)
        first = self.teacher.logits(hidden[torch.arange(len(contexts)), lengths - 1])  # the output layer where it is read
        first = torch.log_softmax(first.float(), -1).cpu()  # predicts each continuation's first token
        cache = self.teacher.new_cache(len(conts), int(lengths.max()) + n_cont)
        cache.copy_rows(torch.arange(len(conts), device=self._device), owner.to(self._device), ctx_cache)
        del ctx_cache
        ids = torch.zeros(len(conts), n_cont, dtype=torch.long)
        for row, c in enumerate(conts):
            ids[row, :len(c)] = torch.tensor(c)
        logp = torch.log_softmax(self.teacher(ids[:, :-1].to(self._device), cache=cache).float(), -1).cpu() \
            if n_cont > 1 else torch.zeros(len(conts), 0, first.shape[-1])
        return [self.judge(torch.cat([first[owner[row], None], logp[row, :len(c) - 1]]), c) for row, c in enumerate(conts)]

    def loglikelihood_rolling(self, requests):
        out = []
        for r in tqdm(requests, desc="teacher: rolling", disable=len(requests) < 2):
            ids = [i for _, seg_ids, _ in rolling_windows(r.args[0], self.tok, self.window) for i in seg_ids]
            self.count(len(ids) + -(-len(ids) // (self.window - 1)))  # each window: the document start, its tokens
            out.append(-self.teacher.bits(ids, self.tok.doc_start_id, self.window) * math.log(2) if ids else 0.0)
        return out

    def generate_until(self, requests):
        """Batched (chat.teacher_answers: right-padded prompts in one KV cache), each text cut before its first stop
        string; an end or start of document ends it, and ids that spell nothing are never generated."""
        out, groups = [None] * len(requests), {}
        for i, r in enumerate(requests):
            groups.setdefault(parse_gen_kwargs(r.args[1], 256), []).append(i)
        ends = {i for i in (self.tok.eos_id, self.tok.bos_id) if i is not None}
        for (stops, max_tokens, temperature), rows in groups.items():
            prompts = [([self.tok.doc_start_id] + self.tok.encode(self.tok.normalize(requests[i].args[0])))
                       [-(self.teacher.cfg.max_seq_len - max_tokens):] for i in rows]

            def text(ids):
                return b"".join(self.tok.token_bytes(t) for t in ids if t not in ends)

            with tqdm(total=len(rows), desc="teacher: generate", disable=len(rows) < 2) as bar:
                answers = teacher_answers(self.teacher, prompts, max_tokens, ends, self.batch_size,
                                          lambda _: bar.update(min(self.batch_size, bar.total - bar.n)),
                                          self.unspellable, temperature,
                                          lambda _, ids: stop_index(text(ids), stops) is not None)
            self.count(sum(map(len, prompts)) + sum(max(len(a) - 1, 0) for a in answers))
            for i, ids in zip(rows, answers):
                done = text(ids)
                cut = stop_index(done, stops)
                out[i] = bytes(done[:cut]).decode("utf-8", errors="replace")
        return out


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
    byte_model: str = "joint"  # the byte student's model: joint (scored by its marginal over patchings: the headline)
                               # | late | greedy (decoding.py)
    beam: int = marginal.BEAM  # --byte_model=joint: flag prefixes kept per text
    keep_tokens: bool = True   # --byte_model=joint: the canonical token ends of a context and of a continuation stay in
                               # the beam (a path the figure is never worse than; False: the beam alone)
    context: str = "marginal"  # --byte_model=joint: marginal (log A(context + continuation) - log A(context), the beam
                               # over the context's patchings) | patcher (the old rule: the context prefilled along
                               # the patcher's flags), for comparison
    context_tail: int = conditioning.TAIL or 0  # --context=marginal: the beam sums over the flags of a context's last
                               # N bytes, the bytes before go along their canonical token ends (0: the whole context)
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


def leaf_tasks(manager, names):
    """The comma-separated names, each tag expanded into its tasks (in index order); a group or task stays whole."""
    out = []
    for name in (t for t in names.split(",") if t):
        members = [t for t, e in manager.task_index.items() if name in e.tags] if name in manager.all_tags else [name]
        out += [t for t in members if t not in out]
    return out


def evaluate(lm, cfg, manager, label):
    """simple_evaluate once per task (so that each has its wall time and the work its model did: the teacher's tokens,
    the student's main-network rows), the results merged; samples are logged for the bits per byte of each task's
    own text (own_text_bits)."""
    limit = None if cfg.limit <= 0 else int(cfg.limit) if cfg.limit >= 1 else cfg.limit
    merged, seconds, work = {}, {}, {}
    for task in leaf_tasks(manager, cfg.tasks):
        start, before = time.perf_counter(), dict(getattr(lm, "work", {}))
        r = simple_evaluate(model=lm, tasks=[task], task_manager=manager,
                            num_fewshot=None if cfg.num_fewshot < 0 else cfg.num_fewshot, limit=limit,
                            bootstrap_iters=cfg.bootstrap_iters, log_samples=True, random_seed=cfg.seed,
                            numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)
        seconds[task] = time.perf_counter() - start
        work[task] = {k: v - before.get(k, 0) for k, v in getattr(lm, "work", {}).items() if v != before.get(k, 0)}
        done = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in work[task].items())
        print(f"{label}: {task} in {seconds[task]:,.0f} s" + (f" ({done})" if done else ""), flush=True)
        for key, value in r.items():
            if isinstance(value, dict):
                merged.setdefault(key, {}).update(value)
    merged["seconds"], merged["work"] = seconds, work
    return merged


def main(argv):
    if any(arg.partition("=")[0] == "--flags" for arg in argv):  # the option's old name
        raise ValueError("--flags is now --byte_model (joint | late | greedy; --flags=marginal was --byte_model=joint)")
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
        lm = StudentLM.load(cfg.ckpt, **kwargs, byte_model=cfg.byte_model, beam=cfg.beam, keep_tokens=cfg.keep_tokens,
                            context=cfg.context, context_tail=cfg.context_tail)
        runs["student"] = evaluate(lm, cfg, manager, "byte student")
        print(make_table(runs["student"]), flush=True)
    if cfg.teacher or cfg.compare:
        teacher_name = cfg.teacher or teacher_name
        print(f"== teacher {teacher_name}", flush=True)
        runs["teacher"] = evaluate(TeacherLM.load(teacher_name, **kwargs), cfg, manager, "teacher")
        print(make_table(runs["teacher"]), flush=True)
    table = None
    if cfg.compare:
        print_side_by_side(runs["teacher"], runs["student"], teacher_name, cfg.ckpt)
        table = retention(runs["teacher"], runs["student"])
        text = retention_text(*table, seconds={k: r["seconds"] for k, r in runs.items()})
        print("\n" + text, flush=True)
        how = f" (its marginal, beam {cfg.beam}, --context={cfg.context}{', the token ends kept' * cfg.keep_tokens})"
        print(f"student scored by --byte_model={cfg.byte_model}" + (how if cfg.byte_model == "joint" else "")
              + "; ± one standard error (lm-eval's bootstrap or closed form)", flush=True)
    if cfg.json:
        report = {"config": asdict(cfg), **{k: {key: r.get(key) for key in ("results", "n-samples", "seconds", "work")}
                                            for k, r in runs.items()}}
        if table:
            report["retention"] = {"rows": table[0], "mean_mc_acc": table[1], "mc_tasks": table[2], "table": text}
        with open(cfg.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    return runs


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
