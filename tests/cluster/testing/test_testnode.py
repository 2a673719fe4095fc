"""The test node, through real HTTP: wire shapes lm-eval parses, determinism, gsm8k
answers, stop sequences, streaming, and every injected fault."""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from lm_eval.models.openai_completions import LocalCompletionsAPI

from cluster.core.settings import PROJECT_ROOT
from cluster.testing.testnode import NodeBehaviour, TestNode
from cluster.testing.testnode.model import load_gsm8k_answers, wrong_answer

TOKENIZER = PROJECT_ROOT / ".cache" / "models" / "smollm2"
# the session fixture prepares the model (tokenizer included) or fails
needs_tokenizer = pytest.mark.usefixtures("smollm2_dir")
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")  # lm-eval gsm8k strict-match


def final_number(text: str) -> str:
    match = STRICT.search(text)
    assert match is not None, f"no '#### N' in {text!r}"
    return match.group(1)

GSM8K_STOP = ["Question:", "</s>", "<|im_end|>"]


def gsm8k_docs(n: int) -> list[dict[str, str]]:
    for folder in (PROJECT_ROOT / "datasets" / "gsm8k", Path("/work/shared/datasets/gsm8k")):
        path = folder / "test.jsonl"
        if path.is_file():
            with path.open() as fh:
                return [json.loads(line) for _, line in zip(range(n), fh, strict=False)]
    raise AssertionError("no gsm8k data in datasets/gsm8k")


def gsm8k_prompt(docs: list[dict[str, str]], target: dict[str, str]) -> str:
    shots = "".join(f"Question: {d['question']}\nAnswer: {d['answer']}\n\n" for d in docs)
    return shots + f"Question: {target['question']}\nAnswer:"


@pytest.fixture(scope="session")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture(scope="session")
async def node() -> AsyncIterator[TestNode]:
    n = TestNode(NodeBehaviour(), str(TOKENIZER) if TOKENIZER.is_dir() else None)
    await n.start()
    yield n
    await n.stop()


@pytest.fixture(scope="session")
async def wrong_node() -> AsyncIterator[TestNode]:
    n = TestNode(NodeBehaviour(mode="wrong"), str(TOKENIZER) if TOKENIZER.is_dir() else None)
    await n.start()
    yield n
    await n.stop()


@pytest.fixture
async def faulty() -> AsyncIterator[TestNode]:
    """A byte-tokenizer node whose behaviour each test sets."""
    n = TestNode(NodeBehaviour())
    await n.start()
    yield n
    await n.stop()


async def post(
    http: aiohttp.ClientSession, node: TestNode, path: str, body: dict[str, Any]
) -> dict[str, Any]:
    async with http.post(f"{node.base_url}{path}", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def complete(http: aiohttp.ClientSession, node: TestNode, **body: Any) -> dict[str, Any]:
    return await post(http, node, "/v1/completions", body)


# -- plain routes -----------------------------------------------------------------------


async def test_models_health_and_stats_routes(http: aiohttp.ClientSession, node: TestNode) -> None:
    async with http.get(f"{node.base_url}/v1/models") as resp:
        assert (await resp.json())["data"][0]["id"] == "smollm2"
    async with http.get(f"{node.base_url}/health") as resp:
        assert resp.status == 200
    async with http.get(f"{node.base_url}/stats") as resp:
        stats = await resp.json()
    assert {"requests", "in_flight", "max_in_flight", "by_outcome"} <= set(stats)


async def test_bad_requests_get_400(http: aiohttp.ClientSession, node: TestNode) -> None:
    bodies: list[Any] = [{"prompt": []}, {"prompt": [1, "a"]}, {"prompt": "x", "logprobs": 99}, [1]]
    for body in bodies:
        async with http.post(f"{node.base_url}/v1/completions", json=body) as resp:
            assert resp.status == 400
            assert "error" in await resp.json()


# -- loglikelihood ----------------------------------------------------------------------


@needs_tokenizer
async def test_echo_logprobs_have_the_shape_lm_eval_parses(
    http: aiohttp.ClientSession, node: TestNode
) -> None:
    ctx = node.app.serving.model.encode("The capital of France is")
    conts = [node.app.serving.model.encode(" Paris"), node.app.serving.model.encode(" a big city")]
    prompts = [ctx + c for c in conts]
    out = await complete(
        http, node, prompt=prompts, echo=True, logprobs=1, max_tokens=1, temperature=0, seed=1234
    )
    assert [c["index"] for c in out["choices"]] == [0, 1]
    for prompt, choice in zip(prompts, out["choices"], strict=True):
        lp = choice["logprobs"]
        n = len(prompt) + 1  # the prompt echoed, plus one generated token
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
        assert len(lp["text_offset"]) == n
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert all(x < 0 for x in lp["token_logprobs"][1:])
        assert all(len(top) == 1 for top in lp["top_logprobs"][1:])
        assert lp["text_offset"] == sorted(lp["text_offset"])
        assert choice["text"].startswith("The capital of France is")
    assert out["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)
    # lm-eval's own parser reads token_logprobs[ctxlen:-1] and the greedy flags
    parsed = LocalCompletionsAPI.parse_logprobs([out], ctxlens=[len(ctx), len(ctx)])
    assert len(parsed) == 2
    for (logprob, is_greedy), choice, cont in zip(parsed, out["choices"], conts, strict=True):
        expected = sum(choice["logprobs"]["token_logprobs"][len(ctx) : len(ctx) + len(cont)])
        assert logprob == pytest.approx(expected)
        assert isinstance(is_greedy, bool)


@needs_tokenizer
async def test_top_logprobs_are_consistent_and_greediness_is_mixed(
    http: aiohttp.ClientSession, node: TestNode
) -> None:
    text = " ".join(d["question"] for d in gsm8k_docs(3))
    out = await complete(http, node, prompt=text, echo=True, logprobs=5, max_tokens=1, temperature=0)
    lp = out["choices"][0]["logprobs"]
    greedy = 0
    positions = list(zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True))
    for token, logprob, top in positions:
        assert len(top) == 5
        assert sum(math.exp(v) for v in top.values()) <= 1.0 + 1e-9
        if token in top:
            assert top[token] == logprob
        if logprob == max(top.values()):
            greedy += 1
            assert max(top, key=top.__getitem__) == token
        else:
            assert max(top.values()) > logprob
    assert 0.15 * len(positions) < greedy < 0.7 * len(positions)
    assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())  # generated: greedy


@needs_tokenizer
async def test_identical_prompts_get_identical_answers(
    http: aiohttp.ClientSession, node: TestNode
) -> None:
    text = "Once upon a time there was a"
    ids = node.app.serving.model.encode(text)
    a = await complete(http, node, prompt=text, echo=True, logprobs=2, max_tokens=1, temperature=0)
    b = await complete(http, node, prompt=text, echo=True, logprobs=2, max_tokens=1, temperature=0)
    c = await complete(http, node, prompt=ids, echo=True, logprobs=2, max_tokens=1, temperature=0)
    assert a["choices"] == b["choices"] == c["choices"]


@needs_tokenizer
async def test_wrong_mode_gives_different_logprobs(
    http: aiohttp.ClientSession, node: TestNode, wrong_node: TestNode
) -> None:
    body = {"prompt": "Once upon a time there was a", "echo": True, "logprobs": 1, "max_tokens": 1}
    good = await complete(http, node, **body)
    bad = await complete(http, wrong_node, **body)
    good_lps = good["choices"][0]["logprobs"]["token_logprobs"][1:]
    bad_lps = bad["choices"][0]["logprobs"]["token_logprobs"][1:]
    # the same prompt tokens (the generated last token may differ), other logprobs
    assert good["choices"][0]["logprobs"]["tokens"][:-1] == bad["choices"][0]["logprobs"]["tokens"][:-1]
    assert all(g != b for g, b in zip(good_lps, bad_lps, strict=True))


# -- generation -------------------------------------------------------------------------


@needs_tokenizer
async def test_correct_mode_answers_gsm8k_with_the_dataset_answer(
    http: aiohttp.ClientSession, node: TestNode
) -> None:
    docs = gsm8k_docs(8)
    for target in docs[5:]:
        out = await complete(
            http, node, prompt=gsm8k_prompt(docs[:5], target), max_tokens=256, stop=GSM8K_STOP,
            temperature=0,
        )
        choice = out["choices"][0]
        assert choice["text"] == " " + target["answer"] + "\n\n"
        assert choice["finish_reason"] == "stop"
        assert final_number(choice["text"]) == final_number(target["answer"])
        assert 0 < out["usage"]["completion_tokens"] <= 256


@needs_tokenizer
async def test_wrong_mode_answers_gsm8k_with_a_wrong_number(
    http: aiohttp.ClientSession, wrong_node: TestNode
) -> None:
    docs = gsm8k_docs(6)
    target = docs[5]
    out = await complete(
        http, wrong_node, prompt=gsm8k_prompt(docs[:5], target), max_tokens=256, stop=GSM8K_STOP
    )
    text = out["choices"][0]["text"]
    right = int(final_number(target["answer"]).replace(",", ""))
    assert int(final_number(text).replace(",", "")) == right + 1
    assert text == " " + wrong_answer(target["answer"]) + "\n\n"


def test_gsm8k_answers_come_from_test_and_train() -> None:
    answers = load_gsm8k_answers()
    assert len(answers) > 8000  # 1319 test + 7473 train (a few questions repeat)


@needs_tokenizer
async def test_stop_and_max_tokens_cut_the_generation(
    http: aiohttp.ClientSession, node: TestNode
) -> None:
    docs = gsm8k_docs(1)
    prompt = f"Question: {docs[0]['question']}\nAnswer:"
    free = (await complete(http, node, prompt=prompt, max_tokens=400))["choices"][0]
    assert "\n\nQuestion:" in free["text"]  # without stop the model runs on
    short = await complete(http, node, prompt=prompt, max_tokens=5)
    assert short["choices"][0]["finish_reason"] == "length"
    assert short["usage"]["completion_tokens"] == 5
    assert free["text"].startswith(short["choices"][0]["text"])
    # the earliest of several stop sequences wins, and the stop text itself is dropped
    first_line = free["text"].split("\n")[0]
    cut = await complete(http, node, prompt=prompt, max_tokens=400, stop=["####", "\n"])
    assert cut["choices"][0]["text"] == first_line
    assert cut["choices"][0]["finish_reason"] == "stop"


@needs_tokenizer
async def test_other_prompts_get_deterministic_text_and_temperature_varies_it(
    http: aiohttp.ClientSession, node: TestNode, wrong_node: TestNode
) -> None:
    body = {"prompt": "Write about the sea.", "max_tokens": 64, "temperature": 0}
    a = (await complete(http, node, **body))["choices"][0]["text"]
    b = (await complete(http, node, **body))["choices"][0]["text"]
    assert a == b and a.strip()
    assert (await complete(http, wrong_node, **body))["choices"][0]["text"] != a
    hot = {**body, "temperature": 0.8}
    s1 = (await complete(http, node, **hot, seed=1))["choices"][0]["text"]
    s1_again = (await complete(http, node, **hot, seed=1))["choices"][0]["text"]
    s2 = (await complete(http, node, **hot, seed=2))["choices"][0]["text"]
    assert s1 == s1_again and s1 != s2


@needs_tokenizer
async def test_generation_logprobs_without_echo_cover_only_the_completion(
    http: aiohttp.ClientSession, node: TestNode
) -> None:
    out = await complete(http, node, prompt="Hello there", max_tokens=4, logprobs=1, temperature=0)
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == out["usage"]["completion_tokens"] == 4
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"][0] == len("Hello there")
    assert all(x == max(top.values()) for x, top in zip(lp["token_logprobs"], lp["top_logprobs"], strict=True))


@needs_tokenizer
async def test_chat_completions_plain_and_streamed_agree(
    http: aiohttp.ClientSession, node: TestNode
) -> None:
    doc = gsm8k_docs(1)[0]
    body = {
        "messages": [
            {"role": "system", "content": "Solve it."},
            {"role": "user", "content": f"Question: {doc['question']}\nAnswer:"},
        ],
        "max_tokens": 300,
        "stop": ["Question:"],
        "temperature": 0,
    }
    out = await post(http, node, "/v1/chat/completions", body)
    content = out["choices"][0]["message"]["content"]
    assert content == " " + doc["answer"] + "\n\n"
    assert out["usage"]["completion_tokens"] > 0
    async with http.post(f"{node.base_url}/v1/chat/completions", json={**body, "stream": True}) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = (await resp.read()).decode()
    events = [line[len("data: ") :] for line in raw.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == content


# -- faults -----------------------------------------------------------------------------


async def test_error_fault_is_http_500(http: aiohttp.ClientSession, faulty: TestNode) -> None:
    faulty.behaviour = NodeBehaviour(error_rate=1.0)
    async with http.post(f"{faulty.base_url}/v1/completions", json={"prompt": "x"}) as resp:
        assert resp.status == 500


async def test_retryable_faults_are_503_and_429(http: aiohttp.ClientSession, faulty: TestNode) -> None:
    faulty.behaviour = NodeBehaviour(unavailable_rate=1.0)
    async with http.post(f"{faulty.base_url}/v1/completions", json={"prompt": "x"}) as resp:
        assert resp.status == 503
    faulty.behaviour = NodeBehaviour(rate_limit_rate=1.0)
    async with http.post(f"{faulty.base_url}/v1/completions", json={"prompt": "x"}) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "0"


async def test_hang_fault_never_answers(http: aiohttp.ClientSession, faulty: TestNode) -> None:
    faulty.behaviour = NodeBehaviour(hang_rate=1.0)
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(
            f"{faulty.base_url}/v1/completions",
            json={"prompt": "x"},
            timeout=aiohttp.ClientTimeout(total=0.5),
        ):
            pass
    await asyncio.sleep(0.1)  # the server notices the client left and cancels the handler
    assert faulty.stats.in_flight == 0
    assert faulty.stats.by_outcome["hang_cancelled"] == 1


async def test_invalid_json_fault_is_200_with_garbage(
    http: aiohttp.ClientSession, faulty: TestNode
) -> None:
    faulty.behaviour = NodeBehaviour(invalid_json_rate=1.0)
    async with http.post(f"{faulty.base_url}/v1/completions", json={"prompt": "x"}) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        with pytest.raises(ValueError):
            json.loads(await resp.read())


async def test_wrong_content_type_fault_is_an_html_page(
    http: aiohttp.ClientSession, faulty: TestNode
) -> None:
    faulty.behaviour = NodeBehaviour(wrong_content_type_rate=1.0)
    async with http.post(f"{faulty.base_url}/v1/completions", json={"prompt": "x"}) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        with pytest.raises(ValueError):
            json.loads(await resp.read())


async def test_huge_body_fault_streams_far_past_any_cap(
    http: aiohttp.ClientSession, faulty: TestNode
) -> None:
    faulty.behaviour = NodeBehaviour(huge_body_rate=1.0)
    received = 0
    async with http.post(f"{faulty.base_url}/v1/completions", json={"prompt": "x"}) as resp:
        assert resp.status == 200
        assert resp.content_length is None  # chunked: only a streaming cap can stop it
        async for chunk in resp.content.iter_any():
            received += len(chunk)
            if received > 16 * 1024 * 1024:
                break
    assert received > 16 * 1024 * 1024


async def test_disconnect_fault_closes_without_a_response(
    http: aiohttp.ClientSession, faulty: TestNode
) -> None:
    faulty.behaviour = NodeBehaviour(disconnect_rate=1.0)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        async with http.post(f"{faulty.base_url}/v1/completions", json={"prompt": "x"}):
            pass


async def test_fault_rates_are_observed_and_replayable(
    http: aiohttp.ClientSession, faulty: TestNode
) -> None:
    behaviour = NodeBehaviour(error_rate=0.2, invalid_json_rate=0.1, seed=7)

    async def run() -> list[int]:
        faulty.behaviour = behaviour  # resets the per-body occurrence counts
        statuses = []
        for i in range(400):
            async with http.post(
                f"{faulty.base_url}/v1/completions", json={"prompt": f"p{i}", "max_tokens": 1}
            ) as resp:
                body = await resp.read()
                bad_json = resp.status == 200 and not body.startswith(b'{"id"')
                statuses.append(-1 if bad_json else resp.status)
        return statuses

    first = await run()
    assert 0.13 < first.count(500) / 400 < 0.27
    assert 0.05 < first.count(-1) / 400 < 0.15
    assert await run() == first  # same requests, same faults


async def test_a_resent_body_gets_a_fresh_fault_draw(
    http: aiohttp.ClientSession, faulty: TestNode
) -> None:
    faulty.behaviour = NodeBehaviour(unavailable_rate=0.5, seed=3)
    statuses = []
    for _ in range(40):
        async with http.post(f"{faulty.base_url}/v1/completions", json={"prompt": "same"}) as resp:
            statuses.append(resp.status)
    assert set(statuses) == {200, 503}


async def test_latency_and_max_in_flight_are_counted(
    http: aiohttp.ClientSession, faulty: TestNode
) -> None:
    faulty.behaviour = NodeBehaviour(latency_s=0.2)
    async with http.post(f"{faulty.base_url}/stats/reset"):
        pass

    async def one(i: int) -> None:
        async with http.post(f"{faulty.base_url}/v1/completions", json={"prompt": f"{i}"}) as r:
            assert r.status == 200

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.gather(*(one(i) for i in range(5)))
    assert loop.time() - t0 >= 0.2
    async with http.get(f"{faulty.base_url}/stats") as resp:
        stats = await resp.json()
    assert stats["requests"] == 5 and stats["max_in_flight"] == 5
    assert stats["by_outcome"] == {"ok": 5}


def test_behaviour_rejects_bad_rates() -> None:
    with pytest.raises(ValueError):
        NodeBehaviour(error_rate=1.5)
    with pytest.raises(ValueError):
        NodeBehaviour(error_rate=0.6, hang_rate=0.6)
    with pytest.raises(ValueError):
        NodeBehaviour(unknown_rate=0.1)  # type: ignore[call-arg]


# -- running it -------------------------------------------------------------------------


def test_runs_in_a_thread_for_sync_code() -> None:
    import urllib.request

    node = TestNode(NodeBehaviour())
    url = node.start_in_thread()
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
            assert json.load(resp) == {"status": "ok"}
    finally:
        node.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/health", timeout=2)


def test_runs_as_a_process() -> None:
    import urllib.request

    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.testing.testnode", "--port", "0", "--mode", "wrong"],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = line.strip().split("url=")[1]
        with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
            assert json.load(resp) == {"status": "ok"}
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
