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

from dpokit.config import F_DIVERGENCE_TYPES, LossParams
from dpokit.losses import builtin  # noqa: F401 (registers the built-in losses)
from dpokit.losses.core import Loss, LossType, build, ld_aggregate, loss_spec, preference_loss
from dpokit.losses.registry import LOSS_TYPES, LossFunction, LossOutput, LossSpec, Pairs, register

__all__ = [
    "F_DIVERGENCE_TYPES",
    "LOSS_TYPES",
    "Loss",
    "LossFunction",
    "LossOutput",
    "LossParams",
    "LossSpec",
    "LossType",
    "Pairs",
    "build",
    "ld_aggregate",
    "loss_spec",
    "preference_loss",
    "register",
]
