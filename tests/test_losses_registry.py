"""The loss registry as a public API: `dpokit.losses.register` adds a loss that DPOConfig, the trainer and the loss
list know like a built-in one; `LossParams` / `build` make a run's loss once, and per call only tensors are checked."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import LLAMA2_TOKENIZER, tiny_llama
from dpokit import DPOConfig, DPOTrainer, losses
from dpokit.config import build_config
from dpokit.errors import ConfigError
from dpokit.losses import LOSS_TYPES, LossParams, Pairs, build, ld_aggregate, preference_loss, register

PAIRS = [{"prompt": f"Review {i}: the film was", "chosen": " great fun, I loved it.",
          "rejected": " dull and far too long."} for i in range(4)]


@pytest.fixture
def registry(monkeypatch):
    """`register` adds to the process-wide registry; each test gets a copy, so other tests' loss lists stay as
    they are."""
    monkeypatch.setattr(losses.registry, "_REGISTRY", dict(losses.registry._REGISTRY))


def _needs_margin(params: LossParams) -> str | None:
    return None if params.simpo_gamma >= 0 else "needs simpo_gamma >= 0 (a target margin)"


def _register_margin_sigmoid(calls: list | None = None) -> None:
    @register("margin_sigmoid", reads=("simpo_gamma",), check=_needs_margin)
    def margin_sigmoid(pairs: Pairs, params: LossParams):
        if calls is not None:
            calls.append(pairs.chosen_logps.shape[0])
        margin = pairs.chosen_logratios - pairs.rejected_logratios
        return -F.logsigmoid(params.beta * margin - params.simpo_gamma)


def test_a_registered_loss_is_a_loss_type_everywhere(registry):
    assert "margin_sigmoid" not in LOSS_TYPES
    _register_margin_sigmoid()
    assert "margin_sigmoid" in LOSS_TYPES and LOSS_TYPES[-1] == "margin_sigmoid"  # the imported name is live
    assert DPOConfig(loss_type="margin_sigmoid", simpo_gamma=0.2).loss_type == "margin_sigmoid"
    assert build_config(DPOConfig, overrides={"loss_type": "[sigmoid, margin_sigmoid]",
                                              "loss_weights": "[1, 0.5]"}).loss_weights == [1.0, 0.5]
    with pytest.raises(ConfigError, match=r"loss_type 'margin_sigmoid' needs simpo_gamma >= 0 \(a target margin\)"):
        DPOConfig(loss_type="margin_sigmoid", simpo_gamma=-1.0)
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-10 * torch.rand(5, generator=g, dtype=torch.float64) for _ in range(4))
    out = preference_loss("margin_sigmoid", pc, pr, rc, rr, beta=0.3, simpo_gamma=0.2)
    torch.testing.assert_close(out.losses, -F.logsigmoid(0.3 * ((pc - rc) - (pr - rr)) - 0.2))
    torch.testing.assert_close(out.chosen_rewards, 0.3 * (pc - rc))  # the reference-based reward convention


def test_a_registered_loss_trains_through_the_trainer(registry, tmp_path):
    from transformers import AutoTokenizer

    calls = []
    _register_margin_sigmoid(calls)
    args = DPOConfig(output_dir=str(tmp_path), loss_type="margin_sigmoid", simpo_gamma=0.1, beta=0.1,
                     learning_rate=3e-3, max_steps=3, per_device_train_batch_size=4, logging_steps=1, save_steps=0,
                     disable_tqdm=True, seed=0)
    trainer = DPOTrainer(tiny_llama(vocab_size=32000), args=args, train_dataset=PAIRS,
                         processing_class=AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER))
    assert trainer.spec.needs_reference and trainer.reference is not None
    last = trainer.train().metrics
    assert calls == [4, 4, 4] and math.isfinite(last["loss"])  # one micro-batch of 4 pairs per step
    assert (tmp_path / "dpokit_config.yaml").read_text().count("loss_type: margin_sigmoid") == 1


def test_register_refuses_a_name_twice_and_unknown_parameters(registry):
    _register_margin_sigmoid()
    with pytest.raises(ConfigError, match="loss 'margin_sigmoid' is already registered"):
        _register_margin_sigmoid()
    with pytest.raises(ConfigError, match="loss 'sigmoid' is already registered"):
        register("sigmoid")(lambda pairs, params: pairs.chosen_logps)
    with pytest.raises(ConfigError, match="reads names 'gamma', which are not loss parameters"):
        register("other", reads=("gamma",))
    with pytest.raises(ConfigError, match="a loss name must be a non-empty string"):
        register("")


def test_a_registered_loss_returning_the_wrong_shape_is_named(registry):
    register("half")(lambda pairs, params: pairs.chosen_logps[:2])
    x = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(ConfigError, match=r"loss 'half' returned losses of shape \(2,\), expected \(4,\)"):
        preference_loss("half", x, x, x, x)


def test_a_loss_is_built_once_and_calls_check_only_tensors(monkeypatch):
    params = LossParams(loss_type="ipo", beta=0.5, ld_alpha=0.5)
    loss = build(params)
    assert build(params) is loss  # checked when made; not again while unchanged
    checks = []
    monkeypatch.setattr(losses.core, "_check_terms", lambda *a: checks.append(a))
    x = torch.zeros(3, dtype=torch.float64)
    lengths = torch.ones(3, dtype=torch.long)
    loss(x, x, x, x, chosen_lengths=lengths, rejected_lengths=lengths)
    assert checks == []
    with pytest.raises(ValueError, match="ref_chosen_logps has shape"):
        loss(x, x, x[:2], x, chosen_lengths=lengths, rejected_lengths=lengths)
    params.beta = 0.7  # changed by hand: checked (and built) again
    assert build(params) is not loss and len(checks) == 1


def test_sequence_logps_is_the_sum_or_ld_dpos(monkeypatch):
    from dpokit.logps import CompletionLogps

    g = torch.Generator().manual_seed(0)
    token_logps = -torch.rand(4, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1]]).bool()
    lengths = mask.sum(1)
    out = CompletionLogps(logps=(token_logps * mask).sum(1), lengths=lengths, token_logps=token_logps, mask=mask)
    assert build(LossParams()).sequence_logps(out) is out.logps
    public = torch.minimum(lengths[:2], lengths[2:]).repeat(2)
    torch.testing.assert_close(build(LossParams(ld_alpha=0.3)).sequence_logps(out),
                               ld_aggregate(token_logps, mask, public, 0.3))


def test_loss_params_are_checked_when_made():
    with pytest.raises(ConfigError, match=r"beta must be > 0 \(got -1\)"):
        LossParams(beta=-1)
    with pytest.raises(ConfigError, match=r"ld_alpha must be in \[0, 1\] or null \(got 2\)"):
        LossParams(ld_alpha=2)
    with pytest.raises(ConfigError, match="ld_alpha acts on per-token log-probs"):
        x = torch.zeros(2)
        preference_loss("sigmoid", x, x, x, x, ld_alpha=0.5)
    with pytest.raises(ConfigError, match=r"unknown loss parameter\(s\) simpo_gama \(did you mean 'simpo_gamma'\?\)"):
        losses.loss_spec("simpo", simpo_gama=1.0)


@pytest.mark.parametrize("loss_type, smoothing, ok", [
    ("exo_pair", 0.5, True),  # TRL 1.16 accepts it too (it only refuses 0 for exo_pair)
    ("exo_pair", 0.0, False),
    ("robust", 0.5, False),
    ("robust", 0.49, True),
    ("sigmoid", 0.5, True),
    ("sigmoid", 0.51, False),
])
def test_config_and_losses_agree_on_label_smoothing(loss_type, smoothing, ok):
    def attempts():
        yield lambda: DPOConfig(loss_type=loss_type, label_smoothing=smoothing)
        yield lambda: losses.loss_spec(loss_type, label_smoothing=smoothing)

    for attempt in attempts():
        if ok:
            attempt()
        else:
            with pytest.raises(ConfigError, match="label_smoothing"):
                attempt()
