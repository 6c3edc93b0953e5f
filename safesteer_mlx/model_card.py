"""The model card (README.md) of an export: what the model is, how it was aligned, how well, and
how to load it in each runtime."""

from __future__ import annotations

from pathlib import Path

from safesteer_mlx.eval_tables import summary_markdown
from safesteer_mlx.run import atomic_write_text, read_json


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _shown(value, repo: str | None):
    """A card pushed to the hub names local files by their file name only (no home paths)."""
    if repo and isinstance(value, str) and value and Path(value).expanduser().exists():
        return Path(value).name
    return value


def _usage(fmt: str, name: str, repo: str | None) -> str:
    """How to load the export from `name` (its path), or from the hub `repo` it is pushed to."""
    filename = Path(name).name
    name = repo or name
    if fmt == "hf":
        return (
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f'model = AutoModelForCausalLM.from_pretrained("{name}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{name}")\n```\n\n'
            "MLX reads this directory too: `mlx_lm.generate --model DIR --prompt ...`. "
            f"For llama.cpp, convert it with `convert_hf_to_gguf.py {name}` or export "
            "`--format gguf`."
        )
    if fmt == "mlx":
        return (
            f'```sh\nmlx_lm.generate --model {name} --prompt "Hello"\n```\n\n'
            "```python\nfrom mlx_lm import load, generate\n"
            f'model, tokenizer = load("{name}")\n```'
        )
    if fmt == "gguf" and repo:
        return (
            f"```sh\nllama-cli -hf {repo} -cnv\n```\n\n"
            "```python\nfrom llama_cpp import Llama\n"
            f'llm = Llama.from_pretrained(repo_id="{repo}", filename="{filename}")\n```'
        )
    if fmt == "gguf":
        return (
            f"```sh\nllama-cli -m {name} -cnv\n```\n\n"
            "```python\nfrom llama_cpp import Llama\n"
            f'llm = Llama(model_path="{name}")\n```'
        )
    fetch = f"hf download {repo} {filename}\n" if repo else ""
    return (
        "The steering direction (the safety teacher) as a llama.cpp control vector. It steers "
        "the *base* model, not an aligned one:\n\n"
        f"```sh\n{fetch}llama-cli -m BASE.gguf --control-vector "
        f"{filename if repo else name}\n```\n\n"
        "`--control-vector-scaled FILE S` scales it; the file already holds coefficient x "
        "direction."
    )


def write_model_card(
    path: Path,
    run,
    config,
    model: dict,
    fmt: str,
    dtype: str,
    info: dict,
    *,
    where: str,
    repo: str | None = None,
) -> None:
    """README.md: base model, method, config, safety tokens, evaluation, and how to load the
    export from `where` (its final path) in each runtime. `model`: the base's family,
    num_layers and hidden_size (config.toml's resolved_model)."""
    from safesteer_mlx.run import RunDir

    run = run if isinstance(run, RunDir) else RunDir(run)
    direction = read_json(run.direction_json) or {}
    tokens = read_json(run.safety_tokens)
    evaluation = read_json(run.eval_json)
    adapter = read_json(run.adapters / "adapter_config.json") or {}
    d = config.distill

    library = {"hf": "transformers", "mlx": "mlx", "gguf": "gguf"}.get(fmt, "gguf")
    out = ["---", f"tags: [safesteer-mlx, safety, refusal, {library}]", f"library_name: {library}"]
    out += ["---", "", f"# {run.path.name} ({fmt})", ""]
    out.append(
        f"**Base model:** `{_shown(config.model.name, repo)}` ({model.get('family')}, "
        f"{model.get('num_layers')} layers, hidden {model.get('hidden_size')})"
        + (
            f", with the adapter `{_shown(config.model.adapter_path, repo)}` fused first"
            if config.model.adapter_path
            else ""
        )
        + "."
    )
    out += [
        "",
        "Aligned with safesteer-mlx (SafeSteer on MLX): a refusal "
        "direction added at one layer is the safety teacher; the 50 tokens it boosts most are "
        "the safety tokens S; the student (LoRA on the base) is distilled on-policy with the "
        "reverse KL restricted to S.",
        "",
        "## Export",
        "",
        f"- format: `{fmt}`, dtype: `{dtype}`"
        + "".join(f", {k}: `{v}`" for k, v in info.items() if v is not None),
    ]
    if adapter and fmt != "control-vector":  # a control vector is the teacher: nothing fused
        lp = adapter.get("lora_parameters", {})
        out.append(
            f"- adapters fused: {adapter.get('fine_tune_type', 'lora')}, rank {lp.get('rank')}, "
            f"scale {lp.get('scale')}, {adapter.get('num_layers')} layers"
        )
    out += ["", "## Method and configuration", ""]
    if direction:
        out.append(
            f"- teacher: direction at layer {direction.get('layer')}, position "
            f"{direction.get('position')}, coefficient {_fmt(direction.get('coefficient'))}, "
            f"norm {_fmt(direction.get('norm'))}"
        )
    out.append(
        f"- distillation: loss `{d.loss}`, {d.fine_tune_type} rank {d.lora_rank}, lr "
        f"{_fmt(d.lr)}, {d.num_prompts} prompts x {d.generations} rollouts of {d.max_tokens} "
        f"tokens, {d.epochs} epoch(s), seed {config.seed}"
    )
    harmful, harmless = (_shown(x, repo) for x in (config.data.harmful, config.data.harmless))
    out.append(f"- prompts: harmful `{harmful}`, harmless `{harmless}`")
    if isinstance(tokens, dict):
        tokens = tokens.get("tokens")
    if isinstance(tokens, list) and tokens:
        shown = ", ".join(f"`{t.get('token', '')!r}`" for t in tokens[:50] if isinstance(t, dict))
        out += ["", f"## Safety tokens S ({len(tokens)})", "", shown]
    summary = evaluation.get("summary") if isinstance(evaluation, dict) else None
    if isinstance(summary, list) and summary:
        out += ["", "## Evaluation (before / after alignment)", "", summary_markdown(evaluation)]
    out += ["", "## Load it", "", _usage(fmt, where, repo)]
    atomic_write_text(path, "\n".join(out) + "\n")
