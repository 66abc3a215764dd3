import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # helper modules (sharding_tiny, sharded_checks) import as top-level modules
