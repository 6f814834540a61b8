"""`dpokit pairs`: on-policy pair creation (sample, score, pair), the prompt sources it reads, and its refusals."""

import gzip
import json

import pytest
import torch

from conftest import HH_FILE, tiny_llama
from dpokit import data as D
from dpokit.cli import main
from dpokit.errors import ConfigError, DataError
from dpokit.evaluate import Sample, draw_samples
from dpokit.pairs import PairSettings, pairs_from_samples

LLAMA2_CHAT = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
               "{% elif m['role'] == 'system' %}{{ '<<SYS>> ' + m['content'] + ' <</SYS>> ' }}"
               "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")


def S(text, finished):  # noqa: N802 - a Sample of `text`, one token per word
    return Sample(text, finished, len(text.split()))


def word_count(prompt, completion):
    """A test judge: longer is better."""
    return float(len(completion.split()))


def constant(prompt, completion):
    return 1.0


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------- pairing logic


def _prompts(*texts, system=None):
    return [D.PromptExample(t, i, system) for i, t in enumerate(texts)]


def test_unfinished_and_empty_samples_are_dropped_and_counted():
    samples = [[S("a b c", True), S("a", True), S("a b c d e", False), S("", True)],
               [S("x", False), S("y y", True)]]
    seen = []

    def score(prompts, completions):
        seen.extend(completions)
        return [word_count(p, c) for p, c in zip(prompts, completions)]

    rows, scored, counts = pairs_from_samples(_prompts("p1", "p2"), samples, score, PairSettings())
    assert seen == ["a b c", "a", "y y"]  # the judge never sees a dropped sample
    assert rows == [{"prompt": "p1", "chosen": "a b c", "rejected": "a", "score_chosen": 3.0, "score_rejected": 1.0}]
    assert counts == {"prompts": 2, "samples": 6, "unfinished": 2, "empty": 1, "repeated": 0, "scored": 3, "pairs": 1,
                      "prompts_without_pair": 1}
    assert [len(r["completions"]) for r in scored] == [2]  # p2 kept one sample: no scored row either

    rows, _, counts = pairs_from_samples(_prompts("p1", "p2"), samples, score,
                                         PairSettings(keep_unfinished=True))
    assert [r["chosen"] for r in rows] == ["a b c d e", "y y"] and counts["unfinished"] == 2


@pytest.mark.parametrize("strategy, gap, want", [
    ("best_vs_worst", 0.0, [("a a a", "a")]),
    ("best_vs_rest", 0.0, [("a a a", "a"), ("a a a", "a a")]),  # the second "a" is scored once, paired once
    ("all_pairs", 0.0, [("a a a", "a"), ("a a", "a"), ("a a a", "a a")]),
    ("all_pairs", 1.5, [("a a a", "a")]),
])
def test_pairs_follow_the_strategy_and_gap_of_scored_data(strategy, gap, want):
    samples = [[S("a", True), S("a a", True), S("a a a", True), S("a", True)]]
    rows, scored, _ = pairs_from_samples(_prompts("p"), samples, lambda p, c: [word_count(None, x) for x in c],
                                         PairSettings(pair_strategy=strategy, min_score_gap=gap))
    assert sorted((r["chosen"], r["rejected"]) for r in rows) == sorted(want)
    # The scored rows, read back as scored data with the same strategy, give the same pairs.
    back, _ = D.preference_examples(scored, "scored", pair_strategy=strategy, min_score_gap=gap)
    assert sorted((e.chosen, e.rejected) for e in back) == sorted(want)


def test_ties_and_repeated_samples_never_pair():
    samples = [[S("same", True), S("same", True)], [S("u v", True), S("w z", True)]]
    rows, scored, counts = pairs_from_samples(_prompts("p", "q"), samples, lambda p, c: [1.0] * len(c),
                                              PairSettings(pair_strategy="all_pairs"))
    assert rows == [] and counts["prompts_without_pair"] == 2 and counts["repeated"] == 1
    assert [r["prompt"] for r in scored] == ["q"]


def test_message_prompts_give_conversational_pairs_and_text_prompts_keep_their_system():
    conv = D.PromptExample([{"role": "user", "content": "hi"}], 0)
    samples = [[S(" hello there", True), S(" hi", True)]]
    rows, _, _ = pairs_from_samples([conv], samples, lambda p, c: [word_count(p, x) for x in c], PairSettings())
    assert rows[0]["prompt"] == [{"role": "user", "content": "hi"}]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": " hello there"}]
    examples, report = D.preference_examples(rows, "pairs")
    assert report.format == "conversational" and len(examples) == 1

    rows, scored, _ = pairs_from_samples(_prompts("q", system="be brief"), samples,
                                         lambda p, c: [word_count(p, x) for x in c], PairSettings())
    assert rows[0]["system"] == "be brief" and scored[0]["system"] == "be brief"
    assert D.preference_examples(rows, "pairs")[0][0].system == "be brief"


@pytest.mark.parametrize("settings, match", [
    (PairSettings(num_samples=1), "num_samples must be an integer >= 2"),
    (PairSettings(temperature=0.0), "temperature must be > 0"),
    (PairSettings(top_p=1.5), "top_p must be in"),
    (PairSettings(pair_strategy="best"), "pair_strategy 'best' is not one of"),
    (PairSettings(min_score_gap=-1.0), "min_score_gap must be a number >= 0"),
    (PairSettings(max_new_tokens=0), "max_new_tokens must be a positive integer"),
])
def test_bad_settings_are_refused(settings, match):
    with pytest.raises(ConfigError, match=match):
        settings.check()


# ------------------------------------------------------------------------------------------- prompt sources


def test_prompts_of_a_preference_file_are_read_once_each():
    rows, name = D.load_rows(HH_FILE)
    prompts, report = D.prompt_examples(rows, name)
    assert report.read == 2312 and report.deduplicated == 2 and len(prompts) == 2310
    assert prompts[0].prompt.endswith("\n\nAssistant:")


def test_prompt_rows_text_messages_system_and_input(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Summarise.", "input": "A long text.", "system": "Be brief."},
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]},
        {"prompt": "Summarise.", "input": "A long text.", "system": "Be brief."},
    ])
    prompts, report = D.prompt_examples(*D.load_rows(str(f)))
    assert [p.model_prompt for p in prompts] == ["Be brief.\n\nSummarise.\n\nA long text.",
                                                 [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]]
    assert report.deduplicated == 1


@pytest.mark.parametrize("rows, match", [
    ([{"question": "q"}], "no 'prompt' column"),
    ([{"text": "just text"}], "'text' rows hold no prompt"),
    ([{"prompt": "ok"}, {"prompt": ""}], r"p.jsonl:2: field 'prompt': empty string"),
    ([{"prompt": [{"role": "assistant", "content": "x"}]}], r"p.jsonl:1: field 'prompt\[0\].role': the prompt must end with a user"),
])
def test_bad_prompt_files_are_named(tmp_path, rows, match):
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError, match=match):
        D.prompt_examples(*D.load_rows(str(f)))


# ------------------------------------------------------------------------------------------- sampling


def test_draw_samples_marks_samples_cut_at_max_new_tokens(llama2_tokenizer):
    model = tiny_llama(vocab_size=32000)
    model.lm_head = torch.nn.Linear(32, 32000, bias=True)  # logits = bias: EOS as likely as we set it

    def draw(eos_logit):
        with torch.no_grad():
            model.lm_head.weight.zero_()
            model.lm_head.bias.zero_()
            model.lm_head.bias[llama2_tokenizer.eos_token_id] = eos_logit
        return [s for g in draw_samples(model, llama2_tokenizer, ["Hello", "A much longer prompt"], num_samples=16,
                                        max_new_tokens=4, seed=0) for s in g]

    assert all(s.finished and s.text == "" for s in draw(40.0))  # EOS first, always
    assert not any(s.finished for s in draw(-40.0))  # EOS never: every sample cut at the limit
    mixed = draw(9.0)  # EOS about one draw in five
    assert 0 < sum(s.finished for s in mixed) < len(mixed)


def test_message_prompts_are_sampled_after_the_tokens_training_puts_before_a_completion(llama2_tokenizer):
    """The ids a message prompt is sampled from are the prompt ids of the same conversation in training."""
    from dpokit.data.tokenize import prompt_ids

    llama2_tokenizer.chat_template = LLAMA2_CHAT
    prompt = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"}]
    pair = D.PreferenceExample(prompt, [{"role": "assistant", "content": "Hello!"}],
                               [{"role": "assistant", "content": "Go away."}], 0)
    tokenized = D.tokenize_preference([pair], llama2_tokenizer)[0]
    assert prompt_ids(prompt, llama2_tokenizer) == tokenized.prompt_ids.tolist()
    assert prompt_ids("Hi there", llama2_tokenizer, system="Be kind.") == \
        D.tokenize_preference([D.PreferenceExample("Hi there", "a", "b", 0, "Be kind.")], llama2_tokenizer)[0].prompt_ids.tolist()


# ------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    from dpokit.demo import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("pairs-model")
    tok = build_tokenizer()
    build_model(tok, 3).save_pretrained(root)
    tok.save_pretrained(root)
    return root


PROMPTS = ["one morning , the baker went to the market .", "late at night , my uncle visited the river .",
           "on sunday , the teacher walked to the park ."]


def test_pairs_cli_writes_pairs_that_train_and_the_scored_samples(sft_model, tmp_path, capsys):
    from transformers import AutoTokenizer

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    out, scored = tmp_path / "pairs.jsonl", tmp_path / "scored.jsonl.gz"
    rc = main(["pairs", "--model", str(sft_model), "--prompts", str(prompts), "--judge", "test_pairs:word_count",
               "--output", str(out), "--scored_output", str(scored), "--num_samples", "4", "--max_new_tokens", "12",
               "--keep_unfinished", "--pair_strategy", "best_vs_rest"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    rows = read_jsonl(out)
    assert rows and all(r["score_chosen"] > r["score_rejected"] for r in rows)
    assert all(word_count(r["prompt"], r["chosen"]) == r["score_chosen"] for r in rows)
    assert {r["prompt"] for r in rows} <= set(PROMPTS)
    assert f"{len(rows)} pairs from 3 prompts x 4 samples" in printed
    # The rows are what training reads: every one is kept and tokenizes.
    tok = AutoTokenizer.from_pretrained(sft_model)
    examples, report = D.preference_examples(*D.load_rows(str(out)))
    assert report.kept == len(rows) and report.skipped == 0
    assert len(D.tokenize_preference(examples, tok)) == len(rows)
    # The scored samples re-pair to the same pairs with the same strategy.
    back, _ = D.preference_examples(*D.load_rows(str(scored)), pair_strategy="best_vs_rest")
    assert [(e.prompt, e.chosen, e.rejected) for e in back] == [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    with gzip.open(scored, "rt") as f:
        assert all(len(json.loads(line)["completions"]) == 4 for line in f)
    # Seeded: the same command gives the same file.
    again = tmp_path / "again.jsonl"
    assert main(["pairs", "--model", str(sft_model), "--prompts", str(prompts), "--judge", "test_pairs:word_count",
                 "--output", str(again), "--num_samples", "4", "--max_new_tokens", "12", "--keep_unfinished",
                 "--pair_strategy", "best_vs_rest"]) == 0
    assert again.read_text() == out.read_text()


def test_pairs_cli_with_no_pair_writes_nothing_and_exits_2(sft_model, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    out = tmp_path / "pairs.jsonl"
    out.write_text("good work\n")
    rc = main(["pairs", "--model", str(sft_model), "--prompts", str(prompts), "--judge", "test_pairs:constant",
               "--output", str(out), "--max_new_tokens", "6", "--keep_unfinished"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "no pairs from 12 samples of 3 prompts" in err and "3 prompts without a pair" in err
    assert out.read_text() == "good work\n"


@pytest.mark.parametrize("extra, match", [
    (["--output", "pairs.csv"], "--output pairs.csv: must be a .jsonl"),
    (["--output", "p.jsonl", "--num_samples", "1"], "num_samples must be an integer >= 2"),
    (["--output", "p.jsonl", "--judge", "nosuchmodule:f"], "cannot import module 'nosuchmodule'"),
    (["--output", "p.jsonl", "--prompts", "missing.jsonl"], "missing.jsonl"),
])
def test_pairs_cli_refusals_are_one_line(sft_model, tmp_path, capsys, monkeypatch, extra, match):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": PROMPTS[0]}])
    argv = {"--model": str(sft_model), "--prompts": "prompts.jsonl", "--judge": "test_pairs:word_count"}
    for k, v in zip(extra[::2], extra[1::2]):
        argv[k] = v
    rc = main(["pairs", *[x for kv in argv.items() for x in kv]])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("p.jsonl*"))


def test_pairs_from_message_prompts_render_with_the_chat_template_and_train(tmp_path, llama2_tokenizer):
    model = tiny_llama(vocab_size=32000)
    llama2_tokenizer.chat_template = LLAMA2_CHAT
    model.save_pretrained(tmp_path / "m")
    llama2_tokenizer.save_pretrained(tmp_path / "m")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": [{"role": "user", "content": "Tell me a story."}]},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]}])
    out = tmp_path / "pairs.jsonl"
    assert main(["pairs", "--model", str(tmp_path / "m"), "--prompts", str(prompts), "--judge",
                 "test_pairs:word_count", "--output", str(out), "--max_new_tokens", "6", "--keep_unfinished",
                 "--num_samples", "3"]) == 0
    rows = read_jsonl(out)
    assert rows and all(r["chosen"][0]["role"] == "assistant" and isinstance(r["prompt"], list) for r in rows)
    examples, report = D.preference_examples(*D.load_rows(str(out)))
    assert report.format == "conversational" and report.kept == len(rows)
    assert len(D.tokenize_preference(examples, llama2_tokenizer)) == len(rows)


def test_message_prompts_need_a_chat_template(sft_model, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [{"role": "user", "content": "hi"}]}])
    rc = main(["pairs", "--model", str(sft_model), "--prompts", str(prompts), "--judge", "test_pairs:word_count",
               "--output", str(tmp_path / "p.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and "no chat template" in err and not (tmp_path / "p.jsonl").exists()


def test_eval_samples_message_prompts_and_counts_cut_samples(tmp_path, llama2_tokenizer):
    from dpokit.evaluate import evaluate_model

    llama2_tokenizer.chat_template = LLAMA2_CHAT
    for name, seed in (("policy", 1), ("ref", 2)):
        tiny_llama(vocab_size=32000, seed=seed).save_pretrained(tmp_path / name)
        llama2_tokenizer.save_pretrained(tmp_path / name)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [{"role": "user", "content": "Tell me | more"}]}])
    result = evaluate_model(tmp_path / "policy", ref_path=tmp_path / "ref", prompts=prompts,
                            judge="test_pairs:word_count", num_samples=2, max_new_tokens=3, output_dir=tmp_path / "o")
    s = result["samples"]
    assert s["policy_unfinished"] + s["reference_unfinished"] >= 3  # a random 32k-vocab model rarely says EOS
    assert s["examples"][0]["prompt"] == "user: Tell me | more" and s["kl"] == s["kl"]
    assert "samples cut at 3 tokens" in (tmp_path / "o" / "eval.md").read_text()


def test_implicit_judge_scores_with_the_reference(sft_model, tmp_path):
    """`--judge implicit`: each score is beta * (log pi - log pi_ref) of the completion, pi_ref from --ref."""
    from dpokit.demo import build_model
    from dpokit.evaluate import sequence_logps
    from dpokit.models import load_merged as load_causal_lm

    ref_dir = tmp_path / "ref"
    policy, tok = load_causal_lm(sft_model)
    build_model(tok, 4).save_pretrained(ref_dir)
    tok.save_pretrained(ref_dir)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS[:2]])
    out = tmp_path / "pairs.jsonl"
    assert main(["pairs", "--model", str(sft_model), "--ref", str(ref_dir), "--beta", "0.5", "--prompts",
                 str(prompts), "--judge", "implicit", "--output", str(out), "--max_new_tokens", "8",
                 "--keep_unfinished"]) == 0
    rows = read_jsonl(out)
    reference, _ = load_causal_lm(ref_dir)
    for side in ("chosen", "rejected"):
        want = 0.5 * (sequence_logps(policy, tok, [r["prompt"] for r in rows], [r[side] for r in rows])
                      - sequence_logps(reference, tok, [r["prompt"] for r in rows], [r[side] for r in rows]))
        assert [r[f"score_{side}"] for r in rows] == pytest.approx(want.tolist(), rel=1e-4, abs=1e-5)


def test_reward_model_scores_a_message_prompt_through_its_chat_template(tmp_path, llama2_tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from dpokit.evaluate import load_judge

    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(vocab_size=32000, hidden_size=16, intermediate_size=32,
                                                    num_hidden_layers=1, num_attention_heads=2, num_labels=1,
                                                    pad_token_id=0))
    rm.save_pretrained(tmp_path / "rm")
    llama2_tokenizer.save_pretrained(tmp_path / "rm")  # no chat template yet
    prompt = [{"role": "user", "content": "Is it good?"}]
    with pytest.raises(ConfigError, match="the reward model's tokenizer has no chat template"):
        load_judge(f"rm:{tmp_path / 'rm'}")([prompt], [" Yes."])
    llama2_tokenizer.chat_template = LLAMA2_CHAT
    llama2_tokenizer.save_pretrained(tmp_path / "rm")
    scores = load_judge(f"rm:{tmp_path / 'rm'}")([prompt, prompt, "Is it good?"],
                                                  ["Yes.", "No, it is not good at all.", " Yes."])
    text = llama2_tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": "Yes."}], tokenize=False)
    assert text == "[INST] Is it good? [/INST] Yes.</s>"
    with torch.no_grad():
        want = rm(**llama2_tokenizer([text], add_special_tokens=False, return_tensors="pt")).logits[0, 0].item()
    assert scores[0] == pytest.approx(want, rel=1e-5)
    with torch.no_grad():  # a text prompt in the same batch: prompt + completion with the tokenizer's BOS
        want_text = rm(**llama2_tokenizer(["Is it good? Yes."], return_tensors="pt")).logits[0, 0].item()
    assert scores[2] == pytest.approx(want_text, rel=1e-5)


def test_samples_count_the_tokens_sampled(tmp_path, llama2_tokenizer):
    """num_tokens is what was sampled (EOS not counted), not a re-tokenization of the decoded text."""
    model = tiny_llama(vocab_size=32000)
    flat = [s for g in draw_samples(model, llama2_tokenizer, ["Hi", "Hello there"], num_samples=4, max_new_tokens=5,
                                    seed=1) for s in g]
    assert all(s.num_tokens == 5 for s in flat if not s.finished)
    assert all(s.num_tokens < 5 for s in flat if s.finished)


def test_reward_model_input_longer_than_its_positions_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from dpokit.demo import build_tokenizer
    from dpokit.evaluate import load_judge

    tok = build_tokenizer()
    rm = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=8,
                                                  num_labels=1, pad_token_id=tok.pad_token_id))
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    judge = load_judge(f"rm:{tmp_path / 'rm'}")
    assert len(judge(["one morning ,"], [" it was good ."])) == 1
    with pytest.raises(ConfigError, match=r"a prompt \+ completion of 15 tokens is longer than the reward model's "
                                          r"max_position_embeddings \(8\)"):
        judge(["one morning , the baker went to the market ."], [" it was good ."])


def boom(prompt, completion):
    raise ValueError("judge exploded")


@pytest.mark.parametrize("extra, match", [
    (["--output", "prompts.jsonl"], "--output prompts.jsonl is --prompts prompts.jsonl"),
    (["--output", "p.jsonl", "--beta", "0.5"], "--beta is the implicit judge's"),
    (["--output", "p.jsonl", "--judge", "test_pairs:boom", "--keep_unfinished", ""],
     "raised ValueError: judge exploded"),
    (["--output", "p.jsonl", "--max_new_tokens", "60"], "with max_new_tokens=60 that is more than the model can "
                                                        "place (max_position_embeddings is 64"),
])
def test_pairs_cli_more_refusals(sft_model, tmp_path, capsys, monkeypatch, extra, match):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": PROMPTS[0]}])
    before = (tmp_path / "prompts.jsonl").read_text()
    argv = {"--model": str(sft_model), "--prompts": "prompts.jsonl", "--judge": "test_pairs:word_count",
            "--max_new_tokens": "4"}
    for k, v in zip(extra[::2], extra[1::2]):
        argv[k] = v
    rc = main(["pairs", *[x for kv in argv.items() for x in (kv if kv[1] else kv[:1])]])  # "": a flag
    err = capsys.readouterr().err
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "prompts.jsonl").read_text() == before and not (tmp_path / "p.jsonl").exists()
