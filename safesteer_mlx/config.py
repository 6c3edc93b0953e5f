"""One typed config tree, read from TOML and CLI flags, written back with every default.

Defaults are the SafeSteer authors' reference values (Refusal-direction selection as in
Arditi et al.'s pipeline) unless noted.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from safesteer_mlx.errors import SafeSteerError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    try:
        import tomli as tomllib
    except ImportError:  # pragma: no cover
        tomllib = None


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  # preset, local dir, .gguf file, or hub repo id
    dtype: str | None = None  # float32|float16|bfloat16; None: the preset's, else as stored
    adapter_path: str | None = None  # an mlx-lm adapter fused into the base before alignment
    revision: str | None = None  # hub revision


@dataclass
class DataConfig:
    harmful: str = "builtin:harmful"  # prompt source (file, builtin:NAME, hf:ORG/NAME)
    harmless: str = "builtin:harmless"
    system_prompt: str | None = None  # None: the chat template's default


@dataclass
class DirectionConfig:
    n_train: int = 128  # per side (harmful, harmless)
    n_val: int = 32  # per side, held out from the train sources, for selection
    filter_train: bool = True  # keep harmful with refusal score > 0, harmless < 0
    batch_size: int = 16
    positions: str = "all"  # "all" post-instruction template positions, or "last"
    max_layer_fraction: float = 0.8  # drop candidates in the last 20% of layers
    kl_threshold: float = 0.1  # drop candidates whose ablation moves harmless KL more
    induce_threshold: float = 0.0  # drop candidates whose induced refusal score is below
    coef: str = "1.0"  # steering coefficient, or "auto"
    layer: int | None = None  # force a layer (skips selection among layers)
    position: int | None = None  # force a post-instruction position (negative index)
    check_tokens: int = 24  # tokens generated for the premise check (refusal rates)


@dataclass
class MiningConfig:
    horizon: int = 7  # H: the teacher samples H-1 tokens; Δ is read at the last H positions
    generations: int = 8  # M: samples per harmless prompt
    top_k: int = 200  # each valid (sample, position) votes for its top-K tokens by Δ
    num_tokens: int = 50  # |S|
    min_teacher_prob: float = 1e-8  # ban tokens the teacher itself almost never produces
    ranking: str = "votes"  # "votes" (the reference) or "mean" Δ
    temperature: float = 1.0
    top_p: float = 1.0
    num_prompts: int | None = None  # harmless val prompts used (None: all of direction's val)
    batch_size: int = 16


@dataclass
class DistillConfig:
    num_prompts: int = 100  # harmful prompts distilled on (from the direction's train split)
    generations: int = 8  # M: on-policy rollouts per prompt
    max_tokens: int = 512  # rollout completion length
    temperature: float = 1.0
    top_p: float = 1.0
    epochs: int = 1
    batch_size: int = 4  # prompts per optimizer step (x generations sequences)
    micro_batch_size: int = 8  # sequences per forward/backward; gradients are accumulated
    rollout_batch_size: int = 32  # sequences generated concurrently
    lr: float | None = None  # None: the preset's measured rate, else DEFAULT_LORA_LR
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    fine_tune_type: str = "lora"  # lora | dora | full (QLoRA automatically on quantized bases)
    lora_rank: int = 8
    lora_scale: float = 20.0  # mlx-lm's LoRA scale (alpha / rank)
    lora_dropout: float = 0.0
    lora_keys: list | None = None  # None: every linear map of each block
    num_layers: int | None = None  # adapted blocks, counted from the top (None: all)
    loss: str = "restricted"  # restricted (the paper) | generalized | renormalized | full_vocab
    chunk: int = 128  # positions projected to the vocabulary at once
    # Recompute each block's activations in the backward pass. None: on for models of 3B-class
    # size and up (checkpointing_by_default), where stored activations would rival the
    # 4-bit weights; off below, where it only costs time.
    grad_checkpoint: bool | None = None
    save_every: int = 10  # checkpoint every N steps (0: only at the end)


@dataclass
class ExportConfig:
    format: str | None = None  # `align --export FORMAT`: hf | mlx | gguf | control-vector
    dtype: str = "float16"  # float16 | bfloat16 | float32 (weights are fused in float32)
    q_bits: int | None = None  # mlx only: re-quantize to 4 or 8 bits
    q_group_size: int = 64
    gguf_type: str | None = None  # f32 | f16 | bf16 | q8_0; None: from dtype


@dataclass
class EvalConfig:
    harmful: str | None = None  # source or benchmark name; None: the run's held-out harmful val
    harmless: str | None = None  # None: the run's held-out harmless val prompts
    borderline: str | None = None  # XSTest-style benign prompts (e.g. "xstest"); None: skipped
    num_prompts: int | None = None  # at most N prompts per set (seeded sample; None: all)
    max_tokens: int = 128  # completion length, greedy decoding, the same before and after
    batch_size: int = 16  # sequences generated / scored at once
    adapter_path: str | None = None  # adapters evaluated (None: the run's adapters/)
    refusal_phrases: list | None = None  # substring judge list (None: judges.REFUSAL_PHRASES)
    judge: str | None = None  # an MLX chat model as LLM judge (None: substring judge only)
    judge_format: str = "auto"  # refusal | llama-guard | auto (llama-guard if "guard" in name)
    judge_max_tokens: int = 8  # the judge's verdict length
    ppl_text: str = "builtin:heldout"  # held-out prose for perplexity (or a .txt file)
    ppl_max_tokens: int = 1024  # perplexity tokens read from the text
    ppl_window: int = 256  # tokens per perplexity window (non-overlapping)
    kl_percentile: float = 95.0  # the high percentile of per-token KL reported
    examples: int = 3  # example completions per set in report.md


# Engine sizes that fronts also need without importing MLX (the TUI's memory estimate).
# Layers x hidden from which `grad_checkpoint = None` checkpoints: between 1.5B (28 x 1536)
# and 3B (36 x 2048); 7B is 28 x 3584, SmolLM2-135M 30 x 576.
CHECKPOINT_FROM = 60_000
# Full-vocabulary logits alive at once in the loss (student and teacher, each a few float32
# copies in the forward and the backward): 2^25 = 128 MB a copy. Uncapped, a 7B's 152k
# vocabulary x 8 rows x 64 positions would be 311 MB a copy (bench/memory.py).
LOGITS_CHUNK_ELEMENTS = 1 << 25


def checkpointing_by_default(num_layers: int, hidden_size: int) -> bool:
    """The default for `grad_checkpoint = None`: on from 3B-class models up. A 7B's stored
    activations for 8 x 96 tokens are ~4 GB in bfloat16, as much as its 4-bit weights
    (bench/memory.py)."""
    return num_layers * hidden_size >= CHECKPOINT_FROM


def loss_chunk(chunk: int, rows: int, vocab: int) -> int:
    """Positions projected to the vocabulary at once: `chunk`, capped so that rows x positions
    x vocab stays within LOGITS_CHUNK_ELEMENTS."""
    return max(1, min(chunk, LOGITS_CHUNK_ELEMENTS // max(rows * vocab, 1)))


@dataclass
class Config:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    direction: DirectionConfig = field(default_factory=DirectionConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def section(self, name: str) -> dict:
        return dataclasses.asdict(getattr(self, name))


def _coerce(value: Any, typ: Any, where: str) -> Any:
    text = str(typ)
    if value is None:
        if "None" in text:
            return None
        raise SafeSteerError(f"{where} cannot be empty")
    try:
        if text.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if text.startswith("float"):
            return float(value)
        if text.startswith("bool"):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if text.startswith("str"):
            return str(value)
        if text.startswith("list"):
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return [str(v) for v in value]
        return value
    except (TypeError, ValueError):
        raise SafeSteerError(f"{where} = {value!r} is not a valid {text}") from None


def apply_overrides(config: Config, overrides: dict[str, dict[str, Any]]) -> Config:
    """Set `config.section.key` for each given value (None = leave as is), checking names/types."""
    for section, values in overrides.items():
        if section == "seed":
            config.seed = _coerce(values, "int", "seed")
            continue
        if not dataclasses.is_dataclass(getattr(config, section, None)):
            raise SafeSteerError(
                f"unknown config section [{section}] "
                f"(known: {', '.join(f.name for f in fields(Config))})"
            )
        if not isinstance(values, dict):
            raise SafeSteerError(f"config section [{section}] must be a table, got {values!r}")
        target = getattr(config, section)
        known = {f.name: f.type for f in fields(target)}
        for key, value in values.items():
            if key not in known:
                raise SafeSteerError(
                    f"unknown config key {section}.{key} (known: {', '.join(sorted(known))})"
                )
            setattr(target, key, _coerce(value, known[key], f"{section}.{key}"))
    return config


def load_config(path: str | Path | None) -> Config:
    if path is None:
        return Config()
    return apply_overrides(Config(), read_overrides(path))


def read_overrides(path: str | Path) -> dict:
    """The values a TOML file sets (no defaults filled in)."""
    path = Path(path)
    if not path.exists():
        raise SafeSteerError(f"config file not found: {path} (give an existing .toml file)")
    if tomllib is None:  # pragma: no cover
        raise SafeSteerError("reading TOML on Python 3.10 needs tomli (pip install tomli)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SafeSteerError(f"cannot parse {path}: {e} (fix the TOML syntax)") from None
    data.pop("resolved_model", None)  # what a run's config.toml records about the loaded model
    return data


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value)
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def to_toml(data: dict) -> str:
    """A small TOML writer for the config tree: scalars first, then one table per section.
    None values are written as comments (TOML has no null)."""
    lines: list[str] = []
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    for key, value in data.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {_toml_value(value)}" if value is not None else f"# {key} =")
    for name, table in tables.items():
        lines.append(f"\n[{name}]")
        for key, value in table.items():
            if isinstance(value, dict):
                continue
            lines.append(f"{key} = {_toml_value(value)}" if value is not None else f"# {key} =")
        for key, value in table.items():
            if isinstance(value, dict):
                lines.append(to_toml({f"{name}.{key}": value}).strip())
    return "\n".join(lines).strip() + "\n"
