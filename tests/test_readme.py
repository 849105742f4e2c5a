import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(marker: str) -> str:
    m = re.search(rf"<!-- {re.escape(marker)} -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert m, f"README block {marker!r} not found"
    return m.group(1)


def test_init_apply_example_runs_verbatim(capsys):
    code = _block("readme-example:init-apply")
    assert len(code.strip().splitlines()) <= 15
    exec(compile(code, "README.md", "exec"), {})
    assert re.fullmatch(r"loss \d+\.\d{3}, grad of wq \(128, 128\)\n", capsys.readouterr().out)


def test_preset_table_is_current():
    from lumina import presets

    assert presets.table("markdown") in README.read_text()


def test_base_text_example_runs_verbatim():
    code = re.search(r"## Base-text data\n.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert tuple(scope["inputs_BT"].shape) == (16, 128)
    assert (scope["inputs_BT"][:, 1:] == scope["targets_BT"][:, :-1]).all()


def test_chat_example_runs_verbatim():
    code = re.search(r"## Chat data\n.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert tuple(scope["targets_BT"].shape) == (8, 128)


def test_train_loop_snippet_runs_verbatim(capsys):
    exec(compile(_block("readme-example:train-loop"), "README.md", "exec"), {})
    losses = [float(line.split()[-1]) for line in capsys.readouterr().out.splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_orchestrator_example_runs_verbatim(capsys):
    exec(compile(_block("readme-example:orchestrator"), "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    # at step 1 there is no snapshot two steps back to roll back to, so the LR must come down instead
    assert out[0].startswith(
        "[ORCH] step 1 emergency_lr_cut 1 -> 0.1 (L4 critical, conf 1.00): non-finite loss"
    )
    assert out[1] == "lr_scale 0.1, lr 2.50e-05"
