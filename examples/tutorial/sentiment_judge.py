"""The judge of step 5 (`05_evaluation.py`): a function `judge(prompt, completion) -> float`.

A judge lives in a module so that `dpokit eval --judge sentiment_judge:positive_words` (run from this directory, or
with it on PYTHONPATH) and `evaluate_model(..., judge="sentiment_judge:positive_words")` import the same function.
"""

from dpokit.demo import sentiment_reward


def positive_words(prompt, completion) -> float:
    """1 for a completion with only positive words, 0 with only negative ones, 0.5 with none (the demo's score)."""
    return sentiment_reward(completion)
