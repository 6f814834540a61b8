"""Preference losses: a registry of pure functions over per-sequence log-probs.

Every loss works on B preference pairs given as summed completion log-probs (shape ``[B]``) of the policy and, for
losses that need it, of the frozen reference model, plus the completion token counts for length-normalised losses.
One public entry point, :func:`preference_loss`, picks the loss(es) by name from the registry and applies the
modifiers that are common to all of them (f-divergence scores, RPO's NLL term, WPO weighting, MPO mixtures).

The trainer never tests a loss name: it asks :func:`loss_spec` what the selected loss needs (a reference model?
completion lengths? WPO weight log-probs?) and always passes SUMMED completion log-probs. Length normalisation
(``ipo``, ``sigmoid_norm``, ``simpo``, ``orpo``, ``sft``, ``rpo_alpha``) happens inside the losses, so there is no
"sum or mean" switch for the caller to get wrong.

Notation used in the docstrings (all tensors ``[B]``, one entry per pair):

* ``π_c, π_r``: policy log-probs of the chosen / rejected completion, summed over completion tokens.
* ``ρ_c = π_c − ref_c``, ``ρ_r = π_r − ref_r``: log-ratios against the reference (``ref = 0`` when
  ``reference_free=True``).
* ``s_c, s_r``: f-divergence scores ``f'(π/π_ref)``; equal to ``ρ_c, ρ_r`` for the default ``reverse_kl``.
* ``Δ = s_c − s_r``; ``|y_c|, |y_r|``: completion token counts; ``σ``: the logistic sigmoid; ``ε``:
  ``label_smoothing``.

Conventions follow TRL 1.16 (``trl/trainer/dpo_trainer.py``, ``trl/experimental/cpo``, ``trl/experimental/orpo``)
wherever TRL has the loss; each docstring says where dpokit differs and why.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dpokit.errors import ConfigError

__all__ = [
    "F_DIVERGENCE_TYPES",
    "LOSS_TYPES",
    "LossOutput",
    "LossSpec",
    "ld_aggregate",
    "loss_spec",
    "preference_loss",
]

F_DIVERGENCE_TYPES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


# ----------------------------------------------------------------------------------------------------------------------
# Public result types
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSpec:
    """What the trainer must know about a loss (or a list of losses, combined) before it builds models and batches.

    Attributes:
        needs_reference: the loss reads reference log-probs. False for reference-free losses (``simpo``, ``orpo``,
            ``sft``) and for any loss with ``reference_free=True``; the trainer then builds no reference model.
        needs_lengths: pass ``chosen_lengths``/``rejected_lengths`` (completion token counts). Needed by the
            length-normalised losses, by the chosen NLL (``rpo_alpha``, ``orpo``, ``sft``) and by WPO weighting.
        needs_weight_logps: pass ``chosen_weight_logps``/``rejected_weight_logps`` (WPO, ``use_weighting=True``).
        notes: facts about this configuration a user should be told once (the trainer logs them), e.g. where a
            TRL run of the same config computes something else.

    Log-probs are always SUMMED over completion tokens; losses that need a per-token mean divide inside.
    """

    needs_reference: bool
    needs_lengths: bool
    needs_weight_logps: bool = False
    notes: tuple[str, ...] = ()


@dataclass
class LossOutput:
    """Per-pair result of :func:`preference_loss`.

    Attributes:
        losses: ``[B]`` per-pair loss, NOT detached, already including the ``loss_weights`` mixture, the
            ``rpo_alpha`` NLL term and the WPO weight. The training loss is ``losses.mean()``. For ``aot`` /
            ``aot_unpaired`` entry ``k`` is the k-th quantile term of the sorted batch, not pair ``k``.
        chosen_rewards, rejected_rewards: ``[B]`` detached implicit rewards of the first loss type:
            ``β·ρ`` for reference-based losses, ``β·π/|y|`` for the reference-free ``simpo``/``orpo``/``sft``.
        metrics: detached ``[B]`` extras the trainer logs by name, e.g. ``nll`` (chosen token-mean NLL, whenever
            ``chosen_lengths`` is given), ``log_odds_ratio``/``log_odds_chosen`` (``orpo``), ``wpo_weight``
            (``use_weighting``), ``loss/<name>`` (each component of a multi-loss mixture).
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pairs:
    """Everything a registered loss may read, for B pairs (every tensor ``[B]``); built once by preference_loss."""

    chosen_logps: Tensor
    rejected_logps: Tensor
    ref_chosen_logps: Tensor | None  # None only when no selected loss reads the reference (0 if reference_free)
    ref_rejected_logps: Tensor | None
    chosen_logratios: Tensor | None  # ρ_c = chosen_logps − ref_chosen_logps
    rejected_logratios: Tensor | None
    chosen_scores: Tensor | None  # f'(π/π_ref) of the chosen completion; = ρ_c under reverse_kl
    rejected_scores: Tensor | None
    chosen_lengths: Tensor | None  # completion token counts as floats, all >= 1
    rejected_lengths: Tensor | None


@dataclass(frozen=True)
class _Params:
    beta: float
    label_smoothing: float
    simpo_gamma: float
    discopop_tau: float


@dataclass(frozen=True)
class _Entry:
    fn: Callable[[_Pairs, _Params], Tensor | tuple[Tensor, dict[str, Tensor]]]
    needs_reference: bool
    needs_lengths: bool
    f_divergence: bool  # built on the chosen−rejected score difference, so an f-divergence is valid (f-DPO)
    sorts_batch: bool  # mixes pairs across the batch, so per-pair WPO weights would be misaligned
    reads: frozenset[str]  # optional parameters the loss reads (for "has no effect" errors)


_REGISTRY: dict[str, _Entry] = {}


def _register(
    name: str,
    *,
    needs_reference: bool = True,
    needs_lengths: bool = False,
    f_divergence: bool = False,
    sorts_batch: bool = False,
    reads: tuple[str, ...] = (),
) -> Callable[[Callable], Callable]:
    """Decorator: add a loss function to the registry under ``name`` with what the trainer must know about it."""

    def decorate(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise RuntimeError(f"loss {name!r} registered twice")  # a bug in this module, not a user mistake
        _REGISTRY[name] = _Entry(fn, needs_reference, needs_lengths, f_divergence, sorts_batch, frozenset(reads))
        return fn

    return decorate


def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """Conservative (label-smoothed) logistic loss ``−(1−ε)·log σ(z) − ε·log σ(−z)``, elementwise."""
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _per_token(logps: Tensor, lengths: Tensor | None) -> Tensor:
    assert lengths is not None  # guaranteed by the needs_lengths check in preference_loss
    return logps / lengths


# ----------------------------------------------------------------------------------------------------------------------
# Reference-based losses (arXiv ids; "Eq." numbers are the papers')
# ----------------------------------------------------------------------------------------------------------------------


@_register("sigmoid", f_divergence=True, reads=("label_smoothing",))
def _sigmoid(p: _Pairs, h: _Params) -> Tensor:
    """DPO, and conservative DPO (cDPO) when ``label_smoothing`` ε > 0.

    ``ℓ = −(1−ε)·log σ(β·Δ) − ε·log σ(−β·Δ)``, ``Δ = s_c − s_r``.

    Paper: Rafailov et al., arXiv 2305.18290, Eq. 7 (ε = 0). cDPO: Mitchell, "A note on DPO with noisy preferences
    & relationship to IPO" (2023, not on arXiv); ε is the assumed probability that a label is flipped. TRL 1.16's
    ``sigmoid`` has no ε; it equals this loss at ε = 0. Shapes: ``[B] -> [B]``.
    Worked value: Δ = 0 gives ``ln 2 ≈ 0.6931`` for every ε.
    """
    return _smoothed_logistic(h.beta * (p.chosen_scores - p.rejected_scores), h.label_smoothing)


@_register("robust", f_divergence=True, reads=("label_smoothing",))
def _robust(p: _Pairs, h: _Params) -> Tensor:
    """Robust DPO (rDPO): an unbiased estimate of the clean DPO loss when labels flip with probability ε.

    ``ℓ = [−(1−ε)·log σ(β·Δ) + ε·log σ(−β·Δ)] / (1 − 2ε)``, ``0 ≤ ε < 0.5``.

    Paper: Chowdhury, Kini & Natarajan, arXiv 2403.00409 (the rDPO loss, de-biased over the flip rate ε). Same as
    TRL 1.16 ``robust``. Reduces to DPO at ε = 0. Shapes: ``[B] -> [B]``.
    """
    eps = h.label_smoothing
    z = h.beta * (p.chosen_scores - p.rejected_scores)
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


@_register("hinge", f_divergence=True)
def _hinge(p: _Pairs, h: _Params) -> Tensor:
    """SLiC / RSO hinge loss on the normalised likelihood: ``ℓ = max(0, 1 − β·Δ)`` (β is the inverse margin).

    Papers: SLiC-HF, Zhao et al., arXiv 2305.10425 (calibration loss); RSO, Liu et al., arXiv 2309.06657 (the
    hinge loss on reference-normalised log-likelihoods that TRL implements). Same as TRL 1.16 ``hinge``.
    Shapes: ``[B] -> [B]``.
    """
    return torch.relu(1.0 - h.beta * (p.chosen_scores - p.rejected_scores))


@_register("ipo", needs_lengths=True, f_divergence=True)
def _ipo(p: _Pairs, h: _Params) -> Tensor:
    """IPO with TRL's per-token normalisation of the log-ratios.

    ``ℓ = (s_c/|y_c| − s_r/|y_r| − 1/(2β))²`` (β is IPO's τ).

    Paper: Azar et al., arXiv 2310.12036, Eq. 17. The division by completion length is TRL's (confirmed by the IPO
    authors per TRL's comment): the paper states the loss over sequence log-ratios, which makes the squared term
    grow with length. Same as TRL 1.16 ``ipo``. Shapes: ``[B] -> [B]``.
    """
    margin = _per_token(p.chosen_scores, p.chosen_lengths) - _per_token(p.rejected_scores, p.rejected_lengths)
    return (margin - 1.0 / (2.0 * h.beta)) ** 2


@_register("exo_pair", f_divergence=True, reads=("label_smoothing",))
def _exo_pair(p: _Pairs, h: _Params) -> Tensor:
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


@_register("nca_pair")
def _nca_pair(p: _Pairs, h: _Params) -> Tensor:
    """NCA (pairwise): optimises each response's absolute likelihood ratio rather than only their difference.

    With ``r = β·ρ``: ``ℓ = −log σ(r_c) − ½·log σ(−r_c) − ½·log σ(−r_r)``.

    Paper: Chen et al., arXiv 2402.05369 (NCA objective with K = 2 responses). Same as TRL 1.16 ``nca_pair``.
    Shapes: ``[B] -> [B]``. The chosen gradient changes sign at ``σ(r_c) = 2/3``: NCA stops pushing the chosen
    response up once its reward is large, unlike DPO.
    """
    r_c, r_r = h.beta * p.chosen_logratios, h.beta * p.rejected_logratios
    return -F.logsigmoid(r_c) - 0.5 * F.logsigmoid(-r_c) - 0.5 * F.logsigmoid(-r_r)


@_register("bco_pair")
def _bco_pair(p: _Pairs, h: _Params) -> Tensor:
    """BCO (pairwise): a binary classifier with the implicit reward as logit, chosen → 1, rejected → 0.

    ``ℓ = −log σ(β·ρ_c) − log σ(−β·ρ_r)``.

    Paper: Jung et al., arXiv 2404.04656. TRL 1.16 ``bco_pair`` (the paper's running reward shift δ is not used,
    as in TRL 1.16). Shapes: ``[B] -> [B]``.
    """
    return -F.logsigmoid(h.beta * p.chosen_logratios) - F.logsigmoid(-h.beta * p.rejected_logratios)


@_register("sppo_hard")
def _sppo_hard(p: _Pairs, h: _Params) -> Tensor:
    """SPPO with hard win probabilities (1 for the chosen, 0 for the rejected response).

    ``ℓ = (ρ_c − 1/(2β))² + (ρ_r + 1/(2β))²``.

    Paper: Wu et al., arXiv 2405.00675, Eq. 4.7 (Algorithm 1) with P(y_c ≻ π) = 1, P(y_r ≻ π) = 0. Same as TRL
    1.16 ``sppo_hard``. Shapes: ``[B] -> [B]``.
    """
    half_inv_beta = 0.5 / h.beta
    return (p.chosen_logratios - half_inv_beta) ** 2 + (p.rejected_logratios + half_inv_beta) ** 2


def _sorted_logistic(chosen_side: Tensor, rejected_side: Tensor, h: _Params) -> Tensor:
    # Sorting each side over the batch pairs quantile k with quantile k: the 1-D optimal-transport coupling.
    delta = torch.sort(chosen_side, dim=0).values - torch.sort(rejected_side, dim=0).values
    return _smoothed_logistic(h.beta * delta, h.label_smoothing)


@_register("aot", sorts_batch=True, reads=("label_smoothing",))
def _aot(p: _Pairs, h: _Params) -> Tensor:
    """AOT (paired): first-order stochastic dominance of the policy's margins over the reference's margins.

    With ``m = π_c − π_r`` and ``m_ref = ref_c − ref_r``, both sorted over the batch:
    ``ℓ_k = −(1−ε)·log σ(β·(m_(k) − m_ref(k))) − ε·log σ(−β·(m_(k) − m_ref(k)))``.

    Paper: Melnyk et al., arXiv 2406.05882 (AOT, paired setting). Same as TRL 1.16 ``aot``. Shapes: ``[B] -> [B]``,
    where entry k is the k-th quantile term (pairs are re-matched by sorting); larger batches help.
    """
    return _sorted_logistic(p.chosen_logps - p.rejected_logps, p.ref_chosen_logps - p.ref_rejected_logps, h)


@_register("aot_unpaired", sorts_batch=True, reads=("label_smoothing",))
def _aot_unpaired(p: _Pairs, h: _Params) -> Tensor:
    """AOT (unpaired): stochastic dominance of the chosen log-ratio distribution over the rejected one.

    With ``ρ_c`` and ``ρ_r`` sorted over the batch separately:
    ``ℓ_k = −(1−ε)·log σ(β·(ρ_c(k) − ρ_r(k))) − ε·log σ(−β·(ρ_c(k) − ρ_r(k)))``.

    Paper: Melnyk et al., arXiv 2406.05882 (AOT, unpaired setting). Same as TRL 1.16 ``aot_unpaired``.
    Shapes: ``[B] -> [B]`` (entry k is the k-th quantile term).
    """
    return _sorted_logistic(p.chosen_logratios, p.rejected_logratios, h)


@_register("apo_zero")
def _apo_zero(p: _Pairs, h: _Params) -> Tensor:
    """APO-zero: push the chosen reward up and the rejected reward down, each anchored at zero.

    ``ℓ = (1 − σ(β·ρ_c)) + σ(β·ρ_r)``.

    Paper: D'Oosterlinck et al., arXiv 2408.06266, Eq. 7. Same as TRL 1.16 ``apo_zero``. Use when the chosen
    outputs are better than the model's own. Shapes: ``[B] -> [B]``.
    """
    return (1.0 - torch.sigmoid(h.beta * p.chosen_logratios)) + torch.sigmoid(h.beta * p.rejected_logratios)


@_register("apo_down")
def _apo_down(p: _Pairs, h: _Params) -> Tensor:
    """APO-down: push both rewards down, the rejected one more.

    ``ℓ = σ(β·ρ_c) + (1 − σ(β·(ρ_c − ρ_r)))``.

    Paper: D'Oosterlinck et al., arXiv 2408.06266, Eq. 8. Same as TRL 1.16 ``apo_down``. Use when the model's own
    outputs are already better than the chosen ones. Shapes: ``[B] -> [B]``.
    """
    margin = p.chosen_logratios - p.rejected_logratios
    return torch.sigmoid(h.beta * p.chosen_logratios) + (1.0 - torch.sigmoid(h.beta * margin))


@_register("discopop", f_divergence=True, reads=("discopop_tau",))
def _discopop(p: _Pairs, h: _Params) -> Tensor:
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


@_register("sigmoid_norm", needs_lengths=True, f_divergence=True)
def _sigmoid_norm(p: _Pairs, h: _Params) -> Tensor:
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


@_register("sft", needs_reference=False, needs_lengths=True, f_divergence=True)
def _sft(p: _Pairs, h: _Params) -> Tensor:
    """Supervised NLL of the chosen completion, per token: ``ℓ = −π_c/|y_c|``.

    Used inside mixtures (MPO: ``["sigmoid", "bco_pair", "sft"]`` with weights ``[0.8, 0.2, 1.0]``). TRL 1.16's
    ``sft`` takes one token-mean over all chosen tokens of the batch; dpokit takes the token-mean per sequence, so
    ``losses.mean()`` weights every pair equally. The two agree when all chosen lengths are equal.
    Shapes: ``[B] -> [B]``.
    """
    return -_per_token(p.chosen_logps, p.chosen_lengths)


@_register("simpo", needs_reference=False, needs_lengths=True, reads=("label_smoothing", "simpo_gamma"))
def _simpo(p: _Pairs, h: _Params) -> Tensor:
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


@_register("orpo", needs_reference=False, needs_lengths=True)
def _orpo(p: _Pairs, h: _Params) -> tuple[Tensor, dict[str, Tensor]]:
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


LOSS_TYPES: tuple[str, ...] = tuple(_REGISTRY)
_F_DIVERGENCE_LOSSES = tuple(name for name, entry in _REGISTRY.items() if entry.f_divergence)


# ----------------------------------------------------------------------------------------------------------------------
# Modifiers
# ----------------------------------------------------------------------------------------------------------------------

# exp() of anything above these overflows after the cast back to the dtype (same limits as TRL 1.16 for the half and
# single precision types; float64 added because TRL has no entry for it).
_EXP_CLAMP = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0, torch.float64: 700.0}


def _f_divergence_scores(logratios: Tensor, f_divergence_type: str, alpha: float) -> Tensor:
    """``f'(u)`` at ``u = π/π_ref = exp(ρ)`` for the f-DPO reparameterisation (Wang et al., arXiv 2309.16240).

    ``reverse_kl``: ``log u``; ``forward_kl``: ``1 − 1/u``; ``js_divergence``: ``log(2u/(1+u)) = ln 2 + log σ(ρ)``;
    ``alpha_divergence``: ``(u^{α−1} − 1)/(α − 1)``, with ``log u`` as its α → 1 limit. Constant shifts of f' cancel
    in ``s_c − s_r``. The α convention is TRL 1.16's (``f_alpha_divergence_coef``, default 0.5); the paper's
    ``f'(u) = (1 − u^{−α})/α`` is the same family with ``α_paper = 1 − α``. Shapes: ``[B] -> [B]``.
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1.0 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + F.logsigmoid(logratios)
    if abs(alpha - 1.0) < 1e-6:  # the α → 1 limit of (u^{α−1} − 1)/(α − 1) is log u
        return logratios
    # Half-precision inputs are exponentiated in float32 (as TRL does) and cast back.
    work_dtype = torch.promote_types(logratios.dtype, torch.float32)
    exponent = ((alpha - 1.0) * logratios.to(work_dtype)).clamp(max=_EXP_CLAMP[logratios.dtype])
    return (torch.expm1(exponent) / (alpha - 1.0)).to(logratios.dtype)


def ld_aggregate(token_logps: Tensor, mask: Tensor, public_lengths: Tensor, ld_alpha: float) -> Tensor:
    """LD-DPO sequence log-prob: the shared-length prefix counts fully, the verbose tail is down-weighted by α.

    ``out_i = Σ_{t ≤ ℓ_i} logp_{i,t} + α·Σ_{t > ℓ_i} logp_{i,t}``, where ``t`` counts completion tokens (positions
    with ``mask`` set) from 1 and ``ℓ_i`` is the public length: ``min(|y_c|, |y_r|)`` of the pair row i belongs to.

    Paper: Liu et al., arXiv 2409.06411 (LD-DPO's length-desensitised likelihood). Same as TRL 1.16's ``ld_alpha``
    code in ``DPOTrainer._compute_loss``, except that positions outside ``mask`` are ignored here even if they hold
    non-zero values (TRL relies on them being zero). ``ld_alpha = 1`` gives the plain sum, ``0`` keeps only the
    shared prefix. The result replaces the summed log-probs given to :func:`preference_loss` (policy and reference).

    Args:
        token_logps: ``[B, T]`` per-token log-probs.
        mask: ``[B, T]`` bool/0-1 mask of completion tokens.
        public_lengths: ``[B]`` shared length of the pair each row belongs to.
        ld_alpha: weight of the tokens beyond the shared length, in ``[0, 1]``.

    Returns:
        ``[B]`` aggregated log-probs.
    """
    if not 0.0 <= ld_alpha <= 1.0:
        raise ConfigError(f"ld_alpha={ld_alpha} is outside [0, 1] (1 = plain DPO, 0 = ignore tokens past the shorter)")
    if token_logps.dim() != 2 or mask.shape != token_logps.shape:
        raise ValueError(f"ld_aggregate: token_logps {tuple(token_logps.shape)} and mask {tuple(mask.shape)} must "
                         "both be [B, T]")
    if public_lengths.shape != token_logps.shape[:1]:
        raise ValueError(f"ld_aggregate: public_lengths has shape {tuple(public_lengths.shape)}, expected "
                         f"[{token_logps.shape[0]}]")
    mask = mask.bool()
    position = mask.long().cumsum(dim=1)  # 1-based index of each completion token
    shared = mask & (position <= public_lengths.unsqueeze(1))
    tail = mask & (position > public_lengths.unsqueeze(1))
    zero = token_logps.new_zeros(())
    # torch.where (not multiplication) so that -inf/nan outside the mask cannot leak in.
    shared_sum = torch.where(shared, token_logps, zero).sum(dim=1)
    tail_sum = torch.where(tail, token_logps, zero).sum(dim=1)
    return shared_sum + ld_alpha * tail_sum


# ----------------------------------------------------------------------------------------------------------------------
# Resolution and validation (shared by loss_spec and preference_loss)
# ----------------------------------------------------------------------------------------------------------------------

LossType = str | Callable[..., Any]


@dataclass(frozen=True)
class _Term:
    name: str  # registry name, or the callable's __name__
    weight: float
    entry: _Entry | None  # None for a user callable
    fn: Callable[..., Any] | None  # the user callable, or None


def _describe(loss_type: LossType | Sequence[LossType]) -> str:
    if isinstance(loss_type, str) or callable(loss_type):
        items = [loss_type]
    else:
        items = list(loss_type)
    names = [item if isinstance(item, str) else getattr(item, "__name__", repr(item)) for item in items]
    return repr(names[0]) if len(names) == 1 else "[" + ", ".join(repr(n) for n in names) + "]"


def _unknown_name_error(name: str) -> ConfigError:
    close = difflib.get_close_matches(name, LOSS_TYPES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"loss_type {name!r} is not a known loss{hint}; valid: {', '.join(LOSS_TYPES)}")


def _resolve_terms(loss_type: LossType | Sequence[LossType], loss_weights: Sequence[float] | None) -> list[_Term]:
    if isinstance(loss_type, str) or callable(loss_type):
        items: list[LossType] = [loss_type]
    else:
        items = list(loss_type)
    if not items:
        raise ConfigError("loss_type is an empty list; give at least one loss name or callable")
    if loss_weights is None:
        weights = [1.0] * len(items)
    else:
        weights = [float(w) for w in loss_weights]
        if len(weights) != len(items):
            raise ConfigError(f"loss_weights has {len(weights)} entries but loss_type has {len(items)}: "
                              f"{_describe(loss_type)}")
        if not all(math.isfinite(w) for w in weights):
            raise ConfigError(f"loss_weights={list(loss_weights)} must all be finite numbers")
    terms = []
    for item, weight in zip(items, weights, strict=True):
        if isinstance(item, str):
            if item not in _REGISTRY:
                raise _unknown_name_error(item)
            terms.append(_Term(item, weight, _REGISTRY[item], None))
        elif callable(item):
            terms.append(_Term(getattr(item, "__name__", repr(item)), weight, None, item))
        else:
            raise ConfigError(f"loss_type entry {item!r} is neither a loss name nor a callable")
    return terms


def _check_params(
    terms: list[_Term],
    *,
    beta: float,
    label_smoothing: float,
    rpo_alpha: float | None,
    discopop_tau: float,
    f_divergence_type: str,
    use_weighting: bool,
    more: dict[str, Any],
) -> None:
    """Raise ConfigError for any parameter value that cannot work with the selected losses."""
    names = [t.name for t in terms if t.entry is not None]
    described = "[" + ", ".join(repr(t.name) for t in terms) + "]"
    if not beta > 0:
        raise ConfigError(f"beta={beta} must be > 0")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ConfigError(f"label_smoothing={label_smoothing} must lie in [0, 0.5] (it is a label-flip probability)")
    if label_smoothing > 0 and not any("label_smoothing" in t.entry.reads for t in terms if t.entry is not None):
        readers = [n for n, e in _REGISTRY.items() if "label_smoothing" in e.reads]
        raise ConfigError(f"label_smoothing={label_smoothing} has no effect on loss_type {described}; it is read by "
                          f"{', '.join(readers)}")
    if "robust" in names and not label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing={label_smoothing} must be < 0.5 for loss_type 'robust' (it divides by "
                          "1 - 2*label_smoothing)")
    if "exo_pair" in names and not label_smoothing > 0:
        raise ConfigError("loss_type 'exo_pair' needs label_smoothing > 0 (log of the target probability; the EXO "
                          "paper uses 1e-3)")
    if "discopop" in names and not discopop_tau > 0:
        raise ConfigError(f"discopop_tau={discopop_tau} must be > 0 for loss_type 'discopop'")
    if rpo_alpha is not None and not (math.isfinite(rpo_alpha) and rpo_alpha >= 0):
        raise ConfigError(f"rpo_alpha={rpo_alpha} must be a finite number >= 0 (or None to disable)")
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ConfigError(f"f_divergence_type {f_divergence_type!r} is not known; valid: "
                          f"{', '.join(F_DIVERGENCE_TYPES)}")
    if f_divergence_type != "reverse_kl":
        unsupported = [t.name for t in terms if t.entry is None or not t.entry.f_divergence]
        if unsupported:
            raise ConfigError(f"f_divergence_type={f_divergence_type!r} is not valid for loss_type "
                              f"{', '.join(repr(n) for n in unsupported)}; it only applies to "
                              f"{', '.join(_F_DIVERGENCE_LOSSES)} (the f-DPO log-partition term cancels only in the "
                              "chosen-rejected difference)")
    if use_weighting:
        sorting = [t.name for t in terms if t.entry is not None and t.entry.sorts_batch]
        if sorting:
            raise ConfigError(f"use_weighting=True cannot be combined with loss_type {', '.join(map(repr, sorting))}: "
                              "it sorts the batch, so per-pair WPO weights would be misaligned")
    if more and all(t.fn is None for t in terms):
        raise ConfigError(f"unknown loss parameter(s) {', '.join(sorted(more))} for loss_type {described}; extra "
                          "parameters are only passed to user-supplied loss callables")


def _needs(terms: list[_Term], reference_free: bool, rpo_alpha: float | None, use_weighting: bool) -> LossSpec:
    needs_reference = not reference_free and any(
        (t.entry.needs_reference if t.entry is not None else getattr(t.fn, "needs_reference", True)) for t in terms
    )
    needs_lengths = (
        rpo_alpha is not None
        or use_weighting
        or any((t.entry.needs_lengths if t.entry is not None else getattr(t.fn, "needs_lengths", False)) for t in terms)
    )
    return LossSpec(needs_reference=needs_reference, needs_lengths=needs_lengths, needs_weight_logps=use_weighting)


def loss_spec(
    loss_type: LossType | Sequence[LossType],
    *,
    beta: float = 0.1,
    loss_weights: Sequence[float] | None = None,
    reference_free: bool = False,
    label_smoothing: float = 0.0,
    rpo_alpha: float | None = None,
    simpo_gamma: float = 0.5,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    use_weighting: bool = False,
    **more: Any,
) -> LossSpec:
    """Validate a loss configuration and say what the trainer must provide for it.

    Takes the same loss parameters as :func:`preference_loss` (so a config can be checked at start-up, before any
    model is loaded) and raises :class:`~dpokit.errors.ConfigError` for an unknown name (listing the valid ones and
    the closest match) or a parameter that cannot work with the selected losses.

    A user callable needs a reference unless it has the attribute ``needs_reference = False``, and needs lengths
    only if it has ``needs_lengths = True``.

    Example: ``loss_spec("simpo")`` → ``LossSpec(needs_reference=False, needs_lengths=True, needs_weight_logps=False)``.
    """
    del simpo_gamma, f_alpha_divergence_coef  # any value is valid; accepted so a whole config can be passed
    terms = _resolve_terms(loss_type, loss_weights)
    _check_params(terms, beta=beta, label_smoothing=label_smoothing, rpo_alpha=rpo_alpha, discopop_tau=discopop_tau,
                  f_divergence_type=f_divergence_type, use_weighting=use_weighting, more=more)
    spec = _needs(terms, reference_free, rpo_alpha, use_weighting)
    if label_smoothing > 0 and any(t.name == "sigmoid" for t in terms):
        spec = dataclasses.replace(spec, notes=(
            f"label_smoothing={label_smoothing} with sigmoid: conservative DPO (cDPO, the DPO authors' formula); "
            "TRL 1.16's sigmoid ignores label_smoothing",))
    return spec


# ----------------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------------


def _check_vector(name: str, value: Tensor, batch_shape: torch.Size) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B], got {type(value).__name__}")
    if value.shape != batch_shape:
        raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(batch_shape)} like "
                         "policy_chosen_logps")


def _lengths_as_float(name: str, lengths: Tensor, like: Tensor) -> Tensor:
    _check_vector(name, lengths, like.shape)
    # A zero-token completion has no per-token mean; the data pipeline must drop it, never divide by a clamped 1.
    if bool((lengths < 1).any()):
        raise ValueError(f"{name} must be >= 1 for every pair (empty completion at index "
                         f"{int((lengths < 1).nonzero()[0, 0])})")
    return lengths.to(dtype=like.dtype)


def _require(loss_names: str, what: str, present: bool, hint: str) -> None:
    if not present:
        raise ConfigError(f"loss_type {loss_names} needs {what} but it was not given ({hint})")


def _call_user_loss(term: _Term, args: tuple, kwargs: dict[str, Any], batch_shape: torch.Size) -> LossOutput:
    result = term.fn(*args, **kwargs)
    if not isinstance(result, LossOutput):
        if not (isinstance(result, tuple) and len(result) == 3):
            raise ConfigError(f"loss callable {term.name!r} must return a LossOutput or a tuple "
                              f"(losses, chosen_rewards, rejected_rewards), got {type(result).__name__}")
        result = LossOutput(*result)
    for field_name in ("losses", "chosen_rewards", "rejected_rewards"):
        value = getattr(result, field_name)
        if not isinstance(value, Tensor) or value.shape != batch_shape:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ConfigError(f"loss callable {term.name!r} returned {field_name} of shape {shape}, expected "
                              f"{tuple(batch_shape)}")
    return result


def preference_loss(
    loss_type: LossType | Sequence[LossType],
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    beta: float = 0.1,
    loss_weights: Sequence[float] | None = None,
    reference_free: bool = False,
    label_smoothing: float = 0.0,
    rpo_alpha: float | None = None,
    simpo_gamma: float = 0.5,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    use_weighting: bool = False,
    chosen_weight_logps: Tensor | None = None,
    rejected_weight_logps: Tensor | None = None,
    **more: Any,
) -> LossOutput:
    """Per-pair preference loss for B pairs.

    ``losses = W · (Σ_k w_k·ℓ_k + α_rpo·NLL)``, where ``ℓ_k`` is the k-th ``loss_type`` with weight ``w_k``
    (``loss_weights``, MPO-style; default all 1), ``NLL = −π_c/|y_c|`` and ``W`` the detached WPO weight (1 unless
    ``use_weighting``). Order and placement match TRL (RPO's NLL is added before the WPO weight, as TRL 0.x did;
    TRL 1.16 weights every component including ``sft``, which is the same thing).

    Args:
        loss_type: a registered name (see ``LOSS_TYPES``), a user callable, or a list of them (mixture).
        policy_chosen_logps, policy_rejected_logps: ``[B]`` policy log-probs summed over completion tokens.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` reference log-probs; required unless every loss is
            reference-free or ``reference_free=True`` (then the reference is the constant 0, as in TRL).
        chosen_lengths, rejected_lengths: ``[B]`` completion token counts (>= 1), for length-normalised losses,
            the chosen NLL and WPO. Giving them always is fine.
        beta: β, the inverse temperature / regularisation strength (IPO's τ, ORPO's λ).
        label_smoothing: ε for ``sigmoid`` (cDPO), ``robust``, ``exo_pair``, ``aot``/``aot_unpaired``, ``simpo``.
        rpo_alpha: if set, adds ``rpo_alpha · NLL`` per pair (RPO, Pang et al., arXiv 2404.19733: DPO + α·NLL).
            The NLL is the per-sequence token-mean over the chosen completion; the paper normalises by prompt +
            completion length and TRL 0.x took one token-mean over the whole batch (equal for equal lengths).
        simpo_gamma: SimPO's target margin γ. discopop_tau: DiscoPOP's τ.
        f_divergence_type, f_alpha_divergence_coef: f-DPO scores (see ``_f_divergence_scores``); only for
            losses built on the chosen−rejected score difference.
        use_weighting: WPO (Zhou et al., arXiv 2406.11827, Eq. 2): multiply each pair's loss by the detached
            ``exp(w_c/|y_c|)·exp(w_r/|y_r|)``, with ``chosen_weight_logps``/``rejected_weight_logps`` ``[B]`` =
            ``Σ_t (log p_t − log Σ_v p_v²)`` over completion tokens (the weight-alignment form TRL 1.16 uses; like
            TRL 1.16 and unlike some TRL 0.x releases, the weight is not clamped at 1).
        **more: extra parameters, passed only to user callables.

    A user callable is called as ``fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
    ref_rejected_logps, *, beta, chosen_lengths, rejected_lengths, **more)`` and returns a ``LossOutput`` or
    ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``.

    Returns:
        :class:`LossOutput` with ``[B]`` losses (not detached) and detached rewards of the first loss type.

    Raises:
        ConfigError: unknown loss name, a parameter that cannot work, or a required input that was not given.
        ValueError / TypeError: tensors of the wrong shape or type, or a completion length below 1.
    """
    terms = _resolve_terms(loss_type, loss_weights)
    _check_params(terms, beta=beta, label_smoothing=label_smoothing, rpo_alpha=rpo_alpha, discopop_tau=discopop_tau,
                  f_divergence_type=f_divergence_type, use_weighting=use_weighting, more=more)
    spec = _needs(terms, reference_free, rpo_alpha, use_weighting)
    described = _describe(loss_type)

    if not isinstance(policy_chosen_logps, Tensor) or not policy_chosen_logps.is_floating_point():
        raise TypeError("policy_chosen_logps must be a floating-point torch.Tensor of shape [B]")
    if policy_chosen_logps.dim() != 1:
        raise ValueError(f"policy_chosen_logps has shape {tuple(policy_chosen_logps.shape)}, expected [B]")
    batch_shape = policy_chosen_logps.shape
    _check_vector("policy_rejected_logps", policy_rejected_logps, batch_shape)

    # Reference: needed, forbidden (would be silently ignored), or absent.
    refs_given = (ref_chosen_logps is not None, ref_rejected_logps is not None)
    if reference_free and any(refs_given):
        raise ConfigError("reference_free=True treats the reference log-probs as 0, but ref_chosen_logps/"
                          "ref_rejected_logps were given; drop one or the other")
    if not spec.needs_reference and not reference_free and any(refs_given):
        raise ConfigError(f"loss_type {described} is reference-free; the given ref_chosen_logps/ref_rejected_logps "
                          "would be ignored, so do not pass them")
    if spec.needs_reference:
        hint = "pass the reference model's summed log-probs, or set reference_free=True"
        _require(described, "ref_chosen_logps", refs_given[0], hint)
        _require(described, "ref_rejected_logps", refs_given[1], hint)
        _check_vector("ref_chosen_logps", ref_chosen_logps, batch_shape)
        _check_vector("ref_rejected_logps", ref_rejected_logps, batch_shape)
    elif reference_free:
        ref_chosen_logps = torch.zeros_like(policy_chosen_logps)
        ref_rejected_logps = torch.zeros_like(policy_rejected_logps)

    # Lengths: required by the spec, optional (for the nll metric) otherwise.
    if spec.needs_lengths:
        hint = "completion token counts; needed for length normalisation, the chosen NLL or WPO"
        _require(described, "chosen_lengths", chosen_lengths is not None, hint)
        _require(described, "rejected_lengths", rejected_lengths is not None, hint)
    len_c = None if chosen_lengths is None else _lengths_as_float("chosen_lengths", chosen_lengths,
                                                                   policy_chosen_logps)
    len_r = None if rejected_lengths is None else _lengths_as_float("rejected_lengths", rejected_lengths,
                                                                     policy_rejected_logps)

    if use_weighting:
        hint = "per-sequence sums of log p_t - log sum_v p_v^2 over completion tokens"
        _require(described, "chosen_weight_logps (use_weighting=True)", chosen_weight_logps is not None, hint)
        _require(described, "rejected_weight_logps (use_weighting=True)", rejected_weight_logps is not None, hint)
        _check_vector("chosen_weight_logps", chosen_weight_logps, batch_shape)
        _check_vector("rejected_weight_logps", rejected_weight_logps, batch_shape)
    elif chosen_weight_logps is not None or rejected_weight_logps is not None:
        raise ConfigError("chosen_weight_logps/rejected_weight_logps were given but use_weighting=False; they would "
                          "be ignored")

    if ref_chosen_logps is not None:
        rho_c, rho_r = policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps
        scores = (_f_divergence_scores(rho_c, f_divergence_type, f_alpha_divergence_coef),
                  _f_divergence_scores(rho_r, f_divergence_type, f_alpha_divergence_coef))
    else:
        rho_c = rho_r = None
        scores = (None, None)
    pairs = _Pairs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, rho_c, rho_r,
                   *scores, len_c, len_r)
    params = _Params(beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma, discopop_tau=discopop_tau)

    total: Tensor | None = None
    metrics: dict[str, Tensor] = {}
    rewards: tuple[Tensor, Tensor] | None = None
    for term in terms:
        if term.entry is not None:
            result = term.entry.fn(pairs, params)
            losses, extra = result if isinstance(result, tuple) else (result, {})
            if term.entry.needs_reference:
                term_rewards = (beta * rho_c.detach(), beta * rho_r.detach())
            else:  # SimPO / ORPO convention: β times the per-token log-prob
                term_rewards = (beta * (policy_chosen_logps / len_c).detach(),
                                beta * (policy_rejected_logps / len_r).detach())
        else:
            user = _call_user_loss(
                term,
                (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps),
                {"beta": beta, "chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths, **more},
                batch_shape,
            )
            losses, extra = user.losses, user.metrics
            term_rewards = (user.chosen_rewards.detach(), user.rejected_rewards.detach())
        if rewards is None:
            rewards = term_rewards
        metrics.update(extra)
        if len(terms) > 1:
            metrics[f"loss/{term.name}"] = losses.detach()
        total = term.weight * losses if total is None else total + term.weight * losses

    if len_c is not None:
        nll = -policy_chosen_logps / len_c
        metrics["nll"] = nll.detach()
        if rpo_alpha is not None:
            total = total + rpo_alpha * nll
    if use_weighting:
        # Detached: WPO re-weights pairs, it does not train the policy to change its own weights.
        weight = (torch.exp(chosen_weight_logps / len_c) * torch.exp(rejected_weight_logps / len_r)).detach()
        metrics["wpo_weight"] = weight
        total = total * weight

    return LossOutput(losses=total, chosen_rewards=rewards[0], rejected_rewards=rewards[1], metrics=metrics)
