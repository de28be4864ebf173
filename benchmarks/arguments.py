"""argparse types shared by the benchmark scripts."""
import argparse


def positive_int(text: str) -> int:
    """A count (tokens, rounds, threads, ...): `--rounds 0` is an error here, not an empty median after the setup."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value
