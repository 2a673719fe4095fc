"""The lm-eval adapter against lm-eval itself, with no network and no Ray.

lm-eval 0.4.13's own ``simple_evaluate`` runs over ``local-completions`` /
``local-chat-completions`` with its HTTP call answered in-process by a deterministic fake
node (``requests.post`` replaced inside ``lm_eval.models.api_models``); the adapter builds
the same docs' bodies and scores the same fake answers. Bodies, per-doc metrics and
aggregates must be identical.
"""

from __future__ import annotations

import copy
import json
import math
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.core.errors import ErrorCode, EvaluationError, TaskError
from cluster.core.schemas import Node, Prompt, Relay, sample_key
from cluster.core.settings import PROJECT_ROOT
from cluster.tasks.lmeval import (
    FailedRelayError,
    TaskAdapter,
    load_task_adapter,
    request_build_stats,
    task_config,
    task_manager,
)

DATASETS = PROJECT_ROOT / "datasets"
MODEL = "smollm2-135m-instruct"
NODE = Node(node_id="node-a", url="http://127.0.0.1:9/", model=MODEL)

Responder = Callable[[dict[str, Any]], dict[str, Any]]


def _rows(task: str) -> list[dict[str, Any]]:
    with open(DATASETS / task / "test.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _crc(*parts: Any) -> int:
    return zlib.crc32(json.dumps(parts).encode())


def _canon(body: dict[str, Any]) -> str:
    return json.dumps(body, sort_keys=True)


# ---------------------------------------------------------------- fake node answers
def fake_logprobs_response(body: dict[str, Any]) -> dict[str, Any]:
    """An echo + logprobs answer, deterministic per token prefix, for a token-id prompt."""
    (tokens,) = body["prompt"]
    token_lps: list[float | None] = [None]
    top_lps: list[dict[str, float] | None] = [None]
    for i in range(1, len(tokens)):
        h = _crc(tokens[: i + 1])
        lp = -((h % 997) / 97.0) - 0.01
        other = -(((h >> 10) % 997) / 97.0) - 0.01
        token_lps.append(lp)
        top_lps.append({f"t{tokens[i]}": lp} if lp >= other else {"x": other, f"t{tokens[i]}": lp})
    token_lps.append(-0.5)
    top_lps.append({"g": -0.5})
    return {
        "object": "text_completion",
        "choices": [
            {
                "index": 0,
                "text": "x",
                "logprobs": {"token_logprobs": token_lps, "top_logprobs": top_lps, "tokens": []},
                "finish_reason": "length",
            }
        ],
    }


def _gsm8k_answers() -> dict[str, str]:
    return {row["question"]: row["answer"].split("#### ")[-1].strip() for row in _rows("gsm8k")}


def _generation(question: str, answers: dict[str, str]) -> str:
    gold = answers.get(question)
    if gold is None:
        return "I do not know."
    h = _crc(question) % 4
    if h == 0:
        return f" She has {gold} in total.\n#### {gold}"  # strict and flexible right
    if h == 1:
        return f" The result is {gold} apples."  # flexible right only
    if h == 2:
        return f" It is {int(gold.replace(',', '')) + 1}.\n#### {int(gold.replace(',', '')) + 1}"
    return " No idea"


def completions_responder(tokenizer: Any) -> Responder:
    answers = _gsm8k_answers()

    def respond(body: dict[str, Any]) -> dict[str, Any]:
        if body.get("echo"):
            return fake_logprobs_response(body)
        (tokens,) = body["prompt"]
        text = tokenizer.decode(tokens)
        question = text.rsplit("Question: ", 1)[-1].rsplit("\nAnswer:", 1)[0]
        return {"choices": [{"index": 0, "text": _generation(question, answers)}]}

    return respond


def chat_responder() -> Responder:
    answers = _gsm8k_answers()

    def respond(body: dict[str, Any]) -> dict[str, Any]:
        last = body["messages"][-1]["content"]
        question = last.rsplit("Question: ", 1)[-1].rsplit("\nAnswer:", 1)[0]
        content = _generation(question, answers)
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}

    return respond


class _FakeResponse:
    def __init__(self, payload: dict[str, Any]) -> None:
        self._payload = payload
        self.ok = True
        self.status_code = 200
        self.text = json.dumps(payload)

    def raise_for_status(self) -> None:
        return None

    def json(self) -> dict[str, Any]:
        return copy.deepcopy(self._payload)


class _FakeRequests:
    """Stands in for ``requests`` inside lm-eval's API models: records bodies, answers."""

    def __init__(self, responder: Responder) -> None:
        self.responder = responder
        self.bodies: list[dict[str, Any]] = []

    def post(self, url: str, json: dict[str, Any], **_: Any) -> _FakeResponse:  # noqa: A002
        self.bodies.append(copy.deepcopy(json))
        return _FakeResponse(self.responder(json))


def run_lm_eval(
    monkeypatch: pytest.MonkeyPatch,
    task: str,
    responder: Responder,
    *,
    limit: int,
    tokenizer: Path | None,
    chat: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """lm-eval's own run (num_concurrent=1, the synchronous path) on the fake node."""
    import lm_eval.models.api_models as api_models
    from lm_eval import simple_evaluate
    from lm_eval.models.openai_completions import LocalChatCompletion, LocalCompletionsAPI

    fake = _FakeRequests(responder)
    monkeypatch.setattr(api_models, "requests", fake)
    if chat:
        lm = LocalChatCompletion(base_url="http://fake/v1/chat/completions", model=MODEL)
    else:
        lm = LocalCompletionsAPI(
            base_url="http://fake/v1/completions",
            model=MODEL,
            tokenizer=str(tokenizer),
            tokenizer_backend="huggingface",
        )
    results = simple_evaluate(
        model=lm,
        tasks=[task_config(task, DATASETS)],
        task_manager=task_manager(DATASETS),
        limit=limit,
        log_samples=True,
        apply_chat_template=chat,
    )
    assert results is not None
    return results, fake.bodies


def lm_eval_doc_metrics(results: dict[str, Any], task: str) -> dict[int, dict[str, float]]:
    per_doc: dict[int, dict[str, float]] = {}
    for sample in results["samples"][task]:
        for metric in sample["metrics"]:
            per_doc.setdefault(sample["doc_id"], {})[f"{metric},{sample['filter']}"] = float(
                sample[metric]
            )
    return per_doc


def relays_for(prompts: list[Prompt], responder: Responder) -> list[Relay]:
    return [
        Relay(
            prompt_id=p.prompt_id,
            sample_key=p.sample_key,
            node_id=p.node_id,
            task=p.task,
            doc_id=p.doc_id,
            request_index=p.request_index,
            error_code=ErrorCode.OK,
            status=200,
            response=responder(copy.deepcopy(p.body)),
            started_at=0.0,
            finished_at=0.1,
        )
        for p in prompts
    ]


def adapter_run(
    adapter: TaskAdapter, responder: Responder, doc_ids: list[int]
) -> tuple[list[dict[str, Any]], dict[int, dict[str, float]]]:
    rows = _rows(adapter.name)
    bodies: list[dict[str, Any]] = []
    metrics: dict[int, dict[str, float]] = {}
    for doc_id in doc_ids:
        key = sample_key(NODE.node_id, adapter.name, doc_id, 0)
        prompts = adapter.build_prompts(NODE, doc_id, rows[doc_id], key, now=1.0)
        bodies += [p.body for p in prompts]
        metrics[doc_id] = adapter.score(doc_id, rows[doc_id], relays_for(prompts, responder))
    return bodies, metrics


def assert_same_aggregates(
    adapter: TaskAdapter, results: dict[str, Any], metrics: dict[int, dict[str, float]]
) -> None:
    res = results["results"][adapter.name]
    for key in adapter.metric_names:
        metric, flt = key.split(",", 1)
        value, stderr = adapter.aggregate(key, [metrics[d][key] for d in sorted(metrics)])
        assert value == res[key], key
        expected_stderr = res[f"{metric}_stderr,{flt}"]
        assert stderr == (None if expected_stderr == "N/A" else expected_stderr), key


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def gsm8k(smollm2_dir: Path) -> TaskAdapter:
    return load_task_adapter("gsm8k", DATASETS, str(smollm2_dir), "completions", MODEL)


@pytest.fixture(scope="module")
def openbookqa(smollm2_dir: Path) -> TaskAdapter:
    """One request per choice: lm-eval's own bodies at batch_size 1 (the loop's default
    batches a doc's choices; see the batched test below)."""
    from cluster.tasks.lmeval import RequestSettings

    return load_task_adapter("openbookqa", DATASETS, str(smollm2_dir), "completions", MODEL,
                             RequestSettings(batch_doc_requests=False))


@pytest.fixture
def no_http(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail loudly if anything in lm-eval tries a real HTTP request."""
    import lm_eval.models.api_models as api_models

    def refuse(body: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError("unexpected HTTP request")

    monkeypatch.setattr(api_models, "requests", _FakeRequests(refuse))
    yield


# ---------------------------------------------------------------- tests
def test_task_yamls_load_through_lm_eval_task_manager() -> None:
    manager = task_manager(DATASETS)
    assert {"gsm8k", "openbookqa"} <= set(manager.all_subtasks)
    cfg = task_config("gsm8k", DATASETS)
    for path in cfg["dataset_kwargs"]["data_files"].values():
        assert Path(path).is_absolute() and Path(path).is_file()


def test_adapter_describes_the_task(gsm8k: TaskAdapter, openbookqa: TaskAdapter) -> None:
    assert (gsm8k.name, gsm8k.output_type, gsm8k.eval_split) == ("gsm8k", "generate_until", "test")
    assert gsm8k.metric_names == ["exact_match,strict-match", "exact_match,flexible-extract"]
    assert gsm8k.num_fewshot == 5
    assert openbookqa.output_type == "multiple_choice"
    assert openbookqa.metric_names == ["acc,none", "acc_norm,none"]
    assert openbookqa.n_docs == 500 and gsm8k.n_docs == 1319


def test_prompts_are_a_pure_function_of_doc_id(gsm8k: TaskAdapter, no_http: None) -> None:
    rows = _rows("gsm8k")

    def body(doc_id: int) -> str:
        (prompt,) = gsm8k.build_prompts(NODE, doc_id, rows[doc_id], f"k{doc_id}", 0.0)
        return _canon(prompt.body)

    first = {d: body(d) for d in (700, 3, 64, 65, 0, 1318)}
    again = {d: body(d) for d in (1318, 0, 65, 64, 3, 700)}
    assert first == again
    # different docs draw different few-shot examples, as in a full lm-eval run
    assert len(set(first.values())) == len(first)


def test_a_docs_requests_are_built_once_per_process_and_counted(
    gsm8k: TaskAdapter, no_http: None
) -> None:
    """The loop's status reports what building requests cost (``requests_built``): a doc
    counts once however many nodes are measured on it; a cached doc costs nothing."""
    rows = _rows("gsm8k")
    other = NODE.model_copy(update={"node_id": "another-node"})
    before = request_build_stats()
    gsm8k.build_prompts(NODE, 1201, rows[1201], "k1201", 0.0)
    gsm8k.build_prompts(NODE, 1202, rows[1202], "k1202", 0.0)
    after_two = request_build_stats()
    assert after_two["docs"] - before["docs"] == 2
    # a few-shot context tokenized: real CPU time, on the thread that built it
    assert after_two["cpu_s"] > before["cpu_s"]
    gsm8k.build_prompts(other, 1201, rows[1201], "k1201-other", 0.0)
    gsm8k.build_prompts(NODE, 1202, rows[1202], "k1202-again", 0.0)
    assert request_build_stats() == after_two


def test_gsm8k_bodies_and_scores_match_lm_eval(
    gsm8k: TaskAdapter, smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    responder = completions_responder(gsm8k.lm.tokenizer)
    limit = 12
    results, lm_bodies = run_lm_eval(
        monkeypatch, "gsm8k", responder, limit=limit, tokenizer=smollm2_dir
    )
    # few-shot draws continue from doc `limit - 1`: build out of order on purpose
    ours, metrics = adapter_run(gsm8k, responder, list(reversed(range(limit))))
    assert Counter(map(_canon, ours)) == Counter(map(_canon, lm_bodies))
    assert metrics == lm_eval_doc_metrics(results, "gsm8k")
    assert_same_aggregates(gsm8k, results, metrics)
    body = ours[0]
    assert body["max_tokens"] == 256 and body["temperature"] == 0.0 and body["seed"] == 1234
    assert isinstance(body["prompt"][0][0], int)  # token ids, lm-eval's default
    assert body["stop"] == ["Question:", "</s>", "<|im_end|>"]


def test_openbookqa_bodies_and_scores_match_lm_eval(
    openbookqa: TaskAdapter, smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = 15
    results, lm_bodies = run_lm_eval(
        monkeypatch, "openbookqa", fake_logprobs_response, limit=limit, tokenizer=smollm2_dir
    )
    ours, metrics = adapter_run(openbookqa, fake_logprobs_response, list(range(limit)))
    assert Counter(map(_canon, ours)) == Counter(map(_canon, lm_bodies))
    assert metrics == lm_eval_doc_metrics(results, "openbookqa")
    assert_same_aggregates(openbookqa, results, metrics)


def test_loglikelihood_bodies_ask_for_echoed_token_logprobs(
    openbookqa: TaskAdapter, no_http: None
) -> None:
    row = _rows("openbookqa")[0]
    prompts = openbookqa.build_prompts(NODE, 0, row, "k0", 5.0)
    assert len(prompts) == 4  # one loglikelihood request per choice
    assert [p.request_index for p in prompts] == [0, 1, 2, 3]
    assert {p.n_requests for p in prompts} == {4}
    assert [p.prompt_id for p in prompts] == [f"k0|{i}" for i in range(4)]
    tok = openbookqa.lm.tokenizer
    for prompt, choice in zip(prompts, row["question"]["choices"], strict=True):
        body = prompt.body
        assert prompt.path == "/v1/completions"
        assert (body["echo"], body["logprobs"], body["max_tokens"], body["temperature"]) == (
            True, 1, 1, 0,
        )
        (tokens,) = body["prompt"]
        assert prompt.prompt_tokens == len(tokens) and prompt.max_output_tokens == 1
        assert tok.decode(tokens) == row["question"]["stem"] + " " + choice["text"]
        assert body["model"] == MODEL and prompt.created_at == 5.0


def test_scoring_a_hand_made_gsm8k_answer(gsm8k: TaskAdapter, no_http: None) -> None:
    row = _rows("gsm8k")[0]  # Janet's ducks: 18
    (prompt,) = gsm8k.build_prompts(NODE, 0, row, "k", 0.0)

    def score(text: str) -> dict[str, float]:
        return gsm8k.score(0, row, relays_for([prompt], lambda _: {"choices": [{"index": 0, "text": text}]}))

    assert score(" 16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\n#### 18") == {
        "exact_match,strict-match": 1.0,
        "exact_match,flexible-extract": 1.0,
    }
    assert score(" She makes $18 every day.") == {
        "exact_match,strict-match": 0.0,
        "exact_match,flexible-extract": 1.0,
    }
    assert score(" #### 17") == {
        "exact_match,strict-match": 0.0,
        "exact_match,flexible-extract": 0.0,
    }


def test_scoring_hand_made_loglikelihoods(openbookqa: TaskAdapter, no_http: None) -> None:
    row = _rows("openbookqa")[0]  # gold: B (index 1)
    prompts = openbookqa.build_prompts(NODE, 0, row, "k", 0.0)
    lls = {0: -9.0, 1: -1.0, 2: -3.0, 3: -2.0}

    def respond_with(p: Prompt) -> dict[str, Any]:
        (tokens,) = p.body["prompt"]
        n = len(tokens)
        # spread the choice's loglikelihood over its continuation tokens
        ctxlen = openbookqa._loglikelihood_input(openbookqa.build_instances(0, row)[p.request_index])[1]
        per = lls[p.request_index] / (n - ctxlen)
        token_lps = [None] + [-0.1] * (ctxlen - 1) + [per] * (n - ctxlen) + [-0.5]
        top = [None] + [{"a": v} for v in token_lps[1:]]
        return {"choices": [{"index": 0, "text": "x",
                             "logprobs": {"token_logprobs": token_lps, "top_logprobs": top}}]}

    relays = [r.model_copy(update={"response": respond_with(p)})
              for r, p in zip(relays_for(prompts, lambda _: {}), prompts, strict=True)]
    assert openbookqa.score(0, row, relays)["acc,none"] == 1.0


@pytest.mark.parametrize(
    "response",
    [
        {},
        {"choices": []},
        {"choices": [{"index": 0, "text": "x"}]},  # no logprobs
        {"choices": [{"index": 0, "logprobs": {"token_logprobs": [None, -1.0], "top_logprobs": [None, {}]}}]},
        "nan",
        "positive",
        "short",
    ],
)
def test_unusable_loglikelihood_responses_raise_evaluation_error(
    openbookqa: TaskAdapter, response: Any, no_http: None
) -> None:
    row = _rows("openbookqa")[0]
    prompts = openbookqa.build_prompts(NODE, 0, row, "k", 0.0)
    good = relays_for(prompts, fake_logprobs_response)
    if isinstance(response, str):
        bad = copy.deepcopy(good[2].response)
        assert bad is not None
        lps = bad["choices"][0]["logprobs"]["token_logprobs"]
        if response == "nan":
            lps[-2] = math.nan
        elif response == "positive":
            lps[-2] = 3.0
        else:
            del lps[-1]
        response = bad
    relays = good[:2] + [good[2].model_copy(update={"response": response})] + good[3:]
    with pytest.raises(EvaluationError):
        openbookqa.score(0, row, relays)


@pytest.mark.parametrize(
    "response",
    [
        {"choices": []},
        {"choices": [{"index": 0, "text": 42}]},
        {"choices": [{"index": 0}]},
        {"choices": [{"index": 0, "text": "a"}, {"index": 1, "text": "b"}]},
        {"error": {"message": "overloaded"}},
    ],
)
def test_unusable_generations_raise_evaluation_error(
    gsm8k: TaskAdapter, response: dict[str, Any], no_http: None
) -> None:
    row = _rows("gsm8k")[0]
    (prompt,) = gsm8k.build_prompts(NODE, 0, row, "k", 0.0)
    with pytest.raises(EvaluationError):
        gsm8k.score(0, row, relays_for([prompt], lambda _: response))


def test_a_failed_relay_fails_the_doc_with_its_own_code(gsm8k: TaskAdapter, no_http: None) -> None:
    row = _rows("gsm8k")[0]
    (prompt,) = gsm8k.build_prompts(NODE, 0, row, "k", 0.0)
    (relay,) = relays_for([prompt], lambda _: {})
    failed = relay.model_copy(update={"error_code": ErrorCode.NODE, "response": None, "status": 500})
    with pytest.raises(FailedRelayError) as info:
        gsm8k.score(0, row, [failed])
    assert info.value.code == ErrorCode.NODE
    with pytest.raises(TaskError):
        gsm8k.score(0, row, [])  # a missing relay is the bench's bug, not the node's


def test_chat_completions_match_lm_eval_chat_run(
    smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = load_task_adapter("gsm8k", DATASETS, str(smollm2_dir), "chat-completions", MODEL)
    responder = chat_responder()
    limit = 6
    results, lm_bodies = run_lm_eval(
        monkeypatch, "gsm8k", responder, limit=limit, tokenizer=None, chat=True
    )
    ours, metrics = adapter_run(adapter, responder, list(range(limit)))
    assert Counter(map(_canon, ours)) == Counter(map(_canon, lm_bodies))
    assert metrics == lm_eval_doc_metrics(results, "gsm8k")
    body = ours[0]
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["user", "assistant"] * 5 + ["user"]  # few-shot as multi-turn
    assert "prompt" not in body and body["max_tokens"] == 256


def test_loglikelihood_tasks_refuse_chat_completions(smollm2_dir: Path) -> None:
    with pytest.raises(TaskError, match="loglikelihood"):
        load_task_adapter("openbookqa", DATASETS, str(smollm2_dir), "chat-completions", MODEL)


def test_unknown_task_is_a_task_error() -> None:
    with pytest.raises(TaskError, match="unknown task"):
        load_task_adapter("no_such_task", DATASETS, None, "completions", MODEL)


def test_aggregate_is_lm_eval_mean_with_analytic_stderr(gsm8k: TaskAdapter) -> None:
    from lm_eval.api.metrics import mean_stderr

    values = [1.0, 0.0, 1.0, 1.0]
    assert gsm8k.aggregate("exact_match,strict-match", values) == (0.75, mean_stderr(values))
    assert gsm8k.aggregate("exact_match,strict-match", [1.0]) == (1.0, None)


# ---------------------------------------------------------------- batched doc requests
def batched_logprobs_response(body: dict[str, Any]) -> dict[str, Any]:
    """A batched answer: one choice per prompt, in scrambled order (clients sort by index)."""
    choices = []
    for index, tokens in enumerate(body["prompt"]):
        single = fake_logprobs_response({**body, "prompt": [tokens]})["choices"][0]
        choices.append({**single, "index": index})
    return {"object": "text_completion", "choices": list(reversed(choices))}


def test_batched_doc_requests_score_exactly_like_one_request_per_choice(
    openbookqa: TaskAdapter, smollm2_dir: Path
) -> None:
    from cluster.tasks.lmeval import RequestSettings

    batched = load_task_adapter("openbookqa", DATASETS, str(smollm2_dir), "completions", MODEL,
                                RequestSettings(batch_doc_requests=True))
    # batched is the default
    assert load_task_adapter("openbookqa", DATASETS, str(smollm2_dir), "completions",
                             MODEL) is batched
    rows = _rows("openbookqa")
    for doc_id in range(20):
        key = sample_key(NODE.node_id, "openbookqa", doc_id, 0)
        singles = openbookqa.build_prompts(NODE, doc_id, rows[doc_id], key, now=1.0)
        (one,) = batched.build_prompts(NODE, doc_id, rows[doc_id], key, now=1.0)
        # the batch carries exactly the single requests' token prompts, in order
        assert one.body["prompt"] == [p.body["prompt"][0] for p in singles]
        assert one.n_requests == 1 and len(singles) == 4
        expected = openbookqa.score(doc_id, rows[doc_id], relays_for(singles, fake_logprobs_response))
        got = batched.score(doc_id, rows[doc_id], relays_for([one], batched_logprobs_response))
        assert got == expected
    # a batched answer missing a choice is an evaluation error, not a silent score
    (one,) = batched.build_prompts(NODE, 0, rows[0], "k|0", now=1.0)
    short = batched_logprobs_response(one.body)
    short["choices"] = short["choices"][:3]
    (relay,) = relays_for([one], lambda body: short)
    with pytest.raises(EvaluationError, match="expected 4 indexed choices"):
        batched.score(0, rows[0], [relay])


def test_a_doc_built_by_the_sampler_is_scored_elsewhere_without_building_it_again(
    smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Sampler hands what building a doc computed (Instances, token ids) to the
    Evaluator, another process with its own adapter: scoring there renders and tokenizes
    nothing, and scores exactly as building the doc afresh does."""
    import pickle
    from collections import OrderedDict

    sampler_side = load_task_adapter("openbookqa", DATASETS, str(smollm2_dir), "completions",
                                     MODEL)
    rows = _rows("openbookqa")

    def fresh_twin() -> TaskAdapter:  # the same adapter in a process that built nothing yet
        twin = copy.copy(sampler_side)
        twin._instances, twin._inputs, twin._bodies = OrderedDict(), OrderedDict(), OrderedDict()
        return twin

    for doc_id in (3, 4, 250):
        key = sample_key(NODE.node_id, "openbookqa", doc_id, 0)
        (prompt,) = sampler_side.build_prompts(NODE, doc_id, rows[doc_id], key, now=1.0)
        handed = sampler_side.doc_requests(doc_id, rows[doc_id])
        assert handed is not None and len(handed.instances) == 4 and len(handed.inputs) == 4
        relays = relays_for([prompt], batched_logprobs_response)
        expected = fresh_twin().score(doc_id, rows[doc_id], relays)  # builds the doc itself
        evaluator_side = fresh_twin()
        evaluator_side.adopt_doc_requests(pickle.loads(pickle.dumps(handed)))  # as Ray hands it

        def refuse(*_: Any) -> Any:
            raise AssertionError("the doc was built again")

        monkeypatch.setattr(evaluator_side, "_new_instances", refuse)
        monkeypatch.setattr(evaluator_side, "_encode_loglikelihood", refuse)
        assert evaluator_side.score(doc_id, rows[doc_id], relays) == expected
        # twice: scoring fills fresh copies, never the handed templates
        assert evaluator_side.score(doc_id, rows[doc_id], relays) == expected
    # a doc this adapter never built has nothing to hand on; a changed doc is another doc
    assert sampler_side.doc_requests(499, rows[499]) is None
    assert sampler_side.doc_requests(3, {**rows[3], "id": "changed"}) is None


def test_the_direct_fast_tokenizer_is_the_one_autotokenizer_builds(smollm2_dir: Path) -> None:
    """lm-eval's clients load a generic fast tokenizer without transformers' model registry
    (``_compat.direct_fast_tokenizers``): the same class and the same token ids as
    ``AutoTokenizer``, so every request body is unchanged."""
    import transformers

    from cluster.tasks.lmeval import _compat

    with _compat.direct_fast_tokenizers():
        direct = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir), use_fast=True)
    real = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir), use_fast=True)
    assert type(direct) is type(real)
    texts = ["Question: What is 2+2?\nAnswer:", " héllo\n\n  wörld <|im_start|> 123456",
             "a" * 500, ""]
    for text in texts:
        for special in (False, True):
            assert direct(text, add_special_tokens=special)["input_ids"] == real(
                text, add_special_tokens=special)["input_ids"]
    assert direct.eos_token == real.eos_token and direct.pad_token == real.pad_token
    assert "AutoTokenizer" not in transformers.__dict__ or (
        transformers.AutoTokenizer is not _compat._DirectFastTokenizer)


@pytest.mark.parametrize("task", ["openbookqa", "gsm8k"])
def test_a_doc_becomes_the_row_a_dataset_would_give_without_building_one(task: str) -> None:
    """The adapter's light path (``_as_row``: encode, cast to the Arrow schema, decode) gives
    exactly ``Dataset.from_list([doc], features)[0]``: columns, their order and nested types,
    from docs whose keys come back from PostgreSQL's JSONB in another order."""
    import datasets
    from cluster.tasks.lmeval.adapter import _as_row

    rows = datasets.load_dataset("json", data_files=str(DATASETS / task / "test.jsonl"),
                                 split="train")
    features = rows.features
    for raw in rows.select(range(40)):
        doc = json.loads(json.dumps(dict(sorted(raw.items(), reverse=True))))
        row = {k: doc.get(k) for k in features}
        want = dict(datasets.Dataset.from_list([row], features=features)[0])
        got = _as_row(row, features)
        assert got == want and list(got) == list(want)
        assert json.dumps(got) == json.dumps(want)  # lm-eval's doc_hash is over this JSON
