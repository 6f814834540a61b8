"""The task's judge for `dpokit eval --judge judge:positive`: the sentiment-lexicon score of the continuation."""

from dpokit.demo import sentiment_reward


def positive(prompt: str, completion: str) -> float:
    return sentiment_reward(completion)
