"""train.resolve_dtype: --dtype=auto decides by timing on the CPU, never by assumption."""
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
