"""Loaders and scorers for the task YAMLs in this folder (lm-evaluation-harness `!function` targets).

The data files are built from the held-out plays by tasks/build.py on first use (deterministic), into tasks/data/."""
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # lm-eval imports this file by path; build.py sits beside it
    sys.path.insert(0, HERE)
import build  # noqa: E402


def load(task_data, **_):
    """custom_dataset: the splits of one task (dataset_kwargs: task_data=NAME) -> datasets.DatasetDict. Other keyword
    arguments (lm-eval passes the task's metadata too) are ignored."""
    import datasets
    files = {}
    for split in ("test", "train"):
        path = os.path.join(build.OUT, f"{task_data}.{split}.jsonl")
        if split == "test" and not os.path.exists(path):
            build.build()
        if os.path.exists(path):
            files[split] = path
    splits = {}
    for split, path in files.items():
        with open(path, encoding="utf-8") as f:
            splits[split] = datasets.Dataset.from_list([json.loads(line) for line in f])
    return datasets.DatasetDict(splits)


def rolling_results(doc, results):
    """wikitext's process_results: the log-likelihood with the document's words (whitespace-separated, as wikitext
    counts them) and UTF-8 bytes as weights."""
    (loglikelihood,) = results
    n_words, n_bytes = len(re.split(r"\s+", doc["text"])), len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, n_words), "byte_perplexity": (loglikelihood, n_bytes),
            "bits_per_byte": (loglikelihood, n_bytes)}
