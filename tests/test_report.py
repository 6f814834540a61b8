"""`dpokit report`: plots from metrics.jsonl, overlaid runs, eval tables, errors, and a headless-Chromium screenshot."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess

import pytest

from conftest import refused
from dpokit import report
from dpokit.errors import ConfigError, DataError

EVAL_MD = """# Evaluation of `runs/dpo`

Reference: `runs/sft`, beta = 0.1

## Held-out pairs (8 from `pairs.jsonl`)

| metric | value |
|---|---|
| implicit-reward accuracy | 0.7500 ± 0.1637 |
| prompt with a \\| pipe | 1.000 |
"""


def _dpo_records(steps: int, scale: float) -> list[dict]:
    records = []
    for step in range(1, steps + 1):
        records.append({"step": step, "loss": math.log(2) / (1 + scale * step), "rewards/chosen": 0.1 * step,
                        "rewards/rejected": -0.1 * step, "rewards/accuracies": min(1.0, 0.5 + 0.05 * step * scale),
                        "rewards/margins": 0.2 * step * scale, "logps/chosen": -40 + step * scale,
                        "logps/rejected": -42 - step, "grad_norm": 1.0, "learning_rate": 1e-4 * step / steps,
                        "tokens_per_second": 1000 + 10 * step, "epoch": step / steps})
        if step % 5 == 0:
            records.append({"step": step, "eval/loss": 0.7 / (1 + scale * step), "eval/rewards/accuracies": 0.6,
                            "eval/rewards/margins": 0.1 * step, "eval/logps/chosen": -41.0,
                            "eval/logps/rejected": -43.0})
    return records


def _run_dir(root, name: str, records: list[dict], eval_md: str | None = None):
    path = root / name
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if eval_md is not None:
        (path / "eval.md").write_text(eval_md)
    return path


@pytest.fixture
def two_runs(tmp_path):
    a = _run_dir(tmp_path, "beta0.1", _dpo_records(20, 1.0), EVAL_MD)
    b = _run_dir(tmp_path, "beta0.5", _dpo_records(20, 0.5))
    return a, b


def _img_alts(page: str) -> list[str]:
    return re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,[A-Za-z0-9+/=]+">', page)


def test_two_runs_one_image_per_plot_and_eval_table(two_runs, tmp_path):
    out = report.write_report([str(p) for p in two_runs], str(tmp_path / "out" / "r.html"))
    page = out.read_text()
    # Every metric family is present in a DPO run, so every plot is drawn, each exactly once, all embedded.
    assert _img_alts(page) == [spec.title for spec in report.PLOTS]
    assert page.count("<img") == len(report.PLOTS)
    assert "Omitted plots" not in page
    # eval.md's pipe table became an HTML table, escaped pipes kept as text, inline code rendered.
    assert "<td>implicit-reward accuracy</td><td>0.7500 ± 0.1637</td>" in page
    assert "<td>prompt with a | pipe</td>" in page
    assert "<code>runs/dpo</code>" in page


def test_legend_names_both_runs_train_and_eval(two_runs):
    runs = report.load_runs(list(two_runs))
    figures = report.build_figures(runs)
    assert len(figures.drawn) == len(report.PLOTS) and not figures.omitted
    legends = {spec.title: [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
               for spec, fig in figures.drawn}
    assert legends["Loss"] == ["beta0.1 — train", "beta0.1 — eval", "beta0.5 — train", "beta0.5 — eval"]
    assert legends["Log-probs of chosen and rejected"][:4] == [
        "beta0.1 — chosen (train)", "beta0.1 — rejected (train)", "beta0.1 — chosen (eval)",
        "beta0.1 — rejected (eval)"]
    assert legends["Throughput"] == ["beta0.1 — train", "beta0.5 — train"]
    # The eval curve is drawn at the eval steps only, dashed.
    loss_eval = fig_line(figures, "Loss", "beta0.1 — eval")
    assert list(loss_eval.get_xdata()) == [5, 10, 15, 20] and loss_eval.get_linestyle() == "--"


def fig_line(figures, title: str, label: str):
    fig = next(f for spec, f in figures.drawn if spec.title == title)
    return next(line for line in fig.axes[0].get_lines() if line.get_label() == label)


def test_sft_run_omits_preference_plots_and_says_why(tmp_path):
    sft = [{"step": s, "loss": 2.0 / s, "grad_norm": 1.0, "learning_rate": 1e-4, "tokens_per_second": 900.0}
           for s in range(1, 6)]
    run = _run_dir(tmp_path, "sft", sft)
    out = report.write_report([run], None)
    assert out == run / "report.html"
    page = out.read_text()
    assert _img_alts(page) == ["Loss", "Learning rate", "Throughput"]
    assert "Omitted plots: Reward accuracy (no run logged rewards/accuracies or eval/rewards/accuracies)" in page


def test_eval_json_rendered_when_no_eval_md(tmp_path):
    run = _run_dir(tmp_path, "r", _dpo_records(5, 1.0))
    (run / "eval.json").write_text(json.dumps({"model": "r", "pairs": {"accuracy": 0.75, "num_pairs": 8},
                                               "samples": {"examples": [{"prompt": "hi", "policy": "<b>x</b>"}]}}))
    page = report.write_report([run], None).read_text()
    assert "<td>pairs.accuracy</td><td>0.75</td>" in page
    assert "<td>hi</td><td>&lt;b&gt;x&lt;/b&gt;</td>" in page


def test_errors_name_the_directory_and_line(tmp_path):
    with pytest.raises(ConfigError, match="nope.*does not exist"):
        report.write_report([str(tmp_path / "nope")], None)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="empty.*has no metrics.jsonl"):
        report.write_report([empty], None)
    bad = _run_dir(tmp_path, "bad", _dpo_records(2, 1.0))
    with (bad / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 0.5\n')
    with pytest.raises(DataError, match=r"bad/metrics.jsonl:3: invalid JSON"):
        report.write_report([bad], None)
    (bad / "metrics.jsonl").write_text('{"step": 1, "loss": "high"}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:1: 'loss' must be a number"):
        report.write_report([bad], None)
    (bad / "metrics.jsonl").write_text('{"loss": 1.0}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:1: 'step' must be an integer"):
        report.write_report([bad], None)


def test_main_writes_the_output(two_runs, tmp_path, capsys):
    out = tmp_path / "page.html"
    assert report.main([str(two_runs[0]), str(two_runs[1]), "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert out.read_text().count("<img") == len(report.PLOTS)


def test_chromium_screenshot_shows_the_plots(two_runs, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not installed: `apt-get install chromium` (Debian) to run the headless screenshot test")
    import matplotlib.image

    page = report.write_report(list(two_runs), str(tmp_path / "report.html"))
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
           page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert shot.is_file(), f"chromium wrote no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    pixels = matplotlib.image.imread(str(shot))[..., :3]  # floats in [0, 1], alpha dropped
    assert pixels.shape[:2] == (2000, 1200)
    # The plots start below the title and run list; look where the first figures sit.
    region = pixels[250:1900, :950]
    assert region.std() > 0.05, "the plot region of the screenshot is (nearly) blank"
    # The plotted lines are in matplotlib's colours (C0 blue, C1 orange), which no text on the page uses: plenty of
    # saturated pixels of both proves the PNGs were decoded and drawn, not just their alt text.
    saturation = region.max(axis=-1) - region.min(axis=-1)
    assert (saturation > 0.3).mean() > 0.002
    blue = (abs(region - [0.122, 0.467, 0.706]).max(axis=-1) < 0.08).sum()
    orange = (abs(region - [1.0, 0.498, 0.055]).max(axis=-1) < 0.08).sum()
    assert blue > 200 and orange > 200, (blue, orange)


def test_training_warnings_appear_in_the_report(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.7}) + "\n")
    (run / "warnings.jsonl").write_text(json.dumps({"step": 12, "kind": "likelihood_displacement",
                                                    "message": "chosen log-probs fell <fast>"}) + "\n")
    page = report.write_report([run]).read_text()
    assert "<h2>Warnings</h2>" in page and "step 12: chosen log-probs fell &lt;fast&gt;" in page


# --------------------------------------------------------------------------------------------------------------------
# Unreadable run files through the command line: one line naming the file (and line), exit 2, nothing changed


def _cli_run(tmp_path, metrics: bytes):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(metrics)
    return run


GOOD = b'{"step": 1, "loss": 0.7}\n{"step": 2, "loss": 0.6}\n'


@pytest.mark.parametrize("name, content, message", [
    ("metrics.jsonl", b'{"step": 1, "loss": 0.7}\n{"step": 2, "note": "\xff"}\n{"step": 3, "loss": 0.5}\n',
     "metrics.jsonl:2: invalid UTF-8 (byte 0xff at column 22)"),
    ("metrics.jsonl", b'{"step": 1, "loss": 0.7}\n{"step": 2, "lo\n{"step": 3, "loss": 0.5}\n',
     "metrics.jsonl:2: invalid JSON (Unterminated string"),
    ("metrics.jsonl", GOOD + b'{"step": 3, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
     "metrics.jsonl:3: JSON nested too deeply to read"),
    ("warnings.jsonl", b'{"step": 1, "message": "caf\xe9"}\n', "warnings.jsonl:1: invalid UTF-8 (byte 0xe9"),
    ("warnings.jsonl", b'{"step": 1, "message": "a"}\n{"step": 2, "mess\n{"step": 3, "message": "c"}\n',
     "warnings.jsonl:2: invalid JSON"),
    ("eval.json", b'{"model": "m",\n "pairs": {"accuracy": 0.7,}\n}', "eval.json:2: invalid JSON (Expecting property name"),
    ("eval.json", b"[" * 100_000 + b"]" * 100_000, "eval.json: JSON nested too deeply to read"),
    ("dpokit_config.yaml", b"run_name: a\nbeta: [0.1\n", "dpokit_config.yaml:3: invalid YAML"),
    ("dpokit_config.yaml", b"- not\n- a mapping\n", "dpokit_config.yaml: expected a mapping of keys to values"),
])
def test_report_refuses_unreadable_run_files(tmp_path, capsys, name, content, message):
    run = _cli_run(tmp_path, GOOD)
    (run / name).write_bytes(content)
    refused(capsys, ["report", run], f"{run}/{message}", unchanged=[run / "metrics.jsonl", run / name])
    assert not (run / "report.html").exists()


@pytest.mark.parametrize("name", ["metrics.jsonl", "warnings.jsonl"])
def test_a_half_written_last_line_is_skipped_and_said(tmp_path, capsys, name):
    """A run killed while writing a log line leaves it without its newline: the report skips it and says so in one
    line (stderr and page); the rest is drawn."""
    from dpokit.cli import main

    run = _cli_run(tmp_path, GOOD)
    (run / "warnings.jsonl").write_bytes(b'{"step": 1, "kind": "k", "message": "first"}\n')
    with (run / name).open("ab") as f:
        f.write(b'{"step": 3, "lo' if name == "metrics.jsonl" else b'{"step": 2, "kind": "k", "mess')
    before = (run / name).read_bytes()
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    captured = capsys.readouterr()
    note = (f"{run / name}:{3 if name == 'metrics.jsonl' else 2}: last line is incomplete (the run was stopped while "
            "writing it); skipped")
    assert captured.err == f"dpokit report: note: {note}\n"
    assert captured.out == f"wrote {run / 'report.html'}\n"
    page = (run / "report.html").read_text()
    assert html_escape(note) in page and "step 1: first" in page and _img_alts(page)[0] == "Loss"
    assert (run / name).read_bytes() == before


def html_escape(text: str) -> str:
    import html

    return html.escape(text)


def test_report_options_are_one_line(tmp_path, capsys):
    refused(capsys, ["report"], "the following arguments are required: RUN_DIR")
    refused(capsys, ["report", tmp_path, "--colour", "red"], "unrecognized arguments: --colour red")


def _sweep_root(tmp_path):
    """A sweep's output_dir as `dpokit sweep` writes it (its own writers), two runs inside; the runs' paths in
    sweep.json are as the sweep's output_dir was given, relative to where it was started."""
    from dpokit.sweep import plot_frontier, sweep_markdown

    root = tmp_path / "sweep"
    root.mkdir()
    rows = []
    for beta, scale in ((0.1, 1.0), (1.0, 0.5)):
        _run_dir(root, f"beta={beta}", _dpo_records(10, scale), EVAL_MD)
        rows.append({"run": f"elsewhere/sweep/beta={beta}", "beta": beta, "reward": 0.5 + beta, "reward_se": 0.1,
                     "kl": beta, "kl_se": 0.05, "win_rate": 0.6, "reference_reward": 0.4})
    summary = {"axes": {"beta": [0.1, 1.0]}, "prompts": "p.jsonl", "judge": "implicit", "runs": rows}
    (root / "sweep.json").write_text(json.dumps(summary))
    (root / "sweep.md").write_text(sweep_markdown(summary))
    plot_frontier(rows, ["beta"], root / "frontier.png")
    return root


def test_report_of_a_sweeps_output_dir_compares_its_runs(tmp_path, capsys):
    from dpokit.cli import main

    root = _sweep_root(tmp_path)
    assert main(["report", str(root)]) == 0
    page = (root / "report.html").read_text()
    assert "<li><b>beta=0.1</b>" in page and "<li><b>beta=1.0</b>" in page  # both runs, overlaid
    assert f"<h2>Sweep <code>{root}</code></h2>" in page and "<td>0.1</td>" in page  # sweep.md's table
    assert page.count('alt="reward-KL frontier"') == 1 and page.count("<h3>beta=") == 2  # each run's eval.md
    runs = report.load_runs([str(root), str(root / "beta=0.1")])  # a sweep beside a run: three runs
    assert [r.sweep for r in runs] == [root, root, None]


def test_report_of_a_broken_sweep_is_one_line(tmp_path, capsys):
    root = _sweep_root(tmp_path)
    shutil.rmtree(root / "beta=1.0")
    refused(capsys, ["report", root], f"run directory '{root / 'beta=1.0'}' does not exist")
    (root / "sweep.json").write_text(json.dumps({"runs": [{"setting": 1}]}))
    refused(capsys, ["report", root], f"{root / 'sweep.json'}: expected an object whose 'runs' is a list")
    assert not (root / "report.html").exists()
