"""`dpokit export`: a damaged adapter_config.json is one line naming it, before any model is loaded or written."""

from __future__ import annotations

import pytest

from conftest import refused


@pytest.mark.parametrize("content, message", [
    (b'{"base_model_name_or_path": "base", "peft_type": "LORA"', ":1: invalid JSON (Expecting ',' delimiter"),
    (b"", ":1: invalid JSON (Expecting value at column 1)"),
    (b'{"base_model_name_or_path": "b\xe4se"}', ":1: invalid UTF-8 (byte 0xe4)"),
    (b"[" * 100_000 + b"]" * 100_000, ": JSON nested too deeply to read"),
    (b'["base", "LORA"]', ": expected a JSON object (a peft adapter config), got list"),
    (b'{"base_model_name_or_path": 3, "peft_type": "LORA"}', ": base_model_name_or_path must be a string, got 3"),
    (b'{"base_model_name_or_path": null, "peft_type": "LORA"}', ": base_model_name_or_path is empty"),
])
def test_a_damaged_adapter_config_is_one_line(tmp_path, capsys, content, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_bytes(content)
    refused(capsys, ["export", run, tmp_path / "merged", "--merge"], f"{run / 'adapter_config.json'}{message}",
            unchanged=[run / "adapter_config.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_export_options_are_one_line(tmp_path, capsys):
    refused(capsys, ["export", tmp_path], "the following arguments are required: output_dir, --merge")
