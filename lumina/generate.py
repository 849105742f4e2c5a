"""Text generation: prefill + one-token decode over the static KV cache, sampling, streaming.

Legend: B batch (prompts), P prompt positions (the longest prompt; shorter ones are left-padded),
S cache slots, V vocab.

    model = load_model("runs/debug")  # a run folder (its newest checkpoint) or a checkpoint
    gen = Generator(model)
    texts = gen.generate(["ROMEO:", "JULIET:"], max_new_tokens=40, sampling=Sampling(temperature=0.8))

How it works:
- The prompts are left-padded to one length P and run through ``apply`` once (prefill), which writes
  every layer's keys/values into the cache (``init_cache``) and marks pad slots invalid, so no real
  token ever attends to a pad; RoPE is relative, so a padded row's logits equal its unpadded ones.
- Each further token is one call of the decode step (``apply`` on [B, 1] at position P + t, then the
  logits processors and the draw). Only the decode step is compiled (``compile=True``): its inputs
  keep their shapes and the sampling values are 0-dim tensors, so neither a new token nor a changed
  temperature / top-k / top-p / penalty recompiles. Three step variants exist (greedy, sampling,
  sampling with top-k/top-p filtering: the sort is skipped when no filter is on).
- Logits processors in Hugging Face's order: repetition penalty, temperature, top-k, top-p (same
  definitions: HF's RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
  TopPLogitsWarper). Draws use Lumina's counter-based RNG (``lumina.model.random``): token t of a
  call with seed s is a pure function of (s, t, logits), identical eagerly and compiled.
- MoD layers route every token by the causal predictor (``apply(..., mod_routing="predictor")``):
  training's capacity top-k needs the whole sequence. A skipped token's cache slot is invalid in that
  layer, so later tokens see exactly the keys a no-cache forward in predictor mode would show them.
- MoE layers run dropless at inference (``capacity_factor`` is cleared when the model is loaded).
- A row stops at the end-of-text token or when its text contains a stop string (a per-row done
  mask); the call returns when every row is done or ``max_new_tokens`` were drawn.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tensordict import TensorDict

from lumina import checkpoint, hf, tree
from lumina.config import ModelConfig, RunConfig, from_dict
from lumina.model import apply, init_cache
from lumina.model import random as lrandom

__all__ = ["Chat", "GenerateError", "Generator", "LoadedModel", "Sampling", "load_model", "process_logits"]


class GenerateError(ValueError):
    """Bad input to generation (path, prompt, numbers); the message is one line."""


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How the next token is chosen. ``greedy`` (or temperature 0) takes the argmax after the
    repetition penalty; top_k=0 and top_p=1 turn those filters off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    greedy: bool = False

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise GenerateError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise GenerateError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not (0 < self.top_p <= 1):
            raise GenerateError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise GenerateError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def mode(self) -> str:
        """The decode-step variant (a compile key): greedy | sample | filter."""
        if self.greedy or self.temperature == 0:
            return "greedy"
        return "filter" if self.top_k > 0 or self.top_p < 1 else "sample"

    def tensors(self, vocab: int, device: torch.device | str) -> TensorDict:
        k = vocab if self.top_k == 0 else min(self.top_k, vocab)
        values = {
            "temperature": torch.tensor(self.temperature if self.mode != "greedy" else 1.0),
            "top_k": torch.tensor(k, dtype=torch.int64),
            "top_p": torch.tensor(self.top_p),
            "repetition_penalty": torch.tensor(self.repetition_penalty),
        }
        return TensorDict({n: v.to(device) for n, v in values.items()}, batch_size=[])


def process_logits(logits_BV: torch.Tensor, seen_BV: torch.Tensor, s: TensorDict, mode: str) -> torch.Tensor:
    """Hugging Face's processor order: repetition penalty, temperature, top-k, top-p (fp32).
    ``seen_BV``: tokens present in the row so far (prompt and generated). ``mode`` as ``Sampling.mode``."""
    logits_BV = logits_BV.float()
    pen = s["repetition_penalty"]
    penalised_BV = torch.where(logits_BV < 0, logits_BV * pen, logits_BV / pen)
    logits_BV = torch.where(seen_BV, penalised_BV, logits_BV)
    if mode == "greedy":
        return logits_BV
    logits_BV = logits_BV / s["temperature"]
    if mode == "filter":
        # One ascending sort serves both filters. Top-k (HF): drop logits below the k-th largest.
        sorted_BV, order_BV = logits_BV.sort(dim=-1)
        V = logits_BV.shape[-1]
        kth_B1 = sorted_BV.gather(1, (V - s["top_k"]).expand(sorted_BV.shape[0], 1))
        sorted_BV = sorted_BV.masked_fill(sorted_BV < kth_B1, float("-inf"))
        # Top-p (HF): drop the smallest tokens whose cumulative probability is <= 1 - top_p; keep the top one.
        cum_BV = sorted_BV.softmax(dim=-1).cumsum(dim=-1)
        drop_BV = cum_BV <= (1 - s["top_p"])
        drop_BV[:, -1] = False
        sorted_BV = sorted_BV.masked_fill(drop_BV, float("-inf"))
        logits_BV = torch.empty_like(logits_BV).scatter(1, order_BV, sorted_BV)
    return logits_BV


def _draw(logits_BV: torch.Tensor, key: torch.Tensor, mode: str) -> torch.Tensor:
    """The next token per row: argmax (greedy) or a Gumbel-max draw (= sampling softmax(logits))."""
    if mode == "greedy":
        return logits_BV.argmax(dim=-1)
    u_BV = lrandom.uniform(key, logits_BV.shape)
    gumbel_BV = -torch.log(-torch.log(u_BV.clamp_min(1e-20)))
    return (logits_BV + gumbel_BV).argmax(dim=-1)


@dataclass
class LoadedModel:
    params: TensorDict
    cfg: ModelConfig  # the inference form: MoE dropless
    run_cfg: RunConfig
    path: Path  # the checkpoint folder
    step: int
    tokenizer: object = None  # lumina.data.tokenizer.Tokenizer, loaded lazily
    knobs: TensorDict | None = None  # the checkpoint's live routing knobs (None: the config's defaults)

    def get_tokenizer(self):
        if self.tokenizer is None:
            from lumina.data.tokenizer import get_tokenizer

            name = self.run_cfg.data.tokenizer
            tok = get_tokenizer(name)
            if tok.vocab_size > self.cfg.vocab_size:  # a foreign folder with a vocabulary of its own
                raise GenerateError(
                    f"{self.path}: tokenizer {name} needs {tok.vocab_size} embedding rows, the model has "
                    f"{self.cfg.vocab_size} (name the model's tiktoken encoding with --tokenizer)"
                )
            if hf.is_hf_dir(self.path):
                from lumina.weights import check_tokenizer

                check_tokenizer(self.path, tok, "--tokenizer")
            self.tokenizer = tok
        return self.tokenizer


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint or Hugging Face model folder: ``path`` itself, or a run folder's newest checkpoint."""
    p = Path(path)
    if not p.exists():
        raise GenerateError(f"{p}: no such file or directory")
    if (p / checkpoint.META_FILE).is_file() or hf.is_hf_dir(p):
        return p
    if (p / "checkpoints").is_dir():
        return checkpoint.latest(p)  # CheckpointError (one line) when the run has none
    raise GenerateError(
        f"{p}: not a run folder (no checkpoints/), a checkpoint (no {checkpoint.META_FILE}) "
        f"or a Hugging Face model folder (no {hf.CONFIG_FILE})"
    )


def inference_config(cfg: ModelConfig) -> ModelConfig:
    """The model config generation runs: MoE dropless (every assignment computed)."""
    if cfg.moe.enabled and cfg.moe.capacity_factor is not None:
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, capacity_factor=None))
    return cfg


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    tokenizer: str | None = None,
) -> LoadedModel:
    """The parameters and config of a run folder's newest checkpoint, a checkpoint folder, or a
    Hugging Face Llama / Mixtral folder (safetensors; its tokenizer: ``tokenizer``, else the one a
    ``lumina.run export`` recorded, else gpt2 — ``lumina.weights.hf_run_config``)."""
    ckpt = resolve_checkpoint(path)
    if hf.is_hf_dir(ckpt):
        from lumina.weights import hf_run_config

        run_cfg = hf_run_config(ckpt, tokenizer)
        params = hf.load_dir(ckpt)[1].to(device)
        meta = {"step": (hf.read_record(ckpt) or {}).get("step") or 0}
        knobs = None  # a Hugging Face model has no live routing knobs: the config's defaults
    else:
        state, meta = checkpoint.load_checkpoint(ckpt, device=str(device))
        try:
            run_cfg = from_dict(RunConfig, meta["config"])
        except Exception as e:
            raise GenerateError(f"{ckpt}: its config does not load ({e})") from None
        if tokenizer:
            run_cfg = dataclasses.replace(
                run_cfg, data=dataclasses.replace(run_cfg.data, tokenizer=tokenizer)
            )
        params = state["params"] if "params" in state.keys() else state  # noqa: SIM118
        knobs = state["knobs"] if "knobs" in state.keys() else None  # noqa: SIM118
    if dtype is not None:
        params = params.apply(lambda t: t.to(dtype) if t.is_floating_point() else t)
    return LoadedModel(
        params=params,
        cfg=inference_config(run_cfg.model),
        run_cfg=run_cfg,
        path=ckpt,
        step=int(meta["step"]),
        knobs=knobs,
    )


@dataclass
class Generation:
    """What ``Generator.generate_ids`` returns: per row the generated ids (without the prompt,
    without the stop token) and why it stopped; timings in seconds."""

    tokens: list[list[int]]
    finish: list[str]  # "eos" | "stop" | "length"
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    first_token_s: float = 0.0
    texts: list[str] = field(default_factory=list)


def decode_layout(params: TensorDict) -> TensorDict:
    """The same parameters with every 2-D matrix stored column-major (``w.T.contiguous().T``: same
    values and shape, other strides), except the embedding (a row lookup) and quantized codes
    (``model.quant``: integer tensors, decoded by their own kernels). Decoding multiplies one
    row by each matrix, and on CPU ``x @ w`` with a row-major [in, out] ``w`` takes a slow path at
    one row: 19.7 vs 7.9 ms for [1, 256] @ [256, 768] on the 2 loaded cores this was measured on
    (torch 2.13), the same at 4 rows. Results differ only in rounding (1e-5)."""
    flat = tree.flatten(params)

    def matrix(k: str, v: torch.Tensor) -> bool:
        return v.dim() == 2 and v.is_floating_point() and not k.startswith("embed.")

    return tree.unflatten({k: v.T.contiguous().T if matrix(k, v) else v for k, v in flat.items()})


class Generator:
    """Batched generation for one model. ``compile``: compile the decode step (torch.compile;
    ``mode="reduce-overhead"`` on CUDA). ``eos_ids``: default the tokenizer's end-of-text."""

    def __init__(
        self,
        model: LoadedModel | None = None,
        *,
        params: TensorDict | None = None,
        cfg: ModelConfig | None = None,
        tokenizer=None,
        compile: bool = False,
        cache_dtype: torch.dtype | None = None,
    ):
        if model is not None:
            params, cfg, tokenizer = model.params, model.cfg, tokenizer or model.get_tokenizer()
        assert params is not None and cfg is not None
        self.params, self.cfg, self.tokenizer = decode_layout(params), inference_config(cfg), tokenizer
        self.device = next(iter(params.values(True, True))).device
        self.cache_dtype = cache_dtype or next(iter(params.values(True, True))).dtype
        self.compile = compile
        # Ids a tokenizer can decode (the embedding is padded past them): never drawn.
        self.n_allowed = min(cfg.vocab_size, tokenizer.pad_id) if tokenizer is not None else cfg.vocab_size
        self._steps: dict[str, Callable] = {}

    # ------------------------------------------------------------------ the two model calls
    def _forward(self, tokens_BT, cache, positions_T, valid_BT):
        logits_BTV, _ = apply(
            self.params,
            tokens_BT,
            self.cfg,
            cache=cache,
            positions=positions_T,
            train=False,
            valid=valid_BT,
            mod_routing="predictor",
        )
        logits_BTV = logits_BTV[..., : self.n_allowed]
        return logits_BTV

    def _step_fn(self, mode: str) -> Callable:
        if mode not in self._steps:

            def step(tok_B, cache, pos_1, seen_BV, s, key, t):
                valid_B1 = torch.ones_like(tok_B, dtype=torch.bool)[:, None]
                logits_BV = self._forward(tok_B[:, None], cache, pos_1, valid_B1)[:, -1]
                seen_BV = seen_BV.scatter(1, tok_B[:, None], True)
                nxt_B = _draw(process_logits(logits_BV, seen_BV, s, mode), lrandom.fold_in(key, t), mode)
                return nxt_B, seen_BV

            if self.compile:
                kw = {"mode": "reduce-overhead"} if self.device.type == "cuda" else {}
                step = torch.compile(step, **kw)
            self._steps[mode] = step
        return self._steps[mode]

    # ------------------------------------------------------------------ public
    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        if self.tokenizer is None:
            raise GenerateError("text prompts need a tokenizer")
        return [self.tokenizer.encode(p) for p in prompts]

    @torch.no_grad()
    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 64,
        sampling: Sampling = Sampling(),
        seed: int = 0,
        eos_ids: Sequence[int] | None = None,
        stop: Sequence[str] = (),
        on_text: Callable[[int, str], None] | None = None,
    ) -> Generation:
        """Generate for a batch of token-id prompts (lengths may differ). ``on_text(row, text)``
        receives each row's new text as it is produced (streaming); stop strings need a tokenizer."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise GenerateError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise GenerateError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        cfg, dev = self.cfg, self.device
        B, P = len(prompts), max(len(p) for p in prompts)
        if any(t < 0 or t >= self.n_allowed for p in prompts for t in p):
            raise GenerateError(f"prompt ids must be in [0, {self.n_allowed})")
        need = P + max_new_tokens
        if need > cfg.max_seq_len:
            raise GenerateError(
                f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                f"max_seq_len={cfg.max_seq_len}"
            )
        S = min(cfg.max_seq_len, -(-need // 64) * 64)  # rounded up: fewer distinct cache shapes
        if eos_ids is None:
            eos_ids = [self.tokenizer.eot_id] if self.tokenizer is not None else []
        mode = sampling.mode
        s = sampling.tensors(self.n_allowed, dev)
        key = lrandom.key_from_seed(seed, dev)

        tokens_BP = torch.zeros(B, P, dtype=torch.int64)
        valid_BP = torch.zeros(B, P, dtype=torch.bool)
        for b, p in enumerate(prompts):  # left padding: every row's last prompt token at P - 1
            tokens_BP[b, P - len(p) :] = torch.tensor(list(p), dtype=torch.int64)
            valid_BP[b, P - len(p) :] = True
        tokens_BP, valid_BP = tokens_BP.to(dev), valid_BP.to(dev)
        seen_BV = torch.zeros(B, self.n_allowed, dtype=torch.bool, device=dev)
        seen_BV.scatter_(1, tokens_BP, valid_BP)
        cache = init_cache(cfg, B, S, device=dev, dtype=self.cache_dtype)

        t0 = time.perf_counter()
        logits_BV = self._forward(tokens_BP, cache, torch.arange(P, device=dev), valid_BP)[:, -1]
        nxt_B = _draw(process_logits(logits_BV, seen_BV, s, mode), lrandom.fold_in(key, 0), mode)
        first = nxt_B.tolist()
        t_first = time.perf_counter() - t0

        out = [[] for _ in range(B)]
        finish = ["length"] * B
        done = [False] * B
        texts, shown = [""] * B, [0] * B
        hold = max((len(x) for x in stop), default=1) - 1  # streamed text never shows a partial stop string
        eos = set(eos_ids)

        def accept(row_tokens: list[int]) -> None:
            for b, tok in enumerate(row_tokens):
                if done[b]:
                    continue
                if tok in eos:
                    done[b], finish[b] = True, "eos"
                else:
                    out[b].append(tok)
                if self.tokenizer is None:
                    continue
                text = self.tokenizer.decode(out[b])
                cut = min((text.find(x) for x in stop if x in text), default=-1)
                if cut >= 0:
                    text, done[b], finish[b] = text[:cut], True, "stop"
                texts[b] = text
                if on_text is not None:
                    end = len(text) if done[b] else max(shown[b], len(text) - hold)
                    while end > shown[b] and text[end - 1] == "\ufffd":  # an incomplete UTF-8 sequence
                        end -= 1
                    if end > shown[b]:
                        on_text(b, text[shown[b] : end])
                        shown[b] = end

        accept(first)
        step = self._step_fn(mode)
        steps = 0
        t1 = time.perf_counter()
        for t in range(1, max_new_tokens):
            if all(done):
                break
            pos_1 = torch.tensor([P + t - 1], device=dev)
            nxt_B, seen_BV = step(nxt_B, cache, pos_1, seen_BV, s, key, torch.tensor(t, device=dev))
            steps += 1
            accept(nxt_B.tolist())
        decode_s = time.perf_counter() - t1
        if on_text is not None:  # flush what was held back
            for b in range(B):
                if len(texts[b]) > shown[b]:
                    on_text(b, texts[b][shown[b] :])
        return Generation(
            tokens=out,
            finish=finish,
            prefill_s=t_first,
            decode_s=decode_s,
            decode_steps=steps,
            first_token_s=t_first,
            texts=texts,
        )

    def generate(self, prompts: str | Sequence[str], **kw) -> list[str]:
        """Texts for text prompts (a string: one prompt); ``kw`` as ``generate_ids``."""
        single = isinstance(prompts, str)
        gen = self.generate_ids(self.encode([prompts] if single else list(prompts)), **kw)
        return gen.texts[0] if single else gen.texts


def stream_to(file=sys.stdout) -> Callable[[int, str], None]:
    """An ``on_text`` callback printing row 0 as it is produced."""

    def on_text(row: int, text: str) -> None:
        if row == 0:
            file.write(text)
            file.flush()

    return on_text


class Chat:
    """A multi-turn ChatML conversation with one model, rendered exactly as chat training renders
    it (``lumina.data.chat``: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message) and then
    ``<|im_start|>assistant\\n`` for the reply, which ends at ``<|im_end|>`` (or end-of-text).

    The history is kept within the model's context: before each reply the oldest turns after the
    system prompt are dropped until the prompt plus ``max_new_tokens`` fits ``max_seq_len``
    (``lumina.data.chat.truncate``, the rule chat training applies). Turn ``i`` samples with seed
    ``seed + i``: a conversation is reproducible and its turns are not copies of each other."""

    def __init__(self, gen: Generator, system: str | None = None, max_new_tokens: int = 256, seed: int = 0):
        tok = gen.tokenizer
        if tok is None:
            raise GenerateError("chat needs the model's tokenizer")
        if max(tok.im_start_id, tok.im_end_id) >= gen.n_allowed:
            raise GenerateError(
                f"the model's vocabulary ({gen.cfg.vocab_size}) has no room for the chat tokens "
                f"<|im_start|>={tok.im_start_id} / <|im_end|>={tok.im_end_id}"
            )
        self.gen, self.tok = gen, tok
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.header = [tok.im_start_id, *tok.encode("assistant\n")]
        self.last: Generation | None = None

    def prompt_ids(self) -> list[int]:
        """The conversation so far (ending with the user's turn) as the prompt of the next reply."""
        from lumina.data.chat import render, truncate

        budget = self.gen.cfg.max_seq_len - self.max_new_tokens - len(self.header)
        kept = [m for m in self.messages[:1] if m["role"] == "system"] + self.messages[-1:]
        need = len(render(kept, self.tok)[0])
        if need > budget:
            raise GenerateError(
                f"this turn needs {need} tokens (with the system prompt) but the model's context "
                f"({self.gen.cfg.max_seq_len}) less --max-new-tokens ({self.max_new_tokens}) leaves {budget}"
            )
        ids, _ = truncate(self.messages, self.tok, budget)
        return ids + self.header

    def say(
        self,
        text: str,
        sampling: Sampling = Sampling(),
        stop: Sequence[str] = (),
        on_text: Callable[[int, str], None] | None = None,
    ) -> str:
        """The model's reply to the user's ``text``; both join the history."""
        self.messages.append({"role": "user", "content": text})
        try:
            prompt = self.prompt_ids()
        except GenerateError:
            self.messages.pop()
            raise
        turn = sum(m["role"] == "assistant" for m in self.messages)
        self.last = self.gen.generate_ids(
            [prompt],
            max_new_tokens=self.max_new_tokens,
            sampling=sampling,
            seed=self.seed + turn,
            eos_ids=[self.tok.im_end_id, self.tok.eot_id],
            stop=stop,
            on_text=on_text,
        )
        reply = self.last.texts[0]
        self.messages.append({"role": "assistant", "content": reply})
        return reply
