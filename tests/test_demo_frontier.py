"""`dpokit demo --frontier`: one quick frontier run, checked on its measured numbers and its written files."""

import json
import math

import pytest

from dpokit import demo


@pytest.fixture(scope="module")
def quick_frontier(tmp_path_factory):
    out = tmp_path_factory.mktemp("frontier")
    result = demo.run_frontier(output_dir=str(out), seed=0, quick=True, betas=(0.1, 1.0), dpo_epochs=(1.0,),
                               preferred_epochs=(0.5,))
    return result, out


def test_every_method_and_beta_is_measured(quick_frontier):
    result, _ = quick_frontier
    keys = [(p["method"], p["beta"], p["epochs"]) for p in result["points"]]
    assert keys == [("SFT", None, None), ("Preferred-FT", None, 0.5), ("DPO", 0.1, 1.0), ("DPO", 1.0, 1.0)]
    settings = result["settings"]
    for p in result["points"]:
        for key in ("reward", "reward_se", "kl", "kl_se", "preference_accuracy", "train_s"):
            assert math.isfinite(p[key]), (p["method"], key, p[key])
        assert 0 <= p["reward"] <= 1
        assert p["num_samples"] == settings["num_heldout_prompts"] * settings["num_samples"]


def test_sft_is_the_origin_and_the_trained_policies_move_away_from_it(quick_frontier):
    result, _ = quick_frontier
    sft, *trained = result["points"]
    # The SFT model is its own reference: its KL is exactly zero, not merely small.
    assert sft["kl"] == 0.0 and sft["kl_se"] == 0.0
    # Both Preferred-FT and DPO train towards the positive continuations, so each moves away from the SFT model and
    # raises its reward beyond the sampling noise (the size of the gain and of the KL is what the frontier reports).
    for p in trained:
        assert p["kl"] > 3 * p["kl_se"] > 0, p
        noise = math.hypot(sft["reward_se"], p["reward_se"])
        assert p["reward"] - sft["reward"] > 3 * noise, (p["method"], p["beta"], sft["reward"], p["reward"])


def test_frontier_files_hold_the_returned_numbers(quick_frontier):
    result, out = quick_frontier
    saved = json.loads((out / "frontier.json").read_text())
    assert saved["points"] == result["points"] and "samples" not in saved["points"][0]
    png = (out / "frontier.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_main_frontier_prints_the_table(quick_frontier, monkeypatch, capsys, tmp_path):
    result, _ = quick_frontier
    calls = []

    def fake_run_frontier(**kwargs):
        calls.append(kwargs)
        return result

    monkeypatch.setattr(demo, "run_frontier", fake_run_frontier)
    assert demo.main(["--frontier", "--quick", "--seed", "3", "--output_dir", str(tmp_path)]) == 0
    assert demo.main(["--frontier"]) == 0  # the default output folder is the one docs/demo.md names
    assert calls == [{"output_dir": str(tmp_path), "seed": 3, "quick": True},
                     {"output_dir": demo.FRONTIER_OUTPUT_DIR, "seed": 0, "quick": False}]
    text = capsys.readouterr().out
    for p in result["points"]:
        assert f"{p['reward']:.3f} ± {p['reward_se']:.3f}" in text and f"{p['kl']:.3f} ± {p['kl_se']:.3f}" in text
