"""A model for EleutherAI's lm-evaluation-harness: Lumina checkpoints under the name ``lumina``.

    lm_eval --model lumina --model_args path=runs/debug --tasks TASKS           # lm_eval that finds plugins
    python -m lumina.lm_eval_adapter --model lumina --model_args path=runs/debug --tasks TASKS  # any lm_eval

``model_args``: ``path`` (a run folder: its newest checkpoint, or a checkpoint folder), ``device``
(cpu), ``batch_size`` (8), ``routing`` (``inference``: MoD predictor routing and MoE dropless, as
``generate`` runs — causal, so a continuation never changes how its context is routed; ``train``: as
training evaluates, MoD capacity top-k over each sequence, one request per forward so no batch
neighbour changes a result), ``max_length`` (the model's ``max_seq_len``).

Registration: pyproject.toml declares the entry point ``lumina`` in the group ``lm_eval.models``
(``lumina.lm_eval_adapter:LuminaLM``). lm_eval discovers that group from its PR #4013 on (merged
2026-08-18, after the newest release here, 0.4.13, which has no plugin discovery); with 0.4.13 call
``register()`` before ``lm_eval.simple_evaluate(model="lumina", ...)``, or run lm_eval's command
line through ``python -m lumina.lm_eval_adapter``, which registers first.

lm_eval is imported only when ``LuminaLM`` is first used (a module ``__getattr__``): importing this
module needs neither lm_eval nor torch.

The three request types, as lm_eval's own Hugging Face model (``HFLM``) defines them:
- ``loglikelihood(context, continuation)``: (sum of log p(continuation tokens), whether each is the
  argmax). Trailing spaces of the context move to the continuation; the pair is encoded whole and
  split at the context's token count; an empty context is the end-of-text token; only the last
  ``max_length`` + 1 tokens are kept.
- ``loglikelihood_rolling(text)``: the log-likelihood of the whole text after an end-of-text token,
  in disjoint windows of ``max_length`` tokens (lm_eval's ``get_rolling_token_windows``).
- ``generate_until(context, gen_kwargs)``: ``lumina.generate.Generator`` (greedy unless
  ``do_sample`` with a temperature > 0), stopping at the ``until`` strings or end-of-text, at most
  ``max_gen_toks`` (256) tokens; the context keeps its last ``max_length - max_gen_toks`` tokens.
"""

from __future__ import annotations

import json
import logging
import sys

__all__ = ["LuminaLM", "main", "register"]  # noqa: F822 (LuminaLM: defined on first use)

ENTRY_POINT_GROUP = "lm_eval.models"
NAME = "lumina"
TARGET = "lumina.lm_eval_adapter:LuminaLM"


def register() -> None:
    """Register ``lumina`` in lm_eval's model registry (what entry-point discovery does in newer lm_eval)."""
    import lm_eval.models  # noqa: F401  (the built-in names: lm_eval adds them only to an empty registry)
    from lm_eval.api.registry import model_registry

    if NAME not in model_registry:
        model_registry.register(NAME, target=TARGET)


def main(argv: list[str] | None = None) -> None:
    """lm_eval's command line with ``lumina`` registered."""
    register()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


def __getattr__(name: str):
    if name == "LuminaLM":
        cls = _define()
        globals()["LuminaLM"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _define():
    # isort: off
    from lm_eval import utils as lm_utils  # first: without lm_eval this fails before torch loads
    from lm_eval.api.model import LM
    import torch

    # isort: on

    from lumina.evaluate import EvalError, Scorer, load
    from lumina.generate import Generator, Sampling

    class LuminaLM(LM):
        """lm_eval's ``LM`` over a Lumina checkpoint (see the module docstring)."""

        def __init__(
            self,
            path: str,
            device: str | None = "cpu",
            batch_size: int | str | None = 8,
            routing: str = "inference",
            max_length: int | str | None = None,
            **_: object,  # max_batch_size and other harness-wide settings
        ):
            super().__init__()
            if routing not in ("inference", "train"):
                raise EvalError(f"routing={routing!r}: expected inference or train")
            device = device or "cpu"
            if device.startswith("cuda") and not torch.cuda.is_available():
                # lm_eval's command line passes --device cuda unless told otherwise (as HFLM does)
                logging.getLogger(__name__).warning("CUDA is not available: running on the CPU")
                device = "cpu"
            self.model = load(path, device)
            self.tok = self.model.get_tokenizer()
            self.routing = routing
            self.scorer = Scorer(self.model, routing)  # type: ignore[arg-type]
            self._device = self.scorer.device
            size = str(batch_size or 8)
            self.batch_size = int(size) if size.isdigit() else 8  # "auto": 8
            self.max_length = int(max_length) if max_length else self.model.cfg.max_seq_len
            self._generator: Generator | None = None

        @property
        def eot_token_id(self) -> int:
            return self.tok.eot_id

        @property
        def tokenizer_name(self) -> str:
            return f"lumina-{self.tok.name}"

        # ------------------------------------------------------------------ scoring token pairs
        def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces:
                context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
            whole = self.tok.encode(context + continuation)
            ctx = self.tok.encode(context)
            if not ctx:
                return [self.tok.eot_id], whole
            return ctx, whole[len(ctx) :]

        def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
            """(log-likelihood, greedy) of each continuation after its context (contexts non-empty)."""
            seqs = []
            for ctx, cont in pairs:
                seq = (ctx + cont)[-(self.max_length + 1) :]
                seqs.append((seq, min(len(cont), len(seq) - 1)))
            order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
            out: list[tuple[float, bool]] = [(0.0, True)] * len(seqs)
            # inference routing is causal and dropless: right padding changes no real token's result
            size = self.batch_size if self.routing == "inference" else 1
            pad = self.tok.pad_id
            for b in range(0, len(order), size):
                rows = order[b : b + size]
                T = len(seqs[rows[0]][0]) - 1
                inputs = torch.full((len(rows), T), self.tok.eot_id, dtype=torch.int64)
                targets = torch.full((len(rows), T), pad, dtype=torch.int64)
                for r, i in enumerate(rows):
                    seq, n = seqs[i]
                    L = len(seq) - 1
                    inputs[r, :L] = torch.tensor(seq[:-1])
                    targets[r, L - n : L] = torch.tensor(seq[L - n + 1 :])
                nll, hit = self.scorer(inputs, targets)
                for r, i in enumerate(rows):
                    n, L = seqs[i][1], len(seqs[i][0]) - 1
                    out[i] = (-float(nll[r].sum()), bool(hit[r, L - n : L].all()))
            return out

        # ------------------------------------------------------------------ the LM interface
        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            results = self._score([self._encode_pair(*r.args) for r in requests])
            for r, res in zip(requests, results, strict=True):
                self.cache_hook.add_partial("loglikelihood", r.args, res)
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            pairs, owner = [], []
            for i, r in enumerate(requests):
                windows = lm_utils.get_rolling_token_windows(
                    token_list=self.tok.encode(r.args[0]),
                    prefix_token=self.tok.eot_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
                for w in map(lm_utils.make_disjoint_window, windows):
                    pairs.append(w)
                    owner.append(i)
            totals = [0.0] * len(requests)
            for i, (logp, _) in zip(owner, self._score(pairs), strict=True):
                totals[i] += logp
            for r, total in zip(requests, totals, strict=True):
                self.cache_hook.add_partial("loglikelihood_rolling", (r.args[0],), total)
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            if self._generator is None:
                self._generator = Generator(self.model)
            out: list[str] = [""] * len(requests)
            groups: dict[str, list[int]] = {}
            for i, r in enumerate(requests):
                groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
            for key, idx in groups.items():
                kw = json.loads(key)
                until = kw.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = max(1, min(int(kw.get("max_gen_toks", 256)), self.max_length - 1))
                temperature = float(kw.get("temperature", 0.0) or 0.0)
                sampling = (
                    Sampling(temperature=temperature)
                    if kw.get("do_sample") and temperature > 0
                    else Sampling(greedy=True)
                )
                keep = self.max_length - max_new
                for b in range(0, len(idx), self.batch_size):
                    rows = idx[b : b + self.batch_size]
                    prompts = [
                        (self.tok.encode(requests[i].args[0]) or [self.tok.eot_id])[-keep:] for i in rows
                    ]
                    gen = self._generator.generate_ids(
                        prompts, max_new_tokens=max_new, sampling=sampling, stop=until
                    )
                    for i, text in zip(rows, gen.texts, strict=True):
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
            return out

    return LuminaLM


if __name__ == "__main__":
    main()
