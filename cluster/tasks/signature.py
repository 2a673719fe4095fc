"""The identity signature as a loop task: what every LLM node is measured on first.

A signature task lives in ``datasets/<task>/<task>.yaml`` with ``kind: signature`` (lm-eval
skips it: it has no ``task:`` key) and rows ``{"prompt", "seed"}``: seeded random-word
prompts (:func:`identity_rows`, the same draw as the verification round's identity probes).
Each doc is one temperature-0 request asking for the node's own token logprobs. A sample's
metrics say whether the node answered (``answered``, ``answer_tokens``); its *evidence*
holds the sha256 of the answer text and of the answer with its logprobs (the identity
signature, :mod:`cluster.tasks.identity`), which :func:`loop_identity_findings` compares
across nodes claiming the same model.

Why a loop task: benchmark tasks depend on it (``manager.task_dependencies``), so a node is
fingerprinted before the bench spends benchmark traffic on it, the fingerprints are kept
fresh by the same TTL as every buffer, and failures get the loop's error codes, retries and
backoff. The verification round (``testbench verify``) still does the checks that need the
trusted reference (synthetic jobs, substitution) with fresh random probes: these prompts are
public, so a node could precompute them; what it cannot precompute is another node's
logprobs, which is what the grouping rule compares.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cluster.core.errors import TaskError
from cluster.core.schemas import Node, Prompt, Relay, prompt_id
from cluster.tasks.identity import (
    WORDS,
    IdentityClaim,
    IdentityFinding,
    answer_sha256,
    group_identities,
    trace_sha256,
)
from cluster.tasks.native import mean_stderr, native_task_config
from cluster.wire import openai as wire


class SignatureTaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    testbench_task: str
    kind: Literal["signature"]
    test_split: str = "test"
    max_tokens: int = Field(default=16, ge=1, le=256, description="answer length")


def signature_task_config(name: str, datasets_dir: Path) -> SignatureTaskConfig | None:
    """The task's config when ``datasets/<name>/<name>.yaml`` is a signature task, else None."""
    return native_task_config(name, datasets_dir, "signature", SignatureTaskConfig)


def identity_rows(n: int, seed: int = 0, words: int = 10) -> list[dict[str, Any]]:
    """The shipped dataset: ``n`` distinct prompts of ``words`` seeded random words."""
    rng = random.Random(f"signature-task|{seed}")
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(rows) < n:
        prompt = " ".join(rng.choice(WORDS) for _ in range(words))
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "seed": rng.randrange(2**31)})
    return rows


class SignatureTaskAdapter:
    """The signature task for one node (its API decides the request shape)."""

    output_type = "signature"
    repeats = 1
    metric_names = ["answered", "answer_tokens"]

    def __init__(self, config: SignatureTaskConfig, model: str, api: str) -> None:
        self.config = config
        self.model = model
        self.api = api
        self.name = config.testbench_task
        self.eval_split = config.test_split

    def request_body(self, doc: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        prompt, seed = doc.get("prompt"), doc.get("seed")
        if not isinstance(prompt, str) or not prompt or not isinstance(seed, int):
            raise TaskError(f"task {self.name}: a doc needs a non-empty 'prompt' and an int 'seed'")
        if self.api == "chat-completions":
            return wire.CHAT_PATH, wire.chat_body(self.model, prompt, self.config.max_tokens,
                                                  seed=seed)
        # a plain string prompt, as ordinary traffic looks
        return wire.COMPLETIONS_PATH, {
            "model": self.model, "prompt": prompt, "max_tokens": self.config.max_tokens,
            "temperature": 0.0, "seed": seed, "logprobs": 1,
        }

    def build_prompts(
        self, node: Node, doc_id: int, doc: dict[str, Any], sample_key: str, now: float
    ) -> list[Prompt]:
        path, body = self.request_body(doc)
        return [Prompt(
            prompt_id=prompt_id(sample_key, 0), sample_key=sample_key, node_id=node.node_id,
            task=self.name, doc_id=doc_id, request_index=0, n_requests=1, path=path,  # type: ignore[arg-type]
            body=copy.deepcopy(body), prompt_tokens=0, max_output_tokens=self.config.max_tokens,
            created_at=now,
        )]

    def _answer(self, doc_id: int, relays: list[Relay]) -> wire.CompletionChoice:
        if len(relays) != 1:
            raise TaskError(f"task {self.name} doc {doc_id}: expected 1 relay, got {len(relays)}")
        response = relays[0].response
        if self.api == "chat-completions":
            return wire.parse_chat(response)
        return wire.parse_completion(response, 1)[0]

    def score(self, doc_id: int, doc: dict[str, Any], relays: list[Relay]) -> dict[str, float]:
        """Raises :class:`NodeError` (via ``MalformedAnswer``) for an answer of the wrong shape."""
        answer = self._answer(doc_id, relays)
        return {
            "answered": float(bool(answer.text.strip())),
            "answer_tokens": float(len(answer.tokens) if answer.tokens is not None else 0),
        }

    def evidence(self, doc_id: int, doc: dict[str, Any], relays: list[Relay]) -> dict[str, str]:
        """The doc's identity hashes (text; text + the logprobs the node reported)."""
        answer = self._answer(doc_id, relays)
        return {
            "text_sha256": answer_sha256(answer.text),
            "trace_sha256": trace_sha256(answer.text, answer.token_logprobs),
            "logprobs": "yes" if answer.token_logprobs is not None else "no",
        }

    def aggregate(self, metric: str, values: list[float]) -> tuple[float, float | None]:
        return mean_stderr(metric, values)

    @property
    def higher_is_better(self) -> dict[str, bool]:
        return {m: True for m in self.metric_names}


def loop_identity_findings(
    samples: Iterable[Mapping[str, Any]],
    nodes: Sequence[Node],
    *,
    operators: Mapping[str, str] | None = None,
    seniority: Mapping[str, float] | None = None,
    threshold: float = 0.9,
    min_common_docs: int = 5,
) -> dict[str, IdentityFinding]:
    """The identity grouping rule over the loop's signature samples, per claimed model.

    Two nodes *coincide* when their answers **and reported logprobs** are equal on at least
    ``threshold`` of the docs both answered (at least ``min_common_docs`` of them; the
    shipped task has as many docs as its buffer target, so every node answers all of them,
    and a node cannot dodge the comparison by failing a few). Bit-identical traces mean one
    backend (a proxy or a copy), while independent honest deployments of one model differ in
    the last bits of their logprobs. Text alone would group every honest node of a model
    (greedy answers are the model's), so nodes that report no logprobs are left out.

    Coinciding pairs join groups by the one grouping rule,
    :func:`cluster.tasks.identity.group_identities` (the senior node holds the identity,
    members of other operators are flagged). Only nodes compared with at least one other
    node get a finding.
    """
    operators = operators or {}
    seniority = seniority or {}
    traces: dict[str, dict[int, str]] = {}
    for row in samples:
        ev = row.get("evidence") or {}
        if row.get("error_code", 0) != 0 or ev.get("logprobs") != "yes":
            continue
        traces.setdefault(row["node_id"], {})[int(row["doc_id"])] = ev["trace_sha256"]
    by_model: dict[str, list[Node]] = {}
    for node in nodes:
        if node.node_id in traces:
            by_model.setdefault(node.model, []).append(node)
    pairs: dict[tuple[str, str], tuple[float, int]] = {}  # (share, docs compared)

    def member_evidence(member: IdentityClaim) -> dict[str, Any]:
        return {"docs": len(traces[member.node_id])}

    def compare_with_holder(member: IdentityClaim, holder: IdentityClaim
                            ) -> tuple[str, dict[str, Any]]:
        # a member may join its holder's group through others, never compared with it
        share, n_common = pairs.get((member.node_id, holder.node_id), (None, 0))
        detail = (f"answers and logprobs bit-identical to {holder.node_id} (registered "
                  "earlier)" + (f" on {share:.0%} of {n_common} signature docs"
                                if share is not None else ", through its group"))
        return detail, {"trace_share": share, "docs_compared": n_common}

    findings: dict[str, IdentityFinding] = {}
    for members in by_model.values():
        members.sort(key=lambda n: (seniority.get(n.node_id, 0.0), n.node_id))
        coinciding: list[tuple[str, str]] = []
        compared: set[str] = set()
        for i, a in enumerate(members):
            ta = traces[a.node_id]
            for b in members[i + 1:]:
                tb = traces[b.node_id]
                common = ta.keys() & tb.keys()
                if len(common) < min_common_docs:
                    continue
                compared.update((a.node_id, b.node_id))
                share = sum(ta[d] == tb[d] for d in common) / len(common)
                pairs[(a.node_id, b.node_id)] = pairs[(b.node_id, a.node_id)] = (share, len(common))
                if share >= threshold:
                    coinciding.append((b.node_id, a.node_id))
        claims = [IdentityClaim(n.node_id, operators.get(n.node_id, n.node_id),
                                seniority.get(n.node_id, 0.0))
                  for n in members if n.node_id in compared]
        findings.update(group_identities(claims, coinciding, member_evidence,
                                         compare_with_holder))
    return findings


async def read_signature_findings(settings: Any, mongo: Any,
                                  nodes: Sequence[Node] | None = None
                                  ) -> dict[str, IdentityFinding]:
    """:func:`loop_identity_findings` over the signature samples of the buffer TTL window.

    ``settings`` is :class:`cluster.core.settings.Settings`; ``mongo`` is
    :class:`cluster.storage.mongo.MongoStores`; ``nodes`` the registry in registration order
    (read here when the caller has not already)."""
    tasks = [t for t in settings.tasks
             if signature_task_config(t, Path(settings.datasets_dir)) is not None]
    if not tasks:
        return {}
    if nodes is None:
        nodes = await mongo.nodes.list()
    since = time.time() - settings.manager.sample_ttl_s
    rows = await mongo.samples.evidence_since(tasks, since)
    return loop_identity_findings(
        rows, nodes, operators=settings.honesty.operators,
        seniority={n.node_id: float(i) for i, n in enumerate(nodes)},
        threshold=settings.honesty.identity_match_share)
