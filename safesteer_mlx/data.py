"""Prompt sets (built-in, local files, Hugging Face datasets) and chat formatting.

A source is one string:
  builtin:harmful | builtin:harmless       the sets shipped in safesteer_mlx/prompts/
  PATH[#COLUMN]                            a local .json, .jsonl, .csv, .txt (or .parquet) file
  hf:ORG/NAME[:SPLIT][#COLUMN]             a dataset repo on the Hugging Face hub
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from safesteer_mlx.errors import SafeSteerError

BUILTIN_SOURCES = ("builtin:harmful", "builtin:harmless")
# The field that holds the prompt, first match wins (Alpaca, generic, AdvBench, HarmBench, QA sets).
PROMPT_FIELDS = ("instruction", "prompt", "goal", "Behavior", "behavior", "question")
CATEGORY_FIELDS = ("category", "Category", "SemanticCategory")
FILE_EXTENSIONS = (".json", ".jsonl", ".csv", ".txt", ".parquet")
HF_DATA_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet")
DEFAULT_HF_SPLIT = "train"

_SOURCE_HINT = (
    "give an existing .json/.jsonl/.csv/.txt file, builtin:harmful|builtin:harmless, or hf:ORG/NAME"
)
_HF_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# Metadata files that `datasets` writes next to the data; never prompts.
_HF_METADATA = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}

Row = Any  # one record as read: a dict of fields or a plain string


@dataclass(frozen=True)
class Prompt:
    """One instruction, with its hazard/topic category when the source gives one."""

    instruction: str
    category: str | None = None


@dataclass(frozen=True)
class HfSpec:
    """A parsed `hf:ORG/NAME[:SPLIT][#COLUMN]` source."""

    repo: str
    split: str = DEFAULT_HF_SPLIT
    column: str | None = None
    split_given: bool = False


def _fail(message: str) -> SafeSteerError:
    """A SafeSteerError whose message is one line."""
    return SafeSteerError(" ".join(message.split()))


def load_prompts(source: str, *, limit: int | None = None, seed: int = 0) -> list[Prompt]:
    """Load, clean (strip, drop empty, dedupe) and optionally sample a prompt set.

    `limit` smaller than the set takes a seeded random sample, kept in source order."""
    if limit is not None and limit < 1:
        raise _fail(f"limit must be a positive number of prompts, got {limit}")
    source = source.strip()
    if source.startswith("builtin:"):
        rows, column, where = _builtin_rows(source), None, source
    elif source.startswith("hf:"):
        spec = parse_hf_spec(source)
        split = f":{spec.split}" if spec.split_given else ""
        rows, column, where = _hf_rows(spec), spec.column, f"hf:{spec.repo}{split}"
    else:
        path, column = _local_path(source)
        rows, where = _read_rows(path), str(path)
    prompts = _clean(_to_prompts(rows, column, where))
    if not prompts:
        raise _fail(f"no prompts in {source} after dropping empty lines (give a non-empty set)")
    if limit is not None and limit < len(prompts):
        keep = np.sort(np.random.default_rng(seed).choice(len(prompts), limit, replace=False))
        prompts = [prompts[i] for i in keep]
    return prompts


def split_prompts(
    prompts: list[Prompt], n_train: int, n_val: int, seed: int
) -> tuple[list[Prompt], list[Prompt]]:
    """Seeded shuffle into disjoint train and val sets.

    When the set is short, train shrinks first; val keeps at least min(n_val, len // 4)."""
    if n_train < 0 or n_val < 0:
        raise _fail(f"split sizes must be >= 0, got n_train={n_train}, n_val={n_val}")
    n = len(prompts)
    n_val = max(min(n_val, n // 4), min(n_val, n - n_train))
    n_train = min(n_train, n - n_val)
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [prompts[i] for i in order]
    return shuffled[:n_train], shuffled[n_train : n_train + n_val]


def chat_prompt(tokenizer: Any, instruction: str, system: str | None = None) -> str:
    """The model's chat template applied to one user turn, ready for generation.

    A template that rejects the system role gets the system text folded into the user turn."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise _fail(
            "the tokenizer has no chat template (use an instruct/chat model, "
            "or set tokenizer.chat_template)"
        )
    user = {"role": "user", "content": instruction}
    if system is not None:
        try:
            return _apply_template(tokenizer, [{"role": "system", "content": system}, user])
        except Exception:  # jinja raise_exception, TemplateError, ValueError, ...
            user = {"role": "user", "content": f"{system}\n\n{instruction}"}
    return _apply_template(tokenizer, [user])


def _apply_template(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


# ---- sources -----------------------------------------------------------------------------------


def _builtin_rows(source: str) -> list[Row]:
    if source not in BUILTIN_SOURCES:
        raise _fail(f"unknown built-in prompt set: {source} (use {' or '.join(BUILTIN_SOURCES)})")
    name = source.removeprefix("builtin:")
    text = (resources.files("safesteer_mlx") / "prompts" / f"{name}.json").read_text("utf-8")
    return _parse_json(text, source)


def _local_path(source: str) -> tuple[Path, str | None]:
    """The file and the `#COLUMN` override (only when PATH#COLUMN is not itself a file)."""
    path, column = Path(source).expanduser(), None
    if not path.exists() and "#" in source:
        head, _, tail = source.rpartition("#")
        if Path(head).expanduser().exists():
            path, column = Path(head).expanduser(), tail.strip() or None
    if not path.exists():
        raise _fail(f"prompts file not found: {source} ({_SOURCE_HINT})")
    if path.is_dir():
        raise _fail(f"prompts source is a directory: {source} ({_SOURCE_HINT})")
    return path, column


def parse_hf_spec(source: str) -> HfSpec:
    """Parse `hf:ORG/NAME[:SPLIT][#COLUMN]`; the split defaults to train."""
    fix = "write hf:ORG/NAME[:SPLIT][#COLUMN], e.g. hf:walledai/AdvBench:train#prompt"
    body = source.strip().removeprefix("hf:")
    body, hash_, column = body.partition("#")
    repo, colon, split = body.partition(":")
    repo, split, column = repo.strip(), split.strip(), column.strip()
    if not _HF_REPO.match(repo):
        raise _fail(f"malformed Hugging Face source: {source!r} ({fix})")
    if (colon and not re.fullmatch(r"[\w.-]+", split)) or (hash_ and not column):
        raise _fail(f"malformed Hugging Face source: {source!r} ({fix})")
    return HfSpec(repo, split or DEFAULT_HF_SPLIT, column or None, split_given=bool(colon))


def _hf_offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    if flag in {"1", "ON", "YES", "TRUE"}:
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hf_rows(spec: HfSpec) -> list[Row]:
    """Rows of every data file of the split, from the hub or (offline) the local cache."""
    try:
        import huggingface_hub as hub
        from huggingface_hub import errors as hub_errors
    except ImportError as e:
        raise _fail(f"hf: sources need huggingface_hub ({e}; pip install huggingface_hub)") from e
    name = f"hf:{spec.repo}"
    try:
        if _hf_offline():
            root = Path(
                hub.snapshot_download(spec.repo, repo_type="dataset", local_files_only=True)
            )
            files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
            paths = [root / f for f in _pick_hf_files(files, spec)]
        else:
            files = hub.HfApi().list_repo_files(spec.repo, repo_type="dataset")
            paths = [
                Path(hub.hf_hub_download(spec.repo, f, repo_type="dataset"))
                for f in _pick_hf_files(files, spec)
            ]
    except SafeSteerError:
        raise
    except hub_errors.GatedRepoError as e:
        raise _fail(
            f"{name} is gated (accept its terms on huggingface.co/datasets/{spec.repo}, "
            "then log in with `hf auth login`)"
        ) from e
    except hub_errors.RepositoryNotFoundError as e:
        raise _fail(
            f"Hugging Face dataset not found: {spec.repo} (check ORG/NAME; "
            "for a private set log in with `hf auth login`)"
        ) from e
    except Exception as e:  # network, offline cache miss, HTTP errors
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if _hf_offline():
            raise _fail(
                f"{name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set "
                f"({detail}; unset HF_HUB_OFFLINE to download it, or give a local file)"
            ) from e
        raise _fail(
            f"could not download {name} from the Hugging Face hub ({type(e).__name__}: {detail}; "
            "check the network, or set HF_HUB_OFFLINE=1 to use the local cache)"
        ) from e
    rows: list[Row] = []
    for path in paths:
        rows.extend(_read_rows(path))
    return rows


def _pick_hf_files(files: list[str], spec: HfSpec) -> list[str]:
    """The data files of the split: the split name as a path token, else as a substring;
    a repo with a single data file serves it when no split was asked for."""
    data = sorted(
        f
        for f in files
        if f.lower().endswith(HF_DATA_EXTENSIONS) and Path(f).name not in _HF_METADATA
    )
    token = re.compile(rf"(^|[^A-Za-z0-9]){re.escape(spec.split)}([^A-Za-z0-9]|$)")
    chosen = [f for f in data if token.search(f)] or [f for f in data if spec.split in f]
    if not chosen and not spec.split_given and len(data) == 1:
        chosen = data
    if not chosen:
        found = ", ".join(data[:8]) + (", ..." if len(data) > 8 else "") or "none"
        raise _fail(
            f"no {spec.split!r} data files in hf:{spec.repo} (data files found: {found}; "
            f"choose the split with hf:{spec.repo}:SPLIT)"
        )
    # One format only: parquet when it can be read, else the text formats.
    preference = [".jsonl", ".json", ".csv", ".parquet"]
    if _has_pyarrow():
        preference.insert(0, preference.pop())
    for ext in preference:
        same = [f for f in chosen if f.lower().endswith(ext)]
        if same:
            return same
    return chosen


def _has_pyarrow() -> bool:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


# ---- file formats ------------------------------------------------------------------------------


def _read_rows(path: Path) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix not in FILE_EXTENSIONS:
        raise _fail(
            f"unsupported prompts file type {suffix or '(none)'}: {path} "
            f"(use .json, .jsonl, .csv, .txt or .parquet)"
        )
    if suffix == ".parquet":
        return _read_parquet(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise _fail(
            f"{path} is not UTF-8 text (invalid byte 0x{raw[e.start]:02x} "
            f"at byte offset {e.start}; re-save the file as UTF-8)"
        ) from e
    if suffix == ".json":
        return _parse_json(text, str(path))
    if suffix == ".jsonl":
        return _parse_jsonl(text, str(path))
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        return [{k: v for k, v in row.items() if k is not None} for row in reader]
    return text.splitlines()


def _parse_json(text: str, where: str) -> list[Row]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines saved as .json, common on the hub
            try:
                return _parse_jsonl(text, where)
            except SafeSteerError:
                pass
        raise _json_error(e, where) from e
    if isinstance(data, dict):  # {"data": [...]}: the one list inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise _fail(
                f"{where} holds a JSON object, not a list of prompts "
                '(write a list: [{"instruction": ...}, ...] or ["...", ...])'
            )
        data = lists[0]
    if not isinstance(data, list):
        raise _fail(f"{where} holds a JSON {type(data).__name__}, not a list of prompts")
    return data


def _parse_jsonl(text: str, where: str) -> list[Row]:
    rows: list[Row] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise _json_error(e, where, lineno) from e
    return rows


def _json_error(e: json.JSONDecodeError, where: str, lineno: int | None = None) -> SafeSteerError:
    line = e.lineno if lineno is None else lineno
    return _fail(
        f"invalid JSON in {where} at line {line}, column {e.colno}: {e.msg} "
        "(fix the file so it parses as JSON)"
    )


def _read_parquet(path: Path) -> list[Row]:
    if not _has_pyarrow():
        raise _fail(f"reading {path.name} needs pyarrow (pip install pyarrow)")
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


# ---- rows -> prompts ---------------------------------------------------------------------------


def _to_prompts(rows: list[Row], column: str | None, where: str) -> list[Prompt]:
    """Prompts from plain strings or from records, the prompt field chosen by `column` or
    by PROMPT_FIELDS."""
    records = [r for r in rows if isinstance(r, dict)]
    others = [r for r in rows if not isinstance(r, (dict, str)) and r is not None]
    if others:
        raise _fail(
            f"{where} holds a {type(others[0]).__name__} where a prompt was expected "
            "(each item must be a string or an object with an instruction field)"
        )
    if not records:
        if column is not None:
            raise _fail(f"{where} holds plain strings, no fields (drop '#{column}')")
        return [Prompt(r) for r in rows if r is not None]
    fields = list(dict.fromkeys(k for r in records for k in r))
    field = column if column is not None else next((f for f in PROMPT_FIELDS if f in fields), None)
    if field is None or field not in fields:
        shown = ", ".join(map(str, fields[:12])) + (", ..." if len(fields) > 12 else "")
        problem = f"no field {column!r}" if column is not None else "no prompt field"
        raise _fail(
            f"{where} has {problem} (fields found: {shown or 'none'}; "
            f"name the prompt field with {where}#FIELD)"
        )
    category_field = next((f for f in CATEGORY_FIELDS if f in fields), None)
    prompts = []
    for row in rows:
        if isinstance(row, str):
            prompts.append(Prompt(row))
            continue
        value = row.get(field)
        if value is None:
            continue
        if isinstance(value, (dict, list)):
            raise _fail(
                f"{where} field {field!r} holds a {type(value).__name__}, not text "
                f"(name a text field with {where}#FIELD)"
            )
        category = row.get(category_field) if category_field else None
        category = None if category is None else (str(category).strip() or None)
        prompts.append(Prompt(str(value), category))
    return prompts


def _clean(prompts: list[Prompt]) -> list[Prompt]:
    """Strip whitespace, drop empty prompts, keep the first of exact duplicates."""
    seen: set[str] = set()
    out = []
    for p in prompts:
        text = p.instruction.strip()
        if text and text not in seen:
            seen.add(text)
            out.append(Prompt(text, p.category))
    return out
