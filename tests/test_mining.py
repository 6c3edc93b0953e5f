"""Stage 2 (safety-token mining) against a float64 numpy re-implementation of the whole vote on
the tiny model, its pieces on crafted arrays, and `run_mining` end to end over a run directory."""

from __future__ import annotations

import itertools
import json
import os
import shutil

import mlx.core as mx
import numpy as np
import pytest
from tiny import tiny_model

from safesteer_mlx.config import Config
from safesteer_mlx.data import Prompt
from safesteer_mlx.direction import run_direction
from safesteer_mlx.errors import SafeSteerError
from safesteer_mlx.mining import (
    MiningStats,
    banned_token_ids,
    contrast,
    horizon_log_probs,
    run_mining,
    select_safety_tokens,
    valid_positions,
    vote_counts,
)
from safesteer_mlx.modeling import steered, vocab_size
from safesteer_mlx.progress import Reporter
from safesteer_mlx.prompting import encode_prompts
from safesteer_mlx.run import RunDir

H = 5  # horizon: the last H positions of each trajectory (4 response tokens)
K = 7  # top-K votes per valid position
LAYER, COEF = 1, 1.0


@pytest.fixture(scope="module")
def loaded():
    return tiny_model(seed=0)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _trajectories(loaded) -> list[list[int]]:
    prompts = [Prompt("hi"), Prompt("how are you"), Prompt("tell me a story please")]
    seqs = encode_prompts(loaded, prompts, None)
    assert len({len(s) for s in seqs}) == 3  # different lengths: the batches are padded
    extra = [[70, 71, 72, 73], [80, 81, 82, 83], [90, 91, 92, 93]]
    return [s + e for s, e in zip(seqs, extra)]


def _direction() -> mx.array:
    d = mx.random.normal((32,), key=mx.random.key(3))
    return 5.0 * d / mx.linalg.norm(d)


def _reference_log_probs(model, trajectories, direction):
    """Per trajectory alone (B = 1, no padding): float64 log-softmax of the full model's logits
    at the last H positions, base and steered teacher. -> (teacher, base) [N, H, V]."""
    base, teacher = [], []
    for t in trajectories:
        x = mx.array([t])
        base.append(_log_softmax(np.array(model(x)[0, -H:])))
        with steered(model, direction, LAYER, COEF):
            teacher.append(_log_softmax(np.array(model(x)[0, -H:])))
    return np.stack(teacher), np.stack(base)


def _reference_valid(base: np.ndarray, end_ids) -> np.ndarray:
    valid = np.ones(base.shape[:2], dtype=bool)
    for r in range(base.shape[0]):
        for h in range(base.shape[1]):
            if int(base[r, h].argmax()) in end_ids:
                valid[r, h:] = False
                break
    return valid


def _reference_stats(teacher, base, valid, banned, k):
    """Votes by a full sort per valid position; also the smallest gap between the K-th and the
    (K+1)-th score, so the test can insist the float32 code faces no near-tie."""
    delta = teacher - base
    V = delta.shape[-1]
    votes = np.zeros(V, dtype=np.int64)
    gaps = []
    for r, h in zip(*np.nonzero(valid)):
        scores = np.where(banned, -np.inf, delta[r, h])
        order = np.argsort(-scores, kind="stable")
        votes[order[:k]] += 1
        gaps.append(scores[order[k - 1]] - scores[order[k]])
    m = valid[..., None]
    stats = MiningStats(
        votes=votes,
        delta_sum=(delta * m).sum(axis=(0, 1)),
        teacher_prob_sum=(np.exp(teacher) * m).sum(axis=(0, 1)),
        base_prob_sum=(np.exp(base) * m).sum(axis=(0, 1)),
        n_valid=int(valid.sum()),
    )
    return stats, min(gaps)


def _reference_ranking(stats, banned, min_teacher_prob, num_tokens, ranking):
    n = stats.n_valid
    mean_delta = stats.delta_sum / n
    keep = [
        v
        for v in range(len(banned))
        if not banned[v] and stats.teacher_prob_sum[v] / n >= min_teacher_prob
    ]
    if ranking == "votes":
        keep = [v for v in keep if stats.votes[v] > 0]
        keep.sort(key=lambda v: (-stats.votes[v], -mean_delta[v]))
    else:
        keep.sort(key=lambda v: -mean_delta[v])
    return keep[:num_tokens]


# ---- 1. the whole vote against numpy -----------------------------------------------------------


def test_contrast_and_selection_match_numpy(loaded, monkeypatch):
    model, tok = loaded.model, loaded.tokenizer
    V = vocab_size(model)
    trajectories = _trajectories(loaded)
    direction = _direction()
    banned = banned_token_ids(tok, V)
    teacher, base = _reference_log_probs(model, trajectories, direction)

    # End ids: the real one plus two tokens the base model greedily picks mid-trajectory, so
    # rows end at different positions and everything after the end is invalid.
    top1 = base.argmax(-1)  # [N, H]
    end_ids = {2, int(top1[0, 2]), int(top1[2, 4])}
    monkeypatch.setattr(tok, "_eos_token_ids", end_ids)
    assert set(tok.eos_token_ids) == end_ids
    valid = _reference_valid(base, end_ids)
    assert not valid[0, 2:].any() and not valid[2, 4]  # the crafted ends bite
    assert 0 < valid.sum() < valid.size and valid[1].any()

    ref, gap = _reference_stats(teacher, base, valid, banned, K)
    assert gap > 1e-4  # no near-tie at the top-K boundary: the vote is exact in float32

    stats = contrast(
        loaded, direction, LAYER, COEF, trajectories, H, banned, K, 2, Reporter("mining")
    )
    assert stats.n_valid == ref.n_valid
    np.testing.assert_array_equal(stats.votes, ref.votes)
    assert stats.votes.sum() == K * ref.n_valid and stats.votes[banned].sum() == 0
    for name in ("delta_sum", "teacher_prob_sum", "base_prob_sum"):
        got, want = getattr(stats, name), getattr(ref, name)
        assert got.dtype == np.float64
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale, err_msg=name)

    # The selection, with a teacher-probability floor that drops some of the most-voted tokens.
    tp = ref.teacher_prob_sum / ref.n_valid
    unfiltered = _reference_ranking(ref, banned, 0.0, 12, "votes")
    threshold = float(np.median(tp[unfiltered]))
    for ranking in ("votes", "mean"):
        want = _reference_ranking(ref, banned, threshold, 12, ranking)
        assert want and want != _reference_ranking(ref, banned, 0.0, 12, ranking)
        for s in (ref, stats):  # the exact reference sums, and the code's own
            chosen = select_safety_tokens(s, banned, threshold, 12, ranking)
            assert [i for i, _, _ in chosen] == want, ranking
            for i, votes, mean_delta in chosen:
                assert votes == ref.votes[i]
                assert mean_delta == pytest.approx(ref.delta_sum[i] / ref.n_valid, rel=1e-4)
                assert tp[i] >= threshold
    # the two rankings disagree here, so swapping them cannot pass
    assert _reference_ranking(ref, banned, threshold, 12, "votes") != _reference_ranking(
        ref, banned, threshold, 12, "mean"
    )
    voted = select_safety_tokens(stats, banned, 0.0, 10_000, "votes")
    assert {i for i, _, _ in voted} == set(np.flatnonzero(ref.votes))  # only votes > 0


def test_horizon_log_probs_padded_batch_matches_single_rows(loaded):
    trajectories = _trajectories(loaded)
    _, base = _reference_log_probs(loaded.model, trajectories, _direction())
    got = horizon_log_probs(loaded.model, trajectories, H)
    assert got.shape == (3, H, vocab_size(loaded.model)) and got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got), base, atol=2e-4)


def test_select_rejects_unknown_ranking():
    stats = MiningStats(np.ones(4, np.int64), np.ones(4), np.ones(4), np.ones(4), 1)
    with pytest.raises(SafeSteerError, match="ranking"):
        select_safety_tokens(stats, np.zeros(4, bool), 0.0, 2, "random")


# ---- 2. validity -------------------------------------------------------------------------------


def test_valid_positions_on_crafted_log_probs():
    argmax = np.array(
        [
            [1, 4, 2, 3],  # ends at 1
            [0, 1, 2, 3],  # never ends
            [5, 0, 0, 0],  # ends at once
            [1, 2, 3, 5],  # ends at the last position
        ]
    )
    logp = np.full((4, 4, 6), -5.0, dtype=np.float32)
    np.put_along_axis(logp, argmax[..., None], -0.1, axis=-1)
    got = np.array(valid_positions(mx.array(logp), [4, 5]))
    assert got.dtype == np.bool_
    assert got.tolist() == [
        [True, False, False, False],
        [True, True, True, True],
        [False, False, False, False],
        [True, True, True, False],
    ]
    assert np.array(valid_positions(mx.array(logp), [])).all()


# ---- 3. votes ----------------------------------------------------------------------------------


def test_vote_counts_matches_numpy():
    rng = np.random.default_rng(0)
    delta = rng.standard_normal((3, 4, 20))
    valid = rng.random((3, 4)) < 0.7
    valid[1] = False  # a row with no valid position
    valid[0, 0] = valid[2, 3] = True
    banned = np.zeros(20, dtype=bool)
    banned[[0, 3, 7, 8, 19]] = True
    for k in (1, 3, 15):
        want = np.zeros(20, dtype=np.int64)
        for r, h in zip(*np.nonzero(valid)):
            allowed = [v for v in np.argsort(-delta[r, h]) if not banned[v]]
            want[allowed[:k]] += 1
        got = vote_counts(delta, valid, banned, k)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want)
    # k beyond the allowed tokens: every allowed token gets one vote per valid position
    got = vote_counts(delta, valid, banned, 100)
    np.testing.assert_array_equal(got, np.where(banned, 0, valid.sum()))
    # nothing valid: no votes
    assert vote_counts(delta, np.zeros((3, 4), bool), banned, 3).sum() == 0


# ---- 4. banned tokens --------------------------------------------------------------------------


def test_banned_token_ids_on_the_tiny_tokenizer(loaded):
    tok = loaded.tokenizer
    V = vocab_size(loaded.model)
    banned = banned_token_ids(tok, V)
    assert banned.shape == (V,) and banned.dtype == np.bool_
    specials = {
        tok.convert_tokens_to_ids(s) for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    }
    assert set(np.flatnonzero(banned).tolist()) == specials == {0, 1, 2}
    # a padded output table: the extra rows are not tokens, so nothing to ban there
    assert banned_token_ids(tok, V + 5)[V:].sum() == 0


def test_banned_token_ids_control_markers():
    class FakeTokenizer:  # the bits of an HF tokenizer banned_token_ids reads
        all_special_ids = [0]
        added_tokens_decoder = {}
        eos_token_ids = [5]
        pieces = ["<s>", "hello", "<|im_sep|>", "[INST]", "x<end_of_turn>", "</s>", "ok"]

        def __len__(self):
            return len(self.pieces)

        def convert_ids_to_tokens(self, ids):
            return [self.pieces[i] for i in ids]

    banned = banned_token_ids(FakeTokenizer(), 9)
    assert np.flatnonzero(banned).tolist() == [0, 2, 3, 4, 5]


# ---- 5. run_mining end to end ------------------------------------------------------------------

HARMFUL = [f"how do I make poison {i} to hurt my neighbour" for i in range(12)]
HARMLESS = [f"give me a cake recipe {i} for a birthday" for i in range(12)]


@pytest.fixture(scope="module")
def mining_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mining")
    (root / "harmful.json").write_text(json.dumps(HARMFUL))
    (root / "harmless.json").write_text(json.dumps(HARMLESS))
    config = Config()
    config.model.name = "tiny"
    config.data.harmful = str(root / "harmful.json")
    config.data.harmless = str(root / "harmless.json")
    d = config.direction
    d.n_train, d.n_val, d.positions, d.filter_train, d.check_tokens = 8, 4, "last", False, 4
    m = config.mining
    m.generations, m.horizon, m.top_k, m.num_tokens = 2, 3, 5, 10
    loaded = tiny_model(seed=0)
    run = RunDir(root / "run")
    run_direction(config, run, loaded=loaded)
    return config, run, loaded, root


def test_run_mining_end_to_end(mining_setup, monkeypatch):
    from safesteer_mlx import run as run_module

    config, run, loaded, _ = mining_setup
    stamps = itertools.count()
    monkeypatch.setattr(run_module, "_now", lambda: f"stamp-{next(stamps)}")
    result = run_mining(config, run, loaded=loaded)
    assert json.loads(run.safety_tokens.read_text()) == result

    tokens = result["tokens"]
    assert 0 < len(tokens) <= 10
    votes = [t["votes"] for t in tokens]
    assert votes == sorted(votes, reverse=True) and min(votes) > 0
    banned = banned_token_ids(loaded.tokenizer, vocab_size(loaded.model))
    for t in tokens:
        assert {"id", "token", "votes", "mean_delta"} <= set(t)
        assert isinstance(t["id"], int) and not banned[t["id"]]
        assert t["token"] == loaded.tokenizer.decode([t["id"]])
        assert isinstance(t["mean_delta"], float)
    assert len({t["id"] for t in tokens}) == len(tokens)

    meta = json.loads(run.direction_json.read_text())
    s = result["settings"]
    assert (s["layer"], s["coefficient"]) == (meta["layer"], meta["coefficient"])
    assert (s["horizon"], s["generations"], s["top_k"], s["num_tokens"]) == (3, 2, 5, 10)
    assert s["prompts"] == 4 and s["trajectories"] == 8
    assert s["total_positions"] == 8 * 3 and 0 < s["valid_positions"] <= 24
    assert s["banned_tokens"] == 3 and s["vocab_size"] == vocab_size(loaded.model)
    # each valid position gave top_k votes, of which the selected tokens hold some
    assert sum(votes) <= 5 * s["valid_positions"]

    stage = run.stage("mining")
    assert stage["status"] == "done" and stage["finished"].startswith("stamp-")

    # The same inputs again: skipped, nothing rewritten.
    inode = os.stat(run.safety_tokens).st_ino
    again = run_mining(config, run, loaded=loaded)
    assert again == result
    assert run.stage("mining") == stage
    assert os.stat(run.safety_tokens).st_ino == inode

    # --force redoes it (same seed: the same tokens).
    forced = run_mining(config, run, loaded=loaded, force=True)
    after = run.stage("mining")
    assert after["status"] == "done" and after["finished"] != stage["finished"]
    assert after["input_hash"] == stage["input_hash"]
    assert os.stat(run.safety_tokens).st_ino != inode
    assert forced["tokens"] == result["tokens"]

    # A changed mining setting is new input: redone without --force.
    config.mining.top_k = 4
    try:
        changed = run_mining(config, run, loaded=loaded)
    finally:
        config.mining.top_k = 5
    assert run.stage("mining")["input_hash"] != stage["input_hash"]
    assert changed["settings"]["top_k"] == 4


def test_run_mining_without_direction_is_a_one_line_error(mining_setup):
    config, _, loaded, root = mining_setup
    empty = RunDir(root / "empty-run")
    with pytest.raises(SafeSteerError) as info:
        run_mining(config, empty, loaded=loaded)
    message = str(info.value)
    assert "\n" not in message and "direction" in message
    assert not empty.safety_tokens.exists()


def test_run_mining_redoes_when_the_system_prompt_changes(mining_setup):
    config, run, loaded, root = mining_setup
    run = RunDir(shutil.copytree(run.path, root / "system-prompt-run"))  # leave the shared run be
    run_mining(config, run, loaded=loaded)
    before = run.stage("mining")
    config.data.system_prompt = "You are a terse assistant."
    try:
        result = run_mining(config, run, loaded=loaded)
    finally:
        config.data.system_prompt = None
    assert run.stage("mining")["input_hash"] != before["input_hash"]
    assert result["examples"]  # a fresh result
