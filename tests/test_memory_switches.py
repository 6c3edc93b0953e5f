"""The memory switches a 7B needs (bench/memory.py): the loss's logits chunk capped by element
count, and gradient checkpointing on by default from 3B-class models."""

from __future__ import annotations

import mlx.core as mx
import pytest
from tiny import tiny_model

import safesteer_mlx.distill as distill
import safesteer_mlx.modeling as modeling
from safesteer_mlx.config import Config
from safesteer_mlx.trainer import Trainer, wants_checkpointing


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
    monkeypatch.setattr(distill, "LOGITS_CHUNK_ELEMENTS", 2 * 2 * vocab)  # 2 rows x 2 positions
    widths.clear()
    got, _ = distill.chunked_loss(model, hidden, teacher, mask, safety, "restricted", 128)
    assert widths == [2, 2, 2, 2, 1, 1]
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_gradient_checkpointing_defaults_on_from_3b_class_models():
    class Shape:
        def __init__(self, layers, hidden):
            self.num_layers, self.hidden_size = layers, hidden

    assert wants_checkpointing(Shape(28, 3584))  # Qwen2.5-7B
    assert wants_checkpointing(Shape(36, 2048))  # Qwen2.5-3B
    assert not wants_checkpointing(Shape(30, 576))  # SmolLM2-135M (the fixture)
    assert not wants_checkpointing(Shape(28, 1536))  # Qwen2.5-1.5B
    config = Config()
    assert config.distill.grad_checkpoint is None
    direction = mx.zeros((32,))
    trainer = Trainer(tiny_model(seed=0), config, direction, 1, 1.0, [60, 61], steps=2)
    assert trainer.checkpointing is False
    config.distill.grad_checkpoint = True
    trainer = Trainer(tiny_model(seed=0), config, direction, 1, 1.0, [60, 61], steps=2)
    assert trainer.checkpointing is True
