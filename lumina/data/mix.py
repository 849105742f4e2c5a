"""Training modes: which source (base text or chat) each step's batch comes from.

- ``base_only`` / ``finetuning_only``: one source.
- ``hybrid``: base text for the first ``hybrid_base_fraction`` of the steps, then chat. The step of the
  switch is known up front (``switch_step``) and ``next_batch`` reports the source, so the driver can
  log the switch.
- ``interleaved``: at step s the batch is base text when u(seed, s) < ratio, where u is a uniform
  draw derived from (seed, s) alone; ``ratio`` is passed in at every call, so it is a live value the
  orchestrator may change without disturbing anything else.

The whole position is ``MixState`` (plain ints, saved with the train state): the next batch is a pure
function of (seed, state, ratio), so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lumina.config import RunConfig
from lumina.data.chat import ChatRows, chitchat_split, read_conversations
from lumina.data.text import (
    DataError,
    Holdout,
    PackedText,
    expand_paths,
    holdout_cut,
    shakespeare_split,
    stable_uniform,
    text_holdout,
    tokenize_files,
)
from lumina.data.tokenizer import get_tokenizer

__all__ = ["DataMix", "MixState", "build_mix"]

Source = Literal["base", "chat"]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MixState:
    step: int = 0  # micro-batches drawn so far
    base: int = 0  # next batch position in the base-text source
    chat: int = 0  # next batch position in the chat source

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MixState:
        if set(d) != {"step", "base", "chat"} or not all(isinstance(v, int) and v >= 0 for v in d.values()):
            raise DataError(f"data position {d!r} is not a MixState (want non-negative step, base, chat)")
        return cls(**d)


@dataclass(frozen=True)
class DataMix:
    mode: Literal["base_only", "finetuning_only", "hybrid", "interleaved"]
    base: PackedText | None
    chat: ChatRows | None
    batch_size: int
    seed: int = 0
    total_steps: int = 1  # optimizer steps of the run
    hybrid_base_fraction: float = 0.7
    batches_per_step: int = 1  # micro-batches per optimizer step: all of a step's come from one source
    skipped_records: int = 0  # bad records dropped under data.on_bad_records=skip
    # One line for the log when a part of the user's train files is held out for eval (no eval files
    # given): what was held out, how, and how to choose instead. None: eval files or packaged data.
    eval_note: str | None = None

    def __post_init__(self) -> None:
        need_base = self.mode != "finetuning_only"
        need_chat = self.mode != "base_only"
        if need_base and self.base is None:
            raise DataError(f"data.mode={self.mode} needs base-text data")
        if need_chat and self.chat is None:
            raise DataError(f"data.mode={self.mode} needs chat data")

    @property
    def switch_step(self) -> int | None:
        """hybrid: the first chat step."""
        return math.ceil(self.hybrid_base_fraction * self.total_steps) if self.mode == "hybrid" else None

    def source(self, batch: int, ratio: float) -> Source:
        """The source of micro-batch number ``batch`` (decided per optimizer step)."""
        step = batch // self.batches_per_step
        if self.mode == "base_only":
            return "base"
        if self.mode == "finetuning_only":
            return "chat"
        if self.mode == "hybrid":
            return "base" if step < self.switch_step else "chat"
        return "base" if stable_uniform(f"{self.seed}/mix/{step}") < ratio else "chat"

    def next_batch(
        self, state: MixState, ratio: float = 0.5
    ) -> tuple[torch.Tensor, torch.Tensor, Source, MixState]:
        """(inputs [B, T], targets [B, T], source, next state); targets == pad_id carry no loss."""
        src = self.source(state.step, ratio)
        if self.switch_step is not None and state.step == self.switch_step * self.batches_per_step:
            log.info("data: hybrid mode switches from base text to chat at step %d", state.step)
        data = self.base if src == "base" else self.chat
        position = state.base if src == "base" else state.chat
        inputs, targets = data.batch_at(position, self.batch_size)
        advanced = {src: position + 1, "step": state.step + 1}
        return inputs, targets, src, dataclasses.replace(state, **advanced)


def build_mix(cfg: RunConfig, split: Literal["train", "eval"] = "train") -> DataMix:
    """The data of a run: the configured files, or the packaged defaults (Shakespeare for base
    text, chitchat for chat) split deterministically into train and held-out parts. Train files
    without eval files are split the same way: ``data.eval_fraction`` of their documents (.txt
    paragraphs — lines when a file has no blank lines —, .jsonl records, conversations) is held
    out by content hash, and ``eval_note`` says so."""
    d, t = cfg.data, cfg.train
    tok = get_tokenizer(d.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise DataError(
            f"tokenizer {d.tokenizer} needs {tok.vocab_size} embedding rows but model.vocab_size="
            f"{cfg.model.vocab_size}"
        )
    skipped = 0
    notes: list[str] = []

    def user_paths(train_field: str, eval_field: str, role: str) -> tuple[list[Path], str, bool] | None:
        """The configured files of this split, validated; the field they come from; whether a part
        of them is held out (train files, no eval files). None: use the packaged default."""
        nonlocal skipped
        hold_out = bool(getattr(d, train_field)) and not getattr(d, eval_field)
        field = train_field if split == "train" or hold_out else eval_field
        if not getattr(d, field):
            return None
        paths = expand_paths(getattr(d, field))
        skipped += _check_records(paths, tok, d.on_bad_records, role)
        return paths, field, hold_out

    part = 0 if split == "train" else 1
    base = chat = None
    if d.mode != "finetuning_only":
        found = user_paths("train_files", "eval_files", "text")
        if found is None:
            tokens = tokenize_files(shakespeare_split(d.eval_fraction)[part], tok)
        else:
            tokens, note = _user_text(*found, split, cfg, tok)
            notes += [note] if note else []
        base = PackedText(tokens, t.seq_len, seed=cfg.seed)
    if d.mode != "base_only":
        found = user_paths("chat_files", "chat_eval_files", "chat")
        if found is None:
            convs = chitchat_split(d.eval_fraction)[part]
        else:
            convs, note = _user_chats(*found, split, cfg, skipped)
            notes += [note] if note else []
        chat = ChatRows.build(convs, tok, t.seq_len, seed=cfg.seed)
    return DataMix(
        mode=d.mode,
        base=base,
        chat=chat,
        batch_size=t.micro_batch_size,
        seed=cfg.seed,
        total_steps=t.steps,
        batches_per_step=t.grad_accum,
        hybrid_base_fraction=d.hybrid_base_fraction,
        skipped_records=skipped,
        eval_note="; ".join(notes) or None,
    )


_HOW = "chosen by content hash (data.eval_fraction={})"
_TEXT_HINT = "pass --eval-data (data.eval_files)"
_CHAT_HINT = "set data.chat_eval_files (--eval-data with --mode finetuning_only)"


def _user_text(
    paths: list[Path], field: str, hold_out: bool, split: str, cfg: RunConfig, tok
) -> tuple[np.ndarray, str | None]:
    """The token stream of the user's text files for ``split`` (with ``hold_out``: its side of the
    content-hash split of their documents) and the note describing the split."""
    d, seq_len = cfg.data, cfg.train.seq_len
    skip, names = d.on_bad_records == "skip", _names(getattr(cfg.data, field), paths)
    holdout = held = note = None
    if hold_out:
        cut, n, k, unit = text_holdout(paths, d.eval_fraction, skip_bad=skip)
        if cut is None:
            raise DataError(_too_few(d, field, names, n, unit, _TEXT_HINT))
        holdout = Holdout(cut, split)
        held = f"held out {k} of {n} {unit}s of {names}"
        note = f"{held} for eval, {_HOW.format(d.eval_fraction)}; {_TEXT_HINT} to choose them"
    tokens = tokenize_files(paths, tok, skip_bad=skip, holdout=holdout)
    if len(tokens) < seq_len + 1:
        what, advice = f"{names}: {len(tokens)} tokens", ""
        if held is not None:
            use, more = ("eval", "raise data.eval_fraction") if split == "eval" else ("training", "add text")
            what = f"data.eval_fraction={d.eval_fraction} {held}: {len(tokens)} tokens for {use}"
            advice = f"; {more} or {_TEXT_HINT}"
        raise DataError(f"{what}, fewer than train.seq_len + 1 = {seq_len + 1}{advice}")
    return tokens, note


def _user_chats(
    paths: list[Path], field: str, hold_out: bool, split: str, cfg: RunConfig, skipped: int
) -> tuple[list, str | None]:
    """The user's conversations for ``split`` (with ``hold_out``: its side of the content-hash split)
    and the note describing the split."""
    d, names = cfg.data, _names(getattr(cfg.data, field), paths)
    convs = [c for p in paths for c in read_conversations(p, skip_bad=d.on_bad_records == "skip")]
    if not convs:  # every record was bad and skipped
        raise DataError(
            f"data.{field}: no usable conversations in {names} "
            f"({skipped} bad records skipped: data.on_bad_records=skip)"
        )
    if not hold_out:
        return convs, None
    keys = [json.dumps(c, sort_keys=True) for c in convs]
    cut, n, k = holdout_cut(keys, d.eval_fraction)
    if cut is None:
        raise DataError(_too_few(d, field, names, n, "conversation", _CHAT_HINT))
    side = Holdout(cut, split)
    note = (
        f"held out {k} of {n} conversations of {names} for eval, "
        f"{_HOW.format(d.eval_fraction)}; {_CHAT_HINT} to choose them"
    )
    return [c for c, key in zip(convs, keys, strict=True) if side.keeps(key)], note


def _names(patterns: tuple[str, ...], paths: list[Path]) -> str:
    """The files as the user gave them (a directory or glob stays one name), with the file count."""
    shown = ", ".join(patterns[:3]) + (f" and {len(patterns) - 3} more" if len(patterns) > 3 else "")
    if [str(p) for p in paths] == list(patterns):
        return shown
    return f"{shown} ({len(paths)} file{'' if len(paths) == 1 else 's'})"


def _too_few(d, field: str, names: str, n: int, unit: str, hint: str) -> str:
    what = f"{n} {unit}{'' if n == 1 else 's'}" + (" (all the same text)" if n > 1 else "")
    return (
        f"data.{field}: {names} holds {what}: too few to hold out "
        f"data.eval_fraction={d.eval_fraction} of them for eval; {hint}"
    )


_WRONG_ROLE = {  # (role the file is used in, what the file is) -> why it cannot be used there
    ("text", "chat"): "is a chat file (its records have 'messages'), not base text: pass chat files as "
    "data.chat_files (--mode finetuning_only)",
    ("chat", "text"): "is a text file, not chat: chat files are .jsonl with one "
    '{"messages": [...]} object per line; pass text as data.train_files',
}


def _check_records(paths: list[Path], tok, policy: str, role: str) -> int:
    """Validate user files before use in ``role`` ("text" or "chat"): a file of the other kind is
    refused. ``stop``: raise listing the first 10 errors, one per line; ``skip``: the number of bad
    records that will be dropped (a file-level error still stops)."""
    from lumina.data.validate import validate_file

    reports = [validate_file(p, tok, count_tokens=False) for p in paths]
    for r in reports:
        if r.lengths and r.kind != role:  # usable records, of the wrong kind
            raise DataError(f"{r.path}: {_WRONG_ROLE[role, r.kind]}")
    errors = [e for r in reports for e in r.errors]
    if not errors:
        return 0
    if policy == "skip" and all(e.line is not None for e in errors):
        return len(errors)
    shown = "\n".join(f"  {e}" for e in errors[:10])
    more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
    raise DataError(
        f"{len(errors)} bad records (data.on_bad_records={policy}; "
        f"`python -m lumina.run validate` lists all):\n{shown}{more}"
    )
