import os
import sys

# Make the tests' helpers importable however pytest is invoked.
sys.path.insert(0, os.path.dirname(__file__))
