"""Write the sentiment task as files, for the command-line walk-through in run.sh.

    python examples/sentiment/make_task.py OUT_DIR

OUT_DIR/base/        a tiny random Llama + its word-level tokenizer (HF format)
OUT_DIR/sft.jsonl    prompt/completion rows, half positive, half negative continuations
OUT_DIR/prefs.jsonl  prompt/chosen/rejected rows, the positive continuation preferred
OUT_DIR/heldout_pairs.jsonl, OUT_DIR/heldout_prompts.jsonl  held-out prompts never trained on
"""

import json
import sys
from pathlib import Path

from dpokit.demo import build_corpus, build_model, build_tokenizer


def write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(out: str, seed: int = 0) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(seed, num_train=1000, num_heldout=64, num_heldout_pairs=128)
    tokenizer = build_tokenizer()
    build_model(tokenizer, seed).save_pretrained(out_dir / "base")
    tokenizer.save_pretrained(out_dir / "base")
    write_jsonl(out_dir / "sft.jsonl", corpus.sft_rows)
    write_jsonl(out_dir / "prefs.jsonl", corpus.dpo_rows)
    write_jsonl(out_dir / "heldout_pairs.jsonl", corpus.heldout_pairs)
    write_jsonl(out_dir / "heldout_prompts.jsonl", [{"prompt": p} for p in corpus.heldout_prompts])
    print(f"task written to {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/sentiment")
