"""The real LLM node answers the OpenAI routes the bench and lm-eval use."""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest
from llm_node_under_test import LLMNode
from lm_eval.models.openai_completions import LocalCompletionsAPI
from openai import OpenAI
from transformers import AutoTokenizer, PreTrainedTokenizerBase

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def client(llm_node: LLMNode) -> OpenAI:
    return OpenAI(base_url=llm_node.openai_base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(llm_node: LLMNode) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(llm_node.model_dir)


def completions(node: LLMNode, body: dict[str, Any]) -> dict[str, Any]:
    """POST /v1/completions as lm-eval's local-completions does (a JSON body, no SDK)."""
    resp = httpx.post(f"{node.openai_base_url}/completions", json={"model": node.model_id, **body}, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_models_lists_the_served_name(client: OpenAI, llm_node: LLMNode) -> None:
    assert [m.id for m in client.models.list().data] == [llm_node.model_id]


def test_completion_through_the_openai_client(client: OpenAI, llm_node: LLMNode) -> None:
    out = client.completions.create(
        model=llm_node.model_id, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert "Paris" in out.choices[0].text
    assert out.usage is not None and out.usage.completion_tokens == 8


def test_chat_through_the_openai_client(client: OpenAI, llm_node: LLMNode) -> None:
    out = client.chat.completions.create(
        model=llm_node.model_id,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=16,
        temperature=0,
    )
    assert "Paris" in (out.choices[0].message.content or "")


def test_streaming_chat_joins_to_the_non_streamed_answer(client: OpenAI, llm_node: LLMNode) -> None:
    request: dict[str, Any] = {
        "model": llm_node.model_id,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 16,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**request).choices[0].message.content
    deltas = [
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(**request, stream=True)
        if chunk.choices
    ]
    assert len([d for d in deltas if d]) > 1, "the answer should arrive in several chunks"
    assert "".join(deltas) == whole


def test_greedy_completions_are_deterministic(client: OpenAI, llm_node: LLMNode) -> None:
    prompt = "Write one sentence about the sea:"
    texts = [
        client.completions.create(
            model=llm_node.model_id, prompt=prompt, max_tokens=24, temperature=0, seed=1234
        ).choices[0].text
        for _ in range(2)
    ]
    assert texts[0] and texts[0] == texts[1]


def test_echo_logprobs_on_token_ids_align_with_the_prompt(
    llm_node: LLMNode, tokenizer: PreTrainedTokenizerBase
) -> None:
    # lm-eval local-completions loglikelihood: context + continuation token ids, batched.
    prompts = [
        tokenizer.encode("Question: What is the capital of France?\nAnswer: Paris"),
        tokenizer.encode("The sky is blue"),
    ]
    body = completions(
        llm_node,
        {"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0, "seed": 1234},
    )
    choices = sorted(body["choices"], key=lambda c: c["index"])
    assert len(choices) == len(prompts)
    for ids, choice in zip(prompts, choices, strict=True):
        lp = choice["logprobs"]
        # One entry per prompt token plus the generated one; nothing precedes the first.
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert all(isinstance(x, float) and x <= 0 for x in lp["token_logprobs"][1:])
        assert "".join(lp["tokens"][: len(ids)]) == tokenizer.decode(ids)
        offsets = lp["text_offset"]
        assert len(offsets) == len(ids) + 1 and offsets[0] == 0 and offsets == sorted(offsets)
        assert choice["text"].startswith(tokenizer.decode(ids))
        # Each token's own logprob is in its top_logprobs (logprobs=1: itself + the top-1).
        for token, logprob, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True):
            assert top[token] == pytest.approx(logprob) and 1 <= len(top) <= 2


def test_lm_eval_parses_loglikelihood_and_greediness_from_the_node(
    llm_node: LLMNode, tokenizer: PreTrainedTokenizerBase
) -> None:
    context = tokenizer.encode("The capital of France is")
    generated = completions(
        llm_node,
        {"prompt": [context], "max_tokens": 3, "temperature": 0, "ignore_eos": True, "return_token_ids": True},
    )["choices"][0]["token_ids"]
    assert generated and len(generated) == 3
    unlikely = tokenizer.encode(" banana", add_special_tokens=False)
    # The model's own greedy continuation is greedy; " banana" is not.
    prompts = [context + generated, context + unlikely]
    body = completions(
        llm_node,
        {"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0, "seed": 1234},
    )
    parsed = LocalCompletionsAPI.parse_logprobs(body, ctxlens=[len(context)] * len(prompts))
    by_index = sorted(body["choices"], key=lambda c: c["index"])
    for (logprob, _), choice, continuation in zip(parsed, by_index, [generated, unlikely], strict=True):
        scored = choice["logprobs"]["token_logprobs"][len(context) : -1]
        assert len(scored) == len(continuation)
        assert logprob == pytest.approx(math.fsum(scored)) and logprob < 0
    assert [greedy for _, greedy in parsed] == [True, False]
    assert parsed[0][0] > parsed[1][0]


def test_echo_logprobs_match_the_transformers_reference(
    llm_node: LLMNode, tokenizer: PreTrainedTokenizerBase
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    ids = tokenizer.encode("The capital of France is Paris. The capital of Italy is Rome.")
    body = completions(llm_node, {"prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0})
    served = body["choices"][0]["logprobs"]["token_logprobs"][1 : len(ids)]

    model = AutoModelForCausalLM.from_pretrained(llm_node.model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    reference = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    assert served == pytest.approx(reference, abs=2e-3)
