"""Data validation: per-file counts and length statistics, and every problem with ``file:line``.

Errors (the record cannot be used): invalid UTF-8, invalid JSON, wrong types, a missing or unknown
role, a system message after the first, two consecutive messages of one role (roles out of order),
empty content, a conversation without an assistant turn, a text record in a chat file or a chat
record in a text file (the file's first record decides which it is). File errors (training refuses
the file whatever ``data.on_bad_records`` says): an empty or whitespace-only file, a text file whose
every record is empty. Warnings (the loaders handle them correctly, so the data is used as is): a
UTF-8 byte-order mark, CRLF line ends, an empty text record, an exact duplicate of an earlier record.

``python -m lumina.run validate PATH...`` prints a report and exits 2 when there are errors.
Training validates its files first (``data.on_bad_records``): ``stop`` ends with the first 10
errors, one line each; ``skip`` drops the bad records and says how many.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lumina.data.chat import check_conversation, render
from lumina.data.text import (
    EMPTY_DIRECTORY,
    DataError,
    check_utf8,
    data_files_in,
    iter_json_lines,
    stream_file,
)
from lumina.data.tokenizer import Tokenizer

__all__ = ["FileReport", "Problem", "print_reports", "validate_file", "validate_packaged", "validate_paths"]


@dataclass(frozen=True)
class Problem:
    path: str
    line: int | None
    message: str
    error: bool  # False: a warning

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {'error' if self.error else 'warning'}: {self.message}"


@dataclass
class FileReport:
    path: str
    kind: str  # "text" or "chat"
    lengths: list[int] = field(default_factory=list)  # tokens per document / conversation
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.error]

    def summary(self) -> str:
        unit = "conversations" if self.kind == "chat" else "documents"
        head = f"{self.path}: {self.kind}, {len(self.lengths):,} {unit}, {sum(self.lengths):,} tokens"
        if self.lengths:
            p50, p90, p99 = np.percentile(self.lengths, [50, 90, 99]).round().astype(int)
            head += f", length p50 {p50:,} / p90 {p90:,} / p99 {p99:,} / max {max(self.lengths):,}"
        n_err, n_warn = len(self.errors), len(self.problems) - len(self.errors)
        return head + (f"; {n_err} errors, {n_warn} warnings" if self.problems else "; ok")


def validate_file(path: Path, tok: Tokenizer, *, count_tokens: bool = True) -> FileReport:
    """Check one .txt or .jsonl file (.jsonl: chat when records have 'messages', else text).
    Without ``count_tokens`` only problems are found (no tokenisation; lengths are 0)."""
    name = str(path)
    if not path.is_file():
        return FileReport(name, "text", problems=[Problem(name, None, "no such file", True)])
    if path.suffix == ".txt":
        return _validate_txt(path, tok, count_tokens)
    if path.suffix != ".jsonl":
        return FileReport(name, "text", problems=[Problem(name, None, "unsupported file type", True)])
    report = FileReport(name, "text")
    with path.open("rb") as f:
        head = f.read(1 << 16)
    if head.startswith(b"\xef\xbb\xbf"):
        report.problems.append(Problem(name, 1, "UTF-8 byte-order mark (ignored)", False))
    if b"\r\n" in head:
        report.problems.append(Problem(name, None, "CRLF line ends (fine; noted)", False))
    seen: dict[str, int] = {}
    first: dict[str, int] = {}  # kind -> line of its first record: the first kind seen is the file's
    has_text = False
    for lineno, record in iter_json_lines(path):
        if isinstance(record, DataError):
            report.problems.append(Problem(name, lineno, str(record).split(": ", 1)[1], True))
            continue
        if not isinstance(record, dict):
            report.problems.append(Problem(name, lineno, "expected a JSON object", True))
            continue
        kind = "chat" if "messages" in record else "text" if isinstance(record.get("text"), str) else None
        if kind is None:
            report.problems.append(
                Problem(name, lineno, "expected 'messages' (chat) or a string 'text'", True)
            )
            continue
        first.setdefault(kind, lineno)
        report.kind = next(iter(first))
        if kind != report.kind:  # each loader reads one kind: the other kind's records are bad there
            other = "'messages'" if report.kind == "chat" else "a string 'text'"
            message = f"a {kind} record in a {report.kind} file (line {first[report.kind]} has {other})"
            report.problems.append(Problem(name, lineno, message, True))
            continue
        if kind == "chat":
            why = check_conversation(record["messages"])
            if why:
                report.problems.append(Problem(name, lineno, why, True))
                continue
            length = len(render(record["messages"], tok)[0]) if count_tokens else 0
        else:
            if not record["text"].strip():
                report.problems.append(Problem(name, lineno, "empty text", False))
            has_text = has_text or bool(record["text"].strip())
            length = len(tok.encode(record["text"])) + 1 if count_tokens else 0
        digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
        if digest in seen:
            report.problems.append(Problem(name, lineno, f"duplicate of line {seen[digest]}", False))
        seen.setdefault(digest, lineno)
        report.lengths.append(length)
    if not report.lengths and not report.errors:
        report.problems.append(Problem(name, None, "empty file: no records", True))
    elif report.kind == "text" and report.lengths and not has_text:
        report.problems.append(Problem(name, None, "no text: every record is empty", True))
    return report


def validate_paths(paths: list[str], tok: Tokenizer, *, count_tokens: bool = True) -> list[FileReport]:
    """Reports for files, globs and directories as training reads them (``expand_paths``: a
    directory is its .txt / .jsonl files, recursively, sorted). A missing path, a glob matching
    nothing or a directory without data files is a one-problem report; the others still get theirs."""
    reports = []
    for x in paths:
        matches = sorted(glob.glob(os.path.expanduser(x), recursive=True)) if glob.has_magic(x) else [x]
        for m in matches or [x]:
            path = Path(m)
            if not path.is_dir():
                reports.append(validate_file(path, tok, count_tokens=count_tokens))
            elif files := data_files_in(path):
                reports += [validate_file(f, tok, count_tokens=count_tokens) for f in files]
            else:
                reports.append(FileReport(m, "text", problems=[Problem(m, None, EMPTY_DIRECTORY, True)]))
    return reports


def _validate_txt(path: Path, tok: Tokenizer, count_tokens: bool) -> FileReport:
    name = str(path)
    report = FileReport(name, "text")
    with path.open("rb") as f:
        head = f.read(4096)
    if head.startswith(b"\xef\xbb\xbf"):
        report.problems.append(Problem(name, 1, "UTF-8 byte-order mark (ignored)", False))
    if b"\r\n" in head:
        report.problems.append(Problem(name, None, "CRLF line ends (fine; noted)", False))
    count = [0]

    def counted(ids):
        count[0] += len(ids)

    try:
        # Whitespace alone is no document (training refuses it), though it has tokens: test the text.
        has_text = check_utf8(path)
        if has_text and count_tokens:
            stream_file(path, tok, counted)
    except DataError as e:  # invalid UTF-8, with its line
        where, _, message = str(e).partition(": ")
        line = where.rsplit(":", 1)[-1]
        report.problems.append(Problem(name, int(line) if line.isdigit() else None, message, True))
        return report
    if not has_text:
        report.problems.append(Problem(name, None, "empty file: no documents", True))
    else:
        report.lengths.append(count[0])
    return report


def validate_packaged(tok: Tokenizer) -> list[FileReport]:
    """Reports for the default data: every Shakespeare text, and the chitchat conversations."""
    from lumina.data.chat import _chitchat_by_id
    from lumina.data.text import shakespeare_split
    from lumina.data.tokenizer import package_file

    train, held_out = shakespeare_split()
    reports = [validate_file(p, tok) for p in sorted(train + held_out)]
    chat = FileReport(str(package_file("chitchat_dataset", "dataset.json")), "chat")
    for chat_id, conv in _chitchat_by_id():
        why = check_conversation(conv)
        if why:
            chat.problems.append(Problem(chat.path, None, f"conversation {chat_id}: {why}", True))
        else:
            chat.lengths.append(len(render(conv, tok)[0]))
    return [*reports, chat]


def print_reports(reports: list[FileReport], max_problems: int = 20, *, strict: bool = False) -> int:
    """Print each report and its problems; the exit status: 2 when any report has errors (with
    ``strict``: any problem at all, warnings included)."""
    for r in reports:
        print(r.summary())
        for p in r.problems[:max_problems]:
            print(f"  {p}")
        if len(r.problems) > max_problems:
            print(f"  ... and {len(r.problems) - max_problems} more")
    n_errors = sum(len(r.errors) for r in reports)
    n_warnings = sum(len(r.problems) for r in reports) - n_errors
    print(
        f"{len(reports)} files, {n_errors} errors" + (f", {n_warnings} warnings (--strict)" if strict else "")
    )
    return 2 if n_errors or (strict and n_warnings) else 0
