"""Evaluation and comparison (lumina.evaluate, `python -m lumina.run eval / compare`) and the lm_eval
adapter (lumina.lm_eval_adapter), on real data (Shakespeare stanzas, chitchat conversations) with the
gpt2 tokenizer and a tiny MoE + MoD model trained for a few steps.

- eval's per-document and overall losses equal training's own eval_step on the same windows, with the
  documents found independently (a regex over the file text, byte offsets of tokens);
- the default data is the token stream / chat rows training's held-out eval builds (build_mix);
- chat counts assistant tokens only; per-document files round-trip;
- compare: a model against itself gives 0 and "no difference", against its random initialisation a
  clear difference; the statistics match hand computations on synthetic numbers;
- the lm_eval adapter: its log-likelihoods equal a direct forward, and lm_eval runs a local task;
- bad input: one line, exit 2."""

import contextlib
import dataclasses
import importlib
import io
import itertools
import json
import math
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from test_cli import one_line_error

from lumina import checkpoint
from lumina import evaluate as ev
from lumina.checkpoint import save_checkpoint
from lumina.config import RunConfig, from_dict
from lumina.data.chat import chitchat_split, render
from lumina.data.mix import build_mix
from lumina.data.text import package_file
from lumina.generate import load_model
from lumina.model import apply, init
from lumina.run import main
from lumina.step import eval_step

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--model.d_model=32",
    "--model.n_heads=2",
    "--model.n_kv_heads=1",
    "--model.moe.d_expert=32",
    "--model.max_seq_len=64",
    "--train.seq_len=32",
    "--train.batch_size=4",
    "--train.micro_batch_size=4",
    "--train.eval_batches=0",
    "--train.log_every=100",
    "--train.warmup_steps=1",
    "--train.lr=1e-2",
    "--train.compile=false",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(a run trained for 6 steps: the debug preset's MoE + MoD hybrid, tiny; the same model at its
    random initialisation, saved as a run folder)."""
    root = tmp_path_factory.mktemp("runs")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["--steps", "6", "--run-dir", str(root), "--name", "good", *TINY]) == 0
    good = root / "good"
    meta = checkpoint.read_meta(checkpoint.latest(good))
    cfg = from_dict(RunConfig, meta["config"])
    state = TensorDict({"params": init(cfg.model, seed=123), "step": torch.tensor(0)}, batch_size=[])
    save_checkpoint(root / "init", state, step=0, config=meta["config"], data={})
    return good, root / "init"


def stanzas() -> list[str]:
    text = package_file("shksprdata", "texts/lovers_complaint_gut.txt").read_text(encoding="utf-8")
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()][3:]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Real text: 6 stanzas as a .txt (paragraphs), 4 more as .jsonl records; 4 real chats."""
    d = tmp_path_factory.mktemp("data")
    s = stanzas()
    (d / "poem.txt").write_text("\n\n".join(s[:6]) + "\n", encoding="utf-8")
    (d / "recs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in s[6:10]), encoding="utf-8")
    return d


def short_chats(tok, n: int = 4, limit: int = 60) -> list[list[dict]]:
    """Held-out chitchat conversations cut to their longest prefix (ending with the assistant) that
    renders in ``limit`` tokens: real turns, no truncation by the row length."""
    out = []
    for conv in chitchat_split()[1]:
        for k in range(len(conv), 1, -1):
            part = conv[:k]
            if part[-1]["role"] == "assistant" and len(render(part, tok)[0]) <= limit:
                out.append(part)
                break
        if len(out) == n:
            return out
    raise AssertionError("not enough short chats")


def scored(model, inputs_BT, targets_BT) -> float:
    """Training's eval_step: the summed loss over the non-pad targets."""
    batch = TensorDict({"inputs": inputs_BT, "targets": targets_BT}, batch_size=[])
    m = eval_step(
        model.params, batch, cfg=model.run_cfg, pad_id=model.get_tokenizer().pad_id, knobs=model.knobs
    )
    return m["loss"].item() * m["tokens"].item()


PARAGRAPH_END = re.compile(r"\n(?:[^\S\n]*\n)+")


def reference_stream(files, tok):
    """(token stream, owning document id per token) found without the data pipeline: the .txt text
    encoded whole and cut into paragraphs by a regex and byte offsets; each record encoded alone."""
    stream, owner = [], []
    for f in files:
        if f.suffix == ".txt":
            text = f.read_text(encoding="utf-8")
            cuts = [m.end() for m in PARAGRAPH_END.finditer(text)]
            bounds = [0, *cuts, len(text)]
            ends = np.cumsum([len(text[a:b].encode()) for a, b in itertools.pairwise(bounds)])
            ids, b = tok.encode(text), 0
            for t in ids:
                owner.append(f"{f}#{int(np.searchsorted(ends, b, side='right'))}")
                b += len(tok.encoding.decode_single_token_bytes(t))
            stream += [*ids, tok.eot_id]
            owner.append(owner[-1])
        else:
            for i, line in enumerate(f.read_text(encoding="utf-8").splitlines()):
                ids = [*tok.encode(json.loads(line)["text"]), tok.eot_id]
                stream += ids
                owner += [f"{f}#{i}"] * len(ids)
    return stream, owner


def reference_docs(model, files, T: int) -> dict[str, float]:
    """Each document's summed loss by eval_step over the windows holding its targets, every other
    target masked: windows of T + 1 tokens overlapping by one, then the stream's last T + 1 tokens."""
    tok = model.get_tokenizer()
    stream, owner = reference_stream(files, tok)
    n, W = len(stream), (len(stream) - 1) // T
    x = torch.tensor(stream)
    out = {}
    for doc in dict.fromkeys(owner):
        windows: dict[int, list[int]] = {}
        for p in range(1, n):
            if owner[p] == doc:
                windows.setdefault((p - 1) // T * T if p <= W * T else n - 1 - T, []).append(p)
        inputs, targets = [], []
        for start, ps in windows.items():
            inputs.append(x[start : start + T])
            t = torch.full((T,), tok.pad_id)
            t[[p - start - 1 for p in ps]] = x[ps]
            targets.append(t)
        out[doc] = scored(model, torch.stack(inputs), torch.stack(targets))
    return out


# --------------------------------------------------------------------------------------------- eval


def test_eval_equals_training_eval_step_per_document_and_overall(runs, data, tmp_path):
    model = load_model(runs[0])
    files = [data / "poem.txt", data / "recs.jsonl"]
    sets = ev.data_sets([str(f) for f in files], model.get_tokenizer())
    result = ev.evaluate(model, sets)
    assert result.meta["routing"] == "train" and "MoD top-k" in result.meta["routing_note"]
    ref = reference_docs(model, files, T=32)
    assert [d.id for d in result.docs] == list(ref)  # 6 paragraphs, 4 records, in order
    assert len(result.docs) == 10
    for d in result.docs:
        # fp32 sums of ~80 tokens agree to ~1e-4; scoring one target in a different window (other context)
        # moves a sum by ~4e-3 with this little-trained model
        assert d.loss_sum == pytest.approx(ref[d.id], rel=0, abs=5e-4), d.id
    stream, _ = reference_stream(files, model.get_tokenizer())
    assert (len(stream) - 1) % 32 > 0  # so the tail window (overlapping the last full one) is exercised
    overall = result.overall
    assert overall.tokens == len(stream) - 1 and sum(t.documents for t in result.files) == 10
    assert overall.loss == pytest.approx(sum(ref.values()) / (len(stream) - 1), rel=2e-5)
    assert [t.name for t in result.files] == [str(f) for f in files]
    assert math.isclose(overall.ppl, math.exp(overall.loss)) and 0 < overall.accuracy < 1
    # the line of each paragraph in the file, and the per-doc file round-trips exactly
    assert [d.line for d in result.docs[:3]] == [1, 9, 17]
    ev.write_per_doc(tmp_path / "a.jsonl", result)
    back = ev.read_per_doc(tmp_path / "a.jsonl")
    assert back.docs == result.docs and back.meta == result.meta
    # inference routing (MoD predictor) evaluates a different model function
    other = ev.evaluate(model, sets, routing="inference")
    assert other.meta["routing_note"].startswith("MoD predictor")
    assert abs(other.overall.loss - overall.loss) > 1e-4


def test_chat_eval_counts_assistant_tokens_only(runs, tmp_path):
    model = load_model(runs[0])
    tok = model.get_tokenizer()
    chats = short_chats(tok)
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats), encoding="utf-8")
    result = ev.evaluate(model, ev.data_sets([str(path)], tok), seq_len=64)
    assert [d.kind for d in result.docs] == ["chat"] * 4 and [d.line for d in result.docs] == [1, 2, 3, 4]
    for d, conv in zip(result.docs, chats, strict=True):
        # the assistant's content and its <|im_end|>: nothing of the user's turns or the role headers
        want = sum(len(tok.encode(m["content"])) + 1 for m in conv if m["role"] == "assistant")
        assert d.tokens == want
        ids, trained = render(conv, tok)
        row = torch.tensor(ids + [tok.pad_id] * (65 - len(ids)))  # the training row: right padded
        mask = torch.tensor(trained + [False] * (65 - len(ids)))
        targets = torch.where(mask[1:], row[1:], tok.pad_id)
        assert d.loss_sum == pytest.approx(scored(model, row[None, :-1], targets[None]), rel=2e-5)


def test_default_data_is_what_training_evaluates(runs, data):
    """Default sets: the packaged held-out Shakespeare (names), the held-out side of a run's own text
    files (the same tokens as build_mix's eval stream), the packaged chitchat held-out rows."""
    model = load_model(runs[0])
    tok = model.get_tokenizer()
    sets, note = ev.default_sets(model)
    from lumina.data.text import shakespeare_split

    assert [s.name for s in sets] == [str(p) for p in shakespeare_split()[1]] and "Shakespeare" in note
    poem = str(data / "poem.txt")
    cfg = model.run_cfg
    d = dataclasses.replace(cfg.data, train_files=(poem, str(data / "recs.jsonl")), eval_fraction=0.4)
    own = dataclasses.replace(model, run_cfg=dataclasses.replace(cfg, data=d))
    sets, note = ev.default_sets(own)
    assert "held-out" in note and all(s.holdout is not None for s in sets)
    streams = [ev._text_docs(s, tok, False)[0] for s in sets]
    np.testing.assert_array_equal(np.concatenate(streams), build_mix(own.run_cfg, "eval").base.tokens)
    result = ev.evaluate(own, sets)
    assert 0 < len(result.docs) < 10 and result.overall.tokens == sum(map(len, streams)) - 1
    chat = dataclasses.replace(cfg.data, mode="finetuning_only")
    own = dataclasses.replace(model, run_cfg=dataclasses.replace(cfg, data=chat))
    sets, _ = ev.default_sets(own)
    from lumina.data.chat import ChatRows

    rows = ChatRows.build(sets[0].conversations, tok, cfg.train.seq_len).tokens
    np.testing.assert_array_equal(rows, build_mix(own.run_cfg, "eval").chat.tokens)


def test_eval_cli_table_json_and_per_doc(runs, data, tmp_path, capsys):
    out = tmp_path / "docs.jsonl"
    argv = [
        "eval",
        str(runs[0]),
        "--data",
        f"{data / 'poem.txt'},{data / 'recs.jsonl'}",
        "--per-doc",
        str(out),
    ]
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert "routing: train" in cap.out and "overall" in cap.out and "poem.txt" in cap.out
    assert "[eval] text: " in cap.err  # progress on stderr
    docs = ev.read_per_doc(out).docs
    assert len(docs) == 10
    assert main([*argv[:4], "--json", "--batch-size", "3"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["overall"]["tokens"] == sum(d.tokens for d in docs)
    # the batch size changes nothing (MoD routes per row; this MoE is dropless)
    assert got["overall"]["loss_sum"] == pytest.approx(math.fsum(d.loss_sum for d in docs), rel=1e-6)


# ------------------------------------------------------------------------------------------ compare


def test_compare_a_model_with_itself_and_with_its_random_init(runs, data, tmp_path, capsys):
    good, bad = runs
    files = f"{data / 'poem.txt'},{data / 'recs.jsonl'}"
    a = tmp_path / "a.jsonl"
    assert main(["eval", str(good), "--data", files, "--per-doc", str(a)]) == 0
    capsys.readouterr()
    assert main(["compare", str(a), str(a)]) == 0
    out = capsys.readouterr().out
    assert "verdict: no difference" in out and "+0.0000" in out and "10,000 resamples" in out
    assert main(["compare", str(good), str(bad), "--data", files, "--json", "--resamples", "2000"]) == 0
    got = json.loads(capsys.readouterr().out)
    # the random init is worse: B - A > 0 with an interval far from 0, every document agreeing
    assert (
        got["diff"] > 0.3 and got["ci_low"] > 0.2 and got["loss_b"] == pytest.approx(math.log(50304), abs=0.3)
    )
    assert got["perm_p"] < 0.005 and got["t_p"] < 1e-4 and got["a_better"] == got["documents"] == 10
    assert got["verdict"].startswith("A is better than B") and got["resamples"] == 2000


def test_paired_statistics_against_hand_computation():
    def docs(losses, tokens):
        return [
            ev.Doc(f"f#{i}", "f", i, None, "text", n, s, 0)
            for i, (s, n) in enumerate(zip(losses, tokens, strict=True))
        ]

    n = [10, 20, 30, 40]
    la = [25.0, 40.0, 75.0, 90.0]
    lb = [24.0, 41.0, 70.0, 85.0]
    p = ev.paired(docs(la, n), docs(lb, n), resamples=20_000, seed=1)
    d = [b - a for a, b in zip(la, lb, strict=True)]  # -1, 1, -5, -5
    delta = sum(d) / 100
    assert p.diff == pytest.approx(delta) == -0.1
    z = [di - delta * ni for di, ni in zip(d, n, strict=True)]  # 0, 3, -2, -1
    se = math.sqrt(4 / 3 * sum(v * v for v in z)) / 100
    assert p.t == pytest.approx(delta / se)
    # exact sign-flip p by enumerating the 16 patterns; the Monte Carlo p is within its error
    exact = sum(
        abs(sum(s * x for s, x in zip(signs, d, strict=True))) >= abs(sum(d))
        for signs in itertools.product((-1, 1), repeat=4)
    )
    assert abs(p.perm_p - exact / 16) < 0.01
    assert (p.b_better, p.a_better, p.ties) == (3, 1, 0)
    # Student t: P(|T| >= 1) = 0.5 at df 1 (Cauchy); the 5% two-sided point at df 10 is 2.228
    assert ev.student_t_sf(1.0, 1) == pytest.approx(0.5, abs=1e-12)
    assert ev.student_t_sf(2.228, 10) == pytest.approx(0.05, abs=2e-4)
    assert ev.student_t_sf(1.959964, 1e7) == pytest.approx(0.05, abs=1e-5)
    assert ev.student_t_sf(0.0, 5) == pytest.approx(1.0)
    # identical models: a zero interval, p = 1, "no difference"
    same = ev.paired(docs(la, n), docs(la, n))
    assert (same.diff, same.ci_low, same.ci_high, same.perm_p, same.t_p) == (0, 0, 0, 1, 1)
    assert same.verdict.startswith("no difference") and same.ties == 4


def test_bootstrap_interval_covers_the_true_difference():
    rng = np.random.default_rng(0)
    covered, widths, ses = 0, [], []
    for trial in range(40):
        n = rng.integers(20, 200, size=60)
        la = n * 3.0 + rng.normal(0, 1, 60) * np.sqrt(n)
        lb = la + n * 0.05 + rng.normal(0, 1, 60) * np.sqrt(n) * 0.5  # true difference: +0.05 nats/token
        a = [
            ev.Doc(f"f#{i}", "f", i, None, "text", int(k), float(x), 0)
            for i, (k, x) in enumerate(zip(n, la, strict=True))
        ]
        b = [dataclasses.replace(d, loss_sum=float(x)) for d, x in zip(a, lb, strict=True)]
        p = ev.paired(a, b, resamples=1000, seed=trial)
        covered += p.ci_low <= 0.05 <= p.ci_high
        widths.append(p.ci_high - p.ci_low)
        ses.append(abs(p.diff / p.t))
    assert 34 <= covered <= 40  # nominal 95%: 38 of 40
    assert np.median(widths) == pytest.approx(2 * 1.96 * np.median(ses), rel=0.2)  # agrees with the t's SE
    assert ev.paired(a, b, resamples=1000, seed=5) == ev.paired(a, b, resamples=1000, seed=5)  # seeded


# ---------------------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line(runs, data, tmp_path, capsys):
    good = str(runs[0])
    assert "no such file or directory" in one_line_error(capsys, ["eval", str(tmp_path / "nope")])
    assert "nope.txt: no such file" in one_line_error(
        capsys, ["eval", good, "--data", str(tmp_path / "nope.txt")]
    )
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff\xfe broken\n")
    assert f"{bad}:2: error: invalid UTF-8" in one_line_error(capsys, ["eval", good, "--data", str(bad)])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    assert f"{broken}:2" in one_line_error(capsys, ["eval", good, "--data", str(broken)])
    assert "--data: no files" in one_line_error(capsys, ["eval", good, "--data", " , "])
    assert "--seq-len" in one_line_error(capsys, ["eval", good, "--seq-len", "0"])
    assert "max_seq_len=64" in one_line_error(
        capsys, ["eval", good, "--seq-len", "100", "--data", str(data / "recs.jsonl")]
    )
    assert "--routing" in one_line_error(capsys, ["eval", good, "--routing", "sideways"])
    assert "--device" in one_line_error(capsys, ["eval", good, "--device", "gpu0"])
    assert "--per-doc" in one_line_error(
        capsys, ["eval", good, "--per-doc", str(tmp_path / "no" / "x.jsonl")]
    )
    # compare: mismatched per-doc files, a malformed one, a model next to a file, flags for files
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    result = ev.evaluate(
        load_model(good), ev.data_sets([str(data / "recs.jsonl")], load_model(good).get_tokenizer())
    )
    ev.write_per_doc(a, result)
    ev.write_per_doc(b, dataclasses.replace(result, docs=result.docs[:-1]))
    assert "different documents (4 vs 3)" in one_line_error(capsys, ["compare", str(a), str(b)])
    ev.write_per_doc(
        b, dataclasses.replace(result, docs=[dataclasses.replace(result.docs[0], tokens=1), *result.docs[1:]])
    )
    assert "differ at document 0" in one_line_error(capsys, ["compare", str(a), str(b)])
    b.write_text(
        a.read_text().replace('"tokens": ', '"tokens": -', 1).replace('"tokens": -', '"tokens": ', 0)
    )
    lines = a.read_text().splitlines()
    b.write_text("\n".join([lines[0], lines[1].replace('"tokens": ', '"tokens": "x', 1), *lines[2:]]) + "\n")
    assert f"{b}:2" in one_line_error(capsys, ["compare", str(a), str(b)])
    b.write_text('{"text": "a"}\n')
    assert "not a per-document file" in one_line_error(capsys, ["compare", str(a), str(b)])
    assert "not one of each" in one_line_error(capsys, ["compare", str(a), good])
    assert "--seq-len" in one_line_error(capsys, ["compare", str(a), str(a), "--seq-len", "16"])
    assert "--resamples" in one_line_error(capsys, ["compare", str(a), str(a), "--resamples", "5"])
    assert "no such file or directory" in one_line_error(capsys, ["compare", good, str(tmp_path / "nope")])


def test_help_is_instant_and_lists_the_commands():
    code = (
        "import sys; from lumina.run import main; main(['compare', '--help']); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--resamples" in out and out.strip().endswith("False")
    top = subprocess.run(
        [sys.executable, "-m", "lumina.run", "--help"], capture_output=True, text=True
    ).stdout
    assert "  eval " in top and "  compare " in top


# ---------------------------------------------------------------------------------------- lm_eval


def test_adapter_module_imports_without_lm_eval():
    code = (
        "import sys; sys.modules['lm_eval'] = None; import lumina.lm_eval_adapter as a; "
        "print(a.NAME, 'torch' in sys.modules)\n"
        "try:\n    a.LuminaLM\nexcept ImportError:\n    print('lazy')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["lumina", "False", "lazy"]


def direct_loglikelihood(model, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) from one unbatched forward in predictor routing."""
    seq = torch.tensor([context + continuation])
    logits, _ = apply(model.params, seq[:, :-1], model.cfg, model.knobs, train=False, mod_routing="predictor")
    logp = logits[0].float().log_softmax(-1)
    return sum(logp[len(context) - 1 + i, t].item() for i, t in enumerate(continuation))


def pair_ids(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Hugging Face's split (lm_eval's HFLM): the context's trailing spaces go to the continuation,
    the pair is encoded whole and cut at the context's length; no context: the end-of-text token."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return (ctx or [tok.eot_id]), whole[len(ctx) :]


def test_lm_eval_adapter_scores_and_runs_a_local_task(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # (read when datasets is imported)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    lm_eval = pytest.importorskip("lm_eval")
    from importlib.metadata import EntryPoint

    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model, model_registry
    from lm_eval.tasks import TaskManager

    from lumina import lm_eval_adapter

    # registered through the entry point pyproject.toml declares (what lm_eval's plugin discovery
    # loads); lm_eval 0.4.13 does not scan entry points, so the test registers it the same way
    ep = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lm_eval.models"]
    importlib.import_module("lm_eval.models")  # the built-ins: lm_eval adds them only to an empty registry
    if "lumina" not in model_registry:
        model_registry.register("lumina", target=EntryPoint("lumina", ep["lumina"], "lm_eval.models"))
    cls = get_model("lumina")
    assert cls is lm_eval_adapter.LuminaLM
    lm = cls.create_from_arg_string(f"path={runs[0]}", {"batch_size": 4, "device": "cpu"})
    model, tok = lm.model, lm.tok

    def inst(kind, args, i=0):
        return Instance(request_type=kind, doc={}, arguments=args, idx=i)

    pairs = [("ROMEO: I", " love her"), ("JULIET:", " O Romeo, Romeo!"), ("", "Hello there"), ("a b ", "c")]
    got = lm.loglikelihood([inst("loglikelihood", p) for p in pairs])
    for (ctx, cont), (logp, greedy) in zip(pairs, got, strict=True):
        assert logp == pytest.approx(direct_loglikelihood(model, *pair_ids(tok, ctx, cont)), abs=2e-4), ctx
        assert isinstance(greedy, bool)
    # rolling: [eot] + the first 64 tokens, the next 64 after one token of context, the rest with the
    # longest context that fits (lm_eval's windows for max_length 64)
    ids = tok.encode(" ".join(stanzas()[:2]))
    assert 128 < len(ids) < 192
    want, done = direct_loglikelihood(model, [tok.eot_id], ids[:64]), 64
    while done < len(ids):
        end = min(done + 64, len(ids))
        want += direct_loglikelihood(model, ids[end - 65 : done], ids[done:end])
        done = end
    (rolled,) = lm.loglikelihood_rolling([inst("loglikelihood_rolling", (tok.decode(ids),))])
    assert rolled == pytest.approx(want, abs=1e-3)

    # the local task: multiple choice, rolling log-likelihood and greedy generation
    docs = [
        {"q": "ROMEO: I love", "choices": ["her", "zebra quantum"], "answer": 0},
        {"q": "KING: Give me my", "choices": ["spreadsheet", "crown"], "answer": 1},
        {"q": "JULIET: O", "choices": ["Romeo", "kilobyte"], "answer": 0},
    ]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps({"q": d["q"], "a": "x"}) + "\n" for d in docs))
    common = "dataset_path: json\ntest_split: train\n"
    (tmp_path / "mc.yaml").write_text(
        f"task: lumina_mc\n{common}dataset_kwargs:\n  data_files: {tmp_path / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n"
    )
    (tmp_path / "gen.yaml").write_text(
        f"task: lumina_gen\n{common}dataset_kwargs:\n  data_files: {tmp_path / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 5\nmetric_list:\n  - metric: exact_match\n"
    )
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    res = lm_eval.simple_evaluate(
        model="lumina",
        model_args=f"path={runs[0]}",
        tasks=["lumina_mc", "lumina_gen"],
        task_manager=tm,
        batch_size=2,
        bootstrap_iters=0,
        log_samples=True,
    )
    want_acc = np.mean(
        [
            np.argmax([direct_loglikelihood(model, *pair_ids(tok, d["q"], " " + c)) for c in d["choices"]])
            == d["answer"]
            for d in docs
        ]
    )
    assert res["results"]["lumina_mc"]["acc,none"] == pytest.approx(want_acc)
    gen = [s["resps"][0][0] for s in res["samples"]["lumina_gen"]]
    from lumina.generate import Generator, Sampling

    g = Generator(model)
    greedy = Sampling(greedy=True)
    for d, text in zip(docs, gen, strict=True):
        assert text and text == g.generate(d["q"], max_new_tokens=5, sampling=greedy, stop=["."])
    # the until strings stop a generation: the free text cut where the stop string starts
    free = g.generate(docs[0]["q"], max_new_tokens=6, sampling=greedy)
    stop = free[2:4]
    (cut,) = lm.generate_until([inst("generate_until", (docs[0]["q"], {"until": [stop], "max_gen_toks": 6}))])
    assert cut == free[: free.find(stop)] and len(cut) < len(free)
