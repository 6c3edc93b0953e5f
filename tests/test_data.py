"""Prompt sets: every source format, cleaning, sampling, splits, bad input, chat formatting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from safesteer_mlx import data
from safesteer_mlx.data import (
    BUILTIN_SOURCES,
    HfSpec,
    Prompt,
    chat_prompt,
    load_prompts,
    parse_hf_spec,
    split_prompts,
)
from safesteer_mlx.errors import SafeSteerError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ROWS = [
    {"instruction": "Write a poem", "category": "writing"},
    {"instruction": "Explain gravity", "category": "science"},
    {"instruction": "Sort a list", "category": None},
]
EXPECTED = [
    Prompt("Write a poem", "writing"),
    Prompt("Explain gravity", "science"),
    Prompt("Sort a list", None),
]


def _error(source: str, **kwargs) -> str:
    """The message of the SafeSteerError that loading `source` raises; asserts one line."""
    with pytest.raises(SafeSteerError) as info:
        load_prompts(source, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


# ---- formats -----------------------------------------------------------------------------------


def test_json_objects_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(ROWS))
    assert load_prompts(str(path)) == EXPECTED


def test_json_strings_and_wrapped_list(tmp_path: Path) -> None:
    strings = tmp_path / "s.json"
    strings.write_text(json.dumps(["a", "b"]))
    assert load_prompts(str(strings)) == [Prompt("a"), Prompt("b")]
    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"data": ROWS, "version": 1}))
    assert load_prompts(str(wrapped)) == EXPECTED


def test_json_lines_saved_as_json(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text("\n".join(json.dumps(r) for r in ROWS))
    assert load_prompts(str(path)) == EXPECTED


def test_jsonl_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n" + json.dumps("plain") + "\n")
    assert load_prompts(str(path)) == [*EXPECTED, Prompt("plain")]


def test_csv_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text('goal,target,category\n"Write, a poem",Sure,writing\nExplain gravity,Sure,\n')
    assert load_prompts(str(path)) == [
        Prompt("Write, a poem", "writing"),
        Prompt("Explain gravity", None),
    ]


def test_txt_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("\ufefffirst prompt\n\n   \n  second prompt  \nfirst prompt\n")
    assert load_prompts(str(path)) == [Prompt("first prompt"), Prompt("second prompt")]


@pytest.mark.parametrize(
    ("field", "category_field"),
    [
        ("prompt", "Category"),
        ("goal", "category"),
        ("Behavior", "SemanticCategory"),
        ("question", "none"),
    ],
)
def test_field_selection(tmp_path: Path, field: str, category_field: str) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"id": 1, field: " hello ", category_field: "cat"}]))
    expected_category = None if category_field == "none" else "cat"
    assert load_prompts(str(path)) == [Prompt("hello", expected_category)]


def test_field_order_prefers_instruction(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "no", "goal": "no", "instruction": "yes"}]))
    assert load_prompts(str(path)) == [Prompt("yes")]


def test_column_override_for_local_files(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("instruction,text\nignored,chosen\n")
    assert load_prompts(f"{path}#text") == [Prompt("chosen")]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"instruction": "x", "query": "picked"}) + "\n")
    assert load_prompts(f"{jsonl}#query") == [Prompt("picked")]


def test_file_whose_name_contains_hash_wins(tmp_path: Path) -> None:
    path = tmp_path / "set#1.txt"
    path.write_text("hello\n")
    assert load_prompts(str(path)) == [Prompt("hello")]


def test_clean_strips_drops_empty_and_dedupes(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    rows = [
        {"instruction": " a "},
        {"instruction": ""},
        {"instruction": None},
        {"instruction": "a", "category": "late"},
        {"instruction": "b"},
        {"other": 1},
    ]
    path.write_text(json.dumps(rows))
    assert load_prompts(str(path)) == [Prompt("a"), Prompt("b")]


# ---- built-ins and shared sets -------------------------------------------------------------------


@pytest.mark.parametrize("source", BUILTIN_SOURCES)
def test_builtins_load(source: str) -> None:
    prompts = load_prompts(source)
    assert len(prompts) >= 40
    assert all(isinstance(p, Prompt) and p.instruction for p in prompts)
    if source == "builtin:harmful":
        assert len({p.category for p in prompts if p.category}) >= 6


def test_builtins_are_disjoint() -> None:
    harmful = {p.instruction for p in load_prompts("builtin:harmful")}
    harmless = {p.instruction for p in load_prompts("builtin:harmless")}
    assert not harmful & harmless


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared prompt sets absent: {SHARED_DATA}")
@pytest.mark.parametrize("name", ["harmful_train", "harmful_val", "harmless_train", "harmless_val"])
def test_shared_sets_load(name: str) -> None:
    path = SHARED_DATA / f"{name}.json"
    if not path.exists():
        pytest.skip(f"shared prompt set absent: {path}")
    prompts = load_prompts(str(path))
    assert len(prompts) >= 30
    assert len(load_prompts(str(path), limit=16, seed=3)) == 16


# ---- sampling and splits -----------------------------------------------------------------------


def test_limit_is_seeded_and_ordered() -> None:
    full = load_prompts("builtin:harmless")
    a = load_prompts("builtin:harmless", limit=10, seed=1)
    assert a == load_prompts("builtin:harmless", limit=10, seed=1)
    assert a != load_prompts("builtin:harmless", limit=10, seed=2)
    assert len(a) == 10 and len(set(a)) == 10
    positions = [full.index(p) for p in a]
    assert positions == sorted(positions)
    assert load_prompts("builtin:harmless", limit=10_000) == full


def test_split_disjoint_and_seeded() -> None:
    prompts = [Prompt(f"p{i}") for i in range(50)]
    train, val = split_prompts(prompts, 30, 10, seed=0)
    assert (len(train), len(val)) == (30, 10)
    assert not set(train) & set(val)
    assert (train, val) == split_prompts(prompts, 30, 10, seed=0)
    assert (train, val) != split_prompts(prompts, 30, 10, seed=1)


@pytest.mark.parametrize(
    ("n", "n_train", "n_val", "expected"),
    [
        (10, 8, 4, (8, 2)),
        (10, 20, 4, (8, 2)),
        (10, 2, 20, (2, 8)),
        (3, 2, 2, (2, 1)),
        (0, 4, 4, (0, 0)),
    ],
)
def test_split_short_set(n: int, n_train: int, n_val: int, expected: tuple[int, int]) -> None:
    prompts = [Prompt(f"p{i}") for i in range(n)]
    train, val = split_prompts(prompts, n_train, n_val, seed=0)
    assert (len(train), len(val)) == expected
    assert len(val) >= min(n_val, n // 4)
    assert not set(train) & set(val)


def test_split_rejects_negative_sizes() -> None:
    with pytest.raises(SafeSteerError, match="split sizes"):
        split_prompts([Prompt("a")], -1, 1, seed=0)


# ---- bad input ---------------------------------------------------------------------------------


def test_missing_file() -> None:
    message = _error("nope/x.json")
    assert "prompts file not found: nope/x.json" in message
    assert "builtin:harmful" in message and "hf:ORG/NAME" in message


def test_directory(tmp_path: Path) -> None:
    assert "is a directory" in _error(str(tmp_path))


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "p.xlsx"
    path.write_text("x")
    message = _error(str(path))
    assert "unsupported prompts file type .xlsx" in message and ".jsonl" in message


def test_invalid_json_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text('[\n  {"instruction": "a"},\n  {"instruction" "b"}\n]')
    message = _error(str(path))
    assert "invalid JSON" in message and "line 3, column 18" in message


def test_invalid_jsonl_names_the_file_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"instruction": "a"}\n\n{"instruction": b}\n')
    assert "line 3, column 17" in _error(str(path))


def test_empty_after_cleaning(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("\n   \n\t\n")
    assert "no prompts in" in _error(str(path))
    empty = tmp_path / "e.json"
    empty.write_text("[]")
    assert "no prompts in" in _error(str(empty))


def test_missing_field_lists_fields_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("text,label\nhello,1\n")
    message = _error(str(path))
    assert "no prompt field" in message and "fields found: text, label" in message
    assert f"{path}#FIELD" in message


def test_unknown_column(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(ROWS))
    message = _error(f"{path}#nope")
    assert "no field 'nope'" in message and "fields found: instruction, category" in message


def test_column_on_plain_strings(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("a\n")
    assert "plain strings" in _error(f"{path}#text")


def test_non_text_items(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text("[1, 2]")
    assert "holds a int" in _error(str(path))
    nested = tmp_path / "n.json"
    nested.write_text(json.dumps([{"prompt": ["a", "b"]}]))
    assert "holds a list, not text" in _error(str(nested))


def test_non_utf8_names_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_bytes(b"hello\nwor\xffld\n")
    message = _error(str(path))
    assert "not UTF-8" in message and "byte offset 9" in message and "0xff" in message


def test_unknown_builtin() -> None:
    message = _error("builtin:evil")
    assert "unknown built-in prompt set: builtin:evil" in message
    assert "builtin:harmful" in message and "builtin:harmless" in message


@pytest.mark.parametrize(
    "source", ["hf:", "hf:noslash", "hf:a/b/c", "hf:org/name:", "hf:org/name#", "hf:/name"]
)
def test_malformed_hf_spec(source: str) -> None:
    message = _error(source)
    assert "malformed Hugging Face source" in message and "hf:ORG/NAME" in message


def test_bad_limit() -> None:
    assert "limit must be a positive" in _error("builtin:harmful", limit=0)


# ---- hf: sources -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("hf:walledai/AdvBench", HfSpec("walledai/AdvBench")),
        ("hf:org/name:test", HfSpec("org/name", "test", None, split_given=True)),
        ("hf:org/name#goal", HfSpec("org/name", "train", "goal")),
        (
            "hf:org/na.me-2:harmful_val#Behavior",
            HfSpec("org/na.me-2", "harmful_val", "Behavior", split_given=True),
        ),
    ],
)
def test_parse_hf_spec(source: str, expected: HfSpec) -> None:
    assert parse_hf_spec(source) == expected


class _FakeApi:
    files: list[str] = []

    def list_repo_files(self, repo_id: str, *, repo_type: str | None = None) -> list[str]:
        assert repo_type == "dataset"
        return self.files


def _serve(monkeypatch: pytest.MonkeyPatch, root: Path, files: dict[str, str]) -> list[str]:
    """Serve `files` (repo path -> text) as a dataset repo; returns the downloaded paths."""
    import huggingface_hub
    from huggingface_hub import constants

    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    downloaded: list[str] = []

    def download(repo_id: str, filename: str, *, repo_type: str | None = None) -> str:
        assert repo_type == "dataset"
        downloaded.append(filename)
        return str(root / filename)

    _FakeApi.files = sorted(files)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return downloaded


def test_hf_download_picks_split_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    jsonl = "\n".join(json.dumps(r) for r in ROWS)
    downloaded = _serve(
        monkeypatch,
        tmp_path,
        {
            "README.md": "# card",
            "data/train-00000.jsonl": jsonl,
            "data/test-00000.jsonl": json.dumps({"instruction": "held out"}),
            "data/dataset_info.json": "{}",
        },
    )
    assert load_prompts("hf:org/name") == EXPECTED
    assert downloaded == ["data/train-00000.jsonl"]
    assert load_prompts("hf:org/name:test") == [Prompt("held out")]


def test_hf_column_and_csv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _serve(monkeypatch, tmp_path, {"harmful_behaviors.csv": "goal,target\nDo harm,Sure\n"})
    assert load_prompts("hf:org/name") == [Prompt("Do harm")]
    assert load_prompts("hf:org/name#target") == [Prompt("Sure")]
    message = _error("hf:org/name#nope")
    assert "fields found: goal, target" in message and "hf:org/name#FIELD" in message


def test_hf_missing_split(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _serve(monkeypatch, tmp_path, {"a_train.json": "[]", "b_train.json": "[]"})
    message = _error("hf:org/name:validation")
    assert "no 'validation' data files" in message and "a_train.json, b_train.json" in message


def test_hf_parquet_needs_pyarrow(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _serve(monkeypatch, tmp_path, {"data/train-0.parquet": "not really parquet"})
    monkeypatch.setattr(data, "_has_pyarrow", lambda: False)
    assert "pip install pyarrow" in _error("hf:org/name")


def test_hf_network_failure_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _serve(monkeypatch, tmp_path, {})

    def boom(self: _FakeApi, repo_id: str, *, repo_type: str | None = None) -> list[str]:
        raise ConnectionError("Name or service not known\nretry later")

    monkeypatch.setattr(_FakeApi, "list_repo_files", boom)
    message = _error("hf:org/name")
    assert "could not download hf:org/name" in message and "HF_HUB_OFFLINE=1" in message


def test_hf_offline_uses_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text(json.dumps(ROWS))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(tmp_path))
    assert load_prompts("hf:org/name") == EXPECTED

    def miss(*args: object, **kwargs: object) -> str:
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", miss)
    message = _error("hf:org/name")
    assert "not in the local Hugging Face cache" in message and "HF_HUB_OFFLINE" in message


# ---- chat formatting ---------------------------------------------------------------------------

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _tokenizer(template: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    tokenizer.chat_template = template
    return tokenizer


def test_chat_prompt_user_only_and_system() -> None:
    tokenizer = _tokenizer(TEMPLATE)
    assert chat_prompt(tokenizer, "hi") == "<user>hi</user><assistant>"
    assert chat_prompt(tokenizer, "hi", system="Be safe.") == (
        "<system>Be safe.</system><user>hi</user><assistant>"
    )


def test_chat_prompt_folds_system_when_template_rejects_it() -> None:
    tokenizer = _tokenizer(NO_SYSTEM_TEMPLATE)
    assert chat_prompt(tokenizer, "hi", system="Be safe.") == (
        "<user>Be safe.\n\nhi</user><assistant>"
    )


def test_chat_prompt_without_template() -> None:
    with pytest.raises(SafeSteerError, match="no chat template"):
        chat_prompt(_tokenizer(None), "hi")
