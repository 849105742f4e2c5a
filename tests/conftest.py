import os
import tempfile
from pathlib import Path

import pytest
import torch

# Hermetic tokenizer cache: tests never read or write the user's ~/.cache. The workers of one
# `pytest -n N` run share theirs (cache files are written atomically), so each corpus is tokenized once.
_run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
_cache = Path(tempfile.gettempdir()) / f"lumina-test-cache-{_run}" if _run else None
if _cache is not None:
    _cache.mkdir(exist_ok=True)
os.environ["LUMINA_CACHE_DIR"] = str(_cache) if _cache else tempfile.mkdtemp(prefix="lumina-test-cache-")
os.environ.pop("TIKTOKEN_CACHE_DIR", None)

# Under `pytest -n N` the workers share the cores: one worker's ops should not spread over all of
# them (N workers x all cores oversubscribes; most tests are single-threaded Python anyway).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))

from lumina.config import ModelConfig  # noqa: E402 (after the cache set-up above)


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
