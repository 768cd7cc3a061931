"""forking_trl: RLVR on the forking tokens, after "Beyond the 80/20 Rule" (Wang et al., arXiv 2506.01939).

The method (`token_entropy`, `forking_mask`, `forking_select`) is pure torch and imports without TRL; the trainers
(`ForkingGRPOTrainer`; for plain GRPO, `DynamicSamplingGRPOTrainer`, DAPO's dynamic sampling alone, and
`BranchingGRPOTrainer`, branching rollouts at the forks alone), their configs and the decoding processor are imported
on first use.
"""

from .entropy import token_entropy
from .selection import ForkingSelection, forking_mask, forking_select

__version__ = "0.1.0"

_LAZY = {
    "BranchingGRPOConfig": "branching_config",
    "BranchingGRPOTrainer": "branching_trainer",
    "DynamicSamplingGRPOConfig": "dynamic_sampling_config",
    "DynamicSamplingGRPOTrainer": "dynamic_sampling_trainer",
    "ForkingGRPOConfig": "forking_config",
    "ForkingGRPOTrainer": "trainer",
    "ForkingTemperatureLogitsProcessor": "decoding",
}

__all__ = ["ForkingSelection", "forking_mask", "forking_select", "token_entropy", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
