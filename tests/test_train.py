"""train.resolve_dtype and train.inference_dtype: --dtype=auto decides by timing on the CPU, never by assumption."""
import pytest
import torch

import train


def test_explicit_dtypes_pass_through_and_bad_ones_fail():
    assert train.resolve_dtype("float32", torch.device("cpu"))[0] == "float32"
    assert train.resolve_dtype("bfloat16", torch.device("cpu"))[0] == "bfloat16"
    with pytest.raises(ValueError, match="--dtype must be"):
        train.resolve_dtype("fp8", torch.device("cpu"))


@pytest.mark.parametrize("bf16_seconds, want", [(0.01, "bfloat16"), (0.5, "float32"), (0.09, "float32")])
def test_auto_takes_bf16_only_where_it_is_clearly_faster(monkeypatch, bf16_seconds, want):
    monkeypatch.setattr(train, "cpu_matmul_seconds", lambda bf16, **kw: bf16_seconds if bf16 else 0.1)
    dtype, line = train.resolve_dtype("auto", torch.device("cpu"))
    assert dtype == want and "ms in fp32" in line


def test_auto_measures_this_machine():
    dtype, line = train.resolve_dtype("auto", torch.device("cpu"))
    assert dtype in ("float32", "bfloat16") and "ms in bf16 here" in line


@pytest.mark.parametrize("bf16_ms, want", [((0.2, 0.3), torch.bfloat16), ((0.2, 1.2), torch.float32),
                                           ((0.9, 0.3), torch.float32)])
def test_generation_takes_bf16_weights_only_where_both_shapes_are_clearly_faster(monkeypatch, bf16_ms, want):
    """bf16 weights for generation only where 1-row and 8-row products are both clearly faster (fp32: 1 and 1 ms)."""
    monkeypatch.setattr(train, "decode_matmul_ms",
                        lambda kind, rows: 1.0 if kind == torch.float32 else bf16_ms[rows > 1])
    dtype, line = train.inference_dtype("auto", torch.device("cpu"))
    assert dtype == want and "ms in fp32" in line
    assert train.inference_dtype("float32", torch.device("cpu"))[0] == torch.float32
    with pytest.raises(ValueError, match="--dtype must be"):
        train.inference_dtype("half", torch.device("cpu"))
