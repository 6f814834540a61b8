"""What people are asked to compare: items read from a file, each a prompt and two responses `a` and `b`.

* A preference file of any format dpokit reads (`dpokit.data.preference_examples`): `a` is the file's chosen
  response, `b` its rejected one. The page shows them in random order, so the file's label is never shown; the
  export then says whether people agreed with it.
* Scored samples (``dpokit pairs --scored_output``, or any ``scored`` rows): for each prompt two of its responses
  are drawn at random (seeded) and shown blind; their scores are kept with the item, never shown.
* The samples of `dpokit eval --save_samples`: `a` is the policy's sample, `b` the reference's sample of the same
  prompt and seed, for a blind A/B comparison. Two identical samples are not shown (nobody can tell them apart)
  and count as ties.
* A Label Studio JSON export of pairwise tasks (`dpokit.annotate.labelstudio`).

Every item names where it came from (``file.jsonl:LINE``) and has an id computed from its content, so loading the
same file into a database again adds nothing, and loading a longer version of it adds only the new items.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from dpokit.annotate.store import item_id
from dpokit.errors import DataError

AB_COLUMNS = {"prompt", "policy", "reference"}


@dataclass
class ItemSet:
    kind: str
    items: list[dict]
    summary: str
    decisions: list[dict] = field(default_factory=list)
    """Decisions the file already holds (a Label Studio export with annotations)."""


def as_text(value) -> str:
    """A prompt or response for reading as one text: the text itself, or the messages as ``role: content``."""
    if isinstance(value, str):
        return value
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in value)


def read_items(source, *, seed: int = 0) -> ItemSet:
    """The items of a file (module docstring)."""
    from dpokit import data as D
    from dpokit.annotate import labelstudio

    rows, name = D.load_rows(source)
    if len(rows) == 0:
        raise DataError(f"{name}: no rows")
    columns = set().union(*(r.keys() for r in rows if isinstance(r, dict)))
    if labelstudio.is_export(rows):
        return labelstudio.read_tasks(rows, name)
    if AB_COLUMNS <= columns:
        return _ab_items(rows, name)
    if D.detect_preference_format(rows, name) == "scored":
        return _scored_items(rows, name, seed)
    examples, report = D.preference_examples(rows, name)
    items = []
    for ex in examples:
        extra = rows[ex.row].get("audit") if isinstance(rows[ex.row].get("audit"), dict) else None
        meta = {"line": _line(report, ex.row), "label": "a"}
        if extra is not None:
            meta["audit"] = extra  # an item written by `dpokit data audit --top`: where the pair came from
        items.append({"id": item_id("pairs", ex.prompt, ex.system, ex.chosen, ex.rejected), "prompt": ex.prompt,
                      "system": ex.system, "a": ex.chosen, "b": ex.rejected, "source": report.where(ex.row),
                      "meta": meta})
    return ItemSet("pairs", items, f"{report.summary()}; a = the file's chosen, b = its rejected")


def _line(report, row: int) -> int:
    from dpokit.data.audit import source_line

    return source_line(report, row)


def _scored_items(rows, name: str, seed: int) -> ItemSet:
    """Two responses per prompt, drawn at random among its distinct ones. The data layer's `all_pairs` pairing
    lists every two responses whose scores differ; a row whose scores are all equal gives none and is counted."""
    from dpokit import data as D

    examples, report = D.preference_examples(rows, name, pair_strategy="all_pairs")
    by_row: dict[int, list] = {}
    firsts = {}
    for ex in examples:
        firsts.setdefault(ex.row, ex)
        texts = by_row.setdefault(ex.row, [])
        for text in (ex.chosen, ex.rejected):
            if text not in texts:
                texts.append(text)
    rng = random.Random(seed)
    items = []
    for row, texts in by_row.items():
        first = firsts[row]
        a, b = rng.sample(texts, 2)
        items.append({"id": item_id("pairs", first.prompt, first.system, a, b), "prompt": first.prompt,
                      "system": first.system, "a": a, "b": b, "source": report.where(row),
                      "meta": {"line": _line(report, row), "responses": len(texts)}})
    return ItemSet("pairs", items, f"{name} (scored): {report.read} rows, {len(items)} items of two responses drawn "
                                   f"with seed {seed}; {report.unpaired} rows with fewer than two differently "
                                   f"scored responses, {report.skipped} skipped")


def _ab_items(rows, name: str) -> ItemSet:
    """`dpokit eval --save_samples` rows: prompt, policy, reference, and where the evaluation was written."""
    lines = getattr(rows, "line_numbers", None)
    items, identical = [], 0
    for i, row in enumerate(rows):
        where = f"{name}:{lines[i]}" if lines is not None else f"{name} row {i + 1}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a row object")
        prompt = row.get("prompt")
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt))):
            raise DataError(f"{where}: field 'prompt': expected text or a list of {{role, content}} messages")
        for key in ("policy", "reference"):
            if not isinstance(row.get(key), str):
                raise DataError(f"{where}: field {key!r}: expected the sampled text")
        meta = {k: row.get(k) for k in ("prompt_index", "sample", "policy_score", "reference_score", "model",
                                        "reference_model", "eval_dir")}
        meta["line"] = lines[i] if lines is not None else i + 1
        same = row["policy"] == row["reference"]
        identical += same
        items.append({"id": item_id("ab", prompt, None, row["policy"], row["reference"],
                                    [row.get("prompt_index"), row.get("sample"), meta["line"]]),
                      "prompt": prompt, "system": None, "a": row["policy"], "b": row["reference"], "source": where,
                      "meta": meta, "serve": not same})
    return ItemSet("ab", items, f"{name}: {len(items)} policy/reference sample pairs for a blind A/B comparison "
                                f"({identical} identical, counted as ties and not shown)")
