"""The honesty checks' rules on hand-made answers (no model, no Ray): the identity rule,
synthetic ties, substitution thresholds, probes, wire parsing, verdict records, traffic."""

from __future__ import annotations

import time

import pytest

from cluster.core.settings import HonestySettings
from cluster.honesty.probes import build_probes
from cluster.honesty.reference import ReferenceAnswer, TokenScore, align_token_ids
from cluster.honesty.substitution import (
    EchoScores,
    SubstitutionThresholds,
    judge_substitution,
    substitution_stats,
)
from cluster.honesty.synthetic import judge_item, judge_synthetic
from cluster.honesty.traffic import (
    measuring_traffic,
    traffic_report,
    verification_due,
    verification_traffic,
)
from cluster.honesty.verdicts import Outcome, Traffic, Verdict
from cluster.reports.honesty import format_verdicts
from cluster.storage.mongo import MongoStores
from cluster.tasks.identity import (
    IdentitySignature,
    answer_sha256,
    judge_identities,
    signature_from_answers,
    trace_sha256,
)
from cluster.testing.zoo import NodeSpec
from cluster.wire import openai as wire

REF_TEXTS = ("alpha beta", "gamma delta", "epsilon")


def sig(node: str, texts: tuple[str, ...], logprobs: tuple[float, ...] = (-0.5,),
        operator: str | None = None, seniority: float = 0.0) -> IdentitySignature:
    return signature_from_answers(node, operator or node, seniority,
                                  [(t, list(logprobs)) for t in texts])


REFERENCE = tuple(answer_sha256(t) for t in REF_TEXTS)


# -- identity ---------------------------------------------------------------------------------


def test_a_proxy_of_an_honest_node_is_flagged_and_its_backend_is_not() -> None:
    honest = sig("honest", REF_TEXTS, (-0.25, -1.5), seniority=0)
    proxy = sig("proxy", REF_TEXTS, (-0.25, -1.5), seniority=1)  # bit-identical relay
    found = judge_identities([honest, proxy], REFERENCE, 0.9)
    assert found["honest"].outcome is Outcome.PASS
    assert found["proxy"].outcome is Outcome.FAIL
    assert found["proxy"].evidence["duplicate_of"] == "honest"
    assert found["proxy"].evidence["trace_share"] == 1.0


def test_independent_honest_nodes_answering_as_the_reference_are_not_duplicates() -> None:
    # Same greedy text (the model is deterministic), logprobs differing in the last bits.
    a = sig("a", REF_TEXTS, (-0.25, -1.5), seniority=0)
    b = sig("b", REF_TEXTS, (-0.2500001, -1.5), seniority=1)
    found = judge_identities([a, b], REFERENCE, 0.9)
    assert {f.outcome for f in found.values()} == {Outcome.PASS}
    assert found["b"].reason == "unique identity"


def test_nodes_sharing_a_non_reference_backend_coincide_on_text_alone() -> None:
    junk = ("one", "two", "three")
    a = sig("a", junk, (-1.0,), seniority=0)
    b = sig("b", junk, (-2.0,), seniority=1)  # other logprobs: text suffices off-reference
    found = judge_identities([a, b], REFERENCE, 0.9)
    assert found["a"].outcome is Outcome.PASS and found["b"].outcome is Outcome.FAIL


def test_duplicates_of_one_operator_are_grouped_but_not_flagged() -> None:
    a = sig("a", REF_TEXTS, operator="acme", seniority=0)
    b = sig("b", REF_TEXTS, operator="acme", seniority=1)
    c = sig("c", REF_TEXTS, operator="other", seniority=2)
    found = judge_identities([c, b, a], REFERENCE, 0.9)
    assert found["a"].outcome is Outcome.PASS  # registered first: holds the identity
    assert found["b"].outcome is Outcome.PASS and "same operator" in found["b"].reason
    assert found["c"].outcome is Outcome.FAIL
    assert found["c"].evidence["group"] == ["a", "b", "c"]


def test_partial_coincidence_below_the_threshold_is_not_a_group() -> None:
    a = sig("a", ("x", "y", "z"), seniority=0)
    b = sig("b", ("x", "y", "w"), seniority=1)
    assert judge_identities([a, b], REFERENCE, 0.9)["b"].outcome is Outcome.PASS
    assert judge_identities([a, b], REFERENCE, 0.6)["b"].outcome is Outcome.FAIL


def test_trace_hash_covers_the_reported_logprobs_exactly() -> None:
    assert trace_sha256("t", [-0.1, None]) == trace_sha256("t", [-0.1, None])
    assert trace_sha256("t", [-0.1]) != trace_sha256("t", [-0.1000000001])
    assert trace_sha256("t", None) != trace_sha256("t", [])


# -- synthetic jobs ----------------------------------------------------------------------------


def answer(ids: tuple[int, ...], text: str = "ref") -> ReferenceAnswer:
    return ReferenceAnswer("p", (1, 2), text, ids, tuple(TokenScore(-0.1, -0.1) for _ in ids))


def test_a_synthetic_answer_parting_at_a_near_tie_agrees_and_elsewhere_does_not() -> None:
    expected = answer((5, 6, 7, 8))
    tie = [TokenScore(-0.1, -0.1), TokenScore(-0.70, -0.68)]  # parts at index 1 by 0.02
    real = [TokenScore(-0.1, -0.1), TokenScore(-2.0, -0.3)]  # parts by 1.7 nats
    assert judge_item(expected, "ref", [5, 6, 7, 8], [], 0.05).exact
    assert judge_item(expected, "other", [5, 9, 1], tie, 0.05).agrees
    item = judge_item(expected, "other", [5, 9, 1], real, 0.05)
    assert not item.agrees and item.prefix_tokens == 1 and item.divergence_regret == \
        pytest.approx(1.7)
    # stopping early is not a tie
    assert not judge_item(expected, "short", [5, 6], [], 0.05).agrees


def test_synthetic_verdict_needs_the_share_of_agreeing_answers() -> None:
    good = judge_item(answer((1,)), "ref", [1], [], 0.05)
    bad = judge_item(answer((1,)), "x", [2], [TokenScore(-3.0, -0.1)], 0.05)
    assert judge_synthetic([good, good, good], 1.0)[0] is Outcome.PASS
    outcome, reason, evidence = judge_synthetic([good, good, bad], 0.75)
    assert outcome is Outcome.FAIL and evidence["agree"] == 2 and "2/3" in reason
    assert judge_synthetic([None, None], 0.5)[0] is Outcome.UNKNOWN


# -- substitution --------------------------------------------------------------------------------

LIMITS = SubstitutionThresholds(max_mean_abs_logprob_diff=0.015, max_mean_regret=0.02,
                                min_reference_agreement=0.9, min_node_agreement=0.9,
                                tie_margin=0.05)


def test_substitution_passes_engine_noise_and_fails_a_shifted_distribution() -> None:
    ref = [[TokenScore(-0.5, -0.5), TokenScore(-1.0, -1.0)]]
    same = substitution_stats(ref, ref, [EchoScores((-0.5001, -0.9999), (-0.5001, -0.9999))],
                              1, 0.05)
    assert judge_substitution(same, LIMITS)[0] is Outcome.PASS
    shifted = substitution_stats(ref, ref, [EchoScores((-0.55, -1.05), (-0.55, -1.05))], 1, 0.05)
    outcome, reason, evidence = judge_substitution(shifted, LIMITS)
    assert outcome is Outcome.FAIL and "mean |logprob" in reason
    assert evidence["mean_abs_logprob_diff"] == pytest.approx(0.05)
    off_greedy = substitution_stats([[TokenScore(-3.0, -0.2)] * 4], ref, None, 0, 0.05)
    outcome, reason, _ = judge_substitution(off_greedy, LIMITS)
    assert outcome is Outcome.FAIL and "regret" in reason and "greedy share" in reason
    assert judge_substitution(substitution_stats([None], ref, None, 0, 0.05),
                              LIMITS)[0] is Outcome.UNKNOWN


# -- probes, wire, tokens ----------------------------------------------------------------------


def test_probes_are_a_pure_function_of_the_seed_and_distinct() -> None:
    a = build_probes(3, identity=3, identity_words=10, synthetic=3, canary=5)
    assert a == build_probes(3, identity=3, identity_words=10, synthetic=3, canary=5)
    assert a != build_probes(4, identity=3, identity_words=10, synthetic=3, canary=5)
    prompts = [p for _, _, p in a.prompts()]
    assert len(prompts) == len(set(prompts)) == 11
    assert all(len(p.split()) == 10 for p in a.identity)
    assert sorted(a.request_order()) == sorted(a.prompts())
    # the sampled prompts (a request of their own) are new openings, not the round's others
    b = build_probes(3, identity=3, identity_words=10, synthetic=3, canary=5, sampled=3)
    assert b.prompts() == a.prompts() and len(set(b.sampled)) == 3
    assert not set(b.sampled) & set(prompts)


def test_completion_answers_are_parsed_strictly() -> None:
    body = {"choices": [
        {"index": 1, "text": " b", "finish_reason": "length", "logprobs": None},
        {"index": 0, "text": " a", "finish_reason": "stop", "logprobs": {
            "tokens": [" a"], "token_logprobs": [-0.5], "top_logprobs": [{" a": -0.5, "x": -0.4}],
            "text_offset": [0]}},
    ]}
    first, second = wire.parse_completion(body, 2)
    assert first.text == " a" and first.token_logprobs == (-0.5,) and first.top_logprobs == (-0.4,)
    assert second.tokens is None
    for bad in ({"choices": [{"index": 0}]}, {"nope": 1},
                {"choices": [{"index": 0, "text": "a", "logprobs": {"tokens": ["a"],
                                                                   "token_logprobs": []}}]},
                {"choices": [{"index": 0, "text": "a", "logprobs": {
                    "tokens": ["a"], "token_logprobs": ["high"]}}]}):
        with pytest.raises(wire.MalformedAnswer):
            wire.parse_completion(bad, 1)
    with pytest.raises(wire.MalformedAnswer):
        wire.parse_completion(body, 3)
    with pytest.raises(wire.MalformedAnswer):
        wire.signature_sha256({"sha256": "xyz"})


def test_generated_tokens_are_aligned_to_ids_when_they_spell_the_text() -> None:
    vocab = {" a": 1, "b": 2, " ab": 3}

    def encode(text: str) -> list[int]:
        return [vocab[text]] if text in vocab else [vocab[" a"], vocab["b"]]

    assert align_token_ids(" ab", [" a", "b"], encode) == ([1, 2], True)
    assert align_token_ids(" ab", None, encode) == ([3], False)
    assert align_token_ids(" ab", [" a", "c"], encode) == ([3], False)


# -- verdicts and traffic --------------------------------------------------------------------


def test_unknown_is_stored_as_unknown_and_the_table_says_unverified() -> None:
    verdicts = [
        Verdict("n1", "identity", Outcome.PASS, "unique identity", {"ok": True},
                Traffic(0.25, 10, 16)),
        Verdict("n1", "tokenizer_signature", Outcome.UNKNOWN, "unknown: no route"),
        Verdict("n2", "substitution", Outcome.FAIL, "mean |logprob - reference| 0.2 > 0.015"),
    ]
    record = verdicts[1].to_record("smollm2:7", 100.0)
    assert record.outcome is Outcome.UNKNOWN and not record.passed and not record.flagged
    assert "outcome" not in record.evidence
    assert record.verdict_id == "tokenizer_signature|n1|smollm2:7"
    assert verdicts[0].to_record("r", 1.0).evidence["ok"] == 1  # bools stored as ints
    table = format_verdicts(verdicts)
    assert "unverified" in table and "trusted" not in table
    assert "FLAGGED" in table and "0.015" in table


async def test_traffic_report_compares_verification_with_measuring(mongo: MongoStores) -> None:
    now = time.time()
    await mongo.prompts.collection.insert_many([
        {"_id": f"n1|gsm8k|{i}|0|0", "node_id": "n1", "created_at": now, "prompt_tokens": 800,
         "max_output_tokens": 256, "_relayed": 1, "_done": 1} for i in range(10)
    ] + [{"_id": "n1|gsm8k|99|0|0", "node_id": "n1", "created_at": now, "prompt_tokens": 800,
          "max_output_tokens": 256, "_relayed": 0, "_done": 0}])
    await mongo.relays.collection.insert_many(
        [{"_id": f"n1|gsm8k|{i}|0|0", "node_id": "n1",
          "response": {"usage": {"completion_tokens": 100}} if i else None} for i in range(10)])
    measured = await measuring_traffic(mongo, "n1", now - 60)
    assert measured == Traffic(10.0, 8000, 9 * 100 + 256)
    verdict = Verdict("n1", "synthetic", Outcome.PASS, "ok", {}, Traffic(0.5, 40, 48))
    await mongo.verdicts.record([verdict.to_record("m:1", now), verdict.to_record("m:2", now)])
    assert await verification_traffic(mongo, "n1", now - 60) == Traffic(1.0, 80, 96)
    (report,) = await traffic_report(mongo, ["n1"], now - 60)
    assert report.request_share == pytest.approx(0.1)
    assert report.token_share == pytest.approx(176 / 9156)


async def test_every_check_reads_back_the_one_verdict_shape_unknown_as_unknown(
    mongo: MongoStores,
) -> None:
    from cluster.core.verdicts import Check, VerdictRecord
    from cluster.honesty.verification import latest_verdicts

    unknown = Verdict("n1", "tokenizer_signature", Outcome.UNKNOWN, "unknown: no route",
                      {}, Traffic(1.0, 5, 0))
    passed = Verdict("n1", "identity", Outcome.PASS, "unique identity")
    audit = VerdictRecord(verdict_id="streaming_job|n1|j|1", node_id="n1",
                          check=Check.STREAMING_JOB, outcome=Outcome.FAIL, reason="1 refused",
                          ts=3.0)
    await mongo.verdicts.record([unknown.to_record("m:1", 1.0), passed.to_record("m:1", 1.0),
                                 Verdict("n1", "identity", Outcome.FAIL, "proxy").to_record(
                                     "m:0", 0.5), audit])
    # a document of another shape (an unknown stored as a pass) is not read, nor guessed at
    await mongo.database["verdicts"].insert_one(
        {"_id": "identity|n1|old", "node_id": "n1", "check": "identity", "verdict": "pass",
         "reason": "x", "evidence": {"outcome": "unknown"}, "ts": 9.0})
    latest = await mongo.verdicts.latest(["n1"])
    assert [(r.check, r.outcome) for r in latest] == [
        ("identity", "pass"), ("streaming_job", "fail"), ("tokenizer_signature", "unknown")]
    read = await latest_verdicts(mongo, ["n1"])
    # the round's checks first, then the others (here the receipt audit's summary)
    assert [(v.check, v.outcome) for v in read] == [
        ("tokenizer_signature", Outcome.UNKNOWN), ("identity", Outcome.PASS),
        ("streaming_job", Outcome.FAIL)]
    assert read[0].traffic == unknown.traffic and read[0].evidence == {"round": "m:1"}
    assert format_verdicts(read[:2]).splitlines()[2].split()[1] == "unverified"
    assert format_verdicts(read).splitlines()[2].split()[1] == "FLAGGED"


def test_rounds_are_due_within_the_traffic_budget() -> None:
    settings = HonestySettings(max_traffic_share=0.1)
    round_cost = Traffic(4, 300, 200)
    assert verification_due(settings, Traffic(), Traffic(), round_cost)  # first round
    assert not verification_due(settings, round_cost, Traffic(40, 5000, 0), round_cost)
    assert verification_due(settings, round_cost, Traffic(80, 10_000, 0), round_cost)


def test_zoo_node_specs_name_kind_and_proxy_target() -> None:
    import argparse

    from cluster.testing.zoo.__main__ import parse_node

    assert parse_node("honest", 0) == NodeSpec("honest", "honest", 0, None)
    assert parse_node("reference=honest", 0) == NodeSpec("reference", "honest", 0, None)
    assert parse_node("proxy@http://h:1/llm", 5) == NodeSpec("proxy", "proxy", 5, "http://h:1/llm")
    assert parse_node("px=proxy@honest", 0) == NodeSpec("px", "proxy", 0, "honest")
    for bad in ("nonsense", "proxy", "honest@x"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_node(bad, 0)


def test_the_demo_zoo_fronts_the_real_node_and_registers_honest_first() -> None:
    from cluster.local.zoo import demo_zoo, zoo_nodes

    assert demo_zoo("/m", honest_url="http://n:1/llm").nodes == [
        "perturbed", "quantized", "lazy", "random", "proxy@http://n:1/llm"]
    assert demo_zoo("/m").nodes[0] == "honest" and "proxy@honest" in demo_zoo("/m").nodes
    nodes = zoo_nodes({"proxy": "http://h:2", "honest": "http://h:1"}, tasks=[])
    assert [n.node_id for n in nodes] == ["zoo-honest", "zoo-proxy"]
    assert nodes[0].model == "smollm2" and nodes[1].tasks == []
