"""Child process of the fuzz suite (started by fuzz_runner): runs the requested cases, one line per start / result.

Request on stdin (JSON): {"suite": "cpp" | "public" | "regress", "isa": ..., "backend": ..., "ids": [...]}.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# Keep a runaway case from taking the shared machine's memory with it.
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


def main() -> None:
    req = json.loads(sys.stdin.read())
    import fuzz_suites
    import torch

    torch.set_num_threads(2)
    suite = fuzz_suites.SUITES[req["suite"]]
    cases = suite.cases()
    ctx = suite.setup(req)
    for cid in req["ids"]:
        print("S\t" + cid, flush=True)
        rec = suite.run(cases[cid], ctx)
        print("R\t" + json.dumps({"id": cid, **rec}), flush=True)


if __name__ == "__main__":
    main()
