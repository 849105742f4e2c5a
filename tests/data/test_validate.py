"""The validator and the data policy against a corpus of malformed files."""

import dataclasses
import json
import subprocess
import sys

import pytest

from lumina import presets, run
from lumina.configure import load_config
from lumina.data.mix import build_mix
from lumina.data.text import DataError

GOOD = json.dumps(
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
)
MALFORMED = {  # name -> (content, expected "line: error: message" fragment)
    "truncated.jsonl": (GOOD + '\n{"messages": [{"role": "user", "content": "cut', ":2: error: invalid JSON"),
    "wrong_types.jsonl": (
        GOOD + '\n{"messages": "not a list"}\n',
        ":2: error: 'messages' must be a non-empty list",
    ),
    "missing_role.jsonl": ('{"messages": [{"content": "x"}]}\n', ":1: error: message 0 has no 'role'"),
    "unknown_role.jsonl": (
        '{"messages": [{"role": "robot", "content": "x"}]}\n',
        ":1: error: message 0 has unknown role",
    ),
    "order.jsonl": (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}\n',
        ":1: error: message 1: roles out of order",
    ),
    "empty_content.jsonl": (
        '{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "b"}]}\n',
        ":1: error: message 0 has empty content",
    ),
    "bad_utf8.jsonl": (GOOD.encode() + b"\n" + b'{"text": "caf\xe9"}\n', ":2: error: invalid UTF-8"),
    "bad_utf8.txt": (b"line one\nline \xff two\n", ":2: error: invalid UTF-8"),
    "empty.txt": (b"", ": error: empty file: no documents"),
    "empty.jsonl": (b"\n\n", ": error: empty file: no records"),
}


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_each_malformed_file_is_one_line_and_exit_2(tmp_path, capsys, name):
    content, fragment = MALFORMED[name]
    path = write(tmp_path, name, content)
    assert run.main(["validate", str(path)]) == 2
    out = capsys.readouterr().out.splitlines()
    problems = [line.strip() for line in out if ": error: " in line]
    assert len(problems) == 1 and problems[0].startswith(str(path))
    assert fragment in problems[0], problems


def test_fifty_megabyte_single_line(tmp_path, capsys):
    path = tmp_path / "huge.jsonl"
    with path.open("w") as f:
        f.write('{"text": "' + "lorem ipsum dolor sit amet " * 2_000_000)  # 54 MB, never closed
    assert run.main(["validate", str(path)]) == 2
    assert f"{path}:1: error: invalid JSON" in capsys.readouterr().out


def test_warnings_do_not_fail(tmp_path, capsys):
    bom = write(tmp_path, "bom.jsonl", b"\xef\xbb\xbf" + GOOD.encode() + b"\r\n" + GOOD.encode() + b"\r\n")
    assert run.main(["validate", str(bom)]) == 0
    out = capsys.readouterr().out
    assert f"{bom}:1: warning: UTF-8 byte-order mark" in out
    assert f"{bom}:2: warning: duplicate of line 1" in out
    assert "CRLF line ends" in out
    assert "chat, 2 conversations" in out
    crlf = write(tmp_path, "crlf.txt", b"one\r\ntwo\r\n")
    assert run.main(["validate", str(crlf)]) == 0
    assert f"{crlf}: warning: CRLF line ends" in capsys.readouterr().out
    # --strict: every malformed-corpus file, BOM and CRLF included, exits 2.
    assert run.main(["validate", "--strict", str(bom)]) == 2
    assert run.main(["validate", "--strict", str(crlf)]) == 2
    assert capsys.readouterr().out.splitlines()[-1] == "1 files, 0 errors, 1 warnings (--strict)"


def test_packaged_data_reports_counts_and_exits_0():
    r = subprocess.run([sys.executable, "-m", "lumina.run", "validate"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1] == "43 files, 0 errors"
    chat = next(line for line in lines if "dataset.json" in line)
    assert "chat, 4,013 conversations" in chat and "; ok" in chat


def test_training_data_policy_stop_and_skip(tmp_path):
    lines = [GOOD] + ['{"messages": [{"role": "robot", "content": "x"}]}'] * 12 + [GOOD]
    chats = write(tmp_path, "chats.jsonl", "\n".join(lines) + "\n")
    evals = write(tmp_path, "eval.jsonl", GOOD + "\n")
    args = ["--data.mode=finetuning_only", f"--data.chat_files={chats}", f"--data.chat_eval_files={evals}"]
    with pytest.raises(DataError) as e:
        build_mix(load_config(overrides=args))
    msg = str(e.value).splitlines()
    assert msg[0].startswith("12 bad records (data.on_bad_records=stop")
    assert len(msg) == 12 and msg[1].strip().startswith(f"{chats}:2: error: message 0 has unknown role")
    assert msg[-1].strip() == "... and 2 more"
    mix = build_mix(load_config(overrides=[*args, "--data.on_bad_records=skip"]))
    assert mix.skipped_records == 12 and len(mix.chat.tokens) == 2


def test_cli_reports_data_errors_in_one_line_per_error(tmp_path):
    bad = write(tmp_path, "bad.jsonl", '{"text": 1}\n')
    r = subprocess.run(
        [sys.executable, "-m", "lumina.run", "validate", str(bad), str(tmp_path / "missing.txt")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{bad}:1: error: expected 'messages' (chat) or a string 'text'" in r.stdout
    assert f"{tmp_path / 'missing.txt'}: error: no such file" in r.stdout


def test_bom_only_file_is_empty_in_both_validation_modes(tmp_path):
    from lumina.data import get_tokenizer
    from lumina.data.validate import validate_file

    path = write(tmp_path, "bom_only.txt", b"\xef\xbb\xbf")
    for count_tokens in (True, False):
        report = validate_file(path, get_tokenizer("gpt2"), count_tokens=count_tokens)
        assert [p.message for p in report.errors] == ["empty file: no documents"], count_tokens


def config(**data):
    """The debug preset with ``data`` fields replaced (no CLI parsing involved)."""
    base = presets.get("debug")
    return dataclasses.replace(base, data=dataclasses.replace(base.data, **data))


TEXT_EVAL = "A held-out line of plain text for the eval split. " * 40
# Files validate must call errors because training refuses them: name -> (content, role, fragment)
REFUSED = {
    "blank.txt": (" \n\t\n   \r\n", "text", "empty file: no documents"),
    "empty.jsonl": ("\n\n", "text", "empty file: no records"),
    "blank_records.jsonl": ('{"text": "  "}\n{"text": ""}\n', "text", "no text: every record is empty"),
    "one_speaker.jsonl": (
        '{"messages": [{"role": "user", "content": "anyone there?"}]}\n' * 3,
        "chat",
        "no assistant message",
    ),
    "mixed_as_chat.jsonl": (GOOD + '\n{"text": "plain"}\n', "chat", "a text record in a chat file"),
    "mixed_as_text.jsonl": ('{"text": "plain"}\n' + GOOD + "\n", "text", "a chat record in a text file"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_validate_errors_exactly_where_training_refuses(tmp_path, capsys, name):
    content, role, fragment = REFUSED[name]
    path = write(tmp_path, name, content)
    assert run.main(["validate", str(path)]) == 2
    errors = [line.strip() for line in capsys.readouterr().out.splitlines() if ": error: " in line]
    assert errors and errors[0].startswith(str(path)) and fragment in errors[0], errors
    if role == "text":
        evals = write(tmp_path, "eval.txt", TEXT_EVAL)
        cfg = config(train_files=(str(path),), eval_files=(str(evals),))
    else:
        evals = write(tmp_path, "eval.jsonl", GOOD + "\n")
        cfg = config(mode="finetuning_only", chat_files=(str(path),), chat_eval_files=(str(evals),))
    with pytest.raises(DataError) as e:
        build_mix(cfg, "train")
    assert str(path) in str(e.value) and fragment in str(e.value)


def test_a_file_in_the_wrong_role_is_one_line_naming_it(tmp_path):
    chats = write(tmp_path, "chats.jsonl", GOOD + "\n")
    prose = write(tmp_path, "prose.txt", TEXT_EVAL)
    texts = write(tmp_path, "texts.jsonl", json.dumps({"text": TEXT_EVAL}) + "\n")
    chat_mode = {"mode": "finetuning_only", "chat_eval_files": (str(chats),)}
    for cfg, path, fragment in (
        (config(train_files=(str(chats),), eval_files=(str(prose),)), chats, "is a chat file"),
        (config(chat_files=(str(prose),), **chat_mode), prose, "is a text file"),
        (config(chat_files=(str(texts),), **chat_mode), texts, "is a text file"),
    ):
        with pytest.raises(DataError) as e:
            build_mix(cfg, "train")
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{path}: ") and fragment in msg, msg


def test_skipping_every_record_names_the_files(tmp_path):
    bad = write(tmp_path, "bad.jsonl", '{"messages": [{"role": "robot", "content": "x"}]}\n' * 3)
    evals = write(tmp_path, "eval.jsonl", GOOD + "\n")
    cfg = config(
        mode="finetuning_only", chat_files=(str(bad),), chat_eval_files=(str(evals),), on_bad_records="skip"
    )
    with pytest.raises(DataError, match=f"^data.chat_files: no usable conversations in {bad} "):
        build_mix(cfg, "train")


def test_directories_are_their_data_files_in_validate_and_training(tmp_path):
    from lumina.data import get_tokenizer
    from lumina.data.validate import validate_paths

    chats, held_out, empty = tmp_path / "chats", tmp_path / "held_out", tmp_path / "empty"
    (chats / "more").mkdir(parents=True)
    held_out.mkdir()
    empty.mkdir()
    write(chats, "a.jsonl", GOOD + "\n")
    write(chats / "more", "b.jsonl", GOOD.replace("hello", "hello there") + "\n" + GOOD + "\n")
    write(chats, "readme.md", "not data")
    write(held_out, "eval.jsonl", GOOD + "\n")
    reports = validate_paths([str(chats), str(empty), str(tmp_path / "missing")], get_tokenizer("gpt2"))
    nothing = [f"{empty}: error: a directory with no data files (.txt or .jsonl, searched recursively)"]
    assert [(r.path, len(r.lengths), [str(p) for p in r.problems]) for r in reports] == [
        (str(chats / "a.jsonl"), 1, []),
        (str(chats / "more" / "b.jsonl"), 2, []),
        (str(empty), 0, nothing),
        (str(tmp_path / "missing"), 0, [f"{tmp_path / 'missing'}: error: no such file"]),
    ]
    cfg = config(mode="finetuning_only", chat_files=(str(chats),), chat_eval_files=(f"{held_out}/",))
    assert len(build_mix(cfg, "train").chat.tokens) == 3 and len(build_mix(cfg, "eval").chat.tokens) == 1
    with pytest.raises(DataError, match=f"^{empty}: a directory with no data files"):
        build_mix(
            dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, chat_eval_files=(str(empty),))),
            "eval",
        )
