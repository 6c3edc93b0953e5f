"""Export: a run with adapters, exported to every format, loaded back by the real consumers
(mlx-lm, transformers on CPU, llama.cpp through llama-cpp-python) for every supported family."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from safesteer_mlx.errors import SafeSteerError
from tests.tiny_families import FAMILIES, build_family_dir

PROMPTS = ["Hello there", "How do I bake bread?", "<|im_start|>user\nhi<|im_end|>\n"]
STEPS = 8


def requires(module: str, why: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed ({why}; `pip install -e .[dev]` installs it)")


def make_run(
    tmp_path, family: str, kind: str = "lora", layers: int | None = None, seed: int = 0, tok=None
):
    """A run directory over a tiny `family` model, with trained-looking adapters (random,
    non-zero LoRA B so the fused weights differ from the base)."""
    from safesteer_mlx.adapters import adapter_config, attach, save_adapters
    from safesteer_mlx.config import Config, to_toml
    from safesteer_mlx.modeling import load_model
    from safesteer_mlx.run import RunDir

    base = build_family_dir(
        family, tmp_path / f"base-{family}", seed=seed, layers=layers, tokenizer=tok
    )
    config = Config()
    config.model.name = str(base)
    config.model.dtype = "float32"
    run = RunDir(tmp_path / f"run-{family}-{kind}").ensure()
    run.config.write_text(to_toml(config.to_dict()))
    loaded = load_model(str(base), dtype="float32")
    acfg = adapter_config(kind, loaded.num_layers, 4, 2.0, 0.0, None)
    attach(loaded.model, acfg)
    mx.random.seed(seed + 1)
    from mlx.utils import tree_flatten, tree_unflatten

    trained = [
        (k, v + 0.05 * mx.random.normal(v.shape) if kind == "full" or "lora_b" in k else v)
        for k, v in tree_flatten(loaded.model.trainable_parameters())
    ]
    loaded.model.update(tree_unflatten(trained))
    save_adapters(run.adapters, loaded.model, acfg)
    return run, base


def reference(base, run):
    """The un-fused model with the run's adapters attached, as mlx-lm loads it."""
    from mlx_lm.tuner.utils import load_adapters

    from safesteer_mlx.modeling import load_model

    loaded = load_model(str(base), dtype="float32")
    load_adapters(loaded.model, str(run.adapters))
    loaded.model.eval()
    return loaded


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer._tokenizer.encode(text, add_special_tokens=False)


def mlx_greedy(model, ids: list[int], steps: int = STEPS) -> list[int]:
    """Greedy tokens with mlx-lm's KV cache (as mlx-lm generates)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([ids]), cache=cache)[0, -1]
    out = []
    for _ in range(steps):
        out.append(int(mx.argmax(logits).item()))
        logits = model(mx.array([out[-1:]]), cache=cache)[0, -1]
    return out


def mlx_logits(model, ids: list[int]) -> np.ndarray:
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_and_mlx_round_trip(tmp_path, family):
    """mlx-lm loads both exports with greedy tokens identical to base + adapters; transformers
    loads the HF export with logits within float32 tolerance of MLX's."""
    from mlx_lm import load as mlx_load

    from safesteer_mlx.export import run_export

    run, base = make_run(tmp_path, family)
    ref = reference(base, run)
    hf = run_export(run, "hf", dtype="float32")
    assert hf["format"] == "hf" and hf["bytes"] > 0 and hf["seconds"] >= 0
    out = run.export_dir / "hf"
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and config["architectures"]
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert (out / "README.md").exists() and (out / "generation_config.json").exists()

    model, tok = mlx_load(str(out))
    for p in PROMPTS:
        ids = encode(ref.tokenizer, p)
        assert tok.encode(p, add_special_tokens=False) == ids
        assert mlx_greedy(model, ids) == mlx_greedy(ref.model, ids), p

    requires("transformers", "the HF export is checked with transformers")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    hf_model.eval()
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    assert hf_tok.chat_template
    for p in PROMPTS:
        ids = encode(ref.tokenizer, p)
        with torch.no_grad():
            theirs = hf_model(torch.tensor([ids])).logits[0].float().numpy()
        np.testing.assert_allclose(theirs, mlx_logits(ref.model, ids), atol=2e-4, rtol=1e-4)

    mlx8 = run_export(run, "mlx", dtype="float32", q_bits=8, q_group_size=32)
    model8, _ = mlx_load(mlx8["path"])
    assert json.loads((run.export_dir / "mlx" / "config.json").read_text())["quantization"] == {
        "group_size": 32,
        "bits": 8,
    }
    ids = encode(ref.tokenizer, PROMPTS[1])
    # 8-bit weights: logits close to the float model's, not equal.
    assert np.abs(mlx_logits(model8, ids) - mlx_logits(ref.model, ids)).max() < 0.5


def llama_greedy(path, ids: list[int], steps: int = STEPS, cvec=None):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    if cvec is not None:
        cvec(llm)
    out = list(ids)
    llm.reset()
    llm.eval(out)
    logits0 = np.array(llm.scores[: len(ids)])
    for _ in range(steps):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out[len(ids) :], logits0


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("gguf_type", ["f32", "f16"])
def test_gguf_round_trip(tmp_path, family, gguf_type):
    """llama.cpp runs the GGUF export with greedy tokens identical to MLX's (base + adapters)."""
    requires("gguf", "the GGUF writer")
    from safesteer_mlx.export import run_export

    run, base = make_run(tmp_path, family)
    result = run_export(run, "gguf", dtype="float32", gguf_type=gguf_type)
    path = run.export_dir / "gguf" / "model.gguf"
    assert result["path"] == str(path) and path.exists()

    import gguf

    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names and "blk.0.attn_q.weight" in names
    assert ("output.weight" in names) == (not FAMILIES[family]["tie_word_embeddings"])

    requires("llama_cpp", "GGUF exports are checked in llama.cpp through llama-cpp-python")
    from llama_cpp import Llama

    vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
    ref = reference(base, run)
    for p in PROMPTS:
        ids = encode(ref.tokenizer, p)
        assert vocab.tokenize(p.encode(), add_bos=False, special=True) == ids, p
        tokens, logits = llama_greedy(path, ids)
        assert tokens == mlx_greedy(ref.model, ids), (family, gguf_type, p)
        tol = 1e-3 if gguf_type == "f32" else 5e-2
        np.testing.assert_allclose(logits, mlx_logits(ref.model, ids), atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
@pytest.mark.parametrize(("gguf_type", "dtype"), [("q8_0", "float32"), ("bf16", "bfloat16")])
def test_gguf_quantized_types(tmp_path, family, gguf_type, dtype):
    """Q8_0 and BF16: 2-D weights in that type, norms in F32, and llama.cpp's logits within
    the type's rounding of MLX's float32 logits (measured max |diff| <= 0.35)."""
    import gguf

    from safesteer_mlx.export import run_export

    run, base = make_run(tmp_path, family)
    path = run_export(run, "gguf", dtype=dtype, gguf_type=gguf_type)["path"]
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == gguf_type.upper()
    assert types["blk.0.attn_norm.weight"] == "F32"
    requires("llama_cpp", "GGUF exports are checked in llama.cpp through llama-cpp-python")
    ref = reference(base, run)
    ids = encode(ref.tokenizer, PROMPTS[1])
    _, logits = llama_greedy(path, ids, steps=1)
    assert np.abs(logits - mlx_logits(ref.model, ids)).max() < 0.5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gguf_tensors_read_by_transformers(tmp_path, family):
    """An independent GGUF reader: transformers' GGUF loader undoes llama.cpp's conventions (Q/K
    permutation, Gemma's +1 norms, tensor names) and must get MLX's logits back. Its GGUF config
    mapping drops keys these families need (Gemma's softcapping and query scale, Qwen3's
    head_dim), so the architecture comes from the HF export's config.json; mistral is read as
    the llama GGUF it is."""
    requires("transformers", "transformers' GGUF loader reads the export")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from safesteer_mlx.export import run_export

    run, base = make_run(tmp_path, family)
    path = run_export(run, "gguf", dtype="float32", gguf_type="f32")["path"]
    hf = run_export(run, "hf", dtype="float32")["path"]
    config = None if family == "mistral" else AutoConfig.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(
        str(Path(path).parent), gguf_file=Path(path).name, config=config, dtype=torch.float32
    ).eval()
    ref = reference(base, run)
    ids = encode(ref.tokenizer, PROMPTS[1])
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(theirs, mlx_logits(ref.model, ids), atol=2e-4, rtol=1e-4)


def test_sentencepiece_tokenizer_in_llama_cpp(tmp_path):
    """A SentencePiece-style tokenizer is written as llama.cpp's `llama` vocabulary (scores,
    byte pieces, space prefix): llama.cpp tokenizes like the HF tokenizer, BOS included, and
    generates MLX's greedy tokens."""
    from safesteer_mlx.export import run_export
    from tests.tiny_families import spm_tokenizer

    run, base = make_run(tmp_path, "mistral", tok=spm_tokenizer())
    path = run_export(run, "gguf", dtype="float32", gguf_type="f32")["path"]
    requires("llama_cpp", "GGUF exports are checked in llama.cpp through llama-cpp-python")
    from llama_cpp import Llama

    vocab = Llama(model_path=path, vocab_only=True, verbose=False)
    ref = reference(base, run)
    hf = ref.tokenizer._tokenizer
    for text in ["the theater is in there", "Hello, World! 42", "café ☃ naïve"]:
        ids = hf.encode(text)
        assert ids[0] == 1 and vocab.tokenize(text.encode()) == ids, text
        assert vocab.detokenize(ids).decode() == text
        assert llama_greedy(path, ids)[0] == mlx_greedy(ref.model, ids), text


def test_dora_and_full_fuse_match_unfused(tmp_path):
    from mlx_lm import load as mlx_load

    from safesteer_mlx.export import run_export

    for kind in ("dora", "full"):
        run, base = make_run(tmp_path, "llama", kind=kind)
        ref = reference(base, run)
        result = run_export(run, "mlx", dtype="float32")
        model, _ = mlx_load(result["path"])
        ids = encode(ref.tokenizer, PROMPTS[1])
        np.testing.assert_allclose(
            mlx_logits(model, ids), mlx_logits(ref.model, ids), atol=1e-4, rtol=1e-4
        )


def test_quantized_base_is_dequantized_before_fusing(tmp_path):
    """From a 4-bit MLX base: the export equals dequantize(W) + s B^T A^T in float32."""
    from mlx_lm import load as mlx_load
    from mlx_lm.utils import quantize_model, save_model

    from safesteer_mlx.config import load_config, to_toml
    from safesteer_mlx.export import run_export
    from safesteer_mlx.modeling import load_model

    run, base = make_run(tmp_path, "llama")
    loaded = load_model(str(base), dtype="float32")
    qdir = tmp_path / "q4"
    model, qconfig = quantize_model(loaded.model, dict(loaded.config), 32, 4)
    save_model(str(qdir), model)
    (qdir / "config.json").write_text(json.dumps(qconfig))
    loaded.tokenizer._tokenizer.save_pretrained(str(qdir))
    config = load_config(run.config)
    config.model.name, config.model.dtype = str(qdir), None
    run.config.write_text(to_toml(config.to_dict()))

    result = run_export(run, "hf", dtype="float32")
    fused, _ = mlx_load(result["path"])
    ref = reference(qdir, run)  # QLoRA: LoRA over the 4-bit layers
    ids = encode(ref.tokenizer, PROMPTS[0])
    np.testing.assert_allclose(mlx_logits(fused, ids), mlx_logits(ref.model, ids), atol=1e-3)
    shard = next((run.export_dir / "hf").glob("model-*.safetensors"))
    assert not any(k.endswith(".scales") for k in mx.load(str(shard)))


def test_unsupported_family_fails_before_writing(tmp_path):
    from safesteer_mlx import gguf_export

    with pytest.raises(SafeSteerError, match="supported: gemma2, gemma3_text, llama, mistral"):
        gguf_export.check_supported({"model_type": "phi3"})
    with pytest.raises(SafeSteerError, match="'gemma3'"):  # multimodal: the text model is nested
        gguf_export.check_supported({"model_type": "gemma3", "text_config": {}})
    with pytest.raises(SafeSteerError, match="rope_scaling type 'llama3'"):
        gguf_export.check_supported(
            {"model_type": "llama", "rope_scaling": {"rope_type": "llama3"}}
        )


def test_existing_output_refused_and_failure_leaves_nothing(tmp_path, monkeypatch):
    from safesteer_mlx import export
    from safesteer_mlx.export import run_export

    run, _ = make_run(tmp_path, "llama")
    first = run_export(run, "hf", dtype="float32")
    with pytest.raises(SafeSteerError, match="--force"):
        run_export(run, "hf", dtype="float32")
    assert run_export(run, "hf", dtype="float32", force=True)["bytes"] == first["bytes"]
    # --force replaces earlier exports only: not a user's directory, even one whose README
    # names the tool (a checkout of this repository), and not a file.
    mine = tmp_path / "my-project"
    mine.mkdir()
    (mine / "README.md").write_text("# safesteer-mlx\nmy notes\n")
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(SafeSteerError, match="not a safesteer-mlx export"):
        run_export(run, "hf", dtype="float32", out=mine, force=True)
    assert (mine / "notes.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".my-project.*"))  # no staging left behind

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "_write_mlx", boom)
    with pytest.raises(RuntimeError):
        run_export(run, "mlx")
    assert sorted(p.name for p in run.export_dir.iterdir()) == ["hf"]


def test_bad_arguments(tmp_path):
    from safesteer_mlx.export import run_export
    from safesteer_mlx.run import RunDir

    run = RunDir(tmp_path / "empty").ensure()
    with pytest.raises(SafeSteerError, match="no config.toml"):
        run_export(run, "hf")
    with pytest.raises(SafeSteerError, match="unknown export format"):
        run_export(run, "onnx")
    with pytest.raises(SafeSteerError, match="--format mlx"):
        run_export(run, "hf", q_bits=4)
    with pytest.raises(SafeSteerError, match="4 or 8 bits"):
        run_export(run, "mlx", q_bits=3)
    with pytest.raises(SafeSteerError, match="--dtype 'auto'"):
        run_export(run, "hf", dtype="auto")


def write_direction(run, hidden: int, layer: int, coef: float, seed: int = 3) -> mx.array:
    mx.random.seed(seed)
    direction = 4.0 * mx.random.normal((hidden,))
    mx.save_safetensors(str(run.direction_tensors), {"direction": direction})
    run.direction_json.write_text(json.dumps({"layer": layer, "coefficient": coef, "position": -1}))
    return direction


def test_control_vector_layer_numbering(tmp_path):
    """direction.N in llama.cpp is added after block N = before block N + 1: our layer L is N =
    L - 1; layers 0 and 1 have no equivalent (llama.cpp never applies direction.0)."""
    import gguf

    from safesteer_mlx.export import run_export
    from safesteer_mlx.gguf_export import control_vector_layer

    assert control_vector_layer(2, 4) == 1 and control_vector_layer(3, 4) == 2
    for bad in (0, 1, 4):
        with pytest.raises(SafeSteerError, match="--layer"):
            control_vector_layer(bad, 4)

    run, _ = make_run(tmp_path, "llama", layers=4)
    direction = write_direction(run, 64, layer=2, coef=1.5)
    result = run_export(run, "control-vector")
    assert result["llama_cpp_layer"] == 1 and result["steering_layer"] == 2
    reader = gguf.GGUFReader(result["path"])
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "controlvector"
    assert int(reader.fields["controlvector.layer_count"].parts[-1][0]) == 1
    (tensor,) = reader.tensors
    assert tensor.name == "direction.1"
    np.testing.assert_allclose(np.array(tensor.data), 1.5 * np.array(direction), rtol=1e-6)


def test_control_vector_steers_llama_cpp_like_mlx(tmp_path):
    """The control vector applied in llama.cpp gives the greedy tokens of MLX's steered base."""
    requires("llama_cpp", "control vectors are checked in llama.cpp through llama-cpp-python")
    import ctypes

    import gguf
    import llama_cpp

    from safesteer_mlx.export import run_export
    from safesteer_mlx.modeling import load_model, steered

    run, base = make_run(tmp_path, "llama", layers=4)
    direction = write_direction(run, 64, layer=2, coef=4.0)
    model_gguf = run_export(run, "gguf", dtype="float32", gguf_type="f32")["path"]
    cv = run_export(run, "control-vector")["path"]
    # Base model: the run's adapters are not part of the teacher.
    loaded = load_model(str(base), dtype="float32")

    def apply(llm):
        # As llama.cpp's common loader does: direction.N goes to offset (N - 1) * n_embd.
        (tensor,) = gguf.GGUFReader(cv).tensors
        n = int(tensor.name.split(".")[1])
        data = np.zeros(64 * n, dtype=np.float32)
        data[64 * (n - 1) :] = np.array(tensor.data)
        ptr = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        assert llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, ptr, data.size, 64, 1, 3) == 0

    # The GGUF holds the fused (adapters-on) model; steer the same in MLX.
    ref = reference(base, run)
    changed = 0
    for p in PROMPTS:
        ids = encode(loaded.tokenizer, p)
        with steered(ref.model, direction, 2, 4.0):
            want = mlx_greedy(ref.model, ids)
        changed += want != mlx_greedy(ref.model, ids)
        got, _ = llama_greedy(model_gguf, ids, cvec=apply)
        assert got == want, p
    assert changed  # the vector is strong enough to matter, so a wrong layer would show


def test_sharded_hf_export_loads(tmp_path, monkeypatch):
    """Several shards and their index: mlx-lm and transformers find every weight."""
    from mlx_lm import load as mlx_load

    from safesteer_mlx import export

    monkeypatch.setattr(export, "SHARD_BYTES", 40_000)
    run, base = make_run(tmp_path, "llama")
    path = Path(export.run_export(run, "hf", dtype="float32")["path"])
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    ref = reference(base, run)
    ids = encode(ref.tokenizer, PROMPTS[0])
    model, _ = mlx_load(str(path))
    np.testing.assert_allclose(mlx_logits(model, ids), mlx_logits(ref.model, ids), atol=1e-5)
    requires("transformers", "the HF export is checked with transformers")
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(theirs, mlx_logits(ref.model, ids), atol=2e-4, rtol=1e-4)


# Llama 3's pre-tokenizing regex (tokenizer.json's Split): digits in groups of up to three.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def test_llama3_pre_tokenizer_tokenizes_in_llama_cpp_like_hf(tmp_path):
    """A Hugging Face base with Llama 3's pre-tokenizer is written as llama.cpp's `llama-bpe`:
    with `default`, llama.cpp splits off the apostrophe of an upper-case contraction ("'LL"),
    which Llama 3's case-insensitive regex keeps whole."""
    requires("gguf", "the GGUF writer")
    from tiny import tiny_tokenizer

    from safesteer_mlx.export import run_export

    tok = tiny_tokenizer([("'", "L"), ("'L", "L"), ("3", "4")], split_regex=LLAMA3_SPLIT)
    text = "I'LL pay 12345 dollars"
    hf_ids = encode(tok, text)
    pieces = [tok._tokenizer.decode([i]) for i in hf_ids]
    assert "'LL" in pieces and "34" not in pieces  # "'LL" whole; "123" | "45", as Llama 3 splits
    run, _ = make_run(tmp_path, "llama", tok=tok)
    run_export(run, "gguf", dtype="float32")
    path = run.export_dir / "gguf" / "model.gguf"
    import gguf

    field = gguf.GGUFReader(str(path)).fields["tokenizer.ggml.pre"]
    assert bytes(field.parts[field.data[0]]).decode() == "llama-bpe"
    requires("llama_cpp", "GGUF exports are checked in llama.cpp through llama-cpp-python")
    from llama_cpp import Llama

    vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
    assert vocab.tokenize(text.encode(), add_bos=False, special=True) == hf_ids
