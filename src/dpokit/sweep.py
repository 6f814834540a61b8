"""`dpokit sweep`: one DPO run per setting of the swept keys, then the reward-KL frontier (the DPO paper's figure 2).

    dpokit sweep --config dpo.yaml --prompts prompts.jsonl --judge mymodule:score beta=0.05,0.1,0.3,1.0 loss_type=sigmoid,ipo

A `key=v1,v2,...` argument is an axis (the runs are the product of all axes); any other `key=value` applies to every
run. A bracketed value (`loss_type=[sigmoid,bco_pair]`) is one value, not an axis. Each run trains into
`output_dir/<key>=<value>_...`, is evaluated against its reference on the prompts (samples scored by the judge, KL
from the policy's samples), and the sweep writes `sweep.json`, `sweep.md` and `frontier.png` into `output_dir`.
A swept value keeps its setting's type in the runs' configs and in `sweep.json` (`beta=0.1,1` gives the floats 0.1 and
1.0, `max_steps=2,4` ints, `bf16=false,true` booleans). `dpokit report OUTPUT_DIR` compares the runs.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Optional

from dpokit.errors import ConfigError
from dpokit.fileio import atomic_path, atomic_write_text, read_text, refuse_overlap
from dpokit.options import Parser, positive_float, positive_int, seed


def split_axes(tokens: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """(`{key: [values]}` for swept keys, the remaining override tokens), in the order given."""
    axes: dict[str, list[str]] = {}
    rest: list[str] = []
    for tok in tokens:
        key, sep, value = tok.partition("=")
        bracketed = value.strip()[:1] in ("[", "{")
        if sep and "," in value and not bracketed and not key.startswith("-"):
            values = [v.strip() for v in value.split(",") if v.strip()]
            if len(values) < 2:
                raise ConfigError(f"sweep axis {key!r} needs at least two values (got {value!r})")
            axes[key] = values
        else:
            rest.append(tok)
    if not axes:
        raise ConfigError("nothing to sweep: give at least one key=v1,v2 axis (e.g. beta=0.05,0.1,0.3)")
    return axes, rest


def typed_value(cls: type, key: str, text: str):
    """An axis value as the runs' config holds it (``0.1`` a float, ``2`` an int, ``true`` a bool, ``sigmoid`` a
    string: the setting's own type, read by the rule a config applies); a key the config class does not declare (a
    TRL key dpokit takes as inert) as YAML would read it."""
    import dataclasses

    import yaml

    from dpokit import compat
    from dpokit.settings import coerce

    name = compat.ALIASES.get(key, key)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name in fields:
        return coerce(name, text, fields[name].type)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"sweep axis {key}: {text!r} is not a value ({getattr(exc, 'problem', None) or exc})") from None


def run_name(setting: dict[str, str]) -> str:
    return "_".join(f"{k}={v}" for k, v in setting.items()).replace("/", "-")


def run_sweep(config_file: Optional[str], tokens: list[str], *, prompts: str, judge: str, num_samples: int = 4,
              temperature: float = 1.0, max_new_tokens: int = 64, seed: int = 0, batch_size: int = 16) -> dict:
    from dpokit.config import DPOConfig, build_config, parse_overrides
    from dpokit.evaluate import check_judge, evaluate_model, read_prompts
    from dpokit.rundir import RUN_MARKER
    from dpokit.trainer import DPOTrainer

    axes, rest = split_axes(tokens)
    common = parse_overrides(rest)
    # Check every setting before training any: a typo in the last value should not cost the first runs.
    settings = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    configs = [build_config(DPOConfig, config_file, {**common, **s}) for s in settings]
    root = Path(configs[0].output_dir)
    for setting, cfg in zip(settings, configs):
        cfg.output_dir = str(root / run_name(setting))
        # Refused now, not after the runs before it have trained: a run directory that holds a run.
        if (Path(cfg.output_dir) / RUN_MARKER).exists() and not cfg.overwrite_output_dir \
                and cfg.resume_from_checkpoint is None:
            raise ConfigError(f"{cfg.output_dir} already holds a run; add overwrite_output_dir=true to run the sweep "
                              "again, or choose another output_dir")
    # Every run samples from the prompts and scores with the judge after it trains: both are checked now.
    check_judge(judge)
    read_prompts(prompts)
    # The sweep writes sweep.json, sweep.md, frontier.png and a run per setting into `root`: it may hold none of
    # what the sweep reads (each run's own inputs are checked by its trainer).
    judge_file = judge[len("rm:"):] if judge.startswith("rm:") else judge.rpartition(":")[0] or None
    refuse_overlap({"output_dir": root}, {"--prompts": prompts, "--config": config_file, "the judge": judge_file})
    typed = {k: [typed_value(DPOConfig, k, v) for v in values] for k, values in axes.items()}
    rows = []
    for setting, cfg in zip(settings, configs):
        trainer = DPOTrainer(cfg.model_name_or_path, args=cfg)
        trainer.train()
        trainer.save_model()
        result = evaluate_model(cfg.output_dir, prompts=prompts, judge=judge, num_samples=num_samples,
                                temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                                batch_size=batch_size)
        s = result["samples"]
        values = {k: typed[k][axes[k].index(v)] for k, v in setting.items()}
        rows.append({"run": cfg.output_dir, **values, "reward": s["policy_score"], "reward_se": s["policy_score_se"],
                     "kl": s["kl"], "kl_se": s["kl_se"], "win_rate": s["win_rate"],
                     "reference_reward": s["reference_score"]})
        del trainer
    summary = {"axes": typed, "prompts": prompts, "judge": judge, "runs": rows}
    atomic_write_text(root / "sweep.json", json.dumps(summary, indent=2))
    atomic_write_text(root / "sweep.md", sweep_markdown(summary))
    plot_frontier(rows, list(axes), root / "frontier.png")
    summary["written_to"] = str(root)
    return summary


def sweep_markdown(summary: dict) -> str:
    keys = list(summary["axes"])
    head = "| " + " | ".join(keys + ["reward", "KL to reference", "win rate"]) + " |"
    lines = [f"# Sweep over {', '.join(keys)} (judge `{summary['judge']}`)", "", head,
             "|" + "---|" * (len(keys) + 3)]
    for r in summary["runs"]:
        cells = [r[k] if isinstance(r[k], str) else json.dumps(r[k]) for k in keys] + [f"{r['reward']:.4f} ± {r['reward_se']:.4f}",
                                             f"{r['kl']:.4f} ± {r['kl_se']:.4f}", f"{r['win_rate']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if summary["runs"]:
        lines += ["", f"Reference reward: {summary['runs'][0]['reference_reward']:.4f}"]
    return "\n".join(lines) + "\n"


def plot_frontier(rows: list[dict], keys: list[str], path: Path) -> None:
    """Reward against KL, one point per run with error bars, labelled by its setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in rows:
        label = ", ".join(f"{k}={r[k]}" for k in keys)
        ax.errorbar(r["kl"], r["reward"], xerr=r["kl_se"], yerr=r["reward_se"], fmt="o", capsize=3, label=label)
    if rows:
        ax.axhline(rows[0]["reference_reward"], color="grey", linestyle=":", label="reference")
    ax.set_xlabel("KL(policy || reference), nats per sample")
    ax.set_ylabel("reward of samples")
    ax.set_title("reward-KL frontier")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main(argv: list[str]) -> int:
    # No abbreviations: `--max_steps 5` must stay a training override, not match a sweep option's prefix.
    parser = Parser(prog="dpokit sweep", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--config", reads=True, help="the DPO config every run starts from")
    parser.add_argument("--prompts", required=True, reads=True, help="prompts to sample from each run and its reference")
    parser.add_argument("--judge", required=True, help="implicit | module:function | rm:PATH")
    parser.add_argument("--num_samples", type=positive_int, default=4)
    parser.add_argument("--temperature", type=positive_float, default=1.0)
    parser.add_argument("--max_new_tokens", type=positive_int, default=64)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--batch_size", type=positive_int, default=16)
    args, tokens = parser.parse_known_args(argv)
    summary = run_sweep(args.config, tokens, prompts=args.prompts, judge=args.judge, num_samples=args.num_samples,
                        temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed,
                        batch_size=args.batch_size)
    print(read_text(Path(summary["written_to"]) / "sweep.md"))
    return 0
