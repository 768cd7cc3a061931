import math

import pytest
import torch

from forking_trl import token_entropy


def reference_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    x = logits.double() / temperature
    logp = torch.log_softmax(x, dim=-1)
    return -(logp.exp() * torch.where(torch.isfinite(logp), logp, 0.0)).sum(-1)


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 1000])
def test_matches_float64_reference(chunk_size):
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 50) * 4
    got = token_entropy(logits, chunk_size=chunk_size)
    assert got.dtype == torch.float32 and got.shape == (2, 7)
    torch.testing.assert_close(got.double(), reference_entropy(logits), atol=1e-5, rtol=1e-5)


def test_known_values_uniform_and_one_hot():
    uniform = torch.zeros(1, 8)
    peaked = torch.tensor([[100.0, 0.0, 0.0, 0.0]])
    assert token_entropy(uniform).item() == pytest.approx(math.log(8), abs=1e-6)
    assert token_entropy(peaked).item() == pytest.approx(0.0, abs=1e-6)


def test_masked_vocabulary_entries_are_not_nan():
    logits = torch.tensor([[0.0, 0.0, -math.inf, -math.inf]])
    assert token_entropy(logits).item() == pytest.approx(math.log(2), abs=1e-6)


def test_bfloat16_logits_computed_in_float32():
    torch.manual_seed(1)
    logits = (torch.randn(5, 300) * 3).bfloat16()
    got = token_entropy(logits, chunk_size=2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference_entropy(logits.float()), atol=1e-5, rtol=1e-5)


def test_temperature_and_no_grad():
    torch.manual_seed(2)
    logits = torch.randn(3, 4, 20, requires_grad=True)
    got = token_entropy(logits, temperature=0.7)
    assert not got.requires_grad
    torch.testing.assert_close(got.double(), reference_entropy(logits.detach(), 0.7), atol=1e-5, rtol=1e-5)


def test_nan_row_gives_nan_and_bad_arguments_raise():
    logits = torch.tensor([[0.0, 1.0], [math.nan, 0.0]])
    got = token_entropy(logits)
    assert torch.isfinite(got[0]) and torch.isnan(got[1])
    with pytest.raises(ValueError, match="chunk_size"):
        token_entropy(logits, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        token_entropy(logits, temperature=0.0)


def test_input_logits_are_left_untouched():
    logits = torch.randn(3, 50)
    before = logits.clone()
    token_entropy(logits, temperature=0.5)
    assert torch.equal(logits, before)
