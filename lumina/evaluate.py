"""Evaluation of a trained model, document by document, and the paired comparison of two models.

Legend: B rows per batch, T positions per row, N tokens, D model dim, V vocab, R resamples.

    model = load_model("runs/debug")                  # lumina.generate: a run folder or a checkpoint
    sets, note = default_sets(model)                  # the run's held-out data (or data_sets(paths, tok))
    result = evaluate(model, sets)                    # per file and overall; result.docs per document
    write_per_doc("a.jsonl", result)                  # read_per_doc reads it back
    stats = paired(docs_a, docs_b)                    # bootstrap CI, paired t, permutation p, verdict

Eval sees what training sees:
- Text: the files' token stream exactly as training builds it (``tokenize_file``: each file's
  documents, each file followed by <|endoftext|>; a .jsonl record each followed by it; with the run's
  held-out split by content hash when the default data is a part of the run's own files), cut into
  windows of ``seq_len`` + 1 tokens that overlap by one token, as ``PackedText`` cuts it. Every target
  is scored once: the leftover targets at the end are scored in one more window, the stream's last
  ``seq_len`` + 1 tokens (full context; only its unscored targets count). Context crosses document
  boundaries as in training. A document is the held-out split's unit (``lumina.data.text.documents``:
  a .txt's paragraphs, or lines when it has fewer than two paragraphs; a .jsonl's records); a target
  token belongs to the document its first byte lies in, and the <|endoftext|> after a file or record
  to its last document. (The stream's very first token is no target.)
- Chat: one conversation per row as ``ChatRows`` builds them (oldest turns dropped to fit, right
  padding), loss only on the assistant's tokens (its content and <|im_end|>): a conversation is a
  document.
- The model: the checkpoint's params in the run's compute precision (``train.precision``), its live
  knobs, and ``routing="train"``: MoD capacity top-k over each row (a token's route depends on the
  whole row) and MoE with the trained capacity factor — what training's held-out eval computes
  (``lumina.step.eval_step``). ``routing="inference"``: what ``generate`` runs (MoD predictor
  routing, causal; MoE dropless).

Comparison (``paired``): both models' documents must be the same (ids and token counts). Per
document d the summed losses L_A(d), L_B(d) and its tokens n(d); the statistic is the token-weighted
difference delta = sum(L_B - L_A) / sum(n) (nats per token; negative: B is better). Its 95% interval
is a paired percentile bootstrap over documents (R resamples, seeded); cross-checks: a paired t on the
same ratio (delta-method standard error, df = documents - 1) and a sign-flip permutation test (swap
A and B within each document at random; p = (1 + #{|delta*| >= |delta|}) / (R + 1)). Documents, not
tokens, are the resampled unit: tokens within a document are correlated, so token-level tests
overstate significance. The verdict follows the bootstrap interval.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lumina.data.chat import ChatRows, check_conversation, chitchat_split, read_conversations
from lumina.data.text import (
    DataError,
    Holdout,
    documents,
    expand_paths,
    holdout_cut,
    iter_json_lines,
    shakespeare_split,
    text_holdout,
    tokenize_file,
)
from lumina.data.tokenizer import Tokenizer
from lumina.generate import LoadedModel
from lumina.model import apply, default_knobs
from lumina.model.loss import hits, token_nll
from lumina.model.transformer import head_weight

__all__ = [
    "Doc",
    "EvalError",
    "EvalResult",
    "EvalSet",
    "Paired",
    "PerDoc",
    "Scorer",
    "data_sets",
    "default_sets",
    "evaluate",
    "match_docs",
    "paired",
    "read_per_doc",
    "student_t_sf",
    "write_per_doc",
]

Routing = Literal["train", "inference"]
ROUTINGS = ("train", "inference")
PER_DOC_FORMAT = "lumina-eval-per-doc/1"


class EvalError(ValueError):
    """Bad input to eval / compare (files, flags, mismatched documents); the message is one line."""


# ----------------------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class EvalSet:
    """One file (or packaged corpus part) to evaluate. ``holdout``: only the eval side of a
    content-hash split of a text file's documents; ``conversations``: chat, already read."""

    name: str
    kind: Literal["text", "chat"]
    path: Path | None = None
    holdout: Holdout | None = None
    conversations: list | None = field(default=None, repr=False)
    lines: list[int | None] | None = field(default=None, repr=False)  # chat: each conversation's line


def _read_chats(path: Path, skip_bad: bool = False) -> tuple[list, list[int]]:
    """The conversations of a chat file (a bad record: ``DataError`` naming file:line, or dropped
    with ``skip_bad``, as training reads it) and the line of each."""
    convs = read_conversations(path, skip_bad=skip_bad)
    lines = [
        n
        for n, rec in iter_json_lines(path)
        if isinstance(rec, dict) and check_conversation(rec.get("messages")) is None
    ]
    assert len(lines) == len(convs)
    return convs, lines


def data_sets(patterns: Sequence[str], tok: Tokenizer) -> list[EvalSet]:
    """The files ``--data`` names (paths, globs, directories), each checked as ``validate`` checks
    it: text (.txt, .jsonl of {"text"}) or chat (.jsonl of {"messages"}). A bad file or record ends
    in a ``DataError`` naming the file and line."""
    from lumina.data.validate import validate_file

    sets = []
    for path in expand_paths(patterns):
        try:
            report = validate_file(path, tok, count_tokens=False)
            if report.errors:
                more = len(report.errors) - 1
                tail = f" (and {more} more: `python -m lumina.run validate {path}` lists all)" if more else ""
                raise DataError(f"{report.errors[0]}{tail}")
            if report.kind == "chat":
                convs, lines = _read_chats(path)
                sets.append(EvalSet(str(path), "chat", path, conversations=convs, lines=lines))
            else:
                sets.append(EvalSet(str(path), "text", path))
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    return sets


def default_sets(model: LoadedModel) -> tuple[list[EvalSet], str]:
    """The held-out data of the run that wrote ``model``, as its training evaluated (``build_mix``'s
    eval split), and one line describing it: the packaged held-out Shakespeare plays / chitchat
    conversations, the run's eval files, or the eval side of the content-hash split of its train
    files. Files the run read must still exist where its config says."""
    cfg = model.run_cfg
    d = cfg.data
    tok = model.get_tokenizer()
    sets: list[EvalSet] = []
    said: list[str] = []
    if d.mode != "finetuning_only":
        if not d.train_files:
            sets += [EvalSet(str(p), "text", p) for p in shakespeare_split(d.eval_fraction)[1]]
            said.append(f"the packaged Shakespeare held-out plays (data.eval_fraction={d.eval_fraction})")
        elif d.eval_files:
            sets += data_sets(d.eval_files, tok)
            said.append("data.eval_files")
        else:
            paths = expand_paths(d.train_files)
            cut, _, held, unit = text_holdout(paths, d.eval_fraction, skip_bad=d.on_bad_records == "skip")
            if cut is None:
                raise EvalError("data.train_files: too few documents for a held-out split; pass --data")
            sets += [EvalSet(f"{p}:held-out", "text", p, holdout=Holdout(cut, "eval")) for p in paths]
            said.append(f"the held-out {held} {unit}s of data.train_files")
    if d.mode != "base_only":
        if not d.chat_files:
            convs = chitchat_split(d.eval_fraction)[1]
            sets.append(EvalSet("chitchat:held-out", "chat", conversations=convs, lines=[None] * len(convs)))
            said.append(f"the packaged chitchat held-out chats (data.eval_fraction={d.eval_fraction})")
        elif d.chat_eval_files:
            sets += data_sets(d.chat_eval_files, tok)
            said.append("data.chat_eval_files")
        else:  # the held-out side of a content-hash split over all the files' conversations
            skip = d.on_bad_records == "skip"
            read = [(path, *_read_chats(path, skip)) for path in expand_paths(d.chat_files)]
            keys = [json.dumps(c, sort_keys=True) for _, convs, _ in read for c in convs]
            cut, _, _ = holdout_cut(keys, d.eval_fraction)
            if cut is None:
                raise EvalError("data.chat_files: too few conversations for a held-out split; pass --data")
            side = Holdout(cut, "eval")
            for path, convs, lines in read:
                keep = [i for i, c in enumerate(convs) if side.keeps(json.dumps(c, sort_keys=True))]
                held = [convs[i] for i in keep]
                if held:  # (a file may hold none of the held-out conversations)
                    name, kept_lines = f"{path}:held-out", [lines[i] for i in keep]
                    sets.append(EvalSet(name, "chat", path, conversations=held, lines=kept_lines))
            said.append("the held-out conversations of data.chat_files")
    return sets, "; ".join(said)


def sets_for(model: LoadedModel, data: str | None) -> tuple[list[EvalSet], str]:
    """The sets of a ``--data`` value (comma-separated patterns; None: ``default_sets``) and a note."""
    if data is None:
        return default_sets(model)
    parts = [x for x in data.split(",") if x.strip()]
    if not parts:
        raise EvalError("--data: no files given (leave out --data for the run's held-out data)")
    return data_sets(parts, model.get_tokenizer()), data


def load(path: str | Path, device: str = "cpu") -> LoadedModel:
    """``lumina.generate.load_model`` with a checked device name."""
    from lumina.generate import load_model

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise EvalError(f"--device: {device!r} is not a device (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device: {device}: CUDA is not available on this machine")
    return load_model(path, device=dev)


# ------------------------------------------------------------------------------------- the results


class _PerToken:
    """``loss``: the mean over ``tokens`` of ``loss_sum`` (NaN without tokens)."""

    tokens: int
    loss_sum: float

    @property
    def loss(self) -> float:
        return self.loss_sum / self.tokens if self.tokens else float("nan")


@dataclass(frozen=True)
class Doc(_PerToken):
    """One document's sums: ``loss_sum`` nats over its ``tokens`` scored targets, ``correct`` of them
    predicted by the argmax. ``id`` is ``file#index`` (index among the file's evaluated documents)."""

    id: str
    file: str
    index: int
    line: int | None
    kind: str
    tokens: int
    loss_sum: float
    correct: int


@dataclass(frozen=True)
class Totals(_PerToken):
    name: str
    kind: str
    documents: int
    tokens: int
    loss_sum: float
    correct: int

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 700.0)) if self.tokens else float("nan")

    @property
    def accuracy(self) -> float:
        return self.correct / self.tokens if self.tokens else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "loss": self.loss, "ppl": self.ppl, "accuracy": self.accuracy}


def _totals(name: str, kind: str, docs: Sequence[Doc]) -> Totals:
    return Totals(
        name,
        kind,
        len(docs),
        sum(d.tokens for d in docs),
        math.fsum(d.loss_sum for d in docs),
        sum(d.correct for d in docs),
    )


@dataclass
class EvalResult:
    meta: dict  # model, step, routing, seq_len, precision, tokenizer, data
    docs: list[Doc]

    @property
    def files(self) -> list[Totals]:
        by_file: dict[str, list[Doc]] = {}
        for d in self.docs:
            by_file.setdefault(d.file, []).append(d)
        return [_totals(name, docs[0].kind, docs) for name, docs in by_file.items()]

    @property
    def overall(self) -> Totals:
        kinds = {d.kind for d in self.docs}
        return _totals("overall", kinds.pop() if len(kinds) == 1 else "mixed", self.docs)

    def to_dict(self) -> dict:
        return {**self.meta, "files": [t.to_dict() for t in self.files], "overall": self.overall.to_dict()}


# -------------------------------------------------------------------------------------- the scoring


def routing_note(model: LoadedModel, routing: Routing) -> str:
    """How the model routes in this evaluation, for the output."""
    m = model.run_cfg.model
    parts = []
    if any(m.mod_layers()):
        parts.append(
            "MoD top-k capacity routing per row (as training evaluates)"
            if routing == "train"
            else "MoD predictor routing (as generate runs)"
        )
    if m.moe.enabled:
        dropless = routing == "inference" or m.moe.capacity_factor is None
        capacity = f"MoE capacity_factor={m.moe.capacity_factor} (as trained)"
        parts.append("MoE dropless" if dropless else capacity)
    return ", ".join(parts) or "dense (no routing)"


class Scorer:
    """Per-token negative log-likelihood and argmax hits of one model, as ``eval_step`` computes
    them: the forward in the run's compute dtype, the head in chunks, fp32 log-softmax."""

    def __init__(self, model: LoadedModel, routing: Routing = "train"):
        from lumina.step import _compute_params

        if routing not in ROUTINGS:
            raise EvalError(f"routing={routing!r}: expected one of {', '.join(ROUTINGS)}")
        run_cfg = model.run_cfg
        self.cfg = run_cfg.model if routing == "train" else model.cfg
        self.mod_routing = "topk" if routing == "train" else "predictor"
        self.params = _compute_params(model.params, run_cfg)
        self.head_DV = head_weight(self.params, self.cfg)
        self.device = self.head_DV.device
        self.knobs = model.knobs if model.knobs is not None else default_knobs(self.cfg, self.device)
        self.fp8 = run_cfg.train.precision == "fp8"
        self.chunk = run_cfg.train.loss_chunk if run_cfg.train.loss_chunk > 0 else 1024
        self.pad_id = model.get_tokenizer().pad_id

    @torch.no_grad()
    def __call__(self, inputs_BT: torch.Tensor, targets_BT: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(nll [B, T] float64, correct [B, T] bool); 0 / False where the target is ``pad_id``."""
        x_BTD, _ = apply(
            self.params,
            inputs_BT.to(self.device),
            self.cfg,
            self.knobs,
            train=False,
            fp8=self.fp8,
            return_hidden=True,
            mod_routing=self.mod_routing,
        )
        x_ND, t_N = x_BTD.flatten(0, 1), targets_BT.to(self.device).flatten()
        nll, hit = [], []
        for s in range(0, x_ND.shape[0], self.chunk):
            logits_CV = (x_ND[s : s + self.chunk] @ self.head_DV).float()  # as linear_cross_entropy
            t_C = t_N[s : s + self.chunk]
            keep_C = t_C != self.pad_id
            safe_C1 = torch.where(keep_C, t_C, torch.zeros_like(t_C))[:, None]
            hit.append(hits(logits_CV, safe_C1, keep_C))
            nll.append(token_nll(logits_CV, safe_C1, keep_C)[0])
        shape = targets_BT.shape
        return (
            torch.cat(nll).view(shape).double().cpu().numpy(),
            torch.cat(hit).view(shape).cpu().numpy(),
        )


@functools.cache
def _token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """Bytes per token id of the ordinary vocabulary (specials: 0)."""
    enc = tok.encoding
    out = np.zeros(enc.max_token_value + 1, dtype=np.int64)
    for i in range(enc.max_token_value + 1):
        try:
            out[i] = len(enc.decode_single_token_bytes(i))
        except KeyError:  # a hole in the ranks
            continue
    specials = list(enc._special_tokens.values())
    out[specials] = 0
    return out


def _text_docs(s: EvalSet, tok: Tokenizer, skip_bad: bool) -> tuple[np.ndarray, np.ndarray, list[Doc]]:
    """(the file's token stream as training builds it, the document of each of its tokens, the
    documents with zero sums)."""
    assert s.path is not None
    ids = np.asarray(tokenize_file(s.path, tok, skip_bad=skip_bad, holdout=s.holdout), dtype=np.int64)
    kept = [(line, text) for line, text in documents(s.path, skip_bad=skip_bad)]
    if s.holdout is not None:
        kept = [(line, text) for line, text in kept if s.holdout.keeps(text)]
    eot = np.flatnonzero(ids == tok.eot_id)
    mismatch = EvalError(f"{s.name}: its token stream does not match its documents (a bug: please report)")
    if s.path.suffix == ".jsonl":
        if len(eot) != len(kept):
            raise mismatch
        # record j: its tokens and the <|endoftext|> that ends it
        doc_of = np.repeat(np.arange(len(kept)), np.diff(np.concatenate([[-1], eot])))
        lines = [line for line, _ in kept]
    else:
        if len(ids) == 0:
            return ids, np.zeros(0, dtype=np.int64), []
        if len(eot) != 1 or eot[0] != len(ids) - 1:
            raise mismatch
        # pieces that are whitespace only are no document: their bytes go to the next document
        piece_doc, lines, n_doc = [], [], 0
        for line, text in kept:
            piece_doc.append(n_doc)
            if text.strip():
                lines.append(line)
                n_doc += 1
        if n_doc == 0:
            raise mismatch
        piece_doc_P = np.minimum(np.asarray(piece_doc), n_doc - 1)
        piece_end_P = np.cumsum([len(text.encode("utf-8")) for _, text in kept])
        lens_N = _token_byte_lengths(tok)[ids[:-1]]
        if lens_N.sum() != piece_end_P[-1]:
            raise mismatch
        start_N = np.cumsum(lens_N) - lens_N
        piece_N = np.searchsorted(piece_end_P, start_N, side="right")
        doc_of = np.concatenate([piece_doc_P[piece_N], [n_doc - 1]])  # the final <|endoftext|>: last doc
    docs = [Doc(f"{s.name}#{i}", s.name, i, line, "text", 0, 0.0, 0) for i, line in enumerate(lines)]
    return ids, doc_of, docs


def _windows(n: int, T: int) -> list[tuple[int, int, int]]:
    """(start, length, skip) of the windows scoring every target 1..n-1 of an n-token stream once:
    tokens[start : start + length + 1] in, the last ``length - skip`` targets counted."""
    if n < 2:
        return []
    if n < T + 1:
        return [(0, n - 1, 0)]
    W = (n - 1) // T
    out = [(i * T, T, 0) for i in range(W)]
    rest = (n - 1) - W * T
    if rest:
        out.append((n - 1 - T, T, T - rest))
    return out


Progress = Callable[[str, int, int], None]  # (what, tokens done, tokens in all)


def _eval_text(scorer, sets, tok, seq_len, batch_size, skip_bad, progress) -> list[Doc]:
    streams, doc_ofs, docs = [], [], []
    for s in sets:
        ids, doc_of, file_docs = _text_docs(s, tok, skip_bad)
        streams.append(ids)
        doc_ofs.append(doc_of + len(docs))
        docs += file_docs
    if not docs:
        return []
    stream = np.concatenate(streams)
    doc_of = np.concatenate(doc_ofs)
    n = len(stream)
    nll_N, hit_N, scored_N = np.zeros(n), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    wins = _windows(n, seq_len)
    done = 0
    for b in range(0, len(wins), batch_size):
        group = wins[b : b + batch_size]  # all of length seq_len, or the one window of a short stream
        rows = np.stack([stream[start : start + L + 1] for start, L, _ in group])
        x = torch.from_numpy(rows)
        nll, hit = scorer(x[:, :-1], x[:, 1:])
        for r, (start, L, skip) in enumerate(group):
            pos = slice(start + 1 + skip, start + 1 + L)
            nll_N[pos], hit_N[pos], scored_N[pos] = nll[r, skip:], hit[r, skip:], True
            done += L - skip
        progress("text", done, n - 1)
    assert scored_N[1:].all() and not scored_N[0]
    k = len(docs)
    tokens = np.bincount(doc_of[1:], minlength=k)
    loss = np.bincount(doc_of[1:], weights=nll_N[1:], minlength=k)
    correct = np.bincount(doc_of[1:], weights=hit_N[1:], minlength=k)
    return [
        Doc(d.id, d.file, d.index, d.line, "text", int(tokens[i]), float(loss[i]), int(correct[i]))
        for i, d in enumerate(docs)
    ]


def _eval_chat(scorer, s: EvalSet, tok, seq_len, batch_size, progress) -> list[Doc]:
    rows = ChatRows.build(s.conversations, tok, seq_len)
    tokens = torch.from_numpy(rows.tokens)
    trained = torch.from_numpy(rows.trained)
    targets = torch.where(trained[:, 1:], tokens[:, 1:], rows.pad_id)  # as ChatRows.batch_at
    docs = []
    total = int((targets != rows.pad_id).sum())
    done = 0
    for b in range(0, len(tokens), batch_size):
        nll, hit = scorer(tokens[b : b + batch_size, :-1], targets[b : b + batch_size])
        n_B = (targets[b : b + batch_size] != rows.pad_id).sum(1).tolist()
        for r in range(nll.shape[0]):
            i = b + r
            line = s.lines[i] if s.lines else None
            docs.append(
                Doc(f"{s.name}#{i}", s.name, i, line, "chat", n_B[r], float(nll[r].sum()), int(hit[r].sum()))
            )
            done += n_B[r]
        progress(s.name, done, total)
    return docs


def evaluate(
    model: LoadedModel,
    sets: Sequence[EvalSet],
    *,
    routing: Routing = "train",
    seq_len: int | None = None,
    batch_size: int | None = None,
    progress: Progress | None = None,
    data_note: str = "",
) -> EvalResult:
    """Every document of ``sets`` scored by ``model`` (see the module docstring). ``seq_len``,
    ``batch_size``: default the run's ``train.seq_len`` and ``train.micro_batch_size``."""
    cfg = model.run_cfg
    T = seq_len or cfg.train.seq_len
    B = batch_size or cfg.train.micro_batch_size
    if cfg.model.max_seq_len < T:
        raise EvalError(f"--seq-len {T} exceeds the model's max_seq_len={cfg.model.max_seq_len}")
    tok = model.get_tokenizer()
    if cfg.model.vocab_size < tok.vocab_size:
        raise EvalError(
            f"tokenizer {cfg.data.tokenizer} does not fit model.vocab_size={cfg.model.vocab_size}"
        )
    scorer = Scorer(model, routing)
    progress = progress or (lambda *_: None)
    skip_bad = cfg.data.on_bad_records == "skip"
    docs = _eval_text(scorer, [s for s in sets if s.kind == "text"], tok, T, B, skip_bad, progress)
    for s in sets:
        if s.kind == "chat":
            docs += _eval_chat(scorer, s, tok, T, B, progress)
    if not docs:
        raise EvalError("the data holds no document to evaluate")
    meta = {
        "format": PER_DOC_FORMAT,
        "model": str(model.path),
        "step": model.step,
        "routing": routing,
        "routing_note": routing_note(model, routing),
        "seq_len": T,
        "batch_size": B,
        "precision": cfg.train.precision,
        "tokenizer": cfg.data.tokenizer,
        "data": data_note,
    }
    return EvalResult(meta, docs)


def stderr_progress(label: str = "", every_s: float = 15.0, file=None) -> Progress:
    """A ``progress`` callback printing at most one line per ``every_s`` seconds (and at 100%)."""
    last = [time.perf_counter()]
    t0 = last[0]

    def show(what: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] < every_s and done < total:
            return
        last[0] = now
        rate = done / max(now - t0, 1e-9)
        line = f"[eval] {label}{what}: {done:,}/{total:,} tokens ({rate:,.0f} tokens/s)"
        print(line, file=file or sys.stderr, flush=True)

    return show


# ------------------------------------------------------------------------------ per-document files


@dataclass
class PerDoc:
    meta: dict
    docs: list[Doc]
    path: str = ""


def write_per_doc(path: str | Path, result: EvalResult) -> None:
    """One JSON object per line: the evaluation's metadata first, then one record per document.
    Written to a temporary file and renamed: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(json.dumps(result.meta) + "\n")
            for d in result.docs:
                f.write(json.dumps({**asdict(d), "loss": d.loss if d.tokens else None}) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise EvalError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)


_FIELDS = {
    "id": str,
    "file": str,
    "index": int,
    "kind": str,
    "tokens": int,
    "loss_sum": float,
    "correct": int,
}


def read_per_doc(path: str | Path) -> PerDoc:
    """A file ``write_per_doc`` wrote; a malformed one is an ``EvalError`` naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such file")
    meta, docs = None, []
    for lineno, rec in iter_json_lines(path):
        if isinstance(rec, DataError):
            raise EvalError(str(rec))
        if meta is None:
            if not isinstance(rec, dict) or rec.get("format") != PER_DOC_FORMAT:
                raise EvalError(
                    f"{path}:{lineno}: not a per-document file of `python -m lumina.run eval --per-doc`"
                )
            meta = rec
            continue
        if not isinstance(rec, dict):
            raise EvalError(f"{path}:{lineno}: expected a document record (a JSON object)")
        for name, kind in _FIELDS.items():
            v = rec.get(name)
            ok = isinstance(v, kind) or (kind is float and isinstance(v, int))
            if not ok or isinstance(v, bool) or (kind is not str and (v < 0 or not math.isfinite(v))):
                raise EvalError(f"{path}:{lineno}: field {name!r} must be a non-negative {kind.__name__}")
        line = rec.get("line")
        docs.append(
            Doc(
                rec["id"],
                rec["file"],
                rec["index"],
                line if isinstance(line, int) else None,
                rec["kind"],
                rec["tokens"],
                float(rec["loss_sum"]),
                rec["correct"],
            )
        )
    if meta is None:
        raise EvalError(f"{path}: empty (not a per-document file of `python -m lumina.run eval --per-doc`)")
    if not docs:
        raise EvalError(f"{path}: holds no document records")
    return PerDoc(meta, docs, str(path))


# ---------------------------------------------------------------------------------- the comparison


def match_docs(a: Sequence[Doc], b: Sequence[Doc], name_a: str = "A", name_b: str = "B") -> None:
    """Raise ``EvalError`` (one line) unless A and B hold the same documents with the same tokens."""
    if len(a) != len(b):
        raise EvalError(
            f"{name_a} and {name_b} evaluated different documents ({len(a):,} vs {len(b):,}): "
            "compare needs the same data, tokenizer and seq_len"
        )
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x.id != y.id or x.tokens != y.tokens:
            raise EvalError(
                f"{name_a} and {name_b} differ at document {i}: {x.id} ({x.tokens} tokens) vs "
                f"{y.id} ({y.tokens} tokens): compare needs the same data, tokenizer and seq_len"
            )


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) (continued fraction, Numerical Recipes)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast on this side
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * f / a


def student_t_sf(t: float, df: float) -> float:
    """Two-sided p-value of Student's t: P(|T| >= |t|) with ``df`` degrees of freedom."""
    if math.isnan(t):
        return float("nan")
    if math.isinf(t):
        return 0.0
    return _betainc(df / 2, 0.5, df / (df + t * t))


@dataclass(frozen=True)
class Paired:
    documents: int
    tokens: int
    loss_a: float
    loss_b: float
    accuracy_a: float
    accuracy_b: float
    diff: float  # loss_b - loss_a, nats per token
    ci_low: float
    ci_high: float
    level: float
    resamples: int
    seed: int
    t: float
    t_p: float
    perm_p: float
    b_better: int  # documents where B's loss is lower
    a_better: int
    ties: int
    verdict: str

    def to_dict(self) -> dict:
        return asdict(self)


def _chunks(total: int, size: int = 1000):
    for s in range(0, total, size):
        yield min(size, total - s)


def paired(
    a: Sequence[Doc], b: Sequence[Doc], *, resamples: int = 10_000, seed: int = 0, level: float = 0.95
) -> Paired:
    """The paired comparison of A and B over the same documents (see the module docstring);
    documents without scored tokens are left out."""
    match_docs(a, b)
    keep = [i for i, d in enumerate(a) if d.tokens > 0]
    n_D = np.array([a[i].tokens for i in keep], dtype=np.float64)
    la_D = np.array([a[i].loss_sum for i in keep])
    lb_D = np.array([b[i].loss_sum for i in keep])
    ca = sum(a[i].correct for i in keep)
    cb = sum(b[i].correct for i in keep)
    k, N = len(keep), float(n_D.sum())
    if k < 2:
        raise EvalError(f"compare needs at least 2 documents with scored tokens, got {k}")
    d_D = lb_D - la_D
    diff = float(d_D.sum() / N)
    rng = np.random.default_rng(seed)
    boot = []
    for size in _chunks(resamples):
        idx_RD = rng.integers(0, k, size=(size, k))
        boot.append(d_D[idx_RD].sum(1) / n_D[idx_RD].sum(1))
    boot_R = np.concatenate(boot)
    alpha = (1 - level) / 2
    lo, hi = (float(v) for v in np.quantile(boot_R, [alpha, 1 - alpha]))
    # paired t on the ratio: residuals of each document from the common rate (delta method)
    z_D = d_D - diff * n_D
    se = math.sqrt(k / (k - 1) * float((z_D**2).sum())) / N
    if se > 0:
        t = diff / se
        t_p = student_t_sf(t, k - 1)
    else:
        t, t_p = (0.0, 1.0) if diff == 0 else (math.copysign(math.inf, diff), 0.0)
    hits = 0
    observed = abs(float(d_D.sum())) * (1 - 1e-12)  # rounding: a sign pattern equal to the data counts
    for size in _chunks(resamples):
        signs_RD = rng.integers(0, 2, size=(size, k)) * 2 - 1
        hits += int((np.abs((signs_RD * d_D).sum(1)) >= observed).sum())
    perm_p = (1 + hits) / (resamples + 1)
    per_a, per_b = la_D / n_D, lb_D / n_D
    b_better = int((per_b < per_a).sum())
    a_better = int((per_a < per_b).sum())
    stats = dict(
        documents=k,
        tokens=int(N),
        loss_a=float(la_D.sum() / N),
        loss_b=float(lb_D.sum() / N),
        accuracy_a=ca / N,
        accuracy_b=cb / N,
        diff=diff,
        ci_low=lo,
        ci_high=hi,
        level=level,
        resamples=resamples,
        seed=seed,
        t=t,
        t_p=t_p,
        perm_p=perm_p,
        b_better=b_better,
        a_better=a_better,
        ties=k - a_better - b_better,
    )
    return Paired(**stats, verdict=_verdict(**stats))


def _verdict(*, diff, ci_low, ci_high, level, t_p, perm_p, documents, b_better, a_better, **_) -> str:
    ci = f"{level:.0%} CI [{ci_low:+.4f}, {ci_high:+.4f}]"
    if ci_low <= 0 <= ci_high:
        return (
            f"no difference: B - A = {diff:+.4f} nats/token, {ci} includes 0 "
            f"over {documents:,} documents (permutation p = {perm_p:.3g})" + _few(documents)
        )
    better, worse, wins = ("B", "A", b_better) if diff < 0 else ("A", "B", a_better)
    line = (
        f"{better} is better than {worse}: {abs(diff):.4f} nats/token lower loss ({ci} of B - A), "
        f"lower on {wins / documents:.0%} of {documents:,} documents"
    )
    alpha = 1 - level
    if perm_p > alpha or t_p > alpha:
        line += f" (borderline: paired t p = {t_p:.3g}, permutation p = {perm_p:.3g})"
    return line + _few(documents)


def _few(documents: int) -> str:
    # below ~20 documents a percentile bootstrap interval is rough (it is too narrow on average)
    return f" (only {documents} documents: a rough interval)" if documents < 20 else ""


# ---------------------------------------------------------------------------------------- printing


def format_table(result: EvalResult) -> str:
    """The summary table: one row per file and the overall row."""
    rows = [*result.files]
    rows.append(result.overall)
    # file names alone when they tell the files apart (the ids in --per-doc keep the whole path)
    bases = [Path(t.name).name for t in rows[:-1]]
    shown = [*(bases if len(set(bases)) == len(bases) else (_short(t.name) for t in rows[:-1])), "overall"]
    width = max(12, *map(len, shown))
    head = f"{'file':<{width}}  {'kind':<5} {'docs':>7} {'tokens':>11} {'loss':>8} {'ppl':>10} {'acc':>7}"
    lines = [head, "-" * len(head)]
    for t, name in zip(rows, shown, strict=True):
        if t is result.overall:
            lines.append("-" * len(head))
        lines.append(
            f"{name:<{width}}  {t.kind:<5} {t.documents:>7,} {t.tokens:>11,} "
            f"{t.loss:>8.4f} {t.ppl:>10.2f} {t.accuracy:>7.2%}"
        )
    return "\n".join(lines)


def _p(p: float) -> str:
    return "< 1e-300" if p == 0 else f"= {p:.3g}"  # (a float underflows below ~1e-308)


def _short(name: str, keep: int = 48) -> str:
    return name if len(name) <= keep else "..." + name[-(keep - 3) :]


def format_paired(p: Paired, label_a: str, label_b: str) -> str:
    lines = [
        f"A: {label_a}",
        f"B: {label_b}",
        f"{p.documents:,} documents, {p.tokens:,} tokens (token-weighted; documents are the paired unit)",
        f"{'':<6}{'loss':>9} {'ppl':>10} {'acc':>8}",
        f"{'A':<6}{p.loss_a:>9.4f} {math.exp(min(p.loss_a, 700)):>10.2f} {p.accuracy_a:>8.2%}",
        f"{'B':<6}{p.loss_b:>9.4f} {math.exp(min(p.loss_b, 700)):>10.2f} {p.accuracy_b:>8.2%}",
        f"B - A {p.diff:>+9.4f} nats/token, {p.level:.0%} paired bootstrap CI "
        f"[{p.ci_low:+.4f}, {p.ci_high:+.4f}] ({p.resamples:,} resamples of the documents, seed {p.seed})",
        f"paired t = {p.t:.3f} (df {p.documents - 1:,}), p {_p(p.t_p)}; sign-flip permutation p = "
        f"{p.perm_p:.3g} ({p.resamples:,} permutations, seed {p.seed})",
        f"win rate: B lower loss on {p.b_better / p.documents:.1%} of documents, A on "
        f"{p.a_better / p.documents:.1%}, ties {p.ties:,}",
        f"verdict: {p.verdict}",
    ]
    return "\n".join(lines)
