"""Chat data: conversations -> ChatML token rows with loss only on the assistant's tokens.

Legend: B batch, T sequence length.

Every message renders as ``<|im_start|>{role}\\n{content}<|im_end|>\\n``. Training targets are the
next tokens; a target carries loss only when it is part of an assistant message's content or that
message's ``<|im_end|>`` (the role header and the other speakers' tokens do not). **Targets equal to
``pad_id`` carry no loss**: one convention for both masking and padding, safe because ``pad_id`` is
not a token of the vocabulary (so no real token can ever be masked by accident).

Each row holds one conversation, right-padded with ``pad_id`` to T + 1 tokens, so attention never
crosses from one conversation into another (causal attention never looks right, into the padding).
Too-long conversations keep their system message and drop the oldest turns (and a leading assistant
turn, so the context starts with the user) until they fit; a single turn longer than the row is cut.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lumina.data.text import DataError, iter_json_lines, sample_ids, stable_uniform
from lumina.data.tokenizer import Tokenizer, package_file

__all__ = [
    "ChatRows",
    "check_conversation",
    "chitchat_conversations",
    "chitchat_split",
    "read_conversations",
    "render",
    "truncate",
]

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


def check_conversation(messages) -> str | None:
    """Why a conversation cannot be used, or None."""
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    previous = None
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"message {i} is not an object"
        if "role" not in m:
            return f"message {i} has no 'role'"
        if not isinstance(m["role"], str) or m["role"] not in ROLES:
            return f"message {i} has unknown role {m['role']!r} (use system, user, assistant)"
        if not isinstance(m.get("content"), str):
            return f"message {i} needs a string 'content'"
        if m["role"] == "system" and i != 0:
            return f"message {i}: a system message may only come first"
        if m["role"] == previous:
            return f"message {i}: roles out of order (two {m['role']} messages in a row)"
        if not m["content"].strip():
            return f"message {i} has empty content"
        previous = m["role"]
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message (nothing to learn from)"
    return None


def read_conversations(path: Path, *, skip_bad: bool = False) -> list[list[Message]]:
    """JSONL, one ``{"messages": [{"role", "content"}, ...], "conversation_id"?: ...}`` per line.
    A bad record raises ``DataError`` naming ``file:line``, or is dropped with ``skip_bad``."""
    out = []
    for lineno, record in iter_json_lines(path):
        if not isinstance(record, DataError):
            why = (
                check_conversation(record.get("messages"))
                if isinstance(record, dict)
                else "expected an object"
            )
            if why is None:
                out.append([{"role": m["role"], "content": m["content"]} for m in record["messages"]])
                continue
            record = DataError(f"{path}:{lineno}: {why}")
        if not skip_bad:
            raise record
    return out


def _chitchat_by_id() -> list[tuple[str, list[Message]]]:
    path = package_file("chitchat_dataset", "dataset.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    out, seen = [], set()
    for chat_id, chat in sorted(data.items()):
        turns: list[tuple[str, list[str]]] = []
        for group in chat.get("messages", []):
            for msg in group:
                text, sender = msg.get("text", "").strip(), msg.get("sender")
                if not text:
                    continue
                if turns and turns[-1][0] == sender:
                    turns[-1][1].append(text)
                else:
                    turns.append((sender, [text]))
        speakers = list(dict.fromkeys(s for s, _ in turns))
        if len(speakers) != 2:
            continue
        role = {speakers[0]: "user", speakers[1]: "assistant"}
        conv = [{"role": role[s], "content": "\n".join(texts)} for s, texts in turns]
        key = json.dumps(conv, sort_keys=True)
        if key not in seen:  # 4 exact duplicates: dropped so the held-out part never repeats training
            seen.add(key)
            out.append((chat_id, conv))
    return out


def chitchat_conversations() -> list[list[Message]]:
    """The 7,168 human chats of the ``chitchat-dataset`` package: the first speaker becomes the user,
    the second the assistant; consecutive messages of one speaker are merged (newline-joined);
    chats with a single speaker and exact duplicates are dropped (4,013 remain). Sorted by id."""
    return [conv for _, conv in _chitchat_by_id()]


def chitchat_split(eval_fraction: float = 0.05) -> tuple[list[list[Message]], list[list[Message]]]:
    """(train, held-out) chitchat conversations: the held-out ones are those whose id hashes below
    ``eval_fraction`` of the hash range (deterministic, independent of the others)."""
    train, held_out = [], []
    for chat_id, conv in _chitchat_by_id():
        (held_out if stable_uniform(chat_id) < eval_fraction else train).append(conv)
    return train, held_out


def _render_message(m: Message, tok: Tokenizer) -> tuple[list[int], list[bool]]:
    header = [tok.im_start_id, *tok.encode(f"{m['role']}\n")]
    body = [*tok.encode(m["content"]), tok.im_end_id]
    newline = tok.encode("\n")
    trained = [False] * len(header) + [m["role"] == "assistant"] * len(body) + [False] * len(newline)
    return header + body + newline, trained


def _join(pieces: list[tuple[list[int], list[bool]]]) -> tuple[list[int], list[bool]]:
    return [i for ids, _ in pieces for i in ids], [t for _, mask in pieces for t in mask]


def render(messages: list[Message], tok: Tokenizer) -> tuple[list[int], list[bool]]:
    """ChatML token ids and, per token, whether it is trained (assistant content and its <|im_end|>)."""
    return _join([_render_message(m, tok) for m in messages])


def truncate(messages: list[Message], tok: Tokenizer, max_tokens: int) -> tuple[list[int], list[bool]]:
    """Render, dropping the oldest non-system turns until the conversation fits ``max_tokens``.
    Each message is tokenised once; dropping works on their lengths."""
    pieces = [_render_message(m, tok) for m in messages]
    n_system = 1 if messages[0]["role"] == "system" else 0
    start, total = n_system, sum(len(ids) for ids, _ in pieces)
    while total > max_tokens and len(pieces) - start > 1:
        total -= len(pieces[start][0])
        start += 1
        while len(pieces) - start > 1 and messages[start]["role"] == "assistant":  # start with the user
            total -= len(pieces[start][0])
            start += 1
    ids, trained = _join(pieces[:n_system] + pieces[start:])
    return ids[:max_tokens], trained[:max_tokens]


@dataclass(frozen=True)
class ChatRows:
    """One conversation per row; batches addressed by (seed, position) like ``PackedText``."""

    tokens: np.ndarray  # [N, T + 1] int64, right-padded with pad_id
    trained: np.ndarray  # [N, T + 1] bool
    pad_id: int
    seed: int = 0

    @classmethod
    def build(
        cls, conversations: list[list[Message]], tok: Tokenizer, seq_len: int, seed: int = 0
    ) -> ChatRows:
        if not conversations:
            raise DataError("no conversations")
        tokens = np.full((len(conversations), seq_len + 1), tok.pad_id, dtype=np.int64)
        trained = np.zeros((len(conversations), seq_len + 1), dtype=bool)
        for i, conv in enumerate(conversations):
            ids, mask = truncate(conv, tok, seq_len + 1)
            tokens[i, : len(ids)] = ids
            trained[i, : len(mask)] = mask
        return cls(tokens, trained, tok.pad_id, seed)

    def batch_at(self, position: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs [B, T], targets [B, T]); targets are ``pad_id`` wherever no loss is wanted."""
        rows = sample_ids(len(self.tokens), self.seed, position, batch_size)
        tokens = torch.from_numpy(self.tokens[rows])
        trained = torch.from_numpy(self.trained[rows])
        targets = torch.where(trained[:, 1:], tokens[:, 1:], self.pad_id)
        return tokens[:, :-1], targets
