"""One worker's DiLoCo loop in this process (no Ray): learning, exact resume, the exported
model directory, and how a failed sync ends a run."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from fixtures_train import tiny_run

from cluster.train.config import ScalingSpec, TrainRunConfig, WorkerSpec
from cluster.train.data import snapshot_dataset
from cluster.train.exchange import SyncFailed, SyncResult
from cluster.train.loop import LocalWorkerEnv, heldout_loss, load_model, run_worker
from cluster.train.progress import TrainState

pytestmark = pytest.mark.usefixtures("torch_settings_restored")  # threads, determinism

KEY = "ab" * 32


def worker_spec(tiny_lm_dir: Path, out: Path, **overrides: object) -> WorkerSpec:
    run = TrainRunConfig.model_validate(tiny_run("loop", tiny_lm_dir, out, **overrides))
    snapshot = asyncio.run(snapshot_dataset(run.dataset, run.data_file))
    return WorkerSpec(run=run, scaling=ScalingSpec(threads_per_worker=1), node_public_key=KEY,
                      node_index=0, node_count=1, data_file=snapshot.path)


@pytest.fixture(scope="module")
def uninterrupted(tiny_lm_dir: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> tuple[WorkerSpec, LocalWorkerEnv, object]:
    spec = worker_spec(tiny_lm_dir, tmp_path_factory.mktemp("straight"))
    env = LocalWorkerEnv(KEY, spec.run.output_path / "ckpt")
    return spec, env, run_worker(spec, env)


def test_the_held_out_loss_goes_down_and_the_model_directory_loads(
    uninterrupted: tuple[WorkerSpec, LocalWorkerEnv, object],
) -> None:
    spec, env, outcome = uninterrupted
    assert outcome.state == TrainState.COMPLETED and outcome.outer_step == 3
    losses = [p["loss"] for p in env.updates[-1]["eval_losses"]]
    assert len(losses) == 4 and all(b < a for a, b in zip(losses, losses[1:], strict=False))
    assert env.outcome == (TrainState.COMPLETED, str(spec.run.model_dir), None)
    record = json.loads((spec.run.model_dir / "training.json").read_text())
    assert record["params_sha256"] == outcome.params_sha256 and record["outer_step"] == 3
    # the exported directory is a plain Hugging Face model with its tokenizer
    model, tokenizer = load_model(str(spec.run.model_dir), "cpu")
    from cluster.train.data import PackedCorpus, read_snapshot

    corpus = PackedCorpus.pack(read_snapshot(spec.data_file), tokenizer, 64, 4)
    assert heldout_loss(model, corpus.heldout, 4, "cpu") == pytest.approx(losses[-1], rel=1e-5)


def test_a_run_stopped_after_one_outer_step_resumes_to_the_same_bits(
    tiny_lm_dir: Path, tmp_path: Path, uninterrupted: tuple[WorkerSpec, LocalWorkerEnv, object],
) -> None:
    _, _, straight = uninterrupted
    spec = worker_spec(tiny_lm_dir, tmp_path)
    first = LocalWorkerEnv(KEY, tmp_path / "ckpt", stop_after_outer_steps=1)
    stopped = run_worker(spec, first)
    assert stopped.state == TrainState.STOPPED and stopped.outer_step == 1
    assert sorted(p.name for p in (tmp_path / "ckpt" / "outer-000001").iterdir()) == [
        "checkpoint.json", "inner_optimizer.rank0.safetensors", "model.safetensors",
        "outer_optimizer.safetensors", "state.rank0.json"]
    resumed = run_worker(spec, LocalWorkerEnv(KEY, tmp_path / "ckpt"))
    assert resumed.state == TrainState.COMPLETED
    assert resumed.params_sha256 == straight.params_sha256  # type: ignore[attr-defined]


class FailingSync(LocalWorkerEnv):
    def exchange(self, outer_step: int, payload: bytes) -> SyncResult:
        raise SyncFailed("outer step 0: 1 of 2 nodes took part, the run needs 2 (min_nodes)")


def test_a_failed_sync_ends_the_run_failed_with_the_reason(tiny_lm_dir: Path,
                                                           tmp_path: Path) -> None:
    spec = worker_spec(tiny_lm_dir, tmp_path, hyperparameters={
        "seq_len": 64, "micro_batch_size": 4, "inner_steps": 1, "outer_steps": 1})
    env = FailingSync(KEY, tmp_path / "ckpt")
    outcome = run_worker(spec, env)
    assert outcome.state == TrainState.FAILED and outcome.outer_step == 0
    assert env.outcome is not None and env.outcome[0] == TrainState.FAILED
    assert "the run needs 2 (min_nodes)" in (env.outcome[2] or "")
    assert not (tmp_path / "ckpt").exists()  # nothing was checkpointed


def test_the_same_seed_gives_the_same_first_batches_and_other_seeds_do_not(
    tiny_lm_dir: Path, tmp_path: Path,
) -> None:
    from cluster.train.data import DataCursor, PackedCorpus, ShardedBatches, read_snapshot

    spec = worker_spec(tiny_lm_dir, tmp_path)
    _, tokenizer = load_model(str(tiny_lm_dir), "cpu")
    corpus = PackedCorpus.pack(read_snapshot(spec.data_file), tokenizer, 64, 4)

    def first(seed: int, node: int = 0, nodes: int = 1) -> torch.Tensor:
        return ShardedBatches(corpus.train, seed, node, nodes, 0, 1, 4).next(DataCursor())[0]

    assert torch.equal(first(0), first(0)) and not torch.equal(first(0), first(1))
    assert not torch.equal(first(0, 0, 2), first(0, 1, 2))  # two nodes, two shards
