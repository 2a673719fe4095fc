"""``testbench train``: training runs on MLNodes (start, status, stop over their signed control
API), a node key for an MLNode, and a run on this Ray cluster without a node (RayJob)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cluster.cli.output import error, progress
from cluster.core.settings import Settings


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="DiLoCo training runs on MLNodes (Ray Train)")
    p.set_defaults(handler=run, needs_stores=False)
    sub = p.add_subparsers(dest="train_cmd", required=True)

    def run_args(a: argparse.ArgumentParser) -> None:
        a.add_argument("--config", required=True, type=Path,
                       help="the run as YAML (cluster/train/config.py TrainRunConfig)")
        a.add_argument("--run-id", help="override the config's run_id")
        a.add_argument("--output-dir", help="override the config's output_dir")
        a.add_argument("--model", help="override the config's model directory")

    s = sub.add_parser("start", help="start a training run on an MLNode (signed request)")
    s.add_argument("--node", required=True, help="the MLNode's base URL (routes under /api/v1)")
    run_args(s)
    s.add_argument("--peer", action="append", default=[], metavar="KEY=URL",
                   help="another MLNode of the run: its public key and URL (repeatable; "
                   "replaces the config's peers)")
    s.add_argument("--min-nodes", type=int, help="override the config's min_nodes")

    st = sub.add_parser("status", help="a node's training run: steps, losses, peers")
    st.add_argument("--node", required=True)
    st.add_argument("--json", action="store_true")

    sp = sub.add_parser("stop", help="stop a node's training run (idempotent)")
    sp.add_argument("--node", required=True)

    k = sub.add_parser("keygen", help="write a new node key (an MLNode's training.node_key_file)")
    k.add_argument("--out", required=True, type=Path, help="file for the private seed (0600)")

    r = sub.add_parser("run", help="run a training run on this Ray cluster, no MLNode (no peers)")
    run_args(r)
    r.add_argument("--workers", type=int, default=1, help="Ray Train workers (DiLoCo replicas)")
    r.add_argument("--cpus-per-worker", type=float, default=1.0)
    r.add_argument("--gpus-per-worker", type=float, default=0.0)
    r.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    r.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    r.add_argument("--max-failures", type=int, default=3)
    r.add_argument("--poll-s", type=float, default=10.0, help="progress every N seconds")
    return p


def _pairs(items: list[str]) -> list[dict[str, str]]:
    out = []
    for item in items:
        key, sep, url = item.partition("=")
        if not sep or not key or not url:
            raise ValueError(f"--peer must look like KEY=URL, got {item!r}")
        out.append({"public_key": key, "url": url})
    return out


def load_run(args: argparse.Namespace) -> Any:
    """The run of ``--config`` with the command line's overrides."""
    from cluster.train.config import TrainRunConfig

    data = yaml.safe_load(args.config.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{args.config}: a training run is a YAML mapping")
    for field in ("run_id", "output_dir", "model"):
        value = getattr(args, field, None)
        if value is not None:
            data[field] = value
    if getattr(args, "peer", None):
        data["peers"] = _pairs(args.peer)
    if getattr(args, "min_nodes", None) is not None:
        data["min_nodes"] = args.min_nodes
    return TrainRunConfig.model_validate(data)


def run(settings: Settings, args: argparse.Namespace) -> int:
    try:
        if args.train_cmd == "keygen":
            return _keygen(args.out)
        if args.train_cmd == "run":
            return _run_here(settings, args)
        return asyncio.run(_remote(settings, args))
    except (ValueError, ValidationError, OSError) as exc:
        error(str(exc))
        return 2


def _keygen(out: Path) -> int:
    from cluster.auth.keys import Ed25519Key

    if out.exists():
        error(f"{out} exists; not overwriting a key")
        return 2
    key = Ed25519Key.generate()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.seed_hex + "\n")
    print(key.public_key)
    return 0


async def _remote(settings: Settings, args: argparse.Namespace) -> int:
    from cluster.auth.peers import RequestSigner
    from cluster.nodes.policy import EndpointGuard
    from cluster.reports.train import format_train_status
    from cluster.train.client import NodeRefused, TrainingClient

    client = TrainingClient(args.node, RequestSigner.from_settings(settings.auth),
                            guard=EndpointGuard.of(settings.requester.endpoint_allowlist))
    try:
        if args.train_cmd == "start":
            print(json.dumps(await client.start(load_run(args))))
        elif args.train_cmd == "stop":
            print(json.dumps(await client.stop()))
        else:
            node_state, key, progress_ = await client.status()
            if args.json:
                print(json.dumps({"node_state": node_state, "node_public_key": key,
                                  "run": progress_.model_dump(mode="json") if progress_ else None},
                                 indent=2))
            else:
                print(format_train_status(node_state, key, progress_))
    except NodeRefused as exc:
        error(f"{args.node}: {exc}")
        return 1
    finally:
        await client.close()
    return 0


def _run_here(settings: Settings, args: argparse.Namespace) -> int:
    """A run of this Ray cluster's workers alone: the wiring MLNodes use, without their peer
    channel (a run with peers needs it: start it on MLNodes)."""
    from cluster.auth.keys import Ed25519Key
    from cluster.local.bootstrap import init_ray
    from cluster.reports.train import format_train_status
    from cluster.train.config import ScalingSpec
    from cluster.train.progress import TrainState
    from serve_apps.poc.training import RayTrainingLauncher

    config = load_run(args)
    if config.peers:
        raise ValueError("a run with peers needs their outer-sync messages, which MLNodes "
                         "receive: start it with `testbench train start --node URL` on each")
    scaling = ScalingSpec(workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                          gpus_per_worker=args.gpus_per_worker, device=args.device,
                          backend=args.backend, max_failures=args.max_failures)
    init_ray(settings)
    key = Ed25519Key.generate()

    async def go() -> int:
        launcher = RayTrainingLauncher(scaling, settings.stores.postgres_url, 1 << 20)
        handle = launcher.start(config, key)
        try:
            while not handle.done():
                await asyncio.sleep(args.poll_s)
                p = await handle.status()
                progress(f"{p.state.value} outer {p.outer_step}/{p.outer_steps} inner "
                         f"{p.inner_step}/{p.inner_steps} loss {p.loss} held-out {p.eval_loss} "
                         f"{p.tokens_per_s:,.0f} tokens/s")
        except asyncio.CancelledError:
            await handle.stop(timeout_s=120)
            raise
        final = await handle.status()
        print(format_train_status("local", None, final))
        await handle.close()
        return 0 if final.state == TrainState.COMPLETED else 1

    return asyncio.run(go())
