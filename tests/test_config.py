from dataclasses import fields

import pytest
from trl import GRPOConfig, TrlParser

from forking_trl import DynamicSamplingGRPOConfig, ForkingGRPOConfig

COMMON = dict(output_dir="/tmp/forking-config-test", report_to=[], use_cpu=True)


def test_defaults_are_the_papers():
    args = ForkingGRPOConfig(**COMMON)
    assert (args.forking_mode, args.forking_ratio, args.forking_scope) == ("top", 0.2, "micro_batch")
    assert (args.forking_selection, args.forking_normalizer) == ("threshold", "all")


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("forking_mode", "middle", "'top', 'bottom', 'all', 'random'"),
        ("forking_scope", "global", "'micro_batch', 'rank', 'sequence', 'batch'"),
        ("forking_selection", "fuzzy", "'threshold', 'exact'"),
        ("forking_normalizer", "none", "'all', 'kept'"),
        ("forking_ratio", 0.0, "(0, 1]"),
        ("forking_ratio", 1.2, "(0, 1]"),
        ("forking_ratio", "0.2", "(0, 1]"),
        ("forking_log_top_tokens", -1, ">= 0"),
    ],
)
def test_bad_values_name_the_field_and_the_allowed_values(field, value, allowed):
    with pytest.raises(ValueError) as err:
        ForkingGRPOConfig(**COMMON, **{field: value})
    assert field in str(err.value) and allowed in str(err.value)


def test_top_entropy_quantile_points_to_forking_ratio():
    with pytest.raises(ValueError, match="forking_ratio"):
        ForkingGRPOConfig(**COMMON, top_entropy_quantile=0.2)


def test_sequence_level_importance_sampling_is_rejected_unless_all():
    with pytest.raises(ValueError, match="importance_sampling_level"):
        ForkingGRPOConfig(**COMMON, importance_sampling_level="sequence")
    ForkingGRPOConfig(**COMMON, importance_sampling_level="sequence", forking_mode="all")


@pytest.mark.parametrize("loss_type", ["dr_grpo", "luspo"])
def test_kept_normalizer_needs_a_token_count(loss_type):
    with pytest.raises(ValueError, match="forking_normalizer"):
        ForkingGRPOConfig(**COMMON, loss_type=loss_type, forking_normalizer="kept")


def test_promotion_keeps_derived_fields_and_translates_quantile():
    plain = GRPOConfig(
        **COMMON, per_device_train_batch_size=4, num_generations=4, steps_per_generation=3, top_entropy_quantile=0.3
    )
    promoted = ForkingGRPOConfig.from_grpo_config(plain)
    assert isinstance(promoted, ForkingGRPOConfig)
    assert (promoted.steps_per_generation, promoted.generation_batch_size) == (3, 12)
    assert (promoted.forking_mode, promoted.forking_ratio, promoted.top_entropy_quantile) == ("top", 0.3, 1.0)
    assert plain.top_entropy_quantile == 0.3  # the user's object is left alone

    defaults = ForkingGRPOConfig.from_grpo_config(GRPOConfig(**COMMON), forking_mode="bottom", forking_ratio=0.8)
    assert (defaults.forking_mode, defaults.forking_ratio, defaults.forking_scope) == ("bottom", 0.8, "micro_batch")
    with pytest.raises(ValueError, match="forking_mode"):
        ForkingGRPOConfig.from_grpo_config(GRPOConfig(**COMMON), forking_mode="nope")
    with pytest.raises(TypeError, match="forking_typo"):
        ForkingGRPOConfig.from_grpo_config(GRPOConfig(**COMMON), forking_typo=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(forking_ratio_schedule="step"), "forking_ratio_schedule must be one of 'constant', 'linear', 'cosine'"),
        (dict(forking_ratio_schedule="linear"), r"forking_ratio_end, which must be a float in \(0, 1\]; got None"),
        (dict(forking_ratio_schedule="cosine", forking_ratio_end=0.0), r"float in \(0, 1\]; got 0.0"),
        (dict(forking_ratio_end=0.2), "forking_ratio_end=0.2 is set, but forking_ratio_schedule='constant'"),
        (dict(forking_ratio_schedule="linear", forking_ratio_end=0.2, forking_mode="all"), "forking_mode='all'"),
    ],
)
def test_ratio_schedule_fields_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ForkingGRPOConfig(**COMMON, **kwargs)


def test_ratio_schedule_from_the_command_line():
    (args,) = TrlParser((ForkingGRPOConfig,)).parse_args_and_config(
        ["--output_dir", "x", "--use_cpu", "true", "--forking_ratio", "1.0", "--forking_ratio_schedule", "cosine"]
        + ["--forking_ratio_end", "0.2"]
    )
    assert (args.forking_ratio, args.forking_ratio_schedule, args.forking_ratio_end) == (1.0, "cosine", 0.2)
    assert {"forking_ratio_schedule", "forking_ratio_end"} <= set(args.forking_fields())  # in checkpoints


def test_kl_cov_refuses_trls_two_sided_clip():
    """Issue 22, finding 4: KL-Cov trains the unclipped -r·A as its reference; delta clamped r all the same (trainer
    loss -0.3115 against the reference's -0.5702), so the combination is refused, naming both fields."""
    with pytest.raises(ValueError, match=r"entropy_method='kl_cov'.*delta=4.0.*delta=None"):
        ForkingGRPOConfig(**COMMON, entropy_method="kl_cov", delta=4.0)
    ForkingGRPOConfig(**COMMON, entropy_method="clip_cov", delta=4.0)  # Clip-Cov keeps PPO's clip, and delta with it
    args = ForkingGRPOConfig(**COMMON, entropy_method="kl_cov")
    args.delta = 4.0
    with pytest.raises(ValueError, match="delta"):
        args.validate()


def test_every_forking_field_is_documented():
    doc = ForkingGRPOConfig.__doc__
    for name, f in ForkingGRPOConfig.__dataclass_fields__.items():
        if name.startswith(("forking_", "dynamic_sampling")):
            assert f"{name} (`" in doc, name
            assert f.metadata.get("help"), name
    assert "2506.01939" in doc and "2503.14476" in doc


def test_cli_flags_parse_and_choices_are_enforced():
    (args,) = TrlParser(ForkingGRPOConfig).parse_args_and_config(
        ["--output_dir", "/tmp/x", "--forking_mode", "bottom", "--forking_ratio", "0.8", "--use_cpu", "true"]
    )
    assert (args.forking_mode, args.forking_ratio) == ("bottom", 0.8)
    with pytest.raises(SystemExit):
        TrlParser(ForkingGRPOConfig).parse_args_and_config(["--output_dir", "/tmp/x", "--forking_mode", "middle"])


@pytest.mark.parametrize("bonus", [dict(entropy_coef=0.01), dict(use_adaptive_entropy=True)])
@pytest.mark.parametrize("mode", ["top", "bottom", "random"])
def test_entropy_bonus_over_kept_tokens_is_an_explicit_choice(bonus, mode):
    with pytest.raises(ValueError, match="forking_kept_entropy_bonus=True") as err:
        ForkingGRPOConfig(**COMMON, forking_mode=mode, **bonus)
    assert "kept tokens only" in str(err.value)
    chosen = ForkingGRPOConfig(**COMMON, forking_mode=mode, forking_kept_entropy_bonus=True, **bonus)
    assert chosen.forking_kept_entropy_bonus
    ForkingGRPOConfig(**COMMON, forking_mode="all", **bonus)  # all tokens: the bonus is TRL's own


def test_forking_fields_lists_every_forking_field():
    args = ForkingGRPOConfig(**COMMON, forking_mode="bottom", forking_ratio=0.8)
    recorded = args.forking_fields()
    assert recorded["forking_mode"] == "bottom" and recorded["forking_ratio"] == 0.8
    own = ("forking_", "dynamic_sampling", "branching", "entropy_method", "clip_cov_", "kl_cov_", "entropy_adv_")
    own += ("prompt_template",)
    assert all(name.startswith(own) for name in recorded) and "forking_scope" in recorded
    assert recorded["dynamic_sampling"] is False and recorded["branching"] is False
    assert recorded["entropy_method"] == "none" and recorded["kl_cov_ratio"] == 2e-3  # the methods' fields too


# ---------------------------------------------------------------------------------------------------------------
# DynamicSamplingGRPOConfig: dynamic sampling alone, for plain GRPO

DYNAMIC_FIELDS = {"dynamic_sampling", "dynamic_sampling_max_rounds", "dynamic_sampling_reward", "prompt_template"}


def test_dynamic_sampling_config_adds_only_its_fields_each_documented():
    added = {f.name for f in fields(DynamicSamplingGRPOConfig)} - {f.name for f in fields(GRPOConfig)}
    assert added == DYNAMIC_FIELDS
    doc = DynamicSamplingGRPOConfig.__doc__
    for name in added:
        assert f"{name} (`" in doc and DynamicSamplingGRPOConfig.__dataclass_fields__[name].metadata["help"], name
    assert "2503.14476" in doc
    args = DynamicSamplingGRPOConfig(**COMMON)
    assert args.own_fields() == {
        "dynamic_sampling": True,
        "dynamic_sampling_max_rounds": 10,
        "dynamic_sampling_reward": None,
        "prompt_template": None,
    }
    assert DynamicSamplingGRPOConfig(**COMMON, top_entropy_quantile=0.2).top_entropy_quantile == 0.2  # TRL's own


def test_dynamic_sampling_is_on_in_its_own_config_and_off_in_the_forking_one():
    assert DynamicSamplingGRPOConfig(**COMMON).dynamic_sampling is True
    assert ForkingGRPOConfig(**COMMON).dynamic_sampling is False  # as before the split
    plain = GRPOConfig(**COMMON, per_device_train_batch_size=4, num_generations=4, steps_per_generation=3)
    promoted = DynamicSamplingGRPOConfig.from_grpo_config(plain)
    assert promoted.dynamic_sampling is True and (promoted.steps_per_generation, promoted.generation_batch_size) == (
        3,
        12,
    )
    assert not hasattr(promoted, "forking_mode")
    forking = ForkingGRPOConfig.from_grpo_config(promoted)  # a dynamic-sampling config keeps its values
    assert (forking.dynamic_sampling, forking.forking_mode) == (True, "top")
    assert ForkingGRPOConfig.from_grpo_config(plain).dynamic_sampling is False
    with pytest.raises(TypeError, match="unknown field 'forking_mode' for DynamicSamplingGRPOConfig"):
        DynamicSamplingGRPOConfig.from_grpo_config(plain, forking_mode="top")
    with pytest.raises(ValueError, match="dynamic_sampling_max_rounds"):
        DynamicSamplingGRPOConfig.from_grpo_config(plain, dynamic_sampling_max_rounds=0)


def test_dynamic_sampling_cli_flags_override_and_turn_it_off():
    (args,) = TrlParser(DynamicSamplingGRPOConfig).parse_args_and_config(
        ["--output_dir", "/tmp/x", "--use_cpu", "true", "--dynamic_sampling_max_rounds", "4"]
    )
    assert (args.dynamic_sampling, args.dynamic_sampling_max_rounds) == (True, 4)
    (args,) = TrlParser(DynamicSamplingGRPOConfig).parse_args_and_config(
        ["--output_dir", "/tmp/x", "--use_cpu", "true", "--dynamic_sampling", "false"]
    )
    assert args.dynamic_sampling is False


# ---------------------------------------------------------------------------------------------------------------
# a setting that would be ignored is refused, naming the field and the switch (issue 30, item 6)


@pytest.mark.parametrize(
    "settings, field, switch",
    [
        # the bug: this built with branching=False and trained plain GRPO without a word
        (dict(branching_roots=2, branching_advantage="tree"), "branching_roots=2", "branching=False"),
        (dict(branching_answer_marker="\\boxed{"), "branching_answer_marker", "branching=False"),
        (
            dict(branching=True, branching_tree_weighting="none"),
            "branching_tree_weighting",
            "branching_advantage='group'",
        ),
        (dict(dynamic_sampling_max_rounds=3), "dynamic_sampling_max_rounds=3", "dynamic_sampling=False"),
        (dict(dynamic_sampling_reward="accuracy_reward"), "dynamic_sampling_reward", "dynamic_sampling=False"),
        (dict(clip_cov_ratio=0.1), "clip_cov_ratio=0.1", "entropy_method='none'"),
        (dict(entropy_method="kl_cov", entropy_adv_alpha=1.0), "entropy_adv_alpha=1.0", "entropy_method='kl_cov'"),
        (dict(forking_mode="all", forking_ratio=0.5), "forking_ratio=0.5", "forking_mode='all'"),
        (dict(forking_mode="all", forking_selection="exact"), "forking_selection", "forking_mode='all'"),
        (dict(forking_mode="all", forking_scope="batch"), "forking_scope", "forking_mode='all'"),
        (dict(forking_kept_entropy_bonus=True), "forking_kept_entropy_bonus", "entropy bonus is off"),
    ],
)
def test_a_field_that_would_be_ignored_is_refused(settings, field, switch):
    with pytest.raises(ValueError, match="would be ignored") as err:
        ForkingGRPOConfig(**COMMON, per_device_train_batch_size=8, **settings)
    assert field in str(err.value) and switch in str(err.value)


def test_the_same_fields_are_accepted_where_they_are_used():
    ForkingGRPOConfig(**COMMON, per_device_train_batch_size=8, branching=True, branching_roots=2)
    ForkingGRPOConfig(**COMMON, per_device_train_batch_size=8, dynamic_sampling=True, dynamic_sampling_max_rounds=3)
    ForkingGRPOConfig(**COMMON, entropy_method="clip_cov", clip_cov_ratio=0.1)
    ForkingGRPOConfig(**COMMON, forking_mode="all", forking_ratio=1.0)  # 1.0 says what 'all' means (the runner's)
    ForkingGRPOConfig(**COMMON, entropy_coef=0.01, forking_kept_entropy_bonus=True)
    args = ForkingGRPOConfig(**COMMON)
    args.clip_cov_ratio = 0.1  # set after construction: validate() (every trainer calls it) refuses it too
    with pytest.raises(ValueError, match="clip_cov_ratio=0.1 is set, but entropy_method='none'"):
        args.validate()


def test_each_switch_is_declared_once_and_its_default_is_the_configs():
    from forking_trl import BranchingGRPOConfig

    declared = [cls for cls in ForkingGRPOConfig.__mro__ if "branching" in vars(cls).get("__annotations__", {})]
    assert declared == [BranchingGRPOConfig]
    assert ForkingGRPOConfig(**COMMON).branching is False
    assert BranchingGRPOConfig(**COMMON, per_device_train_batch_size=8).branching is True
    (args,) = TrlParser(ForkingGRPOConfig).parse_args_and_config(["--output_dir", "/tmp/x", "--use_cpu", "true"])
    assert (args.branching, args.dynamic_sampling) == (False, False)
