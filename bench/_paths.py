"""Imported first by every bench script: take bench/ off sys.path, put the repository root on.

bench/queue.py is named like the stdlib's ``queue`` (the issue names it so); with bench/ on
the path, anything importing ``queue`` (torch, multiprocessing) would get it instead.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))
