"""Preparation at scale (data.py, corpora.py) and weighted mixtures (shards.py): every reader gives the documents that
.txt/.jsonl give; 1 and 2 workers give the same documents per split; a killed run resumes to the manifest of an
uninterrupted one; an added file is the only one prepared; the validation split is the smallest content hashes up to
a fixed size, whatever the file order; a mixture draws rows by weight, disjoint across ranks, resumable; bad records
are one clear error line."""
import gzip
import hashlib
import importlib.util
import json
import os
import random

import pytest
import torch

import corpora
import data
import shards
import tokenizer
from test_data import teacher_dir, tok  # noqa: F401 (pytest fixtures: the tiny BPE teacher trained on Macbeth)


def paragraphs(play, n, offset=0):
    """n documents: paragraphs of a play, each made unique by its number (and one with emoji and CJK)."""
    text = open(data.play_path(play), encoding="utf-8").read()
    parts = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 20]
    docs = [f"{i + offset}. {parts[i % len(parts)]}" for i in range(n)]
    docs[1] += " 🙂 中文"
    return docs


def write_jsonl(path, docs, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"id": 0, "text": doc}) + "\n")


def write_zst(path, docs):
    zstandard = pytest.importorskip("zstandard")
    raw = "".join(json.dumps({"text": doc}) + "\n" for doc in docs).encode()
    with open(path, "wb") as f:
        f.write(zstandard.ZstdCompressor().compress(raw))


def write_parquet(path, docs, row_group_size=20, column="text"):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({column: docs, "n": list(range(len(docs)))}), path, row_group_size=row_group_size)


def split_documents(out_dir, split):
    """The documents of a split, as the loader sees them (the manifest's parts), sorted."""
    docs = []
    for path, lo, hi in shards.split_parts(out_dir, split):
        shard = data.Shard(path)
        docs += bytes(shard.bytes[lo:shard.n_bytes if hi is None else hi]).split(b"\xfe")[1:]
    return sorted(docs)


def prepare(teacher_dir, inputs, out, **kwargs):
    kwargs.setdefault("val_bytes", 2000)
    data.prepare(teacher_dir, [str(p) for p in inputs], str(out), **kwargs)
    return json.load(open(os.path.join(out, "manifest.json")))


def totals(manifest):
    """Documents, bytes, tokens, repairs per split (not how many shard parts hold them)."""
    return {s: {k: v for k, v in c.items() if k != "n_shards"} for s, c in manifest["splits"].items()}


class CountAlign:
    """data.align_document, counted; raises KeyboardInterrupt (a kill) at call number `kill_at`."""

    def __init__(self, monkeypatch, kill_at=None):
        self.calls, self.kill_at = 0, kill_at
        monkeypatch.setattr(data, "align_document", self)

    def __call__(self, text, tok):
        self.calls += 1
        if self.calls == self.kill_at:
            raise KeyboardInterrupt
        return tokenizer.align_document(text, tok)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """120 documents in four JSON-lines files, and 60 more in a Parquet file of 3 row groups (without pyarrow, an
    optional dependency: in a .jsonl.gz)."""
    root = tmp_path_factory.mktemp("many")
    docs = paragraphs("macbeth", 120)
    for k in range(4):
        write_jsonl(root / f"part{k}.jsonl", docs[30 * k: 30 * (k + 1)])
    more = paragraphs("othello", 60, offset=1000)
    if importlib.util.find_spec("pyarrow"):
        write_parquet(root / "more.parquet", more)
    else:
        write_jsonl(root / "more.jsonl.gz", more, opener=gzip.open)
    return root


# --- readers ------------------------------------------------------------------------------------------------------

def test_every_reader_gives_the_same_documents(tmp_path, teacher_dir):
    docs = paragraphs("the-tempest", 50)
    (tmp_path / "txt").mkdir()
    for i, doc in enumerate(docs):
        (tmp_path / "txt" / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
    write_jsonl(tmp_path / "d.jsonl", docs)
    write_jsonl(tmp_path / "d.jsonl.gz", docs, opener=gzip.open)
    write_zst(tmp_path / "d.jsonl.zst", docs)
    write_parquet(tmp_path / "d.parquet", docs, row_group_size=16)  # 4 row groups, 4 units
    assert len(corpora.work_units([str(tmp_path / "d.parquet")])) == 4
    readings = {"txt": [t.decode() for f in corpora.list_input_files([str(tmp_path / "txt")])
                        for _, t, _ in corpora.read_documents(f)]}
    for name in ("d.jsonl", "d.jsonl.gz", "d.jsonl.zst", "d.parquet"):
        readings[name] = [t for _, t, _ in corpora.read_documents(str(tmp_path / name))]
    assert all(texts == docs for texts in readings.values())
    splits = {}  # prepared: the same documents in each split, whatever the format (the split is by content)
    for name in readings:
        prepare(teacher_dir, [tmp_path / name], tmp_path / f"out-{name}")
        splits[name] = {s: split_documents(tmp_path / f"out-{name}", s) for s in ("train", "val")}
    assert all(s == splits["txt"] for s in splits.values())
    assert len(splits["txt"]["train"]) + len(splits["txt"]["val"]) == 50 and splits["txt"]["val"]


def test_globs_and_folders(corpus):
    files = corpora.list_input_files([str(corpus / "part*.jsonl"), str(corpus)])
    assert [os.path.basename(f) for f in files][:4] == ["part0.jsonl", "part1.jsonl", "part2.jsonl", "part3.jsonl"]
    assert len(files) == 5 and os.path.basename(files[4]).startswith("more.")  # each file once, in input order
    with pytest.raises(FileNotFoundError, match="matches no files"):
        corpora.list_input_files([str(corpus / "*.csv")])


# --- workers, resume, additions -----------------------------------------------------------------------------------

def test_one_and_two_workers_prepare_the_same_documents(teacher_dir, corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SHARD_BYTES", 6_000)  # several shards per worker and stream
    one = prepare(teacher_dir, [corpus], tmp_path / "one", workers=1)
    stats = {}
    two = prepare(teacher_dir, [corpus], tmp_path / "two", workers=2, stats=stats)
    assert sorted(w["worker"] for w in stats["workers"]) == [0, 1]  # two processes (how many units each took varies)
    assert totals(one) == totals(two)
    for split in ("train", "val"):
        assert split_documents(tmp_path / "one", split) == split_documents(tmp_path / "two", split)
    assert len({p["file"] for p in one["shards"]}) >= 4
    assert one["splits"]["train"]["n_docs"] + one["splits"]["val"]["n_docs"] == 180
    assert 0 < one["splits"]["val"]["n_bytes"] <= 2000


def test_a_killed_run_resumes_to_the_same_manifest(teacher_dir, corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SHARD_BYTES", 6_000)
    reference = prepare(teacher_dir, [corpus], tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        CountAlign(monkeypatch, kill_at=100)
        prepare(teacher_dir, [corpus], tmp_path / "killed")
    out = tmp_path / "killed"
    assert not (out / "manifest.json").exists() and list(out.glob("train_*.bin"))  # some shards were committed
    journal = next(out.glob("journal_*.jsonl"))
    with open(journal, "a") as f:
        f.write('{"stream": "tr')  # a line torn by the kill
    (out / "train_000000000000_00000001.bin.tmp").write_bytes(b"half a shard")
    counter = CountAlign(monkeypatch)
    resumed = prepare(teacher_dir, [corpus], out)
    assert resumed == reference
    assert 0 < counter.calls < 180 - 60  # what the killed run wrote is not tokenized again
    for part in reference["shards"]:
        assert (out / part["file"]).read_bytes() == (tmp_path / "whole" / part["file"]).read_bytes()
    assert not list(out.glob("*.tmp"))


def test_an_added_file_is_the_only_one_prepared(teacher_dir, corpus, tmp_path, monkeypatch):
    folder = tmp_path / "grows"
    folder.mkdir()
    for name in ("part0.jsonl", "part1.jsonl"):
        (folder / name).write_bytes((corpus / name).read_bytes())
    prepare(teacher_dir, [folder], tmp_path / "out")
    write_jsonl(folder / "new.jsonl", paragraphs("othello", 25, offset=500))
    counter = CountAlign(monkeypatch)
    grown = prepare(teacher_dir, [folder], tmp_path / "out")
    assert counter.calls == 25
    fresh = prepare(teacher_dir, [folder], tmp_path / "fresh")
    assert totals(grown) == totals(fresh)
    assert all(split_documents(tmp_path / "out", s) == split_documents(tmp_path / "fresh", s) for s in ("train", "val"))
    (folder / "part0.jsonl").write_bytes((corpus / "part2.jsonl").read_bytes())  # a changed file: all again
    counter.calls = 0
    prepare(teacher_dir, [folder], tmp_path / "out")
    assert counter.calls == 85


# --- the validation split -------------------------------------------------------------------------------------------

def expected_validation(docs, tok, target_bytes):
    """The oracle: the candidates (content hash below 2^60) in hash order, while they fit, at least one."""
    sizes = {doc: len(tokenizer.align_document(doc, tok).bytes) for doc in docs}
    target = min(target_bytes, sum(sizes.values()) * data.VAL_PERCENT // 100)
    ranked = sorted((int.from_bytes(hashlib.sha256(d.encode()).digest()[:8], "big"), d) for d in docs)
    chosen, size = [], 0
    for digest, doc in ranked:
        if digest >= 1 << 60 or chosen and size + sizes[doc] > target:
            break
        chosen.append(doc)
        size += sizes[doc]
    return sorted(tokenizer.align_document(d, tok).bytes[1:].tobytes() for d in chosen)


def test_validation_has_a_fixed_size_chosen_by_content(teacher_dir, tok, tmp_path, monkeypatch):
    docs = paragraphs("hamlet", 400)
    shuffled = random.Random(0).sample(docs, len(docs))
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    write_jsonl(a / "all.jsonl", docs)
    for k in range(0, 400, 70):  # the same documents in another order, in other files
        write_jsonl(b / f"x{k:03d}.jsonl", shuffled[k:k + 70])
    for val_bytes in (1500, 6000):
        expected = expected_validation(docs, tok, val_bytes)
        for folder in (a, b):
            manifest = prepare(teacher_dir, [folder], tmp_path / f"out-{folder.name}", val_bytes=val_bytes)
            assert split_documents(tmp_path / f"out-{folder.name}", "val") == expected
            assert manifest["splits"]["val"]["n_bytes"] <= val_bytes
    assert len(expected) > 10
    counter = CountAlign(monkeypatch)  # another --val_bytes chooses again without tokenizing anything
    manifest = prepare(teacher_dir, [a], tmp_path / "out-a", val_bytes=10 ** 9)
    assert counter.calls == 0
    total = manifest["splits"]["train"]["n_bytes"] + manifest["splits"]["val"]["n_bytes"]
    assert 0.02 * total < manifest["splits"]["val"]["n_bytes"] <= 0.05 * total  # at most 5% of a small corpus


def test_the_default_corpus_keeps_its_held_out_plays():
    """The default corpus's documents go by corpora.is_held_out, never by size or hash order."""
    for play, stream in (("hamlet", "val"), ("macbeth", "train")):
        unit = corpora.Unit(data.play_path(play))
        assert [s for _, s, *_ in corpora.unit_documents(unit, "default")] == [stream]


# --- weighted mixtures ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_sources(teacher_dir, tmp_path_factory):
    """Two shard folders told apart by their letters: one all upper case, one all lower case."""
    root = tmp_path_factory.mktemp("sources")
    for name, case in (("upper", str.upper), ("lower", str.lower)):
        write_jsonl(root / f"{name}.jsonl", [case(d) for d in paragraphs("macbeth", 150)])
        prepare(teacher_dir, [root / f"{name}.jsonl"], root / name)
    return str(root / "upper"), str(root / "lower")


def test_mixture_rows_follow_the_weights(two_sources, tok):
    mixture = f"{two_sources[0]}:0.7,{two_sources[1]}:0.3"
    loader = data.make_loader("", "train", tok, 8, 64, seed=3, mixture=mixture)
    upper = []
    for _ in range(150):
        batch = loader.next_batch()
        for row, source in zip(batch["bytes"], loader.last_sources):
            lowered = bool(((row >= ord("a")) & (row <= ord("z"))).any())
            assert lowered == (source == 1)  # each row is a window of the source it was drawn from
            upper.append(source == 0)
    n, share = len(upper), 0.7
    assert abs(sum(upper) - n * share) < 4 * (n * share * (1 - share)) ** 0.5  # within 4 standard deviations


def test_mixture_ranks_are_disjoint_and_resume_exactly(two_sources, tok):
    mixture = f"{two_sources[0]}:1,{two_sources[1]}:1"
    single = data.make_loader("", "train", tok, 8, 64, seed=5, mixture=mixture)
    ranks = [data.make_loader("", "train", tok, 4, 64, seed=5, rank=r, world_size=2, mixture=mixture)
             for r in range(2)]
    rows = lambda b: sorted(map(tuple, b["bytes"].tolist()))  # noqa: E731
    for _ in range(3):
        one, (a, b) = single.next_batch(), [loader.next_batch() for loader in ranks]
        assert rows(one) == sorted(rows(a) + rows(b)) and not set(rows(a)) & set(rows(b))
    state = json.loads(json.dumps(single.state_dict()))
    expected = [single.next_batch() for _ in range(40)]  # past an epoch of the smaller source
    resumed = data.make_loader("", "train", tok, 8, 64, seed=5, mixture=mixture)
    resumed.load_state_dict(state)
    for e in expected:
        got = resumed.next_batch()
        assert all(torch.equal(got[k], e[k]) for k in e)
    other = data.make_loader("", "train", tok, 8, 64, seed=5, mixture=f"{two_sources[0]}:2,{two_sources[1]}:1")
    with pytest.raises(ValueError, match="same --data"):
        other.load_state_dict(state)


def test_mixture_spec_errors(two_sources, tok):
    for spec in ("", "a:b", "a:-1", ":0.5"):
        with pytest.raises(ValueError, match="--data"):
            shards.parse_mixture(spec)
    assert shards.parse_mixture("x:0.7, y:0.3") == [("x", 0.7), ("y", 0.3)]
    with pytest.raises(ValueError, match="drop --chat_data"):
        data.make_loader("", "train", tok, 8, 64, chat_dir=two_sources[1], chat_fraction=0.25,
                         mixture=f"{two_sources[0]}:1")
    single = data.make_loader("", "train", tok, 8, 64, mixture=f"{two_sources[0]}:1")
    assert isinstance(single, data.ShardLoader)  # one source: the plain loader, as --data_dir gives


# --- bad records: one error line naming the file and the record ------------------------------------------------------

def cli_error(capsys, teacher_dir, inputs, out, *extra):
    with pytest.raises(SystemExit):
        data.main([f"--teacher={teacher_dir}", *[f"--input={p}" for p in inputs], f"--out={out}", *extra])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    return err


def test_bad_records_are_one_error_line(teacher_dir, tmp_path, capsys):
    good = [json.dumps({"text": d}) for d in paragraphs("macbeth", 4)]
    cases = {"json.jsonl": good[:2] + ["{not json"], "field.jsonl": good[:1] + ['{"body": "x"}'],
             "type.jsonl": good[:3] + ['{"text": 5}']}
    for name, lines in cases.items():
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    assert "json.jsonl:3: not valid JSON" in cli_error(capsys, teacher_dir, [tmp_path / "json.jsonl"], tmp_path / "o")
    assert "field.jsonl:2: expected an object with a string 'text' field" in cli_error(
        capsys, teacher_dir, [tmp_path / "field.jsonl"], tmp_path / "o")
    err = cli_error(capsys, teacher_dir, [tmp_path / "field.jsonl", tmp_path / "type.jsonl"], tmp_path / "o",
                    "--workers=2")  # a worker process's error: whichever worker meets its bad record first
    assert "field.jsonl:2: expected" in err or "type.jsonl:4: expected" in err
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress("\n".join(good).encode())[:-30])
    assert "cut.jsonl.gz: not a readable" in cli_error(capsys, teacher_dir, [tmp_path / "cut.jsonl.gz"], tmp_path / "o")


def test_bad_parquet_is_one_error_line(teacher_dir, tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    write_parquet(tmp_path / "body.parquet", paragraphs("macbeth", 5), column="body")
    assert "body.parquet: no column 'text' (columns: body, n)" in cli_error(
        capsys, teacher_dir, [tmp_path / "body.parquet"], tmp_path / "o")
    assert "--text_field" in cli_error(capsys, teacher_dir, [tmp_path / "body.parquet"], tmp_path / "o")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    assert "column 'text' holds int64, not text" in cli_error(capsys, teacher_dir, [tmp_path / "ints.parquet"],
                                                             tmp_path / "o")
    pq.write_table(pa.table({"text": ["a b c", "d e", None, "f"]}), tmp_path / "null.parquet", row_group_size=2)
    assert "null.parquet: row 2: 'text' is null" in cli_error(capsys, teacher_dir, [tmp_path / "null.parquet"],
                                                               tmp_path / "o")
    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all")
    assert "fake.parquet: not a readable Parquet file" in cli_error(capsys, teacher_dir, [tmp_path / "fake.parquet"],
                                                                    tmp_path / "o")


def test_missing_optional_readers_say_what_to_install(teacher_dir, tmp_path, capsys, monkeypatch):
    write_parquet(tmp_path / "d.parquet", ["some text", "more text"])
    (tmp_path / "d.jsonl.zst").write_bytes(b"")
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)  # as if it were not installed
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    monkeypatch.setitem(__import__("sys").modules, "zstandard", None)
    assert "needs pyarrow (pip install pyarrow)" in cli_error(capsys, teacher_dir, [tmp_path / "d.parquet"],
                                                              tmp_path / "o")
    assert "needs zstandard (pip install zstandard)" in cli_error(capsys, teacher_dir, [tmp_path / "d.jsonl.zst"],
                                                                  tmp_path / "o")


def test_stage1_trains_on_a_mixture_and_resumes_exactly():
    """--data in a stage script: the mixture reaches the loader, the config records it, and a run stopped mid-phase
    resumes to the weights of one that never stopped."""
    import stage_fixtures as sf
    mixture = f"--data={sf.shard_dir()}:0.75,{sf.chat_shard_dir()}:0.25"
    whole, stopped = sf.tmp_dir("mixture-whole"), sf.tmp_dir("mixture-stopped")
    sf.run_stage1(whole, mixture)
    sf.run_stage1(stopped, mixture, "--stop_after=7")  # mid-align
    config = sf.read_json(os.path.join(stopped, "config.json"))
    assert config["config"]["data"] == mixture.split("=", 1)[1] and not config["phase_done"]
    sf.run_stage1(stopped, mixture, "--resume")
    a, b = (sf.load_params(os.path.join(d, "model.safetensors")) for d in (whole, stopped))
    assert sf.max_param_diff(a, b) == 0
    assert sf.read_metrics(whole) == sf.read_metrics(stopped)
