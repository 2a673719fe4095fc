"""Run zoo nodes in one process.

    python -m cluster.testing.zoo --kind perturbed --port 8101
    python -m cluster.testing.zoo --node honest --node perturbed --node quantized \\
        --node proxy@honest --node lazy --node random

``--node [NAME=]KIND[@TARGET]``: a proxy's target is another node's name or a URL; a
``sometimes`` node's is the share of requests it cheats on (``q05=sometimes@0.05``). Nodes
listen on ``--port`` + their position (0 = free ports). Once every node serves, one line
``zoo_listening {"name": "http://host:port", ...}`` is printed on stdout; the process then
serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import cast

from cluster.local.zoo import READY_PREFIX
from cluster.testing.http_server import until_stop_signal
from cluster.testing.zoo.cheaters import DEFAULT_CHEAT_SHARE
from cluster.testing.zoo.server import ZOO_KINDS, NodeSpec, Zoo, ZooKind


def parse_node(text: str, port: int) -> NodeSpec:
    name, _, rest = text.rpartition("=") if "=" in text.split("@")[0] else ("", "", text)
    kind, _, target = rest.partition("@")
    if kind not in ZOO_KINDS:
        raise argparse.ArgumentTypeError(f"unknown kind {kind!r} in {text!r}; one of {ZOO_KINDS}")
    if kind == "sometimes":  # @SHARE: the share of requests it cheats on
        try:
            share = float(target) if target else DEFAULT_CHEAT_SHARE
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: sometimes@SHARE takes a number") from None
        return NodeSpec(name or kind, "sometimes", port, None, share)
    if (kind == "proxy") != bool(target):
        raise argparse.ArgumentTypeError(f"{text!r}: a proxy, and only a proxy, takes @TARGET")
    return NodeSpec(name or kind, cast(ZooKind, kind), port, target or None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cluster.testing.zoo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--node", action="append", default=[], metavar="[NAME=]KIND[@TARGET]")
    parser.add_argument("--kind", choices=ZOO_KINDS, help="one node of this kind")
    parser.add_argument("--target", help="the proxy's target URL (with --kind proxy)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="first node's port; 0 = free ports")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="the honest model's directory (default: the prepared SmolLM2)")
    parser.add_argument("--model-name", default="smollm2", help="the model every node claims")
    parser.add_argument("--relative-noise", type=float, default=0.03,
                        help="perturbed kind: noise std as a share of each tensor's RMS")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's)")
    parser.add_argument("--log-level", default="WARNING")
    return parser.parse_args(argv)


def node_specs(args: argparse.Namespace) -> list[NodeSpec]:
    texts = list(args.node)
    if args.kind:
        texts.insert(0, f"{args.kind}@{args.target}" if args.kind == "proxy" else args.kind)
    if not texts:
        raise SystemExit("give --kind or at least one --node")
    return [parse_node(t, args.port + i if args.port else 0) for i, t in enumerate(texts)]


async def serve(args: argparse.Namespace) -> None:
    model_dir = args.model_dir
    if model_dir is None:
        from cluster.core.settings import PROJECT_ROOT
        from cluster.local.models import prepare_smollm2

        model_dir = prepare_smollm2(PROJECT_ROOT / ".cache")
    zoo = Zoo(model_dir, args.model_name, args.host, relative_noise=args.relative_noise,
              seed=args.seed, threads=args.threads or None)
    urls = await zoo.start(node_specs(args))
    print(READY_PREFIX + json.dumps(urls), flush=True)
    await until_stop_signal()
    await zoo.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
