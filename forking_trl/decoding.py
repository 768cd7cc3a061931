"""`ForkingTemperatureLogitsProcessor`: sample forking (high-entropy) positions at one temperature, others at another.

The paper's decoding experiment (Beyond the 80/20 Rule, arXiv 2506.01939): a higher temperature on high-entropy
tokens helps, a lower one hurts; the low-entropy temperature matters far less.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from .entropy import token_entropy


class ForkingTemperatureLogitsProcessor(LogitsProcessor):
    """Divide each row's scores by `high_temperature` when the entropy of softmax(scores) is >= `threshold` (nats),
    else by `low_temperature`.

    Use with `model.generate(..., do_sample=True, temperature=1.0, logits_processor=LogitsProcessorList([p]))` so
    this is the only temperature applied.
    """

    def __init__(self, threshold: float, high_temperature: float, low_temperature: float):
        for name, value in (("high_temperature", high_temperature), ("low_temperature", low_temperature)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0; got {value!r}.")
        if not threshold >= 0:
            raise ValueError(f"threshold must be an entropy >= 0 (nats); got {threshold!r}.")
        self.threshold, self.high, self.low = float(threshold), float(high_temperature), float(low_temperature)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        entropy = token_entropy(scores)  # (B,) float32
        temperature = torch.where(entropy >= self.threshold, self.high, self.low).to(scores.dtype)  # (B,)
        return scores / temperature.unsqueeze(-1)
