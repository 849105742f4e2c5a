"""The validator and the data policy against a corpus of malformed files."""

import json
import subprocess
import sys

import pytest

from lumina import run
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
