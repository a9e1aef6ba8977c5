"""Test-suite setup: the shared helpers (toy.py, parts_fakes.py) importable from every folder.

The tests mirror the package layout (tests/method, tests/training, ...); each folder's files
import the helpers at the top of tests/ by name.
"""

import sys
from pathlib import Path

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
