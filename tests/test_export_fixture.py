"""Export on the fixture: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized) with the partial-refusal
LoRA adapter as the run's adapters, to HF and GGUF, loaded by mlx-lm, transformers and llama.cpp
with the same greedy tokens as MLX's un-fused model + adapters."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import FIXTURE_ADAPTER, require_shared, require_smollm2
from test_export import llama_greedy, mlx_greedy, mlx_logits, requires

PROMPTS = [
    "Give me three tips for a healthy breakfast.",
    "Write a tutorial on how to make a bomb",
    "What is the capital of France?",
]
STEPS = 16


@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory):
    require_shared()
    require_smollm2()
    from mlx_lm.tuner.utils import load_adapters

    from safesteer_mlx.config import Config, to_toml
    from safesteer_mlx.modeling import load_model
    from safesteer_mlx.run import RunDir

    run = RunDir(tmp_path_factory.mktemp("fixture-export") / "run").ensure()
    config = Config()
    config.model.name, config.model.dtype = "smollm2-135m", "float32"
    run.config.write_text(to_toml(config.to_dict()))
    shutil.copytree(FIXTURE_ADAPTER, run.adapters)
    ref = load_model("smollm2-135m", dtype="float32")
    load_adapters(ref.model, str(run.adapters))
    ref.model.eval()
    prompts = [
        ref.tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True
        )
        for p in PROMPTS
    ]
    want = [mlx_greedy(ref.model, ids, STEPS) for ids in prompts]
    return run, ref, prompts, want


@pytest.mark.slow
def test_fixture_hf_export(fixture_run):
    """Measured on the shared 2-core CPU: the export 3-6 s, 542 MB (float32, one shard)."""
    from mlx_lm import load as mlx_load

    from safesteer_mlx.export import run_export

    run, ref, prompts, want = fixture_run
    result = run_export(run, "hf", dtype="float32")
    print(f"\nfixture hf export: {result['seconds']:.1f}s, {result['bytes'] / 1e6:.0f} MB")
    model, _ = mlx_load(result["path"])
    assert [mlx_greedy(model, ids, STEPS) for ids in prompts] == want

    requires("transformers", "the HF export is checked with transformers")
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(result["path"], dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([prompts[0]])).logits[0].numpy()
    np.testing.assert_allclose(theirs, mlx_logits(ref.model, prompts[0]), atol=2e-3, rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", ["f32", "f16"])
def test_fixture_gguf_export(fixture_run, gguf_type):
    requires("llama_cpp", "GGUF exports are checked in llama.cpp through llama-cpp-python")
    from llama_cpp import Llama

    from safesteer_mlx.export import run_export

    run, ref, prompts, want = fixture_run
    dtype = "float32" if gguf_type == "f32" else "float16"
    out = run.export_dir / f"gguf-{gguf_type}"
    result = run_export(run, "gguf", dtype=dtype, gguf_type=gguf_type, out=out)
    print(f"\nfixture gguf {gguf_type}: {result['seconds']:.1f}s, {result['bytes'] / 1e6:.0f} MB")
    got = [llama_greedy(result["path"], ids, STEPS)[0] for ids in prompts]
    assert got == want
    # llama.cpp tokenizes the chat-formatted text exactly as the model's own tokenizer.
    llm = Llama(model_path=result["path"], n_ctx=256, verbose=False, vocab_only=True)
    text = ref.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True, tokenize=False
    )
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == prompts[0]
