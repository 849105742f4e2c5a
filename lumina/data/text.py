"""Base-text data: documents -> one token stream -> packed windows -> deterministic batches.

Legend: B batch, T sequence length, W number of windows.

- Documents come from ``.txt`` files (a file is one document) and ``.jsonl`` files (one
  ``{"text": ...}`` object per line), given as paths or globs; each is tokenised and followed by
  ``<|endoftext|>``, and the documents are concatenated.
- The stream is cut into W = (n - 1) // T windows of T + 1 tokens that overlap by one token; a
  window gives ``inputs = w[:-1]`` and ``targets = w[1:]`` — shifted exactly once, no padding.
- ``batch_at(position)`` is a pure function of (seed, position): batch p holds the windows
  p*B .. p*B + B - 1 of an endless sequence of epochs, each epoch a fresh permutation seeded by
  (seed, epoch). Resuming therefore only needs the position.
- Tokenised files are cached as ``.npy`` token arrays keyed by (file content sha256, tokenizer), loaded
  memory-mapped with ``allow_pickle=False``; a second run skips tokenisation.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lumina.data.tokenizer import Tokenizer, default_cache_dir, package_file

__all__ = [
    "DataError",
    "PackedText",
    "expand_paths",
    "read_documents",
    "sample_ids",
    "shakespeare_split",
    "tokenize_files",
]


class DataError(ValueError):
    """Bad data input; the message is one line naming the file (and line)."""


def expand_paths(patterns: Sequence[str]) -> list[Path]:
    """Paths and globs, in the given order (each glob sorted); a pattern matching nothing is an error."""
    out: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise DataError(f"{pattern}: no such file")
        for m in matches:
            p = Path(m)
            if p.suffix not in (".txt", ".jsonl"):
                raise DataError(f"{m}: unsupported file type (use .txt or .jsonl)")
            out.append(p)
    return out


def read_documents(path: Path) -> list[str]:
    """The documents of one file: the whole text of a .txt, the ``text`` field of each .jsonl line."""
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8-sig")  # tolerate a UTF-8 byte-order mark
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: invalid UTF-8") from None
    if path.suffix == ".txt":
        return [text] if text.strip() else []
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{lineno}: expected an object with a string field 'text'")
        docs.append(record["text"])
    return docs


def _cache_path(path: Path, tokenizer: Tokenizer) -> Path:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:32]
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in tokenizer.name)
    return default_cache_dir().parent / "tokens" / f"{digest}-{safe}.npy"


def _pack_documents(encoded: list[list[int]], eot_id: int) -> np.ndarray:
    arr = np.empty(sum(len(ids) + 1 for ids in encoded), dtype=np.uint32)
    start = 0
    for ids in encoded:  # slice assignment converts a list in C
        arr[start : start + len(ids)] = ids
        arr[start + len(ids)] = eot_id
        start += len(ids) + 1
    return arr


def tokenize_files(paths: Iterable[Path], tokenizer: Tokenizer, *, cache: bool = True) -> np.ndarray:
    """One uint32 token stream: every document of every file, each followed by <|endoftext|>."""
    paths = list(paths)
    cached = {p: _cache_path(p, tokenizer) for p in paths} if cache else {}
    streams: dict[Path, np.ndarray] = {}
    todo = []
    for p in paths:
        if p in cached and cached[p].is_file():
            streams[p] = np.load(cached[p], mmap_mode="r", allow_pickle=False)
        elif p not in todo:
            todo.append(p)
    # One batch over every document of every file: tiktoken spreads a batch over threads, and a .txt
    # file is a single document (file-by-file encoding ran at half the speed on 2 cores).
    docs_per_file = [read_documents(p) for p in todo]
    encoded = tokenizer.encode_batch([d for docs in docs_per_file for d in docs])
    start = 0
    for p, docs in zip(todo, docs_per_file, strict=True):
        streams[p] = _pack_documents(encoded[start : start + len(docs)], tokenizer.eot_id)
        start += len(docs)
        if p in cached:
            cached[p].parent.mkdir(parents=True, exist_ok=True)
            tmp = cached[p].with_name(f"{cached[p].stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, streams[p], allow_pickle=False)
            os.replace(tmp, cached[p])  # atomic
    parts = [streams[p] for p in paths]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)


def sample_ids(n: int, seed: int, position: int, batch_size: int) -> list[int]:
    """The items of batch ``position`` from an endless sequence of epochs over ``n`` items, each epoch
    a permutation seeded by (seed, epoch): every item once per epoch, a pure function of its inputs."""
    ids, orders = [], {}
    for g in range(position * batch_size, (position + 1) * batch_size):
        epoch = g // n
        if epoch not in orders:
            key = int.from_bytes(hashlib.sha256(f"{seed}/{epoch}".encode()).digest()[:4], "little")
            orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(key))
        ids.append(int(orders[epoch][g % n]))
    return ids


@dataclass(frozen=True)
class PackedText:
    """Packed windows over a token stream with batches addressed by position."""

    tokens: np.ndarray  # [n] uint32
    seq_len: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_windows < 1:
            raise DataError(
                f"only {len(self.tokens)} tokens: need at least seq_len + 1 = {self.seq_len + 1} for a window"
            )

    @property
    def num_windows(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def window(self, i: int) -> np.ndarray:
        start = i * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]

    def window_ids(self, position: int, batch_size: int) -> list[int]:
        """Which windows batch ``position`` holds."""
        return sample_ids(self.num_windows, self.seed, position, batch_size)

    def batch_at(self, position: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs [B, T], targets [B, T]) int64 for batch number ``position``."""
        windows = np.stack([self.window(i) for i in self.window_ids(position, batch_size)]).astype(np.int64)
        w = torch.from_numpy(windows)
        return w[:, :-1], w[:, 1:]


def shakespeare_split(eval_fraction: float = 0.05) -> tuple[list[Path], list[Path]]:
    """The 42 packaged Shakespeare plays and poems (``shakespeare`` package data), split by
    document: the ceil(eval_fraction * n) files whose names hash lowest are held out for eval."""
    root = package_file("shksprdata", "__init__.py").parent / "texts"
    files = sorted(root.glob("*_gut.txt"))
    if not files:
        raise DataError(f"{root}: no *_gut.txt texts (is the `shakespeare` package installed?)")
    by_hash = sorted(files, key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())
    n_eval = max(1, math.ceil(eval_fraction * len(files)))
    held_out = set(by_hash[:n_eval])
    return [p for p in files if p not in held_out], [p for p in files if p in held_out]
