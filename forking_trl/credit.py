"""The entropy methods that followed the paper, as per-token terms of the policy loss: Clip-Cov, KL-Cov, entropy
advantage.

Cui et al., "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models" (arXiv 2505.22617): under
the policy gradient, the change of the policy's entropy goes with the covariance between a token's log-probability
and its advantage; positive covariance lowers entropy (entropy collapse). Per token,

    cov_t = (A_t - mean A) * (log pi_t - mean log pi),    means over the valid tokens.

- **Clip-Cov**: among the tokens with `lb < cov_t < ub` that PPO's clip has not already clipped, a random
  `ratio` share of the valid tokens (at least one) gets no policy gradient (a 0/1 weight).
- **KL-Cov**: the top `ratio` share of valid tokens by cov_t get `coef * |log pi_t - log pi_old,t|` added to their
  policy loss (an extra per-token term that carries gradient). The reference uses no PPO clip with it.

Cheng et al., "Reasoning with Exploration: An Entropy Perspective" (arXiv 2506.14758), Sec. 3:

- **Entropy advantage**: `A'_t = A_t + min(alpha * H_t (detached), |A_t| / kappa)`. For kappa >= 1 this is
  `A'_t = f_t * A_t` with `f_t = 1 + psi_t / A_t >= 0` (f_t = 1 where A_t = 0, since then psi_t = 0): for A > 0,
  f in [1, 1 + 1/kappa]; for A < 0, f = 1 - psi/|A| in [1 - 1/kappa, 1]. As f_t >= 0 is detached,
  `-min(r A', clip(r) A') = f_t * (-min(r A, clip(r) A))`: a per-token factor on the clipped surrogate (and on any
  loss linear in A), which is how it is applied (a weight, like the forking selection).

Each method is a pure function registered by name in `METHODS` (as verl's `core_algos.py` registers its policy
losses): `(B, T)` tensors in (`CreditInputs`), `MethodTerms` out, a weight to multiply into the per-token policy
loss and/or an extra per-token term to add to it. Tokens: the statistics of cov_t (its two means) are over `mask`,
the valid completion tokens; the tokens a method may act on, and the counts its ratio is taken of, are `active`,
those that receive policy gradient (the forking selection; all valid tokens with `forking_mode="all"`, which is the
reference's setting exactly). Everything is over the tensors given: the trainer passes one micro-batch of one
process, as the reference computes them. Pure torch; nothing here imports TRL or the rest of the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

NONE = "none"


@dataclass(frozen=True)
class CreditInputs:
    """What the methods read, all `(B, T)` but `advantages` (`(B,)`, `(B, 1)` or `(B, T)`)."""

    logps: torch.Tensor  # log pi of the sampled tokens under the current policy (carries gradient for KL-Cov)
    old_logps: torch.Tensor  # log pi_old (no gradient); the detached `logps` when the run is on-policy
    advantages: torch.Tensor
    mask: torch.Tensor  # valid completion tokens (0 for padding)
    entropies: torch.Tensor | None = None  # entropy of the current policy per token (entropy advantage)
    active: torch.Tensor | None = None  # tokens that receive policy gradient (None: every valid token)
    covariance: torch.Tensor | None = None  # cov_t if already computed (`token_covariance` of these inputs)

    def valid(self) -> torch.Tensor:
        return self.mask.bool()

    def acting(self) -> torch.Tensor:
        valid = self.valid()
        return valid if self.active is None else valid & self.active.bool()

    def token_advantages(self) -> torch.Tensor:
        """`(B, T)` float32 advantages, detached (a sequence's advantage on each of its tokens)."""
        a = self.advantages.detach().float()
        if a.dim() == 1:
            a = a.unsqueeze(1)
        return a.expand(self.logps.shape)


@dataclass(frozen=True)
class MethodTerms:
    """What a method does to the per-token policy loss `L_t`: `L_t * weight + extra`."""

    weight: torch.Tensor | None  # (B, T) float, detached; None: 1 everywhere
    extra: torch.Tensor | None  # (B, T), carries gradient; None: 0 everywhere
    counted: torch.Tensor  # (B, T) bool: what the method's count metric counts (clipped; penalised; psi capped)
    value: torch.Tensor | None = None  # (B, T) float: the per-token amount (KL-Cov's penalty, psi), for metrics


MethodFn = Callable[..., MethodTerms]
METHODS: dict[str, MethodFn] = {}


def register(name: str) -> Callable[[MethodFn], MethodFn]:
    """Register a method under `name` (the value of `ForkingGRPOConfig.entropy_method`)."""

    def decorator(fn: MethodFn) -> MethodFn:
        METHODS[name] = fn
        return fn

    return decorator


def token_covariance(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`(B, T)` float32 cov_t = (A_t - mean A)(log pi_t - mean log pi), means over the valid tokens; 0 elsewhere.

    No gradient. The mean of cov_t over the valid tokens is the covariance of log-probability and advantage.
    """
    return _covariance(CreditInputs(logps, logps, advantages, mask))


def _covariance(x: CreditInputs) -> torch.Tensor:
    if x.covariance is not None:
        return x.covariance
    valid = x.valid()
    n = valid.sum().clamp(min=1)
    a = x.token_advantages()
    lp = x.logps.detach().float()
    a_mean = torch.where(valid, a, 0.0).sum() / n
    lp_mean = torch.where(valid, lp, 0.0).sum() / n
    return torch.where(valid, (a - a_mean) * (lp - lp_mean), 0.0)  # where, not *: padding may hold inf


def _count(ratio: float, n: int) -> int:
    """The references' count: max(int(ratio * n), 1), and 0 when there is no token."""
    return max(int(ratio * n), 1) if n > 0 else 0


@register("clip_cov")
def clip_cov(
    x: CreditInputs,
    *,
    ratio: float = 2e-4,
    lb: float = 1.0,
    ub: float = 5.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    generator: torch.Generator | None = None,
) -> MethodTerms:
    """Clip-Cov (Cui et al., arXiv 2505.22617; verl's `compute_policy_loss_clip_cov`): a weight of 0 for
    `max(int(ratio * n_active), 1)` tokens drawn uniformly from the active tokens with `lb < cov_t < ub` whose
    gradient the surrogate's clipping has not already zeroed; 1 elsewhere.

    Already zeroed, so never drawn: the tokens PPO's clip (`epsilon_low`, `epsilon_high`) clipped, the reference's
    `clip_by_origin`; and with TRL's two-sided clip `delta` set (which the reference has not), the tokens with
    r > delta, whose ratio TRL clamps at delta (for A > 0 PPO's clip already holds them; for A < 0 the clamped term is
    the larger one, a constant). Without `delta` the candidates are the reference's exactly.

    The draw permutes the candidates in row-major order with `torch.randperm(generator=generator)`, as the
    reference does with the global generator.
    """
    valid, acting = x.valid(), x.acting()
    a = x.token_advantages()
    with torch.no_grad():
        r = torch.exp(x.logps.detach().float() - x.old_logps.detach().float())  # (B, T) importance ratio
        r1 = r if delta is None else r.clamp(max=delta)
        clipped_by_ppo = (-a * r.clamp(1 - epsilon_low, 1 + epsilon_high) > -a * r1) & valid
        if delta is not None:  # TRL's max(-A min(r, delta), -A clip(r)) has no gradient where r > delta
            clipped_by_ppo |= (r > delta) & valid
        cov = _covariance(x)
        candidates = acting & ~clipped_by_ppo & (cov > lb) & (cov < ub)
        where = torch.nonzero(candidates)  # (m, 2), row-major
        take = min(_count(ratio, int(acting.sum())), len(where))
        device = generator.device if generator is not None else where.device
        chosen = where[torch.randperm(len(where), generator=generator, device=device)[:take].to(where.device)]
        clipped = torch.zeros_like(valid)
        clipped[chosen[:, 0], chosen[:, 1]] = True
    return MethodTerms(weight=(~clipped).float(), extra=None, counted=clipped)


@register("kl_cov")
def kl_cov(x: CreditInputs, *, ratio: float = 2e-3, coef: float = 1.0) -> MethodTerms:
    """KL-Cov (Cui et al., arXiv 2505.22617; verl's `compute_policy_loss_kl_cov`): the `max(int(ratio * n_active),
    1)` active tokens of largest cov_t (ties: earlier positions first) get `coef * |log pi_t - log pi_old,t|` added
    to their policy loss; its gradient flows through `logps`. (Its value and gradient are 0 on-policy.)"""
    acting = x.acting()
    with torch.no_grad():
        values = _covariance(x)[acting]  # (n,), row-major
        k = _count(ratio, values.numel())
        picked = torch.zeros_like(values, dtype=torch.bool)
        if k:
            kth = torch.topk(values, k).values[-1]
            above = values > kth
            at = values == kth
            picked = above | (at & (at.cumsum(0) <= k - above.sum()))  # exactly k; ties at the k-th: earliest
        penalized = torch.zeros_like(acting)
        penalized[acting] = picked
    penalty = coef * (x.logps - x.old_logps.detach()).abs()  # (B, T), gradient through logps
    extra = torch.where(penalized, penalty, torch.zeros_like(penalty))
    return MethodTerms(weight=None, extra=extra, counted=penalized, value=extra.detach().float())


@register("entropy_adv")
def entropy_advantage(x: CreditInputs, *, alpha: float = 0.4, kappa: float = 2.0) -> MethodTerms:
    """Entropy advantage (Cheng et al., arXiv 2506.14758, Sec. 3): `A' = A + psi`, `psi = min(alpha * H, |A| /
    kappa)`, applied as the detached per-token factor `f = A' / A` (1 where A = 0) on the policy loss; exact for
    losses linear in A and for the clipped surrogate when kappa >= 1 (see the module docstring)."""
    if x.entropies is None:
        raise ValueError("entropy_adv needs the per-token entropies (CreditInputs.entropies).")
    acting = x.acting()
    a = x.token_advantages()
    with torch.no_grad():
        h = x.entropies.detach().float()
        cap = a.abs() / kappa
        psi = torch.where(acting, torch.minimum(alpha * h, cap), 0.0)  # (B, T), >= 0
        nonzero = a != 0
        factor = torch.where(nonzero & acting, 1 + psi / torch.where(nonzero, a, 1.0), 1.0)
        capped = acting & nonzero & (alpha * h > cap)
    return MethodTerms(weight=factor, extra=None, counted=capped, value=psi)


def shaped_advantages(x: CreditInputs, *, alpha: float = 0.4, kappa: float = 2.0) -> torch.Tensor:
    """`(B, T)` A'_t = A_t + psi_t on the active tokens, A_t elsewhere: the paper's formula itself (for inspection
    and tests; training applies the equivalent factor of `entropy_advantage`)."""
    return x.token_advantages() * entropy_advantage(x, alpha=alpha, kappa=kappa).weight


METHOD_NAMES = (NONE, *METHODS)
