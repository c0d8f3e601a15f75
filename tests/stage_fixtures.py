"""The fixtures the tests share. For the model tests, a tiny random teacher and byte student in memory
(build_teacher, build_student: a few thousand parameters, every weight perturbed) and random inputs for them. For the
stage tests (test_stage1.py, test_stage2.py, ...), a tiny random teacher with a real byte-level BPE tokenizer, shards
prepared for it, and runners for the stage scripts, in this process or under torchrun.

A plain module that tests import (not a conftest). The files are built on first use, once per process, in one
temporary folder that is removed at exit: teacher_dir(), shard_dir(), corpus_file(); tmp_dir(name) gives a fresh
folder for one run's outputs.

Why the fixture looks the way it does (each choice keeps a short run's figures far from the tests' thresholds):
- The teacher is a random Llama (GQA, 2 layers, d_model 64). Its LM head is tied to an N(0, 1) embedding and the
  final norm is scaled so that its logits have a standard deviation of about 3: next-token distributions are peaked,
  as a trained model's are, so a KL between student and teacher has room to fall.
- Align regresses onto random embedding rows, which a student can only memorise token by token. On raw Macbeth a
  vocabulary small enough for that (~600) splits words into pieces whose ends the patcher cannot see (boundary F1
  plateaus near 0.87), and one large enough for whole words (~3,000) has too many rare tokens for align to halve its
  loss in seconds. So the corpus is Macbeth with every word outside its 200 most frequent removed: real lines, markup
  and punctuation, a BPE of 800 entries that spells nearly every word as one token (~2.9 bytes per token, SmolLM2
  reads Shakespeare at 3.1), and every token type seen often.

Run as a script under torchrun, this module runs a stage script's main() and also saves every rank's final student
parameters (see rank_state_path), which the scripts themselves only write from rank 0."""
import atexit
import collections
import contextlib
import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script under torchrun: the repo's modules are top-level imports
    sys.path.insert(0, REPO)

import cli  # noqa: E402
import data  # noqa: E402
import distributed  # noqa: E402
from model import BOS_BYTE, ByteLM, StudentConfig  # noqa: E402
import safetensors_io  # noqa: E402
import teacher as teachers  # noqa: E402
import tokenizer  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
# The tiny models in memory. Every weight is perturbed after init_weights, so that the zero-initialised parts
# (residual, enc_proj output, null vector) matter and the identity patcher is not degenerate; the byte blocks' sliding
# window (8) is shorter than the tests' sequences, so the window is exercised.

TCFG = teachers.TeacherConfig(vocab_size=97, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12, d_ff=80)
SCFG = StudentConfig(d_local=32, n_local_heads=2, proj_hidden=64, local_window=8)


def build_teacher(seed=0):
    """A random teacher with every weight O(1)-scaled and norm weights around 1 (not all ones)."""
    torch.manual_seed(seed)
    teacher = teachers.Teacher(TCFG)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return teacher.eval()


def build_student(teacher, seed=1, noise=1.0, noise_1d=0.1):
    """init_weights(teacher), then noise on every weight (perturb_weights), so that no part is zero or exact and h
    varies from byte to byte as much as its mean."""
    torch.manual_seed(seed)
    student = ByteLM(SCFG, TCFG).init_weights(teacher)
    return perturb_weights(student, seed, noise, noise_1d).eval()


@torch.no_grad()
def perturb_weights(student, seed, noise=1.0, noise_1d=0.1):
    """Adds noise to every parameter in place: matrices noise / sqrt(fan-in) x N(0, 1), vectors and the byte embeddings
    noise_1d x N(0, 1), drawn from a generator seeded with `seed`. -> student."""
    g = torch.Generator().manual_seed(seed)
    for p in student.parameters():
        matrix = p.dim() == 2 and p.shape[0] != 256  # not the byte embeddings
        p.add_((noise / p.shape[1] ** 0.5 if matrix else noise_1d) * torch.randn(p.shape, generator=g))
    return student


def random_bytes(shape, seed):
    x = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))
    x[..., 0] = BOS_BYTE
    return x


def random_ends(shape, seed, rate=0.35):
    ends = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < rate
    ends[..., 0] = True  # BOS is its own token
    return ends


def max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# ----------------------------------------------------------------------------------------------------------------
# The stage tests' teacher on disk, its data, and the runners.

TOP_WORDS = 200           # the corpus keeps only Macbeth's most frequent words
VOCAB_SIZE = 800          # BPE entries: 256 byte tokens + 1 special + merges
TEACHER_HF_CONFIG = {     # a tiny Llama with GQA; vocab_size is filled in from the tokenizer
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
    "bos_token_id": 0, "eos_token_id": 0,
}
TEACHER_SEED = 0
LOGIT_SCALE = 3.0         # about the standard deviation of the random teacher's logits

# A run of a few seconds: tiny student, tiny windows, a few steps per phase (256 bytes per step on one rank).
# Tests add what they need; later arguments override earlier ones. The pure learned head and the encoder alone
# (--prior=False --subword=False): test_prior_stages.py turns both on (the defaults).
TINY_STAGE1 = ["--prior=False", "--subword=False", "--dtype=float32", "--device=cpu", "--d_local=64", "--n_enc=2",
               "--n_dec=1", "--local_window=32", "--proj_hidden=512", "--batch_size=4", "--seq_len=64",
               "--eval_batches=2", "--log_interval=1000", "--warmup_frac=0.1", "--kl_chunk_rows=64",
               "--align_bytes=2560", "--distill_bytes=1280", "--boundary_bytes=1280"]


@functools.cache
def tmp_root() -> str:
    """One temporary folder for everything this module builds; removed when the process exits."""
    root = tempfile.mkdtemp(prefix="blm-stage-tests-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def tmp_dir(name: str) -> str:
    """A fresh, empty folder under tmp_root() for one run's outputs."""
    return tempfile.mkdtemp(prefix=name + "-", dir=tmp_root())


def small_vocabulary_text(text: str, top_words: int = TOP_WORDS) -> str:
    """The text with every word (letters and apostrophes) outside its `top_words` most frequent ones removed;
    lines, markup and punctuation stay."""
    words = re.findall(r"[A-Za-z']+", text)
    keep = {w for w, _ in collections.Counter(words).most_common(top_words)}
    lines = []
    for line in text.splitlines():
        line = re.sub(r"[A-Za-z']+", lambda m: m.group(0) if m.group(0) in keep else "", line)
        lines.append(re.sub(r" {2,}(?=\S)", " ", line))  # the gaps left behind (keeps Markdown's two-space breaks)
    return "\n".join(lines)


@functools.cache
def corpus_file() -> str:
    """One plain-text file (~60 KB): data.prepare holds out its last 5% (from a line break) for validation."""
    path = os.path.join(tmp_root(), "corpus.txt")
    with open(data.play_path("macbeth"), encoding="utf-8") as f:
        text = small_vocabulary_text(f.read())
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def train_tokenizer(folder: str, text: str, vocab_size: int | None = None) -> int:
    """A SmolLM2-style byte-level BPE (digits split, GPT-2 regex) trained on `text`, saved as folder/tokenizer.json;
    returns its vocabulary size. HF tokenizers is a test-only dependency: tokenizer.load_tokenizer reads the file itself."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size or VOCAB_SIZE, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator([text], trainer)
    hf.save(os.path.join(folder, "tokenizer.json"))
    return hf.get_vocab_size()


def random_teacher_state(cfg: teachers.TeacherConfig, seed: int = TEACHER_SEED) -> dict:
    """HF-named tensors of a random teacher: norm weights in [0.5, 1.5), embedding N(0, 1), matrices N(0, 1/fan_in);
    the final norm is scaled by LOGIT_SCALE / sqrt(d_model), so that the tied head's logits have a standard deviation
    of about LOGIT_SCALE."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in teachers.Teacher(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in sorted(shapes.items()):
        if name == "norm.weight":
            t = (0.5 + torch.rand(shape, generator=g)) * LOGIT_SCALE / cfg.d_model ** 0.5
        elif "norm" in name:
            t = 0.5 + torch.rand(shape, generator=g)
        elif "embed_tokens" in name:
            t = torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / shape[-1] ** 0.5
        state[name if name.startswith("lm_head.") else "model." + name] = t
    return state


def make_teacher(folder: str, text: str, hf_config: dict | None = None, seed: int = TEACHER_SEED) -> str:
    """Writes an HF-layout teacher folder: tokenizer.json (trained on text), config.json, model.safetensors."""
    os.makedirs(folder, exist_ok=True)
    hf = {**(hf_config or TEACHER_HF_CONFIG), "vocab_size": train_tokenizer(folder, text)}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=1)
    cfg = teachers.config_from_hf(hf)
    safetensors_io.write_safetensors(random_teacher_state(cfg, seed), os.path.join(folder, "model.safetensors"))
    return folder


@functools.cache
def teacher_dir() -> str:
    """The tiny random teacher folder (built once per process)."""
    with open(corpus_file(), encoding="utf-8") as f:
        return make_teacher(os.path.join(tmp_root(), "teacher"), f.read())


@functools.cache
def shard_dir() -> str:
    """Train/val shards of corpus_file() for teacher_dir() (built once per process)."""
    out = os.path.join(tmp_root(), "shards")
    with quiet():
        data.prepare(teacher_dir(), [corpus_file()], out)
    return out


@functools.cache
def chat_shard_dir() -> str:
    """Chat-style shards for teacher_dir(): turns of corpus lines between special codes (the tiny tokenizer's one
    special, <|endoftext|>, as the turn marker), aligned with codes=True, as data.prepare_chat writes them."""
    tok = tokenizer.load_tokenizer(teacher_dir())
    code = tok.codes["<|endoftext|>"]
    lines = [line for line in open(corpus_file(), encoding="utf-8").read().splitlines() if line.strip()]
    out = os.path.join(tmp_root(), "chat-shards")
    os.makedirs(out, exist_ok=True)
    for split, first in (("train", 0), ("val", 400)):
        docs = [tokenizer.align_document(code + b"user\n" + lines[k].encode() + code + b"\nassistant\n" +
                                         lines[k + 1].encode() + code + b"\n", tok, codes=True)
                for k in range(first, first + (300 if split == "train" else 100), 2)]
        data.write_shard(os.path.join(out, f"{split}_0000.bin"), docs, tok)
    return out


@contextlib.contextmanager
def quiet():
    """Captures stdout (prepare's summary, the stage scripts' log lines); on an exception it is printed after all,
    so a failing test shows it."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield buf
    except BaseException:
        sys.stdout.write(buf.getvalue())
        raise


@contextlib.contextmanager
def threads(n: int):
    """Tiny models run faster on one thread, and then do not fight other processes for the cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def stage_args(out_dir: str, *args: str, tiny: list[str] = TINY_STAGE1) -> list[str]:
    """Command-line arguments of a tiny run on the tiny teacher; `args` override the defaults."""
    return [f"--teacher={teacher_dir()}", f"--data_dir={shard_dir()}", f"--out_dir={out_dir}", *tiny, *args]


def run_stage(module: str, out_dir: str, *args: str, tiny: list[str] = TINY_STAGE1, n_threads: int = 1):
    """module.main (module: "stage1_kd", "stage2_sft") in this process on the tiny teacher -> (what main returns,
    captured stdout). out_dir is created if missing; metrics.jsonl in it is appended to, so give each run its own
    folder unless it resumes."""
    import importlib
    main = importlib.import_module(module).main
    with threads(n_threads), quiet() as log:
        results = main(stage_args(out_dir, *args, tiny=tiny))
    return results, log.getvalue()


def run_stage1(out_dir: str, *args: str, n_threads: int = 1):
    """stage1_kd.main in this process on the tiny teacher -> (results, captured stdout)."""
    return run_stage("stage1_kd", out_dir, *args, n_threads=n_threads)


def run_script(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`python script args` from the repo root, as a user runs it."""
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def run_torchrun(module: str, *runs: tuple, nproc: int = 2, timeout: float = 120,
                 tiny: list[str] = TINY_STAGE1) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc_per_node=N` on this file: each run, an (out_dir, *args)
    tuple, is one module.main(...) call (e.g. module="stage1_kd") on the tiny teacher, all in one process group (so
    that torch starts once), gloo on CPU, one thread per rank. Every rank saves its final parameters at
    rank_state_path(out_dir, rank). Fails the test, showing both output streams, if the command fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.abspath(__file__), module]
    for i, (out_dir, *args) in enumerate(runs):
        cmd += ([RUN_SEPARATOR] if i else []) + stage_args(out_dir, *args, tiny=tiny)
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


RUN_SEPARATOR = "::"


def rank_state_path(out_dir: str, rank: int) -> str:
    return os.path.join(out_dir, f"rank{rank}_params.safetensors")


def read_metrics(out_dir: str, phase: str | None = None) -> list[dict]:
    """The lines of out_dir/metrics.jsonl (one per optimizer step), optionally only those of one phase."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if phase is None or r["phase"] == phase]


def load_params(path: str) -> dict:
    """The student's parameters from a byte-model folder (a stage's out_dir or out_dir/<phase>), or a rank_state_path
    file."""
    return safetensors_io.read_safetensors(os.path.join(path, "model.safetensors") if os.path.isdir(path) else path)


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def copy_checkpoint(src: str, dst: str):
    """The checkpoint of a stage's out_dir (model.safetensors, config.json, resume/) into dst, without metrics.jsonl
    or the per-phase folders."""
    os.makedirs(dst, exist_ok=True)
    for name in ("model.safetensors", "config.json"):
        shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    shutil.copytree(os.path.join(src, "resume"), os.path.join(dst, "resume"), dirs_exist_ok=True)


def worst_param_diff(a: dict, b: dict, prefixes: tuple = ("",)) -> tuple[float, str]:
    """(largest absolute difference, the parameter where it is) between two state dicts, over the names that start
    with one of `prefixes`."""
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:5]
    names = [k for k in a if k.startswith(prefixes)]
    assert names, f"no parameter starts with {prefixes}"
    return max(((a[k].float() - b[k].float()).abs().max().item(), k) for k in names)


def max_param_diff(a: dict, b: dict, prefixes: tuple = ("",)) -> float:
    """Largest absolute difference between two state dicts, over the names that start with one of `prefixes`."""
    return worst_param_diff(a, b, prefixes)[0]


def _torchrun_entry(argv):
    """Under torchrun: `module args [:: args ...]` -> module.main(args) for each group of args in turn, in one process
    group (the scripts' cleanup_distributed is held back until the last), each followed by a save of this
    rank's student parameters as safetensors (by wrapping train.run_phases, which every stage script calls with the
    student)."""
    import importlib

    import train
    module = importlib.import_module(argv[0])
    groups, group = [], []
    for arg in argv[1:] + [RUN_SEPARATOR]:
        if arg == RUN_SEPARATOR:
            groups.append(group)
            group = []
        else:
            group.append(arg)
    run_phases, cleanup = train.run_phases, distributed.cleanup_distributed
    distributed.cleanup_distributed = lambda: None
    for args in groups:
        out_dir = cli.parse_args(module.Config, args).out_dir

        def run_and_save(stage, phases, student, *rest, _out_dir=out_dir, **kwargs):
            out = run_phases(stage, phases, student, *rest, **kwargs)
            rank = int(os.environ.get("RANK", 0))
            state = distributed.gather_full(student.state_dict())  # whole tensors, also of FSDP shards (a collective)
            safetensors_io.write_safetensors(state, rank_state_path(_out_dir, rank))
            return out
        train.run_phases = run_and_save
        module.main(args)
    cleanup()


if __name__ == "__main__":
    _torchrun_entry(sys.argv[1:])
