import json

import pytest
import torch

from lumina.config import ModelConfig
from lumina.data import get_tokenizer
from lumina.data.chat import ChatRows, chitchat_conversations, read_conversations, render, truncate
from lumina.data.text import DataError
from lumina.model import apply, init

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue!"},
]


@pytest.fixture
def tok():
    return get_tokenizer("gpt2")


def test_chatml_rendering(tok):
    ids, trained = render(CONV, tok)
    assert tok.encoding.decode(ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
        "<|im_start|>assistant\nBlue!<|im_end|>\n"
    )
    assert len(trained) == len(ids)


def test_exactly_the_assistant_tokens_carry_loss(tok):
    rows = ChatRows.build([CONV], tok, seq_len=64)
    inputs, targets = rows.batch_at(0, 1)
    carried = targets[targets != tok.pad_id].tolist()
    # "!" is GPT-2 id 0: it must be trained like any other token (the old pad-id-0 bug masked it).
    assert carried == [*tok.encode("Hello!"), tok.im_end_id, *tok.encode("Blue!"), tok.im_end_id]
    assert 0 in carried
    # Every trained target is the next input token: shifted once.
    pos = (targets[0] != tok.pad_id).nonzero().squeeze(1)
    assert torch.equal(inputs[0, pos[:-1] + 1], targets[0, pos[:-1]])


def test_truncation_keeps_system_and_drops_oldest_turns(tok):
    full, _ = render(CONV, tok)
    ids, trained = truncate(CONV, tok, max_tokens=len(full) - 1)
    text = tok.encoding.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a colour.")
    assert "Hello!" not in text and text.endswith("Blue!<|im_end|>\n")
    ids, _ = truncate(CONV[:3], tok, max_tokens=5)  # one turn longer than the row: cut
    assert len(ids) == 5


def test_rows_are_one_conversation_right_padded(tok):
    convs = [
        CONV,
        CONV[1:3],
        [{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "ok"}],
    ]
    rows = ChatRows.build(convs, tok, seq_len=40)
    assert rows.tokens.shape == (3, 41)
    for row in rows.tokens:
        assert list(row).count(tok.im_start_id) >= 1
        real = row != tok.pad_id
        first_pad = int(real.argmin()) if not real.all() else len(row)
        assert not real[first_pad:].any()  # padding only at the end


def test_padding_never_reaches_real_tokens():
    """Causal attention looks left only: whatever sits in the padding cannot change the logits of
    the conversation's tokens, so nothing crosses from one sample into another."""
    tok = get_tokenizer("gpt2")
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2, ffn_multiple_of=16)
    params = init(cfg, seed=0)
    rows = ChatRows.build([CONV[1:3]], tok, seq_len=32)
    inputs, _ = rows.batch_at(0, 1)
    n_real = int((inputs[0] != tok.pad_id).sum())
    other = inputs.clone()
    other[0, n_real:] = torch.randint(0, 50000, (32 - n_real,))  # another conversation's tokens
    a, _ = apply(params, inputs, cfg)
    b, _ = apply(params, other, cfg)
    torch.testing.assert_close(a[0, :n_real], b[0, :n_real], atol=0, rtol=0)


@pytest.mark.parametrize(
    "record, message",
    [
        ('{"messages": [{"role": "bot", "content": "x"}]}', "unknown role 'bot'"),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}',
            "a system message may only come first",
        ),
        (
            '{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "b"}]}',
            "message 0 has empty content",
        ),
        ('{"messages": [{"role": "user", "content": "only me"}]}', "no assistant message"),
        ('{"messages": [{"role": "user"}]}', "message 0 needs a string 'content'"),
        ('{"messages": []}', "'messages' must be a non-empty list"),
        ('{"messages": [{"role": "us', "invalid JSON"),
    ],
)
def test_bad_conversations_name_file_and_line(tmp_path, record, message):
    good = json.dumps({"messages": CONV})
    path = tmp_path / "chats.jsonl"
    path.write_text(good + "\n" + record + "\n")
    with pytest.raises(DataError, match=f"chats.jsonl:2: .*{message}"):
        read_conversations(path)


def test_chitchat_default_data():
    convs = chitchat_conversations()
    assert len(convs) == 4013  # 7,168 chats minus 3,151 with a single speaker and 4 exact duplicates
    for conv in convs[:500]:
        roles = [m["role"] for m in conv]
        assert roles[0] == "user" and set(roles) == {"user", "assistant"}
        assert all(a != b for a, b in zip(roles, roles[1:], strict=False))  # merged: speakers alternate
