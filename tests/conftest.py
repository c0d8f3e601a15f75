"""Test set-up shared by the whole suite.

Environment variables must be set before anything imports tiktoken, torch.compile or losses.py, so they live
at module level here (pytest imports conftest.py before any test module)."""
import os
import sys
import tempfile

import pytest

_tmp = tempfile.mkdtemp(prefix="blm-tests-")
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(_tmp, "tiktoken"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_tmp, "inductor"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the oracles build models locally; nothing comes from a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

# Triton kernels run on CPU tensors only in the interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Scripts run from the repo root and import each other as top-level modules; tests do the same.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls are far faster on one thread (and do not fight other processes for the cores). A module turns it
    on for all its tests with pytestmark = pytest.mark.usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
