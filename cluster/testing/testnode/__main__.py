"""Run a test node as a process: ``python -m cluster.testing.testnode --port P --mode correct``.

Prints one line ``testnode_listening url=http://HOST:PORT`` on stdout once it serves (so a
parent started with ``--port 0`` can read the port), then serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from cluster.testing.http_server import until_stop_signal
from cluster.testing.testnode.behaviour import NodeBehaviour
from cluster.testing.testnode.server import TestNode

_RATES = (
    "error_rate",
    "unavailable_rate",
    "rate_limit_rate",
    "disconnect_rate",
    "hang_rate",
    "invalid_json_rate",
    "huge_body_rate",
    "wrong_content_type_rate",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cluster.testing.testnode", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port")
    parser.add_argument("--mode", choices=["correct", "wrong"], default="correct")
    parser.add_argument("--tokenizer", default=None, help="local HF tokenizer directory")
    parser.add_argument("--model-name", default="smollm2")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before answering")
    parser.add_argument("--seed", type=int, default=0)
    for rate in _RATES:
        parser.add_argument(f"--{rate.replace('_', '-')}", type=float, default=0.0, dest=rate)
    parser.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    parser.add_argument("--log-level", default="WARNING")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    behaviour = NodeBehaviour(
        mode=args.mode,
        latency_s=args.latency,
        seed=args.seed,
        **{rate: getattr(args, rate) for rate in _RATES},
    )
    node = TestNode(behaviour, args.tokenizer, args.host, args.port, args.model_name)
    url = await node.start()
    print(f"testnode_listening url={url}", flush=True)
    await until_stop_signal()
    await node.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    if not args.no_uvloop:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
