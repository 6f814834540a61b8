"""The built-in losses, each a pure function of the pairs' scores (`Pairs`) and the settings (`LossParams`), added
with the same `register` a user's loss uses. Each docstring gives the formula, the paper and where dpokit differs from
TRL 1.16, if anywhere (the notation is in `dpokit.losses`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dpokit.config import LossParams
from dpokit.losses.registry import Pairs, register


def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """Conservative (label-smoothed) logistic loss ``−(1−ε)·log σ(z) − ε·log σ(−z)``, elementwise."""
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _per_token(logps: Tensor, lengths: Tensor | None) -> Tensor:
    assert lengths is not None  # guaranteed for a loss registered with needs_lengths=True
    return logps / lengths


# ----------------------------------------------------------------------------------------------------------------------
# Reference-based losses (arXiv ids; "Eq." numbers are the papers')
# ----------------------------------------------------------------------------------------------------------------------


@register("sigmoid", f_divergence=True, reads=("label_smoothing",))
def _sigmoid(p: Pairs, h: LossParams) -> Tensor:
    """DPO, and conservative DPO (cDPO) when ``label_smoothing`` ε > 0.

    ``ℓ = −(1−ε)·log σ(β·Δ) − ε·log σ(−β·Δ)``, ``Δ = s_c − s_r``.

    Paper: Rafailov et al., arXiv 2305.18290, Eq. 7 (ε = 0). cDPO: Mitchell, "A note on DPO with noisy preferences
    & relationship to IPO" (2023, not on arXiv); ε is the assumed probability that a label is flipped. TRL 1.16's
    ``sigmoid`` has no ε; it equals this loss at ε = 0. Shapes: ``[B] -> [B]``.
    Worked value: Δ = 0 gives ``ln 2 ≈ 0.6931`` for every ε.
    """
    return _smoothed_logistic(h.beta * (p.chosen_scores - p.rejected_scores), h.label_smoothing)


def _smoothing_below_half(h: LossParams) -> str | None:
    if h.label_smoothing < 0.5:
        return None
    return f"needs label_smoothing < 0.5 (it divides by 1 - 2*label_smoothing; got {h.label_smoothing})"


@register("robust", f_divergence=True, reads=("label_smoothing",), check=_smoothing_below_half)
def _robust(p: Pairs, h: LossParams) -> Tensor:
    """Robust DPO (rDPO): an unbiased estimate of the clean DPO loss when labels flip with probability ε.

    ``ℓ = [−(1−ε)·log σ(β·Δ) + ε·log σ(−β·Δ)] / (1 − 2ε)``, ``0 ≤ ε < 0.5``.

    Paper: Chowdhury, Kini & Natarajan, arXiv 2403.00409 (the rDPO loss, de-biased over the flip rate ε). Same as
    TRL 1.16 ``robust``. Reduces to DPO at ε = 0. Shapes: ``[B] -> [B]``.
    """
    eps = h.label_smoothing
    z = h.beta * (p.chosen_scores - p.rejected_scores)
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


@register("hinge", f_divergence=True)
def _hinge(p: Pairs, h: LossParams) -> Tensor:
    """SLiC / RSO hinge loss on the normalised likelihood: ``ℓ = max(0, 1 − β·Δ)`` (β is the inverse margin).

    Papers: SLiC-HF, Zhao et al., arXiv 2305.10425 (calibration loss); RSO, Liu et al., arXiv 2309.06657 (the
    hinge loss on reference-normalised log-likelihoods that TRL implements). Same as TRL 1.16 ``hinge``.
    Shapes: ``[B] -> [B]``.
    """
    return torch.relu(1.0 - h.beta * (p.chosen_scores - p.rejected_scores))


@register("ipo", needs_lengths=True, f_divergence=True)
def _ipo(p: Pairs, h: LossParams) -> Tensor:
    """IPO with TRL's per-token normalisation of the log-ratios.

    ``ℓ = (s_c/|y_c| − s_r/|y_r| − 1/(2β))²`` (β is IPO's τ).

    Paper: Azar et al., arXiv 2310.12036, Eq. 17. The division by completion length is TRL's (confirmed by the IPO
    authors per TRL's comment): the paper states the loss over sequence log-ratios, which makes the squared term
    grow with length. Same as TRL 1.16 ``ipo``. Shapes: ``[B] -> [B]``.
    """
    margin = _per_token(p.chosen_scores, p.chosen_lengths) - _per_token(p.rejected_scores, p.rejected_lengths)
    return (margin - 1.0 / (2.0 * h.beta)) ** 2


def _smoothing_above_zero(h: LossParams) -> str | None:
    if h.label_smoothing > 0:
        return None
    return "needs label_smoothing > 0 (log of the target probability; the EXO paper uses 1e-3)"


@register("exo_pair", f_divergence=True, reads=("label_smoothing",), check=_smoothing_above_zero)
def _exo_pair(p: Pairs, h: LossParams) -> Tensor:
    """EXO (pairwise): reverse KL from the model's pair distribution to the smoothed label distribution.

    With ``q_c = σ(β·Δ)``, ``q_r = σ(−β·Δ)`` and target ``(1−ε, ε)``:
    ``ℓ = q_c·(log q_c − log(1−ε)) + q_r·(log q_r − log ε)``, ``0 < ε ≤ 0.5`` (paper: ε = 1e-3).

    Paper: Ji et al., arXiv 2402.00856, Eq. 16 (K = 2). Same as TRL 1.16 ``exo_pair``. Shapes: ``[B] -> [B]``.
    Minimised (ℓ = 0) where ``σ(β·Δ) = 1 − ε``, so the gradient pushes the margin back down beyond that point.
    """
    eps = h.label_smoothing
    z = h.beta * (p.chosen_scores - p.rejected_scores)
    log_qc, log_qr = F.logsigmoid(z), F.logsigmoid(-z)
    return log_qc.exp() * (log_qc - math.log1p(-eps)) + log_qr.exp() * (log_qr - math.log(eps))


@register("nca_pair")
def _nca_pair(p: Pairs, h: LossParams) -> Tensor:
    """NCA (pairwise): optimises each response's absolute likelihood ratio rather than only their difference.

    With ``r = β·ρ``: ``ℓ = −log σ(r_c) − ½·log σ(−r_c) − ½·log σ(−r_r)``.

    Paper: Chen et al., arXiv 2402.05369 (NCA objective with K = 2 responses). Same as TRL 1.16 ``nca_pair``.
    Shapes: ``[B] -> [B]``. The chosen gradient changes sign at ``σ(r_c) = 2/3``: NCA stops pushing the chosen
    response up once its reward is large, unlike DPO.
    """
    r_c, r_r = h.beta * p.chosen_logratios, h.beta * p.rejected_logratios
    return -F.logsigmoid(r_c) - 0.5 * F.logsigmoid(-r_c) - 0.5 * F.logsigmoid(-r_r)


@register("bco_pair")
def _bco_pair(p: Pairs, h: LossParams) -> Tensor:
    """BCO (pairwise): a binary classifier with the implicit reward as logit, chosen → 1, rejected → 0.

    ``ℓ = −log σ(β·ρ_c) − log σ(−β·ρ_r)``.

    Paper: Jung et al., arXiv 2404.04656. TRL 1.16 ``bco_pair`` (the paper's running reward shift δ is not used,
    as in TRL 1.16). Shapes: ``[B] -> [B]``.
    """
    return -F.logsigmoid(h.beta * p.chosen_logratios) - F.logsigmoid(-h.beta * p.rejected_logratios)


@register("sppo_hard")
def _sppo_hard(p: Pairs, h: LossParams) -> Tensor:
    """SPPO with hard win probabilities (1 for the chosen, 0 for the rejected response).

    ``ℓ = (ρ_c − 1/(2β))² + (ρ_r + 1/(2β))²``.

    Paper: Wu et al., arXiv 2405.00675, Eq. 4.7 (Algorithm 1) with P(y_c ≻ π) = 1, P(y_r ≻ π) = 0. Same as TRL
    1.16 ``sppo_hard``. Shapes: ``[B] -> [B]``.
    """
    half_inv_beta = 0.5 / h.beta
    return (p.chosen_logratios - half_inv_beta) ** 2 + (p.rejected_logratios + half_inv_beta) ** 2


def _sorted_logistic(chosen_side: Tensor, rejected_side: Tensor, h: LossParams) -> Tensor:
    # Sorting each side over the batch pairs quantile k with quantile k: the 1-D optimal-transport coupling.
    delta = torch.sort(chosen_side, dim=0).values - torch.sort(rejected_side, dim=0).values
    return _smoothed_logistic(h.beta * delta, h.label_smoothing)


@register("aot", sorts_batch=True, reads=("label_smoothing",))
def _aot(p: Pairs, h: LossParams) -> Tensor:
    """AOT (paired): first-order stochastic dominance of the policy's margins over the reference's margins.

    With ``m = π_c − π_r`` and ``m_ref = ref_c − ref_r``, both sorted over the batch:
    ``ℓ_k = −(1−ε)·log σ(β·(m_(k) − m_ref(k))) − ε·log σ(−β·(m_(k) − m_ref(k)))``.

    Paper: Melnyk et al., arXiv 2406.05882 (AOT, paired setting). Same as TRL 1.16 ``aot``. Shapes: ``[B] -> [B]``,
    where entry k is the k-th quantile term (pairs are re-matched by sorting); larger batches help.
    """
    return _sorted_logistic(p.chosen_logps - p.rejected_logps, p.ref_chosen_logps - p.ref_rejected_logps, h)


@register("aot_unpaired", sorts_batch=True, reads=("label_smoothing",))
def _aot_unpaired(p: Pairs, h: LossParams) -> Tensor:
    """AOT (unpaired): stochastic dominance of the chosen log-ratio distribution over the rejected one.

    With ``ρ_c`` and ``ρ_r`` sorted over the batch separately:
    ``ℓ_k = −(1−ε)·log σ(β·(ρ_c(k) − ρ_r(k))) − ε·log σ(−β·(ρ_c(k) − ρ_r(k)))``.

    Paper: Melnyk et al., arXiv 2406.05882 (AOT, unpaired setting). Same as TRL 1.16 ``aot_unpaired``.
    Shapes: ``[B] -> [B]`` (entry k is the k-th quantile term).
    """
    return _sorted_logistic(p.chosen_logratios, p.rejected_logratios, h)


@register("apo_zero")
def _apo_zero(p: Pairs, h: LossParams) -> Tensor:
    """APO-zero: push the chosen reward up and the rejected reward down, each anchored at zero.

    ``ℓ = (1 − σ(β·ρ_c)) + σ(β·ρ_r)``.

    Paper: D'Oosterlinck et al., arXiv 2408.06266, Eq. 7. Same as TRL 1.16 ``apo_zero``. Use when the chosen
    outputs are better than the model's own. Shapes: ``[B] -> [B]``.
    """
    return (1.0 - torch.sigmoid(h.beta * p.chosen_logratios)) + torch.sigmoid(h.beta * p.rejected_logratios)


@register("apo_down")
def _apo_down(p: Pairs, h: LossParams) -> Tensor:
    """APO-down: push both rewards down, the rejected one more.

    ``ℓ = σ(β·ρ_c) + (1 − σ(β·(ρ_c − ρ_r)))``.

    Paper: D'Oosterlinck et al., arXiv 2408.06266, Eq. 8. Same as TRL 1.16 ``apo_down``. Use when the model's own
    outputs are already better than the chosen ones. Shapes: ``[B] -> [B]``.
    """
    margin = p.chosen_logratios - p.rejected_logratios
    return torch.sigmoid(h.beta * p.chosen_logratios) + (1.0 - torch.sigmoid(h.beta * margin))


def _positive_tau(h: LossParams) -> str | None:
    return None if h.discopop_tau > 0 else f"needs discopop_tau > 0 (it divides by it; got {h.discopop_tau})"


@register("discopop", f_divergence=True, reads=("discopop_tau",), check=_positive_tau)
def _discopop(p: Pairs, h: LossParams) -> Tensor:
    """DiscoPOP (log-ratio modulated loss): a logistic/exponential blend gated by the margin.

    With ``z = β·Δ`` and ``m = σ(z/τ)``: ``ℓ = (1 − m)·(−log σ(z)) + m·exp(−z)`` (τ = ``discopop_tau``).

    Paper: Lu et al., arXiv 2406.08414, Eq. 5 (τ = 0.05 recommended). Same as TRL 1.16 ``discopop``; the
    exponential term is computed as ``exp(−z + log σ(z/τ))``, equal to ``m·exp(−z)`` but finite where ``exp(−z)``
    overflows and ``m`` underflows (TRL would give ``inf·0 = nan`` there). Shapes: ``[B] -> [B]``.
    Not monotone: within about ``|z| < 0.1`` (τ = 0.05) the gate's slope dominates and the gradient lowers the
    margin, so unlike DPO the loss does not push every pair's margin up.
    """
    z = h.beta * (p.chosen_scores - p.rejected_scores)
    logistic_part = torch.sigmoid(-z / h.discopop_tau) * -F.logsigmoid(z)
    exponential_part = torch.exp(-z + F.logsigmoid(z / h.discopop_tau))
    return logistic_part + exponential_part


@register("sigmoid_norm", needs_lengths=True, f_divergence=True)
def _sigmoid_norm(p: Pairs, h: LossParams) -> Tensor:
    """Length-normalised DPO: the DPO loss on per-token log-ratios.

    ``ℓ = −log σ(β·(s_c/|y_c| − s_r/|y_r|))``.

    Paper: the length normalisation of SimPO, Meng et al., arXiv 2405.14734, applied to DPO's
    reference-normalised reward. Same as TRL 1.16 ``sigmoid_norm``. Shapes: ``[B] -> [B]``.
    """
    margin = _per_token(p.chosen_scores, p.chosen_lengths) - _per_token(p.rejected_scores, p.rejected_lengths)
    return -F.logsigmoid(h.beta * margin)


# ----------------------------------------------------------------------------------------------------------------------
# Reference-free losses
# ----------------------------------------------------------------------------------------------------------------------


@register("sft", needs_reference=False, needs_lengths=True, f_divergence=True)
def _sft(p: Pairs, h: LossParams) -> Tensor:
    """Supervised NLL of the chosen completion, per token: ``ℓ = −π_c/|y_c|``.

    Used inside mixtures (MPO: ``["sigmoid", "bco_pair", "sft"]`` with weights ``[0.8, 0.2, 1.0]``). TRL 1.16's
    ``sft`` takes one token-mean over all chosen tokens of the batch; dpokit takes the token-mean per sequence, so
    ``losses.mean()`` weights every pair equally. The two agree when all chosen lengths are equal.
    Shapes: ``[B] -> [B]``.
    """
    return -_per_token(p.chosen_logps, p.chosen_lengths)


@register("simpo", needs_reference=False, needs_lengths=True, reads=("label_smoothing", "simpo_gamma"))
def _simpo(p: Pairs, h: LossParams) -> Tensor:
    """SimPO: reference-free, length-normalised reward with a target margin γ.

    With ``z = β·(π_c/|y_c| − π_r/|y_r|) − γ``: ``ℓ = −(1−ε)·log σ(z) − ε·log σ(−z)`` (γ = ``simpo_gamma``).

    Paper: Meng, Xia & Chen, arXiv 2405.14734, Eq. 6 (ε = 0). Same as TRL 1.16
    ``experimental.cpo.CPOTrainer.cpo_loss`` with ``loss_type="simpo"`` (which also has the ε term); TRL's CPO adds
    ``cpo_alpha``·NLL by default, which here is ``rpo_alpha``. Shapes: ``[B] -> [B]``. With γ = 0 and lengths of 1
    it is reference-free DPO.
    """
    margin = _per_token(p.chosen_logps, p.chosen_lengths) - _per_token(p.rejected_logps, p.rejected_lengths)
    return _smoothed_logistic(h.beta * margin - h.simpo_gamma, h.label_smoothing)


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 − exp(x))`` for ``x < 0``, switching formula at ``−ln 2`` to avoid cancellation (Mächler 2012)."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@register("orpo", needs_reference=False, needs_lengths=True)
def _orpo(p: Pairs, h: LossParams) -> tuple[Tensor, dict[str, Tensor]]:
    """ORPO: chosen NLL plus an odds-ratio penalty, no reference model.

    With per-token log-probs ``a_c = π_c/|y_c|``, ``a_r = π_r/|y_r|`` and
    ``log_odds = (a_c − a_r) − (log(1 − e^{a_c}) − log(1 − e^{a_r}))``:
    ``ℓ = −a_c − β·log σ(log_odds)`` (β is ORPO's λ).

    Paper: Hong, Lee & Thorne, arXiv 2403.07691, Eqs. 4 (odds), 6 (L_ORPO = L_SFT + λ·L_OR) and 7 (L_OR). The
    odds-ratio term equals TRL 1.16 ``experimental.orpo.ORPOTrainer.odds_ratio_loss``. TRL's NLL is one token-mean
    over the batch's chosen labels; here it is the per-sequence token-mean over the completion (equal when all
    chosen lengths are equal). Needs every ``a < 0`` (a completion of probability 1 has infinite odds).
    Shapes: ``[B] -> [B]``; metrics ``log_odds_ratio = log σ(log_odds)`` and ``log_odds_chosen = log_odds``.
    """
    a_c = _per_token(p.chosen_logps, p.chosen_lengths)
    a_r = _per_token(p.rejected_logps, p.rejected_lengths)
    log_odds = (a_c - a_r) - (_log1mexp(a_c) - _log1mexp(a_r))
    ratio = F.logsigmoid(log_odds)
    metrics = {"log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()}
    return -a_c - h.beta * ratio, metrics
