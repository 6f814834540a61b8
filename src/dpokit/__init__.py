"""dpokit: Direct Preference Optimization and its family for Hugging Face causal LMs."""

__version__ = "0.1.0"

from dpokit.config import DPOConfig, SFTConfig  # noqa: E402

__all__ = ["DPOConfig", "SFTConfig", "DPOTrainer", "SFTTrainer", "__version__"]


def __getattr__(name):
    # The trainers import torch/transformers; load them on first use so `import dpokit` and `dpokit --help` stay fast.
    if name in ("DPOTrainer", "SFTTrainer"):
        from dpokit import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'dpokit' has no attribute {name!r}")
