"""The memory switches a 7B needs (bench/memory.py): the loss's logits chunk capped by element
count, and gradient checkpointing on by default from 3B-class models."""

from __future__ import annotations

import mlx.core as mx
import pytest
from tiny import tiny_model

import safesteer_mlx.config as config_module
import safesteer_mlx.distill as distill
import safesteer_mlx.modeling as modeling
from safesteer_mlx.config import Config, checkpointing_by_default
from safesteer_mlx.trainer import Trainer


def test_logits_chunk_is_capped_by_element_count(monkeypatch):
    loaded = tiny_model(seed=0)
    model = loaded.model
    tokens = mx.array([[5, 9, 30, 77, 4, 100, 61, 8], [6, 41, 12, 3, 90, 15, 0, 0]])
    mask = mx.array([[0, 1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0, 0, 0]]).astype(mx.bool_)
    hidden = modeling.forward_hidden(model, tokens)
    teacher = hidden + 0.3
    safety = mx.array([10, 50, 51, 97, 120], dtype=mx.int32)
    widths = []
    real_head = modeling.lm_head

    def counting_head(m, h):
        widths.append(h.shape[1])
        return real_head(m, h)

    monkeypatch.setattr(modeling, "lm_head", counting_head)
    want, _ = distill.chunked_loss(model, hidden, teacher, mask, safety, "restricted", 128)
    assert widths == [5, 5]  # the response span (positions 1..5) in one chunk, student + teacher
    vocab = modeling.vocab_size(model)
    # 2 rows x 2 positions
    monkeypatch.setattr(config_module, "LOGITS_CHUNK_ELEMENTS", 2 * 2 * vocab)
    widths.clear()
    got, _ = distill.chunked_loss(model, hidden, teacher, mask, safety, "restricted", 128)
    assert widths == [2, 2, 2, 2, 1, 1]
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_gradient_checkpointing_defaults_on_from_3b_class_models():
    assert checkpointing_by_default(28, 3584)  # Qwen2.5-7B
    assert checkpointing_by_default(36, 2048)  # Qwen2.5-3B
    assert not checkpointing_by_default(30, 576)  # SmolLM2-135M (the fixture)
    assert not checkpointing_by_default(28, 1536)  # Qwen2.5-1.5B
    config = Config()
    assert config.distill.grad_checkpoint is None
    direction = mx.zeros((32,))
    trainer = Trainer(tiny_model(seed=0), config, direction, 1, 1.0, [60, 61], steps=2)
    assert trainer.checkpointing is False
    config.distill.grad_checkpoint = True
    trainer = Trainer(tiny_model(seed=0), config, direction, 1, 1.0, [60, 61], steps=2)
    assert trainer.checkpointing is True


def test_memory_estimate_follows_the_engine_defaults():
    """The TUI's estimate counts what training will do: checkpointing on by default for a 7B
    (the same as asking for it) and the loss's logits chunk capped as chunked_loss caps it."""
    from safesteer_mlx.session import estimate_peak_memory

    seven_b = {"weights_bytes": 4.3e9, "num_layers": 28, "hidden_size": 3584,
               "vocab_size": 152064, "dtype": "bfloat16"}  # fmt: skip
    auto, on, off = Config().distill, Config().distill, Config().distill
    on.grad_checkpoint, off.grad_checkpoint = True, False
    assert estimate_peak_memory(seven_b, auto) == estimate_peak_memory(seven_b, on)
    assert estimate_peak_memory(seven_b, off)["train_gb"] > estimate_peak_memory(seven_b, on)[
        "train_gb"
    ]
    # b = 8 rows of T = 128 + 512 tokens; the logits chunk is capped at 2^25 // (8 x V) = 27
    # positions, not the configured 128
    b, t, h, layers, vocab = 8, 640, 3584, 28, 152064
    want = b * t * h * 2 * (layers + 16) + b * 27 * vocab * 4 * 3
    assert estimate_peak_memory(seven_b, on)["train_gb"] == pytest.approx(want / 1e9)
