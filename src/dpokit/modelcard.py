"""The model card (`README.md`) written beside every saved model, as TRL's trainers write one: YAML front matter the
Hugging Face Hub reads (base_model, library_name, tags, datasets) and what a reader needs to know how the model was
made: the base model, the data files with their row counts, the loss and its settings, the final metrics, the
versions and the whole config.

dpokit writes README.md only where there is none or where the one there is its own (or peft's automatic adapter
card, which `save_pretrained` writes and the card replaces): a README.md a user wrote is never replaced. A run
refuses such an output_dir before training (`check_replaceable`), so the card can always be written at the end.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import yaml

from dpokit.errors import ConfigError

CARD = "README.md"
# The first line after the front matter: what marks a README.md as dpokit's, replaceable by the next save.
MARK = "<!-- model card written by dpokit; each save of the model rewrites this file -->"
# peft's `save_pretrained` writes its own template card into an adapter directory (an older run's output_dir).
PEFT_CARD = "- PEFT "


def is_ours(path: Path) -> bool:
    """A README.md dpokit (or peft's adapter save) wrote, which the next save may replace."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return MARK in text or ("## Framework versions" in text and PEFT_CARD in text)


def check_replaceable(directory: Path) -> None:
    """Refuse a directory whose README.md is the user's: the model card saved there would replace it."""
    card = Path(directory) / CARD
    if card.is_file() and not is_ours(card):
        raise ConfigError(f"{card} was not written by dpokit and the model card saved there would replace it; "
                          "move it away or choose another output_dir")


def _versions(peft: bool) -> list[tuple[str, str]]:
    import torch
    import transformers

    import dpokit

    versions = [("dpokit", dpokit.__version__), ("Transformers", transformers.__version__),
                ("PyTorch", torch.__version__)]
    if peft:
        import peft as peft_lib

        versions.append(("PEFT", peft_lib.__version__))
    return versions


def _last(history: list, evaluation: bool) -> dict:
    """The last logged record of training metrics (evaluation=False) or of evaluation metrics."""
    for record in reversed(history):
        if any(k.startswith("eval/") for k in record) == evaluation:
            return {k: v for k, v in record.items() if k != "step"} | {"step": record.get("step")}
    return {}


def _table(header: tuple, rows: list) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def render(trainer) -> str:
    """The model card of `trainer`'s model as it is now (the metrics logged so far)."""
    from dpokit.config import LossParams

    cfg = trainer.args
    base = cfg.model_name_or_path
    peft = bool(getattr(trainer, "use_peft", False))
    method = type(cfg).__name__.removesuffix("Config").lower()  # dpo, sft: the trainer's family, as TRL tags it
    name = Path(cfg.output_dir).name
    front = {**({"base_model": base} if base else {}), "library_name": "peft" if peft else "transformers",
             "model_name": name, "tags": ["generated_from_trainer", "dpokit", "trl", method]
             + (["lora"] if peft else [])}
    if cfg.dataset_name:
        front["datasets"] = [cfg.dataset_name]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", MARK, "", f"# Model Card for {name}", ""]
    made = f"a fine-tuned version of `{base}`" if base else "fine-tuned from a model built in memory (no path)"
    lines += [f"This model is {made}" + (", trained as a LoRA adapter" if peft else "")
              + f", trained with dpokit's {type(trainer).__name__}.", ""]
    lines += ["## Training data", ""]
    reports = trainer.data_reports
    rows = [(split, f"`{trainer.data_sources.get(split, r.source)}`", r.format, r.read, r.kept, r.skipped)
            for split, r in reports.items()]
    lines += (_table(("split", "source", "format", "rows read", "kept", "skipped"), rows) if rows
              else ["(no data was loaded)"]) + [""]
    if isinstance(cfg, LossParams):
        settings = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(LossParams)}
        lines += ["## Loss", "", f"`loss_type`: `{json.dumps(settings.pop('loss_type'))}`", ""]
        lines += _table(("setting", "value"), [(f"`{k}`", f"`{json.dumps(v)}`") for k, v in settings.items()]) + [""]
    sink = getattr(trainer, "_sink", None)
    history = sink.history if sink is not None else []
    lines += ["## Final metrics", ""]
    shown = [(what, _last(history, evaluation)) for what, evaluation in (("training", False), ("evaluation", True))]
    shown = [(what, record) for what, record in shown if record]
    if not shown:
        lines += ["(no metrics were logged)", ""]
    for what, record in shown:
        step = record.pop("step")
        lines += [f"Last {what} log (step {step}):", ""]
        lines += _table(("metric", "value"), [(f"`{k}`", v) for k, v in record.items()]) + [""]
    lines += [f"Steps trained: {trainer.global_step}.", "", "## Framework versions", ""]
    lines += [f"- {what}: {version}" for what, version in _versions(peft)] + [""]
    lines += ["## Config", "", "The run's resolved config (`dpokit_config.yaml`; `dpokit dpo --config` reads it):", "",
              "```yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def merged(adapter_card: Optional[str], base: str) -> str:
    """The card of a LoRA adapter merged into its base weights (`dpokit export --merge`): the adapter's card with
    the front matter of a full transformers model."""
    note = (f"The LoRA adapter below was merged into the weights of `{base}` by `dpokit export --merge`: this "
            "directory is a full model, loadable with plain transformers.")
    if adapter_card is None or MARK not in adapter_card:
        front = yaml.safe_dump({"base_model": base, "library_name": "transformers",
                                "tags": ["dpokit", "merged"]}, sort_keys=False).rstrip()
        return "\n".join(["---", front, "---", MARK, "", note, ""])
    head, _, body = adapter_card.partition(MARK)
    try:
        front = yaml.safe_load(head.strip().removeprefix("---").removesuffix("---")) or {}
    except yaml.YAMLError as exc:
        front = exc
    if not isinstance(front, dict) or not isinstance(front.get("tags", []), list):
        from dpokit.errors import DataError

        raise DataError(f"the adapter run's {CARD}: its front matter (between the --- lines) is not a YAML mapping "
                        "with a tags list; repair it or remove the file")
    front["library_name"] = "transformers"
    front["tags"] = [t for t in front.get("tags", []) if t != "lora"] + ["merged"]
    return "\n".join(["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", MARK, "", note]) + body
