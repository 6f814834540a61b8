"""`dpokit data audit PAIRS --model RUN [--ref REF] --output audit.jsonl [--top K]`: the trained model audits its data.

A DPO policy is a reward model: its implicit reward of a response is beta * (log pi(y|x) - log pi_ref(y|x)), and the
margin of a pair is the chosen response's reward minus the rejected one's (`dpokit.evaluate.pair_metrics`). Under
the Bradley-Terry model DPO is derived from, sigmoid(-margin) is the probability the model gives to the other
label. That is the pair's `suspicion` (0 to 1, higher = more suspect): a pair the trained model confidently prefers
the other way is likely mislabelled, since a model trained on mostly right labels learns the rule they share and
cannot also fit the exceptions that contradict it, unless it memorises them.

Each row of the output, most suspect first: ``line`` (1-based line of the pair in the input file; for a file that
is not JSON Lines, its 1-based row), ``suspicion``, ``margin``, ``chosen_reward`` / ``rejected_reward``, the
policy's and the reference's own log-prob margins (``policy_logp_margin``, ``ref_logp_margin``: log p(chosen) -
log p(rejected)), ``chosen_tokens`` / ``rejected_tokens``, ``duplicate_of`` / ``near_duplicate_of`` (the line of an
earlier pair that is the same, or the same up to case, spacing and punctuation; `dpokit data check`'s rule),
``contradicts`` (the line of an earlier pair with the same two responses labelled the other way), ``where`` and
``key`` (a digest of the pair, so that `dpokit data filter --audit` can tell that the file has not changed).

The summary adds length bias: the share of pairs whose chosen response is the longer one, and the correlation of
the margin with the length difference (a model that rewards length shows it there). ``--top K`` also writes the K
most suspect pairs as annotation items (canonical rows with an ``audit`` field naming their line), for people to
re-label with `dpokit annotate serve`; ``dpokit data filter PAIRS OUT --audit audit.jsonl --drop_top K`` drops them.

Pairs are read and tokenized as in training (``--max_length`` truncates as training did; dropped pairs are counted,
not audited). Scored rows, which give several pairs per line, are refused: convert them to pairs first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys

from dpokit.errors import ConfigError, DataError


def source_line(report, row: int) -> int:
    """1-based line of 0-based row `row` in a JSON Lines file (blank lines counted), else its 1-based row."""
    lines = getattr(report, "line_numbers", None)
    return int(lines[row]) if lines is not None else row + 1


def pair_key(example) -> str:
    """A digest of a pair's content (prompt, system, chosen, rejected)."""
    from dpokit.data.tools import canonical_row

    text = json.dumps(canonical_row(example), sort_keys=True, ensure_ascii=False)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def _contradictions(examples) -> dict[int, int]:
    """row -> the row of an earlier pair with the same prompt and the two responses the other way round."""
    seen, out = {}, {}
    for ex in examples:
        seen.setdefault(json.dumps([ex.system, ex.prompt, ex.chosen, ex.rejected], ensure_ascii=False), ex.row)
        flipped = json.dumps([ex.system, ex.prompt, ex.rejected, ex.chosen], ensure_ascii=False)
        if flipped in seen and seen[flipped] != ex.row:
            out[ex.row] = seen[flipped]
    return out


def _pearson(x: list[float], y: list[float]):
    n = len(x)
    if n < 3:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def audit_pairs(pairs_source, model, ref=None, *, beta=None, batch_size: int = 16, max_length=None):
    """Audit rows (module docstring), most suspect first, the examples by row, and the summary."""
    import torch

    from dpokit.data.tools import find_duplicates
    from dpokit.evaluate import default_reference, run_settings, tokenized_pair_logps, tokenized_pairs
    from dpokit.models import load_merged

    ref = ref or default_reference(model)
    beta = float(beta if beta is not None else run_settings(model).get("beta", 0.1))
    if not (math.isfinite(beta) and beta > 0):
        raise ConfigError(f"--beta must be a number > 0, got {beta}")
    policy, tokenizer = load_merged(model)
    reference, _ = load_merged(ref, what="reference")
    examples, pairs, report = tokenized_pairs(pairs_source, tokenizer, max_length=max_length)
    if report.format == "scored":
        raise DataError(f"{report.source}: scored rows give several pairs per line; audit pairs (write them with "
                        "`dpokit data convert` first, then audit that file)")
    if not pairs:
        raise DataError(f"{report.source}: every pair was dropped by truncation; nothing to audit")
    pc, pr = tokenized_pair_logps(policy, pairs, tokenizer.pad_token_id, batch_size=batch_size, report=report,
                                  max_length=max_length)
    rc, rr = tokenized_pair_logps(reference, pairs, tokenizer.pad_token_id, batch_size=batch_size, report=report,
                                  max_length=max_length, what="the reference")
    chosen_reward, rejected_reward = beta * (pc - rc), beta * (pr - rr)
    margin = chosen_reward - rejected_reward
    if not torch.isfinite(margin).all():
        raise DataError(f"{report.source}: the model or its reference gives non-finite log-probs")
    suspicion = torch.sigmoid(-margin.double())
    by_row = {ex.row: ex for ex in examples}
    dups = find_duplicates(examples)
    exact, near = dict(dups.exact), dict(dups.near)
    flipped = _contradictions(examples)

    def line(row):
        return None if row is None else source_line(report, row)

    rows = []
    for i, p in enumerate(pairs):
        ex = by_row[p.row]
        rows.append({"line": source_line(report, p.row), "suspicion": float(suspicion[i]), "margin": float(margin[i]),
                     "chosen_reward": float(chosen_reward[i]), "rejected_reward": float(rejected_reward[i]),
                     "policy_logp_margin": float(pc[i] - pr[i]), "ref_logp_margin": float(rc[i] - rr[i]),
                     "chosen_tokens": len(p.chosen_ids), "rejected_tokens": len(p.rejected_ids),
                     "duplicate_of": line(exact.get(p.row)), "near_duplicate_of": line(near.get(p.row)),
                     "contradicts": line(flipped.get(p.row)), "where": report.where(p.row), "key": pair_key(ex),
                     "row": p.row})
    rows.sort(key=lambda r: (-r["suspicion"], r["line"]))
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    diffs = [r["chosen_tokens"] - r["rejected_tokens"] for r in rows]
    summary = {
        "source": report.source, "model": str(model), "reference": str(ref), "beta": beta, "pairs": len(rows),
        "data": report.summary(),
        "prefers_other_way": sum(r["margin"] < 0 for r in rows),
        "confident_other_way": sum(r["suspicion"] > 0.9 for r in rows),
        "accuracy": sum((r["margin"] > 0) + 0.5 * (r["margin"] == 0) for r in rows) / len(rows),
        "chosen_longer": sum(d > 0 for d in diffs) / len(rows),
        "margin_length_correlation": _pearson([r["margin"] for r in rows], [float(d) for d in diffs]),
        "exact_duplicates": len(exact), "near_duplicates": len(near), "contradicting": len(flipped),
    }
    return rows, by_row, summary


def _items_path(output: str, top: int) -> str:
    stem = output.removesuffix(".gz").removesuffix(".jsonl")
    return f"{stem}-top{top}.jsonl"


def _run(argv) -> int:
    from dpokit.data.tools import _Parser, canonical_row, write_jsonl
    from dpokit.options import integer, positive_float, positive_int

    p = _Parser(prog="audit", description="Rank preference pairs by how much the trained model doubts their label.")
    p.add_argument("pairs", metavar="PAIRS", reads=True, help="the preference file (e.g. the one the model was trained on)")
    p.add_argument("--model", required=True, reads=True, help="the trained DPO run (full model or LoRA run directory)")
    p.add_argument("--ref", reads=True, help="its reference (default: the model the run started from)")
    p.add_argument("--output", required=True, writes=True, help="audit rows, most suspect first (.jsonl)")
    p.add_argument("--top", type=positive_int, help="also write the K most suspect pairs as annotation items")
    p.add_argument("--items", writes=True, help="where --top writes them (default: OUTPUT-topK.jsonl)")
    p.add_argument("--beta", type=positive_float, help="beta of the implicit reward (default: the run's)")
    p.add_argument("--batch_size", type=positive_int, default=16)
    p.add_argument("--max_length", type=positive_int, help="truncate as in training (dropped pairs are counted)")
    p.add_argument("--show", type=integer("[0, inf)"), default=5, help="how many of the most suspect pairs to print")
    args = p.parse_args(argv)
    if not args.output.endswith((".jsonl", ".jsonl.gz")):
        raise ConfigError(f"--output {args.output}: must be a .jsonl file")
    if args.items is not None and args.top is None:
        raise ConfigError("--items is where --top writes; give --top K")
    if args.top is not None and args.items is None:
        args.items = _items_path(args.output, args.top)
        p.check_paths(args)  # the default items file, like a given one, may be no input and not --output
    rows, by_row, s = audit_pairs(args.pairs, args.model, args.ref, beta=args.beta, batch_size=args.batch_size,
                                  max_length=args.max_length)
    write_jsonl([{k: v for k, v in r.items() if k != "row"} for r in rows], args.output)
    out = sys.stdout
    print(f"{args.output}: {s['pairs']} pairs audited under {s['model']} (reference {s['reference']}, beta "
          f"{s['beta']:g}), most suspect first; {s['data']}", file=out)
    print(f"implicit-reward accuracy {s['accuracy']:.3f}: {s['prefers_other_way']} pairs the model prefers the "
          f"other way, {s['confident_other_way']} of them with suspicion > 0.9", file=out)
    corr = s["margin_length_correlation"]
    print(f"length: chosen is the longer response in {100 * s['chosen_longer']:.1f}% of pairs; correlation of the "
          f"margin with the length difference {'undefined' if corr is None else f'{corr:+.3f}'}", file=out)
    print(f"duplicates: {s['exact_duplicates']} exact, {s['near_duplicates']} near, {s['contradicting']} "
          "contradicting an earlier pair (same responses, other label)", file=out)
    for r in rows[: args.show]:
        print(f"  {r['where']}: suspicion {r['suspicion']:.3f} (margin {r['margin']:+.3f})", file=out)
    if args.top is not None:
        path = args.items
        items = [{**canonical_row(by_row[r["row"]]),
                  "audit": {"source": s["source"], "line": r["line"], "suspicion": r["suspicion"], "key": r["key"]}}
                 for r in rows[: args.top]]
        write_jsonl(items, path)
        print(f"{path}: the {len(items)} most suspect pairs as annotation items (dpokit annotate serve {path} --db "
              "relabel.sqlite)", file=out)
    return 0


def main(argv) -> int:
    """``dpokit data audit`` (module docstring); returns 0, or 2 for unusable input."""
    from dpokit.data.tools import _run as run_reporting_errors

    return run_reporting_errors(_run, argv)


# --------------------------------------------------------------------------------------------- filter --audit


def audited_rows(audit_file: str, top: int, examples, report) -> set[int]:
    """Rows (0-based) of `examples` that are the `top` most suspect pairs of `audit_file`, which must describe this
    very file: the pair at each listed line must have the key the audit recorded."""
    from dpokit.data import load_rows

    if top < 1:
        raise ConfigError(f"--drop_top must be at least 1, got {top}")
    rows, name = load_rows(audit_file)
    listed = []
    for i, r in enumerate(rows):
        if not (isinstance(r, dict) and isinstance(r.get("line"), int) and isinstance(r.get("suspicion"), (int, float))
                and isinstance(r.get("key"), str)):
            raise DataError(f"{name} row {i + 1}: not an audit row (line, suspicion and key)")
        listed.append(r)
    listed.sort(key=lambda r: -r["suspicion"])
    by_line = {source_line(report, ex.row): ex for ex in examples}
    drop = set()
    for r in listed[:top]:
        ex = by_line.get(r["line"])
        if ex is None or pair_key(ex) != r["key"]:
            raise DataError(f"{name}: line {r['line']} of {report.source} does not hold the pair the audit saw there; "
                            "the audit was made from another file or version (audit this one again)")
        drop.add(ex.row)
    return drop
