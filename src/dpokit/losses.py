"""Preference losses: a registry of pure functions over per-sequence log-probs, and the loss a run trains with.

Every loss works on B preference pairs given as summed completion log-probs (shape ``[B]``) of the policy and, for
losses that need it, of the frozen reference model, plus the completion token counts for length-normalised losses.

* :class:`LossParams` (declared in ``dpokit.config``, which must not import torch) holds the loss settings, once,
  each with its range; ``DPOConfig`` inherits them, so a config checks them when it is made, before any model loads.
* :func:`build` turns checked params into a :class:`Loss`: what the trainer must provide (``.spec``), how a
  sequence's token log-probs become its score (``.sequence_logps``: the sum, or LD-DPO's with ``ld_alpha``) and the
  per-pair loss (calling it), where only the tensors are checked.
* :func:`register` adds a loss under a name; every built-in loss below is added that way. A loss function reads
  :class:`Pairs` and :class:`LossParams`; the modifiers common to all losses (f-divergence scores, RPO's NLL term,
  WPO weighting, MPO mixtures) are applied around it.
* :func:`preference_loss` and :func:`loss_spec` do the same for one call, from keyword arguments.

The trainer never tests a loss name: it asks the loss what it needs (a reference model? completion lengths? WPO
weight log-probs?) and always passes SUMMED completion log-probs. Length normalisation (``ipo``, ``sigmoid_norm``,
``simpo``, ``orpo``, ``sft``, ``rpo_alpha``) happens inside the losses, so there is no "sum or mean" switch for the
caller to get wrong.

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

import copy
import dataclasses
import difflib
import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from dpokit.config import F_DIVERGENCE_TYPES, LossParams, declared_range, ensure_checked
from dpokit.errors import ConfigError

if TYPE_CHECKING:
    from dpokit.logps import CompletionLogps

__all__ = [
    "F_DIVERGENCE_TYPES",
    "LOSS_TYPES",
    "Loss",
    "LossOutput",
    "LossParams",
    "LossSpec",
    "Pairs",
    "build",
    "ld_aggregate",
    "loss_spec",
    "preference_loss",
    "register",
]

# ----------------------------------------------------------------------------------------------------------------------
# Public result and input types
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
    """Per-pair result of a loss (:class:`Loss`, :func:`preference_loss`).

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


@dataclass(frozen=True)
class Pairs:
    """The per-pair inputs a registered loss reads, for B pairs (every tensor ``[B]``), made once per call.

    Attributes:
        chosen_logps, rejected_logps: ``π_c, π_r``, the policy's completion log-probs, summed over tokens (with
            ``ld_alpha``: LD-DPO's length-desensitised sums).
        ref_chosen_logps, ref_rejected_logps: ``ref_c, ref_r``, the reference's; zeros with ``reference_free``;
            None only when no selected loss reads the reference.
        chosen_logratios, rejected_logratios: ``ρ_c = π_c − ref_c`` and ``ρ_r`` (None without a reference).
        chosen_scores, rejected_scores: ``s_c, s_r = f'(π/π_ref)`` for the configured ``f_divergence_type``; equal
            to the log-ratios under the default ``reverse_kl`` (None without a reference).
        chosen_lengths, rejected_lengths: completion token counts, all >= 1 (None unless given; a loss registered
            with ``needs_lengths=True`` always gets them). Divide by them for per-token means.
    """

    chosen_logps: Tensor
    rejected_logps: Tensor
    ref_chosen_logps: Tensor | None
    ref_rejected_logps: Tensor | None
    chosen_logratios: Tensor | None
    rejected_logratios: Tensor | None
    chosen_scores: Tensor | None
    rejected_scores: Tensor | None
    chosen_lengths: Tensor | None
    rejected_lengths: Tensor | None


# ----------------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------------

LossFunction = Callable[[Pairs, LossParams], "Tensor | tuple[Tensor, dict[str, Tensor]] | LossOutput"]
ParamsCheck = Callable[[LossParams], "str | None"]


@dataclass(frozen=True)
class _Entry:
    name: str
    fn: Callable[..., Any]
    needs_reference: bool
    needs_lengths: bool
    f_divergence: bool  # built on the chosen−rejected score difference, so an f-divergence is valid (f-DPO)
    sorts_batch: bool  # mixes pairs across the batch, so per-pair WPO weights would be misaligned
    reads: frozenset[str]  # optional parameters the loss reads (for "has no effect" errors)
    check: ParamsCheck | None
    takes_extra: bool = False  # a loss function given in place of a name, called with the extra keyword arguments


_REGISTRY: dict[str, _Entry] = {}


def register(
    name: str,
    *,
    needs_reference: bool = True,
    needs_lengths: bool = False,
    f_divergence: bool = False,
    sorts_batch: bool = False,
    reads: Sequence[str] = (),
    check: ParamsCheck | None = None,
) -> Callable[[LossFunction], LossFunction]:
    """Decorator: add a preference loss under ``name``, which is then a valid ``loss_type`` everywhere (DPOConfig,
    YAML and the command line, mixtures, ``LOSS_TYPES``).

    The function is called as ``fn(pairs, params)`` with :class:`Pairs` and :class:`LossParams` and returns the
    ``[B]`` per-pair losses (not detached); or ``(losses, metrics)`` with a dict of detached ``[B]`` metrics to log;
    or a :class:`LossOutput` carrying its own rewards. Otherwise the logged rewards are ``β·ρ``, or ``β·π/|y|`` when
    ``needs_reference=False``. RPO, WPO, f-divergence scores and mixtures apply to it as to the built-in losses.

    Args:
        name: the ``loss_type`` name; a name that is already registered is refused.
        needs_reference: reads ``ref_*``, ``*_logratios`` or ``*_scores``. False: no reference model is built.
        needs_lengths: reads ``chosen_lengths``/``rejected_lengths``.
        f_divergence: depends on the policy only through ``Δ = s_c − s_r``, so every ``f_divergence_type`` is
            valid for it (the f-DPO log-partition term cancels only in that difference).
        sorts_batch: mixes pairs across the batch (then WPO's per-pair weights are refused).
        reads: the LossParams fields it reads besides ``beta``; ``label_smoothing > 0`` with no selected loss
            reading it is refused as having no effect.
        check: ``check(params) -> str | None``, run once when the params are made: None when they suit the loss,
            else what the loss needs, completing the one-line error ``loss_type '<name>' ...``.

    Example::

        import torch.nn.functional as F
        from dpokit import DPOConfig, losses

        def _needs_margin(params):
            return None if params.simpo_gamma >= 0 else "needs simpo_gamma >= 0 (a target margin)"

        @losses.register("margin_sigmoid", reads=("simpo_gamma",), check=_needs_margin)
        def margin_sigmoid(pairs: losses.Pairs, params: losses.LossParams):
            margin = pairs.chosen_logratios - pairs.rejected_logratios
            return -F.logsigmoid(params.beta * margin - params.simpo_gamma)

        DPOConfig(loss_type="margin_sigmoid", simpo_gamma=0.2)
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"register: a loss name must be a non-empty string, got {name!r}")
    known = {f.name for f in dataclasses.fields(LossParams)}
    unknown = [r for r in reads if r not in known]
    if unknown:
        raise ConfigError(f"register {name!r}: reads names {', '.join(map(repr, unknown))}, which are not loss "
                          f"parameters; valid: {', '.join(sorted(known))}")

    def decorate(fn: LossFunction) -> LossFunction:
        if name in _REGISTRY:
            raise ConfigError(f"register: loss {name!r} is already registered; choose another name")
        _REGISTRY[name] = _Entry(name, fn, needs_reference, needs_lengths, f_divergence, sorts_batch,
                                 frozenset(reads), check)
        return fn

    return decorate


class _RegisteredNames(Sequence[str]):
    """The registered loss names in registration order. A live view of the registry, so a loss registered after
    `from dpokit.losses import LOSS_TYPES` is listed too."""

    def __getitem__(self, index):
        return tuple(_REGISTRY)[index]

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_REGISTRY))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in _REGISTRY

    def __repr__(self) -> str:
        return repr(tuple(_REGISTRY))


LOSS_TYPES: Sequence[str] = _RegisteredNames()


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
    shared prefix. A run applies it to policy and reference alike (:meth:`Loss.sequence_logps`); called directly, the
    result replaces the summed log-probs given to :func:`preference_loss`.

    Args:
        token_logps: ``[B, T]`` per-token log-probs.
        mask: ``[B, T]`` bool/0-1 mask of completion tokens.
        public_lengths: ``[B]`` shared length of the pair each row belongs to.
        ld_alpha: weight of the tokens beyond the shared length, in ``[0, 1]``.

    Returns:
        ``[B]`` aggregated log-probs.
    """
    allowed = declared_range(LossParams, "ld_alpha")
    if ld_alpha not in allowed:
        raise ConfigError(f"ld_alpha={ld_alpha} is outside {allowed} (1 = plain DPO, 0 = ignore tokens past the "
                          "shorter)")
    return _ld_sum(token_logps, mask, public_lengths, ld_alpha)


def _ld_sum(token_logps: Tensor, mask: Tensor, public_lengths: Tensor, ld_alpha: float) -> Tensor:
    """`ld_aggregate` for an ``ld_alpha`` already checked (with the params it came from); tensors checked here."""
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
# The configured loss: resolution and checks once, then per-call tensors only
# ----------------------------------------------------------------------------------------------------------------------

LossType = Union[str, Callable[..., Any]]


@dataclass(frozen=True)
class _Term:
    name: str  # registry name, or the callable's __name__
    weight: float
    entry: _Entry


def _callable_entry(fn: Callable[..., Any]) -> _Entry:
    """A loss function given in place of a name (Python API only): an entry like a registered loss's, with its needs
    read from the function's attributes (``needs_reference``, default True; ``needs_lengths``, default False). It is
    called as ``fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta,
    chosen_lengths, rejected_lengths, **extra)`` and returns a LossOutput or ``(losses, chosen_rewards,
    rejected_rewards)``."""
    name = getattr(fn, "__name__", repr(fn))

    def call(p: Pairs, h: LossParams, **extra: Any) -> LossOutput:
        result = fn(p.chosen_logps, p.rejected_logps, p.ref_chosen_logps, p.ref_rejected_logps, beta=h.beta,
                    chosen_lengths=p.chosen_lengths, rejected_lengths=p.rejected_lengths, **extra)
        if isinstance(result, tuple) and len(result) == 3:
            result = LossOutput(*result)
        if not isinstance(result, LossOutput):
            raise ConfigError(f"loss callable {name!r} must return a LossOutput or a tuple "
                              f"(losses, chosen_rewards, rejected_rewards), got {type(result).__name__}")
        return result

    return _Entry(name, call, needs_reference=getattr(fn, "needs_reference", True),
                  needs_lengths=getattr(fn, "needs_lengths", False), f_divergence=False, sorts_batch=False,
                  reads=frozenset(), check=None, takes_extra=True)


def _describe(terms: Sequence[_Term]) -> str:
    names = [repr(t.name) for t in terms]
    return names[0] if len(names) == 1 else "[" + ", ".join(names) + "]"


def _unknown_name_error(name: str) -> ConfigError:
    close = difflib.get_close_matches(name, list(LOSS_TYPES), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"loss_type: unknown {name!r}{hint}; valid: {', '.join(LOSS_TYPES)}")


def _resolve_terms(params: LossParams) -> list[_Term]:
    """The selected losses with their weights; unknown names and a weight count that does not match are refused."""
    loss_type = params.loss_type
    if isinstance(loss_type, str) or callable(loss_type):
        items: list[Any] = [loss_type]
    elif isinstance(loss_type, (list, tuple)):
        items = list(loss_type)
    else:
        raise ConfigError(f"loss_type: expected a loss name or a list of them, got {loss_type!r}")
    if not items:
        raise ConfigError("loss_type is an empty list; give at least one loss name")
    weights = [1.0] * len(items) if params.loss_weights is None else [float(w) for w in params.loss_weights]
    if len(weights) != len(items):
        raise ConfigError(f"loss_weights has {len(weights)} values for {len(items)} loss types")
    terms = []
    for item, weight in zip(items, weights, strict=True):
        if isinstance(item, str):
            if item not in _REGISTRY:
                raise _unknown_name_error(item)
            entry = _REGISTRY[item]
        elif callable(item):
            entry = _callable_entry(item)
        else:
            raise ConfigError(f"loss_type entry {item!r} is neither a loss name nor a callable")
        terms.append(_Term(entry.name, weight, entry))
    return terms


def _check_terms(terms: Sequence[_Term], h: LossParams) -> None:
    """What the selected losses need of the params (each loss's own `check`), and the combinations that cannot work
    with them. The general ranges of the params were checked field by field before."""
    described = _describe(terms)
    for term in terms:
        problem = term.entry.check(h) if term.entry.check is not None else None
        if problem:
            raise ConfigError(f"loss_type {term.name!r} {problem}")
    if h.label_smoothing > 0 and not any("label_smoothing" in t.entry.reads for t in terms):
        readers = [n for n, e in _REGISTRY.items() if "label_smoothing" in e.reads]
        raise ConfigError(f"label_smoothing={h.label_smoothing} has no effect on loss_type {described}; it is read by "
                          f"{', '.join(readers)}")
    if h.f_divergence_type != "reverse_kl":
        unsupported = [t.name for t in terms if not t.entry.f_divergence]
        if unsupported:
            valid = [n for n, e in _REGISTRY.items() if e.f_divergence]
            raise ConfigError(f"f_divergence_type={h.f_divergence_type!r} is not valid for loss_type "
                              f"{', '.join(repr(n) for n in unsupported)}; it only applies to {', '.join(valid)} (the "
                              "f-DPO log-partition term cancels only in the chosen-rejected difference)")
    if h.use_weighting:
        sorting = [t.name for t in terms if t.entry.sorts_batch]
        if sorting:
            raise ConfigError(f"use_weighting=True cannot be combined with loss_type {', '.join(map(repr, sorting))}: "
                              "it sorts the batch, so per-pair WPO weights would be misaligned")


def _spec(terms: Sequence[_Term], h: LossParams) -> LossSpec:
    needs_reference = not h.reference_free and any(t.entry.needs_reference for t in terms)
    needs_lengths = h.rpo_alpha is not None or h.use_weighting or any(t.entry.needs_lengths for t in terms)
    notes: tuple[str, ...] = ()
    if h.label_smoothing > 0 and any(t.name == "sigmoid" for t in terms):
        notes = (f"label_smoothing={h.label_smoothing} with sigmoid: conservative DPO (cDPO, the DPO authors' "
                 "formula); TRL 1.16's sigmoid ignores label_smoothing",)
    return LossSpec(needs_reference=needs_reference, needs_lengths=needs_lengths, needs_weight_logps=h.use_weighting,
                    notes=notes)


class Loss:
    """A preference loss as configured. Made when its :class:`LossParams` are checked (all settings are valid by
    then) and obtained with :func:`build`; calling it per micro-batch checks only the tensors it is given.

    Attributes:
        params: the LossParams (or DPOConfig) it was made from.
        spec: what the caller must provide (:class:`LossSpec`).
    """

    def __init__(self, params: LossParams):
        self.params = params
        self.terms = _resolve_terms(params)
        _check_terms(self.terms, params)
        self.spec = _spec(self.terms, params)
        self.extra: dict[str, Any] = {}
        self.described = _describe(self.terms)

    def with_extra(self, extra: Mapping[str, Any]) -> Loss:
        """This loss with keyword arguments for its user-supplied loss callables (the only losses that take any)."""
        if not extra:
            return self
        if not any(t.entry.takes_extra for t in self.terms):
            known = [f.name for f in dataclasses.fields(LossParams)]
            hints = "".join(f" (did you mean {m[0]!r}?)" for m in
                            (difflib.get_close_matches(k, known, n=1) for k in sorted(extra)) if m)
            raise ConfigError(f"unknown loss parameter(s) {', '.join(sorted(extra))}{hints} for loss_type "
                              f"{self.described}; extra parameters are only passed to user-supplied loss callables")
        loss = copy.copy(self)
        loss.extra = dict(extra)
        return loss

    def sequence_logps(self, out: CompletionLogps) -> Tensor:
        """One score per sequence from its completion log-probs, the policy's and the reference's alike: the sum, or
        with ``ld_alpha`` LD-DPO's length-desensitised sum (:func:`ld_aggregate`, the shared length being the
        shorter completion of the pair). ``out`` holds B chosen rows, then their B rejected rows; returns ``[2B]``."""
        if self.params.ld_alpha is None:
            return out.logps
        b = out.logps.shape[0] // 2
        public = torch.minimum(out.lengths[:b], out.lengths[b:]).repeat(2)
        return _ld_sum(out.token_logps, out.mask, public, self.params.ld_alpha)

    def __call__(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        ref_chosen_logps: Tensor | None = None,
        ref_rejected_logps: Tensor | None = None,
        *,
        chosen_lengths: Tensor | None = None,
        rejected_lengths: Tensor | None = None,
        chosen_weight_logps: Tensor | None = None,
        rejected_weight_logps: Tensor | None = None,
    ) -> LossOutput:
        """Per-pair loss for B pairs; the arguments are those of :func:`preference_loss` without the parameters."""
        _check_inputs(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                      chosen_lengths, rejected_lengths, chosen_weight_logps, rejected_weight_logps)
        pairs = _scored_pairs(self.params, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                              ref_rejected_logps, chosen_lengths, rejected_lengths)
        total, rewards, metrics = _mix_terms(self, pairs)
        total = _apply_modifiers(self.params, pairs, total, metrics, chosen_weight_logps, rejected_weight_logps)
        return LossOutput(losses=total, chosen_rewards=rewards[0], rejected_rewards=rewards[1], metrics=metrics)


def build(params: LossParams, **extra: Any) -> Loss:
    """The loss of checked params, made once: a run builds it at start and calls it every micro-batch.

    ``params`` were checked when they were made (a DPOConfig or LossParams raises ConfigError at construction);
    they are checked again only if a field was changed since. ``extra`` keyword arguments go to user-supplied loss
    callables in ``loss_type``.

    Example: ``loss = build(LossParams(loss_type="ipo", beta=0.5))``; ``loss.spec.needs_lengths`` is True and
    ``loss(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr).losses`` the ``[B]`` per-pair losses.
    """
    ensure_checked(params)
    return params._loss.with_extra(extra)


# ----------------------------------------------------------------------------------------------------------------------
# One call: input checks, scored pairs, term mixing, modifiers
# ----------------------------------------------------------------------------------------------------------------------


def _check_vector(name: str, value: Tensor, batch_shape: torch.Size) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B], got {type(value).__name__}")
    if value.shape != batch_shape:
        raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(batch_shape)} like "
                         "policy_chosen_logps")


def _require(loss_names: str, what: str, present: bool, hint: str) -> None:
    if not present:
        raise ConfigError(f"loss_type {loss_names} needs {what} but it was not given ({hint})")


def _check_inputs(loss: Loss, pc: Tensor, pr: Tensor, rc: Tensor | None, rr: Tensor | None, lc: Tensor | None,
                  lr: Tensor | None, wc: Tensor | None, wr: Tensor | None) -> None:
    """Every tensor the loss needs is given with shape ``[B]``, and none is given that it would silently ignore."""
    spec, h, described = loss.spec, loss.params, loss.described
    if not isinstance(pc, Tensor) or not pc.is_floating_point():
        raise TypeError("policy_chosen_logps must be a floating-point torch.Tensor of shape [B]")
    if pc.dim() != 1:
        raise ValueError(f"policy_chosen_logps has shape {tuple(pc.shape)}, expected [B]")
    batch_shape = pc.shape
    _check_vector("policy_rejected_logps", pr, batch_shape)

    refs_given = (rc is not None, rr is not None)
    if h.reference_free and any(refs_given):
        raise ConfigError("reference_free=True treats the reference log-probs as 0, but ref_chosen_logps/"
                          "ref_rejected_logps were given; drop one or the other")
    if not spec.needs_reference and not h.reference_free and any(refs_given):
        raise ConfigError(f"loss_type {described} is reference-free; the given ref_chosen_logps/ref_rejected_logps "
                          "would be ignored, so do not pass them")
    if spec.needs_reference:
        hint = "pass the reference model's summed log-probs, or set reference_free=True"
        _require(described, "ref_chosen_logps", refs_given[0], hint)
        _require(described, "ref_rejected_logps", refs_given[1], hint)
        _check_vector("ref_chosen_logps", rc, batch_shape)
        _check_vector("ref_rejected_logps", rr, batch_shape)

    if spec.needs_lengths:
        hint = "completion token counts; needed for length normalisation, the chosen NLL or WPO"
        _require(described, "chosen_lengths", lc is not None, hint)
        _require(described, "rejected_lengths", lr is not None, hint)
    for name, lengths in (("chosen_lengths", lc), ("rejected_lengths", lr)):
        if lengths is not None:
            _check_vector(name, lengths, batch_shape)
            # A zero-token completion has no per-token mean; the data pipeline must drop it, never divide by 1.
            if bool((lengths < 1).any()):
                raise ValueError(f"{name} must be >= 1 for every pair (empty completion at index "
                                 f"{int((lengths < 1).nonzero()[0, 0])})")

    if h.use_weighting:
        hint = "per-sequence sums of log p_t - log sum_v p_v^2 over completion tokens"
        _require(described, "chosen_weight_logps (use_weighting=True)", wc is not None, hint)
        _require(described, "rejected_weight_logps (use_weighting=True)", wr is not None, hint)
        _check_vector("chosen_weight_logps", wc, batch_shape)
        _check_vector("rejected_weight_logps", wr, batch_shape)
    elif wc is not None or wr is not None:
        raise ConfigError("chosen_weight_logps/rejected_weight_logps were given but use_weighting=False; they would "
                          "be ignored")


def _as_lengths(lengths: Tensor | None, like: Tensor) -> Tensor | None:
    # Integer counts divide into `like`'s dtype as they are (and reach a user callable as given); floating counts
    # are cast so that a wider dtype cannot widen the losses.
    if lengths is None or not lengths.is_floating_point() or lengths.dtype == like.dtype:
        return lengths
    return lengths.to(like.dtype)


def _scored_pairs(h: LossParams, pc: Tensor, pr: Tensor, rc: Tensor | None, rr: Tensor | None, lc: Tensor | None,
                  lr: Tensor | None) -> Pairs:
    """The Pairs the losses read: the reference (0 with reference_free), log-ratios and f-divergence scores."""
    if h.reference_free:
        rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
    if rc is not None:
        rho_c, rho_r = pc - rc, pr - rr
        scores = (_f_divergence_scores(rho_c, h.f_divergence_type, h.f_alpha_divergence_coef),
                  _f_divergence_scores(rho_r, h.f_divergence_type, h.f_alpha_divergence_coef))
    else:
        rho_c = rho_r = None
        scores = (None, None)
    return Pairs(pc, pr, rc, rr, rho_c, rho_r, *scores, _as_lengths(lc, pc), _as_lengths(lr, pr))


def _default_rewards(entry: _Entry, pairs: Pairs, beta: float) -> tuple[Tensor, Tensor]:
    if entry.needs_reference:
        return beta * pairs.chosen_logratios.detach(), beta * pairs.rejected_logratios.detach()
    # SimPO / ORPO convention: β times the per-token log-prob (the summed one where no lengths are given).
    per_token = [logps if n is None else logps / n for logps, n in
                 ((pairs.chosen_logps, pairs.chosen_lengths), (pairs.rejected_logps, pairs.rejected_lengths))]
    return beta * per_token[0].detach(), beta * per_token[1].detach()


def _term_output(term: _Term, pairs: Pairs, h: LossParams, extra: Mapping[str, Any]) -> LossOutput:
    """One loss type's per-pair losses, detached rewards and metrics, each ``[B]``."""
    entry = term.entry
    out = entry.fn(pairs, h, **extra) if entry.takes_extra else entry.fn(pairs, h)
    if not isinstance(out, LossOutput):
        losses, metrics = out if isinstance(out, tuple) else (out, {})
        out = LossOutput(losses, *_default_rewards(entry, pairs, h.beta), metrics)
    batch_shape = pairs.chosen_logps.shape
    for field_name in ("losses", "chosen_rewards", "rejected_rewards"):
        value = getattr(out, field_name)
        if not isinstance(value, Tensor) or value.shape != batch_shape:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            kind = "loss callable" if entry.takes_extra else "loss"
            raise ConfigError(f"{kind} {term.name!r} returned {field_name} of shape {shape}, expected "
                              f"{tuple(batch_shape)}")
    return LossOutput(out.losses, out.chosen_rewards.detach(), out.rejected_rewards.detach(), dict(out.metrics or {}))


def _mix_terms(loss: Loss, pairs: Pairs) -> tuple[Tensor, tuple[Tensor, Tensor], dict[str, Tensor]]:
    """``Σ_k w_k·ℓ_k`` over the loss types (MPO mixtures), the rewards of the first, and every term's metrics (each
    term's own losses as ``loss/<name>`` when there are several)."""
    total: Tensor | None = None
    rewards: tuple[Tensor, Tensor] | None = None
    metrics: dict[str, Tensor] = {}
    for term in loss.terms:
        out = _term_output(term, pairs, loss.params, loss.extra)
        if rewards is None:
            rewards = (out.chosen_rewards, out.rejected_rewards)
        metrics.update(out.metrics)
        if len(loss.terms) > 1:
            metrics[f"loss/{term.name}"] = out.losses.detach()
        total = term.weight * out.losses if total is None else total + term.weight * out.losses
    return total, rewards, metrics


def _apply_modifiers(h: LossParams, pairs: Pairs, total: Tensor, metrics: dict[str, Tensor], wc: Tensor | None,
                     wr: Tensor | None) -> Tensor:
    """RPO's ``rpo_alpha · NLL`` term, then the WPO weight (the order of TRL); logs ``nll`` whenever lengths are
    given and ``wpo_weight`` with ``use_weighting``."""
    len_c, len_r = pairs.chosen_lengths, pairs.rejected_lengths
    if len_c is not None:
        nll = -pairs.chosen_logps / len_c
        metrics["nll"] = nll.detach()
        if h.rpo_alpha is not None:
            total = total + h.rpo_alpha * nll
    if h.use_weighting:
        # Detached: WPO re-weights pairs, it does not train the policy to change its own weights.
        weight = (torch.exp(wc / len_c) * torch.exp(wr / len_r)).detach()
        metrics["wpo_weight"] = weight
        total = total * weight
    return total


# ----------------------------------------------------------------------------------------------------------------------
# One-call entry points
# ----------------------------------------------------------------------------------------------------------------------


def _loss_from(loss_type: LossType | Sequence[LossType], params: dict[str, Any]) -> Loss:
    """The Loss of keyword arguments: LossParams' fields make the params (checked as they are made), the other
    keywords go to user-supplied loss callables."""
    names = {f.name for f in dataclasses.fields(LossParams)}
    settings = {k: v for k, v in params.items() if k in names}
    extra = {k: v for k, v in params.items() if k not in names}
    return build(LossParams(loss_type=loss_type, **settings), **extra)


def loss_spec(loss_type: LossType | Sequence[LossType], **params: Any) -> LossSpec:
    """Check a loss configuration and say what the trainer must provide for it.

    Takes the loss parameters of :func:`preference_loss` (the fields of :class:`LossParams`, plus keywords for user
    callables) and raises :class:`~dpokit.errors.ConfigError` for an unknown name (listing the valid ones and the
    closest match) or a parameter that cannot work with the selected losses.

    A user callable needs a reference unless it has the attribute ``needs_reference = False``, and needs lengths
    only if it has ``needs_lengths = True``.

    Example: ``loss_spec("simpo")`` → ``LossSpec(needs_reference=False, needs_lengths=True, needs_weight_logps=False)``.
    """
    return _loss_from(loss_type, params).spec


# The tensors a Loss takes by keyword (lengths, WPO weights): preference_loss passes them on, the rest are params.
_TENSOR_KEYWORDS = tuple(name for name, p in inspect.signature(Loss.__call__).parameters.items()
                         if p.kind is p.KEYWORD_ONLY)


def preference_loss(
    loss_type: LossType | Sequence[LossType],
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    **keywords: Any,
) -> LossOutput:
    """Per-pair preference loss for B pairs: ``build(LossParams(loss_type, **params))(...)`` in one call.

    ``losses = W · (Σ_k w_k·ℓ_k + α_rpo·NLL)``, where ``ℓ_k`` is the k-th ``loss_type`` with weight ``w_k``
    (``loss_weights``, MPO-style; default all 1), ``NLL = −π_c/|y_c|`` and ``W`` the detached WPO weight (1 unless
    ``use_weighting``). Order and placement match TRL (RPO's NLL is added before the WPO weight, as TRL 0.x did;
    TRL 1.16 weights every component including ``sft``, which is the same thing).

    Args:
        loss_type: a registered name (see ``LOSS_TYPES``), a user callable, or a list of them (mixture).
        policy_chosen_logps, policy_rejected_logps: ``[B]`` policy log-probs summed over completion tokens.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` reference log-probs; required unless every loss is
            reference-free or ``reference_free=True`` (then the reference is the constant 0, as in TRL).
        chosen_lengths, rejected_lengths (keyword): ``[B]`` completion token counts (>= 1), for
            length-normalised losses, the chosen NLL and WPO. Giving them always is fine.
        chosen_weight_logps, rejected_weight_logps (keyword): with ``use_weighting`` (WPO, Zhou et al., arXiv 2406.11827,
            Eq. 2), ``[B]`` = ``Σ_t (log p_t − log Σ_v p_v²)`` over completion tokens: each pair's loss is multiplied
            by the detached ``exp(w_c/|y_c|)·exp(w_r/|y_r|)`` (the weight-alignment form TRL 1.16 uses; like TRL
            1.16 and unlike some TRL 0.x releases, the weight is not clamped at 1).
        other keywords: the fields of :class:`LossParams` (``beta``; ``label_smoothing`` ε for ``sigmoid`` (cDPO),
            ``robust``, ``exo_pair``, ``aot``/``aot_unpaired``, ``simpo``; ``rpo_alpha``, which adds
            ``rpo_alpha · NLL`` per pair (RPO, Pang et al., arXiv 2404.19733; the per-sequence token-mean over the
            chosen completion, where the paper normalises by prompt + completion length and TRL 0.x took one
            token-mean over the whole batch); ``simpo_gamma``; ``discopop_tau``; ``f_divergence_type`` and
            ``f_alpha_divergence_coef`` (see ``_f_divergence_scores``; only for losses built on the chosen−rejected
            score difference); ``use_weighting``; ...), and extra keywords, passed only to user callables.
            ``ld_alpha`` acts on token log-probs (:func:`ld_aggregate`), before this function.

    A user callable is called as ``fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
    ref_rejected_logps, *, beta, chosen_lengths, rejected_lengths, **extra)`` and returns a ``LossOutput`` or
    ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``.

    Returns:
        :class:`LossOutput` with ``[B]`` losses (not detached) and detached rewards of the first loss type.

    Raises:
        ConfigError: unknown loss name, a parameter that cannot work, or a required input that was not given.
        ValueError / TypeError: tensors of the wrong shape or type, or a completion length below 1.
    """
    tensors = {k: v for k, v in keywords.items() if k in _TENSOR_KEYWORDS}
    loss = _loss_from(loss_type, {k: v for k, v in keywords.items() if k not in _TENSOR_KEYWORDS})
    if loss.params.ld_alpha is not None:
        raise ConfigError("ld_alpha acts on per-token log-probs: pass ld_aggregate's sums to preference_loss "
                          "(or use the Loss of build(), whose sequence_logps applies it)")
    return loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, **tensors)
