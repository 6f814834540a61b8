"""`dpokit demo`: the grammar, the tokenizer, and one quick run whose measured numbers must show DPO working."""

import json
import random

import pytest

from dpokit import demo


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return demo.run_demo(output_dir=str(out), seed=0, quick=True), out


def test_reward_reads_only_the_lexicon():
    assert demo.sentiment_reward(" it was wonderful and he felt happy .") == 1.0
    assert demo.sentiment_reward(" it was terrible and he felt happy .") == 0.5
    assert demo.sentiment_reward(" what a bad day ! he cried and felt calm .") == pytest.approx(1 / 3)
    assert demo.sentiment_reward(" the road was long .") == 0.5  # no sentiment word: the midpoint
    assert demo.sentiment_reward("") == 0.5
    assert not demo.POSITIVE_WORDS & demo.NEGATIVE_WORDS


def test_contrast_pairs_differ_only_in_sentiment():
    for slot in demo.POSITIVE:  # a pair swaps each word for the one at the same position on the other side
        assert len(demo.POSITIVE[slot]) == len(demo.NEGATIVE[slot])
    rng = random.Random(0)
    for prompt in demo.all_prompts()[:200]:
        chosen, rejected = demo.contrast_pair(prompt, rng)
        assert demo.sentiment_reward(chosen) == 1.0 and demo.sentiment_reward(rejected) == 0.0
        diff = [(a, b) for a, b in zip(chosen.split(), rejected.split()) if a != b]
        assert len(chosen.split()) == len(rejected.split())
        assert all(a in demo.POSITIVE_WORDS and b in demo.NEGATIVE_WORDS for a, b in diff)


def test_tokenizer_round_trips_the_grammar():
    tok = demo.build_tokenizer()
    rng = random.Random(1)
    for prompt in rng.sample(demo.all_prompts(), 100):
        text = prompt.text + demo.continuation(prompt, rng.random() < 0.5, rng)
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids and tok.eos_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text.strip()


def test_corpus_is_seeded_balanced_and_split():
    a = demo.build_corpus(3, num_train=50, num_heldout=20, num_heldout_pairs=30)
    assert a == demo.build_corpus(3, num_train=50, num_heldout=20, num_heldout_pairs=30)
    assert a != demo.build_corpus(4, num_train=50, num_heldout=20, num_heldout_pairs=30)
    train = {r["prompt"] for r in a.sft_rows}
    assert len(train) == 50 and not train & set(a.heldout_prompts)
    assert {r["prompt"] for r in a.dpo_rows} == train
    rewards = [demo.sentiment_reward(r["completion"]) for r in a.sft_rows]
    assert rewards.count(1.0) == rewards.count(0.0) == 50  # one positive and one negative per train prompt
    assert len(a.heldout_pairs) == 30 and {r["prompt"] for r in a.heldout_pairs} <= set(a.heldout_prompts)


def test_quick_demo_raises_the_reward_at_a_measured_kl(quick_run):
    result, _ = quick_run
    before, after = result["before"], result["after"]
    # The SFT model writes both sentiments: its mean reward is near the middle.
    assert abs(before["reward"] - 0.5) < 0.15
    # DPO raises it by a wide margin, far beyond the sampling noise of either estimate.
    gain = after["reward"] - before["reward"]
    noise = (before["reward_se"] ** 2 + after["reward_se"] ** 2) ** 0.5
    assert gain > 0.25 and gain > 5 * noise, (before["reward"], after["reward"], noise)
    # The SFT model is its own reference: zero KL, and every held-out pair a tie, which counts as wrong (accuracy 0,
    # as training's rewards/accuracies and TRL count it).
    assert before["kl"] == 0.0 and before["preference_accuracy"] == 0.0
    # The policy moved away from the SFT model (KL clearly positive) and ranks held-out pairs better than chance.
    assert after["kl"] > 3 * after["kl_se"] > 0
    assert after["preference_accuracy"] > 0.5 + 3 * after["preference_accuracy_se"]


def test_before_and_after_sample_the_same_prompts(quick_run):
    result, _ = quick_run
    before, after = result["before"]["samples"], result["after"]["samples"]
    settings = result["settings"]
    assert len(before) == len(after) == settings["num_heldout_prompts"] * settings["num_samples"]
    assert [s["prompt"] for s in before] == [s["prompt"] for s in after]
    assert all(s["reward"] == demo.sentiment_reward(s["completion"]) for s in before + after)


def test_output_dir_holds_models_results_and_samples(quick_run):
    result, out = quick_run
    for phase in ("sft", "dpo"):
        assert (out / phase / "model.safetensors").is_file() and (out / phase / "tokenizer.json").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert saved["after"]["reward"] == result["after"]["reward"] and "samples" not in saved["after"]
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == result["before"]["num_samples"] + result["after"]["num_samples"]


def test_main_prints_the_table(quick_run, monkeypatch, capsys):
    result, _ = quick_run
    calls = []

    def fake_run_demo(**kwargs):
        calls.append(kwargs)
        return result

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert demo.main(["--quick", "--seed", "5"]) == 0
    assert calls == [{"output_dir": None, "seed": 5, "quick": True}]
    text = capsys.readouterr().out
    assert "SFT (before)" in text and "DPO (after)" in text
    assert f"{result['after']['reward']:.3f} ± {result['after']['reward_se']:.3f}" in text
