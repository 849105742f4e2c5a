"""Chat generation (``lumina.generate.Chat``, ``generate --chat``): the prompt is the conversation
rendered exactly as chat training renders it plus the assistant header; a reply ends at
``<|im_end|>``; the history is cut to the context from the oldest turns, the system prompt kept; the
CLI reads one turn per line; bad input is one line, exit 2."""

import io

import pytest
import torch
from test_cli import one_line_error
from test_generate import save_tiny

from lumina.data.chat import render
from lumina.data.tokenizer import get_tokenizer
from lumina.generate import Chat, GenerateError, Generator, Sampling, load_model
from lumina.model import apply
from lumina.run import main

GREEDY = Sampling(greedy=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    save_tiny(root, "mod_moe", vocab=50304)  # max_seq_len 128
    return root


def reply_by_argmax(params, cfg, prompt: list[int], stops: set[int], n: int, n_allowed: int) -> list[int]:
    """No cache, the whole sequence through apply for every token (ids below ``n_allowed``: those the
    tokenizer can decode), stopping at a stop id."""
    seq = list(prompt)
    for _ in range(n):
        logits, _ = apply(params, torch.tensor([seq]), cfg, train=False, mod_routing="predictor")
        nxt = int(logits[0, -1, :n_allowed].argmax())
        if nxt in stops:
            break
        seq.append(nxt)
    return seq[len(prompt) :]


def test_prompt_is_the_training_rendering_and_the_reply_the_argmax_continuation(run):
    model = load_model(run)
    tok = model.get_tokenizer()
    chat = Chat(Generator(model), system="You are terse.", max_new_tokens=6)
    first = chat.say("Hello there", GREEDY)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"}]
    header = [tok.im_start_id, *tok.encode("assistant\n")]
    prompt = render(messages, tok)[0] + header
    want = reply_by_argmax(model.params, model.cfg, prompt, {tok.im_end_id, tok.eot_id}, 6, tok.pad_id)
    assert chat.last.tokens[0] == want and first == tok.decode(want)
    assert chat.messages[-1] == {"role": "assistant", "content": first}
    chat.say("And again?", GREEDY)  # the second prompt holds the first reply as an assistant message
    assert chat.prompt_ids()[: len(prompt)] == prompt


def test_a_reply_ends_at_im_end(run):
    model = load_model(run)
    tok = model.get_tokenizer()
    chat = Chat(Generator(model), max_new_tokens=6)
    chat.say("Hi", GREEDY)
    first = chat.last.tokens[0][0]
    assert first not in (tok.im_end_id, tok.eot_id)
    # make <|im_end|> the model's favourite wherever the first reply token was: twice its head column
    params = model.params.clone()
    params["head", "weight"][:, tok.im_end_id] = 2 * params["head", "weight"][:, first]
    chat = Chat(Generator(params=params, cfg=model.cfg, tokenizer=tok), max_new_tokens=6)
    assert chat.say("Hi", GREEDY) == "" and chat.last.finish == ["eos"]


def test_history_is_cut_from_the_oldest_turn_and_keeps_the_system_prompt(run):
    model = load_model(run)
    tok = model.get_tokenizer()
    chat = Chat(Generator(model), system="Be kind.", max_new_tokens=16)
    for i in range(8):  # far more than 128 - 16 tokens in all
        chat.say(f"Question number {i} is about the weather in town today?", GREEDY)
    chat.messages.append({"role": "user", "content": "Last one."})
    ids = chat.prompt_ids()
    assert len(ids) <= model.cfg.max_seq_len - 16
    system = render(chat.messages[:1], tok)[0]
    assert ids[: len(system)] == system  # the system prompt survives
    last = render(chat.messages[-1:], tok)[0]
    assert ids[-len(last) - len(chat.header) :] == last + chat.header  # the newest turn, then the header
    assert tok.decode(ids).count("Question number") < 8  # older turns were dropped
    assert "Question number 0 " not in tok.decode(ids)
    chat.messages[-1]["content"] = "word " * 200
    with pytest.raises(GenerateError, match="needs .* tokens"):
        chat.prompt_ids()


def test_cli_reads_one_turn_per_line(run, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("How are you?\nAnd now?\n\nnot read\n"))
    argv = ["generate", str(run), "--chat", "--system", "Be brief.", "--max-new-tokens", "4", "--greedy"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    lines = cap.out.splitlines()
    assert lines[0] == "you> How are you?" and lines[1].startswith("assistant> ")
    assert lines[2] == "you> And now?" and lines[3].startswith("assistant> ")
    assert "not read" not in cap.out and cap.out.count("assistant> ") == 2 and cap.err == ""


def test_bad_chat_input_is_one_line(run, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert "--system: only with --chat" in one_line_error(
        capsys, ["generate", str(run), "--prompt", "x", "--system", "s"]
    )
    assert "needs" in one_line_error(
        capsys, ["generate", str(run), "--chat", "--prompt", "word " * 200, "--max-new-tokens", "8"]
    )
    small = tmp_path / "small"  # gpt2's 50257 ids: no room for <|im_start|> / <|im_end|>
    params, cfg = save_tiny(small, "dense", vocab=50257)
    assert "needs 50304 embedding rows" in one_line_error(capsys, ["generate", str(small), "--chat"])
    tok = get_tokenizer("gpt2")  # load_model refuses it first; the Python API checks on its own
    with pytest.raises(GenerateError, match="no room for the chat tokens"):
        Chat(Generator(params=params, cfg=cfg, tokenizer=tok))
