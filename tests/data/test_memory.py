"""Memory scaling of load_rows -> preference_examples -> tokenize_preference on a synthetic JSON Lines file.

Each size runs in a fresh subprocess that reports its peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``). The
cost of a pair is taken as a DIFFERENCE between two sizes: the imports, the tokenizer and its warm-up leave the same
peak in every child, and memory freed before the data arrives is reused first by every child alike, so both cancel;
what is left is what each extra pair adds. (The first doubling still carries some of that slack, so it reads high.)

Measured on the 2-core dev machine (Llama-2 fast tokenizer; English-like standard pairs of ~711 JSONL bytes and ~172
tokens, i.e. 688 bytes of int32 ids), peak RSS per extra pair from 12k to 24k pairs (and from 25k to 50k pairs):

    ~4.1 KB/pair (3.1 KB/pair)  ->  1M such pairs: ~3.8 GiB (2.9 GiB) on top of the ~0.45 GB of imports.

Per pair that is: the text once (Python str ~ the JSONL bytes), the row dict and the example object, the int32 ids
with their three ndarray headers and the TokenizedPair, and the tokenizer's own growth (~0.3-0.4 KB per text it
tokenizes, outside dpokit). Before streaming JSON Lines and tokenizing in chunks the same pipeline peaked at ~59 KB
per pair (4.7 GB for 80k pairs): the whole file as bytes and as lines, and every pair's Python token lists and fast-
tokenizer Encoding objects at once. Scale: linear in the text and token count; longer pairs cost roughly
(JSONL bytes + 4 x tokens) + ~2 KB each.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

from .conftest import HH_FILE, LLAMA2

SIZES = (6_000, 12_000, 24_000)

# The child: imports and a warm-up first (their peak is common to every size), then the data pipeline; it prints
# its peak RSS in bytes (ru_maxrss is KiB on Linux, bytes on macOS) and the int32 bytes of the token arrays.
CHILD = r"""
import json, resource, sys
from transformers import AutoTokenizer
import datasets  # load_rows imports it; the import is not the data's cost
from dpokit.data import load_rows, preference_examples, tokenize_preference

tok = AutoTokenizer.from_pretrained(sys.argv[2])
tokenize_preference(preference_examples([{"prompt": "warm", "chosen": "up", "rejected": "down"}], "<list>")[0], tok)
rows, name = load_rows(sys.argv[1])
examples, report = preference_examples(rows, name)
pairs = tokenize_preference(examples, tok, report=report)
scale = 1 if sys.platform == "darwin" else 1024
print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "pairs": len(pairs),
                  "token_bytes": sum(p.prompt_ids.nbytes + p.chosen_ids.nbytes + p.rejected_ids.nbytes for p in pairs)}))
"""


def _words() -> list[str]:
    """English words (with their punctuation) from the HH file, so the tokenizer sees realistic text."""
    from dpokit.data import load_rows

    rows, _ = load_rows(HH_FILE)
    return sorted({w for row in list(rows)[:300] for w in re.split(r"\s+", row["chosen"]) if w and ":" not in w})


def write_pairs(path: Path, n: int, words: list[str], seed: int = 0) -> None:
    """`n` distinct standard pairs: prompt 15-30 words, chosen / rejected 20-40 words each."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            prompt = f"Question {i}: " + " ".join(rng.choices(words, k=rng.randint(15, 30)))
            chosen, rejected = (" ".join(rng.choices(words, k=rng.randint(20, 40))) for _ in range(2))
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")


def measure(path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(LLAMA2)], env=env, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(tmp: Path) -> list[dict]:
    words = _words()
    results = []
    for n in SIZES:
        path = tmp / f"pairs_{n}.jsonl"
        write_pairs(path, n, words)
        results.append({"n": n, "file_bytes": path.stat().st_size, **measure(path)})
        path.unlink()
    return results


def marginal(a: dict, b: dict, key: str) -> float:
    """Bytes of `key` per extra pair from size a to size b."""
    return (b[key] - a[key]) / (b["n"] - a["n"])


def test_memory_grows_linearly_with_one_copy_of_the_text(tmp_path):
    small, mid, large = run(tmp_path)
    assert [r["pairs"] for r in (small, mid, large)] == list(SIZES)
    first, second = marginal(small, mid, "peak"), marginal(mid, large, "peak")
    # Linear: the second doubling costs per pair what the first did (held copies would not change this, but
    # anything quadratic or a per-size blow-up would).
    assert second <= 1.3 * first, (first, second)
    # Not several copies: one copy of the text and of the int32 ids costs raw + tokens; the per-object overheads
    # (row dict, example, TokenizedPair, ndarray headers, the tokenizer's growth) add ~2 KB. A second copy of the ids
    # as Python int lists alone would be ~9x `tokens`, far over this bound.
    raw = marginal(mid, large, "file_bytes")
    tokens = marginal(mid, large, "token_bytes")
    assert second <= 4 * (raw + tokens), (second, raw, tokens)


if __name__ == "__main__":  # print the numbers quoted in the module docstring
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        res = run(Path(d))
    for r in res:
        print(r)
    per_pair = marginal(res[1], res[2], "peak")
    print(f"peak RSS per pair {per_pair:.0f} B (first doubling {marginal(res[0], res[1], 'peak'):.0f} B), "
          f"raw JSONL {marginal(res[1], res[2], 'file_bytes'):.0f} B/pair, int32 tokens "
          f"{marginal(res[1], res[2], 'token_bytes'):.0f} B/pair; projected 1M pairs: {per_pair * 1e6 / 2**30:.2f} GiB")
