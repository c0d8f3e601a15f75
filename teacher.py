"""Teachers: the token LLMs a byte student is distilled from. The families (Llama, Qwen2/3, OLMo 1/2) as switches of
transformer.py's one transformer, read from HF checkpoints so that the logits equal HF transformers'; the presets
and the embedded default teacher (converted from its GGUF by gguf_teacher.py).
"""
import json
import os
from dataclasses import dataclass

import torch

from gguf_teacher import ensure_smollm2
from safetensors_io import is_int, read_checkpoint
from tokenizer import load_tokenizer
from transformer import Transformer, TransformerConfig, rope_inv_freq

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
Teacher = Transformer  # a teacher is a Transformer with its token embedding and output layer


@dataclass
class TeacherConfig(TransformerConfig):
    family: str = "llama"           # llama | qwen2 | qwen3 | olmo2 | olmo
    bos_id: int | None = None
    eos_id: int | None = None


# architectures name / model_type -> the switches that family sets on top of the config fields.
FAMILIES = {
    "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
    "Olmo2ForCausalLM": "olmo2", "OlmoForCausalLM": "olmo",
}
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "olmo2": "olmo2", "olmo": "olmo"}


def _first_int(x):
    return x[0] if isinstance(x, list) and x else x


def config_from_hf(hf, where="config.json"):
    """TeacherConfig from an HF config.json dict, either dialect: Hub checkpoints carry top-level rope_theta and
    rope_scaling; transformers 5's save_pretrained writes a rope_parameters dict instead."""
    archs = hf.get("architectures") or []
    family = next((FAMILIES[a] for a in archs if a in FAMILIES), None) or MODEL_TYPES.get(hf.get("model_type"))
    if family is None:
        known = ", ".join(sorted(FAMILIES))
        raise ValueError(f"{where}: unsupported teacher architecture {archs or hf.get('model_type')!r} "
                         f"(supported: {known})")
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None)
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "default":
            scaling = None
        elif kind not in ("llama3", "linear"):
            raise ValueError(f"{where}: rope scaling type {kind!r} is not supported (llama3, linear)")
    if family == "olmo2" and hf.get("sliding_window") and any(t == "sliding_attention" for t in hf.get("layer_types") or []):
        raise ValueError(f"{where}: sliding-window OLMo layers (OLMo 3) are not supported yet")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if key not in hf:
            raise KeyError(key)
        if not is_int(hf[key]) or hf[key] <= 0:
            raise ValueError(f"{where}: {key} must be a positive integer, not {hf[key]!r}")
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        missing = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} - scaling.keys()
        if missing:
            raise ValueError(f"{where}: llama3 rope scaling lacks {sorted(missing)}")
    n_heads = hf["num_attention_heads"]
    d_model = hf["hidden_size"]
    attention_bias = bool(hf.get("attention_bias", False))
    return TeacherConfig(
        family=family, vocab_size=hf["vocab_size"], d_model=d_model, n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or d_model // n_heads, d_ff=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", hf.get("layer_norm_eps", 1e-5)) if family != "olmo" else 1e-5,
        rope_theta=float(theta), rope_scaling=scaling, max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=True if family == "qwen2" else attention_bias, o_bias=False if family == "qwen2" else attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm={"qwen3": "head", "olmo2": "full"}.get(family, "none"),
        norm_type="layernorm" if family == "olmo" else "rms", post_norm=family == "olmo2",
        clip_qkv=hf.get("clip_qkv") if family == "olmo" else None,
        bos_id=_first_int(hf.get("bos_token_id")), eos_id=_first_int(hf.get("eos_token_id")),
    )



def check_device(device):
    """-> a torch.device that exists on this machine, or a ValueError that says why not (rather than an error from deep
    inside torch half-way through loading)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r} ({e})") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but this machine has no CUDA GPU (use cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {device} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def load_teacher_model(folder, device="cpu", dtype=torch.float32):
    """Build a Teacher from an HF-layout folder (config.json + safetensors). Weights are read by our own reader,
    converted one tensor at a time, and assigned into a model constructed on the meta device (no random init)."""
    device = check_device(device)
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{folder}: no config.json (expected an HF-layout teacher folder)")
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{cfg_path}: not a JSON object")
    try:
        cfg = config_from_hf(hf, cfg_path)
    except KeyError as e:
        raise ValueError(f"{cfg_path}: missing field {e}") from None
    state = {k.removeprefix("model."): v for k, v in read_checkpoint(folder, dtype=dtype).items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # some tied checkpoints still store the copy
    elif "lm_head.weight" not in state and "embed_tokens.weight" in state:
        raise ValueError(f"{folder}: no lm_head.weight and tie_word_embeddings is false")
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}  # old checkpoints stored it
    with torch.device("meta"):
        model = Teacher(cfg)
    expected = model.state_dict()
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(f"{folder}: checkpoint does not match a {cfg.family} model of this config: "
                         f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"{folder}: tensor {k} has shape {tuple(v.shape)}, config implies {tuple(expected[k].shape)}")
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, assign=True)
    model.inv_freq = rope_inv_freq(cfg)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Presets and the embedded default teacher.

TEACHERS_DIR = os.environ.get("BLM_TEACHERS_DIR", os.path.join(REPO_DIR, "teachers"))
PRESETS = {  # --teacher=NAME -> the Hub repo the user downloads into teachers/NAME (the paper's families and sizes)
    "olmo": "allenai/OLMo-2-0425-1B",
    "llama": "meta-llama/Llama-3.2-3B",
    "qwen": "Qwen/Qwen3-4B-Base",
}
EMBEDDED_TEACHER = "smollm2"


def resolve_teacher_dir(name_or_path):
    """A preset name ('olmo', 'llama', 'qwen', 'smollm2') or a folder -> the teacher's HF-layout folder."""
    if name_or_path == EMBEDDED_TEACHER:
        return ensure_smollm2(os.path.join(TEACHERS_DIR, EMBEDDED_TEACHER))
    if name_or_path in PRESETS:
        folder = os.path.join(TEACHERS_DIR, name_or_path)
        if not os.path.exists(os.path.join(folder, "config.json")):
            raise FileNotFoundError(
                f"teacher preset '{name_or_path}' ({PRESETS[name_or_path]}) is not downloaded. Run:\n"
                f"  huggingface-cli download {PRESETS[name_or_path]} --local-dir {folder}")
        return folder
    if os.path.isdir(name_or_path):
        return name_or_path
    raise FileNotFoundError(f"unknown teacher {name_or_path!r}: not a preset ({', '.join([*PRESETS, EMBEDDED_TEACHER])}) "
                            f"and not a folder")


def load_teacher(name_or_path, device="cpu", dtype=torch.float32):
    """(teacher, tokenizer) for a preset name or an HF-layout folder. tokenizer is None if the folder has none."""
    folder = resolve_teacher_dir(name_or_path)
    teacher, tok = load_teacher_model(folder, device, dtype), load_tokenizer(folder)
    if tok is not None and tok.n_vocab > teacher.cfg.vocab_size:
        raise ValueError(f"{folder}: the tokenizer has {tok.n_vocab} ids but the model {teacher.cfg.vocab_size} embedding "
                         "rows: the tokenizer and the weights do not belong together")
    return teacher, tok

