"""Calibrate the honesty thresholds: run the cheater zoo (and optionally real nodes) through
verification rounds against a trusted reference that is **its own instance** (no model load
or answer cache shared with any node), and print, per node, the range of every statistic
the verdicts use next to its threshold, and how often each check flagged it.

Anchor: the thresholds in ``cluster.core.settings.HonestySettings``. The detection
matrix's judge (``cluster.testing.zoo.matrix``) says what each kind must measure: honest
nodes at most a third of ``max_mean_abs_logprob_diff`` and never flagged, every cheater at
least twice the threshold (or, for the proxy, caught by identity) in every round. One
``BENCH_RESULT`` line per node, for ``bench/RESULTS.md``.

    .venv/bin/python bench/honesty_calibration.py [--reps 20] [--seed-base 5000]
        [--kinds honest,perturbed,quantized,bf16,proxy,lazy,random]
        [--reference local|zoo|URL]
        [--node NAME=URL ...]   # more honest nodes, e.g. --node vllm=http://127.0.0.1:8000/llm

``--reference``: ``local`` (default) loads the model in this process with transformers;
``zoo`` starts a second zoo process serving only an honest node and reaches it over HTTP
(``ServeReference``, the production code path); a URL is a Serve LLM app of your own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
from bench_results import report  # noqa: E402

from cluster.core.settings import PROJECT_ROOT, HonestySettings  # noqa: E402
from cluster.honesty.reference import (  # noqa: E402
    ServeReference,
    TransformersReference,
    TrustedReference,
)
from cluster.honesty.verification import NodeTarget, RoundReport, Verifier  # noqa: E402
from cluster.testing.zoo import ZooProcess  # noqa: E402
from cluster.testing.zoo.matrix import (  # noqa: E402
    CHEATER_DIFF_FACTOR,
    HONEST_DIFF_SHARE,
    Violation,
    flag_counts,
    format_ranges,
    judge_matrix,
    stat_ranges,
)

MODEL = "smollm2"
BENCH = "honesty_calibration.py"


def node_args(values: list[str]) -> dict[str, str]:
    return dict(v.split("=", 1) for v in values)


@contextlib.contextmanager
def reference_url(choice: str, model_dir: Path, log_dir: Path) -> Iterator[str | None]:
    """The reference's URL: None for ``local``, a zoo process of its own for ``zoo``."""
    if choice == "local":
        yield None
    elif choice == "zoo":
        with ZooProcess(["reference=honest"], model_dir,
                        log_path=log_dir / "honesty_reference_zoo.log") as zoo:
            yield zoo.urls["reference"]
    else:
        yield choice


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = HonestySettings()
    model_dir = PROJECT_ROOT / ".cache" / "models" / "smollm2"
    kinds = [k for k in args.kinds.split(",") if k]
    if "proxy" in kinds and "honest" not in kinds:
        raise SystemExit("the proxy fronts the zoo's honest node: add kind honest")
    zoo_nodes = [("proxy@honest" if k == "proxy" else k) for k in kinds]
    log_dir = Path(args.log_dir)
    started = time.monotonic()
    with ZooProcess(zoo_nodes, model_dir, log_path=log_dir / "honesty_zoo.log") as zoo, \
            reference_url(args.reference, model_dir, log_dir) as ref_url:
        zoo_s = time.monotonic() - started
        # kinds in the given order, extra nodes (honest by assumption) after the zoo's honest
        roles = {k: k for k in kinds}
        urls = dict(zoo.urls)
        for name, url in node_args(args.node).items():
            roles[name], urls[name] = "honest", url
        order = sorted(roles, key=lambda n: roles[n] != "honest")
        roles = {n: roles[n] for n in order}
        targets = [NodeTarget(name, urls[name], MODEL, seniority=i)
                   for i, name in enumerate(roles)]
        reports: list[RoundReport] = []
        round_s = []
        async with aiohttp.ClientSession() as http:
            reference: TrustedReference = (
                TransformersReference.load(MODEL, model_dir, threads=1) if ref_url is None
                else ServeReference(MODEL, ref_url, model_dir, http, seed=0))
            verifier = Verifier(settings, reference, http)
            for rep in range(args.reps):
                t0 = time.monotonic()
                reports.append(await verifier.run_round(targets, args.seed_base + rep))
                round_s.append(time.monotonic() - t0)
                flagged = sorted({v.node_id for v in reports[-1].verdicts if v.flagged})
                print(f"round {rep} seed={args.seed_base + rep} {round_s[-1]:.1f}s "
                      f"flagged={flagged}", flush=True)
    violations = judge_matrix(reports, roles, settings)
    ranges = stat_ranges(reports, list(roles))
    return {"zoo_start_s": zoo_s, "round_s": round_s, "roles": roles, "reports": reports,
            "violations": violations, "ranges": ranges,
            "flags": {n: flag_counts(reports, n) for n in roles}}


def _range(lo_hi: tuple[float, float] | None) -> str:
    return "n/a" if lo_hi is None else f"{lo_hi[0]:.2g} - {lo_hi[1]:.2g}"


def report_results(result: dict[str, Any], reference: str, reps: int) -> None:
    """One BENCH_RESULT line per node: its statistic against the threshold it is judged by."""
    settings = HonestySettings()
    threshold = settings.max_mean_abs_logprob_diff
    anchor = f"max_mean_abs_logprob_diff {threshold} (defaults), {reference} reference"
    violations: list[Violation] = result["violations"]
    for node, role in result["roles"].items():
        met = not [v for v in violations if v.node_id == node]
        diff = result["ranges"][node].get("mean_abs_logprob_diff")
        flags = result["flags"][node]
        flagged = ", ".join(f"{c} {n}/{reps}" for c, n in flags.items() if n) or "none"
        label = node if node == role else f"{node} (as {role})"
        figure = f"{label}: mean |dlogprob| vs reference, {reps} rounds; flagged: {flagged}"
        if role == "honest":
            ratio = "n/a" if diff is None else f"{diff[1] / threshold:.2g}x (worst round)"
            goal = f"<= {HONEST_DIFF_SHARE:.2f}x, never flagged"
        elif role == "bf16":
            ratio = "n/a" if diff is None else f"{diff[1] / threshold:.2g}x (worst round)"
            goal = "< 1x, passes (documented limit)"
        elif role in CHEATER_DIFF_FACTOR:
            ratio = "n/a" if diff is None else f"{diff[0] / threshold:.2g}x (best round)"
            goal = f">= {CHEATER_DIFF_FACTOR[role]:g}x, caught every round"
        else:  # proxy: caught by identity, its logprobs are its backend's
            trace = result["ranges"][node].get("trace_share")
            ratio = f"trace share {_range(trace)}"
            goal = "identity flags every round"
        report(BENCH, figure, f"{_range(diff)} nats", anchor, ratio, goal, met)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--seed-base", type=int, default=5000)
    parser.add_argument("--kinds", default="honest,perturbed,quantized,bf16,proxy,lazy,random")
    parser.add_argument("--reference", default="local",
                        help="local: transformers in this process; zoo: an honest zoo node in "
                        "a process of its own, over HTTP; or the URL of a Serve LLM app")
    parser.add_argument("--node", action="append", default=[], metavar="NAME=URL",
                        help="another node, judged as honest (e.g. a vLLM node)")
    parser.add_argument("--log-dir", default="/tmp", help="where the zoo processes log")
    parser.add_argument("--json", default="/tmp/honesty_calibration.json")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print("\n" + format_ranges(result["reports"], result["roles"]))
    for violation in result["violations"]:
        print(f"VIOLATION {violation}")
    rs = result["round_s"]
    print(f"\nzoo start {result['zoo_start_s']:.1f}s; rounds: mean {sum(rs) / len(rs):.1f}s, "
          f"total {sum(rs):.1f}s; {len(result['violations'])} violations")
    report_results(result, args.reference, args.reps)
    Path(args.json).write_text(json.dumps({
        "reference": args.reference, "seed_base": args.seed_base, "roles": result["roles"],
        "round_s": rs, "zoo_start_s": result["zoo_start_s"], "ranges": result["ranges"],
        "flags": result["flags"], "violations": [str(v) for v in result["violations"]],
    }, indent=1))


if __name__ == "__main__":
    main()
