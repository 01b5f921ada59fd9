"""The quick-start demo (``make demo``): the quick benchmark of every op on this machine.

Graph-pass work will replace this with a small DeepSeek-V3-layout model compiled with backend="omni".
"""

from __future__ import annotations

import sys

from omniops.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["all", "--shapes", "quick", *sys.argv[1:]]))
