"""training.model: shapes, bidirectional attention, document (segment) masking, padding, presets."""

from __future__ import annotations

import pytest
import torch

from infra.config import ModelConfig
from training.model import (PRESETS, MaskedDiffusionTransformer, ModelArgs, build_model_args,
                            segment_attention_mask)

V = 40


def make_model(**overrides) -> MaskedDiffusionTransformer:
    torch.manual_seed(0)
    args = build_model_args(ModelConfig(preset="test"), vocab_size=V, max_seq_len=32)
    for k, v in overrides.items():
        setattr(args, k, v)
    return MaskedDiffusionTransformer(args).eval()


def test_forward_shape_dtype_and_parameter_count():
    model = make_model()
    ids = torch.randint(0, V, (3, 17))
    logits = model(ids)
    assert logits.shape == (3, 17, V) and logits.dtype == torch.float32
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert model.num_parameters(exclude_embeddings=True) == model.num_parameters() - V * 64


def test_attention_is_bidirectional():
    model = make_model()
    ids = torch.randint(0, V, (1, 12))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % V
    # No causal mask: the FIRST position's prediction depends on the LAST token.
    assert not torch.allclose(model(ids)[0, 0], model(changed)[0, 0])


def test_segment_mask_blocks_cross_document_attention():
    model = make_model()
    ids = torch.randint(0, V, (2, 16))
    segments = torch.tensor([[0] * 10 + [1] * 6, [0] * 4 + [1] * 4 + [2] * 8])
    other = ids.clone()
    other[0, 10:] = (ids[0, 10:] + 7) % V  # rewrite document 1 of row 0
    other[1, :4] = (ids[1, :4] + 3) % V  # rewrite document 0 of row 1
    base, after = model(ids, segments), model(other, segments)
    torch.testing.assert_close(after[0, :10], base[0, :10], rtol=0, atol=1e-6)
    torch.testing.assert_close(after[1, 4:], base[1, 4:], rtol=0, atol=1e-6)
    # ...and the edited documents themselves did change (the test can fail).
    assert not torch.allclose(after[0, 10:], base[0, 10:])
    # Without segment ids the same edit leaks into the other document.
    assert not torch.allclose(model(other)[0, :10], model(ids)[0, :10])


def test_packed_document_equals_document_alone():
    """Rotary positions are relative: a document packed at offset 9 scores as if it were alone."""
    model = make_model()
    doc = torch.randint(0, V, (1, 7))
    filler = torch.randint(0, V, (1, 9))
    packed = torch.cat([filler, doc], dim=1)
    segments = torch.tensor([[0] * 9 + [1] * 7])
    torch.testing.assert_close(model(packed, segments)[:, 9:], model(doc), rtol=1e-5, atol=1e-5)


def test_padding_is_isolated_and_finite():
    model = make_model()
    ids = torch.randint(0, V, (2, 12))
    segments = torch.tensor([[0] * 8 + [-1] * 4, [0] * 12])
    logits = model(ids, segments)
    assert torch.isfinite(logits).all()  # pads attend to themselves: no all -inf softmax rows
    other = ids.clone()
    other[0, 8:] = (ids[0, 8:] + 5) % V  # different pad contents
    torch.testing.assert_close(model(other, segments)[0, :8], logits[0, :8], rtol=0, atol=1e-6)
    # Same document without any padding at all gives the same logits.
    torch.testing.assert_close(model(ids[:1, :8]), logits[:1, :8], rtol=1e-5, atol=1e-5)


def test_segment_attention_mask_values():
    mask = segment_attention_mask(torch.tensor([[0, 0, 1, -1, -1]]))[0, 0]
    expected = torch.tensor([
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 0, 1, 0],  # a pad sees only itself, not the other pad
        [0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_tied_and_untied_embeddings():
    tied = make_model()
    assert tied.lm_head is None and "lm_head.weight" not in tied.state_dict()
    untied = make_model(tie_embeddings=False)
    assert "lm_head.weight" in untied.state_dict()
    assert untied.num_parameters() == tied.num_parameters() + V * 64


def test_sequence_longer_than_max_seq_len_is_refused():
    with pytest.raises(ValueError, match="max_seq_len"):
        make_model()(torch.zeros(1, 33, dtype=torch.long))


def test_build_model_args_preset_then_overrides():
    args = build_model_args(ModelConfig(preset="tiny", n_layers=3, dropout=0.1, tie_embeddings=False), 1000, 256)
    assert (args.d_model, args.n_layers, args.n_heads, args.dropout, args.tie_embeddings) == (128, 3, 4, 0.1, False)
    assert (args.vocab_size, args.max_seq_len) == (1000, 256)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError) as err:
        build_model_args(ModelConfig(preset="gigantic"), 100, 16)
    for name in PRESETS:
        assert name in str(err.value)


def test_model_args_validation():
    with pytest.raises(ValueError, match="divisible"):
        ModelArgs(vocab_size=10, d_model=30, n_layers=1, n_heads=4, d_ff=8, max_seq_len=8)


@pytest.mark.parametrize("preset,low,high", [("small", 110e6, 140e6), ("medium", 330e6, 390e6), ("large", 0.9e9, 1.15e9)])
def test_preset_sizes_match_their_names(preset, low, high):
    args = build_model_args(ModelConfig(preset=preset), vocab_size=50257, max_seq_len=1024)
    with torch.device("meta"):  # count parameters without allocating them
        n = MaskedDiffusionTransformer(args).num_parameters()
    assert low < n < high
