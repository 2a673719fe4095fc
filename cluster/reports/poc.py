"""A proof-of-compute round as a text table (``testbench poc round``)."""

from __future__ import annotations

from collections.abc import Sequence

from cluster.poc.config import PocRoundParams
from cluster.poc.round import NodeRoundResult


def format_results(params: PocRoundParams, results: Sequence[NodeRoundResult]) -> str:
    header = (f"{'node':<20} {'computed':>9} {'nonces/s':>9} {'claimed':>8} {'sampled':>8} "
              f"{'mismatch':>8} {'p-value':>10}  verdict")
    lines = [f"round seed={params.seed!r} r_target={params.r_target:.6f} "
             f"model={params.model.model_dump()}", header, "-" * len(header)]
    for r in results:
        if r.verdict is None:
            lines.append(f"{r.node_id:<20} {'':>9} {'':>9} {'':>8} {'':>8} {'':>8} {'':>10}  "
                         f"ERROR {r.error}")
            continue
        v = r.verdict
        rate = r.nonces_computed / r.generate_s if r.generate_s > 0 else 0.0
        lines.append(f"{r.node_id:<20} {r.nonces_computed:>9} {rate:>9.0f} {v.n_claimed:>8} "
                     f"{v.n_sampled:>8} {v.n_mismatch:>8} {v.p_value:>10.3g}  "
                     f"{'FRAUD' if v.fraud else 'honest'}")
    return "\n".join(lines)
