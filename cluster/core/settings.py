"""Settings: pydantic v2 models loaded from YAML, with ``TESTBENCH_*`` environment overrides.

Override rules (applied after the YAML file):
- ``TESTBENCH_POSTGRES_URL`` / ``TESTBENCH_MONGO_URL`` pick external servers.
- ``TESTBENCH_<SECTION>__<FIELD>`` sets any nested field, e.g.
  ``TESTBENCH_MANAGER__TARGET_SAMPLES=20``. Values are parsed as YAML scalars/lists.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ENV_PREFIX = "TESTBENCH_"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class StoreSettings(StrictModel):
    data_dir: Path = Field(default=PROJECT_ROOT / "data", description="embedded servers' data")
    postgres_url: str | None = Field(default=None, description="external PostgreSQL; None = embedded pgserver")
    mongo_url: str | None = Field(default=None, description="external MongoDB; None = embedded nx-27017")
    mongo_database: str = "testbench"


class RaySettings(StrictModel):
    address: str | None = Field(default=None, description="None = RAY_ADDRESS or a local cluster")
    namespace: str = "testbench"
    # Serve's ingress needs logical CPUs above the 2 physical ones on small machines.
    num_cpus: int = 4
    # The Manager's children on the Manager's node (node affinity): node-local object
    # refs between sampler, requester and evaluator. Off = Ray's default placement.
    colocate_children: bool = True
    # The loop's actors (Manager and its children) under this Linux scheduling policy
    # (actors/cpu_policy.py). "idle" (SCHED_IDLE): their bookkeeping runs on cores nothing
    # else wants, so a model served on the same machine (a Ray Serve app, a node under
    # test) is never preempted by the validator measuring it, which would slow it and skew
    # its measured latency (bench/e2e_vs_lmeval.py: the SmolLM2 node answered the same
    # docs 7-11% slower beside the loop at "normal" than at "idle"). On a machine kept busy
    # by other work the loop then gets little CPU: set "batch" (its fair share, but no
    # preempting on wake-up) or "normal" (Ray's default) there.
    loop_cpu_policy: Literal["idle", "batch", "normal"] = "idle"
    # The Requester's process, which talks to the nodes, apart: its clock is the nodes'
    # measured latency, and a body it sends late waits a whole engine step at the node.
    # At "idle" on a busy machine it woke up to 100-200 ms after an answer came
    # (bench/e2e_vs_lmeval.py: p90 108 ms from an answer to the next send, lm-eval 5 ms).
    requester_cpu_policy: Literal["idle", "batch", "normal"] = "normal"


class SlaSettings(StrictModel):
    """Timeout = TTFT(prompt tokens) + per-output-token time + queue allowance."""

    ttft_points: list[tuple[int, float]] = Field(
        default_factory=lambda: [(0, 0.0), (8192, 2.0), (32768, 10.0)]
    )
    per_output_token_s: float = 0.336
    queue_s: float = 30.0
    max_timeout_s: float = 120.0


class EndpointAllowlist(StrictModel):
    """Endpoints the endpoint policy refuses by default that may be reached anyway.

    The policy (``cluster/nodes/policy.py``) refuses loopback, private, link-local,
    carrier-grade NAT, multicast, reserved and cloud-metadata addresses, literal or resolved.
    ``networks`` lets addresses inside them through; ``hosts`` lets names through whatever
    they resolve to (an address in ``hosts`` is a one-address network). Cloud metadata
    addresses pass only by a network entry of that very address (``/32``, ``/128``).
    """

    networks: list[str] = Field(
        default_factory=list, description="CIDR networks, e.g. 10.0.0.0/8 or ::1/128",
    )
    hosts: list[str] = Field(
        default_factory=list, description="host names (exact, any case) or single addresses",
    )

    @field_validator("networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        out = []
        for item in value:
            try:
                out.append(str(ipaddress.ip_network(item.strip(), strict=True)))
            except ValueError as exc:
                raise ValueError(f"endpoint allowlist network {item!r}: {exc}") from None
        return out

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        out = []
        for item in value:
            host = item.strip().lower().rstrip(".")
            if not re.fullmatch(r"[a-z0-9_.\-]{1,253}|[0-9a-f:.]{2,45}", host):
                raise ValueError(f"endpoint allowlist host {item!r}: a host name or an address, "
                                 "without scheme, port or path")
            out.append(host)
        return out

    @classmethod
    def loopback(cls) -> EndpointAllowlist:
        """This machine only: what local demos and tests allowlist, explicitly."""
        return cls(networks=["127.0.0.0/8", "::1/128"])


class RequesterSettings(StrictModel):
    global_concurrency: int = Field(default=64, ge=1)
    per_node_concurrency: int = Field(default=8, ge=1)
    max_retries: int = Field(default=3, ge=0)
    retry_backoff_s: float = Field(default=0.5, ge=0)
    response_size_cap_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    # Up to this many prompts of one node, waiting for that node's slots, go as one
    # /v1/completions body (a prompt list) and are split back into one relay each.
    # 1 = off (the default): every relay's latency is then its own request's, which is
    # what QoS figures mean. Above 1, a relay carries the latency of the body it rode in.
    coalesce_prompts: int = Field(default=1, ge=1, le=1024)
    sla: SlaSettings = Field(default_factory=SlaSettings)
    # Nodes are untrusted endpoints: refused addresses (cluster/nodes/policy.py) are never
    # connected to unless allowlisted here. Node registration applies the same allowlist.
    endpoint_allowlist: EndpointAllowlist = Field(default_factory=EndpointAllowlist)


class ManagerSettings(StrictModel):
    tick_s: float = Field(default=5.0, gt=0)
    target_samples: int = Field(default=50, ge=1, description="buffer size per (node, task)")
    sample_ttl_s: float = Field(default=5 * 24 * 3600.0, gt=0)
    max_in_flight: int = Field(
        default=24, ge=1,
        description="docs in flight per (node, task): beyond the node's own concurrency "
        "(requester.per_node_concurrency, 8) they wait in the Requester, not at the node, and "
        "keep it busy while finished docs are scored and new ones drawn",
    )
    failure_backoff_after: int = Field(default=3, ge=1, description="consecutive failed samples")
    backoff_base_s: float = Field(default=30.0, ge=0)
    backoff_max_s: float = Field(default=1800.0, ge=0)
    node_budget_per_hour: int = Field(default=100_000, ge=1, description="docs per node per hour")
    seed: int = 1234
    redrive_after_s: float = Field(
        default=120.0, ge=0, description="re-drive prompts pending longer than this"
    )
    task_dependencies: dict[str, list[str]] = Field(
        # a node is fingerprinted (identity signature) before benchmark traffic is spent on it
        default_factory=lambda: {"gsm8k": ["signature"], "openbookqa": ["signature"]},
        description="task -> tasks whose buffers must be full first",
    )
    node_refresh_s: float = Field(default=10.0, ge=0, description="re-read the node registry")
    dispatch_batch_docs: int = Field(
        default=256, ge=1,
        description="docs of many (node, task) pairs drawn, relayed and scored as one batch: "
        "each stage then makes one store round trip and one actor call per batch, not per pair",
    )
    refill_docs: int = Field(
        default=8, ge=1,
        description="a (node, task) whose node still has docs in flight is topped up only once "
        "this many can go at once (or all it still needs): a slow node gets its docs in "
        "batches of this size, not one by one, each batch costing the loop one draw, one "
        "relay stream and a few scoring calls. Capped at half of max_in_flight; keep "
        "max_in_flight - refill_docs at or above the node's concurrency, so its queue in the "
        "Requester never runs dry",
    )
    score_batch_wait_s: float = Field(
        default=0.2, ge=0,
        description="a batch's finished docs are scored as they come, gathered at most this long",
    )
    task_targets: dict[str, int] = Field(
        # the signature task's 16 docs, all of them: nodes are compared doc by doc
        default_factory=lambda: {"signature": 16},
        description="task -> buffer size where it differs from target_samples",
    )

    @model_validator(mode="after")
    def _check_targets(self) -> ManagerSettings:
        bad = {t: n for t, n in self.task_targets.items() if n < 1}
        if bad:
            raise ValueError(f"task_targets must be >= 1: {bad}")
        return self


class PoolSettings(StrictModel):
    """How many Sampler and Evaluator actors the Manager runs, one process each; 0 (the
    default) draws or scores in the Manager's own process.

    Every Ray worker process costs about 0.01 core even when idle (its core worker wakes
    every 10 ms to check for signals) and every hand-off between processes costs
    serialization and RPC threads. In the Manager's process, a node answering a few docs
    a second costs the loop 23% less CPU per doc and 0.02 fewer idle cores (a development
    run of ``bench/sim_nodes.py``'s loop on openbookqa, the test node answering in ~3 s),
    and the loop's actors took 24 against 36 CPU-s in ``bench/e2e_vs_lmeval.py``. Their
    own processes keep drawing, scoring and planning on separate cores: a 1,000-node fill
    on a 2-core machine ran at 142 against 120 relays/s. Set 1 or more where cores are many; more
    than one mostly adds Ray's own overhead and splits the per-doc caches (a doc's
    request bodies and Instances are built once per process) unless nodes share few
    docs."""

    samplers: int = Field(default=0, ge=0)
    evaluators: int = Field(default=0, ge=0)


PEER_KEY_ID_PATTERN = r"^[A-Za-z0-9._:@-]{1,128}$"
PeerPurpose = Literal["control", "jobs"]


class PeerKeySettings(StrictModel):
    """A registered peer: its ed25519 public key and the routes it may call."""

    public_key: str = Field(pattern=r"^[0-9a-f]{64}$", description="ed25519 public key, hex")
    purposes: list[PeerPurpose] = Field(
        default_factory=lambda: ["control", "jobs"], min_length=1,
        description="control = node control routes (PoC, inference up/down); jobs = job routes",
    )


class AuthSettings(StrictModel):
    """Peer authentication: requests signed by registered ed25519 keys.

    On when keys are configured, unless ``enabled: false`` (the explicit local-dev opt-out).
    ``signing_key_id`` / ``signing_key_file`` are this process's own key, for the requests
    it sends (e.g. ``testbench poc round``); the file holds the 32-byte seed as hex.
    """

    enabled: bool | None = Field(
        default=None, description="None = on when keys are configured; false = off (local dev)"
    )
    keys: dict[str, PeerKeySettings] = Field(default_factory=dict, description="key id -> key")
    max_skew_s: float = Field(default=30.0, gt=0, description="request timestamp tolerance")
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    nonce_mongo_url: str | None = Field(
        default=None,
        description="remember nonces in MongoDB (apps with several replicas); None = in process",
    )
    nonce_mongo_database: str = "testbench"
    signing_key_id: str | None = Field(default=None, pattern=PEER_KEY_ID_PATTERN)
    signing_key_file: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> AuthSettings:
        bad = [k for k in self.keys if not re.fullmatch(PEER_KEY_ID_PATTERN, k)]
        if bad:
            raise ValueError(f"auth.keys: invalid key ids {bad} (letters, digits, ._:@-)")
        if self.enabled and not self.keys:
            raise ValueError("auth.enabled is true but auth.keys is empty: every request "
                             "would be refused")
        if (self.signing_key_id is None) != (self.signing_key_file is None):
            raise ValueError("auth.signing_key_id and auth.signing_key_file go together")
        return self

    @property
    def active(self) -> bool:
        return bool(self.keys) if self.enabled is None else self.enabled


class ReceiptSettings(StrictModel):
    """Verifying the signed receipts of streaming jobs."""

    max_clock_skew_s: float = Field(
        default=5.0, ge=0, description="receipt times vs the validator's send/receive times"
    )
    rerun_fraction: float = Field(
        default=0.02, ge=0, le=1,
        description="share of temperature-0 answers re-run on the reference (1-2% is the usual rate)",
    )
    rerun_min: int = Field(default=1, ge=0, description="re-run at least this many per audit")
    max_evidence_chars: int = Field(default=2000, ge=100)
    audit_every_s: float = Field(
        default=600.0, ge=0,
        description="the loop audits each registered streaming job this often (its Manager's "
        "receipt step); 0 = never (`testbench receipts audit` only)",
    )
    audit_requests: int = Field(
        default=4, ge=1, le=64,
        description="requests the loop sends through a job's app per audit: temperature 0, "
        "every other one streamed, each answer's receipt verified",
    )
    audit_sampled_requests: int = Field(
        default=2, ge=0, le=64,
        description="seeded sampled requests per audit (temperature audit_temperature, a fresh "
        "seed each): their receipts commit to the token ids, which are replayed on the reference",
    )
    audit_temperature: float = Field(default=0.7, gt=0, le=2)
    audit_sampled_max_tokens: int = Field(default=160, ge=1, le=4096)
    replay_max_mismatch_share: float = Field(
        default=0.01, ge=0, le=1,
        description="a node fails the replay when more of its replayed tokens than this are not "
        "the reference's seeded pick (honest CPU float32: 0; int8: ~3%; half the layers: ~90%)",
    )
    replay_min_tokens: int = Field(
        default=32, ge=1, description="fewer replayed tokens in an audit: unknown, not a pass")


class TaskSourceSettings(BaseModel):
    """Where lm-eval tasks get their data and what a task may run.

    A task name resolves in ``datasets_dir`` first, then in lm-eval's built-in task YAMLs
    (``cluster/tasks/lmeval/loading.py``). A task whose data are not local files is read from
    ``offline_data_dir`` (a mounted volume holding ``<dataset_path>/<dataset_name>/`` in the
    hub's layout, or parquet/jsonl/json/csv files per split; see
    ``cluster/tasks/lmeval/sources.py``), else from the Hugging Face hub only where
    ``allow_online`` is on. ``allow_code_execution`` lets tenants' tasks run ``!function``
    code and any task run code (``unsafe_code``, ``trust_remote_code``); off by default.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    offline_data_dir: Path | None = Field(
        default=None, description="datasets in the hub's layout, and tenants' task folders",
    )
    allow_online: bool = Field(
        default=False, description="read a task's dataset from the Hugging Face hub when the "
        "offline data directory does not hold it",
    )
    allow_code_execution: bool = Field(
        default=False, description="tasks may run code: tenants' `!function`s, `unsafe_code` "
        "tasks, datasets with `trust_remote_code`",
    )


class EvaluationSettings(StrictModel):
    """Evaluation as a service: who may submit runs and how runs execute.

    ``tenants`` maps a tenant name to its bearer token; a tenant sees only its own runs.
    Runs execute inside the evaluations Serve app's replicas, each holding a lease on the
    runs it executes (renewed every ``poll_s``), so a replica that dies loses them after
    ``lease_s`` and another (or its restarted self) resumes them.
    """

    tenants: dict[str, str] = Field(
        default_factory=dict, description="tenant name -> bearer token (keep it in a Secret)"
    )
    endpoint_allowlists: dict[str, EndpointAllowlist] = Field(
        default_factory=dict,
        description="tenant name -> endpoints refused by default (loopback, private, ...) it "
        "may evaluate anyway; '*' applies to every tenant (cluster/nodes/policy.py)",
    )
    max_concurrent_runs: int = Field(
        default=2, ge=0, description="runs one replica executes at once; 0 = API only"
    )
    per_run_concurrency: int = Field(default=8, ge=1, description="requests in flight per run")
    chunk_docs: int = Field(default=32, ge=1, description="docs built and sent per step")
    progress_every_s: float = Field(
        default=2.0, gt=0, le=5.0,
        description="a running run's progress (percent, count, ETA) is written this often "
        "while requests complete",
    )
    lease_s: float = Field(default=30.0, gt=0, description="a dead replica's runs resume after")
    poll_s: float = Field(default=1.0, gt=0, description="lease renewal and queue polling")
    max_tasks: int = Field(default=16, ge=1, description="tasks per run")
    max_limit: int = Field(default=100_000, ge=1, description="largest accepted `limit`")
    page_size: int = Field(default=20, ge=1)
    max_page_size: int = Field(default=100, ge=1)
    leaderboard_history_s: float = Field(
        default=7 * 24 * 3600.0, gt=0, description="how far back the score charts reach"
    )
    leaderboard_max_samples: int = Field(
        default=20_000, ge=1, description="samples read for the charts (newest first)"
    )
    max_custom_task_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, le=8 * 1024 * 1024,
        description="a run's uploaded task files, decoded, in all (they live in its MongoDB "
        "document as base64, which must stay under MongoDB's 16 MB)",
    )

    @model_validator(mode="after")
    def _check(self) -> EvaluationSettings:
        short = sorted(name for name, token in self.tenants.items() if len(token) < 16)
        if short:
            raise ValueError(f"evaluations.tenants: tokens of {short} are shorter than 16 chars")
        if len(set(self.tenants.values())) != len(self.tenants):
            raise ValueError("evaluations.tenants: two tenants share a token")
        unknown = sorted(set(self.endpoint_allowlists) - set(self.tenants) - {"*"})
        if unknown:
            raise ValueError(f"evaluations.endpoint_allowlists: {unknown} are no tenants")
        if self.page_size > self.max_page_size:
            raise ValueError("evaluations.page_size exceeds max_page_size")
        if self.poll_s * 2 >= self.lease_s:
            # A lease is renewed on a poll once half of it is gone: polls must come sooner.
            raise ValueError("evaluations.poll_s must be under half of lease_s")
        return self


class ReferenceSettings(StrictModel):
    """testbench's own trusted deployment of one claimed model."""

    url: str | None = Field(
        default=None, description="base URL of a Serve LLM app (serve_apps/llm) of the model",
    )
    served_model: str | None = Field(
        default=None, description="the model name on that app; None = the claimed name",
    )
    model_dir: Path | None = Field(
        default=None,
        description="local model directory: the tokenizer for `url`; without `url`, the "
        "model itself, run in process with transformers (float32, CPU: small models only)",
    )

    @model_validator(mode="after")
    def _check(self) -> ReferenceSettings:
        if self.model_dir is None:
            raise ValueError("a reference needs model_dir (the model, or the tokenizer of url)")
        return self


class HonestySettings(StrictModel):
    """Signatures, synthetic jobs and the model-substitution check.

    Thresholds were calibrated on a 2-core CPU box with SmolLM2-135M (README, Honesty).
    """

    references: dict[str, ReferenceSettings] = Field(
        default_factory=dict, description="claimed model name -> its trusted reference",
    )
    operators: dict[str, str] = Field(
        default_factory=dict, description="node id -> operator; a node missing here is its own",
    )
    seed: int | None = Field(default=None, description="None = a fresh random seed per round")
    max_tokens: int = Field(default=16, ge=1, le=256, description="answer length of every probe")
    identity_prompts: int = Field(default=3, ge=1)
    identity_words: int = Field(default=10, ge=1)
    synthetic_prompts: int = Field(default=3, ge=0)
    canary_prompts: int = Field(default=5, ge=1)
    identity_match_share: float = Field(
        default=0.9, gt=0, le=1, description="answers coincide from this share of prompts",
    )
    synthetic_tie_margin: float = Field(
        default=0.05, ge=0, description="nats: a parting token this close to the best is a tie",
    )
    synthetic_min_share: float = Field(default=0.75, ge=0, le=1)
    tie_margin: float = Field(default=0.05, ge=0, description="nats, substitution check")
    max_mean_abs_logprob_diff: float = Field(
        default=0.015, gt=0,
        description="nats; int8 re-quantization >= 0.028, bf16 <= 0.0065, honest vLLM vs "
        "transformers ~5e-6 (20 rounds, this machine); 0.002 also flags bf16",
    )
    max_mean_regret: float = Field(default=0.02, gt=0)
    min_reference_agreement: float = Field(default=0.9, ge=0, le=1)
    min_node_agreement: float = Field(default=0.9, ge=0, le=1)
    sampled_prompts: int = Field(
        default=3, ge=0, le=16,
        description="seeded sampled prompts per round, in one extra request, for nodes "
        "registered with seeded_sampling (0 = never); their token ids are replayed on the "
        "reference",
    )
    sampled_temperature: float = Field(default=0.7, gt=0, le=2)
    sampled_max_tokens: int = Field(default=16, ge=1, le=256)
    sampled_max_mismatch_share: float = Field(
        default=0.05, ge=0, le=1,
        description="the seeded-sampling check fails when more of the replayed tokens than "
        "this are not the reference's pick (honest float32 CPU: 0 of ~2,000; half the layers: "
        "~90%; int8 ~3% is left to the substitution check)",
    )
    sampled_min_tokens: int = Field(
        default=16, ge=1, description="fewer replayed tokens in a round: unknown, not a pass")
    batch_probes: bool = Field(
        default=True,
        description="all probes in one request (cheap) or one request each, shaped like "
        "measuring traffic (a node cannot tell probes by their batch shape)",
    )
    request_timeout_s: float = Field(default=300.0, gt=0)
    max_traffic_share: float = Field(
        default=0.10, gt=0, le=1,
        description="verification traffic per node as a share of its measuring traffic, in "
        "requests and in tokens; after a node's first round, the loop starts a round only "
        "while it keeps both within this share",
    )
    traffic_flush_s: float = Field(
        default=2.0, ge=0,
        description="the measuring-traffic counters (what verification is budgeted against) "
        "are written at most this often, all nodes in one bulk write, so they lag the "
        "recorded relays by about this much; 0 = with every relay batch (one upsert per "
        "node per batch: at a thousand nodes, as costly as the relays themselves)",
    )
    verify_every_s: float = Field(
        default=60.0, ge=0,
        description="the Manager's verification step looks for due nodes this often; 0 = "
        "never (rounds only by `testbench verify`). Off while no reference is configured",
    )
    min_round_gap_s: float = Field(
        default=3600.0, ge=0, description="a node's loop rounds at least this far apart",
    )
    max_nodes_per_round: int = Field(
        default=64, ge=1, description="nodes one loop step verifies (never-verified first)",
    )
    evasion_rounds: int = Field(
        default=3, ge=1,
        description="a node whose probes went unanswered in this many consecutive rounds "
        "while it answered its measuring traffic is flagged as evading",
    )
    evasion_min_relays: int = Field(
        default=10, ge=1, description="measuring relays needed over those rounds to judge it",
    )
    evasion_min_ok_share: float = Field(
        default=0.8, gt=0, le=1,
        description="share of those relays answered ok that makes unanswered probes evasion "
        "(below it the node is down, not evading)",
    )
    route_unverified: bool = Field(
        default=False,
        description="organic jobs by model may go to unverified nodes (a check unknown, none "
        "failed); off: only nodes every check passed, or none has run on yet",
    )
    # The trusted reference's per-doc results and the traffic check
    # (cluster/honesty/reference_docs.py, cluster/honesty/measuring.py)
    reference_docs_every_s: float = Field(
        default=30.0, ge=0,
        description="the Manager's step computing the reference's per-doc results of each "
        "(model with a reference, task) looks this often; 0 = never",
    )
    reference_docs_chunk: int = Field(
        default=64, ge=1, description="docs the reference computes per step, all pairs together",
    )
    traffic_check_every_s: float = Field(
        default=300.0, ge=0,
        description="the Manager's traffic check (measuring traffic vs the reference) runs this "
        "often over each node's samples of the buffer TTL window; 0 = never",
    )
    rescore_share: float = Field(
        default=0.1, ge=0, le=1,
        description="validator-side budget of the traffic check: tokens the reference "
        "re-scores (sampled loglikelihood relays, parting generations) per token the node "
        "processed for measuring traffic in the window",
    )
    traffic_outlier_logprob_diff: float = Field(
        default=0.1, gt=0,
        description="nats per token: a loglikelihood request (or re-scored relay) this far "
        "from the reference is an outlier; honest nodes sit ~1e-5 away, the cheaper model "
        "of the zoo above 1",
    )
    traffic_min_outliers: int = Field(
        default=1, ge=1, description="outlier requests that fail the traffic check",
    )
    traffic_max_parted_share: float = Field(
        default=0.1, ge=0, le=1,
        description="share of temperature-0 generations that may part from the reference's "
        "greedy answer at a token that is not a near tie (honest nodes: 0)",
    )
    traffic_min_comparisons: int = Field(
        default=4, ge=1,
        description="requests compared with the reference needed to judge a node's traffic",
    )


class Settings(StrictModel):
    stores: StoreSettings = Field(default_factory=StoreSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    manager: ManagerSettings = Field(default_factory=ManagerSettings)
    requester: RequesterSettings = Field(default_factory=RequesterSettings)
    pools: PoolSettings = Field(default_factory=PoolSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    receipts: ReceiptSettings = Field(default_factory=ReceiptSettings)
    evaluations: EvaluationSettings = Field(default_factory=EvaluationSettings)
    tasks_sources: TaskSourceSettings = Field(default_factory=TaskSourceSettings)
    honesty: HonestySettings = Field(default_factory=HonestySettings)
    datasets_dir: Path = PROJECT_ROOT / "datasets"
    cache_dir: Path = PROJECT_ROOT / ".cache"
    tasks: list[str] = Field(default_factory=lambda: ["signature", "gsm8k", "openbookqa"])
    # what diffusion nodes (kind: diffusion) are measured on
    diffusion_tasks: list[str] = Field(default_factory=lambda: ["diffusion_repro"])

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if not self.tasks:
            raise ValueError("tasks: at least one task must be configured")
        return self


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot override {'.'.join(path)}: {key} is not a section")
    node[path[-1]] = value


def apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    out = dict(data)
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key == "postgres_url":
            _set_path(out, ["stores", "postgres_url"], raw or None)
        elif key == "mongo_url":
            _set_path(out, ["stores", "mongo_url"], raw or None)
        elif key == "config":
            continue
        elif "__" in key:
            _set_path(out, key.split("__"), yaml.safe_load(raw) if raw else None)
    return out


def load_settings(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Load settings from ``path`` (or ``$TESTBENCH_CONFIG``), then apply env overrides."""
    env = os.environ if environ is None else environ
    path = path or env.get("TESTBENCH_CONFIG")
    data: dict[str, Any] = {}
    if path:
        text = Path(path).read_text()
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: settings must be a YAML mapping, got {type(loaded).__name__}")
        data = loaded
    return Settings.model_validate(apply_env_overrides(data, env))
