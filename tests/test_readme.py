"""The README and docs/*.md stay true: every ```python block runs (in a temporary folder), the named
examples print what they say, every ```toml block resolves as a config, the preset table is current,
every relative link (here and in benchmarks/README.md) points to an existing file and heading, and
the README stays short.

A block is named by an HTML comment on the line before its fence, ``<!-- readme-example:NAME -->``
(``CHECKS`` holds extra assertions per name). ``<!-- not-run: REASON -->`` there exempts a block;
keep that rare.
"""

import dataclasses
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 310

# a fenced block, possibly indented (inside a list item): its indent, language and body
_FENCE = re.compile(r"^( *)```([\w-]*)\n(.*?)^\1```[ \t]*$", re.S | re.M)
_MARKER = re.compile(r"<!-- (?:readme-example:([\w-]+)|not-run: ([^>]*\S)) -->")


@dataclasses.dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    name: str | None  # readme-example:NAME
    not_run: str | None  # the reason given in not-run: REASON

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def _blocks(page: Path) -> list[Block]:
    text = page.read_text()
    out = []
    for m in _FENCE.finditer(text):
        indent, lang, body = m.groups()
        code = "".join(line.removeprefix(indent) for line in body.splitlines(keepends=True))
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _MARKER.fullmatch(before.strip())
        name, not_run = marker.groups() if marker else (None, None)
        out.append(Block(page, text.count("\n", 0, m.start()) + 1, lang, code, name, not_run))
    return out


BLOCKS = [b for page in PAGES for b in _blocks(page)]
PYTHON = [b for b in BLOCKS if b.lang == "python"]


def _run(block: Block, tmp_path: Path, monkeypatch) -> dict:
    """Execute ``block`` with the working directory in ``tmp_path``; its globals afterwards."""
    monkeypatch.chdir(tmp_path)
    scope = {"__name__": "__snippet__"}
    exec(compile(block.code, str(block.page), "exec"), scope)
    return scope


# ------------------------------------------------------------------------ per-example assertions


def _init_apply(block: Block, scope: dict, out: str) -> None:
    assert len(block.code.strip().splitlines()) <= 15
    assert re.fullmatch(r"loss \d+\.\d{3}, grad of wq \(128, 128\)\n", out)


def _train_loop(block: Block, scope: dict, out: str) -> None:
    losses = [float(line.split()[-1]) for line in out.splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0]


def _orchestrator(block: Block, scope: dict, out: str) -> None:
    lines = out.splitlines()
    # at step 1 there is no snapshot two steps back to roll back to, so the LR must come down instead
    assert lines[0].startswith(
        "[ORCH] step 1 emergency_lr_cut 1 -> 0.1 (L4 critical, conf 1.00): non-finite loss"
    )
    assert lines[1] == "lr_scale 0.1, lr 2.50e-05"


def _base_text(block: Block, scope: dict, out: str) -> None:
    assert tuple(scope["inputs_BT"].shape) == (16, 128)
    assert (scope["inputs_BT"][:, 1:] == scope["targets_BT"][:, :-1]).all()


def _chat(block: Block, scope: dict, out: str) -> None:
    assert tuple(scope["targets_BT"].shape) == (8, 128)
    from lumina.data import get_tokenizer

    targets = scope["targets_BT"]
    pad = get_tokenizer("gpt2").pad_id
    assert (targets == pad).any() and (targets != pad).any()  # masked and trained targets both occur


def _hf_llama(block: Block, scope: dict, out: str) -> None:
    assert out == "2 layers, d_model 64, 4/2 heads\n"
    assert set(scope["model"].state_dict()) >= set(scope["state_dict"])


CHECKS = {
    "init-apply": _init_apply,
    "train-loop": _train_loop,
    "orchestrator": _orchestrator,
    "base-text": _base_text,
    "chat": _chat,
    "hf-llama": _hf_llama,
}


@pytest.mark.parametrize("block", [b for b in PYTHON if b.not_run is None], ids=lambda b: b.where)
def test_python_block_runs(block, tmp_path, monkeypatch, capsys):
    scope = _run(block, tmp_path, monkeypatch)
    out = capsys.readouterr().out
    if block.name in CHECKS:
        CHECKS[block.name](block, scope, out)


def test_every_named_example_exists_once():
    names = [b.name for b in PYTHON if b.name]
    assert sorted(names) == sorted(CHECKS), "each CHECKS entry needs exactly one named python block"


def test_exemptions_are_rare_and_give_a_reason():
    exempt = [b.where for b in PYTHON if b.not_run is not None]
    assert len(exempt) <= 2, exempt
    assert all(b.not_run.strip() for b in PYTHON if b.not_run is not None)


def test_blocks_are_found():
    # the fence parser must see every fence: an odd count would mean a block was mis-paired
    for page in PAGES:
        fences = re.findall(r"^ *```", page.read_text(), re.M)
        assert len(fences) == 2 * sum(b.page == page for b in BLOCKS), page


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "toml"], ids=lambda b: b.where)
def test_toml_block_resolves(block, tmp_path):
    from lumina.configure import load_config

    path = tmp_path / "run.toml"
    path.write_text(block.code)
    load_config(config_file=str(path))


def test_preset_table_is_current():
    from lumina import presets

    assert presets.table("markdown") in README.read_text()


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move detail to docs/"


# --------------------------------------------------------------------------------------- links


def _prose(text: str) -> str:
    """``text`` without fenced blocks and inline code (links and headings there are not links)."""
    text = _FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text())
    return {_slug(m) for m in re.findall(r"^#{1,6} +(.+?) *$", text, re.M)}


def _links(page: Path) -> list[str]:
    return re.findall(r"\]\(([^()\s]+)\)", _prose(page.read_text()))


LINK_PAGES = [*PAGES, ROOT / "benchmarks" / "README.md"]
LINKS = sorted(
    {(page, target) for page in LINK_PAGES for target in _links(page) if not re.match(r"[a-z]+:", target)}
)


def test_pages_link_to_each_other():
    linked = {(README.parent / t.split("#")[0]).resolve() for p, t in LINKS if p == README}
    assert set(PAGES[1:]) <= linked, "README.md must link every docs/*.md page"
    assert len(LINKS) > 20


@pytest.mark.parametrize("page, target", LINKS, ids=[f"{p.relative_to(ROOT)}->{t}" for p, t in LINKS])
def test_relative_link_resolves(page, target):
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    assert dest.exists(), f"{page.relative_to(ROOT)}: link to missing {path}"
    assert dest.is_relative_to(ROOT)
    if anchor:
        assert dest.suffix == ".md", f"{target}: anchor into a non-Markdown file"
        assert anchor in _anchors(dest), (
            f"{page.relative_to(ROOT)}: no heading #{anchor} in {path or page.name}"
        )
