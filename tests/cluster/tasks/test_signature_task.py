"""The identity signature as a loop task: requests, scores, evidence, the grouping rule, and
the default dependency of benchmark tasks on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from actors.evaluator import Evaluator
from actors.planning import PairState, PlanLimits, plan_samples
from cluster.core.errors import ErrorCode
from cluster.core.schemas import Node, Relay
from cluster.core.settings import ManagerSettings, Settings
from cluster.honesty.verdicts import Outcome
from cluster.tasks.identity import trace_sha256
from cluster.tasks.registry import load_adapter, task_kind
from cluster.tasks.signature import (
    SignatureTaskAdapter,
    identity_rows,
    loop_identity_findings,
    signature_task_config,
)

DATASETS = Path(__file__).resolve().parents[3] / "datasets"
NODE = Node(node_id="n1", url="http://127.0.0.1:9", model="smollm2")
CHAT = Node(node_id="c1", url="http://127.0.0.1:9", model="smollm2", api="chat-completions")
DOC = {"prompt": "river stone cloud", "seed": 7}


def _relay(response: Any, node: Node = NODE, code: ErrorCode = ErrorCode.OK) -> Relay:
    key = f"{node.node_id}|signature|0|0"
    return Relay(prompt_id=f"{key}|0", sample_key=key, node_id=node.node_id, task="signature",
                 doc_id=0, request_index=0, error_code=code, response=response, latency_s=0.1,
                 started_at=1.0, finished_at=1.1)


def _completion(text: str, lps: list[float] | None) -> dict[str, Any]:
    logprobs = None if lps is None else {
        "tokens": [f"t{i}" for i in range(len(lps))], "token_logprobs": lps,
        "top_logprobs": [{f"t{i}": v} for i, v in enumerate(lps)], "text_offset": [0] * len(lps)}
    return {"choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": "length"}]}


def test_the_shipped_task_is_its_generator_output_and_fills_its_buffer_with_every_doc() -> None:
    config = signature_task_config("signature", DATASETS)
    assert config is not None and task_kind("signature", DATASETS) == "llm"
    rows = [json.loads(line) for line in (DATASETS / "signature" / "test.jsonl").open()]
    assert rows == identity_rows(len(rows))
    assert len({r["prompt"] for r in rows}) == len(rows)
    # every node answers every doc, so nodes can be compared doc by doc
    assert ManagerSettings().task_targets["signature"] == len(rows)


def test_requests_are_temperature_zero_with_logprobs_in_the_nodes_api() -> None:
    comp = load_adapter("signature", DATASETS, NODE)
    (p,) = comp.build_prompts(NODE, 3, DOC, "n1|signature|3|0", now=5.0)
    assert p.path == "/v1/completions" and p.n_requests == 1
    assert p.body == {"model": "smollm2", "prompt": DOC["prompt"], "max_tokens": 16,
                      "temperature": 0.0, "seed": 7, "logprobs": 1}
    chat = load_adapter("signature", DATASETS, CHAT)
    (c,) = chat.build_prompts(CHAT, 3, DOC, "c1|signature|3|0", now=5.0)
    assert c.path == "/v1/chat/completions"
    assert c.body["messages"] == [{"role": "user", "content": DOC["prompt"]}]
    assert c.body["logprobs"] is True and c.body["temperature"] == 0.0
    diffusion = Node(node_id="d", url="http://127.0.0.1:9", model="tiny", kind="diffusion")
    with pytest.raises(Exception, match="diffusion node"):
        load_adapter("signature", DATASETS, diffusion)


@pytest.mark.parametrize("doc", [{"prompt": "", "seed": 1}, {"prompt": "x"}, {"seed": 2}])
def test_a_bad_doc_is_a_task_error(doc: dict[str, Any]) -> None:
    adapter = load_adapter("signature", DATASETS, NODE)
    with pytest.raises(Exception, match="non-empty 'prompt' and an int 'seed'"):
        adapter.build_prompts(NODE, 0, doc, "k", now=0.0)


def test_evidence_hashes_the_answer_and_its_logprobs() -> None:
    adapter = load_adapter("signature", DATASETS, NODE)
    a = [_relay(_completion(" the sea", [-0.5, -1.25]))]
    b = [_relay(_completion(" the sea", [-0.5, -1.2500001]))]
    assert adapter.score(0, DOC, a) == {"answered": 1.0, "answer_tokens": 2.0}
    ea, eb = adapter.evidence(0, DOC, a), adapter.evidence(0, DOC, b)
    assert ea["text_sha256"] == eb["text_sha256"]
    assert ea["trace_sha256"] != eb["trace_sha256"], "the last bits of a logprob count"
    assert ea["trace_sha256"] == trace_sha256(" the sea", [-0.5, -1.25])
    assert ea["logprobs"] == "yes"
    blank = [_relay(_completion("   ", None))]
    assert adapter.score(0, DOC, blank)["answered"] == 0.0
    assert adapter.evidence(0, DOC, blank)["logprobs"] == "no"


def test_the_evaluator_records_evidence_and_blames_the_node_for_garbage() -> None:
    evaluator = Evaluator(Settings())
    adapter = load_adapter("signature", DATASETS, NODE)
    ok = evaluator.score_doc(adapter, 0, DOC, [_relay(_completion(" hi", [-0.1]))], now=2.0)
    assert ok.error_code == ErrorCode.OK and ok.evidence["logprobs"] == "yes"
    assert ok.metrics == {"answered": 1.0, "answer_tokens": 1.0}
    for garbage in ({"choices": "nope"}, {"choices": [{"index": 0}]}, {"error": "x"}):
        bad = evaluator.score_doc(adapter, 0, DOC, [_relay(garbage)], now=2.0)
        assert bad.error_code == ErrorCode.NODE and bad.error and not bad.evidence
    chat = load_adapter("signature", DATASETS, CHAT)
    answer = {"choices": [{"message": {"content": "hello"}, "finish_reason": "stop",
                           "logprobs": {"content": [{"token": "hello", "logprob": -0.3}]}}]}
    sample = evaluator.score_doc(chat, 0, DOC, [_relay(answer, CHAT)], now=2.0)
    assert sample.error_code == ErrorCode.OK
    assert sample.evidence["trace_sha256"] == trace_sha256("hello", [-0.3])


def _rows(node_id: str, traces: list[str | None], logprobs: str = "yes") -> list[dict[str, Any]]:
    return [{"node_id": node_id, "doc_id": d, "error_code": 0 if t else 1,
             "evidence": {"trace_sha256": t, "logprobs": logprobs} if t else {}}
            for d, t in enumerate(traces)]


def test_bit_identical_traces_group_nodes_and_flag_other_operators() -> None:
    n = 8
    honest = [f"h{d}" for d in range(n)]
    other_stack = [f"o{d}" for d in range(n)]  # same model elsewhere: other last bits
    nodes = [Node(node_id=i, url="http://127.0.0.1:9", model="smollm2")
             for i in ("honest", "proxy", "mirror", "elsewhere", "nologprobs")]
    nodes.append(Node(node_id="lonely", url="http://127.0.0.1:9", model="other"))
    rows = (_rows("honest", honest) + _rows("proxy", honest) + _rows("mirror", honest)
            + _rows("elsewhere", other_stack) + _rows("nologprobs", honest, "no")
            + _rows("lonely", honest))
    findings = loop_identity_findings(
        rows, nodes, operators={"honest": "op-a", "mirror": "op-a", "proxy": "op-b"},
        seniority={n.node_id: float(i) for i, n in enumerate(nodes)})
    assert findings["honest"].outcome == Outcome.PASS
    assert findings["proxy"].outcome == Outcome.FAIL
    assert findings["proxy"].evidence["duplicate_of"] == "honest"
    assert findings["mirror"].outcome == Outcome.PASS, "same operator: one identity"
    assert findings["elsewhere"].outcome == Outcome.PASS
    assert findings["proxy"].evidence["docs_compared"] == n
    assert "nologprobs" not in findings and "lonely" not in findings


def test_nodes_are_not_compared_on_too_few_common_docs() -> None:
    nodes = [Node(node_id=i, url="http://127.0.0.1:9", model="m") for i in ("a", "b")]
    rows = _rows("a", ["x", "y", "z"]) + _rows("b", ["x", "y", "z"])
    assert loop_identity_findings(rows, nodes, min_common_docs=5) == {}
    assert loop_identity_findings(rows, nodes, min_common_docs=3)["b"].outcome == Outcome.FAIL


def test_a_proxy_cannot_dodge_the_comparison_by_failing_some_docs() -> None:
    nodes = [Node(node_id=i, url="http://127.0.0.1:9", model="m") for i in ("a", "b", "c")]
    full = [f"x{d}" for d in range(16)]
    patchy: list[str | None] = [t if d % 3 else None for d, t in enumerate(full)]
    rows = _rows("a", full) + _rows("b", patchy) + _rows("c", [f"y{d}" for d in range(16)])
    findings = loop_identity_findings(rows, nodes)
    assert findings["b"].outcome == Outcome.FAIL and findings["b"].evidence["docs_compared"] == 10
    assert findings["a"].outcome == findings["c"].outcome == Outcome.PASS


def test_by_default_benchmark_tasks_wait_for_a_full_signature_buffer() -> None:
    cfg = ManagerSettings()
    limits = PlanLimits(cfg.target_samples, cfg.max_in_flight, cfg.sample_ttl_s,
                        cfg.node_budget_per_hour, cfg.task_dependencies, cfg.task_targets)
    tasks = Settings().tasks
    assert tasks[0] == "signature"
    plan = plan_samples([("n", tasks)], {}, {}, limits, now=100.0)
    assert {p.task for p in plan} == {"signature"}
    full = PairState()
    for d in range(cfg.task_targets["signature"]):
        full.valid.append((99.0, d))
    plan = plan_samples([("n", tasks)], {("n", "signature"): full}, {}, limits, now=100.0)
    assert {p.task for p in plan} == {"gsm8k", "openbookqa"}


def test_signature_adapter_refuses_a_relay_count_it_did_not_ask_for() -> None:
    config = signature_task_config("signature", DATASETS)
    assert config is not None
    adapter = SignatureTaskAdapter(config, "m", "completions")
    with pytest.raises(Exception, match="expected 1 relay"):
        adapter.score(0, DOC, [])
