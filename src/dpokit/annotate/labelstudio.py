"""Label Studio's pairwise tasks, read and written, so that a team can move between Label Studio and dpokit.

Label Studio keeps a project's tasks and annotations as a JSON list (its "JSON" export; the same shape imports tasks
with their annotations). For a pairwise project, with the labelling configuration `LABEL_CONFIG`, a task is::

    {"id": 1, "data": {"prompt": "...", "text1": "...", "text2": "..."},
     "annotations": [{"completed_by": 1, "was_cancelled": false, "created_at": "2024-05-01T12:00:00Z",
                      "result": [{"from_name": "pw", "to_name": "pw", "type": "pairwise",
                                  "value": {"selected": "left"}}]}]}

``selected`` is ``left`` (text1 is better) or ``right`` (text2 is better). Label Studio's Pairwise control has no
tie, so `LABEL_CONFIG` adds a ``tie`` Choices control (``{"type": "choices", "value": {"choices": ["Tie"]}}``) and
a ``rationale`` TextArea (``{"type": "textarea", "value": {"text": ["..."]}}``); a skipped task is an annotation
with ``was_cancelled: true``, as Label Studio records a skip.

dpokit writes into each task's ``data.dpokit`` what Label Studio does not keep: the item's id, which of the item's
responses is text1, the prompt and responses as structured values (message lists stay message lists) and the names
of the annotators behind Label Studio's numeric ``completed_by`` ids. Reading a task without it (one made in Label
Studio), text1 is `a` and text2 is `b`, the prompt is the ``prompt`` text, and an annotator is named by the
``completed_by`` object's email where Label Studio exported one, else ``labelstudio-<id>``.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from dpokit.errors import DataError

LABEL_CONFIG = """<View>
  <Header value="Prompt"/>
  <Text name="prompt" value="$prompt"/>
  <Pairwise name="pw" toName="text1,text2"/>
  <View style="display: flex; gap: 1em;">
    <View style="flex: 1;"><Text name="text1" value="$text1"/></View>
    <View style="flex: 1;"><Text name="text2" value="$text2"/></View>
  </View>
  <Choices name="tie" toName="prompt" showInline="true"><Choice value="Tie"/></Choices>
  <TextArea name="rationale" toName="prompt" placeholder="Why (optional)" maxSubmissions="1"/>
</View>
"""


def is_export(rows) -> bool:
    """Rows that are Label Studio tasks: each an object whose ``data`` object holds the two texts."""
    return all(isinstance(r, dict) and isinstance(r.get("data"), dict)
               and ({"text1", "text2"} <= r["data"].keys() or "dpokit" in r["data"]) for r in rows)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


def _seconds(value) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def write_tasks(kind: str, items: list[dict], decisions: list[dict]) -> list[dict]:
    """Label Studio tasks of `items` with their `decisions` (as `Store.items` / `Store.decisions` give them).
    text1 is the response each item's first decision showed on the left (its `a` when it has none)."""
    from dpokit.annotate.items import as_text

    by_item: dict[str, list] = {}
    for d in decisions:
        by_item.setdefault(d["item"], []).append(d)
    names = sorted({d["annotator"] for d in decisions})
    ids = {name: i + 1 for i, name in enumerate(names)}
    tasks, annotation_id = [], 0
    for it in items:
        mine = by_item.get(it["id"], [])
        first = mine[0]["left"] if mine else "a"
        second = "b" if first == "a" else "a"
        prompt = as_text(it["prompt"]) if it["system"] is None else f"{it['system']}\n\n{as_text(it['prompt'])}"
        annotations = []
        for d in mine:
            annotation_id += 1
            result = []
            if d["choice"] in ("a", "b"):
                result.append({"id": f"pw{annotation_id}", "from_name": "pw", "to_name": "pw", "type": "pairwise",
                               "value": {"selected": "left" if d["choice"] == first else "right"}})
            elif d["choice"] == "tie":
                result.append({"id": f"tie{annotation_id}", "from_name": "tie", "to_name": "prompt",
                               "type": "choices", "value": {"choices": ["Tie"]}})
            if d["rationale"]:
                result.append({"id": f"why{annotation_id}", "from_name": "rationale", "to_name": "prompt",
                               "type": "textarea", "value": {"text": [d["rationale"]]}})
            annotations.append({"id": annotation_id, "completed_by": ids[d["annotator"]], "result": result,
                                "was_cancelled": d["choice"] == "skip", "ground_truth": False,
                                "created_at": _iso(d["decided_at"]), "updated_at": _iso(d["decided_at"])})
        tasks.append({"id": it["position"], "data": {
            "prompt": prompt, "text1": as_text(it[first]), "text2": as_text(it[second]),
            "dpokit": {"kind": kind, "item": it["id"], "text1": first, "prompt": it["prompt"], "system": it["system"],
                       "a": it["a"], "b": it["b"], "source": it["source"], "meta": it["meta"],
                       "annotators": {str(ids[d["annotator"]]): d["annotator"] for d in mine}}},
            "annotations": annotations})
    return tasks


def _annotator(annotation: dict, names: dict) -> str:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        if who.get("email"):
            return str(who["email"])
        who = who.get("id")
    if str(who) in names:
        return names[str(who)]
    return f"labelstudio-{who}"


def _decision(annotation: dict, where: str) -> tuple[str, str] | None:
    """(choice as text1/text2/tie/skip, rationale) of one annotation; None when it records no decision."""
    if annotation.get("was_cancelled"):
        return "skip", ""
    choice, rationale = None, ""
    for r in annotation.get("result") or []:
        if not isinstance(r, dict):
            raise DataError(f"{where}: a result is not an object")
        value = r.get("value") if isinstance(r.get("value"), dict) else {}
        if r.get("type") == "pairwise":
            selected = value.get("selected")
            if selected not in ("left", "right"):
                raise DataError(f"{where}: pairwise result selects {selected!r}, not 'left' or 'right'")
            choice = "text1" if selected == "left" else "text2"
        elif r.get("type") == "choices" and "Tie" in (value.get("choices") or []):
            choice = choice or "tie"
        elif r.get("type") == "textarea":
            rationale = "\n".join(t for t in value.get("text") or [] if isinstance(t, str))
    return (choice, rationale) if choice else None


def read_tasks(rows, name: str):
    """Items and decisions of Label Studio tasks (module docstring)."""
    from dpokit.annotate.items import ItemSet
    from dpokit.annotate.store import item_id

    items, decisions, undecided, kinds = [], [], 0, set()
    for i, task in enumerate(rows):
        where = f"{name} task {i + 1}" + (f" (id {task['id']})" if "id" in task else "")
        data = task["data"]
        mine = data.get("dpokit") if isinstance(data.get("dpokit"), dict) else {}
        if mine:
            prompt, system, a, b = mine.get("prompt"), mine.get("system"), mine.get("a"), mine.get("b")
            first = mine.get("text1", "a")
        else:
            prompt, system, a, b, first = data.get("prompt", ""), None, data.get("text1"), data.get("text2"), "a"
        for key, value in (("prompt", prompt), ("text1", a), ("text2", b)):
            if not (isinstance(value, str) or isinstance(value, list)):
                raise DataError(f"{where}: data.{key} is missing or not text")
        if first not in ("a", "b"):
            raise DataError(f"{where}: data.dpokit.text1 must be 'a' or 'b', got {first!r}")
        kind = mine.get("kind", "pairs")
        kinds.add(kind)
        if kind not in ("pairs", "ab") or len(kinds) > 1:
            raise DataError(f"{where}: data.dpokit.kind {kind!r}: expected 'pairs' or 'ab', one kind in a file")
        if a == b and kind == "pairs":
            raise DataError(f"{where}: text1 and text2 are the same text")
        meta = mine.get("meta") if isinstance(mine.get("meta"), dict) else {"task": task.get("id")}
        it = {"id": mine.get("item") or item_id("pairs", prompt, system, a, b), "prompt": prompt, "system": system,
              "a": a, "b": b, "source": mine.get("source") or where, "meta": meta, "serve": a != b}
        items.append(it)
        names = mine.get("annotators") if isinstance(mine.get("annotators"), dict) else {}
        second = "b" if first == "a" else "a"
        for annotation in task.get("annotations") or []:
            if not isinstance(annotation, dict):
                raise DataError(f"{where}: an annotation is not an object")
            found = _decision(annotation, where)
            if found is None:
                undecided += 1
                continue
            choice, rationale = found
            choice = {"text1": first, "text2": second}.get(choice, choice)
            decisions.append({"item": it["id"], "annotator": _annotator(annotation, names), "choice": choice,
                              "left": first, "rationale": rationale,
                              "decided_at": _seconds(annotation.get("created_at"))})
    summary = (f"{name} (Label Studio tasks): {len(items)} items, {len(decisions)} annotations"
               + (f", {undecided} annotations without a pairwise choice, tie or skip (ignored)" if undecided else ""))
    return ItemSet(kinds.pop() if kinds else "pairs", items, summary, decisions)


def dumps(tasks: list[dict]) -> str:
    return json.dumps(tasks, ensure_ascii=False, indent=1) + "\n"
