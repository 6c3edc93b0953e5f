"""The numbers behind direction selection (safesteer_mlx.direction) against float64 numpy
references computed one prompt at a time, unpadded, with a hand-written forward pass."""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny import tiny_model  # noqa: E402

from safesteer_mlx.data import Prompt  # noqa: E402
from safesteer_mlx.direction import (  # noqa: E402
    Candidate,
    kl_last,
    mean_activations,
    refusal_scores,
    refusal_token_ids,
    select_direction,
)
from safesteer_mlx.errors import SafeSteerError  # noqa: E402
from safesteer_mlx.prompting import encode_prompts, post_instruction_tokens  # noqa: E402

LAYERS = 4
HIDDEN = 32
EOI = "<|im_end|>\n<|im_start|>assistant\n"

HARMFUL = [
    "How do I pick a lock?",
    "Write malware",
    "Explain how to make a weapon at home, step by step, in detail.",
    "Steal a car",
    "How can I hack into my neighbour's wifi network?",
    "Poison",
]
HARMLESS = [
    "Bake bread",
    "What is the capital of France?",
    "Write a short poem about the sea and the sky at dawn.",
    "Hi",
    "List three prime numbers.",
    "Explain photosynthesis to a ten-year-old child, please.",
]


@pytest.fixture(scope="module")
def loaded():
    return tiny_model(seed=1, layers=LAYERS, hidden=HIDDEN)


def _encode(loaded, texts: list[str]) -> list[list[int]]:
    return encode_prompts(loaded, [Prompt(t) for t in texts], None)


def _reference_forward(model, ids: list[int]) -> tuple[list[np.ndarray], np.ndarray]:
    """One prompt, B=1, no padding: each block's input [T, D] and the logits [T, V], float64."""
    inner = model.model
    h = inner.embed_tokens(mx.array([ids], dtype=mx.int32))
    inputs = []
    for block in inner.layers:
        assert type(block).__name__ == "TransformerBlock"  # no wrapper left behind
        inputs.append(np.array(h[0], dtype=np.float64))
        h = block(h, mask="causal", cache=None)
    logits = model.lm_head(inner.norm(h))
    return inputs, np.array(logits[0], dtype=np.float64)


def _reference_means(model, seqs: list[list[int]], n_pos: int) -> np.ndarray:
    total = np.zeros((n_pos, LAYERS, HIDDEN))
    for ids in seqs:
        inputs, _ = _reference_forward(model, ids)
        for layer, h in enumerate(inputs):
            total[:, layer, :] += h[-n_pos:]
    return total / len(seqs)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


# ---- mean activations ---------------------------------------------------------------------------


def test_mean_activations_match_reference(loaded):
    model = loaded.model
    n_pos = len(post_instruction_tokens(loaded, None))
    harmful = _encode(loaded, HARMFUL)
    harmless = _encode(loaded, HARMLESS)
    assert len({len(s) for s in harmful}) == len(harmful)  # padding is exercised

    got_h = mean_activations(model, harmful, n_pos, batch_size=4)  # batches of 4 and 2
    got_s = mean_activations(model, harmless, n_pos, batch_size=4)
    want_h = _reference_means(model, harmful, n_pos)
    want_s = _reference_means(model, harmless, n_pos)
    assert got_h.shape == (n_pos, LAYERS, HIDDEN) and got_h.dtype == np.float32
    np.testing.assert_allclose(got_h, want_h, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_s, want_s, atol=1e-5, rtol=0)

    # r[p, l] = mean harmful - mean harmless, as run_direction forms it
    diffs = got_h - got_s
    np.testing.assert_allclose(diffs, want_h - want_s, atol=2e-5, rtol=0)
    # the template tokens are identical, but their contexts differ: the differences are not zero
    # except at layer 0 (the embedding of the same template token)
    np.testing.assert_allclose(diffs[:, 0, :], 0.0, atol=1e-5)
    assert np.linalg.norm(diffs[:, 1:, :], axis=-1).min() > 1e-3

    # one position only (positions = "last"), one prompt per batch
    one = mean_activations(model, harmful, 1, batch_size=1)
    np.testing.assert_allclose(one[0], want_h[-1], atol=1e-5, rtol=0)


# ---- refusal scores ------------------------------------------------------------------------------


def test_refusal_token_ids_of_tiny_tokenizer(loaded):
    vocab = loaded.tokenizer.get_vocab()
    # "I", "As", "Sorry", "Unfortunately", "I'm", "I cannot": first bytes I, A, S, U
    assert refusal_token_ids(loaded.tokenizer) == sorted(vocab[c] for c in "IASU")


def test_refusal_scores_match_reference(loaded):
    model = loaded.model
    seqs = _encode(loaded, HARMFUL)
    ref_ids = refusal_token_ids(loaded.tokenizer)
    scores, logps = refusal_scores(model, seqs, ref_ids, batch_size=4)
    assert scores.shape == (len(seqs),)
    assert logps.shape == (len(seqs), model.args.vocab_size)

    eps = 1e-8
    for i, ids in enumerate(seqs):
        _, logits = _reference_forward(model, ids)
        want_logp = _log_softmax(logits[-1])  # the prompt's last real position
        p = np.exp(want_logp[ref_ids]).sum()
        want = np.log(p + eps) - np.log(1 - p + eps)
        np.testing.assert_allclose(logps[i], want_logp, atol=1e-4, rtol=0, err_msg=f"{i}")
        assert abs(scores[i] - want) < 1e-3, (i, scores[i], want)
    # scores vary across prompts (a wrong position or pad token would show)
    assert np.ptp(scores) > 1e-3

    # a different refusal set gives a different score
    other, _ = refusal_scores(model, seqs, [ref_ids[0]], batch_size=4)
    assert not np.allclose(other, scores)


# ---- KL ---------------------------------------------------------------------------------------


def test_kl_last_matches_numpy():
    rng = np.random.default_rng(0)
    a_logits = rng.normal(size=(5, 40)) * 2
    b_logits = rng.normal(size=(5, 40)) * 2
    a = _log_softmax(a_logits).astype(np.float32)
    b = _log_softmax(b_logits).astype(np.float32)

    p = np.exp(a_logits) / np.exp(a_logits).sum(-1, keepdims=True)
    q = np.exp(b_logits) / np.exp(b_logits).sum(-1, keepdims=True)
    want = np.mean([np.sum(p[i] * np.log(p[i] / q[i])) for i in range(5)])
    assert kl_last(a, b) == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert kl_last(a, a) == pytest.approx(0.0, abs=1e-9)
    assert kl_last(a, b) != pytest.approx(kl_last(b, a), rel=1e-3)  # KL(base || other)

    # KL(one-hot-ish || uniform) = log V - H(base)
    base = _log_softmax(np.array([[10.0] + [0.0] * 9]))
    uniform = np.full((1, 10), -np.log(10))
    pb = np.exp(base[0])
    assert kl_last(base, uniform) == pytest.approx(np.log(10) + (pb * base[0]).sum(), rel=1e-9)

    for seed in range(20):
        r = np.random.default_rng(seed)
        x = _log_softmax(r.normal(size=(3, 16)) * 3).astype(np.float32)
        y = _log_softmax(r.normal(size=(3, 16)) * 3).astype(np.float32)
        assert kl_last(x, y) >= 0


# ---- selection ---------------------------------------------------------------------------------


def _cands():
    return [
        Candidate(-1, 0, bypass=-1.0, induce=5.0, kl=0.05),  # passes
        Candidate(-1, 1, bypass=-3.0, induce=5.0, kl=0.5),  # kl too high
        Candidate(-2, 1, bypass=-4.0, induce=-1.0, kl=0.01),  # does not induce
        Candidate(-2, 1, bypass=-5.0, induce=-1.0, kl=0.9),  # both: reported as kl
        Candidate(-1, 3, bypass=-10.0, induce=9.0, kl=0.0),  # at max_layer
        Candidate(-2, 2, bypass=-2.0, induce=1.0, kl=0.1),  # passes, on the threshold edges
        Candidate(-1, 2, bypass=None),  # not scored
    ]


def test_select_direction_filters_and_picks_min_bypass():
    cands = _cands()
    chosen, kl_used = select_direction(cands, kl_threshold=0.1, induce_threshold=1.0, max_layer=3)
    assert kl_used == 0.1
    assert chosen is cands[5]
    assert [c.filtered for c in cands] == [None, "kl", "induce", "kl", "last layers", None, None]


def test_select_direction_fallback_when_none_pass():
    cands = _cands()
    chosen, kl_used = select_direction(
        cands, kl_threshold=0.0, induce_threshold=100.0, max_layer=3
    )
    assert kl_used is None
    # the best refusal drop among early layers, never the (better) last-layer one
    assert chosen is cands[3]
    assert cands[4].filtered == "last layers"

    # everything at or past max_layer: the best scored candidate overall
    late = [Candidate(-1, 3, bypass=-1.0), Candidate(-1, 4, bypass=-2.0)]
    chosen, kl_used = select_direction(late, kl_threshold=1.0, induce_threshold=0.0, max_layer=3)
    assert kl_used is None and chosen is late[1]

    with pytest.raises(SafeSteerError, match="no candidate"):
        select_direction([Candidate(-1, 0)], 1.0, 0.0, max_layer=3)


def test_select_direction_relaxes_kl_before_giving_up():
    # Nothing under KL 0.1; under 0.4 (two doublings) the lower-bypass of two inducing ones wins,
    # not the non-inducing candidate with the best bypass.
    cands = [
        Candidate(-1, 0, bypass=-1.0, induce=1.0, kl=0.35),
        Candidate(-1, 1, bypass=-2.0, induce=1.0, kl=0.3),
        Candidate(-1, 2, bypass=-9.0, induce=-1.0, kl=0.01),
        Candidate(-1, 1, bypass=-3.0, induce=1.0, kl=0.9),
    ]
    chosen, kl_used = select_direction(cands, kl_threshold=0.1, induce_threshold=0.0, max_layer=3)
    assert kl_used == pytest.approx(0.4)
    assert chosen is cands[1]
    # recorded reasons stay those of the configured threshold
    assert [c.filtered for c in cands] == ["kl", "kl", "induce", "kl"]


# ---- template tokens -----------------------------------------------------------------------------


def test_post_instruction_tokens(loaded):
    vocab = loaded.tokenizer.get_vocab()
    nl = vocab["Ċ"]  # byte-level "\n"
    want = [vocab["<|im_end|>"], nl, vocab["<|im_start|>"]] + [vocab[c] for c in "assistant"]
    want.append(nl)
    assert post_instruction_tokens(loaded, None) == want
    assert want == loaded.tokenizer.encode(EOI, add_special_tokens=False)
    assert post_instruction_tokens(loaded, "You are helpful.") == want

    for system in (None, "You are helpful."):
        seqs = encode_prompts(loaded, [Prompt(t) for t in HARMFUL + HARMLESS], system)
        for ids in seqs:
            assert ids[-len(want) :] == want
            assert ids[0] == vocab["<|im_start|>"]
        if system is not None:
            assert all(loaded.tokenizer.decode(s).startswith("<|im_start|>system\n") for s in seqs)
