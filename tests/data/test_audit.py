"""`dpokit data audit` measured: on the demo's sentiment pairs with a known 10% of labels flipped, a DPO model trained
on them ranks the flipped pairs first. Also the audit's other columns, `--top` items for re-labelling and `dpokit
data filter --audit --drop_top`.

`python tests/data/test_audit.py` prints the figures: precision and recall of the top 10%, and the held-out accuracy
of a retrain on the filtered file against one on the noisy file."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

NUM_PAIRS = 400
FLIPPED = NUM_PAIRS // 10
BETA = 0.1


def _dpo(rows_file: Path, out: Path, tokenizer):
    """DPO from the demo's tiny model, fresh weights as the reference (saved beside it), one epoch."""
    import torch

    from dpokit import DPOConfig, DPOTrainer
    from dpokit.demo import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the demo: at this size a second thread only adds synchronisation
    try:
        model = build_model(tokenizer, 0)
        model.save_pretrained(out / "ref")
        tokenizer.save_pretrained(out / "ref")
        trainer = DPOTrainer(model, ref_model=None, train_dataset=str(rows_file), processing_class=tokenizer,
                             args=DPOConfig(output_dir=str(out / "dpo"), beta=BETA, loss_type="sigmoid",
                                            learning_rate=1e-3, num_train_epochs=1, per_device_train_batch_size=16,
                                            max_length=64, seed=0, logging_steps=100, save_steps=0,
                                            disable_tqdm=True, report_to="none", overwrite_output_dir=True))
        trainer.train()
        trainer.save_model(str(out / "dpo"))
    finally:
        torch.set_num_threads(threads)
    return out / "dpo", out / "ref"


def noisy_run(root: Path, seed: int = 0):
    """The demo's contrast pairs (positive preferred) with 10% of labels flipped, and a DPO run on them."""
    from dpokit.demo import build_corpus, build_tokenizer

    corpus = build_corpus(seed, NUM_PAIRS, 64, 128)
    rows = [dict(r) for r in corpus.dpo_rows]
    flipped = set(random.Random(seed + 1).sample(range(NUM_PAIRS), FLIPPED))
    for i in flipped:
        rows[i]["chosen"], rows[i]["rejected"] = rows[i]["rejected"], rows[i]["chosen"]
    root.mkdir(parents=True, exist_ok=True)
    noisy = root / "noisy.jsonl"
    noisy.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus.heldout_pairs))
    tokenizer = build_tokenizer()
    model, ref = _dpo(noisy, root / "noisy", tokenizer)
    return noisy, model, ref, {i + 1 for i in flipped}  # 1-based lines


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return noisy_run(tmp_path_factory.mktemp("audit"))


def test_the_top_ten_percent_of_the_audit_holds_the_flipped_labels(run, tmp_path, capsys):
    from dpokit.cli import main

    noisy, model, ref, flipped = run
    out = tmp_path / "audit.jsonl"
    assert main(["data", "audit", str(noisy), "--model", str(model), "--ref", str(ref), "--output", str(out),
                 "--top", str(FLIPPED)]) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == NUM_PAIRS and [r["rank"] for r in rows] == list(range(1, NUM_PAIRS + 1))
    assert all(rows[i]["suspicion"] >= rows[i + 1]["suspicion"] for i in range(NUM_PAIRS - 1))
    top = {r["line"] for r in rows[:FLIPPED]}
    recall = len(top & flipped) / len(flipped)
    assert recall >= 0.8, f"recall of the flipped labels in the top 10%: {recall:.2f}"
    for r in rows[:3]:
        assert r["suspicion"] > 0.5 and r["margin"] < 0 and r["where"] == f"{noisy}:{r['line']}"
        assert r["margin"] == pytest.approx(r["chosen_reward"] - r["rejected_reward"], abs=1e-5)
    assert "length: chosen is the longer response" in printed and "duplicates:" in printed
    # The top K as annotation items: canonical pairs naming their line, served as they are.
    from dpokit.annotate.items import read_items

    items_file = tmp_path / f"audit-top{FLIPPED}.jsonl"
    found = read_items(items_file)
    assert len(found.items) == FLIPPED and {it["meta"]["audit"]["line"] for it in found.items} == top
    # Filter drops exactly those, and appends re-labelled pairs when given.
    fixed, relabelled = tmp_path / "fixed.jsonl", tmp_path / "relabelled.jsonl"
    lines = noisy.read_text().splitlines()
    relabelled.write_text("".join(json.dumps({**json.loads(lines[n - 1]),
                                              "chosen": json.loads(lines[n - 1])["rejected"],
                                              "rejected": json.loads(lines[n - 1])["chosen"]}) + "\n"
                                  for n in sorted(top)))
    assert main(["data", "filter", str(noisy), str(fixed), "--audit", str(out), "--drop_top", str(FLIPPED),
                 "--add", str(relabelled)]) == 0
    kept = fixed.read_text().splitlines()
    assert len(kept) == NUM_PAIRS
    assert kept[: NUM_PAIRS - FLIPPED] == [json.dumps(json.loads(lines[n - 1]), ensure_ascii=False)
                                           for n in range(1, NUM_PAIRS + 1) if n not in top]


def test_audit_rows_name_duplicates_and_contradictions(run, tmp_path):
    from dpokit.data.audit import audit_pairs

    noisy, model, ref, _ = run
    rows = [json.loads(line) for line in noisy.read_text().splitlines()[:5]]
    swapped = {**rows[0], "chosen": rows[0]["rejected"], "rejected": rows[0]["chosen"]}
    near = {**rows[1], "prompt": rows[1]["prompt"].upper()}
    data = tmp_path / "dups.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [*rows, rows[2], swapped, near]))
    audited, _, summary = audit_pairs(data, model, ref)
    by_line = {r["line"]: r for r in audited}
    assert by_line[6]["duplicate_of"] == 3 and by_line[7]["contradicts"] == 1 and by_line[8]["near_duplicate_of"] == 2
    assert summary["exact_duplicates"] == 1 and summary["contradicting"] == 1 and summary["near_duplicates"] == 1
    assert all(r["chosen_tokens"] > 0 and r["rejected_tokens"] > 0 for r in audited)


def test_filter_refuses_an_audit_of_another_file(run, tmp_path, capsys):
    from dpokit.cli import main

    noisy, _, _, _ = run
    audit = tmp_path / "audit.jsonl"
    audit.write_text(json.dumps({"line": 1, "suspicion": 0.9, "key": "0000000000000000"}) + "\n")
    assert main(["data", "filter", str(noisy), str(tmp_path / "o.jsonl"), "--audit", str(audit),
                 "--drop_top", "1"]) == 2
    assert "does not hold the pair the audit saw" in capsys.readouterr().err
    assert main(["data", "filter", str(noisy), str(tmp_path / "o.jsonl"), "--audit", str(audit)]) == 2
    assert "--audit and --drop_top go together" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_audit_refuses_scored_rows(run, tmp_path, capsys):
    from dpokit.cli import main

    _, model, ref, _ = run
    scored = tmp_path / "scored.jsonl"
    scored.write_text(json.dumps({"prompt": "at dawn ,", "completions": [{"text": " it was good .", "score": 1},
                                                                          {"text": " it was bad .", "score": 0}]}) + "\n")
    assert main(["data", "audit", str(scored), "--model", str(model), "--ref", str(ref), "--output",
                 str(tmp_path / "a.jsonl")]) == 2
    assert "scored rows give several pairs per line" in capsys.readouterr().err


def measure(root: Path) -> dict:
    """The figures: precision / recall of the audit's top 10%, and held-out accuracy of a retrain on the file
    filtered by it against the run on the noisy file."""
    from dpokit.cli import main
    from dpokit.demo import build_tokenizer
    from dpokit.evaluate import evaluate_model

    noisy, model, ref, flipped = noisy_run(root)
    audit = root / "audit.jsonl"
    main(["data", "audit", str(noisy), "--model", str(model), "--ref", str(ref), "--output", str(audit)])
    rows = [json.loads(line) for line in audit.read_text().splitlines()]
    top = {r["line"] for r in rows[:FLIPPED]}
    filtered = root / "filtered.jsonl"
    main(["data", "filter", str(noisy), str(filtered), "--audit", str(audit), "--drop_top", str(FLIPPED)])
    retrained, retrained_ref = _dpo(filtered, root / "filtered", build_tokenizer())
    accuracy = {}
    for name, (m, r) in {"noisy": (model, ref), "filtered": (retrained, retrained_ref)}.items():
        result = evaluate_model(m, ref_path=r, pairs=root / "heldout.jsonl", beta=BETA, output_dir=root / f"eval-{name}")
        accuracy[name] = (result["pairs"]["accuracy"], result["pairs"]["accuracy_se"], result["pairs"]["margin"])
    return {"precision": len(top & flipped) / len(top), "recall": len(top & flipped) / len(flipped),
            "accuracy": accuracy, "flipped_left_after_filter": len(flipped - top)}


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        figures = measure(Path(scratch))
    print(f"{NUM_PAIRS} pairs, {FLIPPED} labels flipped; top {FLIPPED} of the audit: precision "
          f"{figures['precision']:.3f}, recall {figures['recall']:.3f}", file=sys.stderr)
    for name, (acc, se, margin) in figures["accuracy"].items():
        print(f"held-out accuracy (128 clean pairs) of DPO on the {name} file: {acc:.3f} ± {se:.3f} "
              f"(mean margin {margin:.3f})", file=sys.stderr)
