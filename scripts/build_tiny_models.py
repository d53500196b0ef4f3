"""Build the tiny random-weight models used by the tests, the demo and the benchmarks (offline).

    python scripts/build_tiny_models.py [FOLDER]     # default: $OURVIDZ_HOME/models

Then point the worker at one: OURVIDZ_CHAT_MODEL=FOLDER/tiny-qwen2 OURVIDZ_CHAT_DEVICE=cpu.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from worker.config import Settings
from worker.tiny_models import build_tiny_qwen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", type=Path, default=None, help="where the models go")
    args = parser.parse_args()
    folder = args.folder or Settings().home_dir / "models"
    print(build_tiny_qwen(folder / "tiny-qwen2"))


if __name__ == "__main__":
    main()
