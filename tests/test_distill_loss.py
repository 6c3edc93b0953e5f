"""Stage 3's loss and its plumbing against float64 numpy references: the three reverse-KL
variants (values and gradients), masking, the chunked lm_head projection on a tiny model with
LoRA (value and gradient equal to the unchunked computation), the batch layout, the learning-rate
schedule, and the adapter switch that turns the student back into the base."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from tiny import tiny_model

from safesteer_mlx.adapters import adapter_config, adapters_disabled, attach
from safesteer_mlx.distill import (
    LOSS_VARIANTS,
    build_batch,
    chunked_loss,
    masked_sequence_mean,
    restricted_reverse_kl,
)
from safesteer_mlx.errors import SafeSteerError
from safesteer_mlx.modeling import forward_hidden, lm_head
from safesteer_mlx.trainer import cosine_with_warmup

B, T, V = 2, 3, 50


# ---- numpy references --------------------------------------------------------------------------


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def ref_kl(student: np.ndarray, teacher: np.ndarray, ids: np.ndarray, variant: str) -> np.ndarray:
    """Per-position loss [...] in float64, written out from the definitions."""
    s, t = student.astype(np.float64), teacher.astype(np.float64)
    if variant in ("restricted", "generalized"):  # full-vocabulary log-softmax, S only
        ls, lt = _log_softmax(s)[..., ids], _log_softmax(t)[..., ids]
        if variant == "generalized":  # + Σ_S (p_t - p_s): the unnormalised KL
            return (np.exp(ls) * (ls - lt) - np.exp(ls) + np.exp(lt)).sum(axis=-1)
    elif variant == "renormalized":  # softmax over S only
        ls, lt = _log_softmax(s[..., ids]), _log_softmax(t[..., ids])
    elif variant == "full_vocab":
        ls, lt = _log_softmax(s), _log_softmax(t)
    else:
        raise AssertionError(variant)
    return (np.exp(ls) * (ls - lt)).sum(axis=-1)


def ref_masked_mean(per_pos: np.ndarray, mask: np.ndarray) -> float:
    means = [per_pos[i][mask[i]].mean() for i in range(len(mask)) if mask[i].any()]
    return float(np.mean(means)) if means else 0.0


def _logits(seed: int, shape=(B, T, V), scale: float = 2.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


SAFETY = np.sort(np.random.default_rng(7).choice(V, size=10, replace=False)).astype(np.int32)


# ---- 1. values ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", LOSS_VARIANTS)
def test_loss_matches_float64_reference(variant):
    s, t = _logits(1), _logits(2)
    got = restricted_reverse_kl(mx.array(s), mx.array(t), mx.array(SAFETY), variant)
    assert got.shape == (B, T) and got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got), ref_kl(s, t, SAFETY, variant), rtol=1e-5, atol=1e-6)


def test_identical_logits_give_zero_loss():
    s = _logits(3)
    for variant in LOSS_VARIANTS:
        got = restricted_reverse_kl(mx.array(s), mx.array(s), mx.array(SAFETY), variant)
        np.testing.assert_allclose(np.array(got), 0.0, atol=1e-6)


def test_restricted_can_be_negative_full_and_renormalized_cannot():
    # The student puts less mass than the teacher on every safety token: each restricted term
    # p_s (log p_s - log p_t) is negative.
    ids = np.array([0, 1, 2], dtype=np.int32)
    s = np.zeros((1, 1, V), dtype=np.float32)
    t = np.zeros((1, 1, V), dtype=np.float32)
    t[..., ids] = 4.0
    s[..., ids] = [0.0, 0.5, -1.0]
    restricted = float(restricted_reverse_kl(mx.array(s), mx.array(t), mx.array(ids))[0, 0])
    assert restricted < -0.01
    assert restricted == pytest.approx(float(ref_kl(s, t, ids, "restricted")[0, 0]), rel=1e-5)
    # the two true KLs are never negative, on these and on random logits
    for variant in ("generalized", "renormalized", "full_vocab"):
        for a, b in [(s, t), (_logits(4), _logits(5)), (_logits(6, scale=8), _logits(7))]:
            got = np.array(restricted_reverse_kl(mx.array(a), mx.array(b), mx.array(ids), variant))
            assert (got >= -1e-6).all()
    # a teacher = the student with S boosted: every restricted term is negative
    student = _logits(8)
    teacher = student.copy()
    teacher[..., SAFETY] += 3.0
    got = np.array(restricted_reverse_kl(mx.array(student), mx.array(teacher), mx.array(SAFETY)))
    assert (got < 0).all()
    np.testing.assert_allclose(got, ref_kl(student, teacher, SAFETY, "restricted"), rtol=1e-5)


def test_unknown_variant_is_an_error():
    s = mx.array(_logits(1))
    with pytest.raises(SafeSteerError, match="loss variant"):
        restricted_reverse_kl(s, s, mx.array(SAFETY), "forward")


# ---- 2. gradients ------------------------------------------------------------------------------


def _finite_difference(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar f at x, all coordinates at once (float64)."""
    x = x.astype(np.float64)
    n = x.size
    bumps = np.eye(n).reshape((n, *x.shape)) * eps
    plus = np.array([f(x + d) for d in bumps])
    minus = np.array([f(x - d) for d in bumps])
    return ((plus - minus) / (2 * eps)).reshape(x.shape)


@pytest.mark.parametrize("variant", LOSS_VARIANTS)
def test_gradient_wrt_student_logits(variant):
    s, t = _logits(11), _logits(12)
    w = np.random.default_rng(13).uniform(0.5, 1.5, size=(B, T))  # break position symmetry
    ids = mx.array(SAFETY)

    def f(x):
        return (restricted_reverse_kl(x, mx.array(t), ids, variant) * mx.array(w)).sum()

    got = np.array(mx.grad(f)(mx.array(s)))
    want = _finite_difference(lambda x: float((ref_kl(x, t, SAFETY, variant) * w).sum()), s)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-6)
    if variant == "renormalized":  # only the safety logits matter
        outside = np.setdiff1d(np.arange(V), SAFETY)
        assert np.abs(got[..., outside]).max() == 0.0
    assert np.abs(got).max() > 1e-3


# ---- 3. masking --------------------------------------------------------------------------------


def test_masked_sequence_mean_matches_numpy():
    rng = np.random.default_rng(21)
    per_pos = rng.standard_normal((4, 6)).astype(np.float32)
    mask = np.zeros((4, 6), dtype=bool)
    mask[0, 1:4] = True  # 3 positions
    mask[1, :] = False  # empty: ignored, not a zero
    mask[2, 5] = True  # 1 position
    mask[3, ::2] = True  # 3 positions
    got = float(masked_sequence_mean(mx.array(per_pos), mx.array(mask)))
    want = ref_masked_mean(per_pos, mask)
    assert got == pytest.approx(want, rel=1e-6)
    # a per-sequence mean, not a per-token mean over the batch
    assert abs(want - per_pos[mask].mean()) > 1e-3
    # and the empty sequence really is ignored (counting it as a zero would give 3/4 of this)
    assert abs(want - 0.75 * want) > 1e-3
    # all empty: zero, not NaN
    assert float(masked_sequence_mean(mx.array(per_pos), mx.zeros((4, 6), dtype=mx.bool_))) == 0


@pytest.mark.parametrize("variant", LOSS_VARIANTS)
def test_masked_out_positions_contribute_nothing(variant):
    s, t = _logits(31), _logits(32)
    mask = np.array([[True, False, True], [False, True, False]])
    ids = mx.array(SAFETY)

    def loss(x):
        per_pos = restricted_reverse_kl(x, mx.array(t), ids, variant)
        return masked_sequence_mean(per_pos, mx.array(mask))

    value_and_grad = mx.value_and_grad(loss)
    v1, g1 = value_and_grad(mx.array(s))
    changed = s.copy()
    changed[~mask] = _logits(33)[~mask] * 5
    v2, g2 = value_and_grad(mx.array(changed))
    assert float(v1) == float(v2)
    assert np.array_equal(np.array(g1), np.array(g2))
    assert np.abs(np.array(g1)[~mask]).max() == 0.0
    assert np.abs(np.array(g1)[mask]).max() > 0.0
    want = ref_masked_mean(ref_kl(s, t, SAFETY, variant), mask)
    assert float(v1) == pytest.approx(want, rel=1e-5, abs=1e-7)


# ---- 4. chunked loss on the tiny model ---------------------------------------------------------


@pytest.fixture(scope="module")
def lora_model():
    """The tiny model with LoRA on every block, lora_b perturbed away from zero."""
    loaded = tiny_model(seed=0)
    model = loaded.model
    tokens = mx.array([[5, 9, 30, 77, 4, 100, 61, 8], [6, 41, 12, 3, 90, 15, 0, 0]])
    base_logits = model(tokens)
    mx.eval(base_logits)
    attach(model, adapter_config("lora", 4, 4, 2.0, 0.0, None))
    after_attach = model(tokens)
    mx.random.seed(5)
    perturbed = [
        (k, 0.1 * mx.random.normal(v.shape))
        for k, v in tree_flatten(model.trainable_parameters())
        if k.endswith("lora_b")
    ]
    model.update(tree_unflatten(perturbed))
    mx.eval(model.parameters(), after_attach)
    return {
        "model": model,
        "tokens": tokens,
        "base_logits": base_logits,
        "after_attach": after_attach,
    }


def _teacher_hidden(model, tokens):
    with adapters_disabled(model):
        h = forward_hidden(model, tokens)
    mx.eval(h)
    return h


LORA_MASK = mx.array(
    [
        [False, True, True, True, True, True, False, False],
        [False, False, True, True, False, False, False, False],
    ]
)
TINY_SAFETY = mx.array([10, 50, 51, 97, 120, 200, 255], dtype=mx.int32)


def _unchunked(model, tokens, mask, teacher_hidden, variant):
    ls = lm_head(model, forward_hidden(model, tokens))
    lt = lm_head(model, teacher_hidden)
    return masked_sequence_mean(restricted_reverse_kl(ls, lt, TINY_SAFETY, variant), mask)


@pytest.mark.parametrize("variant", LOSS_VARIANTS)
@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_chunked_loss_equals_unchunked(lora_model, variant, chunk):
    model, tokens = lora_model["model"], lora_model["tokens"]
    teacher_hidden = _teacher_hidden(model, tokens)

    def chunked(tok, mask, th):
        return chunked_loss(
            model, forward_hidden(model, tok), th, mask, TINY_SAFETY, variant, chunk
        )

    def plain(tok, mask, th):
        return _unchunked(model, tok, mask, th, variant)

    (loss, kl), grads = nn.value_and_grad(model, chunked)(tokens, LORA_MASK, teacher_hidden)
    want, want_grads = nn.value_and_grad(model, plain)(tokens, LORA_MASK, teacher_hidden)
    mx.eval(loss, kl, grads, want, want_grads)
    assert abs(float(want)) > 1e-5  # the student is not the teacher
    assert float(loss) == pytest.approx(float(want), rel=1e-5, abs=1e-8)

    got_g, want_g = dict(tree_flatten(grads)), dict(tree_flatten(want_grads))
    assert set(got_g) == set(want_g) and got_g
    assert all(k.endswith(("lora_a", "lora_b")) for k in got_g)
    scale = max(float(mx.abs(g).max()) for g in want_g.values())
    assert scale > 0
    for k in want_g:
        np.testing.assert_allclose(
            np.array(got_g[k]), np.array(want_g[k]), rtol=1e-4, atol=1e-5 * scale, err_msg=k
        )

    restricted = _unchunked(model, tokens, LORA_MASK, teacher_hidden, "restricted")
    assert float(kl) == pytest.approx(float(restricted), rel=1e-5, abs=1e-8)
    if variant == "restricted":
        assert float(kl) == pytest.approx(float(loss), rel=1e-6, abs=1e-9)


def test_chunked_loss_gives_no_gradient_to_the_teacher(lora_model):
    model, tokens = lora_model["model"], lora_model["tokens"]
    student = forward_hidden(model, tokens)
    teacher = _teacher_hidden(model, tokens)
    for variant in LOSS_VARIANTS:

        def f(th, sh, variant=variant):
            return chunked_loss(model, sh, th, LORA_MASK, TINY_SAFETY, variant, 3)[0]

        g_teacher, g_student = mx.grad(f, argnums=(0, 1))(teacher, student)
        assert float(mx.abs(g_teacher).max()) == 0.0
        assert float(mx.abs(g_student).max()) > 0.0


# ---- 5. batches --------------------------------------------------------------------------------


def test_build_batch_mask_and_padding():
    prompts = [[11, 12, 13], [21, 22, 23, 24, 25]]
    responses = [[31, 32, 33, 34], [41, 42]]
    batch = build_batch(prompts, responses)
    assert batch.tokens.tolist() == [
        [11, 12, 13, 31, 32, 33, 34],
        [21, 22, 23, 24, 25, 41, 42],
    ]
    # position j predicts token j+1: row 0's responses (positions 3..6) are predicted at 2..5,
    # row 1's (positions 5..6) at 4..5
    assert batch.mask.tolist() == [
        [False, False, True, True, True, True, False],
        [False, False, False, False, True, True, False],
    ]
    assert batch.response_tokens == 6

    batch = build_batch([[1, 2], [3, 4, 5, 6, 7]], [[8], [9, 10]])
    assert batch.tokens.tolist() == [[1, 2, 8, 0, 0, 0, 0], [3, 4, 5, 6, 7, 9, 10]]
    assert batch.mask.tolist() == [
        [False, True, False, False, False, False, False],
        [False, False, False, False, True, True, False],
    ]
    assert batch.response_tokens == 3


# ---- 6. learning-rate schedule -----------------------------------------------------------------


def test_cosine_with_warmup():
    peak, total = 1e-3, 100
    sched = cosine_with_warmup(peak, total, 0.1)
    lr = [float(sched(mx.array(s))) for s in range(total + 1)]
    # linear warm-up over the first 10 steps, reaching the peak at step 10
    assert lr[10] == pytest.approx(peak, rel=1e-6)
    assert all(lr[i] < lr[i + 1] for i in range(10))
    steps = np.diff(lr[:11])
    np.testing.assert_allclose(steps, steps[0], rtol=1e-4)
    assert lr[0] == pytest.approx(peak / 10, rel=1e-5)
    # then cosine decay over the remaining 90 steps, to zero at the end
    for s in (10, 20, 33, 55, 80, 99, 100):
        want = 0.5 * peak * (1 + math.cos(math.pi * (s - 10) / 90))
        assert lr[s] == pytest.approx(want, rel=1e-4, abs=1e-10), s
    assert lr[55] == pytest.approx(peak / 2, rel=1e-4)
    assert lr[100] == pytest.approx(0.0, abs=1e-10)
    assert all(lr[i] >= lr[i + 1] for i in range(10, total))
    # no warm-up: pure cosine from the peak
    flat = cosine_with_warmup(peak, total, 0.0)
    assert float(flat(mx.array(0))) == pytest.approx(peak, rel=1e-6)
    assert float(flat(mx.array(50))) == pytest.approx(peak / 2, rel=1e-4)


# ---- 7. adapters off = the base, bit for bit ---------------------------------------------------


def test_adapters_disabled_is_the_base_model(lora_model):
    model, tokens = lora_model["model"], lora_model["tokens"]
    base = lora_model["base_logits"]
    assert mx.array_equal(lora_model["after_attach"], base)  # lora_b starts at zero
    student = model(tokens)
    assert float(mx.abs(student - base).max()) > 1e-3  # the perturbed LoRA changes the model
    with adapters_disabled(model):
        assert mx.array_equal(model(tokens), base)
    assert mx.array_equal(model(tokens), student)  # LoRA is back

    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert len(trainable) == 4 * 7 * 2  # 4 blocks x 7 linear maps x (lora_a, lora_b)
    assert all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for k in trainable)


def test_restricted_optimum_is_teacher_over_e_generalized_is_teacher():
    """Per safety token, p (log p - log q) is lowest at p = q / e, while the generalized KL
    p (log p - log q) - p + q is lowest (zero) at p = q: why the restricted sum also pushes down
    S tokens a student already shares with the teacher."""
    q = 0.6
    z = np.linspace(-6, 6, 4801).astype(np.float32)  # student logit of token 0; token 1 at 0
    student = np.stack([z, np.zeros_like(z)], axis=-1)[:, None, :]
    teacher = np.broadcast_to(np.array([np.log(q / (1 - q)), 0.0], np.float32), student.shape)
    ids = mx.array([0])
    p = 1 / (1 + np.exp(-z))
    for variant, want_p, want_min in (("restricted", q / np.e, -q / np.e), ("generalized", q, 0)):
        loss = np.array(restricted_reverse_kl(mx.array(student), mx.array(teacher), ids, variant))
        assert p[loss[:, 0].argmin()] == pytest.approx(want_p, abs=2e-3)
        assert loss.min() == pytest.approx(want_min, abs=1e-5)
