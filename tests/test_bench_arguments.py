"""benchmarks/arguments.py: counts on the scripts' command lines."""
import argparse

import pytest

from benchmarks.arguments import positive_int


def test_positive_int_takes_counts_and_refuses_the_rest():
    assert positive_int("3") == 3
    for text in ("0", "-2", "1.5", "many"):
        with pytest.raises(argparse.ArgumentTypeError, match="positive integer"):
            positive_int(text)
