"""Make the repository root importable, so tests can use `tools.random_weights` and `tools.toyworld`."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
