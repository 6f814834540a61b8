"""From decisions to data: training pairs, agreement between annotators, and the human win rate of a blind A/B.

Each item's verdict is the majority of the labels it got (a, b or tie; skips are no label): the label given by
more annotators than any other. An item whose top labels are tied (one annotator for a, one for b) has no majority
and is left out of the training pairs, counted, and listed with the disagreements; so is an item whose verdict is a
tie, and one that every annotator skipped.

A training row is the canonical pair (`dpokit.data.tools.canonical_row`) with the preferred response as chosen,
plus who said so: ``chosen_by`` (the annotators whose label is the verdict), ``annotations`` (every label, with
its rationale, in the order given: ``preferred`` is chosen, rejected or tie relative to the row), ``agreement``
(the verdict's share of the labels), ``item`` and ``source`` (where the item was read). For items from a preference
file, ``agrees_with_source`` says whether people kept the file's label (``false``: they flipped it).

For A/B items (`dpokit eval --save_samples`) the export also gives the human win rate of the policy over the
reference: each item scores 1 when people prefer the policy's sample, 0 the reference's, 1/2 a tie (with several
annotators, the mean of their labels), identical samples 1/2; the win rate is the mean over the items that got a
label, with its standard error, written next to the judge's win rate in the evaluation's eval.json and eval.md.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Optional

from dpokit.annotate.agreement import cohen_kappa, krippendorff_alpha
from dpokit.annotate.store import Store
from dpokit.errors import ConfigError, DataError

PREFERRED = {"pairs": {"a": "chosen", "b": "rejected"}, "ab": {"a": "policy", "b": "reference"}}


def verdicts(items: list[dict], decisions: list[dict]) -> list[dict]:
    """Per item: its labels ``[(annotator, a|b|tie, rationale)]``, skips, votes and verdict (a, b, tie, None for no
    majority, "skipped" when it got no label)."""
    by_item: dict[str, list] = {}
    for d in decisions:
        by_item.setdefault(d["item"], []).append(d)
    out = []
    for it in items:
        mine = by_item.get(it["id"], [])
        labels = [(d["annotator"], d["choice"], d["rationale"]) for d in mine if d["choice"] != "skip"]
        votes = Counter(c for _, c, _ in labels)
        ranked = votes.most_common()
        if not labels:
            verdict = "skipped" if mine else None
        elif len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
            verdict = None
        else:
            verdict = ranked[0][0]
        out.append({"item": it, "labels": labels, "skips": len(mine) - len(labels), "votes": votes,
                    "verdict": verdict, "skipped_by": [d["annotator"] for d in mine if d["choice"] == "skip"]})
    return out


def agreement(kind: str, judged: list[dict]) -> dict:
    """Per-annotator counts, chance-corrected agreement and the items annotators disagree on (module docstring of
    `dpokit.annotate.agreement`)."""
    names = PREFERRED[kind]
    people: dict[str, Counter] = {}
    for v in judged:
        for name, choice, _ in v["labels"]:
            people.setdefault(name, Counter())[names.get(choice, choice)] += 1
        for name in v["skipped_by"]:
            people.setdefault(name, Counter())["skip"] += 1
    multi = [v for v in judged if len(v["labels"]) >= 2]
    with_majority = [v for v in multi if v["verdict"] not in (None, "skipped")]
    agree = Counter()
    for v in with_majority:
        for name, choice, _ in v["labels"]:
            agree[name, "n"] += 1
            agree[name, "ok"] += choice == v["verdict"]
    annotators = sorted(people)
    result = {
        "annotators": {name: {**dict(people.get(name, {})),
                              "agrees_with_majority": (agree[name, "ok"] / agree[name, "n"]) if agree[name, "n"]
                              else None} for name in annotators},
        "items_with_several_labels": len(multi),
        "unanimous": sum(len(v["votes"]) == 1 for v in multi),
        "krippendorff_alpha": krippendorff_alpha([[c for _, c, _ in v["labels"]] for v in multi]),
        "cohen_kappa": None,
        "disagreements": [{"item": v["item"]["id"], "source": v["item"]["source"],
                           "labels": {name: names.get(c, c) for name, c, _ in v["labels"]},
                           "verdict": names.get(v["verdict"], v["verdict"]) if v["verdict"] else "no majority"}
                          for v in multi if len(v["votes"]) > 1],
    }
    labelled_by = {name for v in multi for name, _, _ in v["labels"]}
    if len(labelled_by) == 2:
        first, second = sorted(labelled_by)
        both = []
        for v in multi:
            got = {name: c for name, c, _ in v["labels"]}
            both.append((got[first], got[second]))
        result["cohen_kappa"] = cohen_kappa(both)
        result["cohen_kappa_annotators"] = [first, second]
    return result


def training_rows(kind: str, judged: list[dict]) -> tuple[list[dict], Counter]:
    """Training pairs of the items with a majority for a or b; counts of what was left out (module docstring)."""
    from dpokit.data import PreferenceExample
    from dpokit.data.tools import canonical_row

    names = PREFERRED[kind]
    rows, counts = [], Counter()
    for v in judged:
        it, verdict = v["item"], v["verdict"]
        counts["ties"] += sum(c == "tie" for _, c, _ in v["labels"])
        counts["skips"] += v["skips"]
        if verdict is None:
            counts["no_majority" if v["labels"] else "undecided"] += 1
            continue
        if verdict == "skipped":
            counts["skipped_items"] += 1
            continue
        if verdict == "tie":
            counts["tie_items"] += 1
            continue
        other = "b" if verdict == "a" else "a"
        chosen, rejected = it[verdict], it[other]
        if isinstance(it["prompt"], list) and isinstance(chosen, str):  # a sample answering a conversation
            chosen, rejected = ([{"role": "assistant", "content": t}] for t in (chosen, rejected))
        row = canonical_row(PreferenceExample(it["prompt"], chosen, rejected, 0, it["system"]))
        relative = {verdict: "chosen", other: "rejected", "tie": "tie"}
        row.update({
            "chosen_by": [name for name, c, _ in v["labels"] if c == verdict],
            "annotations": [{"annotator": name, "preferred": relative[c], "rationale": why}
                            for name, c, why in v["labels"]],
            "agreement": v["votes"][verdict] / len(v["labels"]),
            "item": it["id"], "source": it["source"],
        })
        if kind == "ab":
            row["chosen_model"] = names[verdict]
        if it["meta"].get("label") == "a":
            row["agrees_with_source"] = verdict == "a"
        if isinstance(it["meta"].get("audit"), dict):
            row["audit"] = it["meta"]["audit"]
        rows.append(row)
        counts["pairs"] += 1
    return rows, counts


def human_win_rate(judged: list[dict]) -> dict:
    """The policy's win rate over the reference from the labels of A/B items (module docstring)."""
    from dpokit.evaluate import mean_and_se

    value = {"a": 1.0, "b": 0.0, "tie": 0.5}
    scores, judge_agree, identical = [], [], 0
    for v in judged:
        it = v["item"]
        if not it["serve"]:
            identical += 1
            scores.append(0.5)
            continue
        if not v["labels"]:
            continue
        scores.append(sum(value[c] for _, c, _ in v["labels"]) / len(v["labels"]))
        ps, rs = it["meta"].get("policy_score"), it["meta"].get("reference_score")
        if v["verdict"] in ("a", "b") and isinstance(ps, (int, float)) and isinstance(rs, (int, float)) and ps != rs:
            judge_agree.append((ps > rs) == (v["verdict"] == "a"))
    if not scores:
        raise DataError("no A/B item has a label yet: nothing to compute a win rate from")
    rate, se = mean_and_se(scores)
    labels = [c for v in judged for _, c, _ in v["labels"]]
    return {"win_rate": rate, "win_rate_se": se, "items": len(scores), "identical": identical,
            "policy_preferred": labels.count("a"), "reference_preferred": labels.count("b"),
            "ties": labels.count("tie"), "skips": sum(v["skips"] for v in judged),
            "annotators": sorted({name for v in judged for name, _, _ in v["labels"]}),
            "judge_agreement": sum(judge_agree) / len(judge_agree) if judge_agree else None,
            "judge_agreement_items": len(judge_agree)}


def _eval_dir(items: list[dict], given: Optional[str]) -> Path:
    if given is not None:
        return Path(given)
    dirs = {it["meta"].get("eval_dir") for it in items}
    if len(dirs) != 1 or None in dirs:
        raise ConfigError("the A/B items do not name one evaluation directory; pass --eval_dir (where "
                          "`dpokit eval` wrote eval.json)")
    return Path(dirs.pop())


def write_human_eval(eval_dir: Path, human: dict) -> Path:
    """Add the human win rate to the evaluation's eval.json and rewrite its eval.md (both atomically)."""
    from dpokit.evalmd import eval_markdown
    from dpokit.fileio import atomic_write_text, json_type_name, read_json

    path = eval_dir / "eval.json"
    result = read_json(path)
    if not isinstance(result, dict):
        raise DataError(f"{path}: expected a JSON object (a dpokit eval result), got {json_type_name(result)}")
    result["human"] = human
    atomic_write_text(path, json.dumps(result, indent=2))
    atomic_write_text(eval_dir / "eval.md", eval_markdown(result))
    return path


def _fmt(value: Optional[float]) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def agreement_lines(kind: str, report: dict, show: int) -> list[str]:
    lines = []
    multi = report["items_with_several_labels"]
    if multi:
        kappa = ""
        if "cohen_kappa_annotators" in report:
            a, b = report["cohen_kappa_annotators"]
            kappa = f"Cohen's kappa ({a}, {b}) {_fmt(report['cohen_kappa'])}, "
        lines.append(f"agreement on {multi} items with several labels: {kappa}Krippendorff's alpha "
                     f"{_fmt(report['krippendorff_alpha'])}, unanimous on {report['unanimous']}")
    else:
        lines.append("agreement: no item has labels from two annotators (serve with --overlap 2 or more to measure it)")
    for name, c in report["annotators"].items():
        counts = ", ".join(f"{c.get(k, 0)} {k}" for k in (*PREFERRED[kind].values(), "tie", "skip"))
        agrees = c["agrees_with_majority"]
        lines.append(f"  {name}: {counts}" + (f"; agrees with the majority on {agrees:.0%} of items with several "
                                               "labels" if agrees is not None else ""))
    dis = report["disagreements"]
    if dis:
        lines.append(f"disagreeing items: {len(dis)}")
        for d in dis[:show]:
            labels = ", ".join(f"{n}: {c}" for n, c in d["labels"].items())
            lines.append(f"  {d['source']} ({labels}) -> {d['verdict']}")
        if len(dis) > show:
            lines.append(f"  ... {len(dis) - show} more (all in --report)")
    return lines


def export(db: str, *, output: Optional[str] = None, label_studio: Optional[str] = None,
           report: Optional[str] = None, eval_dir: Optional[str] = None, show: int = 10) -> tuple[dict, list[str]]:
    """`dpokit annotate export` (module docstring); returns the summary and the lines printed for it."""
    from dpokit.annotate import labelstudio
    from dpokit.data.tools import write_jsonl
    from dpokit.fileio import atomic_write_text, refuse_overlap

    refuse_overlap({"--output": output, "--label_studio": label_studio, "--report": report},
                   {"--db": db, **{f"--db's {suffix} file": f"{db}{suffix}" for suffix in ("-wal", "-shm")}})
    store = Store(db, create=False)
    kind = store.kind
    if kind is None:
        raise ConfigError(f"--db {db}: holds no items yet")
    items, decisions = store.items(), store.decisions()
    if output is None and label_studio is None and kind != "ab":
        raise ConfigError("nothing to write: give --output (training pairs) and/or --label_studio")
    judged = verdicts(items, decisions)
    if kind == "ab":  # checked before anything is written: a missing evaluation leaves no half-done export
        human = {"db": str(db), **human_win_rate(judged)}
        target = _eval_dir(items, eval_dir)
        if not (target / "eval.json").is_file():
            raise ConfigError(f"{target / 'eval.json'}: no such file; the A/B samples come from `dpokit eval ... "
                              "--save_samples`, which writes it (or pass --eval_dir)")
    summary: dict = {"db": str(db), "kind": kind, "items": len(items), "decisions": len(decisions)}
    lines = [f"{db}: {len(items)} items ({kind}), {len(decisions)} decisions by "
             f"{len({d['annotator'] for d in decisions})} annotators"]
    if output is not None:
        rows, counts = training_rows(kind, judged)
        if not rows:
            raise DataError(f"--db {db}: no item has a majority for one response yet; nothing written")
        write_jsonl(rows, str(output))
        summary["output"] = {"file": str(output), **counts}
        lines.append(f"{output}: {counts['pairs']} pairs; left out: {counts['ties']} tie labels and "
                     f"{counts['skips']} skips (excluded as labels), {counts['tie_items']} items whose verdict is a "
                     f"tie, {counts['no_majority']} without a majority, {counts['skipped_items']} skipped by everyone, "
                     f"{counts['undecided']} not labelled yet")
    if label_studio is not None:
        if not str(label_studio).endswith(".json"):
            raise ConfigError(f"--label_studio {label_studio}: must be a .json file (Label Studio's JSON export)")
        atomic_write_text(Path(label_studio), labelstudio.dumps(labelstudio.write_tasks(kind, items, decisions)))
        config = Path(label_studio).with_suffix(".label_config.xml")
        atomic_write_text(config, labelstudio.LABEL_CONFIG)
        summary["label_studio"] = str(label_studio)
        lines.append(f"{label_studio}: {len(items)} Label Studio tasks with their annotations "
                     f"(labelling configuration: {config})")
    agreed = agreement(kind, judged)
    summary["agreement"] = agreed
    lines += agreement_lines(kind, agreed, show)
    if kind == "ab":
        summary["human"] = human
        path = write_human_eval(target, human)
        lines.append(f"human win rate of the policy over the reference: {human['win_rate']:.4f} ± "
                     f"{human['win_rate_se']:.4f} over {human['items']} items (ties = 1/2); written to {path} "
                     "and eval.md")
    if report is not None:
        atomic_write_text(Path(report), json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        lines.append(f"{report}: the full summary (every disagreement included)")
    return summary, lines
