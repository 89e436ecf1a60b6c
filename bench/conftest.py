"""Make the repository root importable so benchmarks share tests/hotpath.py with the guards."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
