import os
import tempfile

import pytest
import torch

# Hermetic tokenizer cache: tests never read or write the user's ~/.cache.
os.environ["LUMINA_CACHE_DIR"] = tempfile.mkdtemp(prefix="lumina-test-cache-")
os.environ.pop("TIKTOKEN_CACHE_DIR", None)

from lumina.config import ModelConfig


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    """A tiny GQA model: odd vocab and sequence sizes catch shape bugs."""
    return ModelConfig(
        vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_multiple_of=32, max_seq_len=64
    )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
