"""The traffic check against the "sometimes-cheater": how often a round of measuring traffic
flags a node that answers a share q of its requests with a cheaper model (the zoo's
``sometimes`` kind, SmolLM2 with every other decoder layer dropped; a seeded draw per HTTP
request), against q, and how often it flags an honest node over the same rounds.

The path is the detection matrix's (``tests/cluster/honesty/test_detection_matrix.py``,
fixture ``traffic``): one zoo process serves ``honest`` and one ``sometimes@q`` node per q;
the trusted reference (SmolLM2 in transformers, float32, in this process, its own load)
computes its per-doc results on a pool of 32 openbookqa and 16 signature docs
(``cluster/testing/traffic.py``); the honest node answers the pool once, as the loop sends
it; each of ``--rounds`` seeded rounds (``TrafficRound.draw``) takes 24 openbookqa docs and
the 16 signature docs (40 requests), every sometimes node answers that round's docs afresh
(its draws are per request), and the traffic check (``cluster/honesty/measuring.py``,
``TrafficJudge`` + ``judged_verdict`` with the shipped ``Settings()``, as
``actors/auditor.py`` -> ``check_traffic`` runs it) judges every node's round.

Per q: flagged rounds / rounds (traffic verdict ``fail``), the rounds in which the node
served at least one request with the cheaper model (the zoo's ``/stats`` routes), and the
binomial model 1 - (1 - q)^n, with n the loglikelihood requests judged per round counted in
the same run: HTTP requests, the sometimes node's unit of draw (one openbookqa doc's four
choices travel in one body, so they are cheated on together); one outlier among them fails
the round. The model is printed for comparison, not as a performance anchor: the
signature generations (16 per round) can also flag a cheated round, so the measured rate
may exceed it, up to 1 - (1 - q)^(all requests), printed beside it. Goals: the honest node
is flagged in 0 rounds; q >= 0.25 is flagged in >= 19 of 20 rounds (95%), what the
detection matrix asserts for its ``sometimes@0.25`` node. The sometimes nodes share one
seeded draw sequence (the zoo's ``--seed``), so their cheated requests overlap across q.

    .venv/bin/python bench/sometimes_rate.py [--rounds 20] [--shares 0.05 0.1 0.25 0.5]
        [--log-dir /tmp]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
from bench_results import report  # noqa: E402

from cluster.core.errors import ErrorCode  # noqa: E402
from cluster.core.schemas import Node  # noqa: E402
from cluster.core.settings import PROJECT_ROOT, Settings  # noqa: E402
from cluster.core.verdicts import Outcome  # noqa: E402
from cluster.honesty.measuring import (  # noqa: E402
    Rescorer,
    TaskReference,
    TrafficDoc,
    TrafficJudge,
    judged_verdict,
)
from cluster.honesty.reference import TransformersReference  # noqa: E402
from cluster.testing.traffic import (  # noqa: E402
    TrafficRound,
    adapter_for,
    measure_docs,
    read_rows,
    reference_for_docs,
)
from cluster.testing.zoo import ZooProcess  # noqa: E402
from cluster.wire import openai as wire  # noqa: E402

BENCH = "sometimes_rate.py"
MODEL = "smollm2"
DATASETS = PROJECT_ROOT / "datasets"
SHARES = (0.05, 0.1, 0.25, 0.5)
POOL = {"openbookqa": 32, "signature": 16}  # docs the honest node answers once
ROUND_DOCS = {"openbookqa": 24, "signature": 16}  # 40 requests per round
GOAL_SHARE = 0.25  # the detection matrix's SOMETIMES_SHARE: flagged in >= 19 of 20 rounds
GOAL_RATE = 19 / 20
HONEST = "honest"


def node_name(share: float) -> str:
    return f"sometimes_{share:g}"


@dataclass
class NodeRounds:
    """One node's traffic verdicts over the rounds."""

    name: str
    share: float | None  # None: the honest node
    flagged: int = 0
    unknown: int = 0
    cheated_rounds: int = 0  # rounds with a request answered by the cheaper model
    flagged_cheated: int = 0
    cheaper_requests: int = 0
    requests: int = 0
    outliers: list[int] = field(default_factory=list)
    ll_bodies: list[int] = field(default_factory=list)  # per round: loglikelihood HTTP requests
    ll_items: list[int] = field(default_factory=list)  # per round: loglikelihoods in them
    totals: list[int] = field(default_factory=list)  # per round: all requests
    reasons: list[str] = field(default_factory=list)  # of the flagged rounds

    def expected(self, counts: Sequence[int]) -> float:
        """The binomial model's rate, 1 - (1 - q)^n, averaged over the rounds' n."""
        q = self.share or 0.0
        return sum(1 - (1 - q) ** n for n in counts) / len(counts) if counts else 0.0


def loglikelihood_requests(docs: Sequence[TrafficDoc]) -> tuple[int, int]:
    """Loglikelihood requests of a round the traffic check judges (answered docs, answered
    relays; echo bodies as ``measuring._is_loglikelihood`` tells them): (HTTP requests,
    loglikelihoods in them)."""
    bodies = items = 0
    for doc in docs:
        if doc.error_code != ErrorCode.OK:
            continue
        for prompt, _ in doc.exchanges():
            body = prompt.body
            if body.get("echo") and wire.max_output_tokens(body) <= 1:
                bodies += 1
                items += len(wire.prompt_items(body.get("prompt")))
    return bodies, items


async def cheaper_count(http: aiohttp.ClientSession, node: Node) -> int:
    """Requests the zoo node has answered with the cheaper model since it started."""
    async with http.get(node.base_url + "/stats") as resp:
        stats = await resp.json()
    return int((stats.get("by_route") or {}).get("cheaper", 0))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from cluster.local.models import prepare_smollm2

    model_dir = prepare_smollm2(PROJECT_ROOT / ".cache")
    shares = sorted(set(args.shares))
    names = {node_name(q): q for q in shares}
    zoo_nodes = [HONEST, *(f"{n}=sometimes@{q}" for n, q in names.items())]
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with ZooProcess(zoo_nodes, model_dir, log_path=log_dir / "sometimes_rate_zoo.log") as zoo:
        print(f"zoo: {len(zoo_nodes)} nodes in {time.monotonic() - started:.1f} s", flush=True)
        reference = TransformersReference.load(MODEL, model_dir, threads=1)
        rows = {task: read_rows(DATASETS, task) for task in POOL}
        docs = {task: {d: rows[task][d] for d in range(n)} for task, n in POOL.items()}
        references: dict[str, TaskReference] = {}
        for task in POOL:
            references[task], work, seconds = await reference_for_docs(
                reference, task, DATASETS, model_dir, docs[task])
            print(f"reference: {task} {len(docs[task])} docs, {work.tokens} tokens, "
                  f"{seconds:.1f} s", flush=True)
        nodes = {name: Node(node_id=name, url=zoo.urls[name], model=MODEL,
                            tokenizer=str(model_dir)) for name in [HONEST, *names]}
        async with aiohttp.ClientSession() as http:

            async def answer(name: str, wanted: Mapping[str, Sequence[int]]
                             ) -> dict[str, dict[int, TrafficDoc]]:
                node = nodes[name]
                return {task: await measure_docs(http, node, adapter_for(task, DATASETS, node),
                                                 {d: docs[task][d] for d in ids})
                        for task, ids in wanted.items()}

            everything = {task: list(range(n)) for task, n in POOL.items()}
            pool_started = time.monotonic()
            honest_pool = await answer(HONEST, everything)
            print(f"honest node: pool of {sum(POOL.values())} docs answered in "
                  f"{time.monotonic() - pool_started:.1f} s", flush=True)
            settings = Settings()  # the shipped defaults
            rescorer = Rescorer(reference)
            found = {name: NodeRounds(name, names.get(name)) for name in nodes}
            rounds_started = time.monotonic()
            for seed in range(1, args.rounds + 1):
                draw = TrafficRound.draw(seed, everything, ROUND_DOCS)
                before = {n: await cheaper_count(http, nodes[n]) for n in names}
                fresh = await asyncio.gather(*[answer(n, draw.docs) for n in names])
                cheated = {n: await cheaper_count(http, nodes[n]) - before[n] for n in names}
                pools = {HONEST: honest_pool, **dict(zip(names, fresh, strict=True))}
                line = []
                for name, pool in pools.items():
                    round_docs = draw.traffic(pool)
                    bodies, items = loglikelihood_requests(round_docs)
                    total = sum(len(d.prompts) for d in round_docs)
                    judge = TrafficJudge(settings, rescorer, salt=draw.salt)
                    record = await judged_verdict(
                        judge, name, round_docs, references,
                        verdict_id=f"traffic|{name}|{seed}", ts=time.time())
                    failed = record.outcome is Outcome.FAIL
                    outliers = (int(record.evidence.get("outlier_requests") or 0)
                                + int(record.evidence.get("rescored_outliers") or 0))
                    r = found[name]
                    r.requests += total
                    r.ll_bodies.append(bodies)
                    r.ll_items.append(items)
                    r.totals.append(total)
                    r.flagged += failed
                    r.unknown += record.outcome is Outcome.UNKNOWN
                    r.outliers.append(outliers)
                    if failed:
                        r.reasons.append(record.reason)
                    what = f"{name} {record.outcome.value} ({outliers} outliers"
                    if name in cheated:
                        r.cheaper_requests += cheated[name]
                        r.cheated_rounds += cheated[name] > 0
                        r.flagged_cheated += cheated[name] > 0 and failed
                        what += f", cheaper model on {cheated[name]} of {total} requests"
                    line.append(what + ")")
                print(f"round {seed}: " + "; ".join(line), flush=True)
            rounds_s = time.monotonic() - rounds_started
    return {"found": found, "rounds_s": rounds_s,
            "total_s": time.monotonic() - started, "rescored_tokens": rescorer.spent}


def _counts(values: Sequence[int]) -> str:
    low, high = min(values), max(values)
    return f"{low}" if low == high else f"{low}-{high}"


def _model(r: NodeRounds, counts: Sequence[int]) -> str:
    return "-" if r.share is None else f"{r.expected(counts):.1%}"


def print_and_report(result: dict[str, Any], rounds: int) -> None:
    found: dict[str, NodeRounds] = result["found"]
    honest = found[HONEST]
    print(f"\ntraffic check, shipped Settings(), {rounds} rounds of {_counts(honest.totals)} "
          f"requests ({ROUND_DOCS['openbookqa']} openbookqa + {ROUND_DOCS['signature']} "
          f"signature docs); n = {_counts(honest.ll_bodies)} loglikelihood requests judged per "
          f"round (HTTP requests, the sometimes node's unit of draw; "
          f"{_counts(honest.ll_items)} loglikelihoods in them)")
    header = (f"{'node':<16} {'q':>5} {'flagged':>9} {'rate':>6} {'1-(1-q)^n':>10} "
              f"{'1-(1-q)^all':>12} {'cheated rounds':>15} {'flagged of those':>17} "
              f"{'cheaper/requests':>17} {'outliers/round':>15} {'unknown':>8}")
    print(header + "\n" + "-" * len(header))
    for name, r in found.items():
        q = "-" if r.share is None else f"{r.share:g}"
        cheated = "-" if r.share is None else f"{r.cheated_rounds}/{rounds}"
        of_those = "-" if r.share is None else f"{r.flagged_cheated}/{r.cheated_rounds}"
        served = "-" if r.share is None else f"{r.cheaper_requests}/{r.requests}"
        print(f"{name:<16} {q:>5} {f'{r.flagged}/{rounds}':>9} {r.flagged / rounds:>6.0%} "
              f"{_model(r, r.ll_bodies):>10} {_model(r, r.totals):>12} {cheated:>15} "
              f"{of_those:>17} {served:>17} {sum(r.outliers) / len(r.outliers):>15.1f} "
              f"{r.unknown:>8}")
    for r in found.values():
        if r.reasons:
            print(f"{r.name}, first flagged round: {r.reasons[0][:300]}")
    print(f"\nrounds: {result['rounds_s']:.1f} s ({result['rounds_s'] / rounds:.1f} s per round), "
          f"bench {result['total_s']:.0f} s; reference tokens re-scored "
          f"{result['rescored_tokens']}")
    for r in (r for r in found.values() if r.share is not None):
        assert r.share is not None
        rate = r.flagged / rounds
        expected = r.expected(r.ll_bodies)
        gated = r.share >= GOAL_SHARE
        report(BENCH, f"traffic check: rounds flagging a node that serves a cheaper model on "
               f"q={r.share:g} of its requests ({rounds} rounds of "
               f"{_counts(r.totals)} requests, n={_counts(r.ll_bodies)} loglikelihood requests)",
               f"{r.flagged}/{rounds} ({rate:.0%})",
               f"binomial model 1-(1-q)^n, same run: {expected:.1%}",
               f"{rate / expected:.2f}x" if expected else "n/a",
               f">= {GOAL_RATE:.0%} of rounds (19/20)" if gated else "printed",
               rate >= GOAL_RATE if gated else True)
    report(BENCH, f"traffic check: rounds flagging the honest node ({rounds} rounds, the "
           "same draws)", f"{honest.flagged}/{rounds}",
           f"sometimes nodes flagged in {sum(r.flagged for r in found.values()) - honest.flagged}"
           f" of {rounds * (len(found) - 1)} node-rounds", "n/a", "0 false flags",
           honest.flagged == 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--shares", type=float, nargs="+", default=list(SHARES),
                        help="the shares q of requests the sometimes nodes cheat on")
    parser.add_argument("--log-dir", default="/tmp", help="where the zoo's log goes")
    args = parser.parse_args()
    if args.rounds < 1 or not all(0.0 < q <= 1.0 for q in args.shares):
        parser.error("--rounds >= 1 and every share in (0, 1]")
    result = asyncio.run(run(args))
    print_and_report(result, args.rounds)


if __name__ == "__main__":
    main()
