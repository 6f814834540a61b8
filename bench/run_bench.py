"""dpokit vs TRL on the same model shape, pairs, pairs per step and precision (see dpokit/bench.py).

    PYTHONPATH=src python bench/run_bench.py --preset cpu-tiny --output bench/cpu-tiny.json

Same as `dpokit bench ...` / `python -m dpokit.bench ...`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dpokit.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
