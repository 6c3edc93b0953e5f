"""`safesteer-mlx …`: parse flags into the config tree, call the stage functions, render their
progress events on stderr. Nothing is computed here."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from safesteer_mlx import __version__
from safesteer_mlx._blas import HINT as BLAS_HINT
from safesteer_mlx._blas import bind_openblas
from safesteer_mlx.errors import SafeSteerError
from safesteer_mlx.progress import Event

# --quick: sizes for a smoke run of a few minutes on a laptop CPU.
QUICK = {
    "direction": {"n_train": 32, "n_val": 8, "positions": "last", "check_tokens": 16},
    "mining": {"generations": 4},
    "distill": {"num_prompts": 8, "generations": 2, "max_tokens": 48, "batch_size": 2},
    "eval": {"max_tokens": 48, "ppl_max_tokens": 512},
}


class StderrRenderer:
    """Progress bars with ETA, log lines and warnings on stderr."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._bar_open = False
        self._last = 0.0

    def _end_bar(self) -> None:
        if self._bar_open:
            sys.stderr.write("\n")
            self._bar_open = False

    def __call__(self, e: Event) -> None:
        if self.quiet and e.kind not in ("warning",):
            return
        if e.kind == "progress":
            now = time.monotonic()
            if e.total and e.done < e.total and now - self._last < 0.2 and e.done:
                return
            self._last = now
            width = 24
            frac = e.done / e.total if e.total else 0.0
            bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
            eta = f" eta {e.eta:5.0f}s" if e.eta is not None else ""
            loss = f" loss {e.data['loss']:.4g}" if "loss" in e.data else ""
            sys.stderr.write(f"\r[{e.stage}] {e.task:<20} |{bar}| {e.done}/{e.total}{eta}{loss}  ")
            self._bar_open = True
            if e.total and e.done >= e.total:
                self._end_bar()
            sys.stderr.flush()
            return
        self._end_bar()
        prefix = "warning: " if e.kind == "warning" else ""
        if e.message:
            sys.stderr.write(f"[{e.stage}] {prefix}{e.message}\n")
            sys.stderr.flush()


def _add_common(p: argparse.ArgumentParser, *, model_required: bool = False) -> None:
    p.add_argument(
        "--model",
        help="preset name, local dir, .gguf file, or hub repo id",
        required=model_required,
    )
    p.add_argument("--run-dir", type=Path, help="the run directory (default runs/<model>)")
    p.add_argument("--config", type=Path, help="a TOML file of config overrides")
    p.add_argument("--harmful", help="harmful prompts: file, builtin:harmful, hf:ORG/NAME")
    p.add_argument("--harmless", help="harmless prompts: file, builtin:harmless, hf:ORG/NAME")
    p.add_argument("--adapter-path", help="an mlx-lm LoRA adapter fused into the base model")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--system-prompt", help="system message for every prompt")
    p.add_argument("--seed", type=int)
    p.add_argument("--quick", action="store_true", help="smoke-run sizes (a few minutes on CPU)")
    p.add_argument("--force", action="store_true", help="redo stages; reuse a non-run directory")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="only warnings on stderr")


def _add_direction(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("direction (stage 1)")
    g.add_argument("--n-train", type=int, help="harmful and harmless train prompts (each)")
    g.add_argument("--n-val", type=int, help="harmful and harmless val prompts (each)")
    g.add_argument(
        "--positions",
        choices=["all", "last"],
        help="candidate positions: all post-instruction tokens, or the last",
    )
    g.add_argument("--coef", help="steering coefficient, or 'auto' (default 1.0)")
    g.add_argument("--layer", type=int, help="force the steering layer")
    g.add_argument("--position", type=int, help="force the post-instruction position (<0)")
    g.add_argument("--no-filter", action="store_true", help="keep all train prompts")
    g.add_argument("--batch-size", type=int)


def _add_mining(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mining (stage 2)")
    g.add_argument("--horizon", type=int, help="H: tokens scored per induced refusal (7)")
    g.add_argument("--top-k", type=int, help="tokens each position votes for (200)")
    g.add_argument("--num-tokens", type=int, help="|S|, the safety tokens kept (50)")
    g.add_argument("--ranking", choices=["votes", "mean"])
    g.add_argument("--min-teacher-prob", type=float)


def _add_distill(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distillation (stage 3)")
    g.add_argument("--num-prompts", type=int, help="harmful prompts distilled on (100)")
    g.add_argument("--generations", type=int, help="M: samples per prompt, mining and rollouts")
    g.add_argument("--max-tokens", type=int, help="rollout completion length (512)")
    g.add_argument("--lr", type=float, help="learning rate (default: the preset's, 1e-5 for LoRA)")
    g.add_argument("--lora-rank", type=int)
    g.add_argument("--lora-scale", type=float)
    g.add_argument("--epochs", type=int)
    g.add_argument("--train-batch-size", type=int, help="prompts per optimizer step (4)")
    g.add_argument("--micro-batch-size", type=int, help="sequences per forward/backward")
    g.add_argument("--fine-tune-type", choices=["lora", "dora", "full"])
    g.add_argument("--loss", choices=["restricted", "generalized", "renormalized", "full_vocab"])
    g.add_argument("--grad-checkpoint", action="store_true", default=None)
    g.add_argument("--save-every", type=int, help="checkpoint every N steps")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint")


def _add_stage(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text)
    _add_common(p)
    _add_direction(p)
    _add_mining(p)
    _add_distill(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safesteer-mlx",
        description="Make a chat model refuse harmful requests without making it dumber.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = _add_stage(sub, "align", "run every stage over one run directory")
    p.add_argument(
        "--export",
        choices=["hf", "mlx", "gguf", "control-vector"],
        help="export the result as the last step ([export] config section for the options)",
    )
    _add_stage(sub, "direction", "stage 1: find the refusal direction (the teacher)")
    _add_stage(sub, "mine", "stage 2: mine the safety tokens")
    _add_stage(sub, "distill", "stage 3: distil the teacher into LoRA adapters, on-policy")

    _add_eval_parser(sub)

    p = sub.add_parser("generate", help="complete prompts, optionally steered or with adapters")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter-path", help="LoRA adapter directory (mlx-lm format)")
    p.add_argument("--steer", help="direction.safetensors[:COEF] (layer from direction.json)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", help="prompts: file, builtin:NAME, hf:ORG/NAME")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--num-prompts", type=int, help="use at most N prompts (seeded sample)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--system-prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help='print [{"prompt", "completion"}]')

    _add_export_parser(sub)

    p = sub.add_parser("tui", help="the terminal UI: step through each stage of a run")
    _add_common(p)
    _add_direction(p)
    _add_mining(p)
    _add_distill(p)

    p = sub.add_parser("models", help="list the model presets and what is available locally")
    p.add_argument("--json", action="store_true")
    return parser


def _add_export_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="fuse the adapters and write an HF/MLX/GGUF model or a control vector"
    )
    p.add_argument("--run-dir", type=Path, required=True, help="the run directory")
    p.add_argument("--format", required=True, choices=["hf", "mlx", "gguf", "control-vector"])
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="default float16")
    p.add_argument("--out", type=Path, help="output directory (default RUN/export/FORMAT)")
    p.add_argument("--q-bits", type=int, choices=[4, 8], help="mlx: re-quantize the weights")
    p.add_argument("--q-group-size", type=int, help="mlx: quantization group size (64)")
    p.add_argument("--gguf-type", choices=["f32", "f16", "bf16", "q8_0"], help="default: dtype")
    p.add_argument("--upload-repo", help="push the export to the hub as ORG/NAME (HF_TOKEN)")
    p.add_argument("--force", action="store_true", help="replace an existing export")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="only warnings on stderr")


def _export_options(config, args: argparse.Namespace) -> dict:
    """run_export's keyword options: [export] config section < flags."""
    e = config.export
    get = lambda name, default: (  # noqa: E731
        getattr(args, name) if getattr(args, name, None) is not None else default
    )
    return {
        "dtype": get("dtype", e.dtype),
        "q_bits": get("q_bits", e.q_bits),
        "q_group_size": get("q_group_size", e.q_group_size),
        "gguf_type": get("gguf_type", e.gguf_type),
        "out": getattr(args, "out", None),
        "upload_repo": getattr(args, "upload_repo", None),
    }


def cmd_export(args: argparse.Namespace) -> dict:
    from safesteer_mlx.config import load_config
    from safesteer_mlx.export import run_export
    from safesteer_mlx.run import RunDir

    run = RunDir(args.run_dir)
    if not run.config.exists():
        raise SafeSteerError(
            f"{run.path} has no config.toml (give the --run-dir of a safesteer-mlx run)"
        )
    options = _export_options(load_config(run.config), args)
    render = StderrRenderer(args.quiet)
    return run_export(run, args.format, force=args.force, progress=render, **options)


def _add_eval_parser(sub) -> argparse.ArgumentParser:
    """`eval`: its --adapter-path is the adapters evaluated, its prompt options the eval sets
    (dests prefixed eval_ so they never reach the run's [model]/[data] sections)."""
    p = sub.add_parser(
        "eval",
        help="base vs base + adapters: refusals, over-refusal, KL, perplexity -> report.md",
    )
    p.add_argument("--run-dir", type=Path, help="a run: evaluates base vs base + its adapters/")
    p.add_argument("--model", help="a model (then --adapter-path gives the adapters)")
    p.add_argument(
        "--adapter-path", dest="eval_adapter_path", metavar="DIR", help="the adapters evaluated"
    )
    p.add_argument("--config", type=Path, help="a TOML file of config overrides")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--system-prompt")
    p.add_argument("--seed", type=int)
    p.add_argument("--quick", action="store_true", help="smoke-run sizes")
    p.add_argument("--force", action="store_true", help="re-evaluate even when up to date")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="only warnings on stderr")
    src = "file, builtin:NAME, hf:ORG/NAME, or a benchmark name"
    p.add_argument(
        "--harmful",
        dest="eval_harmful",
        metavar="SRC",
        help=f"harmful prompts ({src}; default: the run's val)",
    )
    p.add_argument(
        "--harmless",
        dest="eval_harmless",
        metavar="SRC",
        help=f"harmless prompts ({src}; default: the run's val)",
    )
    p.add_argument(
        "--borderline",
        dest="eval_borderline",
        metavar="SRC",
        help=f"benign refusal-bait prompts, e.g. xstest ({src})",
    )
    p.add_argument(
        "--num-prompts",
        dest="eval_num_prompts",
        metavar="N",
        type=int,
        help="at most N prompts per set",
    )
    p.add_argument(
        "--max-tokens",
        dest="eval_max_tokens",
        metavar="N",
        type=int,
        help="completion length (128)",
    )
    p.add_argument(
        "--batch-size", dest="eval_batch_size", metavar="N", type=int, help="sequences at once (16)"
    )
    p.add_argument("--judge", help="an MLX chat model as LLM judge (e.g. a Llama-Guard-3-1B dir)")
    p.add_argument("--judge-format", choices=["auto", "refusal", "llama-guard"])
    p.add_argument("--ppl-text", help="held-out text for perplexity (default builtin:heldout)")
    p.add_argument("--refusal-phrases", help="comma-separated substring judge phrases")
    return p


def _eval_overrides(args: argparse.Namespace) -> dict:
    get = lambda name: getattr(args, name, None)  # noqa: E731
    values = {
        "adapter_path": get("eval_adapter_path"),
        "harmful": get("eval_harmful"),
        "harmless": get("eval_harmless"),
        "borderline": get("eval_borderline"),
        "num_prompts": get("eval_num_prompts"),
        "max_tokens": get("eval_max_tokens"),
        "batch_size": get("eval_batch_size"),
        "judge": get("judge"),
        "judge_format": get("judge_format"),
        "ppl_text": get("ppl_text"),
        "refusal_phrases": get("refusal_phrases"),
    }
    return {"eval": {k: v for k, v in values.items() if v is not None}}


def cmd_eval(args: argparse.Namespace) -> dict:
    from safesteer_mlx.config import apply_overrides, load_config
    from safesteer_mlx.evaluate import run_eval
    from safesteer_mlx.modeling import load_configured

    if args.run_dir is None and args.model is None:
        raise SafeSteerError("eval needs --run-dir DIR, or --model M [--adapter-path P]")
    if args.model is None and not (args.run_dir / "config.toml").exists():
        raise SafeSteerError(
            f"{args.run_dir} is not a run directory (no config.toml): give the run of an "
            "`align`, or --model M --adapter-path P"
        )
    config, run_dir = resolve_config(args)
    saved = run_dir / "config.toml"
    if args.model is None and saved.exists():
        # Evaluating a run: its model, data split and seed stay as trained (--quick, --seed or
        # --config must not move the held-out split onto prompts it distilled on); only [eval]
        # takes this command's settings.
        trained = load_config(saved)
        trained.eval = config.eval
        config = trained
    apply_overrides(config, _eval_overrides(args))
    render = StderrRenderer(args.quiet)
    render(Event("eval", "log", f"loading {config.model.name}"))
    loaded = load_configured(config.model)
    run = _prepare_run(config, run_dir, args.force, loaded)
    result = run_eval(config, run, loaded=loaded, progress=render, force=args.force)
    return {"run_dir": str(run.path), **result}


def _overrides(args: argparse.Namespace) -> dict:
    get = lambda name: getattr(args, name, None)  # noqa: E731
    coef = get("coef")
    return {
        "model": {"name": get("model"), "adapter_path": get("adapter_path"), "dtype": get("dtype")},
        "data": {
            "harmful": get("harmful"),
            "harmless": get("harmless"),
            "system_prompt": get("system_prompt"),
        },
        "direction": {
            "n_train": get("n_train"),
            "n_val": get("n_val"),
            "positions": get("positions"),
            "coef": coef,
            "layer": get("layer"),
            "position": get("position"),
            "filter_train": False if get("no_filter") else None,
            "batch_size": get("batch_size"),
        },
        "mining": {
            "horizon": get("horizon"),
            "top_k": get("top_k"),
            "num_tokens": get("num_tokens"),
            "ranking": get("ranking"),
            "min_teacher_prob": get("min_teacher_prob"),
            "generations": get("generations"),
            "batch_size": get("batch_size"),
        },
        "distill": {
            "num_prompts": get("num_prompts"),
            "generations": get("generations"),
            "max_tokens": get("max_tokens"),
            "lr": get("lr"),
            "lora_rank": get("lora_rank"),
            "lora_scale": get("lora_scale"),
            "epochs": get("epochs"),
            "batch_size": get("train_batch_size"),
            "micro_batch_size": get("micro_batch_size"),
            "fine_tune_type": get("fine_tune_type"),
            "loss": get("loss"),
            "grad_checkpoint": get("grad_checkpoint"),
            "save_every": get("save_every"),
        },
    }


def resolve_config(args: argparse.Namespace):
    """Defaults < the run directory's config.toml < --config FILE < --quick < flags."""
    from safesteer_mlx.config import Config, apply_overrides, load_config
    from safesteer_mlx.models import DEFAULT_MODEL

    run_dir = args.run_dir
    config = Config()
    if run_dir is not None and (run_dir / "config.toml").exists():
        config = load_config(run_dir / "config.toml")
    if args.config is not None:
        from safesteer_mlx.config import read_overrides

        apply_overrides(config, read_overrides(args.config))
    if args.quick:
        apply_overrides(config, QUICK)
    flags = {
        s: {k: v for k, v in vals.items() if v is not None} for s, vals in _overrides(args).items()
    }
    apply_overrides(config, flags)
    if args.seed is not None:
        config.seed = args.seed
    if not config.model.name:
        config.model.name = DEFAULT_MODEL
    if run_dir is None:
        run_dir = Path("runs") / Path(config.model.name).name.replace(".gguf", "")
    return config, run_dir


def _prepare_run(config, run_dir: Path, force: bool, loaded):
    from safesteer_mlx.session import prepare_run

    return prepare_run(config, run_dir, force, loaded)


def _direction_summary(result: dict) -> dict:
    summary = {k: result[k] for k in ("layer", "position", "coefficient", "norm")}
    summary.update({k: v for k, v in result["premise"].items() if k != "teacher_examples"})
    return summary


def _mining_summary(result: dict) -> dict:
    return {
        "num_tokens": len(result["tokens"]),
        "tokens": [t["token"] for t in result["tokens"]],
    }


def run_stages(args: argparse.Namespace, stages: tuple[str, ...]) -> dict:
    """Load the model once, then run the given stages in order over one run directory."""
    from safesteer_mlx.direction import run_direction
    from safesteer_mlx.distill import run_distill
    from safesteer_mlx.mining import run_mining
    from safesteer_mlx.modeling import load_configured

    config, run_dir = resolve_config(args)
    render = StderrRenderer(args.quiet)
    render(Event(stages[0], "log", f"loading {config.model.name}"))
    loaded = load_configured(config.model)
    run = _prepare_run(config, run_dir, args.force, loaded)
    summary: dict = {"run_dir": str(run.path)}
    common = {"loaded": loaded, "progress": render, "force": args.force}
    for stage in stages:
        if stage == "direction":
            summary["direction"] = _direction_summary(run_direction(config, run, **common))
        elif stage == "mining":
            summary["mining"] = _mining_summary(run_mining(config, run, **common))
        elif stage == "distill":
            resume = bool(getattr(args, "resume", False))
            summary["distill"] = run_distill(config, run, resume=resume, **common)
        elif stage == "eval":
            from safesteer_mlx.evaluate import run_eval

            if "distill" in stages and config.distill.fine_tune_type == "full":
                # full fine-tuning trained the loaded weights in place: evaluate a fresh base
                # (the trained copy is dropped first, so two never sit in memory)
                loaded = common["loaded"] = None
                common["loaded"] = load_configured(config.model)
            result = run_eval(config, run, **common)
            summary["eval"] = {"summary": result["summary"], "report": result["report"]}
    is_align = getattr(args, "command", None) == "align"
    fmt = getattr(args, "export", None) or (config.export.format if is_align else None)
    if fmt:
        from safesteer_mlx.export import run_export

        # align's --dtype is the model's load dtype; the export's options come from [export].
        options = _export_options(config, argparse.Namespace())
        summary["export"] = run_export(run, fmt, **common, **options)
    summary["stages"] = run.manifest()["stages"]
    return summary


def cmd_direction(args: argparse.Namespace) -> dict:
    return run_stages(args, ("direction",))


def cmd_mine(args: argparse.Namespace) -> dict:
    return run_stages(args, ("mining",))


def cmd_distill(args: argparse.Namespace) -> dict:
    return run_stages(args, ("distill",))


def cmd_align(args: argparse.Namespace) -> dict:
    return run_stages(args, ("direction", "mining", "distill", "eval"))


def _parse_steer(spec: str) -> tuple[Path, float | None]:
    path, _, coef = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    if coef:
        try:
            return Path(path), float(coef)
        except ValueError:
            raise SafeSteerError(f"--steer {spec!r}: {coef!r} is not a number") from None
    return Path(path), None


def cmd_generate(args: argparse.Namespace) -> list[dict]:
    import contextlib

    from safesteer_mlx.data import Prompt, load_prompts
    from safesteer_mlx.direction import load_direction
    from safesteer_mlx.generation import generate_batch
    from safesteer_mlx.modeling import load_model, steered
    from safesteer_mlx.prompting import encode_prompts

    steer = None
    if args.steer:
        path, coef = _parse_steer(args.steer)
        direction, meta = load_direction(path)
        steer = (direction, meta["layer"], coef if coef is not None else meta["coefficient"])
    if args.prompt is not None:
        prompts = [Prompt(args.prompt)]
    else:
        prompts = load_prompts(args.prompts, limit=args.num_prompts, seed=args.seed)
    loaded = load_model(args.model, dtype=args.dtype)
    if args.adapter_path:
        from mlx_lm.tuner.utils import load_adapters

        load_adapters(loaded.model, args.adapter_path)
        loaded.model.eval()
    seqs = encode_prompts(loaded, prompts, args.system_prompt)
    ctx = steered(loaded.model, *steer) if steer else contextlib.nullcontext()
    with ctx:
        gen = generate_batch(
            loaded.model,
            loaded.tokenizer,
            seqs,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            seed=args.seed,
            batch_size=args.batch_size,
        )
    sys.stderr.write(
        f"[generate] {gen.generation_tokens} tokens at {gen.generation_tps:.1f} tokens/s, "
        f"peak memory {gen.peak_memory_gb:.2f} GB\n"
    )
    return [{"prompt": p.instruction, "completion": t} for p, t in zip(prompts, gen.texts)]


def cmd_tui(args: argparse.Namespace) -> None:
    """The Textual app over the run directory (config as `align` would resolve it)."""
    from safesteer_mlx.tui import run_app

    config, run_dir = resolve_config(args)
    run_app(config, run_dir)


def cmd_models(args: argparse.Namespace) -> list[dict]:
    from safesteer_mlx.models import list_rows

    return list_rows()


def _print_models(rows: list[dict]) -> None:
    print(f"{'name':<14} {'params':>7} {'size':>7}  {'family':<7} {'quantization':<22} status")
    for r in rows:
        status = f"available ({r['path']})" if r["available"] else r["hint"]
        default = " (default)" if r.get("default") else ""
        print(
            f"{r['name']:<14} {r['params']:>6.2f}B {r['size_gb']:>5.2f}GB  {r['family']:<7} "
            f"{r['quantization']:<22} {status}{default}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not bind_openblas() and args.command not in ("models",):
        sys.stderr.write(BLAS_HINT + "\n")
    commands = {
        "align": cmd_align,
        "direction": cmd_direction,
        "mine": cmd_mine,
        "distill": cmd_distill,
        "generate": cmd_generate,
        "export": cmd_export,
        "models": cmd_models,
        "tui": cmd_tui,
        "eval": cmd_eval,
    }
    try:
        result = commands[args.command](args)
    except SafeSteerError as e:
        sys.stderr.write(f"safesteer-mlx: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(
            "safesteer-mlx: interrupted; rerun the same command to continue "
            "(distill: add --resume)\n"
        )
        return 130
    if args.command == "tui":
        return 0
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    elif args.command == "models":
        _print_models(result)
    elif args.command == "eval":
        from safesteer_mlx.eval_tables import summary_markdown

        print(summary_markdown(result))
        print(f"report: {result['report']}")
    elif args.command == "generate":
        for r in result:
            print(f"### {r['prompt']}\n{r['completion']}\n")
    else:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
