"""Export a LoRA run as a full model: base weights with the adapter merged in, loadable by plain transformers."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from dpokit import modelcard, rundir
from dpokit.errors import DpokitError


def merge_adapter(adapter_dir: str | os.PathLike, output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Load the adapter's base model (recorded in adapter_config.json), merge, save model and tokenizer atomically.
    An existing, non-empty `output_dir` is replaced only with `overwrite` (it may hold another model); never when it
    is, holds or lies inside the adapter run or its base model, and never while a run is writing into it."""
    from dpokit.fileio import atomic_path, read_text, refuse_overlap
    from dpokit.models import adapter_base, load_merged

    adapter_dir, out = Path(adapter_dir), Path(output_dir)
    if not adapter_dir.is_dir():
        raise DpokitError(f"{adapter_dir}: no such run directory")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise DpokitError(f"{adapter_dir}: no adapter_config.json (not a LoRA run; a full model needs no merge)")
    refuse_overlap({"output_dir": out}, {"the adapter run": adapter_dir, "the base model": adapter_base(adapter_dir)})
    if out.exists() and not out.is_dir():
        raise DpokitError(f"{out} is a file; the merged model is a directory: choose another output directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DpokitError(f"{out} already exists and is not empty; choose another output directory or pass "
                          "--overwrite")
    lock = rundir.RunLock(out) if out.is_dir() else contextlib.nullcontext()
    if out.is_dir():
        lock.check_free()  # before the merge, which may take minutes
    merged, tokenizer = load_merged(adapter_dir, what="adapter run")
    # The adapter's model card, refreshed for the merged model (a card of the user's is not carried over).
    card = adapter_dir / modelcard.CARD
    text = read_text(card) if card.is_file() and modelcard.is_ours(card) else None
    # Written whole beside `out`, then renamed into place: a full disk or a kill leaves the old `out` as it was. A
    # run writing into `out` keeps it: its lock is held for the replacement.
    with lock, atomic_path(out, what=f"the merged model {out}") as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / modelcard.CARD).write_text(modelcard.merged(text, adapter_base(adapter_dir)), encoding="utf-8")
    return out


def main(argv: list[str]) -> int:
    """`dpokit export ADAPTER_DIR OUTPUT_DIR --merge [--overwrite]`."""
    from dpokit.cli import COMMANDS
    from dpokit.options import Parser

    parser = Parser(prog="dpokit export", description=COMMANDS["export"])
    parser.add_argument("adapter_dir", reads=True, help="a run directory holding a LoRA adapter (adapter_config.json)")
    parser.add_argument("output_dir", writes=True, help="where to write the merged model")
    parser.add_argument("--merge", action="store_true", required=True,
                        help="merge the adapter into the base weights (the only export so far)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty output_dir")
    args = parser.parse_args(argv)
    out = merge_adapter(args.adapter_dir, args.output_dir, overwrite=args.overwrite)
    print(f"[dpokit] merged model written to {out}")
    return 0
