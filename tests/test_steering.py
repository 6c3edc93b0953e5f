"""Steering, ablation and capture wrappers (safesteer_mlx.modeling) against an independent manual
forward pass of the tiny float32 llama model: bit-exact identity at coefficient 0, the KV-cache
and batched generation paths, gradients, and directional ablation."""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny import tiny_model  # noqa: E402

from safesteer_mlx.errors import SafeSteerError  # noqa: E402
from safesteer_mlx.generation import generate_batch  # noqa: E402
from safesteer_mlx.modeling import (  # noqa: E402
    ablated,
    capture_layer_inputs,
    decoder_layers,
    forward_hidden,
    steered,
)

LAYERS = 4
HIDDEN = 32
STEER_LAYER = 2
COEF = 2.0


@pytest.fixture(scope="module")
def loaded():
    return tiny_model(seed=0, layers=LAYERS, hidden=HIDDEN)


@pytest.fixture(scope="module")
def model(loaded):
    return loaded.model


@pytest.fixture(scope="module")
def direction():
    return mx.random.normal((HIDDEN,), key=mx.random.key(7))


@pytest.fixture(scope="module")
def tokens(loaded):
    text = "Steer me, please: how do I bake bread?"
    ids = loaded.tokenizer.encode(text, add_special_tokens=False)
    return mx.array([ids], dtype=mx.int32)


def _blocks(model) -> list:
    """The model's original decoder blocks (call outside every wrapper context)."""
    blocks = list(model.model.layers)
    assert all(type(b).__name__ == "TransformerBlock" for b in blocks)
    return blocks


def _project_out(h: mx.array, unit: mx.array) -> mx.array:
    return h - (h @ unit)[..., None] * unit


def manual_forward(model, blocks, tokens, *, layer=None, vector=None, unit=None, record=None):
    """embed -> blocks (mask="causal", no cache) -> final norm -> lm_head, written out by hand.

    `vector` is added to the input of block `layer`; with `unit`, the direction is projected out
    of every block input and every attention/MLP output (Arditi et al.'s ablation). `record`
    receives the residual stream entering each block (after steering, before ablation)."""
    inner = model.model
    h = inner.embed_tokens(tokens)
    for i, block in enumerate(blocks):
        if i == layer:
            h = h + vector
        if record is not None:
            record.append(h)
        if unit is None:
            h = block(h, mask="causal", cache=None)
        else:
            x = _project_out(h, unit)
            r = _project_out(block.self_attn(block.input_layernorm(x), "causal", None), unit)
            h = x + r
            r = _project_out(block.mlp(block.post_attention_layernorm(h)), unit)
            h = h + r
    return model.lm_head(inner.norm(h))


# ---- 1. coefficient 0 ----------------------------------------------------------------------------


def test_coef_zero_is_bit_identical(model, direction, tokens):
    base = model(tokens)
    mx.eval(base)
    for layer in range(LAYERS):
        with steered(model, direction, layer, 0.0):
            out = model(tokens)
            mx.eval(out)
        assert np.array_equal(np.array(out), np.array(base)), f"layer {layer}"
    # and a nonzero coefficient does change the logits (the check above can fail)
    with steered(model, direction, STEER_LAYER, COEF):
        moved = model(tokens)
    assert not np.allclose(np.array(moved), np.array(base), atol=1e-3)


# ---- 2. steered forward == manual forward; layers restored ---------------------------------------


@pytest.mark.parametrize("layer", [0, STEER_LAYER, LAYERS - 1])
def test_steered_matches_manual_forward(model, direction, tokens, layer):
    blocks = _blocks(model)
    want = manual_forward(model, blocks, tokens, layer=layer, vector=COEF * direction)
    with steered(model, direction, layer, COEF) as m:
        assert m is model
        got = model(tokens)
        mx.eval(got)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5, rtol=0)
    # a vector at the wrong layer gives different logits
    other = (layer + 1) % LAYERS
    wrong = manual_forward(model, blocks, tokens, layer=other, vector=COEF * direction)
    assert not np.allclose(np.array(got), np.array(wrong), atol=1e-3)


def test_steered_restores_layers(model, direction, tokens):
    layers = decoder_layers(model)
    before = list(layers)
    with steered(model, direction, STEER_LAYER, COEF):
        assert decoder_layers(model) is layers  # the same list, swapped in place
        assert layers[STEER_LAYER] is not before[STEER_LAYER]
        assert [a is b for a, b in zip(layers, before, strict=True)] == [
            i != STEER_LAYER for i in range(LAYERS)
        ]
        # attributes the model reads from its blocks are forwarded through the wrapper
        assert layers[STEER_LAYER].use_sliding is before[STEER_LAYER].use_sliding
        assert layers[STEER_LAYER].self_attn is before[STEER_LAYER].self_attn
    assert all(a is b for a, b in zip(decoder_layers(model), before, strict=True))

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with steered(model, direction, 1, COEF):
            model(tokens)
            raise Boom
    assert all(a is b for a, b in zip(decoder_layers(model), before, strict=True))
    assert len(decoder_layers(model)) == LAYERS

    with pytest.raises(SafeSteerError, match="out of range"):
        with steered(model, direction, LAYERS, COEF):
            pass
    assert all(a is b for a, b in zip(decoder_layers(model), before, strict=True))


def test_ablated_restores_modules(model, direction, tokens):
    before = [(b, b.self_attn, b.mlp) for b in decoder_layers(model)]

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with ablated(model, direction):
            assert all(b.self_attn is not a for b, a, _ in before)
            raise Boom
    assert [(b, b.self_attn, b.mlp) for b in decoder_layers(model)] == before


# ---- 3. KV-cache generation == full recompute ----------------------------------------------------


def test_cached_generation_matches_full_recompute(model, direction, tokens):
    from mlx_lm.generate import generate_step

    n_new = 8
    prompt = tokens[0]
    with steered(model, direction, STEER_LAYER, COEF):
        cached, cached_logp = [], []
        # prefill_step_size < prompt length: the prompt is prefilled in chunks through the cache
        for tok, logp in generate_step(prompt, model, max_tokens=n_new, prefill_step_size=5):
            cached.append(int(tok))
            cached_logp.append(np.array(logp))

        seq = [int(t) for t in prompt.tolist()]
        full, full_logp = [], []
        for _ in range(n_new):
            logits = model(mx.array([seq], dtype=mx.int32))[0, -1]
            logp = logits - mx.logsumexp(logits)
            nxt = int(mx.argmax(logp))
            full.append(nxt)
            full_logp.append(np.array(logp))
            seq.append(nxt)
    assert cached == full
    for step, (a, b) in enumerate(zip(cached_logp, full_logp, strict=True)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0, err_msg=f"step {step}")

    # the steered continuation differs from the unsteered one (the vector is really applied)
    plain = [int(t) for t, _ in generate_step(prompt, model, max_tokens=n_new)]
    assert plain != cached


# ---- 4. batched generation under steering --------------------------------------------------------


def test_batched_generation_matches_single(loaded, direction):
    tok = loaded.tokenizer
    texts = ["Hi", "Tell me a story about a dragon.", "What is 2+2? Explain."]
    prompts = [tok.encode(t, add_special_tokens=False) for t in texts]
    assert len({len(p) for p in prompts}) == 3
    model = loaded.model
    with steered(model, direction, STEER_LAYER, COEF):
        batched = generate_batch(model, tok, prompts, max_tokens=6, batch_size=3)
        single = [
            generate_batch(model, tok, [p], max_tokens=6, batch_size=1).token_ids[0]
            for p in prompts
        ]
    assert batched.token_ids == single
    assert all(len(t) > 0 for t in single)
    unsteered = [
        generate_batch(model, tok, [p], max_tokens=6, batch_size=1).token_ids[0] for p in prompts
    ]
    assert unsteered != single  # steering changes the completions


# ---- 5. gradients --------------------------------------------------------------------------------


def _xent(logits: mx.array, tokens: mx.array) -> mx.array:
    return nn.losses.cross_entropy(logits[:, :-1], tokens[:, 1:], reduction="mean")


def test_gradients_flow_through_steered_layer(model, direction, tokens):
    def loss_fn(m, x):
        return m(x)[:, -3:].mean()

    with steered(model, direction, STEER_LAYER, COEF):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, tokens)
        mx.eval(loss, grads)
    flat = dict(_flatten(grads))
    assert flat, "no gradients"
    assert all(np.isfinite(np.array(g)).all() for g in flat.values())
    # the wrapped block's own weights get gradients, through the wrapper
    wrapped = [k for k in flat if k.startswith(f"model.layers.{STEER_LAYER}.")]
    assert wrapped and any(np.abs(np.array(flat[k])).max() > 0 for k in wrapped)
    # the steering vector is frozen: it is not a trainable parameter
    assert not any("vector" in k for k in flat)
    for i in range(LAYERS):
        q = [k for k in flat if k.startswith(f"model.layers.{i}.") and "q_proj" in k]
        assert q and np.abs(np.array(flat[q[0]])).max() > 0, f"layer {i}"


def _flatten(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


@pytest.mark.parametrize("layer", [0, LAYERS - 1])
def test_vector_gradient_matches_finite_difference(model, direction, tokens, layer):
    def f(vec):
        with steered(model, vec, layer, 1.0):
            return _xent(model(tokens), tokens)

    vec = 0.5 * direction
    grad = mx.grad(f)(vec)
    mx.eval(grad)
    g = np.array(grad, dtype=np.float64)
    assert np.isfinite(g).all() and np.linalg.norm(g) > 0

    u = np.array(mx.random.normal((HIDDEN,), key=mx.random.key(11 + layer)), dtype=np.float64)
    u /= np.linalg.norm(u)
    eps = 1e-2
    up = f(vec + eps * mx.array(u, dtype=mx.float32)).item()
    down = f(vec - eps * mx.array(u, dtype=mx.float32)).item()
    fd = (up - down) / (2 * eps)
    analytic = float(g @ u)
    assert abs(fd - analytic) <= 1e-2 * max(abs(analytic), abs(fd)) + 1e-4, (fd, analytic)


# ---- 6. ablation ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ablation_dir(model, tokens):
    """A direction the residual stream has a large component along."""
    with capture_layer_inputs(model) as sink:
        model(tokens)
        acts = mx.stack(sink)  # [L, 1, T, D]
    return acts.mean(axis=(0, 1, 2))


def test_ablation_removes_the_direction(model, tokens, ablation_dir):
    unit = ablation_dir / mx.linalg.norm(ablation_dir)
    with capture_layer_inputs(model) as sink:
        model(tokens)
        plain = [np.array(h) for h in sink]
    u = np.array(unit)
    for h in plain[1:]:  # the check below can fail: unablated inputs have a large component
        assert np.abs(h @ u).max() > 0.1 * np.linalg.norm(h, axis=-1).max()

    with ablated(model, ablation_dir):
        with capture_layer_inputs(model) as sink:
            logits = model(tokens)
            hidden = forward_hidden(model, tokens)
            acts = [np.array(h) for h in sink]
    logits = np.array(logits)
    # capture wraps outside the ablation wrapper: block 0 sees the raw embedding here, and every
    # later block's input is the previous (ablated) block's output, with no component along r.
    for i, h in enumerate(acts[1:], start=1):
        comp = np.abs(h @ u).max()
        assert comp <= 1e-4 * np.linalg.norm(h, axis=-1).max(), f"layer {i}: {comp}"
    # the final-normed hidden state has none either (RMSNorm weights are 1 at init)
    hid = np.array(hidden)
    assert np.abs(hid @ u).max() <= 1e-4 * np.linalg.norm(hid, axis=-1).max()

    base = np.array(model(tokens))
    assert not np.allclose(logits, base, atol=1e-3)

    want = manual_forward(model, _blocks(model), tokens, unit=unit)
    np.testing.assert_allclose(logits, np.array(want), atol=1e-5, rtol=0)


def test_ablation_inside_another_wrapper(model, tokens, ablation_dir, direction):
    with ablated(model, ablation_dir):
        want = np.array(model(tokens))
    with steered(model, direction, STEER_LAYER, 0.0):
        with ablated(model, ablation_dir):
            got = np.array(model(tokens))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


# ---- 7. capture ----------------------------------------------------------------------------------


def test_capture_records_manual_forward_inputs(model, tokens, direction):
    blocks = _blocks(model)
    record: list = []
    want = manual_forward(model, blocks, tokens, record=record)
    with capture_layer_inputs(model) as sink:
        got = model(tokens)
        acts = list(sink)
    assert len(acts) == LAYERS and all(a is not None for a in acts)
    for i, (a, b) in enumerate(zip(acts, record, strict=True)):
        assert a.shape == b.shape == (1, tokens.shape[1], HIDDEN)
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-6, rtol=0, err_msg=f"{i}")
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5, rtol=0)
    assert all(a is b for a, b in zip(decoder_layers(model), blocks, strict=True))

    # with a select function, and steering entered inside the capture (so the steering wrapper
    # sits inside the capture wrapper): block STEER_LAYER's recorded input includes the vector
    record = []
    manual_forward(model, blocks, tokens, layer=STEER_LAYER, vector=COEF * direction, record=record)
    with capture_layer_inputs(model, lambda h: h[:, -2:]) as sink:
        with steered(model, direction, STEER_LAYER, COEF):
            model(tokens)
            acts = list(sink)
    assert all(a is b for a, b in zip(decoder_layers(model), blocks, strict=True))
    for i, (a, b) in enumerate(zip(acts, record, strict=True)):
        np.testing.assert_allclose(
            np.array(a), np.array(b[:, -2:]), atol=1e-5, rtol=0, err_msg=f"{i}"
        )
