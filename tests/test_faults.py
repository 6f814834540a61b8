"""Fault injection: misuse and faults through the real CLI, with real processes, real signals and a real full disk.

Every case checks the exit code, that stderr is one line with no traceback, that the culprit is named, and (byte for
byte) that no file that existed before the command changed. The classes are those of docs/reliability.md:
1. an output never destroys an input; 2. one run per directory; 3. resume never silently starts over, and a damaged
checkpoint is named; 4. full disks and signals end in one line naming the last good checkpoint; 5. every setting and
every file read is checked at start.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import LLAMA2_TOKENIZER, tiny_llama
from dpokit import checkpoint as C
from dpokit.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [{"prompt": f"Question {i}: is it good?", "chosen": " Yes, it is good" + "!" * i, "rejected": " No."}
         for i in range(6)]
COMMON = ["max_steps=2", "per_device_train_batch_size=2", "save_steps=0", "disable_tqdm=true", "logging_steps=1",
          "seed=0", "learning_rate=0.01", "max_length=64"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def save_model(directory: Path, **overrides) -> Path:
    from transformers import AutoTokenizer

    tiny_llama(vocab_size=32000, **{"hidden_size": 16, "intermediate_size": 32, **overrides}).save_pretrained(directory)
    AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return path


def dpo(model, out, data, *more) -> list[str]:
    return ["dpo", f"model_name_or_path={model}", f"output_dir={out}", f"train_file={data}", *COMMON, *more]


def snapshot(*roots: Path) -> dict:
    """sha256 of every file under `roots` (files or directories)."""
    files = {}
    for root in roots:
        for path in ([root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())):
            files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def run(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def refused(capsys, argv, expected, protect, code=2) -> str:
    """Run `argv`, expect exit `code`, one line holding every `expected` text, and no change under `protect`."""
    before = snapshot(*protect)
    got, err = run(argv, capsys)
    line = one_line(err)
    assert got == code, line
    for text in [expected] if isinstance(expected, str) else expected:
        assert text in line, line
    assert snapshot(*protect) == before, "a file that existed before the command changed"
    return line


def cli_process(args, env=None, **kw) -> subprocess.Popen:
    environment = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                       HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "dpokit", *map(str, args)], env=environment, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def final_weights(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------------------------
# 1. An output never destroys an input


def test_training_output_dir_may_not_be_contain_or_lie_inside_an_input(tmp_path, model_dir, pairs_file, capsys):
    refused(capsys, dpo(model_dir, model_dir, pairs_file), ["output_dir", "is model_name_or_path"], [model_dir])
    refused(capsys, dpo(model_dir, model_dir / "run", pairs_file), "lies inside model_name_or_path", [model_dir])
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(pairs_file, data / "pairs.jsonl")
    # Even told to overwrite, an output_dir holding the training data is refused: overwriting would remove it.
    refused(capsys, dpo(model_dir, data, data / "pairs.jsonl", "overwrite_output_dir=true"), "contains train_file",
            [data])
    ref = shutil.copytree(model_dir, tmp_path / "ref")
    refused(capsys, dpo(model_dir, ref, pairs_file, f"ref_model_name_or_path={ref}"),
            "is ref_model_name_or_path", [ref])
    link = tmp_path / "link-to-model"
    link.symlink_to(model_dir)
    refused(capsys, dpo(model_dir, link, pairs_file), "is model_name_or_path", [model_dir])  # links resolved


def test_an_output_dir_holding_another_models_files_is_refused(tmp_path, model_dir, pairs_file, capsys):
    other = shutil.copytree(model_dir, tmp_path / "downloaded-model")
    line = refused(capsys, dpo(model_dir, other, pairs_file), "holds files no dpokit run wrote", [other])
    assert "config.json" in line and "overwrite_output_dir" in line


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, model_dir, pairs_file):
    out = tmp_path_factory.mktemp("lora") / "run"
    assert main(dpo(model_dir, out, pairs_file, "use_peft=true", "lora_r=2")) == 0
    return out


def test_export_never_replaces_the_run_it_merges_or_its_base(tmp_path, lora_run, model_dir, capsys):
    parent = lora_run.parent
    refused(capsys, ["export", lora_run, parent, "--merge", "--overwrite"], ["contains", str(lora_run)],
            [lora_run, model_dir])
    refused(capsys, ["export", lora_run, model_dir, "--merge", "--overwrite"], "is the base model", [lora_run, model_dir])


def test_data_tools_report_pairs_and_eval_never_write_over_what_they_read(tmp_path, stopped_run, model_dir,
                                                                          pairs_file, capsys):
    data = shutil.copy(pairs_file, tmp_path / "pairs.jsonl")
    refused(capsys, ["data", "convert", data, data], ["OUTPUT", "is INPUT"], [data])
    refused(capsys, ["data", "filter", data, tmp_path / "x" / ".." / "pairs.jsonl", "--dedup"], "is INPUT", [data])
    refused(capsys, ["data", "split", data, "--eval_fraction", "0.5", "--train_out", data, "--eval_out",
                     tmp_path / "e.jsonl"], "--train_out", [data])
    run = stopped_run[0]
    refused(capsys, ["report", run, "--output", run / "metrics.jsonl"], ["--output", "metrics.jsonl"], [run])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Question: is it good?"}) + "\n")
    refused(capsys, ["pairs", "--model", run, "--prompts", prompts, "--judge", "implicit", "--output", prompts],
            "is --prompts", [prompts, run])
    refused(capsys, ["eval", "--model", run, "--ref", run, "--pairs", data], "is the policy itself", [run, data])
    refused(capsys, ["eval", "--model", run, "--ref", model_dir, "--pairs", data, "--output_dir", model_dir],
            "lies inside --ref", [run, model_dir, data])


def test_every_path_option_has_its_role_and_no_output_lands_on_an_input_or_another_output(tmp_path, stopped_run,
                                                                                         pairs_file, capsys):
    """The rule lives in the parser (`reads=`/`writes=` on each path option), so it holds for every command: outputs
    that are an input of another kind (--add, --db, --items, the audited run) or each other are refused too."""
    run = stopped_run[0]
    data = shutil.copy(pairs_file, tmp_path / "pairs.jsonl")
    extra = shutil.copy(data, tmp_path / "extra.jsonl")
    db = tmp_path / "labels.sqlite"
    assert main(["annotate", "tokens", "--db", str(db), "--annotators", "ann"]) == 0
    capsys.readouterr()
    gc.collect()  # closes that command's connection, which moves SQLite's write-ahead log into the file
    protect = [run, data, extra, db]
    refused(capsys, ["data", "filter", data, extra, "--add", extra], "OUTPUT", protect)
    refused(capsys, ["data", "audit", data, "--model", run, "--output", run / "metrics.jsonl"],
            ["--output", "lies inside --model"], protect)
    refused(capsys, ["data", "audit", data, "--model", run, "--output", tmp_path / "a.jsonl", "--top", "2",
                     "--items", tmp_path / "a.jsonl"], ["--items", "two outputs may not share a path"], protect)
    # The default items file (OUTPUT-topK.jsonl) is checked like a given one.
    named_like = shutil.copy(data, tmp_path / "audit-top2.jsonl")
    refused(capsys, ["data", "audit", named_like, "--model", run, "--output", tmp_path / "audit.jsonl", "--top", "2"],
            ["--items", "is PAIRS"], [*protect, named_like])
    refused(capsys, ["data", "split", data, "--eval_fraction", "0.5", "--train_out", tmp_path / "s.jsonl",
                     "--eval_out", tmp_path / "." / "s.jsonl"], "two outputs may not share a path", protect)
    refused(capsys, ["annotate", "tokens", "--db", db, "--annotators", "bob", "--output", db], "is --db", protect)
    refused(capsys, ["report", run, "--output", run / "model.safetensors"],
            ["would replace a file of the run", "model.safetensors"], protect)
    refused(capsys, ["report", run, "--output", run / "checkpoint-2"], "would replace a file of the run", protect)
    refused(capsys, ["report", run, "--output", run.parent], ["--output", "contains"], protect)
    refused(capsys, ["eval", "--model", run, "--prompts", data, "--judge", "implicit", "--save_samples",
                     run / "metrics.jsonl"], ["--save_samples", "would replace a file of the evaluated model"], protect)
    # Beside the run's files, never over them: a new page, and a page the report wrote before, may be (re)written.
    before = snapshot(run)
    for _ in range(2):
        assert main(["report", str(run), "--output", str(run / "curves.html")]) == 0
    assert snapshot(run).items() >= before.items() and (run / "curves.html").is_file()
    (run / "curves.html").unlink()


# --------------------------------------------------------------------------------------------------------------------
# 2. One run per directory


def test_a_second_run_on_a_live_directory_is_refused_and_the_first_is_unharmed(tmp_path, model_dir, pairs_file,
                                                                                 lora_run):
    common = ["max_steps=2", "save_steps=1"]
    alone, shared = tmp_path / "alone", tmp_path / "shared"
    # The first run's checkpoint save waits until the second process has been answered.
    answered = tmp_path / "answered"
    first = cli_process(dpo(model_dir, shared, pairs_file, *common), env={C.SLOW_SAVE_ENV: str(answered)})
    deadline = time.time() + 60
    while not (shared / ".tmp-checkpoint-1").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, first.communicate()
    second = cli_process(dpo(model_dir, shared, pairs_file, *common, "--resume"))
    _, err = second.communicate(timeout=120)
    # Refused at once: before a start reads its tokenizer, data or model (here none of them could load), and an
    # export --overwrite that would replace the directory is refused too.
    nothing = tmp_path / "no-model"
    nothing.mkdir()
    third = cli_process(dpo(nothing, shared, tmp_path / "missing.jsonl", *common, "overwrite_output_dir=true"))
    _, third_err = third.communicate(timeout=120)
    fourth = cli_process(["export", lora_run, shared, "--merge", "--overwrite"])
    _, fourth_err = fourth.communicate(timeout=120)
    answered.touch()
    for process, text in ((second, err), (third, third_err), (fourth, fourth_err)):
        assert process.returncode == 2, text
        line = one_line(text)
        assert "is in use by another run" in line and f"pid {first.pid}" in line and os.uname().nodename in line
    assert (shared / ".tmp-checkpoint-1").exists() or (shared / "checkpoint-1").exists()  # its save was not touched
    _, err = first.communicate(timeout=180)
    assert first.returncode == 0, err
    assert main(dpo(model_dir, alone, pairs_file, *common)) == 0
    assert same_weights(final_weights(shared), final_weights(alone))
    assert [json.loads(x)["loss"] for x in (shared / "metrics.jsonl").read_text().splitlines()] == \
           [json.loads(x)["loss"] for x in (alone / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------------------------------
# 3. Resume never silently starts over; a damaged checkpoint is named


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, model_dir, pairs_file):
    """A run of 4 steps with checkpoints 1-4 (the last step's too, as transformers saves it), and its final weights
    (the uninterrupted result)."""
    out = tmp_path_factory.mktemp("full") / "run"
    assert main(dpo(model_dir, out, pairs_file, "max_steps=4", "save_steps=1")) == 0
    return out, final_weights(out)


def as_killed(run: Path, target: Path) -> Path:
    """A copy of `run` as a kill during its last step leaves it: checkpoints 1-3, no final model or tokenizer."""
    shutil.copytree(run, target)
    shutil.rmtree(target / "checkpoint-4")
    C.write_latest(target, target / "checkpoint-3")
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (target / name).unlink(missing_ok=True)
    return target


def resume(model_dir, out, pairs_file, *more) -> list[str]:
    return dpo(model_dir, out, pairs_file, "max_steps=4", "save_steps=1", *more)


@pytest.mark.parametrize("damage", ["pointer deleted", "pointer corrupt", "pointer names a deleted checkpoint"])
def test_a_bad_latest_pointer_resumes_from_the_newest_complete_checkpoint(tmp_path, damage, stopped_run, model_dir,
                                                                          pairs_file, capsys):
    run_dir, uninterrupted = stopped_run
    out = as_killed(run_dir, tmp_path / "run")
    pointer = out / C.LATEST
    if damage == "pointer deleted":
        pointer.unlink()
    elif damage == "pointer corrupt":
        pointer.write_bytes(b"\x00\xff garbage \x80")
    else:
        pointer.write_text("checkpoint-7\n")
    assert main(resume(model_dir, out, pairs_file, "--resume")) == 0
    said = capsys.readouterr().out
    assert "resuming from checkpoint-3, the newest complete checkpoint" in said
    assert "resumed from" in said and "at step 3" in said
    assert same_weights(final_weights(out), uninterrupted)


def test_a_truncated_latest_checkpoint_is_named_and_the_previous_one_resumes_exactly(tmp_path, stopped_run, model_dir,
                                                                                     pairs_file, capsys):
    run_dir, uninterrupted = stopped_run
    out = as_killed(run_dir, tmp_path / "run")
    weights = out / "checkpoint-3" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    line = refused(capsys, resume(model_dir, out, pairs_file, "--resume"),
                   ["checkpoint-3 is damaged", "model.safetensors", f"resume_from_checkpoint={out / 'checkpoint-2'}"],
                   [out])
    assert "the manifest says" in line
    assert main(resume(model_dir, out, pairs_file, f"resume_from_checkpoint={out / 'checkpoint-2'}")) == 0
    assert same_weights(final_weights(out), uninterrupted)


def test_a_checkpoint_state_missing_keys_is_named(tmp_path, stopped_run, model_dir, pairs_file, capsys):
    out = as_killed(stopped_run[0], tmp_path / "run")
    ckpt = out / "checkpoint-3"
    state = json.loads((ckpt / C.STATE_JSON).read_text())
    del state["position"], state["meter"]
    (ckpt / C.STATE_JSON).write_text(json.dumps(state))
    (ckpt / C.MANIFEST).unlink()  # as a checkpoint from before manifests, so the state itself is what is checked
    refused(capsys, resume(model_dir, out, pairs_file, "--resume"),
            [f"{ckpt / C.STATE_JSON}: lacks position, meter"], [out])


@pytest.mark.parametrize("field, value, expected", [
    ("global_step", "3", "global_step must be a count"), ("position", [0], "position must be [epoch, micro-batch]"),
    ("data", 7, "lacks data.train_rows"), ("config", [], "config must be an object")])
def test_a_checkpoint_state_of_the_wrong_types_is_named(tmp_path, stopped_run, model_dir, pairs_file, capsys, field,
                                                        value, expected):
    out = as_killed(stopped_run[0], tmp_path / "run")
    ckpt = out / "checkpoint-3"
    state = json.loads((ckpt / C.STATE_JSON).read_text())
    (ckpt / C.STATE_JSON).write_text(json.dumps({**state, field: value}))
    C.write_manifest(ckpt)  # a manifest that matches: the state's own content is what is checked
    refused(capsys, resume(model_dir, out, pairs_file, "--resume"), [f"{ckpt / C.STATE_JSON}: {expected}"], [out])


def test_a_refused_resume_leaves_the_runs_record_as_it_was(tmp_path, stopped_run, model_dir, pairs_file, capsys):
    out = as_killed(stopped_run[0], tmp_path / "run")
    refused(capsys, resume(model_dir, out, pairs_file, "--resume", "beta=0.5"), "the config differs in beta", [out])
    refused(capsys, resume(model_dir, out, pairs_file, "--resume", "max_steps=1"), "beyond this run's 1 steps", [out])


def test_every_checkpoint_damaged_refuses_rather_than_starting_over(tmp_path, stopped_run, model_dir, pairs_file,
                                                                    capsys):
    out = as_killed(stopped_run[0], tmp_path / "run")
    (out / C.LATEST).unlink()
    for step in (1, 2, 3):
        (out / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"")
    refused(capsys, resume(model_dir, out, pairs_file, "--resume"),
            ["the newest checkpoint", "checkpoint-3 is damaged", "no earlier complete checkpoint"], [out])


# --------------------------------------------------------------------------------------------------------------------
# 4. Full disks and signals: one line, the last good checkpoint named


@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs of a few MiB, mounted by the test (CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root (CI runs as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


def mount(disk: Path, mib: float) -> None:
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(mib * 1024)}k", "tmpfs", str(disk)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def test_a_full_disk_during_a_checkpoint_ends_in_one_line_and_leaves_no_partial_files(tmp_path, small_disk, model_dir,
                                                                                       pairs_file, capsys):
    # Size the disk from a real checkpoint: room for the run's files and one checkpoint, not for a second one.
    probe = tmp_path / "probe"
    assert main(dpo(model_dir, probe, pairs_file, "max_steps=2", "save_steps=1")) == 0
    size = sum(p.stat().st_size for p in (probe / "checkpoint-1").rglob("*") if p.is_file())
    mount(small_disk, 1.5 * size / 2**20)
    out = small_disk / "run"
    line = refused(capsys, dpo(model_dir, out, pairs_file, "max_steps=3", "save_steps=1"),
                   ["cannot write", "checkpoint-2", "No space left on device",
                    f"the last complete checkpoint, {out / 'checkpoint-1'}, is intact"], [model_dir, pairs_file],
                   code=1)
    assert line.startswith("dpokit dpo: error: ")
    assert not list(out.glob(".tmp-*")), "a partial checkpoint was left, holding space"
    assert C.read_latest(out) == out / "checkpoint-1" and C.problem(out / "checkpoint-1") is None


def fill(disk: Path) -> None:
    """Write zeros into `disk` until the filesystem is full."""
    with open(disk / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def test_a_full_or_read_only_disk_ends_every_command_in_one_line_naming_the_path(tmp_path, small_disk, lora_run,
                                                                                stopped_run, pairs_file, capsys):
    run = stopped_run[0]
    mount(small_disk, 0.5)
    fill(small_disk)
    writers = {"export": ["export", lora_run, small_disk / "merged", "--merge"],
               "report": ["report", run, "--output", small_disk / "report.html"],
               "data convert": ["data", "convert", pairs_file, small_disk / "rows.jsonl"],
               "data split": ["data", "split", pairs_file, "--eval_fraction", "0.5", "--train_out",
                              small_disk / "t.jsonl", "--eval_out", small_disk / "e.jsonl"],
               "eval": ["eval", "--model", run, "--pairs", pairs_file, "--output_dir", small_disk / "eval"],
               "annotate tokens": ["annotate", "tokens", "--db", tmp_path / "labels.sqlite", "--annotators", "ann",
                                   "--output", small_disk / "tokens.tsv"]}
    for reason in ("No space left on device", "Read-only file system"):
        if reason.startswith("Read-only"):
            (small_disk / "filler").unlink()
            subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
        for name, argv in writers.items():
            line = refused(capsys, argv, ["cannot write", str(small_disk), reason], [run, lora_run, pairs_file],
                           code=1)
            assert "dpokit" in line or line.startswith("error: "), (name, line)
            left = sorted(p.name for p in small_disk.iterdir() if p.name != "filler")
            assert left in ([], ["eval"]), (name, left)  # no temporary file or directory holds space
            assert not any(small_disk.rglob(".*tmp*")), name
    # A run on a read-only disk: `dpokit eval` writes its record into the run directory by default.
    subprocess.run(["umount", str(small_disk)], check=True)
    mount(small_disk, 8)
    copy = small_disk / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoint-*"))
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    refused(capsys, ["eval", "--model", copy, "--ref", run, "--pairs", pairs_file],
            ["cannot write", str(copy / "eval.json"), "Read-only file system"], [copy, run, pairs_file], code=1)


@pytest.fixture(scope="module")
def slow_model_dir(tmp_path_factory):
    """Steps of a few hundred milliseconds, so a signal lands between two of them."""
    return save_model(tmp_path_factory.mktemp("slow"), hidden_size=192, intermediate_size=384, num_hidden_layers=2)


def test_sigterm_checkpoints_the_step_and_a_resume_ends_bitwise_equal(tmp_path, slow_model_dir, pairs_file):
    common = ["max_steps=6", "per_device_train_batch_size=6", "gradient_accumulation_steps=2"]
    out, alone = tmp_path / "run", tmp_path / "alone"
    job = cli_process(dpo(slow_model_dir, out, pairs_file, *common))
    deadline = time.time() + 120
    while job.poll() is None and time.time() < deadline and len(_steps(out)) < 2:
        time.sleep(0.01)
    seen = len(_steps(out))
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 143, err
    line = one_line(err)
    stopped = C.read_latest(out)
    assert stopped is not None and C.checkpoint_step(stopped) in (seen, seen + 1), (seen, stopped)  # within one step
    assert f"stopped: SIGTERM after step {C.checkpoint_step(stopped)} of 6" in line and str(stopped) in line
    assert main(dpo(slow_model_dir, out, pairs_file, *common, "--resume")) == 0
    assert main(dpo(slow_model_dir, alone, pairs_file, *common)) == 0
    assert same_weights(final_weights(out), final_weights(alone))


def test_sigint_names_the_step_and_the_last_checkpoint(tmp_path, slow_model_dir, pairs_file):
    out = tmp_path / "run"
    job = cli_process(dpo(slow_model_dir, out, pairs_file, "max_steps=8", "save_steps=1"))
    deadline = time.time() + 120
    while job.poll() is None and time.time() < deadline and C.read_latest(out) is None:
        time.sleep(0.01)
    job.send_signal(signal.SIGINT)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 130, err
    line = one_line(err)
    assert "interrupted (SIGINT) during step" in line and "the last complete checkpoint" in line


def _steps(out: Path) -> list:
    path = out / "metrics.jsonl"
    return [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


# --------------------------------------------------------------------------------------------------------------------
# 5. Settings and files checked at start


def test_damaged_or_unsafe_model_files_are_named_before_training(tmp_path, model_dir, pairs_file, capsys):
    empty = shutil.copytree(model_dir, tmp_path / "empty")
    (empty / "model.safetensors").write_bytes(b"")
    refused(capsys, dpo(empty, tmp_path / "o1", pairs_file), ["model.safetensors is damaged or incomplete", "0 bytes"],
            [empty])
    cut = shutil.copytree(model_dir, tmp_path / "cut")
    weights = cut / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 100)
    refused(capsys, dpo(cut, tmp_path / "o2", pairs_file), ["model.safetensors is damaged or incomplete", "cut short"],
            [cut])
    pickled = shutil.copytree(model_dir, tmp_path / "pickled")
    state = tiny_llama(vocab_size=32000, hidden_size=16, intermediate_size=32).state_dict()
    (pickled / "model.safetensors").unlink()
    torch.save({**state, "extra": _RunsCode()}, pickled / "pytorch_model.bin")
    line = refused(capsys, dpo(pickled, tmp_path / "o3", pairs_file),
                   ["(pytorch_model.bin) hold non-tensor objects", "refused as possibly unsafe"], [pickled])
    assert "weights_only" not in line and "trust" not in line  # never advises turning the protection off


def test_damaged_adapters_judges_manifests_configs_and_weights_are_one_line(tmp_path, lora_run, stopped_run,
                                                                          model_dir, pairs_file, capsys):
    cut = shutil.copytree(lora_run, tmp_path / "cut")
    adapter = cut / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:200])
    for argv in (["export", cut, tmp_path / "m1", "--merge"], ["eval", "--model", cut, "--pairs", pairs_file]):
        refused(capsys, argv, [str(cut), "adapter_model.safetensors is damaged or incomplete"], [cut])
    typed = shutil.copytree(lora_run, tmp_path / "typed")
    config = json.loads((typed / "adapter_config.json").read_text())
    (typed / "adapter_config.json").write_text(json.dumps({**config, "r": "eight"}))
    refused(capsys, ["export", typed, tmp_path / "m2", "--merge"], ["adapter_config.json", "r must be an integer"],
            [typed])
    (typed / "adapter_config.json").write_text('{"r": 8,')
    refused(capsys, ["export", typed, tmp_path / "m3", "--merge"], ["adapter_config.json:1: invalid JSON"], [typed])

    judge = tmp_path / "judge.py"
    judge.write_text("def score(:\n")
    refused(capsys, ["eval", "--model", stopped_run[0], "--prompts", pairs_file, "--judge", f"{judge}:score",
                     "--output_dir", tmp_path / "e"], ["judge", "SyntaxError", "judge.py"], [judge])

    config_file = tmp_path / "listkey.yaml"
    config_file.write_text("? [learning_rate, beta]\n: 1\n")
    refused(capsys, ["dpo", "--config", config_file], [f"{config_file}:1", "a key must be a name, got a list"],
            [config_file])

    run = shutil.copytree(stopped_run[0], tmp_path / "deep")
    (run / "checkpoint-4" / "manifest.json").write_text("[" * 100_000)
    refused(capsys, dpo(model_dir, run, pairs_file, "max_steps=4", "save_steps=1", "--resume"),
            ["checkpoint-4 is damaged (manifest.json is unreadable)", "resume_from_checkpoint="], [run])

    nested = shutil.copytree(model_dir, tmp_path / "nested")
    (nested / "config.json").write_text("[" * 100_000)
    refused(capsys, dpo(nested, tmp_path / "o", pairs_file), [f"{nested / 'config.json'}", "nested too deeply"],
            [nested])
    (nested / "config.json").write_text("[1, 2]")
    refused(capsys, dpo(nested, tmp_path / "o", pairs_file), [f"{nested / 'config.json'} holds a JSON list"], [nested])

    other = shutil.copytree(model_dir, tmp_path / "other")
    settings = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**settings, "hidden_size": 32, "head_dim": 8}))
    refused(capsys, dpo(other, tmp_path / "o", pairs_file),
            ["its weights do not fit its config.json", "in the weights", "by the config"], [other])


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this should never run",))


def test_model_settings_are_checked_against_the_model_before_its_weights_load(tmp_path, model_dir, pairs_file,
                                                                              capsys, monkeypatch):
    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("the model's weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    refused(capsys, dpo(model_dir, tmp_path / "o1", pairs_file, "model_init_kwargs={bogus: 1}"),
            "model_init_kwargs: 'bogus' is neither a from_pretrained option nor a setting", [model_dir])
    refused(capsys, dpo(model_dir, tmp_path / "o2", pairs_file, "attn_implementation=flash_attention_2"),
            "attn_implementation: flash_attention_2 needs the flash_attn package", [model_dir])
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_rows_longer_than_the_models_positions_are_refused_at_start(tmp_path, pairs_file, capsys):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    long_rows = tmp_path / "long.jsonl"
    long_rows.write_text(json.dumps({"prompt": "word " * 30, "chosen": " yes", "rejected": " no"}) + "\n" +
                         "".join(json.dumps(r) + "\n" for r in PAIRS))
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=32000, n_positions=16, n_embd=16, n_layer=1, n_head=2)).save_pretrained(gpt2)
    AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER).save_pretrained(gpt2)
    capsys.readouterr()  # what building the model printed (transformers warns once per process) is not the command's
    refused(capsys, dpo(gpt2, tmp_path / "o1", long_rows),
            [f"{long_rows}:1", "more than the model can place", "learned up to 16"], [gpt2])
    # Every command that runs the model on pairs checks the same limit: eval and audit too, never an IndexError.
    ref = shutil.copytree(gpt2, tmp_path / "gpt2-ref")
    refused(capsys, ["eval", "--model", gpt2, "--ref", ref, "--pairs", long_rows, "--output_dir", tmp_path / "e"],
            [f"{long_rows}:1", "more than the model can place"], [gpt2, ref, long_rows])
    refused(capsys, ["data", "audit", long_rows, "--model", gpt2, "--ref", ref, "--output", tmp_path / "a.jsonl"],
            [f"{long_rows}:1", "more than the model can place"], [gpt2, ref, long_rows])
    rope = save_model(tmp_path / "rope", max_position_embeddings=16)
    refused(capsys, dpo(rope, tmp_path / "o2", long_rows),
            ["more than the model can place", "max_position_embeddings is 16 and no RoPE scaling"], [rope])
    # A RoPE scaling that covers the length is what makes such rows trainable.
    scaled = save_model(tmp_path / "scaled", max_position_embeddings=16,
                        rope_scaling={"rope_type": "linear", "factor": 4.0})
    assert main(dpo(scaled, tmp_path / "o3", long_rows)) == 0
