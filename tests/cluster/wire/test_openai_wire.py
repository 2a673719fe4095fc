"""The one spelling of the OpenAI wire: prompt lists and splitting a prompt-list answer."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cluster.wire import openai as wire


@pytest.mark.parametrize(("prompt", "items"), [
    ("one", ["one"]),
    ([1, 2], [[1, 2]]),
    (["a", "b"], ["a", "b"]),
    ([[1], [2, 3]], [[1], [2, 3]]),
])
def test_prompt_items_reads_the_four_forms(prompt: Any, items: list[Any]) -> None:
    assert wire.prompt_items(prompt) == items


@pytest.mark.parametrize(("prompt", "message"), [
    ([], "prompt must be a string"),
    ([1, -2], "non-negative integers"),
    ([1, True], "non-negative integers"),
    (["a", [1]], "each prompt must be"),
    ([[1], []], "each prompt must be"),
])
def test_prompt_items_refuses_anything_else(prompt: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        wire.prompt_items(prompt)


def test_only_unstreamed_single_choice_bodies_are_batchable() -> None:
    body = {"prompt": [[1, 2]], "max_tokens": 1}
    assert wire.batchable_prompts(body) == ([[1, 2]], {"max_tokens": 1})
    for extra in ({"stream": True}, {"n": 2}, {"best_of": 3}):
        assert wire.batchable_prompts({**body, **extra}) is None
    assert wire.batchable_prompts({"prompt": 7}) is None


def test_split_choices_regroups_by_index_and_keeps_the_usage_aside() -> None:
    answer = {"id": "x", "usage": {"total_tokens": 9}, "choices": [
        {"index": 2, "text": "c"}, {"index": 0, "text": "a"}, {"index": 1, "text": "b"}]}
    first, second = wire.split_choices(answer, [1, 2])
    assert first["choices"] == [{"index": 0, "text": "a"}]
    assert second["choices"] == [{"index": 0, "text": "b"}, {"index": 1, "text": "c"}]
    assert "usage" not in second and second["id"] == "x"
    assert second["coalesced"] == {"prompts": 3, "offset": 1, "usage": {"total_tokens": 9}}


@pytest.mark.parametrize(("choices", "message"), [
    ([{"index": 0}], "expected 2 choices, got 1"),
    ([{"index": 0}, {"text": "?"}], "a choice without an integer index"),
    ([{"index": 0}, {"index": 0}], "choice indexes are not 0..1"),
])
def test_split_choices_refuses_answers_that_do_not_map_onto_the_prompts(
    choices: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(wire.MalformedAnswer, match=message):
        wire.split_choices({"choices": choices}, [1, 1])


def test_a_fake_node_reads_chat_texts_and_greedy_keys_without_spelling_fields() -> None:
    parts = {"content": [{"type": "text", "text": "a"}, {"type": "image_url"}, {"text": "b"}]}
    assert wire.content_texts(parts) == ["a", "b"]
    assert wire.content_texts({"content": "plain"}) == ["plain"]
    assert wire.content_texts({"content": None}) == []
    greedy = {"prompt": "x", "temperature": 0, "seed": 1}
    assert wire.greedy_request_key(greedy) == wire.greedy_request_key({**greedy, "seed": 2})
    assert wire.greedy_request_key({"prompt": "x"}) is None  # sampled (OpenAI's default 1.0)
    assert wire.greedy_request_key({**greedy, "stream": True}) is None


def test_completion_chunks_stream_the_first_choice_then_its_finish() -> None:
    answer = wire.completion_response(
        "cmpl-1", 7, "m", [wire.completion_choice(0, "a b", "stop", None)], wire.usage(1, 2))
    chunks = list(wire.completion_chunks(answer, str.split))
    assert [c["choices"][0]["text"] for c in chunks] == ["a", "b", ""]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "stop"]
    assert {(c["id"], c["created"], c["model"]) for c in chunks} == {("cmpl-1", 7, "m")}


def test_earliest_stop_finds_the_first_whole_stop_string_before_the_end() -> None:
    assert wire.earliest_stop("one. Two: three", ["Two", "."]) == 3
    assert wire.earliest_stop("one. Two", ["Two"], end=6) == -1  # not whole before the end
    assert wire.earliest_stop("abc", ["", "z"]) == -1


def test_text_answer_frame_wraps_a_text_into_a_completion_answer() -> None:
    head, tail = wire.text_answer_frame()
    assert json.loads(head + b"xyz" + tail) == {"choices": [{"text": "xyz"}]}
    assert wire.text_answer_frame(compact=False)[0] == b'{"choices": [{"text": "'
