"""The DPO/SFT trainers: hand-computed loss, the four reference modes, LoRA, in-memory models, config errors."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import LLAMA2_TOKENIZER, tiny_llama
from dpokit import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from dpokit.errors import ConfigError

PAIRS = [
    {"prompt": "The weather today is", "chosen": " sunny and warm.", "rejected": " cold, grey and wet."},
    {"prompt": "My favourite food is", "chosen": " fresh bread.", "rejected": " nothing at all."},
    {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5, probably"},
    {"prompt": "Say hello.", "chosen": "\nHello!", "rejected": "\nGo away."},
]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER)


def model(seed=0):
    return tiny_llama(vocab_size=32000, seed=seed)


def cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, learning_rate=1e-3, max_steps=2,
                logging_steps=1, save_steps=0, disable_tqdm=True, seed=0, beta=0.1)
    base.update(kw)
    return DPOConfig(**base)


def seq_logp(m, tok, prompt, completion):
    """Plain full-logits log p(completion | prompt) with the tokenization rule written out by hand."""
    p = tok(prompt).input_ids
    full = tok(prompt + completion).input_ids
    assert full[: len(p)] == p
    ids = torch.tensor([full + [tok.eos_token_id]])
    logits = m(input_ids=ids).logits[0, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).squeeze(1)
    return lp[len(p) - 1:].sum()


def test_first_loss_equals_hand_computed_dpo(tmp_path, tok):
    policy, ref = model(0), model(1)
    trainer = DPOTrainer(policy, ref_model=ref, args=cfg(tmp_path), train_dataset=PAIRS[:2], processing_class=tok)
    batch = trainer.collate(trainer.train_examples)
    loss_sum, weight, metrics = trainer.loss_and_metrics(batch, train=True)
    want = []
    with torch.no_grad():
        for row in PAIRS[:2]:
            pc, pr = seq_logp(policy, tok, row["prompt"], row["chosen"]), seq_logp(policy, tok, row["prompt"], row["rejected"])
            rc, rr = seq_logp(ref, tok, row["prompt"], row["chosen"]), seq_logp(ref, tok, row["prompt"], row["rejected"])
            want.append(-F.logsigmoid(0.1 * ((pc - rc) - (pr - rr))))
    want = torch.stack(want)
    assert weight == 2
    torch.testing.assert_close(loss_sum.detach() / weight, want.mean(), rtol=1e-5, atol=1e-6)
    assert metrics["loss"] == pytest.approx(float(want.mean()), rel=1e-5)


def first_losses(tmp_path, tok, name, **kw):
    trainer = DPOTrainer(model(0), args=cfg(tmp_path / name, **kw), train_dataset=PAIRS, processing_class=tok)
    batch = trainer.collate(trainer.train_examples[:2])
    with torch.no_grad():
        _, _, metrics = trainer.loss_and_metrics(batch, train=True)
    return trainer, metrics


def test_reference_modes_give_the_same_first_step_loss(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("DPOKIT_CACHE_DIR", str(tmp_path / "cache"))
    # Starting from the same weights, the policy equals its reference: every mode must see a zero margin, ln 2.
    results = {}
    for name, kw in {"copy": {}, "precomputed": {"precompute_ref_log_probs": True}}.items():
        results[name] = first_losses(tmp_path, tok, name, **kw)[1]["loss"]
    trainer = DPOTrainer(model(0), ref_model=model(0), args=cfg(tmp_path / "sep"), train_dataset=PAIRS,
                         processing_class=tok)
    with torch.no_grad():
        results["separate"] = trainer.loss_and_metrics(trainer.collate(trainer.train_examples[:2]), True)[2]["loss"]
    lora_trainer, m = first_losses(tmp_path, tok, "lora", use_peft=True, lora_r=4)
    results["adapter_off"] = m["loss"]
    for name, value in results.items():
        assert value == pytest.approx(math.log(2), abs=1e-6), name
    # And after a training step, the modes agree with each other on a *non-trivial* loss.
    assert type(lora_trainer.reference).__name__ == "AdapterOffReference"


def test_reference_modes_agree_after_training(tmp_path, tok, monkeypatch):
    """Train two steps with a frozen copy, then score the same batch with each reference mode."""
    monkeypatch.setenv("DPOKIT_CACHE_DIR", str(tmp_path / "cache"))
    t = DPOTrainer(model(0), args=cfg(tmp_path / "a"), train_dataset=PAIRS, processing_class=tok)
    t.train()
    batch = t.collate(t.train_examples)
    with torch.no_grad():
        copy_loss = t.loss_and_metrics(batch, True)[2]["loss"]
        t2 = DPOTrainer(t.model, ref_model=model(0), args=cfg(tmp_path / "b"), train_dataset=PAIRS,
                        processing_class=tok)
        sep_loss = t2.loss_and_metrics(batch, True)[2]["loss"]
        t3 = DPOTrainer(t.model, ref_model=model(0), args=cfg(tmp_path / "c", precompute_ref_log_probs=True),
                        train_dataset=PAIRS, processing_class=tok)
        pre_loss = t3.loss_and_metrics(batch, True)[2]["loss"]
    assert copy_loss < math.log(2) - 1e-4  # training moved the policy away from its reference
    assert sep_loss == pytest.approx(copy_loss, rel=1e-5)
    assert pre_loss == pytest.approx(copy_loss, rel=1e-5)


def test_precomputed_reference_is_cached_and_frees_the_model(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("DPOKIT_CACHE_DIR", str(tmp_path / "cache"))
    t = DPOTrainer(model(0), args=cfg(tmp_path / "a", precompute_ref_log_probs=True), train_dataset=PAIRS,
                   processing_class=tok)
    assert t._ref_module is None  # the reference copy is gone after precomputing
    files = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(files) == 1
    # Same model and data: the cache is hit (a poisoned entry proves it is read, not recomputed).
    from safetensors.torch import load_file, save_file

    table = load_file(str(files[0]))["ref_logps"]
    save_file({"ref_logps": table + 1.0}, str(files[0]))
    t2 = DPOTrainer(model(0), args=cfg(tmp_path / "b", precompute_ref_log_probs=True), train_dataset=PAIRS,
                    processing_class=tok)
    torch.testing.assert_close(t2.reference["train"].table, table + 1.0)
    # Other weights: another key, another file.
    DPOTrainer(model(3), args=cfg(tmp_path / "c", precompute_ref_log_probs=True), train_dataset=PAIRS,
               processing_class=tok)
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2


def test_lora_trains_only_adapters_and_adapter_off_equals_base(tmp_path, tok):
    base = model(0)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    t = DPOTrainer(base, args=cfg(tmp_path, use_peft=True, lora_r=4, learning_rate=1e-2), train_dataset=PAIRS,
                   processing_class=tok)
    t.train()
    changed_lora = 0
    for name, p in t.model.named_parameters():
        if "lora_" in name:
            changed_lora += int(p.requires_grad)
        else:
            clean = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p.detach(), before[clean]), name
    assert changed_lora > 0
    # The adapter-off reference is exactly the frozen starting model.
    batch = t.collate(t.train_examples)
    from dpokit.logps import completion_logps

    with torch.no_grad():
        off = t.reference.logps(batch)
        fresh = completion_logps(model(0), batch["input_ids"], batch["attention_mask"], batch["completion_mask"]).logps
        on = completion_logps(t.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]).logps
    torch.testing.assert_close(off, fresh)
    assert not torch.allclose(on, fresh)
    t.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_in_memory_model_trains_and_saves_loadable_model(tmp_path, tok):
    t = DPOTrainer(model(0), args=cfg(tmp_path, max_steps=3), train_dataset=PAIRS, eval_dataset=PAIRS[:2],
                   processing_class=tok)
    metrics = t.train().metrics
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "tokens_per_second"):
        assert key in metrics and math.isfinite(metrics[key]), key
    ev = t.evaluate()
    assert "eval_loss" in ev and "eval_rewards/accuracies" in ev
    out = t.save_model()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    for (n, a), b in zip(t.model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4  # steps 1, 2, 3 and the final eval


def test_gradient_accumulation_equals_big_batch(tmp_path, tok):
    # A large Adam epsilon makes the first update proportional to the gradient (plain Adam's first step is
    # sign(g), which flips on rounding noise in near-zero gradients and would hide what we compare).
    common = dict(max_steps=1, adam_epsilon=1.0, learning_rate=1.0)
    a = DPOTrainer(model(0), args=cfg(tmp_path / "a", per_device_train_batch_size=4, **common),
                   train_dataset=PAIRS, processing_class=tok)
    a.train()
    b = DPOTrainer(model(0), args=cfg(tmp_path / "b", per_device_train_batch_size=1, gradient_accumulation_steps=4,
                                      **common), train_dataset=PAIRS, processing_class=tok)
    b.train()
    for (n, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=n)


def test_sft_trainer_reduces_nll(tmp_path, tok):
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in PAIRS]
    args = SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4, learning_rate=5e-3,
                     max_steps=8, logging_steps=1, save_steps=0, disable_tqdm=True)
    t = SFTTrainer(model(0), args=args, train_dataset=rows, processing_class=tok)
    t.train()
    import json

    losses = [json.loads(l)["loss"] for l in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 1.0


def test_unknown_config_key_names_the_closest():
    from dpokit.config import build_config

    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        build_config(DPOConfig, overrides={"learnin_rate": "1e-4"})
    with pytest.raises(ConfigError, match="loss_type: unknown 'sigmod'.*'sigmoid'"):
        build_config(DPOConfig, overrides={"loss_type": "sigmod"})
    with pytest.raises(ConfigError, match="per_device_train_batch_size: expected an integer"):
        build_config(DPOConfig, overrides={"per_device_train_batch_size": "eight"})


def test_output_dir_with_a_run_is_refused(tmp_path, tok):
    t = DPOTrainer(model(0), args=cfg(tmp_path, max_steps=1), train_dataset=PAIRS, processing_class=tok)
    t.train()
    t2 = DPOTrainer(model(0), args=cfg(tmp_path, max_steps=1), train_dataset=PAIRS, processing_class=tok)
    with pytest.raises(ConfigError, match="already holds a run"):
        t2.train()


@pytest.mark.parametrize("extra", [
    {"padding_free": True},
    {"padding_free": True, "share_prompt": True},
    {"padding_free": True, "share_prompt": True, "precompute_ref_log_probs": True},
    # LoRA dropout draws its masks over the tensor layout, which packing changes: compare without it.
    {"padding_free": True, "share_prompt": True, "use_peft": True, "lora_r": 4, "lora_dropout": 0.0},
], ids=["packed", "shared_prompt", "shared_prompt+precomputed", "shared_prompt+lora"])
def test_padding_free_trainer_matches_padded(tmp_path, tok, monkeypatch, extra):
    """The packed paths through the real trainer: same losses and same final weights as the padded path."""
    import json

    monkeypatch.setenv("DPOKIT_CACHE_DIR", str(tmp_path / "cache"))
    base = {k: v for k, v in extra.items() if k in ("use_peft", "lora_r", "lora_dropout", "precompute_ref_log_probs")}
    runs = {}
    for name, kw in (("padded", base), ("fast", extra)):
        # adam_epsilon=1: updates proportional to the gradient, so rounding noise cannot flip Adam's sign(g) step.
        t = DPOTrainer(model(0), args=cfg(tmp_path / name, max_steps=3, adam_epsilon=1.0, learning_rate=1.0, **kw),
                       train_dataset=PAIRS, processing_class=tok)
        t.train()
        lines = (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()
        runs[name] = ([json.loads(l)["loss"] for l in lines], t.model.state_dict())
    assert runs["fast"][0] == pytest.approx(runs["padded"][0], rel=1e-5)
    for (n, a), b in zip(runs["padded"][1].items(), runs["fast"][1].values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=n)


def test_token_budget_gives_the_numbers_of_fixed_pair_batches(tmp_path, tok):
    """A token budget changes how a step's pairs are cut into micro-batches, not which pairs a step has: losses and
    weights equal the padded fixed-count path's, whatever the number of micro-batches."""
    import json

    from dpokit.packing import pair_tokens

    longest = max(pair_tokens(p, True) for p in DPOTrainer(model(0), args=cfg(tmp_path / "probe"),
                                                            train_dataset=PAIRS, processing_class=tok).train_examples)
    runs = {}
    variants = {
        "padded": dict(per_device_train_batch_size=4),
        # All four pairs in one packed micro-batch, and in as many micro-batches as the budget forces.
        "one_micro": dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, padding_free=True,
                          share_prompt=True, token_budget=10_000),
        "tight": dict(per_device_train_batch_size=1, gradient_accumulation_steps=4, padding_free=True,
                      share_prompt=True, token_budget=longest),
        "tight_unshared": dict(per_device_train_batch_size=4, padding_free=True, token_budget=2 * longest),
    }
    for name, kw in variants.items():
        t = DPOTrainer(model(0), args=cfg(tmp_path / name, max_steps=2, adam_epsilon=1.0, learning_rate=1.0, **kw),
                       train_dataset=PAIRS, processing_class=tok)
        passes = []
        step = t.training_step
        t.training_step = lambda micro, step=step: (passes.append(len(micro)), step(micro))[1]
        t.train()
        lines = (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()
        runs[name] = ([json.loads(l)["loss"] for l in lines], t.model.state_dict(), passes)
    assert runs["padded"][2] == [1, 1] and runs["one_micro"][2] == [1, 1]
    assert min(runs["tight"][2]) >= 2 and min(runs["tight_unshared"][2]) >= 2  # the budget really split the steps
    for name in variants:
        assert runs[name][0] == pytest.approx(runs["padded"][0], rel=1e-5), name
        for (n, a), b in zip(runs["padded"][1].items(), runs[name][1].values()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"{name}: {n}")


def test_token_budget_smaller_than_a_pair_is_refused_before_any_work(tmp_path, tok):
    with pytest.raises(ConfigError, match="token_budget needs padding_free"):
        DPOTrainer(model(0), args=cfg(tmp_path, token_budget=100), train_dataset=PAIRS, processing_class=tok)
    t = DPOTrainer(model(0), args=cfg(tmp_path, padding_free=True, token_budget=8), train_dataset=PAIRS,
                   processing_class=tok)
    with pytest.raises(ConfigError, match=r"needs \d+ packed tokens, more than token_budget=8"):
        t.train()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra", [{}, {"padding_free": True, "share_prompt": True, "token_budget": 64}],
                         ids=["padded", "packed"])
def test_torch_compile_gives_the_eager_numbers(tmp_path, tok, extra):
    """Compiled decoder layers (aot_eager: torch.compile's graph capture and autograd, without a C++ toolchain) give
    the eager losses and weights, over batches of changing shapes."""
    import json

    runs = {}
    for name, kw in (("eager", {}), ("compiled", {"torch_compile": True, "torch_compile_backend": "aot_eager"})):
        t = DPOTrainer(model(0), args=cfg(tmp_path / name, max_steps=2, adam_epsilon=1.0, learning_rate=1.0,
                                          **extra, **kw), train_dataset=PAIRS, processing_class=tok)
        t.train()
        lines = (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()
        runs[name] = ([json.loads(l)["loss"] for l in lines], t.model.state_dict())
    compiled = [m for m in runs["compiled"][1]]
    assert compiled and runs["compiled"][0] == pytest.approx(runs["eager"][0], rel=1e-5)
    for (n, a), b in zip(runs["eager"][1].items(), runs["compiled"][1].values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=n)


def test_tensorboard_sink_and_truncation_counts(tmp_path, tok):
    """report_to=tensorboard writes event files; rows whose completion would vanish are dropped and counted."""
    long_prompt = {"prompt": "word " * 60, "chosen": " yes.", "rejected": " no."}
    t = DPOTrainer(model(0), args=cfg(tmp_path, report_to="tensorboard", max_length=24, max_steps=1),
                   train_dataset=PAIRS + [long_prompt], processing_class=tok)
    assert t.data_reports["train"].dropped == 1 and len(t.train_examples) == len(PAIRS)
    t.train()
    assert list((tmp_path / "run" / "runs").glob("*/events.out.tfevents.*"))  # transformers' default logging_dir
    import json

    assert json.loads((tmp_path / "run" / "data_report.json").read_text())["train"]["dropped"] == 1


def test_displacement_watch_speaks_once_per_episode():
    from dpokit.trainer import DisplacementWatch

    watch = DisplacementWatch(window=3)
    said = [watch.update({"logratios/chosen": -10.0 - i, "rewards/margins": 0.1 * i}) for i in range(6)]
    assert [bool(m) for m in said] == [False, False, False, True, False, False]
    assert "likelihood displacement" in said[3] and "-10.000 -> -13.000" in said[3]
    # A rising chosen log-ratio ends the episode; a new fall speaks again.
    assert watch.update({"logratios/chosen": 0.0, "rewards/margins": 1.0}) is None
    later = [watch.update({"logratios/chosen": -1.0 - i, "rewards/margins": 1.0 + i}) for i in range(3)]
    assert later[-1] is not None
    assert DisplacementWatch().update({"loss": 0.5}) is None  # SFT logs: nothing to watch


def test_displacement_warning_is_logged_and_written(tmp_path, tok, monkeypatch, capsys):
    import json

    from dpokit import trainer as T

    monkeypatch.setattr(T.DisplacementWatch, "update", lambda self, metrics: "chosen log-probs fell (test)")
    t = DPOTrainer(model(0), args=cfg(tmp_path, max_steps=2), train_dataset=PAIRS, processing_class=tok)
    t.train()
    assert "warning at step 1: chosen log-probs fell (test)" in capsys.readouterr().out
    lines = [json.loads(l) for l in (tmp_path / "run" / "warnings.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2] and lines[0]["kind"] == "likelihood_displacement"


def test_report_to_wandb_logs_as_transformers_does(tmp_path, tok, monkeypatch):
    """report_to=wandb: one W&B run (project from WANDB_PROJECT, name run_name, the config), every logged record
    under transformers' names (train/..., eval/...) at its step, finished at the end. W&B itself is replaced by a
    recorder: the test checks what dpokit hands it."""
    import importlib.machinery
    import sys
    import types

    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", step, dict(data)))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_PROJECT", "dpo-tests")
    t = DPOTrainer(model(0), args=cfg(tmp_path, report_to="wandb", run_name="r1", max_steps=2),
                   train_dataset=PAIRS, eval_dataset=PAIRS[:2], processing_class=tok)
    t.train()
    init = calls[0]
    assert init[0] == "init" and init[1]["project"] == "dpo-tests" and init[1]["name"] == "r1"
    assert init[1]["config"]["report_to"] == "wandb" and calls[-1] == ("finish",)
    logs = [c for c in calls if c[0] == "log"]
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [c[1] for c in logs] == [r["step"] for r in recs]
    assert "train/loss" in logs[0][2] and "train/rewards/margins" in logs[0][2] and "eval/loss" in logs[-1][2]
    assert logs[0][2]["train/loss"] == pytest.approx(recs[0]["loss"], rel=1e-6)


def test_report_to_wandb_without_the_package_is_named(monkeypatch):
    import importlib.util

    from dpokit.config import build_config
    from dpokit.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"report_to: wandb needs the wandb package \(pip install wandb\)"):
        build_config(DPOConfig, overrides={"report_to": "wandb"})


@pytest.mark.parametrize("extra", [
    {"padding_free": True},
    {"padding_free": True, "completion_only_loss": False},
    {"padding_free": True, "token_budget": 40, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4},
], ids=["packed", "packed_every_token", "token_budget"])
def test_sft_padding_free_matches_padded(tmp_path, tok, extra):
    """SFT with padding_free (and a token budget): the padded run's losses and final weights."""
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "completion": f" It is {2 * i}." + " Yes" * i}
            for i in range(8)]
    base = {k: v for k, v in extra.items() if k == "completion_only_loss"}
    runs = {}
    for name, kw in (("padded", {**base, "per_device_train_batch_size": 4}), ("fast", extra)):
        args = SFTConfig(output_dir=str(tmp_path / name), max_steps=2, logging_steps=1, save_steps=0,
                         disable_tqdm=True, seed=0, adam_epsilon=1.0, learning_rate=1.0,
                         **{"per_device_train_batch_size": 4, **kw})
        t = SFTTrainer(model(0), args=args, train_dataset=rows, processing_class=tok)
        passes = []
        step = t.training_step
        t.training_step = lambda micro, step=step: (passes.append(len(micro)), step(micro))[1]
        t.train()
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        runs[name] = ([json.loads(line)["loss"] for line in lines], t.model.state_dict(), passes)
    if "token_budget" in extra:
        assert min(runs["fast"][2]) >= 2  # the budget really split the steps
    assert runs["fast"][0] == pytest.approx(runs["padded"][0], rel=1e-5)
    for (n, a), b in zip(runs["padded"][1].items(), runs["fast"][1].values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=n)


def test_ld_alpha_logs_the_scores_the_loss_reads(tmp_path, tok):
    """With ld_alpha, logps/chosen and logps/rejected are the length-desensitised sums (as TRL logs them)."""
    from dpokit.packing import batch_logps

    t = DPOTrainer(model(0), args=cfg(tmp_path, ld_alpha=0.5), train_dataset=PAIRS, processing_class=tok)
    batch = t.collate(t.train_examples[:3])
    _, _, metrics = t.loss_and_metrics(batch, train=False)
    with torch.no_grad():
        out = batch_logps(t.model, batch)
    scores = t.loss.sequence_logps(out)
    assert metrics["logps/chosen"] == pytest.approx(float(scores[:3].mean()), rel=1e-5)
    assert metrics["logps/rejected"] == pytest.approx(float(scores[3:].mean()), rel=1e-5)
    plain = (float(out.logps[:3].mean()), float(out.logps[3:].mean()))  # the longer side is desensitised
    assert (metrics["logps/chosen"], metrics["logps/rejected"]) != pytest.approx(plain, rel=1e-3)


def test_an_epochs_short_last_step_is_the_same_with_a_token_budget(tmp_path, tok):
    """3 pairs, 2 per step: the epoch ends with a step of one pair, padded or packed by a token budget alike."""
    runs = {}
    for name, kw in (("padded", {}), ("budget", dict(padding_free=True, token_budget=4096))):
        t = DPOTrainer(model(0), args=cfg(tmp_path / name, max_steps=-1, num_train_epochs=1,
                                          per_device_train_batch_size=1, gradient_accumulation_steps=2,
                                          adam_epsilon=1.0, learning_rate=1.0, **kw),
                       train_dataset=PAIRS[:3], processing_class=tok)
        t.train()
        recs = [json.loads(line) for line in (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()]
        runs[name] = ([(r["step"], r["epoch"], r["loss"]) for r in recs], t.model.state_dict())
    # epoch: epochs completed, as transformers logs it (2 of the 3 micro-batches, then all), alike with the budget.
    assert [s for s, _, _ in runs["padded"][0]] == [1, 2] and [e for _, e, _ in runs["padded"][0]] == [0.66666667, 1]
    assert [e for _, e, _ in runs["budget"][0]] == [0.66666667, 1]
    assert [x[2] for x in runs["budget"][0]] == pytest.approx([x[2] for x in runs["padded"][0]], rel=1e-5)
    for (n, a), b in zip(runs["padded"][1].items(), runs["budget"][1].values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=n)
