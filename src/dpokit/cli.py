"""The `dpokit` command: a thin layer that builds configs and calls the library.

    dpokit sft  [--config FILE.yaml] [key=value | --key value ...]
    dpokit dpo  [--config FILE.yaml] [key=value | --key value ...]
    dpokit eval --model RUN_OR_PATH [--ref REF] --pairs FILE [--prompts FILE] ...
    dpokit report RUN_DIR [RUN_DIR ...] [--output FILE.html]
    dpokit sweep --config FILE.yaml --prompts P --judge J beta=0.05,0.1,0.3
    dpokit export ADAPTER_DIR OUTPUT_DIR --merge
    dpokit data check|convert|filter|split ...
    dpokit pairs --model M --prompts P --judge J --output pairs.jsonl
    dpokit annotate serve|export|import|tokens ...
    dpokit demo [--quick] [--frontier]

A user mistake (a `DpokitError`) prints one line to stderr and exits with code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import dataclasses
import sys
import textwrap
from typing import Optional

from dpokit.errors import DpokitError, Interrupted, Terminated

COMMANDS = {
    "sft": "supervised fine-tuning (prompt/completion, messages or text rows)",
    "dpo": "preference optimisation: DPO and its family (prompt/chosen/rejected rows)",
    "eval": "a model against its reference: held-out pair accuracy and margins, sampled win rate and KL",
    "export": "write a LoRA run as a merged full model (--merge)",
    "data": "check, convert, filter, split and audit preference data",
    "pairs": "on-policy pair creation: sample completions from a model, score them with a judge, write pairs",
    "annotate": "people in the loop: label pairs in the browser, agreement, human win rate (serve, export)",
    "report": "a self-contained HTML page of training curves (metrics.jsonl) and eval tables; several runs overlaid",
    "sweep": "one DPO run per setting (beta=0.05,0.1,0.3 ...) and the reward-KL frontier of them",
    "bench": "dpokit vs TRL speed, memory and loss on the same model and pairs (--preset cpu-tiny)",
    "demo": "the embedded default: SFT then DPO on a tiny sentiment task, no downloads (about 20 s on 2 CPU cores)",
}


def _usage() -> str:
    lines = ["usage: dpokit <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {doc}" for name, doc in COMMANDS.items()]
    lines += ["", "`dpokit <command> --help` lists the options of one command; add --debug for tracebacks."]
    return "\n".join(lines)


def _config_help(command: str, cls: type) -> str:
    from dpokit.config import field_docs

    docs = field_docs(cls)
    out = [f"usage: dpokit {command} [--config FILE.yaml] [key=value | --key value ...]", "",
           textwrap.fill(cls.__doc__ or "", 100), "",
           "Keys (YAML file and command line; the command line wins):"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append(f"  {f.name} (default: {default!r})")
        out.append(textwrap.fill(docs.get(f.name, ""), 100, initial_indent=" " * 6, subsequent_indent=" " * 6))
        if f.name == "loss_type":
            from dpokit.losses import LOSS_TYPES  # the registry: the names a run accepts, none written here

            out.append(textwrap.fill("loss names: " + ", ".join(LOSS_TYPES), 100, initial_indent=" " * 6,
                                     subsequent_indent=" " * 8))
    from dpokit.compat import ALIASES, ANY, FOREIGN_KEYS

    fields = {f.name for f in dataclasses.fields(cls)}
    out += ["", "Other TRL / transformers keys, so a TRL config ports unchanged:",
            "  " + ", ".join(f"{a} (= {n})" for a, n in ALIASES.items())]
    for title, accepted in (("accepted with any value; they change nothing in dpokit:", True),
                            ("accepted only at TRL's default; any other value is refused with the reason:", False)):
        names = [k for k, (d, _) in FOREIGN_KEYS.items() if k not in fields and (d is ANY) == accepted]
        out += [f"  {title}", textwrap.fill(", ".join(names), 100, initial_indent=" " * 6, subsequent_indent=" " * 6)]
    return "\n".join(out)


def _split_config_arg(argv: list[str]) -> tuple[Optional[str], list[str]]:
    config_file, rest, i = None, [], 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--config":
            if i + 1 >= len(argv):
                raise DpokitError("--config needs a file path")
            config_file = argv[i + 1]
            i += 2
            continue
        if tok.startswith("--config="):
            config_file = tok.split("=", 1)[1]
        else:
            rest.append(tok)
        i += 1
    return config_file, rest


def _train(command: str, argv: list[str]) -> int:
    from dpokit.config import DPOConfig, SFTConfig, build_config, parse_overrides

    cls = SFTConfig if command == "sft" else DPOConfig
    if any(a in ("-h", "--help") for a in argv):
        print(_config_help(command, cls))
        return 0
    config_file, rest = _split_config_arg(argv)
    # --resume: continue the run in output_dir from its newest checkpoint; --resume PATH / --resume=PATH: from that
    # checkpoint. A token after a bare --resume is the path unless it is another option or a key=value override.
    resume, args, i = None, [], 0
    while i < len(rest):
        tok = rest[i]
        if tok == "--resume":
            nxt = rest[i + 1] if i + 1 < len(rest) else ""
            takes_path = nxt and not nxt.startswith("--") and "=" not in nxt
            resume = nxt if takes_path else "latest"
            i += 2 if takes_path else 1
            continue
        if tok.startswith("--resume="):
            resume = tok.split("=", 1)[1] or "latest"
        else:
            args.append(tok)
        i += 1
    overrides = parse_overrides(args)
    if resume is not None:
        overrides["resume_from_checkpoint"] = resume
    cfg = build_config(cls, config_file, overrides)
    if cfg.train_file is None and cfg.dataset_name is None:
        raise DpokitError(f"dpokit {command}: set train_file (in --config or as train_file=PATH) or dataset_name")
    from dpokit.trainer import DPOTrainer, SFTTrainer

    trainer_cls = SFTTrainer if command == "sft" else DPOTrainer
    trainer = trainer_cls(cfg.model_name_or_path, args=cfg)
    with trainer.held():  # the run directory stays locked from the first step to the final model
        try:
            metrics = trainer.train().metrics
        except KeyboardInterrupt:
            from dpokit.checkpoint import last_checkpoint_note

            raise Interrupted(f"interrupted (SIGINT) during step {trainer.global_step + 1}; "
                              f"{last_checkpoint_note(trainer.output_dir)} (resume with --resume)", 2) from None
        out = trainer.save_model()
    summary = ("epoch", "train_runtime", "train_steps_per_second", "train_loss")
    shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float) and k not in summary)
    if trainer.accelerator.is_main_process:
        print(f"[dpokit] saved {out} after {trainer.global_step} steps; last: {shown}")
    if trainer.accelerator.num_processes > 1:
        # Once every rank is here, tear the process group down in order, then the engine-wrapped model (DDP's reducer
        # and its communication state), rather than leave them to interpreter exit, where their native threads can
        # abort the process after the work is done.
        trainer.accelerator.wait_for_everyone()
        trainer.accelerator.end_training()
        import gc

        del trainer
        gc.collect()
    return 0


def _data(argv: list[str]) -> int:
    from dpokit.data.tools import main as data_main

    if not argv or argv[0] in ("-h", "--help"):
        print("usage: dpokit data {check,convert,filter,split,audit} ...  (dpokit data <command> --help for its options)")
        return 0
    return data_main(argv)


# Commands whose module parses its own arguments: `dpokit NAME ARGS` is `MODULE.main(ARGS)`, imported only when used
# (most of them import torch, which `dpokit --help` does without).
MODULE_COMMANDS = {"eval": "dpokit.evaluate", "export": "dpokit.export", "annotate": "dpokit.annotate",
                   "pairs": "dpokit.pairs", "report": "dpokit.report", "sweep": "dpokit.sweep", "bench": "dpokit.bench",
                   "demo": "dpokit.demo"}


def _module_command(command: str):
    def run(argv: list[str]) -> int:
        import importlib

        return importlib.import_module(MODULE_COMMANDS[command]).main(argv)

    return run


def _os_failure(exc: OSError) -> str:
    where = " -> ".join(f"{name}" for name in (exc.filename, exc.filename2) if name is not None)
    reason = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    return f"{where}: {reason}" if where else reason


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    # dpokit prints its own progress; transformers' per-load bars would bury a one-line error.
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # Deprecation notices from inside the libraries (peft calling a transformers method that v6 renames) are for
    # their authors; printed, they would bury the command's one line.
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|accelerate)(\.|$)")
    handlers = {"sft": lambda a: _train("sft", a), "dpo": lambda a: _train("dpo", a), "data": _data,
                **{name: _module_command(name) for name in MODULE_COMMANDS}}
    if command not in handlers:
        import difflib

        match = difflib.get_close_matches(command, handlers, n=1)
        hint = f" (did you mean {match[0]!r}?)" if match else ""
        print(f"dpokit: unknown command {command!r}{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    import signal

    def terminate(signum, frame):
        raise Terminated()

    # SLURM and Kubernetes send SIGTERM before they kill a job: outside a training loop (which finishes its step,
    # checkpoints and stops, see dpokit.guards.StopSignals) it ends the command like Ctrl-C, with one line.
    import threading

    main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = signal.signal(signal.SIGTERM, terminate) if main_thread else None
    try:
        return handlers[command](rest)
    except DpokitError as exc:
        if debug:
            raise
        message = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"dpokit {command}: {'stopped' if isinstance(exc, Interrupted) else 'error'}: {message}",
              file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except OSError as exc:
        # The machine, not the user: a disk that filled or went read-only, a file that vanished, where no reader or
        # writer of dpokit's own (dpokit.fileio) turned it into a DpokitError first. One line still, naming the path.
        if debug:
            raise
        print(f"dpokit {command}: error: {_os_failure(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dpokit {command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"dpokit {command}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
