"""``python -m model_host.demo [CACHE_DIR]``: find (or build) the demo model and print its folder.

``python -m model_host.demo --package`` trains it again into the package folder, the copy that ships.
Run as its own process so that the server's main process never imports torch.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from model_host.demo.build import build_packaged_demo_model, ensure_demo_model

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if sys.argv[1:] == ["--package"]:
        print(build_packaged_demo_model())
    else:
        cache = Path(sys.argv[1]) if len(sys.argv) > 1 else None
        print(ensure_demo_model(cache))
