"""The prompts of one verification round, drawn from a seed.

Three sets, each a pure function of ``(settings, seed)`` so a round can be replayed:

- **identity**: prompts of seeded random words; their temperature-0 answers
  fingerprint the backend that produced them;
- **synthetic**: small task-like prompts (arithmetic, lists, facts, instructions) whose
  answers the reference computes and the node must reproduce;
- **canary**: natural-text openings on which the node's token distribution is compared with
  the reference's;
- **sampled**: more natural-text openings, for the seeded sampled request of nodes that
  sample replayably (sent apart: their temperature differs).

All three look like ordinary traffic and are sent together, shuffled, in one request per
node (:func:`ProbeSet.request_order`), so a node cannot answer one kind honestly and
another lazily.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from cluster.tasks.identity import WORDS

ProbeKind = Literal["identity", "synthetic", "canary"]

_NOUNS = ("robot", "lighthouse", "library", "volcano", "garden", "bakery", "violin", "comet",
          "harbor", "desert", "museum", "glacier", "market", "forest", "engine", "island")
_ADJECTIVES = ("old", "quiet", "bright", "strange", "tiny", "ancient", "busy", "lonely", "golden",
               "frozen", "hidden", "famous")
_TOPICS = ("bread", "tea", "bridges", "bees", "maps", "clocks", "rivers", "paper", "glass",
           "salt", "trains", "coffee", "music", "chess", "stars", "rain")
_CATEGORIES = ("fruits", "colors", "animals", "countries", "vegetables", "musical instruments",
               "planets", "sports")

_CANARY_TEMPLATES = (
    "The history of {topic} begins",
    "Once upon a time, a {adj} {noun}",
    "Here is a short description of a {adj} {noun}:",
    "The most important thing to know about {topic} is",
    "In the {adj} {noun}, there was",
    "Scientists who study {topic} have found that",
    "A good way to explain {topic} to a child is",
    "My favourite thing about the {noun} is",
)


def _synthetic(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return f"Question: What is {a} plus {b}?\nAnswer:"
    if kind == 1:
        return f"List three {rng.choice(_CATEGORIES)}:\n1."
    if kind == 2:
        word = rng.choice(WORDS)
        return f"Write the word '{word}' backwards, letter by letter:"
    if kind == 3:
        start = rng.randint(1, 50)
        step = rng.randint(2, 9)
        return "Continue the sequence: " + ", ".join(str(start + step * i) for i in range(4)) + ","
    return f"Give one sentence about {rng.choice(_TOPICS)}.\nSentence:"


def _canary(rng: random.Random) -> str:
    return rng.choice(_CANARY_TEMPLATES).format(
        topic=rng.choice(_TOPICS), adj=rng.choice(_ADJECTIVES), noun=rng.choice(_NOUNS))


def _distinct(draw: Callable[[random.Random], str], rng: random.Random, n: int,
              taken: set[str]) -> tuple[str, ...]:
    out: list[str] = []
    for _ in range(n * 50):
        if len(out) == n:
            break
        prompt = draw(rng)
        if prompt not in taken:
            taken.add(prompt)
            out.append(prompt)
    if len(out) < n:
        raise ValueError(f"could not draw {n} distinct prompts")
    return tuple(out)


@dataclass(frozen=True)
class ProbeSet:
    """One round's prompts (all nodes claiming a model get the same ones)."""

    seed: int
    identity: tuple[str, ...]
    synthetic: tuple[str, ...]
    canary: tuple[str, ...]
    sampled: tuple[str, ...] = ()

    def prompts(self) -> list[tuple[ProbeKind, int, str]]:
        """Every temperature-0 prompt with its kind and index within the kind."""
        sets: tuple[tuple[ProbeKind, tuple[str, ...]], ...] = (
            ("identity", self.identity), ("synthetic", self.synthetic), ("canary", self.canary))
        return [(kind, i, p) for kind, prompts in sets for i, p in enumerate(prompts)]

    def request_order(self) -> list[tuple[ProbeKind, int, str]]:
        """:meth:`prompts` shuffled by the round's seed: the order they are sent in."""
        order = self.prompts()
        random.Random(f"order|{self.seed}").shuffle(order)
        return order


def build_probes(seed: int, *, identity: int, identity_words: int, synthetic: int,
                 canary: int, sampled: int = 0) -> ProbeSet:
    """The round's prompts; distinct across the three sets."""
    rng = random.Random(f"probes|{seed}")
    taken: set[str] = set()

    def words(r: random.Random) -> str:
        return " ".join(r.choice(WORDS) for _ in range(identity_words))

    return ProbeSet(
        seed=seed,
        identity=_distinct(words, rng, identity, taken),
        synthetic=_distinct(_synthetic, rng, synthetic, taken),
        canary=_distinct(_canary, rng, canary, taken),
        sampled=_distinct(_canary, rng, sampled, taken),
    )
