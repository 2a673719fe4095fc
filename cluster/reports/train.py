"""A training run's status as text (``testbench train status``, ``testbench train run``)."""

from __future__ import annotations

import time

from cluster.train.progress import RunProgress


def _num(value: float | None, fmt: str = ".4f") -> str:
    return "-" if value is None else format(value, fmt)


def _ago(at: float | None, now: float) -> str:
    return "-" if at is None else f"{max(0.0, now - at):.0f} s ago"


def format_train_status(node_state: str, node_key: str | None, run: RunProgress | None,
                        now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [f"node      {node_state}   training key {node_key or '- (cannot train)'}"]
    if run is None:
        lines.append("run       - (none yet)")
        return "\n".join(lines)
    first = run.eval_losses[0].loss if run.eval_losses else None
    lines += [
        f"run       {run.run_id}   {run.state.value}"
        + (f"   error: {run.error}" if run.error else ""),
        f"steps     outer {run.outer_step}/{run.outer_steps}   inner {run.inner_step}/"
        f"{run.inner_steps}   total inner {run.step}",
        f"loss      train {_num(run.loss)}   held-out {_num(run.eval_loss)} (start "
        f"{_num(first)})",
        f"speed     {run.tokens_per_s:,.0f} tokens/s   {run.tokens:,} tokens trained",
    ]
    ckpt = run.last_checkpoint
    lines.append("checkpoint " + ("-" if ckpt is None else
                                  f"outer step {ckpt.outer_step}  {ckpt.path}  "
                                  f"({_ago(ckpt.at, now)})"))
    if run.model_dir:
        lines.append(f"model     {run.model_dir}")
    lines.append(f"workers   {len(run.workers)} (starts {run.worker_starts})")
    if run.peers:
        header = f"  {'peer key':<18} {'state':<13} {'last sync':>9} {'when':>12} {'sent':>10} " \
                 f"{'received':>10}  last error"
        lines += ["peers", header, "  " + "-" * (len(header) - 2)]
        for p in run.peers:
            lines.append(
                f"  {p.public_key[:16] + '..':<18} {p.state:<13} "
                f"{'-' if p.last_sync_step is None else p.last_sync_step:>9} "
                f"{_ago(p.last_sync_at, now):>12} {p.bytes_sent:>10,} {p.bytes_received:>10,}  "
                f"{p.last_error or '-'}")
    return "\n".join(lines)
