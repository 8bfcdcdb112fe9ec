import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts a whole script or trains a model for seconds; "
                                       "`python -m pytest -q -m \"not slow\" tests` is the fast "
                                       "subset for editing")
