"""The guarded readers (`dpokit.fileio`): every failure one line naming the file and, where known, the line."""

from __future__ import annotations

import gzip
import json
import sys

import pytest

from dpokit.errors import ConfigError, DataError
from dpokit.fileio import JsonLines, read_json, read_text, read_yaml

DEEP = 100_000  # far past Python's recursion limit, which the readers must not raise


def _one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_read_json_names_the_file_and_line(tmp_path):
    f = tmp_path / "c.json"
    f.write_text('{\n  "a": 1,\n  "b": \n}\n')
    with pytest.raises(DataError) as e:
        read_json(f)
    assert _one_line(e) == f"{f}:4: invalid JSON (Expecting value at column 1)"
    f.write_bytes(b'{\n"a": "\xff"}')
    with pytest.raises(DataError) as e:
        read_json(f)
    assert _one_line(e) == f"{f}:2: invalid UTF-8 (byte 0xff)"
    with pytest.raises(DataError) as e:
        read_json(tmp_path / "missing.json")
    assert _one_line(e) == f"{tmp_path / 'missing.json'}: cannot read (No such file or directory)"
    f.write_bytes(gzip.compress(b'{"a": 1}'))  # gzip content is read as such, whatever the name
    assert read_json(f) == {"a": 1}


def test_deep_nesting_is_refused_without_raising_the_recursion_limit(tmp_path):
    limit = sys.getrecursionlimit()
    f = tmp_path / "deep.json"
    f.write_text("[" * DEEP + "]" * DEEP)
    with pytest.raises(DataError) as e:
        read_json(f)
    assert _one_line(e) == f"{f}: JSON nested too deeply to read (deeper than Python's parser can follow)"
    lines = tmp_path / "deep.jsonl"
    lines.write_text('{"a": 1}\n{"a": ' + "[" * DEEP + "]" * DEEP + "}\n")
    with pytest.raises(DataError) as e:
        list(JsonLines(lines))
    assert _one_line(e).startswith(f"{lines}:2: JSON nested too deeply")
    y = tmp_path / "deep.yaml"
    y.write_text("a: " + "[" * DEEP + "]" * DEEP + "\n")
    with pytest.raises(ConfigError) as e:
        read_yaml(y)
    assert _one_line(e).startswith(f"{y}: YAML nested too deeply")
    assert sys.getrecursionlimit() == limit


def test_json_lines_skip_blank_lines_and_name_bad_ones(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"step": 1}\n\n{"step": 3}\n')
    assert list(JsonLines(f)) == [(1, {"step": 1}), (3, {"step": 3})]
    for content, message in [(b'{"step": 1}\n[1]\n', "2: expected a JSON object, got list"),
                             (b'{"step": 1}\n{"s": "\xe9"}\n', "2: invalid UTF-8 (byte 0xe9 at column 8)"),
                             (b'{"step": 1}\n{"step": \n{"step": 3}\n', "2: invalid JSON (Expecting value at column 10)")]:
        f.write_bytes(content)
        with pytest.raises(DataError) as e:
            list(JsonLines(f, appended=True))
        assert _one_line(e) == f"{f}:{message}"


def test_a_log_cut_short_by_a_kill_loses_only_its_last_line(tmp_path):
    f = tmp_path / "metrics.jsonl"
    whole = b'{"step": 1, "loss": 0.7}\n{"step": 2, "loss": 0.6}\n'
    for cut in (b'{"step": 3, "lo', b'{"step": 3, "note": "caf\xc3'):  # mid-key; mid-character (invalid UTF-8)
        f.write_bytes(whole + cut)
        lines = JsonLines(f, appended=True)
        assert [n for n, _ in lines] == [1, 2] and lines.cut_short == 3
        with pytest.raises(DataError, match=rf"{f.name}:3: invalid"):
            list(JsonLines(f))  # a data file is never a log: its last line must be whole
    f.write_bytes(whole + b'{"step": 3}')  # complete, only the newline is missing: kept
    lines = JsonLines(f, appended=True)
    assert [n for n, _ in lines] == [1, 2, 3] and lines.cut_short is None
    f.write_bytes(whole + b'{"step": 3, "lo\n')  # written whole (newline and all): not a kill's doing
    with pytest.raises(DataError, match=rf"{f.name}:3: invalid JSON"):
        list(JsonLines(f, appended=True))


def test_broken_gzip_stream_is_one_line(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_bytes(gzip.compress(json.dumps({"a": 1}).encode() + b"\n" * 100)[:15])
    with pytest.raises(DataError) as e:
        list(JsonLines(f))
    assert _one_line(e).startswith(f"{f}: cannot read gzip file (")


def test_read_yaml_gives_a_mapping_or_one_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("")
    assert read_yaml(f) == {}
    f.write_text("a: 1\nb: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"{f.name}:3: invalid YAML \("):
        read_yaml(f)
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=rf"{f.name}: expected a mapping of keys to values, got list$"):
        read_yaml(f)
    f.write_bytes(b"a: \xff\n")
    with pytest.raises(DataError, match=rf"{f.name}:1: invalid UTF-8 \(byte 0xff\)$"):
        read_yaml(f)


def test_read_text_names_the_option(tmp_path):
    with pytest.raises(DataError) as e:
        read_text(tmp_path / "t.jinja", "--chat_template")
    assert _one_line(e) == f"--chat_template {tmp_path / 't.jinja'}: cannot read (No such file or directory)"


# --------------------------------------------------------------------------------------------------------------------
# Writing


def test_a_failed_write_keeps_the_old_content_removes_its_temporary_and_names_the_path(tmp_path):
    from dpokit.errors import WriteError
    from dpokit.fileio import atomic_path, atomic_write_text

    target = tmp_path / "rows.jsonl"
    atomic_write_text(target, "old\n")
    for failure in (OSError(28, "No space left on device"), RuntimeError("[enforce fail at inline_container.cc:672] "
                                                                         "PytorchStreamWriter failed writing file")):
        with pytest.raises(WriteError) as e:
            with atomic_path(target) as tmp:
                tmp.write_text("half")
                raise failure
        assert str(target) in _one_line(e) and ("No space left" in str(e.value) or "inline_container" in str(e.value))
        assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]
    # A directory arrives whole too, replacing the old one only once it is complete.
    out = tmp_path / "model"
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("1")
    with pytest.raises(WriteError):
        with atomic_path(out) as tmp:
            tmp.mkdir()
            raise OSError(5, "Input/output error")
    assert (out / "a").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["model", "rows.jsonl"]


def test_removing_the_temporary_never_hides_why_the_write_failed(tmp_path, monkeypatch):
    """On a read-only filesystem even removing a file that was never made fails (EROFS): the error the user sees is
    still the write's."""
    import pathlib

    from dpokit.errors import WriteError
    from dpokit.fileio import atomic_write_text

    def read_only(self, *args, **kwargs):
        raise OSError(30, "Read-only file system", str(self))

    monkeypatch.setattr(pathlib.Path, "unlink", read_only)
    monkeypatch.setattr(pathlib.Path, "write_text", read_only)
    with pytest.raises(WriteError) as e:
        atomic_write_text(tmp_path / "eval.json", "{}")
    assert _one_line(e) == f"cannot write {tmp_path / 'eval.json'}: [Errno 30] Read-only file system"
