"""Verifiers for the trainer tests: a deterministic coin on the response text (about half the rollouts
"correct", so every routing case occurs with the random tiny model), and one that always raises."""


def coin(response, answer):
    return float(sum(map(ord, response)) % 2 == 0)


def broken(response, answer):
    raise RuntimeError("verifier bug")
