"""Command line: `python -m engine {demo,train,generate,convert,info,bench}` (console script `llama4-engine`).

`demo` is the main job (`make run`): trains the scout-debug model byte-level on this repository's own
sources and docs (no network), prints loss and tokens/s with a progress bar, saves a loss-curve PNG and
the model, then generates a sample; on a GPU it also times one training step of a 2-layer full-width
Scout and prints its MFU.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

DEMO_PROMPT = "def "
DEMO_OUT = "out/demo"
# 600 steps of 8 x 128 bytes: the loss falls from ln(259) = 5.56 to ~1.9 (validation 1.5-1.8) in 95-125 s on
# the 2-core development machine (1 thread, 0.12-0.19 s per step depending on other load).
DEMO_STEPS, DEMO_BATCH, DEMO_SEQ, DEMO_LR, DEMO_WARMUP = 600, 8, 128, 3e-3, 20
DEMO_EVAL_EVERY = 50
DEMO_MIN_STEPS_TO_JUDGE = 50
# One CPU thread: the ops of a 64-wide model are too small to split, and with two threads any other load
# on a 2-core machine makes OpenMP's spin-waiting cost 10x (measured 0.11 s vs 1.7 s per step).
DEMO_CPU_THREADS = 1
DEMO_SAMPLE_TOKENS = 240
# The GPU part of the demo: one training step of a 2-layer full-width Scout (D = 5120, 16 experts).
GPU_DEMO_LAYERS, GPU_DEMO_SEQ = 2, 4096
PROGRESS_WIDTH = 30


def _device(requested: str | None = None) -> str:
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def _repo_root() -> Path:
    """The source tree the demo trains on: the repository when run from a checkout, else the package."""
    import engine

    package = Path(engine.__file__).resolve().parent
    return package.parent if (package.parent / "csrc").is_dir() else package


class Progress:
    """A one-line progress bar on a terminal (carriage returns), plain log lines every 10 % otherwise."""

    def __init__(self, total: int, stream=None) -> None:
        self.total, self.stream = total, stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()
        self._last_decile = -1

    def update(self, done: int, text: str) -> None:
        frac = done / max(self.total, 1)
        elapsed = time.perf_counter() - self.start
        eta = elapsed / frac - elapsed if frac > 0 else float("nan")
        bar = "#" * int(frac * PROGRESS_WIDTH) + "." * (PROGRESS_WIDTH - int(frac * PROGRESS_WIDTH))
        line = f"[{bar}] {done}/{self.total} {text} | {elapsed:.0f}s, eta {eta:.0f}s"
        if self.tty:
            self.stream.write("\r" + line)
            if done >= self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif int(frac * 10) > self._last_decile or done >= self.total:
            self._last_decile = int(frac * 10)
            print(line, file=self.stream, flush=True)


# --------------------------------------------------------------------------------------------
# Shared pieces of train / demo / generate
# --------------------------------------------------------------------------------------------
def _byte_config(preset: str, **overrides):
    """A preset whose vocabulary is the byte-level tokenizer's (debug presets: 256 -> 259 ids)."""
    from engine.model import Llama4Config
    from engine.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    config = Llama4Config.preset(
        preset,
        vocab_size=tok.vocab_size,
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id],
        pad_token_id=tok.pad_token_id,
        **overrides,
    )
    return config, tok


def _text_tokens(files: list[Path], tokenizer) -> torch.Tensor:
    """All files as one stream: each file's tokens after a BOS, in sorted order."""
    ids: list[int] = []
    for path in files:
        ids += tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"), add_bos=True)
    return torch.tensor(ids, dtype=torch.int64)


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if math.isfinite(x) else "-"


def _train_loop(trainer, stream, args, *, device: str, val_stream=None, progress: bool = True) -> dict:
    """Runs trainer until args.steps, printing progress; returns the loss history."""
    history: dict[str, list] = {"train": [], "val": []}
    bar = Progress(args.steps - trainer.step) if progress else None
    start_step = trainer.step
    tokens, seconds = 0, 0.0
    while trainer.step < args.steps:
        ids, labels = stream.batch(trainer.step, args.batch_size, args.seq_len, device=device)
        stats = trainer.train_step(ids, labels)
        history["train"].append((stats.step, stats.loss))
        if stats.step > start_step + 1:  # the first step pays one-time allocation and warm-up
            tokens += stats.tokens
            seconds += stats.seconds
        rate = tokens / seconds if seconds else float("nan")
        if val_stream is not None and (
            stats.step == start_step + 1 or stats.step % args.eval_every == 0 or stats.step == args.steps
        ):
            vids, vlabels = val_stream.batch(0, args.batch_size, args.seq_len, device=device)
            history["val"].append((stats.step, trainer.evaluate(vids, vlabels)))
        text = (
            f"loss {stats.loss:.3f}"
            + (f" (val {history['val'][-1][1]:.3f})" if history["val"] else "")
            + f" | {_fmt_rate(rate)} tok/s | scale {stats.loss_scale:.0f}"
            + (f" | expert load max/mean {stats.load_imbalance:.2f}" if stats.expert_load is not None else "")
            + (" | SKIPPED (overflow)" if stats.skipped else "")
        )
        if bar is not None:
            bar.update(stats.step - start_step, text)
        if getattr(args, "save_every", 0) and args.save_dir and stats.step % args.save_every == 0:
            trainer.save(args.save_dir)
    history["tokens_per_s"] = tokens / seconds if seconds else float("nan")
    history["step_seconds"] = seconds / max(1, trainer.step - start_step - 1)
    return history


def _plot(history: dict, path: Path, title: str) -> Path:
    from engine.plot import line_plot_png

    series = {"train": history["train"]}
    if history["val"]:
        series["val"] = history["val"]
    return line_plot_png(path, series, title=title, xlabel="step")


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    import engine
    from engine.generate import generate
    from engine.train import TokenStream, TrainConfig, Trainer, build_model, repo_text_files

    device = _device(args.device)
    if device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    # The debug preset's head_dim is 64 already, the smallest the CUDA attention kernels take.
    config, tok = _byte_config("scout-debug")
    root = _repo_root()
    files = repo_text_files(root)
    stream = TokenStream(_text_tokens(files, tok), seed=args.seed)
    train_stream, val_stream = stream.split()
    model = build_model(config, device=device)
    trainer = Trainer(
        model,
        TrainConfig(lr=args.lr, warmup_steps=DEMO_WARMUP, total_steps=args.steps, weight_decay=0.01),
    )
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(f"llama4 engine {engine.__version__} demo on {device} ({torch.get_num_threads()} threads)")
    print(
        f"training scout-debug ({model.num_params():,} parameters, {config.num_hidden_layers} layers, "
        f"{config.num_local_experts} experts, top-{config.num_experts_per_tok}, {dtype}) byte-level on "
        f"{len(files)} files of {root.name}/ ({len(stream):,} bytes): {args.steps} steps of "
        f"{args.batch_size} x {args.seq_len} tokens, AdamW8bit lr {args.lr:g}"
    )
    history = _train_loop(trainer, train_stream, args, device=device, val_stream=val_stream)
    first, last = history["train"][0][1], history["train"][-1][1]
    print(
        f"loss {first:.3f} -> {last:.3f} (validation {history['val'][-1][1]:.3f}), "
        f"{_fmt_rate(history['tokens_per_s'])} tokens/s, {history['step_seconds'] * 1e3:.0f} ms/step, "
        f"{trainer.scaler.skipped_steps} steps skipped"
    )
    out = Path(args.out)
    png = _plot(history, out / "loss.png", "scout-debug byte-level loss")
    print(f"loss curve: {png}")
    if args.save:
        trainer.save(out / "model", pretrained=True)
        print(f"model: {out / 'model'} (python -m engine generate --model {out / 'model'} --prompt '...')")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    prompt = torch.tensor([tok.encode(DEMO_PROMPT)], device=device)
    sample = generate(
        model, prompt, DEMO_SAMPLE_TOKENS, temperature=0.8, top_p=0.95, stop_tokens=tok.stop_token_ids, generator=gen
    )
    print(f"sample (temperature 0.8, top-p 0.95) after {DEMO_PROMPT!r}:")
    print("    " + tok.decode(sample[0].tolist()).replace("\n", "\n    "))
    # A run long enough to learn must lower the held-out loss; a short smoke run only has to stay finite.
    val_first, val_last = history["val"][0][1], history["val"][-1][1]
    ok = math.isfinite(last) and (args.steps < DEMO_MIN_STEPS_TO_JUDGE or val_last < val_first)
    if not ok:
        print(f"FAILED: validation loss {val_first:.3f} -> {val_last:.3f} did not fall", file=sys.stderr)
    if device == "cuda" and not args.no_gpu_step:
        ok &= _demo_gpu_step(args)
    return 0 if ok else 1


def _demo_gpu_step(args: argparse.Namespace, *, device: str = "cuda", config=None, seq_len: int = GPU_DEMO_SEQ) -> bool:
    """One timed training step (after a warm-up step) of a 2-layer full-width Scout; prints tokens/s and MFU.
    (`config` / `device` let a test run the same code on a debug model on the CPU.)"""
    from engine.model import Llama4Config
    from engine.train import TrainConfig, Trainer, build_model, mfu

    config = config or Llama4Config.preset("scout", layers=GPU_DEMO_LAYERS)
    torch.manual_seed(args.seed)
    model = build_model(config, device=device)
    trainer = Trainer(model, TrainConfig(lr=1e-4))
    ids = torch.randint(0, config.vocab_size, (1, seq_len), device=device)
    trainer.train_step(ids)
    stats = trainer.train_step(ids)
    cuda = device == "cuda"
    util = mfu(model, stats.tokens_per_s, seq_len) if cuda else None
    where = (
        f"{torch.cuda.get_device_name()}, peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
        if cuda
        else device
    )
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(
        f"scout {config.num_hidden_layers}-layer slice (D={config.hidden_size}, {config.num_local_experts} experts, "
        f"{model.num_params() / 1e9:.2f}B parameters), seq {seq_len}, {dtype}: one training step "
        f"{stats.seconds * 1e3:.0f} ms, {stats.tokens_per_s:,.0f} tokens/s, "
        f"MFU {'-' if util is None else f'{100 * util:.1f} %'} ({where})"
    )
    del trainer, model
    if cuda:
        torch.cuda.empty_cache()
    return math.isfinite(stats.loss)


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------
TRAIN_ARGS_FILE = "train_args.json"
# What a resume takes from the saved run (the data and the model must be the same ones).
RESUMED_ARGS = ("preset", "model", "layers", "data", "tokenizer", "seed", "batch_size", "seq_len", "precision")


def cmd_train(args: argparse.Namespace) -> int:
    from engine.tokenizer import load_tokenizer
    from engine.train import PrecisionUnavailable, TokenStream, TrainConfig, Trainer, build_model, repo_text_files

    device = _device(args.device)
    if args.resume:
        saved = json.loads((Path(args.resume) / TRAIN_ARGS_FILE).read_text())
        for key in RESUMED_ARGS:
            setattr(args, key, saved[key])
        args.save_dir = args.save_dir or args.resume
    torch.manual_seed(args.seed)
    tok = None
    if args.model:
        from engine.checkpoint import read_config

        config = read_config(args.model)
        tok = load_tokenizer(args.tokenizer or args.model, config)
    elif args.tokenizer:
        from engine.model import Llama4Config

        config = Llama4Config.preset(args.preset, **({"layers": args.layers} if args.layers else {}))
        tok = load_tokenizer(args.tokenizer, config)
    else:
        config, tok = _byte_config(args.preset, **({"layers": args.layers} if args.layers else {}))
    files = [Path(f) for f in args.data] if args.data else repo_text_files(_repo_root())
    for f in files:
        if not f.is_file():
            print(f"train: data file {f} not found", file=sys.stderr)
            return 2
    stream = TokenStream(_text_tokens(files, tok), seed=args.seed)
    try:
        model = build_model(config, precision=args.precision, device=device)
    except PrecisionUnavailable as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 2
    if args.model:
        from engine.checkpoint import from_pretrained

        model.load_state_dict(from_pretrained(args.model, dtype=next(model.parameters()).dtype).state_dict())
    trainer = Trainer(
        model,
        TrainConfig(
            lr=args.lr,
            warmup_steps=args.warmup,
            total_steps=args.steps,
            grad_clip=args.grad_clip,
            activation_checkpointing=args.activation_checkpointing,
        ),
    )
    if args.resume:
        trainer.load(args.resume)
        print(f"resumed {args.resume} at step {trainer.step}")
    print(
        f"training {args.preset if not args.model else args.model} ({model.num_params():,} parameters, "
        f"{args.precision}) on {device}: {len(stream):,} tokens from {len(files)} files, steps {trainer.step} -> "
        f"{args.steps}, batch {args.batch_size} x {args.seq_len}"
    )
    history = _train_loop(trainer, stream, args, device=device, progress=not args.quiet)
    if history["train"]:
        print(
            f"loss {history['train'][0][1]:.4f} -> {history['train'][-1][1]:.4f}, "
            f"{_fmt_rate(history['tokens_per_s'])} tokens/s"
        )
    if args.print_losses:
        print(json.dumps([round(loss, 6) for _, loss in history["train"]]))
    if args.save_dir:
        trainer.save(args.save_dir, pretrained=True)
        saved = {key: getattr(args, key) for key in RESUMED_ARGS}
        (Path(args.save_dir) / TRAIN_ARGS_FILE).write_text(json.dumps(saved, indent=2) + "\n")
        print(f"saved {args.save_dir}")
    if args.plot and history["train"]:
        print(f"loss curve: {_plot(history, Path(args.plot), 'training loss')}")
    return 0


# --------------------------------------------------------------------------------------------
# generate / convert
# --------------------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    from engine.generate import generate
    from engine.tokenizer import load_tokenizer

    device = _device(args.device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.model:
        from engine.checkpoint import from_pretrained

        model = from_pretrained(args.model, dtype=dtype, device=device)
        tok = load_tokenizer(args.model, model.config)
    else:
        from engine.model import Llama4ForCausalLM

        torch.manual_seed(args.seed)
        config, tok = _byte_config(args.preset)
        model = Llama4ForCausalLM(config, dtype=dtype, device=device).eval()
        print(f"(randomly initialised {args.preset}: pass --model DIR for trained weights)", file=sys.stderr)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    prompt = torch.tensor([tok.encode(args.prompt)], device=device)
    start = time.perf_counter()
    out = generate(
        model,
        prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        stop_tokens=tok.stop_token_ids,
        generator=gen,
        fp8_cache=args.fp8_cache,
    )
    seconds = time.perf_counter() - start
    new = out.shape[1] - prompt.shape[1]
    print(args.prompt + tok.decode(out[0, prompt.shape[1] :].tolist()))
    print(f"({new} tokens in {seconds:.2f} s, {new / seconds:.1f} tokens/s)", file=sys.stderr)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from engine.checkpoint import convert

    convert(args.src, args.dst, args.precision, device=args.device, max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"converted {args.src} -> {args.dst} ({args.precision})")
    return 0


# --------------------------------------------------------------------------------------------
# info (with --check: the router against its reference on Scout / Maverick shapes) and bench
# --------------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    import engine

    info = {
        "engine": engine.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({torch.get_num_threads()} threads)",
        "build": engine.build_info(),
    }
    print(json.dumps(info, indent=2))
    return _check_router(_device(args.device), args.iters) if args.check else 0


def _time_us(fn, device: str, iters: int) -> float:
    """Median wall time of fn in microseconds (CUDA events on a GPU)."""
    for _ in range(3):
        fn()
    samples = []
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(iters):
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
    else:
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1e6)
    return statistics.median(samples)


def _check_router(device: str, iters: int) -> int:
    """Routes Scout- and Maverick-shaped batches, checks them against the reference, prints timings."""
    from bench.shapes import MAVERICK, SCOUT
    from engine import ops

    gen = torch.Generator(device="cpu").manual_seed(0)
    print(f"fused MoE router on {device} (sigmoid top-k, Llama 4 semantics)")
    print(f"{'problem':<28}{'ours us':>10}{'reference us':>14}{'speedup':>9}  exact")
    failures = 0
    for model in (SCOUT, MAVERICK):
        for tokens, top_k in ((1, 1), (128, 1), (4096, model.top_k)):
            logits_TE = torch.randn(tokens, model.n_experts, generator=gen).to(device=device, dtype=torch.bfloat16)
            bias_E = (0.01 * torch.randn(model.n_experts, generator=gen)).to(device)
            route = ops.moe_route(logits_TE, top_k, expert_bias_E=bias_E)
            ref = ops.reference.moe_route(logits_TE, top_k, expert_bias_E=bias_E)
            exact = all(torch.equal(a, b) for a, b in zip(route[1:], ref[1:], strict=True)) and torch.allclose(
                route.topk_weights_TK, ref.topk_weights_TK, rtol=2e-6, atol=0
            )
            failures += not exact
            ours = _time_us(
                lambda lg=logits_TE, k=top_k, b=bias_E: ops.moe_route(lg, k, expert_bias_E=b), device, iters
            )
            base = _time_us(
                lambda lg=logits_TE, k=top_k, b=bias_E: ops.reference.moe_route(lg, k, expert_bias_E=b),
                device,
                max(3, iters // 10),
            )
            name = f"{model.name} T={tokens} E={model.n_experts} K={top_k}"
            print(f"{name:<28}{ours:>10.1f}{base:>14.1f}{base / ours:>8.1f}x  {'yes' if exact else 'NO'}")
    print("all results match the reference" if not failures else f"{failures} mismatches")
    return 1 if failures else 0


def cmd_bench(args: argparse.Namespace) -> int:
    import pytest

    return pytest.main(["bench", "-q", *args.pytest_args])


def main(argv: list[str] | None = None) -> int:
    from engine.model.config import PRESETS

    parser = argparse.ArgumentParser(prog="llama4-engine", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    demo = sub.add_parser("demo", help="the main job: train scout-debug on this repo's text, plot, generate")
    demo.add_argument("--device", choices=["cpu", "cuda"], default=None)
    demo.add_argument("--steps", type=int, default=DEMO_STEPS)
    demo.add_argument("--batch-size", type=int, default=DEMO_BATCH)
    demo.add_argument("--seq-len", type=int, default=DEMO_SEQ)
    demo.add_argument("--lr", type=float, default=DEMO_LR)
    demo.add_argument("--eval-every", type=int, default=DEMO_EVAL_EVERY)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default=DEMO_OUT, help=f"where the loss curve and the model go (default {DEMO_OUT})")
    demo.add_argument("--no-save", dest="save", action="store_false", help="do not save the trained model")
    demo.add_argument("--no-gpu-step", action="store_true", help="skip the full-width Scout step on a GPU")
    demo.add_argument("--threads", type=int, default=DEMO_CPU_THREADS, help="CPU threads (0: torch's default)")
    demo.set_defaults(fn=cmd_demo, save_every=0, save_dir=None)

    train = sub.add_parser("train", help="train a model (a preset, or a checkpoint with --model) on text files")
    train.add_argument("--preset", default="scout-debug", choices=sorted(PRESETS))
    train.add_argument("--layers", type=int, default=None, help="keep the preset's first N layers")
    train.add_argument("--model", default=None, help="start from a Hugging Face checkpoint folder")
    train.add_argument("--tokenizer", default=None, help="folder with tokenizer.json (default: byte-level)")
    train.add_argument("--data", nargs="*", default=None, help="text files (default: this repository's sources)")
    train.add_argument("--steps", type=int, default=100, help="train until this many steps in total")
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--seq-len", type=int, default=128)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--warmup", type=int, default=10)
    train.add_argument("--grad-clip", type=float, default=1.0)
    train.add_argument("--precision", choices=["bf16", "fp8"], default="bf16")
    train.add_argument("--activation-checkpointing", action="store_true")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", choices=["cpu", "cuda"], default=None)
    train.add_argument("--save-dir", default=None, help="write the model + trainer state here at the end")
    train.add_argument("--save-every", type=int, default=0, help="also save the trainer state every N steps")
    train.add_argument("--resume", default=None, help="continue a run saved with --save-dir")
    train.add_argument("--plot", default=None, help="write the loss curve to this PNG")
    train.add_argument("--eval-every", type=int, default=50)
    train.add_argument("--print-losses", action="store_true", help="print the loss of every step as JSON")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(fn=cmd_train)

    gen = sub.add_parser("generate", help="generate text from a checkpoint (or a random preset)")
    gen.add_argument("--model", default=None, help="Hugging Face checkpoint folder (e.g. a train --save-dir)")
    gen.add_argument("--preset", default="scout-debug", choices=sorted(PRESETS))
    gen.add_argument("--prompt", default=DEMO_PROMPT)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--fp8-cache", action="store_true", help="FP8 KV cache")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", choices=["cpu", "cuda"], default=None)
    gen.set_defaults(fn=cmd_generate)

    conv = sub.add_parser("convert", help="convert a Hugging Face checkpoint (e.g. to FP8 experts)")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--precision", choices=["fp8", "bf16"], default="fp8")
    conv.add_argument("--device", choices=["cpu", "cuda"], default=None)
    conv.add_argument("--max-shard-gb", type=float, default=5.0)
    conv.set_defaults(fn=cmd_convert)

    info = sub.add_parser("info", help="device, built kernels, versions (--check: router vs reference)")
    info.add_argument("--check", action="store_true", help="route Scout/Maverick batches, check and time them")
    info.add_argument("--device", choices=["cpu", "cuda"], default=None)
    info.add_argument("--iters", type=int, default=20)
    info.set_defaults(fn=cmd_info)

    bench = sub.add_parser("bench", help="run the benchmark suite (pytest-benchmark)")
    bench.add_argument("pytest_args", nargs=argparse.REMAINDER)
    bench.set_defaults(fn=cmd_bench)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
