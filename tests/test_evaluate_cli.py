"""`dpokit eval` end to end on tiny saved models, and the judge specs (accepted and rejected)."""

import json

import pytest
import torch

from conftest import refused
from dpokit.cli import main
from dpokit.errors import ConfigError
from dpokit.evaluate import evaluate_model, load_judge, pair_metrics


def positive_words(prompt, completion):
    """A test judge: counts the word 'good'."""
    return float(completion.split().count("good"))


def not_a_float(prompt, completion):
    return "high"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from dpokit.demo import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("models")
    tok = build_tokenizer()
    for name, seed in (("policy", 1), ("ref", 2)):
        build_model(tok, seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PAIRS = [{"prompt": "one morning , the baker went to the market .", "chosen": " it was wonderful .",
          "rejected": " it was terrible ."},
         {"prompt": "late at night , my uncle visited the river .", "chosen": " he felt happy .",
          "rejected": " he felt sad ."}]


def test_eval_pairs_equal_hand_computed(models, tmp_path):
    """Accuracy and margins from `dpokit eval` equal beta * log-ratio differences computed by hand."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    result = evaluate_model(models / "policy", ref_path=models / "ref", pairs=pairs, beta=0.5,
                            output_dir=tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(models / "policy")

    def logp(m, prompt, completion):
        p = tok(prompt).input_ids
        ids = torch.tensor([tok(prompt + completion).input_ids + [tok.eos_token_id]])
        lp = torch.log_softmax(m(input_ids=ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None]).squeeze(1)
        return float(lp[len(p) - 1:].sum())

    pol, ref = (AutoModelForCausalLM.from_pretrained(models / n) for n in ("policy", "ref"))
    with torch.no_grad():
        vals = [[logp(m, r["prompt"], r[k]) for r in PAIRS] for m in (pol, ref) for k in ("chosen", "rejected")]
    want = pair_metrics(*vals, beta=0.5)
    got = result["pairs"]
    for key in ("accuracy", "margin", "chosen_reward", "rejected_reward", "policy_chosen_logps"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert (tmp_path / "out" / "eval.json").is_file() and "Held-out pairs" in (tmp_path / "out" / "eval.md").read_text()


def test_eval_cli_samples_with_python_judge(models, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in PAIRS])
    rc = main(["eval", "--model", str(models / "policy"), "--ref", str(models / "ref"), "--prompts", str(prompts),
               "--judge", "test_evaluate_cli:positive_words", "--num_samples", "3", "--max_new_tokens", "8",
               "--output_dir", str(tmp_path / "o")])
    assert rc == 0
    result = json.loads((tmp_path / "o" / "eval.json").read_text())
    s = result["samples"]
    assert 0 <= s["win_rate"] <= 1 and s["num_samples"] == 3 and len(s["examples"]) == 2
    assert s["kl"] == s["kl"]  # a number, not NaN
    assert "Win rate" in capsys.readouterr().out


def test_judge_specs(models, tmp_path):
    assert load_judge("test_evaluate_cli:positive_words")(["p"], ["good good"]) == [2.0]
    bad = [("", "empty spec"), ("nonexistent_module_xyz:f", "cannot import module"),
           ("test_evaluate_cli:missing", "has no function"), ("just-words", "not 'implicit'"),
           (f"rm:{models / 'policy'}", "not a ...ForSequenceClassification"), ("rm:/no/such/dir", "no config.json"),
           ("implicit", "needs the policy and its reference")]
    for spec, needle in bad:
        with pytest.raises(ConfigError, match=needle):
            load_judge(spec)
    with pytest.raises(ConfigError, match="must return a finite float"):
        load_judge("test_evaluate_cli:not_a_float")(["p"], ["c"])


def test_reward_model_judge(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from dpokit.demo import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                                    num_hidden_layers=1, num_attention_heads=2, num_labels=1,
                                                    pad_token_id=tok.pad_token_id))
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    scores = load_judge(f"rm:{tmp_path / 'rm'}")(["one morning ,", "at dawn ,"], [" it was good .", " it was bad ."])
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)
    with torch.no_grad():
        want = rm(**tok(["one morning , it was good ."], return_tensors="pt")).logits[0, 0].item()
    assert scores[0] == pytest.approx(want, rel=1e-5)


def test_eval_markdown_warns_about_length_exploitation():
    from dpokit.evaluate import eval_markdown

    samples = {"num_prompts": 2, "num_samples": 1, "judge": "j", "temperature": 1.0, "top_p": 1.0, "seed": 0,
               "policy_score": 1.0, "policy_score_se": 0.1, "reference_score": 0.5, "reference_score_se": 0.1,
               "policy_mean_tokens": 30.0, "reference_mean_tokens": 10.0, "win_rate": 0.9, "win_rate_se": 0.1,
               "kl": 2.0, "kl_se": 0.2, "examples": []}
    text = eval_markdown({"model": "m", "reference": "r", "beta": 0.1, "samples": samples})
    assert "3.0x as long as the reference's (length exploitation" in text
    samples["policy_mean_tokens"] = 12.0
    assert "length exploitation" not in eval_markdown({"model": "m", "reference": "r", "beta": 0.1, "samples": samples})


def test_eval_of_a_missing_model_says_it_is_missing(tmp_path, capsys):
    rc = main(["eval", "--model", str(tmp_path / "nope"), "--pairs", str(tmp_path / "p.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and f"model '{tmp_path / 'nope'}': no such directory" in err


def test_unreadable_eval_inputs_are_one_line(models, tmp_path, capsys):
    """A damaged run config, prompts file or reward-model config: exit 2, one line naming the file (and line)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "dpokit_config.yaml").write_bytes(b"model_name_or_path: base\nbeta: [0.1\n")
    refused(capsys, ["eval", "--model", run, "--pairs", tmp_path / "p.jsonl"],
            f"{run / 'dpokit_config.yaml'}:3: invalid YAML", unchanged=[run / "dpokit_config.yaml"])
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    common = ["eval", "--model", models / "policy", "--ref", models / "ref", "--output_dir", tmp_path / "o"]
    refused(capsys, [*common, "--prompts", deep, "--judge", "test_evaluate_cli:positive_words"],
            f"{deep}:1: JSON nested too deeply to read", unchanged=[deep])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in PAIRS])
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "config.json").write_bytes(b'{"architectures": ["LlamaForSequenceClassification"],\n')
    refused(capsys, [*common, "--prompts", prompts, "--judge", f"rm:{rm}"],
            f"{rm / 'config.json'}:2: invalid JSON", unchanged=[rm / "config.json", prompts])
    assert not (tmp_path / "o").exists()


def test_eval_checks_the_judge_and_the_prompts_before_loading_any_model(tmp_path, capsys):
    """Model directories with nothing in them: loading would fail, so each refusal here came first."""
    for name in ("policy", "ref"):
        (tmp_path / name).mkdir()
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a"}])
    common = ["eval", "--model", tmp_path / "policy", "--ref", tmp_path / "ref", "--output_dir", tmp_path / "o",
              "--prompts"]
    refused(capsys, [*common, prompts, "--judge", "no_such_judge_module:score"],
            "judge 'no_such_judge_module:score': cannot import module 'no_such_judge_module'")
    refused(capsys, [*common, prompts, "--judge", "test_evaluate_cli:missing"], "has no function 'missing'")
    refused(capsys, [*common, prompts, "--judge", f"rm:{tmp_path / 'policy'}"], "has no config.json")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a"}, {"prompt": 3}])
    refused(capsys, [*common, bad, "--judge", "implicit"], f"{bad}:2", "prompt")
    assert not (tmp_path / "o").exists()


def test_save_samples_keeps_every_sample_in_eval_json(models, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in PAIRS])
    rc = main(["eval", "--model", str(models / "policy"), "--ref", str(models / "ref"), "--prompts", str(prompts),
               "--judge", "test_evaluate_cli:positive_words", "--num_samples", "3", "--max_new_tokens", "6",
               "--output_dir", str(tmp_path / "o"), "--save_samples", str(tmp_path / "samples.jsonl")])
    assert rc == 0
    s = json.loads((tmp_path / "o" / "eval.json").read_text())["samples"]
    saved = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(s["all_samples"]) == len(saved) == 6 and len(s["examples"]) == 2
    for kept, row in zip(s["all_samples"], saved):
        assert kept == {k: v for k, v in row.items() if k not in ("model", "reference_model", "eval_dir")}
    assert [(r["prompt_index"], r["sample"]) for r in s["all_samples"]] == [(i, j) for i in range(2) for j in range(3)]
    assert sum(r["policy_score"] for r in s["all_samples"]) / 6 == pytest.approx(s["policy_score"])
    # Without --save_samples eval.json holds the summary and the examples only.
    main(["eval", "--model", str(models / "policy"), "--ref", str(models / "ref"), "--prompts", str(prompts),
          "--judge", "test_evaluate_cli:positive_words", "--num_samples", "1", "--max_new_tokens", "4",
          "--output_dir", str(tmp_path / "o2")])
    assert "all_samples" not in json.loads((tmp_path / "o2" / "eval.json").read_text())["samples"]


def test_eval_reports_ties_and_a_displacement_only_beyond_its_error(models, tmp_path):
    """The policy against itself: every pair tied (accuracy 0, as training counts it), a log-ratio of exactly 0 and
    no displacement note."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    p = evaluate_model(models / "policy", ref_path=models / "ref", pairs=pairs, output_dir=tmp_path / "a")["pairs"]
    assert p["ties"] == 0 and p["chosen_logratio"] == pytest.approx(p["policy_chosen_logps"] - p["ref_chosen_logps"])
    import shutil

    shutil.copytree(models / "policy", tmp_path / "same")
    same = evaluate_model(models / "policy", ref_path=tmp_path / "same", pairs=pairs, output_dir=tmp_path / "b")
    assert (same["pairs"]["accuracy"], same["pairs"]["ties"], same["pairs"]["chosen_logratio"]) == (0.0, 2, 0.0)
    md = (tmp_path / "b" / "eval.md").read_text()
    assert "| pairs tied (margin exactly 0) | 2 |" in md and "displacement" not in md
