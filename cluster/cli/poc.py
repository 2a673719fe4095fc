"""``testbench poc``: calibrate a round's radius, run a round against nodes, show verdicts."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
from typing import Any

from cluster.cli.output import error
from cluster.core.settings import Settings
from cluster.poc.config import PocModelParams, PocRoundParams, ValidationConfig

DEFAULT_SEED = "testbench-poc-round"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("poc", help="proof of compute: calibrate, run a round, judge nodes")
    p.set_defaults(handler=run, needs_stores=True)
    sub = p.add_subparsers(dest="poc_cmd", required=True)

    def model_args(a: argparse.ArgumentParser) -> None:
        d = PocModelParams()
        a.add_argument("--seed", default=DEFAULT_SEED, help="the round's public seed (block hash)")
        a.add_argument("--dim", type=int, default=d.dim)
        a.add_argument("--layers", type=int, default=d.n_layers)
        a.add_argument("--heads", type=int, default=d.n_heads)
        a.add_argument("--vocab", type=int, default=d.vocab_size)
        a.add_argument("--seq-len", type=int, default=d.seq_len)
        a.add_argument("--out-dim", type=int, default=d.out_dim)
        a.add_argument("--batch-size", type=int, default=64)
        a.add_argument("--valid-fraction", type=float, default=0.1,
                       help="calibrate r_target so this share of nonces is valid")

    c = sub.add_parser("calibrate", help="print r_target for a wanted valid fraction")
    model_args(c)
    c.add_argument("--nonces", type=int, default=8192)

    r = sub.add_parser("round", help="run a round against nodes and judge them")
    model_args(r)
    r.add_argument("--node", action="append", required=True, metavar="ID=URL",
                   help="a PoC node (repeatable); routes are under URL/api/v1")
    r.add_argument("--public-key", action="append", default=[], metavar="ID=KEY",
                   help="a node's public key (default: a key derived from its id, for tests)")
    r.add_argument("--r-target", type=float, default=None, help="skip calibration")
    r.add_argument("--seconds", type=float, default=20.0, help="generation time per node")
    v = ValidationConfig()
    r.add_argument("--sample-size", type=int, default=v.sample_size)
    r.add_argument("--honest-rate", type=float, default=v.honest_mismatch_rate)
    r.add_argument("--p-value", type=float, default=v.p_value_threshold)
    r.add_argument("--sample-seed", type=int, default=None, help="default: random")
    r.add_argument("--json", action="store_true")
    r.add_argument("--no-store", action="store_true", help="do not record verdicts in MongoDB")
    return p


def _model(args: argparse.Namespace) -> PocModelParams:
    return PocModelParams(dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                          vocab_size=args.vocab, seq_len=args.seq_len, out_dim=args.out_dim)


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"{what} must look like ID=VALUE, got {item!r}")
        out[key] = value
    return out


def default_public_key(node_id: str) -> str:
    """A stand-in key for nodes registered without one (bench and tests only)."""
    return hashlib.sha256(f"testbench-poc-key|{node_id}".encode()).hexdigest()


def run(settings: Settings, args: argparse.Namespace) -> int:
    # torch takes ~1.5 s to import: only this command pays for it, not every `testbench` call.
    from cluster.poc.calibration import calibrate_r_target
    from cluster.poc.compute import configure_torch
    from cluster.poc.round import PocNodeTarget, run_poc_round
    from cluster.reports.poc import format_results

    configure_torch(1)
    try:
        model = _model(args)
        if args.poc_cmd == "calibrate":
            r = calibrate_r_target(args.seed, model, args.valid_fraction, args.nonces,
                                   args.batch_size)
            print(f"r_target={r!r}  (seed={args.seed!r}, valid fraction {args.valid_fraction}, "
                  f"{args.nonces} nonces)")
            return 0
        nodes = _pairs(args.node, "--node")
        keys = _pairs(args.public_key, "--public-key")
        validation = ValidationConfig(sample_size=args.sample_size,
                                      honest_mismatch_rate=args.honest_rate,
                                      p_value_threshold=args.p_value)
    except ValueError as exc:
        error(str(exc))
        return 2
    r_target = args.r_target
    if r_target is None:
        r_target = calibrate_r_target(args.seed, model, args.valid_fraction,
                                      batch_size=args.batch_size)
    params = PocRoundParams(seed=args.seed, model=model, r_target=r_target,
                            batch_size=args.batch_size)
    targets = [PocNodeTarget(node_id=n, url=u, public_key=keys.get(n) or default_public_key(n))
               for n, u in nodes.items()]
    results = asyncio.run(run_poc_round(
        settings, params, validation, targets, args.seconds, sample_seed=args.sample_seed,
        record=not args.no_store))
    rows = [r.model_dump(mode="json") for r in results]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_results(params, results))
    bad = [r for r in results if r.error or (r.verdict and r.verdict.fraud)]
    return 1 if bad else 0
