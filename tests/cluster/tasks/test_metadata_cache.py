"""transformers' distribution map, read from a cache: the same answer, without reading every
installed distribution's metadata in each process that imports it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cluster.core.settings import PROJECT_ROOT

SCRIPT = """
import importlib.metadata as md, json, sys
truth = md.packages_distributions()
import cluster.tasks.lmeval  # installs the cache
first, second = md.packages_distributions(), md.packages_distributions()
import transformers.utils.import_utils as iu
print(json.dumps([first == truth, second == truth, iu.PACKAGE_DISTRIBUTION_MAPPING == truth,
                  md.packages_distributions.__module__]))
"""


def _run(cache: Path) -> list:
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=PROJECT_ROOT, check=True,
                          capture_output=True, text=True, env={"XDG_CACHE_HOME": str(cache),
                                                               "PATH": "/usr/bin:/bin"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_cached_map_is_the_map_and_is_written_once(tmp_path: Path) -> None:
    assert _run(tmp_path)[:3] == [True, True, True]
    (cached,) = (tmp_path / "testbench").glob("packages-distributions-*.json")
    assert json.loads(cached.read_text())["yaml"] == ["PyYAML"]
    assert _run(tmp_path) == [True, True, True, "cluster.tasks.lmeval._compat"]  # from the file
    cached.write_text("not json")  # a broken cache is read past, and rewritten
    assert _run(tmp_path)[:3] == [True, True, True]
    assert json.loads(cached.read_text())["yaml"] == ["PyYAML"]
