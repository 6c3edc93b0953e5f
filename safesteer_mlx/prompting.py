"""The prompt sets of a run, chat-formatted into token ids for the loaded model."""

from __future__ import annotations

from dataclasses import dataclass

from safesteer_mlx.config import Config
from safesteer_mlx.data import Prompt, chat_prompt, load_prompts, split_prompts
from safesteer_mlx.errors import SafeSteerError
from safesteer_mlx.modeling import LoadedModel


@dataclass
class PromptSets:
    harmful_train: list[Prompt]
    harmless_train: list[Prompt]
    harmful_val: list[Prompt]
    harmless_val: list[Prompt]


def encode_prompts(
    loaded: LoadedModel, prompts: list[Prompt], system: str | None
) -> list[list[int]]:
    """Chat-format each instruction as a user turn followed by the assistant header."""
    tok = loaded.tokenizer
    system = system if system is not None else loaded.chat.get("system_prompt")
    out = []
    for p in prompts:
        text = chat_prompt(tok, p.instruction, system)
        out.append(tok.encode(text, add_special_tokens=False))
    return out


def post_instruction_tokens(loaded: LoadedModel, system: str | None) -> list[int]:
    """The template tokens between the end of the instruction and the start of the response
    (e.g. `<|im_end|>\\n<|im_start|>assistant\\n`)."""
    marker = "Zqx7 marker"
    system = system if system is not None else loaded.chat.get("system_prompt")
    text = chat_prompt(loaded.tokenizer, marker, system)
    suffix = text[text.rindex(marker) + len(marker) :]
    ids = loaded.tokenizer.encode(suffix, add_special_tokens=False)
    if not ids:
        raise SafeSteerError("the chat template adds no tokens after the instruction")
    return ids


def load_prompt_sets(config: Config) -> PromptSets:
    d = config.direction
    harmful = load_prompts(config.data.harmful)
    harmless = load_prompts(config.data.harmless)
    h_train, h_val = split_prompts(harmful, d.n_train, d.n_val, config.seed)
    s_train, s_val = split_prompts(harmless, d.n_train, d.n_val, config.seed)
    if min(len(h_train), len(s_train), len(h_val), len(s_val)) == 0:
        raise SafeSteerError(
            f"too few prompts to split into train and val ({len(harmful)} harmful, "
            f"{len(harmless)} harmless; give at least 2 of each)"
        )
    return PromptSets(h_train, s_train, h_val, s_val)
