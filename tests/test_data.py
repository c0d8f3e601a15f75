"""Corpus -> shards -> batches: shards hold exactly what align_document says, prepare is idempotent, the loader's
windows are the shards' bytes at token starts, ranks read disjoint windows, a state dict resumes the same batches,
and every kind of bad input is a clear error. (Formats, workers, resume and mixtures: test_prepare.py.)"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import corpora
import data
import tokenizer

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import decoders, pre_tokenizers, trainers  # noqa: E402


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A small SmolLM2-style byte-level BPE teacher folder (tokenizer only), trained on Macbeth."""
    folder = tmp_path_factory.mktemp("teacher")
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator([open(data.play_path("macbeth"), encoding="utf-8").read()], trainer)
    hf.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return str(folder)


@pytest.fixture(scope="module")
def tok(teacher_dir):
    return tokenizer.load_tokenizer(teacher_dir)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of inputs of every kind: plain text, Markdown, invalid UTF-8, and .jsonl (one bad line byte)."""
    root = tmp_path_factory.mktemp("corpus")
    plays = {name: open(data.play_path(name), encoding="utf-8").read() for name in ("macbeth", "the-tempest")}
    (root / "macbeth.txt").write_text(plays["macbeth"][:60_000])
    (root / "tempest.md").write_text(plays["the-tempest"][:40_000])
    (root / "latin1.txt").write_bytes("Caf\u00e9 cr\u00e8me, 12 \u00e9clairs.\n".encode("latin-1") * 50)
    lines = [json.dumps({"text": f"Document {i}: " + "emoji 🙂 and 中文. " * (i + 1)}) for i in range(40)]
    (root / "docs.jsonl").write_bytes("\n".join(lines).encode() + b'\n{"text": "bad \xff byte"}\n\n')
    (root / "ignored.bin").write_bytes(b"\0\1\2")  # not .txt/.md/.jsonl: folders skip it
    return str(root)


@pytest.fixture(scope="module")
def shards(teacher_dir, corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shards"))
    assert data.prepare(teacher_dir, [corpus], out) == out
    return out


def shard_documents(shard):
    """The shard's documents, cut at the 0xFE document-start bytes, as (bytes, token_end, token_id) arrays."""
    token_end = shard.token_end(0, shard.n_bytes)
    token_id = np.full(shard.n_bytes, -1, dtype=np.int64)
    token_id[token_end] = shard.token_ids
    starts = [*np.flatnonzero(np.asarray(shard.bytes) == tokenizer.DOC_START_BYTE), shard.n_bytes]
    return [(np.asarray(shard.bytes[a:b]), token_end[a:b], token_id[a:b]) for a, b in zip(starts[:-1], starts[1:])]


def expected_documents(corpus, tok):
    out = []
    for path in data.list_input_files([corpus]):
        for name, text, n_repaired in data.read_documents(path):
            out.append((name, tokenizer.align_document(text, tok), n_repaired))
    return out


def shard_files(folder, prefix=""):
    return sorted(os.path.join(folder, p) for p in os.listdir(folder) if p.endswith(".bin") and p.startswith(prefix))


def test_shards_hold_exactly_the_aligned_documents(shards, corpus, tok):
    expected = {bytes(a.bytes): a for _, a, _ in expected_documents(corpus, tok)}
    found = {}
    for path in shard_files(shards):  # train_* and cand_* (the validation candidates); selected_val_* copies some
        shard = data.Shard(path)
        assert shard.header["tokenizer_hash"] == tok.hash
        for doc_bytes, token_end, token_id in shard_documents(shard):
            aligned = expected[bytes(doc_bytes)]
            assert (token_end == aligned.token_end).all() and (token_id == aligned.token_id).all()
            found[path] = found.get(path, 0) + 1
    copies = sum(n for path, n in found.items() if "selected_val_" in path)
    assert sum(found.values()) - copies == len(expected) == 3 + 41  # three files and 41 JSON lines (no blank lines)
    assert copies == json.load(open(os.path.join(shards, "manifest.json")))["splits"]["val"]["n_docs"] > 0


def test_manifest_counts(shards, corpus, tok):
    manifest = json.load(open(os.path.join(shards, "manifest.json")))
    splits = manifest["splits"]
    docs = expected_documents(corpus, tok)
    assert splits["train"]["n_docs"] + splits["val"]["n_docs"] == len(docs)
    assert splits["val"]["n_docs"] >= 1  # a user corpus still gets a validation split
    total = lambda key: splits["train"][key] + splits["val"][key]  # noqa: E731
    assert total("n_bytes") == sum(len(a.bytes) for _, a, _ in docs)
    assert total("n_tokens") == sum(int(a.token_end.sum()) for _, a, _ in docs)
    # latin1.txt: one repair per é/è (3 per line, 50 lines); docs.jsonl: the \xff byte
    assert total("n_repaired") == 150 + 1


def test_prepare_is_idempotent(teacher_dir, corpus, tmp_path, capsys):
    out = str(tmp_path / "shards")
    data.prepare(teacher_dir, [corpus], out)
    mtimes = {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in os.listdir(out)}
    capsys.readouterr()
    data.prepare(teacher_dir, [corpus], out)
    assert "up to date" in capsys.readouterr().out
    assert mtimes == {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in os.listdir(out)}
    # other inputs are noticed; a corpus of one plain file holds out its last 5% (from a line break)
    data.prepare(teacher_dir, [os.path.join(corpus, "macbeth.txt")], out)
    assert "up to date" not in capsys.readouterr().out
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["inputs"] == [os.path.join(corpus, "macbeth.txt")]
    assert manifest["splits"]["train"]["n_docs"] == manifest["splits"]["val"]["n_docs"] == 1
    assert 0.04 < manifest["splits"]["val"]["n_bytes"] / os.path.getsize(os.path.join(corpus, "macbeth.txt")) < 0.06


def test_few_documents_still_get_a_validation_split(teacher_dir, tmp_path):
    """None of the three is a candidate (content hash below 2^60, checked below), and each is longer than 5% of the
    corpus: the one with the smallest hash is held out anyway."""
    hashes = {}
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(f"document number {i}\n" * 10)
        hashes[i] = corpora.content_hash((tmp_path / f"doc{i}.txt").read_bytes())
        assert hashes[i] >= corpora.CAND_BELOW
    out = data.prepare(teacher_dir, [str(tmp_path)], str(tmp_path / "out"))
    splits = json.load(open(os.path.join(out, "manifest.json")))["splits"]
    assert (splits["train"]["n_docs"], splits["val"]["n_docs"]) == (2, 1)
    loader = data.ShardLoader(out, "val", tokenizer.load_tokenizer(teacher_dir), batch_size=1, seq_len=24)
    held_out = min(hashes, key=hashes.get)
    text = (tmp_path / f"doc{held_out}.txt").read_bytes()
    assert bytes(loader.window(0)["bytes"].astype(np.uint8)) == (b"\xfe" + text)[:24]


def test_default_corpus_holds_out_hamlet_and_some_modules():
    """The default corpus: 38 plays, three held out; the standard library's top-level modules, argparse and textwrap
    held out and about VAL_PERCENT% more by content; never the pydoc topics (an evaluation text) or the tests."""
    files = data.default_corpus_files()
    plays, modules = [f for f in files if f.endswith(".md")], [f for f in files if f.endswith(".py")]
    assert len(plays) == 38 and len(plays) + len(modules) == len(files)
    assert len(modules) > 100 and all(os.path.dirname(f) == os.path.dirname(modules[0]) for f in modules)
    assert data.module_path("argparse.py") in modules
    val = [f for f in plays if corpora.is_held_out(f, b"")]
    assert sorted(os.path.basename(f) for f in val) == ["hamlet.md", "the-tempest.md", "twelfth-night.md"]
    assert data.play_path("hamlet") in val
    val_modules = [f for f in modules if corpora.is_held_out(f, open(f, "rb").read())]
    assert {data.module_path(m) for m in data.HELD_OUT_MODULES} <= set(val_modules)
    assert len(data.HELD_OUT_MODULES) < len(val_modules) < 0.15 * len(modules)
    assert not any("pydoc_data" in f or os.path.basename(f).startswith("test") for f in files)


def test_many_shard_files(teacher_dir, corpus, tmp_path, monkeypatch, tok):
    monkeypatch.setattr(data, "SHARD_BYTES", 10_000)  # forces several shard files per split
    out = data.prepare(teacher_dir, [corpus], str(tmp_path))
    assert len([p for p in os.listdir(out) if p.startswith("train_")]) >= 3
    loader = data.ShardLoader(out, "train", tok, batch_size=4, seq_len=256)
    check_windows(loader, range(loader.n_windows))


def check_windows(loader, windows):
    """Each window is the shard's bytes from a token start, with the shard's flags and ids."""
    shards = [(s, s.token_end(0, s.n_bytes)) for s in loader.shards]
    for w in windows:
        row = loader.window(w)
        shard_index, start = row["start"]
        shard, token_end = shards[shard_index]
        stop = start + loader.seq_len
        assert start == 0 or token_end[start - 1]  # starts right after a token end
        assert stop <= shard.n_bytes
        assert (row["bytes"] == shard.bytes[start:stop]).all() and (row["token_end"] == token_end[start:stop]).all()
        first = int(token_end[:start].sum())  # counted from the start of the shard: the slow, obvious way
        assert (row["token_id"][row["token_end"]] == shard.token_ids[first:first + row["token_end"].sum()]).all()
        assert (row["token_id"][~row["token_end"]] == -1).all()


def test_loader_windows_match_shards(shards, tok):
    loader = data.ShardLoader(shards, "train", tok, batch_size=8, seq_len=512, seed=3)
    check_windows(loader, range(loader.n_windows))
    batch = loader.next_batch()
    assert batch["bytes"].shape == (8, 512) and batch["bytes"].dtype == torch.int64
    assert batch["token_end"].dtype == torch.bool and batch["valid"].dtype == torch.bool
    assert batch["token_id"].dtype == torch.int64 and batch["valid"].all()
    assert (batch["token_id"][batch["token_end"]] >= 0).all()


def test_rank_index_counts_token_ends(shards):
    shard = max(map(data.Shard, shard_files(shards)), key=lambda s: s.n_bytes)
    assert shard.n_bytes > 3 * data.RANK_BLOCK  # the index has several blocks
    counts = np.concatenate([[0], np.cumsum(shard.token_end(0, shard.n_bytes))])
    for position in [0, 1, 7, 8, 9, data.RANK_BLOCK - 1, data.RANK_BLOCK, data.RANK_BLOCK + 13, shard.n_bytes]:
        assert shard.ends_before(position) == counts[position]


def test_valid_caps_teacher_tokens(shards, tok):
    loader = data.ShardLoader(shards, "train", tok, batch_size=8, seq_len=512, max_tokens=20)
    batch = loader.next_batch()
    for token_end, valid in zip(batch["token_end"], batch["valid"]):
        assert int(token_end[valid].sum()) <= 20
        n_valid = int(valid.sum())
        assert valid[:n_valid].all()  # a prefix of the window
        assert n_valid == 512 or int(token_end[:n_valid].sum()) == 20 and token_end[n_valid - 1]


def test_ranks_read_disjoint_windows(shards, tok):
    single = data.ShardLoader(shards, "train", tok, batch_size=6, seq_len=256, seed=5)
    ranks = [data.ShardLoader(shards, "train", tok, batch_size=3, seq_len=256, seed=5, rank=r, world_size=2)
             for r in range(2)]
    for _ in range(3):
        rows = lambda b: sorted(map(tuple, b["bytes"].tolist()))  # noqa: E731
        one, (a, b) = single.next_batch(), [loader.next_batch() for loader in ranks]
        assert rows(one) == sorted(rows(a) + rows(b))
        assert not set(rows(a)) & set(rows(b))


def test_resume_gives_the_same_batches(shards, tok):
    def loader():
        return data.ShardLoader(shards, "train", tok, batch_size=16, seq_len=512, seed=11)
    reference = loader()
    batches = [reference.next_batch() for _ in range(reference.n_windows // 16 + 3)]
    assert reference.epoch == 1  # the run crossed an epoch boundary
    stopped = loader()
    for _ in range(5):
        stopped.next_batch()
    state = json.loads(json.dumps(stopped.state_dict()))  # survives a JSON/checkpoint round trip
    resumed = loader()
    resumed.load_state_dict(state)
    for expected in batches[5:]:
        got = resumed.next_batch()
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    other_seed = data.ShardLoader(shards, "train", tok, batch_size=16, seq_len=512, seed=12)
    assert not torch.equal(other_seed.next_batch()["bytes"], batches[0]["bytes"])
    with pytest.raises(ValueError, match="seed"):
        other_seed.load_state_dict(state)


# --- clear errors --------------------------------------------------------------------------------------------------

def test_missing_input(teacher_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.prepare(teacher_dir, [str(tmp_path / "nope.txt")], str(tmp_path / "out"))


def test_empty_inputs(teacher_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="no text"):
        data.prepare(teacher_dir, [str(tmp_path / "empty.txt")], str(tmp_path / "out"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="no .txt"):
        data.prepare(teacher_dir, [str(tmp_path / "folder")], str(tmp_path / "out"))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"title": "no text field"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        data.prepare(teacher_dir, [str(tmp_path / "bad.jsonl")], str(tmp_path / "out"))


def test_teacher_without_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        data.prepare(str(tmp_path), [str(tmp_path)], str(tmp_path / "out"))


def test_shard_for_another_tokenizer_is_refused(shards, teacher_dir, tmp_path):
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    raw = json.load(open(os.path.join(teacher_dir, "tokenizer.json"), encoding="utf-8"))
    raw["added_tokens"].append({"id": 999_999, "content": "<extra>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    (other_dir / "tokenizer.json").write_text(json.dumps(raw))
    (other_dir / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    other = tokenizer.load_tokenizer(str(other_dir))
    with pytest.raises(ValueError, match="prepared for tokenizer .* but this teacher's tokenizer is 'other'"):
        data.ShardLoader(shards, "train", other, batch_size=1, seq_len=64)


def test_truncated_and_foreign_shards(shards, tok, tmp_path):
    path = tmp_path / "train_0000.bin"  # a folder without a manifest: its train_*.bin files
    raw = open(shard_files(shards)[-1], "rb").read()
    path.write_bytes(raw[:-100])
    with pytest.raises(ValueError, match="truncated"):
        data.ShardLoader(str(tmp_path), "train", tok, batch_size=1, seq_len=64)
    path.write_bytes(b"PK\3\4 this is a zip file" * 300)
    with pytest.raises(ValueError, match="not a shard"):
        data.ShardLoader(str(tmp_path), "train", tok, batch_size=1, seq_len=64)
    with pytest.raises(FileNotFoundError, match="no val shards"):
        data.ShardLoader(str(tmp_path), "val", tok, batch_size=1, seq_len=64)
    with pytest.raises(ValueError, match="fewer than one step"):
        data.ShardLoader(shards, "val", tok, batch_size=10_000, seq_len=64)


def test_cli_errors_are_one_line(teacher_dir, tmp_path):
    result = subprocess.run([sys.executable, "data.py", f"--teacher={teacher_dir}", f"--input={tmp_path}/nope",
                             f"--out={tmp_path}/out"], capture_output=True, text=True, cwd=data_repo())
    assert result.returncode == 1
    assert result.stderr.startswith("error: input") and "Traceback" not in result.stderr


def test_cli_prepares_and_reports(teacher_dir, corpus, tmp_path):
    result = subprocess.run([sys.executable, "data.py", f"--teacher={teacher_dir}", f"--input={corpus}",
                             f"--out={tmp_path}/out"], capture_output=True, text=True, cwd=data_repo())
    assert result.returncode == 0, result.stderr
    assert "bytes/token" in result.stdout and os.path.exists(tmp_path / "out" / "manifest.json")


def data_repo():
    return os.path.dirname(os.path.abspath(data.__file__))


def test_one_line_file_still_gets_a_validation_split(teacher_dir, tmp_path):
    """A single .txt with no line break is cut at a character start (never inside a UTF-8 sequence)."""
    (tmp_path / "one.txt").write_text("é la la " * 400, encoding="utf-8")
    out = data.prepare(teacher_dir, [str(tmp_path / "one.txt")], str(tmp_path / "out"))
    splits = json.load(open(os.path.join(out, "manifest.json")))["splits"]
    assert splits["train"]["n_docs"] == 1 and splits["val"]["n_docs"] == 1
    assert splits["train"]["n_bytes"] + splits["val"]["n_bytes"] == len(("é la la " * 400).encode()) + 2  # + 2 BOS bytes


def test_a_corpus_without_a_validation_split_is_refused(teacher_dir, tmp_path):
    (tmp_path / "one.jsonl").write_text('{"text": "a single document"}\n')
    with pytest.raises(ValueError, match="give no val text"):
        data.prepare(teacher_dir, [str(tmp_path / "one.jsonl")], str(tmp_path / "out"))


def test_missing_lead_bytes_remove_only_their_own_characters():
    """0xE0 leads U+0800-U+0FFF only (not U+0000-U+07FF, whose 3-byte forms are overlong); 0xF0 leads U+10000-U+3FFFF."""
    assert tokenizer._unspellable_characters("x", [0xE0]).sub("", "hello é \u1000\u0800\u0fff") == "hello é \u1000"
    assert tokenizer._unspellable_characters("x", [0xF0]).sub("", "hi \U0001F600 \u00e9\U00100000") == "hi  \u00e9\U00100000"
