"""The configured loss: the losses a run selected, resolved and checked once (`build` -> `Loss`), then per call the
scored pairs (log-ratios, f-divergence scores), the weighted mixture of terms and the modifiers common to all losses
(RPO's NLL term, WPO weights); and the one-call entry points `preference_loss` and `loss_spec`."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from dpokit import plugins
from dpokit.config import LossParams
from dpokit.settings import declared_range, ensure_checked
from dpokit.errors import ConfigError
from dpokit.losses import registry
from dpokit.losses.registry import LOSS_TYPES, LossOutput, LossSpec, Pairs, _Entry

if TYPE_CHECKING:
    from dpokit.logps import CompletionLogps


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
    return ConfigError(f"loss_type: unknown {name!r}{hint}; valid: {', '.join(LOSS_TYPES)}, or your own as "
                       "module:function or path/to/file.py:function")


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
            if item in registry._REGISTRY:
                entry = registry._REGISTRY[item]
            elif plugins.split(item) is not None:
                entry = registry.from_code(item)
            else:
                raise _unknown_name_error(item)
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
        readers = [n for n, e in registry._REGISTRY.items() if "label_smoothing" in e.reads]
        raise ConfigError(f"label_smoothing={h.label_smoothing} has no effect on loss_type {described}; it is read by "
                          f"{', '.join(readers)}")
    if h.f_divergence_type != "reverse_kl":
        unsupported = [t.name for t in terms if not t.entry.f_divergence]
        if unsupported:
            valid = [n for n, e in registry._REGISTRY.items() if e.f_divergence]
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
        if pairs.chosen_logratios is not None and not self.params.reference_free:
            # Per pair, against the reference: the likelihood-displacement watch reads its mean, which (unlike the
            # batch's mean log-prob) does not move with how long this batch's completions happen to be.
            metrics["logratios/chosen"] = pairs.chosen_logratios.detach()
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
