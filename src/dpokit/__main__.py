"""`python -m dpokit ...` is the `dpokit` command (so `accelerate launch -m dpokit dpo ...` works)."""

import sys

from dpokit.cli import main

sys.exit(main())
