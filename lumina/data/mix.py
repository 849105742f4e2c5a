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
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from lumina.config import RunConfig
from lumina.data.chat import ChatRows, chitchat_split, read_conversations
from lumina.data.text import (
    DataError,
    PackedText,
    expand_paths,
    shakespeare_split,
    stable_uniform,
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
    text, chitchat for chat) split deterministically into train and held-out parts."""
    d, t = cfg.data, cfg.train
    tok = get_tokenizer(d.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise DataError(
            f"tokenizer {d.tokenizer} needs {tok.vocab_size} embedding rows but model.vocab_size="
            f"{cfg.model.vocab_size}"
        )
    skip = d.on_bad_records == "skip"
    skipped = 0

    def user_paths(train_field: str, eval_field: str, role: str) -> list[Path] | None:
        """The configured files of this split, validated (None: use the packaged default)."""
        nonlocal skipped
        files = getattr(d, train_field if split == "train" else eval_field)
        if not files:
            if split == "eval" and getattr(d, train_field):
                raise DataError(
                    f"data.{eval_field}: set them when data.{train_field} is set (no default split)"
                )
            return None
        paths = expand_paths(files)
        skipped += _check_records(paths, tok, d.on_bad_records, role)
        return paths

    part = 0 if split == "train" else 1
    base = chat = None
    if d.mode != "finetuning_only":
        paths = user_paths("train_files", "eval_files", "text") or shakespeare_split(d.eval_fraction)[part]
        base = PackedText(tokenize_files(paths, tok, skip_bad=skip), t.seq_len, seed=cfg.seed)
    if d.mode != "base_only":
        paths = user_paths("chat_files", "chat_eval_files", "chat")
        if paths is None:
            convs = chitchat_split(d.eval_fraction)[part]
        else:
            convs = [c for p in paths for c in read_conversations(p, skip_bad=skip)]
            if not convs:  # every record was bad and skipped
                field = "chat_files" if split == "train" else "chat_eval_files"
                raise DataError(
                    f"data.{field}: no usable conversations in {', '.join(map(str, paths))} "
                    f"({skipped} bad records skipped: data.on_bad_records=skip)"
                )
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
