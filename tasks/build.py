"""Offline lm-evaluation-harness tasks, built from the held-out Shakespeare plays (data.HELD_OUT_PLAYS: validation
text that no stage trains on), so that eval.py runs on a machine without the Hub.

    python tasks/build.py [--out=tasks/data]

Writes one JSON-lines file per task split (deterministic: a fixed seed; a few seconds). The task YAMLs beside this file
read them through tasks/utils.py, which runs this build on first use when the files are missing, so nothing here
needs to be run by hand or committed.

  shakespeare_cloze   multiple choice: up to 400 bytes of the raw text before the last word of a verse line (from a
                      line start), and that word among 3 distractors of about its length that also end lines in the
                      held-out plays (acc)
  shakespeare_bpb     rolling likelihood: held-out Hamlet in documents of about 2 KB, cut at blank lines
                      (wikitext-style word_perplexity, byte_perplexity, bits_per_byte)
  cute_spell, cute_count, cute_reverse   generation, few-shot, in the style of CUTE (Edman et al. 2024,
                      arXiv 2409.15452): spell a word with spaces, count a letter in it, write it backwards (exact match)
  cute_contains       multiple choice: which of four words contains a given letter (acc)

The retention suite (tag blm_retention; the formats of the zero-shot suite byte models are judged on):
  lambada_plays       LAMBADA-style: the last word of a speech in a held-out play, given at least 400 bytes of the text
                      before it, from a line start (acc: greedy decoding writes the word; perplexity)
  swag_plays          HellaSwag-style: the next verse line of a held-out play among 4, the distractors other lines of
                      the same play of about its length (acc, acc_norm)
  code_nextline       the same form on the held-out standard-library modules: the next line of code among 4, the
                      distractors other lines of the same module with its indentation and about its length
"""
import json
import os
import random
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
import data  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SEED = 13
N_CLOZE = 500             # cloze items over the three held-out plays
CLOZE_CONTEXT = 400       # bytes of text before the hidden word, at most (from the first line start in them)
BPB_PLAY = "hamlet"       # the rolling task scores the play bench/fidelity.py scores
BPB_DOC_BYTES = 2000      # a document ends at the first blank line after this many bytes
N_CUTE, N_SHOTS = 200, 20  # test items per probe, and the few-shot pool (training split) drawn from other words
LINE_START = re.compile(r"\n(?!\n)")
LINE_END_WORD = re.compile(r"(?<= )([a-z]{4,})[,.;:!?']*  \n")  # the last word of a verse line (before the break)
N_ITEMS = 500             # items per retention task
LAMBADA_CONTEXT = 400     # bytes of text before the hidden word, at least (back to the start of a line)
NEXT_CONTEXT = 400        # the next-line tasks: bytes before the true line, at least (back to the start of a line)
LINE_BYTES = (16, 48)     # the next-line tasks: the true line's length, stripped
SPEECH_END_WORD = re.compile(r"(?<= )([A-Za-z]{3,})[.!?]?\n\n")  # the last word of a speech (a paragraph)
VERSE_LINE = re.compile(r"^(?![*_ ])(.+?)(?:  \n|\n\n)", re.M)  # a verse line of a speech (not a name, not a direction)


def plays():
    out = {}
    for play in data.HELD_OUT_PLAYS:
        with open(data.play_path(play), encoding="utf-8") as f:
            out[play] = f.read()
    return out


def cloze(texts, rng):
    """Hidden line-end words with up to CLOZE_CONTEXT bytes of the raw text before them (from a line start);
    distractors: other line-end words within one letter of the answer's length (so length normalisation cannot tell
    them apart)."""
    found = [(text, m) for text in texts.values() for m in LINE_END_WORD.finditer(text)]
    by_length = {}
    for _, m in found:
        by_length.setdefault(len(m.group(1)), set()).add(m.group(1))
    pools = {n: sorted(set().union(*(by_length.get(k, set()) for k in (n - 1, n, n + 1)))) for n in by_length}
    docs = []
    for text, m in rng.sample(found, N_CLOZE):
        word, start = m.group(1), m.start(1) - 1  # the context stops before the space: the choice is " word"
        lo = max(start - CLOZE_CONTEXT, 0)
        line = LINE_START.search(text, lo, start) if lo else None  # the first line start (not a blank line) in them
        context = text[line.end() if line else lo:start]
        others = rng.sample([w for w in pools[len(word)] if w != word], 3)
        choices = sorted([word, *others], key=lambda _: rng.random())
        docs.append({"context": context, "choices": choices, "answer": choices.index(word)})
    return docs


def lambada(texts, rng):
    """The last word of a speech with at least LAMBADA_CONTEXT bytes of the play before it, cut back to a line start
    (LAMBADA's form: a passage of a few sentences, about 75 words, and the target is the word alone, after a space;
    a speech can be far longer, and its length would only make the item slower, not the word more predictable)."""
    found = [(text, m) for text in texts.values() for m in SPEECH_END_WORD.finditer(text)
             if m.start(1) > LAMBADA_CONTEXT]
    docs = []
    for text, m in rng.sample(found, min(N_ITEMS, len(found))):
        start = m.start(1) - 1
        cut = text.rfind("\n", 0, start - LAMBADA_CONTEXT)
        while cut >= 0 and text[cut + 1] == "\n":  # a blank line: the line start before it
            cut = text.rfind("\n", 0, cut)
        docs.append({"context": text[cut + 1:start], "word": m.group(1)})
    return docs


def next_line(sources, candidates, rng, same_indent=False):
    """HellaSwag's form on lines: the text before a true line (at least NEXT_CONTEXT bytes, back to a line start) and
    that line among 3 distractors drawn from the same source, each within a fifth of its length (at least 3 bytes),
    distinct from it and from each other once stripped (with same_indent: with its leading whitespace).
    sources: {name: text}; candidates(text) -> [(start, line)] of lines that may be asked."""
    found, pools = [], {}
    for name, text in sources.items():
        lines = candidates(text)
        found += [(name, text, start, line) for start, line in lines if start > NEXT_CONTEXT]
        pools[name] = sorted({line for _, line in lines})
    docs = []
    for name, text, start, line in rng.sample(found, len(found)):
        n, indent = len(line.strip()), line[:len(line) - len(line.lstrip())]
        pool = [c for c in pools[name] if abs(len(c.strip()) - n) <= max(3, n // 5) and c.strip() != line.strip()
                and (not same_indent or c[:len(c) - len(c.lstrip())] == indent)]
        others = {}
        for c in rng.sample(pool, min(len(pool), 12)):
            others.setdefault(c.strip(), c)
        if len(others) < 3:
            continue
        choices = sorted([line, *list(others.values())[:3]], key=lambda _: rng.random())
        cut = text.rfind("\n", 0, start - NEXT_CONTEXT) + 1
        docs.append({"context": text[cut:start], "choices": choices, "answer": choices.index(line)})
        if len(docs) == N_ITEMS:
            break
    return docs


def verse_lines(text):
    lo, hi = LINE_BYTES
    return [(m.start(1), m.group(1)) for m in VERSE_LINE.finditer(text) if lo <= len(m.group(1).strip()) <= hi]


def code_lines(text):
    lo, hi, out, start = *LINE_BYTES, [], 0
    for line in text.split("\n"):
        if lo <= len(line.strip()) <= hi:
            out.append((start, line))
        start += len(line) + 1
    return out


def modules():
    out = {}
    for name in data.HELD_OUT_MODULES:
        with open(data.module_path(name), encoding="utf-8") as f:
            out[name] = f.read()
    return out


def rolling_documents(text):
    """Consecutive documents of at least BPB_DOC_BYTES bytes, each ending after a blank line (the last takes the rest)."""
    docs, start, raw = [], 0, text.encode("utf-8")
    while start < len(raw):
        cut = raw.find(b"\n\n", start + BPB_DOC_BYTES)
        stop = len(raw) if cut < 0 else cut + 2
        docs.append({"text": raw[start:stop].decode("utf-8")})
        start = stop
    return docs


def words(texts):
    """Distinct lower-case words of 4 to 9 letters in the held-out plays, sorted."""
    return sorted({w for text in texts.values() for w in re.findall(r"\b[a-z]{4,9}\b", text)})


def cute(vocabulary, rng):
    """The four probes, each with a test split and a disjoint few-shot (train) split of other words."""
    chosen = rng.sample(vocabulary, 4 * (N_CUTE + N_SHOTS))
    tasks = {}
    for k, name in enumerate(("spell", "count", "reverse", "contains")):
        items = chosen[k * (N_CUTE + N_SHOTS):(k + 1) * (N_CUTE + N_SHOTS)]
        docs = [PROBES[name](w, vocabulary, rng) for w in items]
        tasks[f"cute_{name}"] = {"test": docs[:N_CUTE], "train": docs[N_CUTE:]}
    return tasks


def spell(word, vocabulary, rng):
    return {"word": word, "answer": " ".join(word)}


def count(word, vocabulary, rng):
    letter = rng.choice(word)  # a letter of the word, so counts of 1, 2, 3 all occur
    return {"word": word, "letter": letter, "answer": str(word.count(letter))}


def reverse(word, vocabulary, rng):
    return {"word": word, "answer": word[::-1]}


def contains(word, vocabulary, rng):
    """word holds a letter that three other words of about its length lack."""
    for letter in rng.sample(sorted(set(word)), len(set(word))):
        lacking = [w for w in vocabulary if letter not in w and abs(len(w) - len(word)) <= 1]
        if len(lacking) >= 3:
            break
    choices = sorted([word, *rng.sample(lacking, 3)], key=lambda _: rng.random())
    return {"letter": letter, "choices": choices, "answer": choices.index(word)}


PROBES = {"spell": spell, "count": count, "reverse": reverse, "contains": contains}


def build(out=OUT):
    """Every task's files under out/ -> {file name: number of documents}."""
    rng = random.Random(SEED)
    texts = plays()
    files = {"shakespeare_cloze/test": cloze(texts, rng),
             "shakespeare_bpb/test": rolling_documents(texts[BPB_PLAY])}
    files["lambada_plays/test"] = lambada(texts, random.Random(SEED + 1))  # each task its own stream: adding one
    files["swag_plays/test"] = next_line(texts, verse_lines, random.Random(SEED + 2))  # changes no other
    files["code_nextline/test"] = next_line(modules(), code_lines, random.Random(SEED + 3), same_indent=True)
    for name, splits in cute(words(texts), rng).items():
        for split, docs in splits.items():
            files[f"{name}/{split}"] = docs
    os.makedirs(out, exist_ok=True)
    for name, docs in files.items():
        path = os.path.join(out, name.replace("/", ".") + ".jsonl")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
        os.replace(path + ".tmp", path)  # a reader never sees half a file
    return {name: len(docs) for name, docs in files.items()}


if __name__ == "__main__":
    args = dict(a.removeprefix("--").split("=", 1) for a in sys.argv[1:])
    counts = build(args.get("out", OUT))
    for name, n in counts.items():
        print(f"{name}: {n} documents")
