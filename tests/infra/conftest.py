"""infra/ is not an installed package: its tests import ``infra.kuberay`` from the checkout."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
