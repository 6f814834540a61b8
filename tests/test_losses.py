"""Tests for dpokit.losses.

Every loss and its gradient with respect to the policy log-probs is checked in float64 against a formula written out
independently here (plain exp/log, no shared helpers with the library), and, where TRL 1.16 has the loss, against
TRL's own code on the same inputs. Tolerance: 1e-6 relative.
"""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

from dpokit.errors import ConfigError, DpokitError
from dpokit.losses import LOSS_TYPES, LossOutput, LossSpec, ld_aggregate, loss_spec, preference_loss

RTOL = 1e-6
ATOL = 1e-12
B = 7


# ----------------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------------


def make_inputs(seed: int = 0, *, equal_lengths: bool = False, dtype=torch.float64, logratio_scale: float = 3.0):
    """Random summed log-probs of B pairs; reference = policy minus a log-ratio in [-scale, scale]."""
    g = torch.Generator().manual_seed(seed)

    def uniform(low, high):
        return low + (high - low) * torch.rand(B, generator=g, dtype=torch.float64)

    pc, pr = uniform(-25.0, -5.0), uniform(-25.0, -5.0)
    rc = pc - uniform(-logratio_scale, logratio_scale)
    rr = pr - uniform(-logratio_scale, logratio_scale)
    if equal_lengths:
        lc = lr = torch.full((B,), 6, dtype=torch.long)
    else:
        lc, lr = torch.randint(1, 12, (B,), generator=g), torch.randint(1, 12, (B,), generator=g)
    return {
        "pc": pc.to(dtype).requires_grad_(),
        "pr": pr.to(dtype).requires_grad_(),
        "rc": rc.to(dtype),
        "rr": rr.to(dtype),
        "lc": lc,
        "lr": lr,
    }


def grads(loss: torch.Tensor, x: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """d loss / d (policy chosen, policy rejected) log-probs; zeros for an input the loss does not read (sft)."""
    leaves = (x["pc"], x["pr"])
    found = torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)
    return tuple(torch.zeros_like(leaf) if g is None else g for g, leaf in zip(found, leaves, strict=True))


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------------------------------
# Independent formulas (written from the papers / TRL source, not from dpokit)
# ----------------------------------------------------------------------------------------------------------------------


def sig(x):
    return 1.0 / (1.0 + torch.exp(-x))


def logsig(x):
    return -torch.log(1.0 + torch.exp(-x))


def formula(name: str, x: dict, *, beta: float, eps: float = 0.0, gamma: float = 0.5, tau: float = 0.05):
    pc, pr, rc, rr = x["pc"], x["pr"], x["rc"], x["rr"]
    lc, lr = x["lc"].double(), x["lr"].double()
    rho_c, rho_r = pc - rc, pr - rr
    z = beta * (rho_c - rho_r)
    if name == "sigmoid":
        return -(1 - eps) * logsig(z) - eps * logsig(-z)
    if name == "robust":
        return (-(1 - eps) * logsig(z) + eps * logsig(-z)) / (1 - 2 * eps)
    if name == "hinge":
        return torch.clamp(1 - z, min=0.0)
    if name == "ipo":
        return (rho_c / lc - rho_r / lr - 1 / (2 * beta)) ** 2
    if name == "exo_pair":
        q_c, q_r = sig(z), sig(-z)
        return q_c * torch.log(q_c / (1 - eps)) + q_r * torch.log(q_r / eps)
    if name == "nca_pair":
        return -logsig(beta * rho_c) - 0.5 * logsig(-beta * rho_c) - 0.5 * logsig(-beta * rho_r)
    if name == "bco_pair":
        return -logsig(beta * rho_c) - logsig(-beta * rho_r)
    if name == "sppo_hard":
        return (rho_c - 1 / (2 * beta)) ** 2 + (rho_r + 1 / (2 * beta)) ** 2
    if name in ("aot", "aot_unpaired"):
        if name == "aot":
            d = torch.sort(pc - pr).values - torch.sort(rc - rr).values
        else:
            d = torch.sort(rho_c).values - torch.sort(rho_r).values
        return -(1 - eps) * logsig(beta * d) - eps * logsig(-beta * d)
    if name == "apo_zero":
        return 1 - sig(beta * rho_c) + sig(beta * rho_r)
    if name == "apo_down":
        return sig(beta * rho_c) + 1 - sig(beta * (rho_c - rho_r))
    if name == "discopop":
        gate = sig(z / tau)
        return (1 - gate) * -logsig(z) + gate * torch.exp(-z)
    if name == "sigmoid_norm":
        return -logsig(beta * (rho_c / lc - rho_r / lr))
    if name == "sft":
        return -pc / lc
    if name == "simpo":
        m = beta * (pc / lc - pr / lr) - gamma
        return -(1 - eps) * logsig(m) - eps * logsig(-m)
    if name == "orpo":
        a_c, a_r = pc / lc, pr / lr
        odds_c, odds_r = torch.exp(a_c) / (1 - torch.exp(a_c)), torch.exp(a_r) / (1 - torch.exp(a_r))
        return -a_c - beta * logsig(torch.log(odds_c / odds_r))
    raise AssertionError(name)


# Each loss with the parameters it reads set to non-trivial values.
CASES = {
    "sigmoid": {"label_smoothing": 0.1},
    "robust": {"label_smoothing": 0.2},
    "hinge": {},
    "ipo": {},
    "exo_pair": {"label_smoothing": 0.1},
    "nca_pair": {},
    "bco_pair": {},
    "sppo_hard": {},
    "aot": {"label_smoothing": 0.1},
    "aot_unpaired": {"label_smoothing": 0.1},
    "apo_zero": {},
    "apo_down": {},
    "discopop": {"discopop_tau": 0.05},
    "sigmoid_norm": {},
    "sft": {},
    "simpo": {"label_smoothing": 0.1, "simpo_gamma": 0.7},
    "orpo": {},
}
REFERENCE_FREE = {"sft", "simpo", "orpo"}


def call(name, x, *, beta=0.3, **kw):
    names = [name] if isinstance(name, str) or callable(name) else name
    refs = () if all(n in REFERENCE_FREE for n in names) else (x["rc"], x["rr"])
    return preference_loss(name, x["pc"], x["pr"], *refs, chosen_lengths=x["lc"], rejected_lengths=x["lr"],
                           beta=beta, **kw)


def formula_kwargs(kw):
    return {
        "eps": kw.get("label_smoothing", 0.0),
        "gamma": kw.get("simpo_gamma", 0.5),
        "tau": kw.get("discopop_tau", 0.05),
    }


def test_every_registered_loss_has_a_case():
    assert set(CASES) == set(LOSS_TYPES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_and_gradient_match_formula(name):
    kw = CASES[name]
    for seed in (0, 1):
        x = make_inputs(seed)
        out = call(name, x, **kw)
        expected = formula(name, x, beta=0.3, **formula_kwargs(kw))
        assert out.losses.shape == (B,)
        assert_close(out.losses, expected)
        for got, want in zip(grads(out.losses.sum(), x), grads(expected.sum(), x), strict=True):
            assert_close(got, want)


def test_sigmoid_gradient_closed_form():
    # d/dπ_c [−log σ(βΔ)] = −β·σ(−βΔ), and +β·σ(−βΔ) for π_r.
    x = make_inputs(3)
    beta = 0.3
    out = call("sigmoid", x, beta=beta)
    delta = (x["pc"] - x["rc"] - x["pr"] + x["rr"]).detach()
    g_c, g_r = grads(out.losses.sum(), x)
    assert_close(g_c, -beta * sig(-beta * delta))
    assert_close(g_r, beta * sig(-beta * delta))


def test_ipo_gradient_closed_form():
    x = make_inputs(4)
    beta = 0.3
    out = call("ipo", x, beta=beta)
    lc, lr = x["lc"].double(), x["lr"].double()
    h = ((x["pc"] - x["rc"]) / lc - (x["pr"] - x["rr"]) / lr - 1 / (2 * beta)).detach()
    g_c, g_r = grads(out.losses.sum(), x)
    assert_close(g_c, 2 * h / lc)
    assert_close(g_r, -2 * h / lr)


def test_simpo_gradient_closed_form():
    x = make_inputs(5)
    beta, gamma = 2.0, 0.5
    out = call("simpo", x, beta=beta, simpo_gamma=gamma)
    lc, lr = x["lc"].double(), x["lr"].double()
    m = (beta * (x["pc"] / lc - x["pr"] / lr) - gamma).detach()
    g_c, g_r = grads(out.losses.sum(), x)
    assert_close(g_c, -beta / lc * sig(-m))
    assert_close(g_r, beta / lr * sig(-m))


# ----------------------------------------------------------------------------------------------------------------------
# Rewards and metrics
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_rewards_are_detached_and_follow_convention(name):
    x = make_inputs(0)
    out = call(name, x, **CASES[name])
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    beta = 0.3
    if name in REFERENCE_FREE:
        expected = (beta * x["pc"] / x["lc"], beta * x["pr"] / x["lr"])
    else:
        expected = (beta * (x["pc"] - x["rc"]), beta * (x["pr"] - x["rr"]))
    assert_close(out.chosen_rewards, expected[0].detach())
    assert_close(out.rejected_rewards, expected[1].detach())
    assert_close(out.metrics["nll"], (-x["pc"] / x["lc"]).detach())
    assert all(not v.requires_grad for v in out.metrics.values())


def test_orpo_metrics():
    x = make_inputs(0)
    out = call("orpo", x)
    a_c, a_r = (x["pc"] / x["lc"]).detach(), (x["pr"] / x["lr"]).detach()
    log_odds = (a_c - torch.log(1 - torch.exp(a_c))) - (a_r - torch.log(1 - torch.exp(a_r)))
    assert_close(out.metrics["log_odds_chosen"], log_odds)
    assert_close(out.metrics["log_odds_ratio"], logsig(log_odds))


# ----------------------------------------------------------------------------------------------------------------------
# Modifiers: f-divergences, RPO, WPO, MPO mixtures, reference_free, user callables
# ----------------------------------------------------------------------------------------------------------------------


def f_prime(kind: str, rho: torch.Tensor, alpha: float) -> torch.Tensor:
    u = torch.exp(rho)
    if kind == "reverse_kl":
        return torch.log(u)
    if kind == "forward_kl":
        return 1 - 1 / u
    if kind == "js_divergence":
        return torch.log(2 * u / (1 + u))
    return (u ** (alpha - 1) - 1) / (alpha - 1)


@pytest.mark.parametrize("kind,alpha", [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5),
                                        ("alpha_divergence", 0.2), ("alpha_divergence", 1.7)])
@pytest.mark.parametrize("name", ["sigmoid", "hinge", "ipo", "robust", "discopop", "sigmoid_norm", "exo_pair"])
def test_f_divergence_scores(kind, alpha, name):
    x = make_inputs(2)
    beta = 0.3
    kw = {"label_smoothing": 0.1} if name in ("robust", "exo_pair") else {}
    out = call(name, x, beta=beta, f_divergence_type=kind, f_alpha_divergence_coef=alpha, **kw)
    # Feed the f' scores to the plain formula as if they were log-ratios (reference 0).
    s = {"pc": f_prime(kind, x["pc"] - x["rc"], alpha), "pr": f_prime(kind, x["pr"] - x["rr"], alpha),
         "rc": torch.zeros(B, dtype=torch.float64), "rr": torch.zeros(B, dtype=torch.float64),
         "lc": x["lc"], "lr": x["lr"]}
    expected = formula(name, s, beta=beta, **formula_kwargs(kw))
    assert_close(out.losses, expected)
    for got, want in zip(grads(out.losses.sum(), x), grads(expected.sum(), x), strict=True):
        assert_close(got, want)


def test_alpha_divergence_at_one_is_reverse_kl():
    x = make_inputs(2)
    a = call("sigmoid", x, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)
    b = call("sigmoid", x)
    assert_close(a.losses, b.losses)


def test_rpo_alpha_adds_chosen_token_mean_nll():
    x = make_inputs(0)
    out = call("sigmoid", x, rpo_alpha=0.7)
    expected = formula("sigmoid", x, beta=0.3) + 0.7 * (-x["pc"] / x["lc"])
    assert_close(out.losses, expected)
    for got, want in zip(grads(out.losses.sum(), x), grads(expected.sum(), x), strict=True):
        assert_close(got, want)


def test_wpo_weighting_multiplies_by_detached_weight():
    x = make_inputs(0)
    g = torch.Generator().manual_seed(9)
    wc = -torch.rand(B, generator=g, dtype=torch.float64) * x["lc"]
    wr = -torch.rand(B, generator=g, dtype=torch.float64) * x["lr"]
    out = call("sigmoid", x, rpo_alpha=0.5, use_weighting=True, chosen_weight_logps=wc, rejected_weight_logps=wr)
    weight = torch.exp(wc / x["lc"]) * torch.exp(wr / x["lr"])
    expected = (formula("sigmoid", x, beta=0.3) + 0.5 * (-x["pc"] / x["lc"])) * weight
    assert_close(out.losses, expected)
    assert_close(out.metrics["wpo_weight"], weight)
    for got, want in zip(grads(out.losses.sum(), x), grads(expected.sum(), x), strict=True):
        assert_close(got, want)


def test_mixture_is_weighted_sum_with_first_rewards():
    x = make_inputs(0)
    out = call(["simpo", "sigmoid", "bco_pair"], x, loss_weights=[0.8, 0.2, 1.5], simpo_gamma=0.3)
    parts = [formula("simpo", x, beta=0.3, gamma=0.3), formula("sigmoid", x, beta=0.3),
             formula("bco_pair", x, beta=0.3)]
    expected = 0.8 * parts[0] + 0.2 * parts[1] + 1.5 * parts[2]
    assert_close(out.losses, expected)
    for got, want in zip(grads(out.losses.sum(), x), grads(expected.sum(), x), strict=True):
        assert_close(got, want)
    assert_close(out.chosen_rewards, (0.3 * x["pc"] / x["lc"]).detach())  # simpo's rewards: the first loss type
    assert_close(out.metrics["loss/bco_pair"], parts[2].detach())


def test_single_name_equals_single_item_list_with_weight_one():
    x = make_inputs(0)
    assert_close(call("ipo", x).losses, call(["ipo"], x, loss_weights=[1.0]).losses)


def test_reference_free_treats_reference_as_zero():
    x = make_inputs(0)
    free = preference_loss("sigmoid", x["pc"], x["pr"], reference_free=True, beta=0.3)
    zeros = torch.zeros(B, dtype=torch.float64)
    explicit = preference_loss("sigmoid", x["pc"], x["pr"], zeros, zeros, beta=0.3)
    assert_close(free.losses, explicit.losses)
    assert_close(free.chosen_rewards, 0.3 * x["pc"].detach())


def test_user_callable_with_modifiers_and_extra_params():
    x = make_inputs(0)
    seen = {}

    def margin_loss(pc, pr, rc, rr, *, beta, chosen_lengths, rejected_lengths, margin):
        seen["lengths"] = (chosen_lengths, rejected_lengths)
        losses = torch.relu(margin - beta * ((pc - rc) - (pr - rr)))
        return losses, beta * (pc - rc), beta * (pr - rr)

    out = call(margin_loss, x, rpo_alpha=0.5, margin=2.0)
    expected = torch.relu(2.0 - 0.3 * ((x["pc"] - x["rc"]) - (x["pr"] - x["rr"]))) + 0.5 * (-x["pc"] / x["lc"])
    assert_close(out.losses, expected)
    assert seen["lengths"][0] is x["lc"]
    assert not out.chosen_rewards.requires_grad


def test_user_callable_reference_free_attribute_and_loss_output():
    def avg_margin(pc, pr, rc, rr, *, beta, chosen_lengths, rejected_lengths):
        assert rc is None and rr is None
        z = beta * (pc / chosen_lengths - pr / rejected_lengths)
        return LossOutput(-torch.nn.functional.logsigmoid(z), beta * pc, beta * pr, {"z": z.detach()})

    avg_margin.needs_reference = False
    avg_margin.needs_lengths = True
    assert loss_spec(avg_margin) == LossSpec(needs_reference=False, needs_lengths=True)
    x = make_inputs(0)
    out = preference_loss(avg_margin, x["pc"], x["pr"], chosen_lengths=x["lc"], rejected_lengths=x["lr"])
    assert "z" in out.metrics and out.losses.shape == (B,)


# ----------------------------------------------------------------------------------------------------------------------
# LD-DPO aggregation
# ----------------------------------------------------------------------------------------------------------------------


def token_batch(seed=0, rows=2 * B, width=10):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    starts = torch.randint(0, 3, (rows,), generator=g)  # a prompt of 0-2 positions before the completion
    t = width + 3
    mask = torch.zeros(rows, t, dtype=torch.bool)
    for i in range(rows):
        mask[i, starts[i]: starts[i] + lengths[i]] = True
    token_logps = (-3 * torch.rand(rows, t, generator=g, dtype=torch.float64)).requires_grad_()
    return token_logps, mask, lengths


def test_ld_aggregate_formula_and_limits():
    token_logps, mask, lengths = token_batch()
    public = torch.minimum(lengths[:B], lengths[B:]).repeat(2)
    alpha = 0.4
    out = ld_aggregate(token_logps, mask, public, alpha)
    expected = []
    for i in range(2 * B):
        values = token_logps[i][mask[i]]  # completion tokens in order
        expected.append(values[: public[i]].sum() + alpha * values[public[i]:].sum())
    assert_close(out, torch.stack(expected))
    plain = (token_logps * mask).sum(1)
    assert_close(ld_aggregate(token_logps, mask, public, 1.0), plain)
    shorter_row = lengths == public
    assert_close(ld_aggregate(token_logps, mask, public, 0.0)[shorter_row], plain[shorter_row])


def test_ld_aggregate_ignores_values_outside_mask():
    token_logps, mask, lengths = token_batch()
    public = torch.minimum(lengths[:B], lengths[B:]).repeat(2)
    garbage = token_logps.detach().masked_fill(~mask, float("-inf"))
    assert torch.isfinite(ld_aggregate(garbage, mask, public, 0.5)).all()


# ----------------------------------------------------------------------------------------------------------------------
# Limiting cases
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_sigmoid_zero_margin_is_ln2(eps):
    x = make_inputs(0)
    same = x["pc"].detach() + 0.0
    out = preference_loss("sigmoid", same, same, same - 1.0, same - 1.0, label_smoothing=eps)
    assert_close(out.losses, torch.full((B,), math.log(2.0), dtype=torch.float64))


def test_label_smoothing_zero_reduces_cdpo_and_rdpo_to_dpo():
    x = make_inputs(1)
    dpo = formula("sigmoid", x, beta=0.3, eps=0.0)
    assert_close(call("sigmoid", x, label_smoothing=0.0).losses, dpo)
    assert_close(call("robust", x, label_smoothing=0.0).losses, dpo)


def test_simpo_gamma_zero_unit_lengths_is_reference_free_sigmoid():
    x = make_inputs(2)
    ones = torch.ones(B, dtype=torch.long)
    simpo = preference_loss("simpo", x["pc"], x["pr"], chosen_lengths=ones, rejected_lengths=ones, beta=0.3,
                            simpo_gamma=0.0)
    dpo = preference_loss("sigmoid", x["pc"], x["pr"], reference_free=True, beta=0.3)
    assert_close(simpo.losses, dpo.losses)
    for got, want in zip(grads(simpo.losses.sum(), x), grads(dpo.losses.sum(), x), strict=True):
        assert_close(got, want)


def test_unit_lengths_reduce_normalised_losses_to_sequence_level():
    x = make_inputs(3)
    x["lc"] = x["lr"] = torch.ones(B, dtype=torch.long)
    assert_close(call("sigmoid_norm", x).losses, call("sigmoid", x).losses)
    rho = (x["pc"] - x["rc"] - x["pr"] + x["rr"])
    assert_close(call("ipo", x).losses, (rho - 1 / (2 * 0.3)) ** 2)


def test_zero_weight_modifiers_are_identity():
    x = make_inputs(0)
    base = call("sigmoid", x).losses
    assert_close(call("sigmoid", x, rpo_alpha=0.0).losses, base)
    zeros = torch.zeros(B, dtype=torch.float64)
    weighted = call("sigmoid", x, use_weighting=True, chosen_weight_logps=zeros, rejected_weight_logps=zeros)
    assert_close(weighted.losses, base)


# ----------------------------------------------------------------------------------------------------------------------
# Gradient signs: chosen pushed up (dL/dπ_c <= 0), rejected pushed down (dL/dπ_r >= 0)
# ----------------------------------------------------------------------------------------------------------------------

# Monotone everywhere without label smoothing (robust also with it). With label_smoothing ε > 0, cDPO-style losses
# (sigmoid, aot, simpo) have their optimum at σ(z) = 1 − ε and push back beyond it.
MONOTONE = ["sigmoid", "robust", "hinge", "bco_pair", "apo_zero", "aot", "aot_unpaired", "sigmoid_norm", "simpo",
            "orpo"]
# Monotone only below their target (ipo, sppo_hard: a margin below 1/(2β); exo_pair: σ(βΔ) below 1 − ε): use a
# small β so every random pair is below the target.
BELOW_TARGET = ["ipo", "sppo_hard", "exo_pair"]


@pytest.mark.parametrize("name", MONOTONE + BELOW_TARGET)
def test_gradient_signs_push_chosen_up_rejected_down(name):
    beta = 0.01 if name in BELOW_TARGET else 0.3
    for seed in range(3):
        x = make_inputs(seed)
        kw = {"label_smoothing": 0.1} if name in ("robust", "exo_pair") else {}
        out = call(name, x, beta=beta, **kw)
        g_c, g_r = grads(out.losses.sum(), x)
        assert (g_c <= 0).all() and (g_r >= 0).all()
        if name != "hinge":  # hinge is flat (zero gradient) past its margin
            assert (g_c < 0).all() and (g_r > 0).all()


def test_nca_pushes_rejected_down_and_chosen_up_until_two_thirds():
    x = make_inputs(0, logratio_scale=20.0)
    beta = 0.3
    g_c, g_r = grads(call("nca_pair", x, beta=beta).losses.sum(), x)
    assert (g_r > 0).all()
    r_c = beta * (x["pc"] - x["rc"]).detach()
    below = sig(r_c) < 2 / 3
    assert below.any() and (~below).any()
    assert (g_c[below] < 0).all() and (g_c[~below] > 0).all()


def test_label_smoothing_optimum_is_at_one_minus_eps():
    # cDPO: d/dz [−(1−ε)·log σ(z) − ε·log σ(−z)] = σ(z) − (1 − ε), zero at σ(z) = 1 − ε.
    eps = 0.1
    z_star = math.log((1 - eps) / eps)
    pc = torch.full((B,), z_star, dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros(B, dtype=torch.float64)
    out = preference_loss("sigmoid", pc, zeros, zeros, zeros, beta=1.0, label_smoothing=eps)
    (g_c,) = torch.autograd.grad(out.losses.sum(), pc)
    assert_close(g_c, zeros, atol=1e-12, rtol=0)


def test_apo_down_pushes_rejected_down_and_is_flat_for_chosen_at_reference():
    x = make_inputs(0, logratio_scale=10.0)
    g_c, g_r = grads(call("apo_down", x).losses.sum(), x)
    assert (g_r > 0).all()
    at_ref = preference_loss("apo_down", x["pc"], x["pr"], x["pc"].detach(), x["pr"].detach(), beta=0.3)
    g_c, g_r = grads(at_ref.losses.sum(), x)
    assert_close(g_c, torch.zeros(B, dtype=torch.float64))  # β·σ'(0) − β·σ'(0)
    assert (g_r > 0).all()


def test_discopop_is_not_monotone_near_zero_margin():
    # Documented property of the log-ratio modulated loss: at Δ = 0 its gradient lowers the margin.
    zero = torch.zeros(B, dtype=torch.float64, requires_grad=True)
    out = preference_loss("discopop", zero, torch.zeros(B, dtype=torch.float64), torch.zeros(B, dtype=torch.float64),
                          torch.zeros(B, dtype=torch.float64), beta=1.0)
    (g_c,) = torch.autograd.grad(out.losses.sum(), zero)
    assert (g_c > 0).all()


# ----------------------------------------------------------------------------------------------------------------------
# Spec
# ----------------------------------------------------------------------------------------------------------------------


def test_loss_spec_per_loss():
    for name in LOSS_TYPES:
        kw = {"label_smoothing": 0.1} if name == "exo_pair" else {}
        spec = loss_spec(name, **kw)
        assert spec.needs_reference == (name not in REFERENCE_FREE)
        assert spec.needs_lengths == (name in {"ipo", "sigmoid_norm", "sft", "simpo", "orpo"})
        assert not spec.needs_weight_logps


def test_loss_spec_combines_and_modifiers():
    assert loss_spec(["simpo", "sft"]) == LossSpec(False, True)
    assert loss_spec(["simpo", "sigmoid"]) == LossSpec(True, True)
    assert loss_spec("sigmoid", reference_free=True) == LossSpec(False, False)
    assert loss_spec("sigmoid", rpo_alpha=1.0) == LossSpec(True, True)
    assert loss_spec("sigmoid", use_weighting=True) == LossSpec(True, True, True)
    assert loss_spec(lambda *a, **k: None) == LossSpec(True, False)


# ----------------------------------------------------------------------------------------------------------------------
# Errors: ConfigError, one line, naming the loss and the argument
# ----------------------------------------------------------------------------------------------------------------------


def raises_config(fn, *fragments):
    with pytest.raises(ConfigError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert isinstance(info.value, DpokitError)


def test_unknown_name_lists_valid_names_and_closest_match():
    x = make_inputs(0)
    raises_config(lambda: preference_loss("sigmod", x["pc"], x["pr"], x["rc"], x["rr"]),
                  "'sigmod'", "did you mean 'sigmoid'", ", ".join(LOSS_TYPES))
    raises_config(lambda: loss_spec(["sigmoid", "kto_pairr"]), "'kto_pairr'")


def test_missing_inputs_name_loss_and_argument():
    x = make_inputs(0)
    raises_config(lambda: preference_loss("sigmoid", x["pc"], x["pr"]), "'sigmoid'", "ref_chosen_logps")
    raises_config(lambda: preference_loss("sigmoid", x["pc"], x["pr"], x["rc"]), "ref_rejected_logps")
    raises_config(lambda: preference_loss("ipo", x["pc"], x["pr"], x["rc"], x["rr"]), "'ipo'", "chosen_lengths")
    raises_config(lambda: preference_loss("simpo", x["pc"], x["pr"], chosen_lengths=x["lc"]), "rejected_lengths")
    raises_config(lambda: preference_loss("sigmoid", x["pc"], x["pr"], x["rc"], x["rr"], rpo_alpha=1.0),
                  "chosen_lengths")
    raises_config(lambda: call("sigmoid", x, use_weighting=True), "chosen_weight_logps")


def test_contradictory_inputs():
    x = make_inputs(0)
    raises_config(lambda: preference_loss("sigmoid", x["pc"], x["pr"], x["rc"], x["rr"], reference_free=True),
                  "reference_free")
    raises_config(lambda: preference_loss("simpo", x["pc"], x["pr"], x["rc"], x["rr"], chosen_lengths=x["lc"],
                                          rejected_lengths=x["lr"]), "reference-free")
    raises_config(lambda: call("sigmoid", x, chosen_weight_logps=x["rc"]), "use_weighting")


@pytest.mark.parametrize("name,kw,fragment", [
    ("robust", {"label_smoothing": 0.5}, "'robust'"),
    ("exo_pair", {}, "'exo_pair'"),
    ("sigmoid", {"label_smoothing": 0.7}, "label_smoothing"),
    ("hinge", {"label_smoothing": 0.1}, "no effect"),
    ("sigmoid", {"beta": 0.0}, "beta"),
    ("discopop", {"discopop_tau": 0.0}, "discopop_tau"),
    ("sigmoid", {"rpo_alpha": -1.0}, "rpo_alpha"),
    ("sigmoid", {"f_divergence_type": "kl"}, "f_divergence_type"),
    ("nca_pair", {"f_divergence_type": "js_divergence"}, "'nca_pair'"),
    ("aot", {"use_weighting": True}, "'aot'"),
    ("sigmoid", {"loss_weights": [1.0, 2.0]}, "loss_weights"),
    ("sigmoid", {"simpo_gama": 1.0}, "simpo_gama"),
])
def test_invalid_parameters(name, kw, fragment):
    raises_config(lambda: loss_spec(name, **kw), fragment)
    x = make_inputs(0)
    raises_config(lambda: call(name, x, **kw), fragment)


def test_bad_tensors_raise_value_errors():
    x = make_inputs(0)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        preference_loss("sigmoid", x["pc"], x["pr"], x["rc"][:3], x["rr"])
    with pytest.raises(ValueError, match="chosen_lengths"):
        call("ipo", {**x, "lc": torch.zeros(B, dtype=torch.long)})


def test_user_callable_wrong_output():
    x = make_inputs(0)
    raises_config(lambda: preference_loss(lambda *a, **k: a[0].sum(), x["pc"], x["pr"], x["rc"], x["rr"]),
                  "must return")


def test_ld_alpha_out_of_range():
    raises_config(lambda: ld_aggregate(torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2), 1.5), "ld_alpha=1.5")


# ----------------------------------------------------------------------------------------------------------------------
# TRL 1.16 as an oracle (test-only dependency)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl():
    """TRL's DPO losses live inline in DPOTrainer._compute_loss (there is no standalone dpo_loss in 1.16), so the
    oracle calls that method on a stand-in trainer with a fake model whose per-token log-probs sum to the given
    per-sequence log-probs, and with precomputed reference log-probs."""
    pytest.importorskip("trl")
    from trl import DPOTrainer
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    return types.SimpleNamespace(DPOTrainer=DPOTrainer, CPOTrainer=CPOTrainer, ORPOTrainer=ORPOTrainer)


def trl_dpo(trl, loss_types, x, *, beta, loss_weights=None, label_smoothing=0.0, f_divergence_type="reverse_kl",
            f_alpha_divergence_coef=0.5, discopop_tau=0.05, weight_logps=None, ld_alpha=None, token_logps=None,
            mask_rows=None):
    """Mean loss and metrics from TRL's DPOTrainer._compute_loss on the pairs in x."""
    pc, pr = x["pc"], x["pr"]
    lengths = torch.cat([x["lc"], x["lr"]])
    if mask_rows is None:  # completion tokens at positions 1..L (position 0 is a one-token prompt)
        width = int(lengths.max()) + 1
        completion_mask = torch.zeros(2 * B, width, dtype=torch.long)
        for i, n in enumerate(lengths.tolist()):
            completion_mask[i, 1: 1 + n] = 1
    else:
        completion_mask = mask_rows
    shift = completion_mask[:, 1:].to(pc.dtype)
    if token_logps is None:  # spread each sequence's log-prob evenly over its tokens, so the sums are exact
        token_logps = torch.cat([pc, pr]).unsqueeze(1) / lengths.unsqueeze(1).to(pc.dtype) * shift
    log_sum_sq = None
    if weight_logps is not None:  # so that sum_t (log p_t - log_sum_sq_t) equals the given weight log-probs
        per_token_weight = torch.cat(weight_logps).unsqueeze(1) / lengths.unsqueeze(1).to(pc.dtype)
        log_sum_sq = (token_logps - per_token_weight) * shift
    outputs = types.SimpleNamespace(
        log_probs=token_logps, entropy=torch.zeros_like(token_logps), mean_logits=torch.zeros_like(token_logps),
        is_top1=torch.zeros(token_logps.shape, dtype=torch.bool), log_sum_sq_probs=log_sum_sq)

    def model(**kwargs):
        return outputs

    model.training = False
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t,
                                        gather=lambda t: t)
    stub = types.SimpleNamespace(
        model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=ld_alpha, precompute_ref_logps=True,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
        loss_types=list(loss_types), loss_weights=loss_weights or [1.0] * len(loss_types), beta=beta,
        label_smoothing=label_smoothing, args=types.SimpleNamespace(discopop_tau=discopop_tau),
        use_weighting=weight_logps is not None, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(completion_mask.shape, dtype=torch.long),
              "attention_mask": torch.ones(completion_mask.shape, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": x["rc"], "ref_rejected_logps": x["rr"]}
    loss = trl.DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)
    return loss, stub._metrics["eval"]


TRL_DPO_CASES = {
    "sigmoid": {},
    "robust": {"label_smoothing": 0.2},
    "hinge": {},
    "ipo": {},
    "exo_pair": {"label_smoothing": 1e-3},
    "nca_pair": {},
    "bco_pair": {},
    "sppo_hard": {},
    "aot": {"label_smoothing": 0.1},
    "aot_unpaired": {"label_smoothing": 0.1},
    "apo_zero": {},
    "apo_down": {},
    "discopop": {"discopop_tau": 0.05},
    "sigmoid_norm": {},
    "sft": {},
}


def compare_with_trl(ours: LossOutput, trl_loss, trl_metrics, x, rtol=RTOL):
    assert_close(ours.losses.mean(), trl_loss, rtol=rtol)
    for got, want in zip(grads(ours.losses.mean(), x), grads(trl_loss, x), strict=True):
        assert_close(got, want, rtol=rtol)
    assert ours.chosen_rewards.mean().item() == pytest.approx(trl_metrics["rewards/chosen"][0], rel=rtol)
    assert ours.rejected_rewards.mean().item() == pytest.approx(trl_metrics["rewards/rejected"][0], rel=rtol)


@pytest.mark.parametrize("name", sorted(TRL_DPO_CASES))
def test_matches_trl_dpo(trl, name):
    kw = TRL_DPO_CASES[name]
    # TRL's sft is one token-mean over the batch; it equals dpokit's per-sequence mean only for equal lengths.
    x = make_inputs(0, equal_lengths=name == "sft")
    trl_loss, metrics = trl_dpo(trl, [name], x, beta=0.3, **kw)
    ours = preference_loss(name, x["pc"], x["pr"], *(() if name == "sft" else (x["rc"], x["rr"])),
                           chosen_lengths=x["lc"], rejected_lengths=x["lr"], beta=0.3, **kw)
    if name == "sft":  # TRL still logs reference-based rewards for sft; dpokit's sft is reference-free
        assert_close(ours.losses.mean(), trl_loss)
        for got, want in zip(grads(ours.losses.mean(), x), grads(trl_loss, x), strict=True):
            assert_close(got, want)
    else:
        compare_with_trl(ours, trl_loss, metrics, x)


@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence"])
@pytest.mark.parametrize("name", ["sigmoid", "hinge", "ipo", "robust", "discopop", "sigmoid_norm", "exo_pair"])
def test_matches_trl_f_divergence(trl, kind, name):
    kw = TRL_DPO_CASES[name]
    x = make_inputs(1)
    trl_loss, metrics = trl_dpo(trl, [name], x, beta=0.3, f_divergence_type=kind, **kw)
    ours = call(name, x, f_divergence_type=kind, **kw)
    compare_with_trl(ours, trl_loss, metrics, x)


@pytest.mark.parametrize("alpha", [0.5, 0.2, 1.7])
def test_matches_trl_alpha_divergence_float32(trl, alpha):
    # TRL 1.16's alpha_divergence branch looks up an exp clamp per dtype and has no float64 entry (KeyError), so this
    # oracle runs in float32; 1e-6 float64 agreement with the written-out formula is in test_f_divergence_scores.
    x = make_inputs(1, dtype=torch.float32)
    trl_loss, metrics = trl_dpo(trl, ["sigmoid"], x, beta=0.3, f_divergence_type="alpha_divergence",
                                f_alpha_divergence_coef=alpha)
    ours = call("sigmoid", x, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=alpha)
    compare_with_trl(ours, trl_loss, metrics, x, rtol=2e-5)


def test_matches_trl_rpo_as_sft_mixture(trl):
    # TRL 1.16 dropped rpo_alpha; its equivalent is loss_type=[..., "sft"] with weight alpha (equal lengths).
    x = make_inputs(2, equal_lengths=True)
    trl_loss, metrics = trl_dpo(trl, ["sigmoid", "sft"], x, beta=0.3, loss_weights=[1.0, 0.7])
    compare_with_trl(call("sigmoid", x, rpo_alpha=0.7), trl_loss, metrics, x)


def test_matches_trl_mpo_mixture(trl):
    x = make_inputs(3, equal_lengths=True)
    trl_loss, metrics = trl_dpo(trl, ["sigmoid", "bco_pair", "sft"], x, beta=0.3, loss_weights=[0.8, 0.2, 1.0])
    ours = call(["sigmoid", "bco_pair", "sft"], x, loss_weights=[0.8, 0.2, 1.0])
    compare_with_trl(ours, trl_loss, metrics, x)


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "apo_zero"])
def test_matches_trl_wpo_weighting(trl, name):
    x = make_inputs(4)
    g = torch.Generator().manual_seed(11)
    wc = -torch.rand(B, generator=g, dtype=torch.float64) * x["lc"]
    wr = -torch.rand(B, generator=g, dtype=torch.float64) * x["lr"]
    trl_loss, metrics = trl_dpo(trl, [name], x, beta=0.3, weight_logps=(wc, wr))
    ours = call(name, x, use_weighting=True, chosen_weight_logps=wc, rejected_weight_logps=wr)
    compare_with_trl(ours, trl_loss, metrics, x)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.3, 1.0])
def test_matches_trl_ld_dpo(trl, ld_alpha):
    g = torch.Generator().manual_seed(5)
    x = make_inputs(5)
    lengths = torch.cat([x["lc"], x["lr"]])
    width = int(lengths.max()) + 1
    mask = torch.zeros(2 * B, width, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        mask[i, 1: 1 + n] = 1
    shift = mask[:, 1:].bool()
    # TRL needs zeros outside the completion (its masks do not exclude padding past the shorter sequence).
    token_logps = (-3 * torch.rand(2 * B, width - 1, generator=g, dtype=torch.float64) * shift).requires_grad_()
    trl_loss, _ = trl_dpo(trl, ["sigmoid"], x, beta=0.3, ld_alpha=ld_alpha, token_logps=token_logps, mask_rows=mask)
    public = torch.minimum(x["lc"], x["lr"]).repeat(2)
    logps = ld_aggregate(token_logps, shift, public, ld_alpha)
    ours = preference_loss("sigmoid", logps[:B], logps[B:], x["rc"], x["rr"], beta=0.3)
    assert_close(ours.losses.mean(), trl_loss)
    (g_ours,) = torch.autograd.grad(ours.losses.mean(), token_logps, retain_graph=True)
    (g_trl,) = torch.autograd.grad(trl_loss, token_logps)
    # TRL's shared/tail masks also cover padding after a completion (a real model's log-probs are 0 there), so TRL
    # sends gradient to those positions; dpokit does not. On completion tokens the two must agree.
    assert_close(g_ours[shift], g_trl[shift])
    assert (g_ours[~shift] == 0).all()


@pytest.mark.parametrize("eps", [0.0, 0.15])
def test_matches_trl_cpo_simpo(trl, eps):
    x = make_inputs(6)
    beta, gamma = 2.0, 0.6
    stub = types.SimpleNamespace(alpha=0.0, beta=beta, simpo_gamma=gamma, label_smoothing=eps, loss_type="simpo",
                                 accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    trl_losses, trl_cr, trl_rr = trl.CPOTrainer.cpo_loss(stub, x["pc"] / x["lc"], x["pr"] / x["lr"])
    ours = call("simpo", x, beta=beta, simpo_gamma=gamma, label_smoothing=eps)
    assert_close(ours.losses, trl_losses)
    for got, want in zip(grads(ours.losses.sum(), x), grads(trl_losses.sum(), x), strict=True):
        assert_close(got, want)
    assert_close(ours.chosen_rewards, trl_cr)
    assert_close(ours.rejected_rewards, trl_rr)


@pytest.mark.parametrize("eps", [0.05, 0.25])
def test_matches_trl_cpo_sigmoid_for_cdpo(trl, eps):
    # TRL 1.16's DPO sigmoid has no label smoothing; its CPO "sigmoid" loss is the cDPO formula applied to whatever
    # margins it is given, so feeding it the log-ratios gives TRL's cDPO numbers.
    x = make_inputs(7)
    stub = types.SimpleNamespace(alpha=0.0, beta=0.3, label_smoothing=eps, loss_type="sigmoid",
                                 accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    trl_losses, _, _ = trl.CPOTrainer.cpo_loss(stub, x["pc"] - x["rc"], x["pr"] - x["rr"])
    ours = call("sigmoid", x, label_smoothing=eps)
    assert_close(ours.losses, trl_losses)
    for got, want in zip(grads(ours.losses.sum(), x), grads(trl_losses.sum(), x), strict=True):
        assert_close(got, want)


def test_matches_trl_orpo_odds_ratio(trl):
    # TRL's ORPO NLL comes from a model forward (cross-entropy over the batch's chosen labels) and cannot be called
    # in isolation; the odds-ratio term can. dpokit's orpo = NLL − β·log σ(log_odds), TRL returns β·log σ(log_odds).
    # odds_ratio_loss casts its inputs to float32, so this oracle is float32-exact only: run it on float32 inputs
    # against dpokit in float32 (the float64 1e-6 check against the formula is test_loss_and_gradient_match_formula).
    x = make_inputs(8, dtype=torch.float32)
    beta = 0.25
    stub = types.SimpleNamespace(beta=beta, accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    trl_terms, trl_cr, trl_rr, mean_ratio, mean_log_odds = trl.ORPOTrainer.odds_ratio_loss(
        stub, x["pc"] / x["lc"], x["pr"] / x["lr"])
    ours = call("orpo", x, beta=beta)
    nll = -x["pc"] / x["lc"]
    rtol = 1e-5
    assert_close(ours.losses - nll, -trl_terms, rtol=rtol, atol=1e-7)
    for got, want in zip(grads((ours.losses - nll).sum(), x), grads(-trl_terms.sum(), x), strict=True):
        assert_close(got, want, rtol=rtol, atol=1e-7)
    assert_close(ours.chosen_rewards, trl_cr, rtol=rtol)
    assert_close(ours.metrics["log_odds_ratio"].mean(), mean_ratio, rtol=rtol)
    assert_close(ours.metrics["log_odds_chosen"].mean(), mean_log_odds, rtol=rtol)


def test_sigmoid_with_label_smoothing_notes_what_trl_does():
    assert loss_spec("sigmoid").notes == ()
    (note,) = loss_spec("sigmoid", label_smoothing=0.1).notes
    assert "conservative DPO" in note and "TRL 1.16's sigmoid ignores label_smoothing" in note
    assert loss_spec("robust", label_smoothing=0.1).notes == ()
