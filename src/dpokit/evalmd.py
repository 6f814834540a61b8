"""eval.md: what `dpokit eval` measured (eval.json) as the short tables a person reads.

Kept apart from the measurements (`dpokit.evaluate`): `dpokit annotate export` rewrites eval.md from an eval.json it
extended, without the models.
"""

from __future__ import annotations


def _pm(value, se) -> str:
    return f"{value:.4f} ± {se:.4f}" if se == se else f"{value:.4f}"


def eval_markdown(result: dict) -> str:
    """eval.json as a short markdown report (tables a person reads)."""
    lines = [f"# Evaluation of `{result['model']}`", "", f"Reference: `{result['reference']}`, beta = {result['beta']}", ""]
    if "pairs" in result:
        p = result["pairs"]
        lines += [f"## Held-out pairs ({p['num_pairs']} from `{p['file']}`)", "",
                  "| metric | value |", "|---|---|",
                  f"| implicit-reward accuracy (ties count as wrong) | {_pm(p['accuracy'], p['accuracy_se'])} |",
                  *([f"| pairs tied (margin exactly 0) | {p['ties']} |"] if p.get("ties") else []),
                  f"| mean margin | {_pm(p['margin'], p['margin_se'])} |",
                  *([f"| chosen log-ratio, policy − reference (mean per pair) | "
                     f"{_pm(p['chosen_logratio'], p['chosen_logratio_se'])} |"] if "chosen_logratio" in p else []),
                  f"| chosen log-prob: policy / reference | {p['policy_chosen_logps']:.3f} / {p['ref_chosen_logps']:.3f} |",
                  f"| rejected log-prob: policy / reference | {p['policy_rejected_logps']:.3f} / {p['ref_rejected_logps']:.3f} |",
                  ""]
        # Only a fall larger than its standard error is a finding; a smaller one may be the pairs' noise (and with
        # one pair, whose error is NaN, nothing can be said).
        if "chosen_logratio" in p and -p["chosen_logratio"] > p["chosen_logratio_se"]:
            lines += [f"Note: the chosen log-prob fell below the reference's by {-p['chosen_logratio']:.3f} ± "
                      f"{p['chosen_logratio_se']:.3f} nats per pair (likelihood displacement).", ""]
    if "samples" in result:
        s = result["samples"]
        lines += [f"## Samples ({s['num_prompts']} prompts x {s['num_samples']}, judge `{s['judge']}`, "
                  f"temperature {s['temperature']}, top-p {s['top_p']}, seed {s['seed']})", "",
                  "| metric | policy | reference |", "|---|---|---|",
                  f"| judge score | {_pm(s['policy_score'], s['policy_score_se'])} | "
                  f"{_pm(s['reference_score'], s['reference_score_se'])} |",
                  f"| mean completion tokens | {s['policy_mean_tokens']:.1f} | {s['reference_mean_tokens']:.1f} |",
                  *([f"| samples cut at {s['max_new_tokens']} tokens (scored as if finished) | "
                     f"{s['policy_unfinished']} | {s['reference_unfinished']} |"] if "policy_unfinished" in s else []),
                  *(["", f"Warning: the policy's completions are {s['policy_mean_tokens'] / s['reference_mean_tokens']:.1f}x "
                     "as long as the reference's (length exploitation: the judge may be rewarding length)."]
                    if s["reference_mean_tokens"] > 0 and s["policy_mean_tokens"] > 1.5 * s["reference_mean_tokens"]
                    else []),
                  "", f"Win rate of the policy over the reference: {_pm(s['win_rate'], s['win_rate_se'])} (ties = 1/2)",
                  "", f"KL(policy ‖ reference), from the policy's samples: {_pm(s['kl'], s['kl_se'])} nats", "",
                  "| prompt | policy | reference |", "|---|---|---|"]
        for ex in s["examples"]:
            cells = [ex[k].replace("|", "\\|").replace("\n", " ") for k in ("prompt", "policy", "reference")]
            lines.append("| " + " | ".join(cells) + " |")
    if "human" in result:
        h = result["human"]
        judge = result.get("samples", {})
        lines += ["", "## Win rate of the policy over the reference: judge and people", "",
                  "| by | win rate (ties = 1/2) | items |", "|---|---|---|"]
        if "win_rate" in judge:
            lines.append(f"| judge `{judge['judge']}` | {_pm(judge['win_rate'], judge['win_rate_se'])} | "
                         f"{judge['num_prompts'] * judge['num_samples']} |")
        lines += [f"| people, blind A/B ({len(h['annotators'])} annotators) | {_pm(h['win_rate'], h['win_rate_se'])} "
                  f"| {h['items']} |", "",
                  f"People preferred the policy's sample {h['policy_preferred']} times, the reference's "
                  f"{h['reference_preferred']}, tied {h['ties']} and skipped {h['skips']}; {h['identical']} identical "
                  "sample pairs count as ties."
                  + (f" The judge agrees with the people's verdict on {h['judge_agreement']:.0%} of "
                     f"{h['judge_agreement_items']} items." if h.get("judge_agreement") is not None else "")]
    return "\n".join(lines) + "\n"
