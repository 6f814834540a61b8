"""What a run tells its user: notices on stdout (`log`), the metrics record (metrics.jsonl, TensorBoard, W&B), the
running means between logs, and the training-time warnings (`warnings.jsonl`, which `dpokit report` shows).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from dpokit.fileio import append_text, atomic_write_text, writing

# log_level, as transformers reads it for its own logger: "passive" keeps the default (warning); the metrics dicts are
# printed whatever it says (transformers' Trainer prints them through its progress or printer callback).
_LEVEL = {"level": "passive"}
_SHOWN = {"info": ("debug", "info"), "warning": ("passive", "debug", "info", "warning")}


def log(msg: str, level: str = "warning") -> None:
    """Run notices (counts of truncated/dropped rows, substitutions like pad=EOS) go to stdout, from the first
    process only (RANK is set by torchrun / accelerate launch before any dpokit code runs). `level` "info" (a routine
    count) shows at log_level info/debug only; "warning" (the default) unless log_level is error/critical."""
    if int(os.environ.get("RANK", "0")) == 0 and _LEVEL["level"] in _SHOWN[level]:
        print(f"[dpokit] {msg}", flush=True)


def set_log_level(level: str) -> None:
    _LEVEL["level"] = level


def set_quiet(quiet: bool) -> None:
    """Notices off (log_level error) or back to the default."""
    set_log_level("error" if quiet else "passive")


class MetricsSink:
    """metrics.jsonl (always) and TensorBoard (report_to) — one record per logging step.

    `history` holds every record written so far; checkpoints store it, and a resumed run starts by rewriting
    metrics.jsonl from the checkpoint's history, so the file has no step twice and none missing whatever was appended
    between that checkpoint and the kill."""

    def __init__(self, output_dir: Path, tensorboard: bool, enabled: bool, history: Optional[list] = None,
                 resume_step: Optional[int] = None, wandb_init: Optional[dict] = None,
                 logging_dir: Optional[str] = None):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.history = list(history or [])
        self.tb = self.wandb = None
        if enabled and wandb_init is not None:
            import wandb

            self.wandb = wandb.init(**wandb_init)
        if enabled:
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.history))
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the events a killed run logged after the checkpoint it is resumed from.
            purge = None if resume_step is None else resume_step + 1
            self.tb = SummaryWriter(str(logging_dir or output_dir / "runs"), purge_step=purge)

    @classmethod
    def for_run(cls, cfg, output_dir: Path, enabled: bool, history: Optional[list],
                resume_step: Optional[int]) -> "MetricsSink":
        """The sinks `cfg.report_to` asks for. W&B starts a run as transformers' WandbCallback does; a resumed run is a
        new W&B run going on from its step."""
        wandb_init = None
        if cfg.report_to_wandb:
            wandb_init = dict(project=os.environ.get("WANDB_PROJECT", "huggingface"), name=cfg.run_name,
                              config=cfg.to_dict())
        return cls(output_dir, cfg.report_to_tensorboard, enabled, history=history, resume_step=resume_step,
                   wandb_init=wandb_init, logging_dir=cfg.logging_dir)

    def write(self, step: int, metrics: dict) -> None:
        # 8 significant digits (not decimal places: a DPO learning rate of 5e-7 in warmup would lose its digits).
        record = {"step": step, **{k: (float(f"{v:.8g}") if isinstance(v, float) else v) for k, v in metrics.items()}}
        self.history.append(record)
        if not self.enabled:
            return
        append_text(self.path, json.dumps(record) + "\n")
        # transformers' names on TensorBoard and W&B (its TensorBoardCallback's and WandbCallback's rewrite_logs:
        # train/loss, eval/loss, ...), so TRL's dashboards read these runs.
        tags = transformers_tags(metrics)
        if self.tb is not None:
            with writing(self.tb.log_dir):
                for k, v in tags.items():
                    self.tb.add_scalar(k, v, step)
                self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(tags, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def transformers_tags(metrics: dict) -> dict:
    """The numbers of a dpokit record under the names transformers' TensorBoard and W&B callbacks give them."""
    from transformers.integrations.integration_utils import rewrite_logs

    from dpokit.compat import transformers_names

    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return rewrite_logs(transformers_names(numbers))


def logging_dir(cfg, output_dir: Path, saved_config: Optional[dict]) -> str:
    """Where TensorBoard events go, as transformers picks it: `logging_dir`, else $TENSORBOARD_LOGGING_DIR, else
    output_dir/runs/<date>_<host>; a resumed run keeps the directory its checkpoint's config records, so its events
    go on in one stream (purged back to the checkpoint's step)."""
    if cfg.logging_dir:
        return str(Path(cfg.logging_dir).expanduser())
    if saved_config and saved_config.get("logging_dir"):
        return saved_config["logging_dir"]
    if os.environ.get("TENSORBOARD_LOGGING_DIR"):
        return str(Path(os.environ["TENSORBOARD_LOGGING_DIR"]).expanduser())
    from transformers.integrations.integration_utils import default_logdir

    return str(output_dir / default_logdir())


class DisplacementWatch:
    """Likelihood displacement: the chosen completions' log-prob falling log after log while the margin keeps rising.

    DPO only widens the gap between chosen and rejected; it can do so by pushing both down, and a falling chosen
    likelihood is the usual first sign of degenerate generations (arXiv 2410.08847). The watch reads the logged
    `logratios/chosen` (the mean over pairs of log pi(chosen) - log pi_ref(chosen): each pair against its own
    reference value, so a log of long completions does not read as a fall, as the batch-mean `logps/chosen` would)
    and `rewards/margins`, and speaks once per episode: after `window` consecutive logs in which the chosen log-ratio
    fell while the margin ended higher than it started. A loss without a reference logs no log-ratio: nothing to
    watch.
    """

    def __init__(self, window: int = 5):
        self.window = window
        self.history: list[tuple[float, float]] = []
        self.active = False

    def update(self, metrics: dict) -> Optional[str]:
        if "logratios/chosen" not in metrics or "rewards/margins" not in metrics:
            return None
        self.history.append((metrics["logratios/chosen"], metrics["rewards/margins"]))
        recent = self.history[-(self.window + 1):]
        falling = len(recent) == self.window + 1 and all(b[0] < a[0] for a, b in zip(recent, recent[1:]))
        triggered = falling and recent[-1][1] > recent[0][1]
        fire, self.active = triggered and not self.active, triggered
        if not fire:
            return None
        return (f"the chosen log-ratio to the reference fell for {self.window} logs in a row ({recent[0][0]:.3f} -> "
                f"{recent[-1][0]:.3f} nats per pair) while margins rose ({recent[0][1]:.3f} -> {recent[-1][1]:.3f}): "
                "likelihood displacement; consider rpo_alpha > 0, a lower learning_rate or a higher beta")


class MeanMeter:
    """Weighted running means of named metrics, reset at each log."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, metrics: dict, weight: float = 1.0) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * weight
            self.weights[k] = self.weights.get(k, 0.0) + weight

    def means(self) -> dict:
        return {k: self.sums[k] / self.weights[k] for k in self.sums if self.weights[k] > 0}

    def state(self) -> dict:
        return {"sums": dict(self.sums), "weights": dict(self.weights)}

    @classmethod
    def from_state(cls, state: dict) -> "MeanMeter":
        meter = cls()
        meter.sums, meter.weights = dict(state["sums"]), dict(state["weights"])
        return meter


def warn(output_dir: Path, step: int, kind: str, message: str) -> None:
    """A training-time warning: in the log, and in warnings.jsonl, so `dpokit report` shows it too."""
    log(f"warning at step {step}: {message}")
    append_text(output_dir / "warnings.jsonl", json.dumps({"step": step, "kind": kind, "message": message}) + "\n")
