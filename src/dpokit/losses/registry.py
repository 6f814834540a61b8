"""The loss registry: the types a loss reads and returns, and `register`, the one way a loss is added (every built-in
loss in `dpokit.losses.builtin` uses it too)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from dpokit.config import LossParams
from dpokit.errors import ConfigError

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


def from_code(spec: str) -> _Entry:
    """The loss a ``loss_type`` entry ``module:function`` or ``path/to/file.py:function`` names (the form a YAML file
    or the command line can hold), imported as judges are (`dpokit.plugins`).

    A function the module registered with :func:`register` (when it was imported) is that loss, with its name and
    needs. A plain function ``fn(pairs, params)`` is registered here under its attribute name with register's
    defaults (``needs_reference=True``, lengths not guaranteed): give a loss other needs with ``@register``. Either way the
    config keeps the spec, so a run's recorded config imports the same code again.
    """
    from dpokit import plugins

    fn = plugins.load_callable(spec, "loss_type")
    for entry in _REGISTRY.values():
        if entry.fn is fn:
            return entry
    _, name = plugins.split(spec)
    if name in _REGISTRY:
        raise ConfigError(f"loss_type {spec!r}: {name!r} is already a registered loss; rename the function or "
                          "register it under another name with @dpokit.losses.register(...)")
    register(name)(fn)
    return _REGISTRY[name]


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
