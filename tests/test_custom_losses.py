"""A user's own loss without editing dpokit, as a TRL user would add one: from Python (`dpokit.losses.register`),
from YAML / the command line (`loss_type: module:function` or `path/to/file.py:function`, alone or in a mixture),
resolved as judges are; and a TRL-style trainer subclass overriding a method dpokit never calls is refused."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import LLAMA2_TOKENIZER, refused, tiny_llama
from dpokit import DPOConfig, DPOTrainer, SFTTrainer, losses
from dpokit.config import build_config, config_from_args, parse_overrides
from dpokit.errors import ConfigError
from dpokit.losses import LOSS_TYPES, preference_loss

PAIRS = [{"prompt": f"Question {i}: is it good?", "chosen": " Yes, it is good.", "rejected": " No."} for i in range(4)]

PLAIN = """
import torch.nn.functional as F

def margin(pairs, params):
    # a plain function: registered on import under its name, with register's defaults (needs_reference=True)
    return -F.logsigmoid(params.beta * (pairs.chosen_logratios - pairs.rejected_logratios) - 0.5)
"""

REGISTERED = """
from dpokit import losses

@losses.register("per_token_gap", needs_reference=False, needs_lengths=True)
def gap(pairs, params):
    return -(pairs.chosen_logps / pairs.chosen_lengths - pairs.rejected_logps / pairs.rejected_lengths)
"""


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """Importing is process-wide: each test gets a copy of sys.path without the current directory (as the `dpokit`
    console script has it), and the modules it imported from its tmp_path are forgotten afterwards."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    yield
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


@pytest.fixture
def registry(monkeypatch, isolated):
    """Registering is process-wide too: each test gets a copy of the registry."""
    monkeypatch.setattr(losses.registry, "_REGISTRY", dict(losses.registry._REGISTRY))


def _write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_a_plain_function_from_a_file_is_a_loss(registry, tmp_path, monkeypatch):
    _write(tmp_path / "my_losses.py", PLAIN)
    monkeypatch.chdir(tmp_path)
    cfg = config_from_args(DPOConfig, DPOConfig(loss_type="./my_losses.py:margin"))  # as a trainer takes it
    assert cfg.loss_type == f"{tmp_path / 'my_losses.py'}:margin"  # recorded absolute, loadable from anywhere
    spec = losses.build(cfg).spec
    assert spec.needs_reference and not spec.needs_lengths and "margin" in LOSS_TYPES
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-10 * torch.rand(5, generator=g, dtype=torch.float64) for _ in range(4))
    out = preference_loss("./my_losses.py:margin", pc, pr, rc, rr, beta=0.3)
    torch.testing.assert_close(out.losses, -F.logsigmoid(0.3 * ((pc - rc) - (pr - rr)) - 0.5))
    torch.testing.assert_close(out.chosen_rewards, 0.3 * (pc - rc))
    # loaded once: the same function, so the same registered loss, however the file is named
    assert DPOConfig(loss_type=cfg.loss_type)._loss.terms[0].entry is cfg._loss.terms[0].entry


def test_a_registered_function_in_a_module_beside_the_user_keeps_its_name_and_needs(registry, tmp_path,
                                                                                    monkeypatch):
    _write(tmp_path / "gap_losses_a.py", REGISTERED)
    monkeypatch.chdir(tmp_path)
    cfg = build_config(DPOConfig, overrides={"loss_type": "sigmoid,gap_losses_a:gap", "loss_weights": "1,0.5"})
    assert cfg.loss_type == ["sigmoid", "gap_losses_a:gap"] and cfg.loss_weights == [1.0, 0.5]
    assert [t.name for t in cfg._loss.terms] == ["sigmoid", "per_token_gap"]
    assert cfg._loss.spec.needs_reference and cfg._loss.spec.needs_lengths
    alone = DPOConfig(loss_type="gap_losses_a:gap")._loss.spec
    assert not alone.needs_reference and alone.needs_lengths  # the needs it was registered with


def test_a_loss_that_cannot_be_had_is_one_line_naming_loss_type_before_any_model(registry, tmp_path, monkeypatch,
                                                                                 capsys):
    _write(tmp_path / "clash.py", "def sigmoid(pairs, params):\n    return pairs.chosen_logps\n")
    _write(tmp_path / "broken.py", "raise RuntimeError('no GPU here')\n")
    monkeypatch.chdir(tmp_path)
    cases = [("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
             ("./missing.py:fn", "no such file"),
             ("./clash.py:nothing", "has no function 'nothing'"),
             ("./clash.py:sigmoid", "'sigmoid' is already a registered loss"),
             ("./broken.py:fn", "raised RuntimeError: no GPU here")]
    for spec, needle in cases:
        with pytest.raises(ConfigError, match="^loss_type '.*" + needle.replace("(", r"\(")):
            DPOConfig(loss_type=["sigmoid", spec])
    with pytest.raises(ConfigError, match="loss_type: unknown 'sigmod'.*or your own as module:function"):
        DPOConfig(loss_type="sigmod")
    refused(capsys, ["dpo", "loss_type=no_such_module_xyz:fn", "train_file=none.jsonl"], "loss_type",
            "no_such_module_xyz")


def test_a_loss_file_trains_from_yaml_and_the_run_record_loads_it_again(registry, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from dpokit.cli import main

    base = tmp_path / "base"
    tiny_llama(vocab_size=32000).save_pretrained(base)
    AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER).save_pretrained(base)
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    _write(tmp_path / "my_losses.py", PLAIN)
    _write(tmp_path / "dpo.yaml", f"""
        model_name_or_path: {base}
        train_file: prefs.jsonl
        output_dir: run
        loss_type: [sigmoid, ./my_losses.py:margin]
        loss_weights: [1.0, 0.5]
        max_steps: 2
        logging_steps: 1
        save_steps: 0
        per_device_train_batch_size: 2
        disable_tqdm: true
        """)
    monkeypatch.chdir(tmp_path)
    assert main(["dpo", "--config", "dpo.yaml"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss/margin" in r and "loss/sigmoid" in r for r in records) == 2
    monkeypatch.chdir(tmp_path / "run")
    again = build_config(DPOConfig, "dpokit_config.yaml")
    assert again.loss_type == ["sigmoid", f"{tmp_path / 'my_losses.py'}:margin"]
    assert [t.name for t in again._loss.terms] == ["sigmoid", "margin"]


def test_judges_import_like_losses(isolated, tmp_path, monkeypatch):
    from dpokit.evaluate import load_judge

    (tmp_path / "judge_beside_a.py").write_text("def score(prompt, completion):\n    return float(len(completion))\n")
    monkeypatch.chdir(tmp_path)
    assert load_judge("judge_beside_a:score")(["p"], ["abc"]) == [3.0]  # a module in the current directory
    assert load_judge("./judge_beside_a.py:score")(["p"], ["ab"]) == [2.0]  # the same file by its path
    with pytest.raises(ConfigError, match="judge './nope.py:score': no such file"):
        load_judge("./nope.py:score")


class _DPOWithDpoLoss(DPOTrainer):
    def dpo_loss(self, *args, **kwargs):  # TRL 0.x's hook: dpokit never calls it
        raise AssertionError("never called")


class _SFTWithComputeLoss(SFTTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        raise AssertionError("never called")


def test_trl_method_overrides_dpokit_never_calls_are_refused_when_made(tmp_path):
    for cls, name in ((_DPOWithDpoLoss, "dpo_loss"), (_SFTWithComputeLoss, "compute_loss")):
        with pytest.raises(ConfigError, match=f"{cls.__name__}.{name} overrides a method of TRL's trainer that "
                                              "dpokit's .* never calls: add a loss with dpokit.losses.register"):
            cls(tiny_llama(), args={"output_dir": str(tmp_path / name)}, train_dataset=PAIRS)


def test_every_public_trl_trainer_method_is_dpokits_or_refused():
    """TRL 1.16's DPOTrainer and SFTTrainer as the oracle: each public method they define is either one dpokit's
    trainer has (so an override is called) or in the refused table; so are the older TRL hooks users override."""
    import trl

    from dpokit.compat import TRL_TRAINER_METHODS, refuse_trl_overrides

    for trl_cls, ours in ((trl.DPOTrainer, DPOTrainer), (trl.SFTTrainer, SFTTrainer)):
        public = [n for n, v in vars(trl_cls).items() if callable(v) and not n.startswith("_")]
        missing = [n for n in public if n not in TRL_TRAINER_METHODS and not hasattr(ours, n)]
        assert not missing, missing
    for name in ("dpo_loss", "get_batch_loss_metrics", "concatenated_forward", "compute_ref_log_probs"):
        assert name in TRL_TRAINER_METHODS and not hasattr(DPOTrainer, name)

    class Fine(DPOTrainer):  # overriding a method dpokit calls is the supported way
        def loss_and_metrics(self, batch, train):
            return super().loss_and_metrics(batch, train)

    refuse_trl_overrides(Fine)


def test_dpo_help_lists_the_loss_names(capsys):
    from dpokit.cli import main

    assert main(["dpo", "--help"]) == 0
    text = capsys.readouterr().out
    line = next(line for line in text.splitlines() if "loss names:" in line)
    assert all(name in text for name in LOSS_TYPES) and "sigmoid" in line


def test_the_readmes_custom_loss_works_from_python_and_from_yaml(registry, tmp_path, monkeypatch):
    """The README's example, as written there: the file, then its use from Python and from YAML."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "losses.register" in block)
    assert len(code.splitlines()) <= 15
    (tmp_path / "my_loss.py").write_text(code)
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text("loss_type: my_loss.py:margin_dpo\n")
    from_yaml = build_config(DPOConfig, recipe)
    import my_loss  # noqa: F401  (the Python way: importing registers it; the file is the module YAML loaded)

    from_python = DPOConfig(loss_type="margin_dpo")
    assert from_yaml._loss.terms[0].entry is from_python._loss.terms[0].entry
    x = torch.zeros(3, dtype=torch.float64)
    torch.testing.assert_close(preference_loss("margin_dpo", x, x, x, x).losses, -F.logsigmoid(x - 0.5))
    mixed = build_config(DPOConfig, overrides=parse_overrides(["--loss_type", "sigmoid,my_loss.py:margin_dpo"]))
    assert [t.name for t in mixed._loss.terms] == ["sigmoid", "margin_dpo"]
