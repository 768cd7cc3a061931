"""The entropy methods against independent re-implementations of their reference formulas, on hand-built tensors.

The `ref_*` functions below are written from the references' formulas (verl's `compute_policy_loss_clip_cov` and
`compute_policy_loss_kl_cov`, after PRIME-RL/Entropy-Mechanism-of-RL; Cheng et al. arXiv 2506.14758 Sec. 3): whole
per-token losses, in the references' own shape, compared with what forking_trl computes, which is TRL's per-token
loss times the method's weight plus its extra term. Per-token losses and the gradients with respect to the
log-probabilities must agree.
"""

import math

import pytest
import torch

from forking_trl.credit import (
    METHODS,
    CreditInputs,
    clip_cov,
    entropy_advantage,
    kl_cov,
    shaped_advantages,
    token_covariance,
)

EPS_LOW, EPS_HIGH = 0.2, 0.28


# ------------------------------------------------------------------------------------------------------------------
# independent reference formulas (token-level advantages (B, T), as the references take them)


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def ref_clip_cov(old, logp, adv, mask, *, ratio, lb, ub, eps_low, eps_high):
    """Clip-Cov's per-token loss: max(-A r, -A clip(r)) times a 0/1 correction; the draw uses the global RNG."""
    r = torch.exp(logp - old)
    pg1 = -adv * r
    pg2 = -adv * torch.clamp(r, 1 - eps_low, 1 + eps_high)
    clip_by_origin = (pg2 > pg1) & (mask > 0)
    cov = (adv - masked_mean(adv, mask)) * (logp - masked_mean(logp.detach(), mask))
    cov = cov.detach().clone()
    cov[mask == 0] = -torch.inf
    cov[clip_by_origin] = -torch.inf
    n = max(int(ratio * mask.sum().item()), 1)
    idx = torch.nonzero((cov < ub) & (cov > lb) & (mask > 0))
    idx = idx[torch.randperm(len(idx))[: min(n, len(idx))]]
    corr = torch.ones_like(adv)
    corr[idx[:, 0], idx[:, 1]] = 0
    return torch.maximum(pg1, pg2) * corr


def ref_kl_cov(old, logp, adv, mask, *, ratio, coef):
    """KL-Cov's per-token loss: -A r everywhere (no clip), plus coef |log r| on the top-k cov tokens."""
    r = torch.exp(logp - old)
    loss = -adv * r
    valid = mask > 0
    flat_idx = torch.nonzero(valid.reshape(-1), as_tuple=True)[0]
    a, lp = adv[valid].detach(), logp[valid].detach()
    cov = (a - a.mean()) * (lp - lp.mean())
    k = max(1, int(len(cov) * ratio))
    top = flat_idx[torch.topk(cov, k).indices]
    rows, cols = top // adv.shape[1], top % adv.shape[1]
    penalty = torch.zeros_like(loss)
    penalty[rows, cols] = coef * (logp - old).abs()[rows, cols]
    return loss + penalty


def ref_entropy_adv(old, logp, adv, entropy, mask, *, alpha, kappa, eps_low, eps_high):
    """The clipped surrogate with the shaped advantage A + min(alpha H, |A| / kappa)."""
    shaped = adv + torch.minimum(alpha * entropy.detach(), adv.abs() / kappa)
    r = torch.exp(logp - old)
    return torch.maximum(-shaped * r, -shaped * torch.clamp(r, 1 - eps_low, 1 + eps_high))


# ------------------------------------------------------------------------------------------------------------------
# what TRL computes per token, which forking_trl multiplies by the weight and adds the extra term to


def trl_surrogate(logp, old, adv, eps_low=EPS_LOW, eps_high=EPS_HIGH):
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    return -torch.min(coef_1 * adv, coef_2 * adv)


def ours(method_terms, base):
    loss = base if method_terms.weight is None else base * method_terms.weight
    return loss if method_terms.extra is None else loss + method_terms.extra


# ------------------------------------------------------------------------------------------------------------------
# hand-built batches: padding, an all-padding row, ties, both signs of the advantage, off-policy ratios


def batch(seed=0, B=5, T=7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 4, 0, 1, 6])[:B]
    mask = (torch.arange(T)[None] < lengths[:, None]).float()  # (B, T)
    logp = -torch.rand(B, T, generator=g) * 4  # (B, T) in (-4, 0]
    logp[0, 1] = logp[0, 2] = logp[4, 3]  # ties in log pi, hence in cov within a sequence
    logp[~mask.bool()] = -torch.inf  # padding may hold anything
    old = logp + 0.4 * torch.randn(B, T, generator=g)  # off-policy: some ratios outside the clip range
    old[~mask.bool()] = 0.0
    adv = torch.tensor([3.0, -2.5, 1.0, 0.0, -1.5])[:B]  # both signs and a zero
    entropy = torch.rand(B, T, generator=g) * 3
    entropy[0, 3] = entropy[0, 4]  # a tie
    return logp, old, adv, entropy, mask


def leaf(logp, mask):
    """A differentiable copy with finite padding (the references multiply by the mask; NaN * 0 would stay NaN)."""
    return torch.where(mask.bool(), logp, torch.zeros_like(logp)).clone().requires_grad_(True)


def grad_of(per_token, logp, mask):
    (g,) = torch.autograd.grad((per_token * mask).sum(), logp)
    return g


@pytest.mark.parametrize("ratio", [2e-4, 0.3, 1.0])
@pytest.mark.parametrize("lb, ub", [(1.0, 5.0), (-100.0, 100.0), (0.5, 2.0)])
def test_clip_cov_matches_the_reference(ratio, lb, ub):
    logp0, old, adv, _, mask = batch()
    adv_bt = adv[:, None].expand_as(mask)
    seed = 7
    for scale in (1.0, 3.0):  # larger advantages put more tokens in (lb, ub)
        logp_ref, logp_ours = leaf(logp0, mask), leaf(logp0, mask)
        torch.manual_seed(seed)
        ref = ref_clip_cov(
            old, logp_ref, scale * adv_bt, mask, ratio=ratio, lb=lb, ub=ub, eps_low=EPS_LOW, eps_high=EPS_HIGH
        )
        terms = clip_cov(
            CreditInputs(logp_ours, old, scale * adv, mask),
            ratio=ratio,
            lb=lb,
            ub=ub,
            epsilon_low=EPS_LOW,
            epsilon_high=EPS_HIGH,
            generator=torch.Generator().manual_seed(seed),
        )
        got = ours(terms, trl_surrogate(logp_ours, old, scale * adv_bt))
        v = mask.bool()
        torch.testing.assert_close(got[v], ref[v])
        torch.testing.assert_close(grad_of(got, logp_ours, mask), grad_of(ref, logp_ref, mask))
        assert not terms.counted[~v].any()
        if (lb, ub) == (-100.0, 100.0):
            assert terms.counted.any()  # the draw itself was compared


def test_clip_cov_draws_the_count_among_unclipped_candidates_only():
    logp0, old, adv, _, mask = batch()
    x = CreditInputs(logp0, old, 3 * adv, mask)
    n_valid = int(mask.sum())
    r = torch.exp(torch.where(mask.bool(), logp0 - old, 0.0))
    a = 3 * adv[:, None].expand_as(mask)
    ppo_clipped = (-a * r.clamp(1 - EPS_LOW, 1 + EPS_HIGH) > -a * r) & mask.bool()
    assert ppo_clipped.any()  # the batch exercises PPO's clip
    cov = token_covariance(logp0, 3 * adv, mask)
    candidates = mask.bool() & ~ppo_clipped & (cov > -100) & (cov < 100)
    for ratio, expected in ((2e-4, 1), (0.25, int(0.25 * n_valid)), (1.0, int(candidates.sum()))):
        for seed in range(5):
            terms = clip_cov(
                x,
                ratio=ratio,
                lb=-100,
                ub=100,
                epsilon_low=EPS_LOW,
                epsilon_high=EPS_HIGH,
                generator=torch.Generator().manual_seed(seed),
            )
            assert int(terms.counted.sum()) == expected
            assert not (terms.counted & ~candidates).any()
            assert torch.equal(terms.weight, (~terms.counted).float())


def test_clip_cov_never_draws_tokens_whose_gradient_delta_already_zeroed():
    """Issue 22, finding 4: with TRL's two-sided clip `delta`, a token with r > delta and A < 0 has the constant
    -A·delta as its loss (no gradient); Clip-Cov drew it as a candidate, wasting its count. Hand-built: r per token
    [2.0 (> delta), 1.1, 1.05, 0.95], every A < 0, every cov_t in (lb, ub)."""
    log_r = torch.log(torch.tensor([[2.0, 1.1, 1.05, 0.95]]))
    logp, old = log_r, torch.zeros(1, 4)
    adv, mask = torch.tensor([[-1.0, -2.0, -0.5, -3.0]]), torch.ones(1, 4)
    x = CreditInputs(logp, old, adv, mask)

    def counted(delta):
        terms = clip_cov(x, ratio=1.0, lb=-1e9, ub=1e9, epsilon_low=0.2, epsilon_high=0.28, delta=delta)
        return terms.counted[0].tolist()

    # the surrogate TRL trains: max(-A min(r, delta), -A clip(r)); its gradient w.r.t. log r per token
    def grad(delta):
        lr = log_r.clone().requires_grad_(True)
        r = torch.exp(lr)
        r1 = r if delta is None else r.clamp(max=delta)
        torch.maximum(-adv * r1, -adv * r.clamp(0.8, 1.28)).sum().backward()
        return lr.grad[0]

    assert grad(1.5)[0] == 0 and torch.all(grad(1.5)[1:] != 0)
    assert counted(1.5) == [False, True, True, True]  # r > delta: already no gradient
    assert counted(None) == [True, True, True, True]  # without delta: the reference's candidates (A < 0: unclipped)


def test_clip_cov_with_the_forking_selection_acts_on_kept_tokens_only():
    logp0, old, adv, _, mask = batch()
    keep = torch.zeros_like(mask, dtype=torch.bool)
    keep[0, :3] = keep[4, 2:] = True
    terms = clip_cov(
        CreditInputs(logp0, old, 3 * adv, mask, active=keep),
        ratio=1.0,
        lb=-100,
        ub=100,
        generator=torch.Generator().manual_seed(0),
    )
    assert terms.counted.any() and not (terms.counted & ~keep).any()
    # cov_t is centred over all valid tokens, whatever is kept
    torch.testing.assert_close(
        token_covariance(logp0, adv, mask), token_covariance(logp0, adv, mask.bool() & torch.ones_like(keep))
    )


@pytest.mark.parametrize("ratio", [2e-4, 2e-3, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("coef", [1.0, 0.3])
def test_kl_cov_matches_the_reference(ratio, coef):
    logp0, old, adv, _, mask = batch(seed=3)
    adv_bt = adv[:, None].expand_as(mask)
    logp_ref, logp_ours = leaf(logp0, mask), leaf(logp0, mask)
    ref = ref_kl_cov(old, logp_ref, adv_bt, mask, ratio=ratio, coef=coef)
    terms = kl_cov(CreditInputs(logp_ours, old, adv, mask), ratio=ratio, coef=coef)
    # KL-Cov trains on the unclipped surrogate: TRL's loss with the clip opened (epsilon_low 1, epsilon_high inf)
    got = ours(terms, trl_surrogate(logp_ours, old, adv_bt, eps_low=1.0, eps_high=math.inf))
    v = mask.bool()
    torch.testing.assert_close(got[v], ref[v])
    torch.testing.assert_close(grad_of(got, logp_ours, mask), grad_of(ref, logp_ref, mask))
    assert int(terms.counted.sum()) == max(1, int(ratio * v.sum()))


def test_kl_cov_ties_at_the_kth_value_take_the_earliest_tokens():
    mask = torch.ones(2, 4)
    logp = torch.tensor([[-1.0, -2.0, -2.0, -3.0], [-2.0, -2.0, -1.0, -3.0]])
    adv = torch.tensor([1.0, 1.0])  # cov_t = 0 everywhere: all tied
    terms = kl_cov(CreditInputs(logp, logp - 0.1, adv, mask), ratio=0.25)  # k = 2
    assert terms.counted.tolist() == [[True, True, False, False], [False, False, False, False]]
    adv = torch.tensor([2.0, -2.0])  # cov_t: row 0 (A above the mean) rises with log pi; ties -2.0 at (0,1), (0,2)
    terms = kl_cov(CreditInputs(logp, logp - 0.1, adv, mask), ratio=0.25)
    cov = token_covariance(logp, adv, mask)
    top2 = sorted(cov.flatten().tolist(), reverse=True)[:2]
    assert sorted(cov[terms.counted].tolist(), reverse=True) == top2


def test_kl_cov_is_zero_on_policy_in_value_and_gradient():
    logp0, _, adv, _, mask = batch()
    logp = leaf(logp0, mask)
    terms = kl_cov(CreditInputs(logp, logp.detach(), adv, mask), ratio=0.5)
    assert terms.counted.any()
    assert torch.count_nonzero(terms.extra) == 0
    assert torch.count_nonzero(grad_of(terms.extra, logp, mask)) == 0


@pytest.mark.parametrize("alpha, kappa", [(0.4, 2.0), (5.0, 2.0), (0.4, 1.0), (0.05, 10.0)])
def test_entropy_advantage_matches_the_reference_on_the_clipped_surrogate(alpha, kappa):
    logp0, old, adv, entropy, mask = batch(seed=5)
    adv_bt = adv[:, None].expand_as(mask)
    logp_ref, logp_ours = leaf(logp0, mask), leaf(logp0, mask)
    ref = ref_entropy_adv(
        old, logp_ref, adv_bt, entropy, mask, alpha=alpha, kappa=kappa, eps_low=EPS_LOW, eps_high=EPS_HIGH
    )
    terms = entropy_advantage(CreditInputs(logp_ours, old, adv, mask, entropies=entropy), alpha=alpha, kappa=kappa)
    got = ours(terms, trl_surrogate(logp_ours, old, adv_bt))
    v = mask.bool()
    torch.testing.assert_close(got[v], ref[v])
    torch.testing.assert_close(grad_of(got, logp_ours, mask), grad_of(ref, logp_ref, mask))
    assert (terms.weight[v] >= 0).all()  # the factor f = A'/A is never negative for kappa >= 1
    psi = torch.minimum(alpha * entropy, adv_bt.abs() / kappa)
    torch.testing.assert_close(
        shaped_advantages(CreditInputs(logp0, old, adv, mask, entropies=entropy), alpha=alpha, kappa=kappa)[v],
        (adv_bt + psi)[v],
    )


@pytest.mark.parametrize("loss_type", ["cispo", "sapo"])
def test_entropy_advantage_factor_is_exact_for_losses_linear_in_the_advantage(loss_type):
    logp0, old, adv, entropy, mask = batch(seed=6)
    adv_bt = adv[:, None].expand_as(mask)

    def loss(logp, a):  # TRL's per-token cispo / sapo losses
        coef_1 = torch.exp(logp - old)
        if loss_type == "cispo":
            return -torch.clamp(coef_1, max=EPS_HIGH).detach() * a * logp
        temperatures = torch.where(a > 0, 1.0, 1.05)
        return -torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures * a

    logp_ref, logp_ours = leaf(logp0, mask), leaf(logp0, mask)
    shaped = adv_bt + torch.minimum(0.4 * entropy, adv_bt.abs() / 2.0)
    ref = loss(logp_ref, shaped)
    terms = entropy_advantage(CreditInputs(logp_ours, old, adv, mask, entropies=entropy), alpha=0.4, kappa=2.0)
    got = ours(terms, loss(logp_ours, adv_bt))
    v = mask.bool()
    torch.testing.assert_close(got[v], ref[v])
    torch.testing.assert_close(grad_of(got, logp_ours, mask), grad_of(ref, logp_ref, mask))


def test_entropy_advantage_counts_capped_tokens_and_shapes_kept_tokens_only():
    mask = torch.ones(2, 3)
    logp = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -1.0])
    entropy = torch.tensor([[0.1, 2.0, 5.0], [0.0, 1.0, 2.0]])
    keep = torch.tensor([[True, True, True], [True, True, False]])
    terms = entropy_advantage(
        CreditInputs(logp, logp, adv, mask, entropies=entropy, active=keep), alpha=0.4, kappa=2.0
    )
    # psi = min(0.4 H, 0.5): 0.04, 0.5 (capped), 0.5 (capped); 0, 0.4, (not kept: 0)
    torch.testing.assert_close(terms.value, torch.tensor([[0.04, 0.5, 0.5], [0.0, 0.4, 0.0]]))
    assert terms.counted.tolist() == [[False, True, True], [False, False, False]]
    torch.testing.assert_close(terms.weight, torch.tensor([[1.04, 1.5, 1.5], [1.0, 0.6, 1.0]]))


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("case", ["empty", "all_padding", "single_token", "equal_advantages"])
def test_degenerate_batches_give_no_nan_and_no_crash(name, case):
    B, T = (0, 4) if case == "empty" else (3, 4)
    mask = torch.zeros(B, T)
    if case == "single_token":
        mask[1, 0] = 1
    if case == "equal_advantages":
        mask[:, :3] = 1
    logp = leaf(-torch.rand(B, T), torch.ones(B, T))
    adv = torch.full((B,), 0.7) if case == "equal_advantages" else torch.randn(B)
    x = CreditInputs(logp, logp.detach() - 0.05, adv, mask, entropies=torch.rand(B, T))
    params = {"clip_cov": dict(ratio=0.5, lb=-1.0, ub=1.0, generator=torch.Generator().manual_seed(0))}
    terms = METHODS[name](x, **params.get(name, {}))
    for t in (terms.weight, terms.extra, terms.value):
        if t is not None:
            assert t.shape == (B, T) and torch.isfinite(t).all()
    assert torch.isfinite(token_covariance(logp, adv, mask)).all()
    if case == "equal_advantages":
        assert token_covariance(logp, adv, mask).abs().max() < 1e-6  # cov all 0 (up to the mean's rounding)
    if case in ("empty", "all_padding"):
        assert not terms.counted.any()
    if terms.extra is not None and B:
        (g,) = torch.autograd.grad((terms.extra * mask).sum(), logp, allow_unused=True)
        assert g is None or torch.isfinite(g).all()


def test_token_covariance_is_the_covariance_over_valid_tokens():
    logp0, _, adv, _, mask = batch()
    cov = token_covariance(logp0, adv, mask)
    v = mask.bool()
    a, lp = adv[:, None].expand_as(mask)[v], logp0[v]
    expected = ((a - a.mean()) * (lp - lp.mean())).mean()
    torch.testing.assert_close(cov[v].mean(), expected)
    assert torch.count_nonzero(cov[~v]) == 0
