import math

import pytest
import torch

from forking_trl import ForkingTemperatureLogitsProcessor


def test_flat_row_takes_high_temperature_peaked_row_low():
    scores = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0]])  # entropy log 4 = 1.386, ~0.0014
    out = ForkingTemperatureLogitsProcessor(threshold=0.5, high_temperature=2.0, low_temperature=0.5)(None, scores)
    torch.testing.assert_close(out[0], scores[0] / 2.0)
    torch.testing.assert_close(out[1], scores[1] / 0.5)


def test_threshold_is_inclusive_and_arguments_checked():
    scores = torch.zeros(1, 4)
    out = ForkingTemperatureLogitsProcessor(math.log(4), 2.0, 1.0)(None, scores + 1.0)
    torch.testing.assert_close(out, (scores + 1.0) / 2.0)
    with pytest.raises(ValueError, match="high_temperature"):
        ForkingTemperatureLogitsProcessor(0.5, 0.0, 1.0)


def test_usable_in_generate(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = tok("What is 1 + 1?", return_tensors="pt").input_ids
    out = model.generate(
        ids,
        do_sample=True,
        max_new_tokens=5,
        logits_processor=LogitsProcessorList([ForkingTemperatureLogitsProcessor(1.0, 1.5, 0.7)]),
        pad_token_id=tok.pad_token_id,
    )
    assert out.shape[1] == ids.shape[1] + 5 or out.shape[1] < ids.shape[1] + 5
