"""What a training run is: the model, the data, DiLoCo's hyper-parameters, the peers, and
where the run writes. Pydantic, unknown keys refused; no torch, no Ray.

The same models are the body of ``POST /api/v1/train/start`` (``serve_apps/poc/protocol.py``
wraps them), the YAML of ``testbench train run`` and what every Ray Train worker receives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.auth.keys import PUBLIC_KEY_PATTERN

# A run id names a directory and a Ray Train run: no slashes, nothing a shell would expand.
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
SyncDtype = Literal["float32", "bfloat16", "float16"]
Backend = Literal["gloo", "nccl"]
Device = Literal["cpu", "cuda"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetSpec(StrictModel):
    """Where the training text comes from: files, or a task dataset in PostgreSQL.

    Each document's text is its ``text_fields`` joined by ``separator``; documents are
    tokenized, an end-of-sequence token after each, and packed into blocks of ``seq_len``
    tokens. The last ``heldout_blocks`` blocks are never trained on: the held-out loss.
    """

    files: list[str] = Field(default_factory=list, description="jsonl/json-lines or parquet files")
    task: str | None = Field(default=None, min_length=1,
                             description="a task dataset loaded in PostgreSQL (testbench datasets)")
    split: str = Field(default="train", min_length=1, description="the task's split")
    text_fields: list[str] = Field(default_factory=lambda: ["text"], min_length=1)
    separator: str = "\n"
    max_docs: int | None = Field(default=None, ge=1, description="use only the first N documents")
    heldout_blocks: int = Field(default=8, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if bool(self.files) == (self.task is not None):
            raise ValueError("give exactly one of dataset.files and dataset.task")
        bad = [f for f in self.files if not f.endswith((".jsonl", ".json", ".parquet"))]
        if bad:
            raise ValueError(f"dataset.files must be .jsonl/.json (JSON lines) or .parquet: {bad}")
        return self


class DilocoParams(StrictModel):
    """DiLoCo: H inner AdamW steps per worker, then an outer Nesterov SGD step on the
    averaged pseudo-gradients (defaults of the DiLoCo paper and OpenDiLoCo)."""

    seq_len: int = Field(default=128, ge=8, le=32768, description="tokens per block")
    micro_batch_size: int = Field(default=4, ge=1, description="blocks per inner step per worker")
    inner_steps: int = Field(default=8, ge=1, description="H: inner steps per outer step")
    outer_steps: int = Field(default=4, ge=1, description="outer steps of the run")
    inner_lr: float = Field(default=4e-4, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(default=0, ge=0, description="linear warm-up of the inner lr")
    grad_clip: float | None = Field(default=1.0, gt=0)
    outer_lr: float = Field(default=0.7, gt=0)
    outer_momentum: float = Field(default=0.9, ge=0, lt=1)
    seed: int = Field(default=0, ge=0, description="data order (and nothing else: no dropout)")
    sync_dtype: SyncDtype = Field(
        default="float16",
        description="dtype pseudo-gradients travel in between nodes (OpenDiLoCo: fp16); every "
        "node averages the same rounded tensors, its own included",
    )

    def inner_lr_at(self, step: int) -> float:
        """The inner learning rate of inner step ``step`` (0-based, counted over the run)."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.inner_lr * (step + 1) / self.warmup_steps
        return self.inner_lr


class PeerSpec(StrictModel):
    """Another MLNode of the run, registered by the Network Node: only messages signed by
    ``public_key`` are accepted from it; ours go to ``{url}/api/v1/train/sync``."""

    public_key: str = Field(pattern=PUBLIC_KEY_PATTERN, description="its ed25519 key, hex")
    url: str = Field(min_length=1, description="its base URL (routes under {url}/api/v1)")


class TrainRunConfig(StrictModel):
    """One training run on one MLNode (every node of the run gets the same one, each with
    the others as ``peers``)."""

    run_id: str = Field(pattern=RUN_ID_PATTERN, description="the training run; signed into "
                        "every peer message")
    model: str = Field(min_length=1, description="a Hugging Face model directory (causal LM)")
    dataset: DatasetSpec
    hyperparameters: DilocoParams = Field(default_factory=DilocoParams)
    peers: list[PeerSpec] = Field(default_factory=list)
    output_dir: str = Field(min_length=1, description="checkpoints, peer messages, the model")
    min_nodes: int | None = Field(
        default=None, ge=1,
        description="nodes (this one included) an outer step needs; None = all of them",
    )
    sync_timeout_s: float = Field(default=300.0, gt=0, description="wait this long for peers")

    @model_validator(mode="after")
    def _peers_fit(self) -> TrainRunConfig:
        keys = [p.public_key for p in self.peers]
        if len(set(keys)) != len(keys):
            raise ValueError("peers: a public key is listed twice")
        if self.min_nodes is not None and self.min_nodes > self.node_count:
            raise ValueError(f"min_nodes ({self.min_nodes}) is more than the run's "
                             f"{self.node_count} nodes")
        return self

    @property
    def node_count(self) -> int:
        return len(self.peers) + 1

    @property
    def required_nodes(self) -> int:
        return self.min_nodes if self.min_nodes is not None else self.node_count

    # The run's directory: the data snapshot, the peer messages, the checkpoints (Ray
    # Train's storage: {checkpoint_root}/{run_id}/outer-NNNNNN), the exported model.
    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)

    @property
    def data_file(self) -> Path:
        return self.output_path / "data" / "documents.jsonl"

    @property
    def exchange_dir(self) -> Path:
        return self.output_path / "exchange"

    @property
    def checkpoint_root(self) -> Path:
        return (self.output_path / "checkpoints").resolve()

    @property
    def model_dir(self) -> Path:
        return self.output_path / "model"


class ScalingSpec(StrictModel):
    """The node's own hardware for training (the node operator's choice, not the run's)."""

    workers: int = Field(default=1, ge=1, description="Ray Train workers, each a DiLoCo replica")
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)
    threads_per_worker: int | None = Field(
        default=None, ge=1, description="torch threads per worker; None = max(1, cpus_per_worker)")
    device: Device = "cpu"
    backend: Backend = Field(default="gloo", description="torch.distributed inside the node")
    max_failures: int = Field(default=3, ge=-1, description="worker-group restarts from the "
                              "last checkpoint (Ray Train FailureConfig); -1 = no limit")

    @model_validator(mode="after")
    def _device_fits(self) -> ScalingSpec:
        if self.device == "cuda" and self.gpus_per_worker <= 0:
            raise ValueError("device 'cuda' needs gpus_per_worker > 0")
        if self.backend == "nccl" and self.device != "cuda":
            raise ValueError("backend 'nccl' runs on GPUs: set device 'cuda' and gpus_per_worker")
        if self.device == "cpu" and self.gpus_per_worker > 0:
            raise ValueError("gpus_per_worker > 0 needs device 'cuda'")
        return self

    @property
    def threads(self) -> int:
        return self.threads_per_worker or max(1, int(self.cpus_per_worker))


class WorkerSpec(StrictModel):
    """What each Ray Train worker of a node runs: the run, the node's place in it."""

    run: TrainRunConfig
    scaling: ScalingSpec
    node_public_key: str = Field(pattern=PUBLIC_KEY_PATTERN)
    node_index: int = Field(ge=0, description="this node's shard of the data")
    node_count: int = Field(ge=1)
    data_file: str = Field(min_length=1, description="the run's documents as JSON lines")

    @model_validator(mode="after")
    def _index_in_range(self) -> WorkerSpec:
        if self.node_index >= self.node_count:
            raise ValueError("node_index must be below node_count")
        return self


def node_order(own_key: str, peers: list[PeerSpec]) -> list[str]:
    """Every node's public key in the order all nodes agree on (sorted): a node's index in
    it is its data shard, and pseudo-gradients are summed in this order."""
    return sorted({own_key, *(p.public_key for p in peers)})
