"""The cheater zoo: OpenAI-compatible nodes that lie about what they serve.

Kinds (all claim the honest model's name and, where they have them, its signatures):

| kind | what it really does |
|---|---|
| ``honest`` | the claimed model (SmolLM2 in transformers, float32) |
| ``perturbed`` | a different model: every weight tensor + seeded gaussian noise (3% of its RMS) |
| ``quantized`` | the claimed model re-quantized: decoder linears through per-channel int8 |
| ``bf16`` | the claimed model with bfloat16 weights (calibration only: see the README) |
| ``proxy`` | forwards everything to another node and passes its answers off as its own |
| ``lazy`` | no model: cached canned answers, made-up logprobs |
| ``random`` | no model: random words, made-up logprobs |
| ``launderer`` | generates with a cheaper model (half its layers dropped), reports logprobs teacher-forced by the claimed model |
| ``probe_aware`` | the claimed model on anything shaped like a verification round, the cheaper one otherwise |
| ``temperature_aware`` | the claimed model at temperature 0, the cheaper one above it |
| ``sometimes`` | the cheaper model on a share q of requests (``sometimes@0.05``; default 0.1) |

Run ``python -m cluster.testing.zoo --help``; in tests, :class:`ZooProcess` starts one
process serving several nodes and reads their URLs. :mod:`cluster.testing.zoo.matrix`
judges a verification round by the role (kind) each node is expected to play. The last
four kinds are :mod:`cluster.testing.zoo.cheaters`.
"""

from cluster.local.zoo import ZooProcess
from cluster.testing.zoo.server import MODEL_KINDS, ZOO_KINDS, NodeSpec, Zoo, ZooKind

__all__ = ["MODEL_KINDS", "ZOO_KINDS", "NodeSpec", "Zoo", "ZooKind", "ZooProcess"]
