"""The fake language model behind a test node.

Everything is a pure function of the request (and the node's mode), so identical
prompts always get identical answers:

- **Loglikelihood** (``echo`` + ``logprobs``): the logprob of token ``t`` after the prefix
  ``ids[:i]`` is a pseudo-random negative float drawn from a 64-bit hash of the prefix and
  ``t``. About a third of the actual tokens are greedy (the top of their ``top_logprobs``);
  the others sit below an alternative token. Mode ``wrong`` salts the hash, so its
  logprobs differ from mode ``correct``'s.
- **Generation**: the last ``Question: ...`` of the prompt is looked up in gsm8k (test and
  train). Mode ``correct`` answers with the dataset's answer (ending ``#### N``), mode
  ``wrong`` with ``#### N+1``; both continue with ``\\n\\nQuestion:`` and filler text, so
  ``stop`` matters. Other prompts get filler words chosen by a hash of the prompt.

A caveat: greediness is decided per (prefix, token), so two different continuations of the
same prefix can both claim to be greedy across requests. Within one response the
``top_logprobs`` are always consistent with ``token_logprobs``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cluster.core.settings import PROJECT_ROOT
from cluster.testing.testnode.tokens import TokenCodec
from cluster.wire import openai as wire

log = logging.getLogger(__name__)

Mode = Literal["correct", "wrong"]

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_SALTS: dict[str, int] = {"correct": 0x243F6A8885A308D3, "wrong": 0x13198A2E03707344}
_ALT_SALT = 0xA0761D6478BD642F
_GREEDY_SHARE = 96  # out of 256: about 37% of actual tokens are greedy
_EOS_FILLER_WORDS = 48
_POSITION_CACHE_MAX = 200_000
_ENCODE_CACHE_MAX = 20_000
_DIGITS = 7  # logprobs are rounded (float32 servers carry about 7 significant digits)

_WORDS = (
    "the of and to in is it that was for on are with as be at by this had not but what all "
    "were when we there can an your which their said if do will each about how up out them "
    "then she many some so these would other into has more her two like him see time could "
    "no make than first been its who now people my made over did down only way find use may "
    "water long little very after words called just where most know"
).split()


def mix64(x: int) -> int:
    """splitmix64's finaliser: a fast, well-spread 64-bit hash of an integer."""
    x = (x + _GOLDEN) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def unit(x: int) -> float:
    """A 64-bit hash as a float in [0, 1)."""
    return (x >> 11) * (1.0 / (1 << 53))


def text_hash(text: str) -> int:
    h = 0
    data = text.encode("utf-8")
    for start in range(0, len(data), 8):
        h = mix64(h ^ int.from_bytes(data[start : start + 8], "little"))
    return h


def normalize_question(text: str) -> str:
    return " ".join(text.split())


_gsm8k_cache: dict[str, dict[str, str]] = {}
_gsm8k_lock = threading.Lock()


def gsm8k_dirs() -> list[Path]:
    return [PROJECT_ROOT / "datasets" / "gsm8k", Path("/work/shared/datasets/gsm8k")]


def load_gsm8k_answers(dirs: Sequence[Path] | None = None) -> dict[str, str]:
    """Map normalised gsm8k question → full answer text, from the first folder that has data."""
    dirs = list(dirs) if dirs is not None else gsm8k_dirs()
    key = "|".join(str(d) for d in dirs)
    with _gsm8k_lock:
        cached = _gsm8k_cache.get(key)
        if cached is not None:
            return cached
        answers: dict[str, str] = {}
        for folder in dirs:
            files = [folder / "test.jsonl", folder / "train.jsonl"]
            if not any(f.is_file() for f in files):
                continue
            for path in files:
                if not path.is_file():
                    continue
                with path.open(encoding="utf-8") as fh:
                    for line in fh:
                        if line.strip():
                            doc = json.loads(line)
                            answers[normalize_question(doc["question"])] = doc["answer"]
            log.info("testnode_gsm8k_loaded folder=%s questions=%d", folder, len(answers))
            break
        else:
            log.warning("testnode_gsm8k_missing folders=%s", ",".join(map(str, dirs)))
        _gsm8k_cache[key] = answers
        return answers


_FINAL = re.compile(r"####\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)\s*$")


def wrong_answer(answer: str) -> str:
    """The same answer with a final number one higher (``#### 18`` → ``#### 19``)."""
    match = _FINAL.search(answer)
    if match is None:
        return answer + "1"
    raw = match.group(1).replace(",", "")
    try:
        value = int(raw) + 1
        number = str(value)
    except ValueError:
        number = repr(float(raw) + 1)
    return answer[: match.start(1)] + number


@dataclass(frozen=True, slots=True)
class Position:
    """One scored token: its logprob and the top-k alternatives at its position."""

    logprob: float
    top: dict[str, float]


@dataclass(frozen=True, slots=True)
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]


class FakeModel:
    """Deterministic answers for completions and chat, in mode ``correct`` or ``wrong``."""

    def __init__(
        self, codec: TokenCodec, mode: Mode = "correct", answers: dict[str, str] | None = None
    ) -> None:
        self.codec = codec
        self.mode: Mode = mode
        self.answers = load_gsm8k_answers() if answers is None else answers
        self._salt = _SALTS[mode]
        self._positions: dict[tuple[int, int, int, bool], Position] = {}
        self._encoded: dict[str, list[int]] = {}
        self._encoded_ends: dict[str, tuple[list[int], list[int]]] = {}

    # -- tokens -------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        ids = self._encoded.get(text)
        if ids is None:
            ids = self.codec.encode(text)
            if len(self._encoded) >= _ENCODE_CACHE_MAX:
                self._encoded.clear()
            self._encoded[text] = ids
        return ids

    def encode_with_ends(self, text: str) -> tuple[list[int], list[int]]:
        found = self._encoded_ends.get(text)
        if found is None:
            found = self.codec.encode_with_ends(text)
            if len(self._encoded_ends) >= _ENCODE_CACHE_MAX:
                self._encoded_ends.clear()
            self._encoded_ends[text] = found
        return found

    def decode(self, ids: Sequence[int]) -> str:
        return self.codec.decode(ids)

    # -- loglikelihood ------------------------------------------------------------------

    def prefix_hashes(self, ids: Sequence[int]) -> list[int]:
        """``out[i]`` is the hash of ``ids[:i]`` (``len(ids) + 1`` entries)."""
        h = mix64(self._salt)
        out = [h]
        for t in ids:
            h = mix64(h ^ (((t + 1) * _GOLDEN) & _MASK))
            out.append(h)
        return out

    def position(self, prefix: int, token: int, k: int, force_greedy: bool = False) -> Position:
        key = (prefix, token, k, force_greedy)
        found = self._positions.get(key)
        if found is not None:
            return found
        r = mix64(prefix ^ mix64(token))
        greedy = force_greedy or (r & 0xFF) < _GREEDY_SHARE
        u = unit(r)
        v = unit(mix64(r ^ _ALT_SALT))
        text = self.codec.token_text(token)
        alts = self._alternatives(prefix, token, text, max(k, 1))
        if greedy:
            p = 0.55 + 0.44 * u
            rest = 1.0 - p
            ranked = [(text, p)] + [(a, rest * 0.6 * 0.4**j) for j, a in enumerate(alts)]
        else:
            p = math.exp(-(0.8 + 9.2 * u))
            q = p + (1.0 - 2.0 * p) * (0.1 + 0.8 * v)
            rest = max(1.0 - p - q, 1e-12)
            ranked = [(alts[0], q), (text, p)]
            ranked += [(a, rest * 0.6 * 0.4**j) for j, a in enumerate(alts[1:])]
            ranked.sort(key=lambda item: -item[1])
        logprob = round(math.log(p), _DIGITS)
        top: dict[str, float] = {}
        if k == 0:
            top[text] = logprob
        for name, prob in ranked[:k]:
            top[name] = logprob if name == text else round(math.log(prob), _DIGITS)
        pos = Position(logprob, top)
        if len(self._positions) >= _POSITION_CACHE_MAX:
            self._positions.clear()
        self._positions[key] = pos
        return pos

    def _alternatives(self, prefix: int, token: int, text: str, count: int) -> list[str]:
        vocab = self.codec.vocab_size
        seen = {text}
        out: list[str] = []
        j = 0
        while len(out) < count and j < 8 * count + 16:
            cand = mix64(prefix ^ (_ALT_SALT + j)) % vocab
            j += 1
            if cand == token:
                continue
            name = self.codec.token_text(cand)
            if name in seen:
                continue
            seen.add(name)
            out.append(name)
        while len(out) < count:  # tiny vocabularies: make up distinct names
            out.append(f"<alt{len(out)}>")
        return out

    def score(
        self, ids: Sequence[int], k: int, first: int = 1, greedy_from: int | None = None
    ) -> tuple[list[float | None], list[dict[str, float] | None]]:
        """Per-token logprobs and top-k of ``ids``; positions before ``first`` are null.

        Positions from ``greedy_from`` on are forced greedy (tokens the node generated
        at temperature 0).
        """
        hashes = self.prefix_hashes(ids)
        lps: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        for i, t in enumerate(ids):
            if i < first:
                lps.append(None)
                tops.append(None)
                continue
            pos = self.position(hashes[i], t, k, greedy_from is not None and i >= greedy_from)
            lps.append(pos.logprob)
            tops.append(pos.top)
        return lps, tops

    # -- generation ---------------------------------------------------------------------

    def find_answer(self, prompt_text: str) -> str | None:
        """The gsm8k answer for the last ``Question:`` of the prompt, if it is one."""
        at = prompt_text.rfind("Question:")
        if at < 0:
            return None
        tail = prompt_text[at + len("Question:") :]
        candidates = []
        cut = tail.find("Answer:")
        if cut >= 0:
            candidates.append(tail[:cut])
        newline = tail.find("\n")
        if newline >= 0:
            candidates.append(tail[:newline])
        candidates.append(tail)
        for cand in candidates:
            answer = self.answers.get(normalize_question(cand))
            if answer is not None:
                return answer
        return None

    def continuation(self, prompt_text: str, variant: int = 0) -> str:
        """What the model would write with no limits (before ``max_tokens`` and ``stop``)."""
        h = mix64(text_hash(prompt_text) ^ self._salt ^ mix64(variant))
        answer = self.find_answer(prompt_text)
        if answer is not None:
            if self.mode == "wrong":
                answer = wrong_answer(answer)
            return " " + answer + "\n\nQuestion:" + self._filler(h, _EOS_FILLER_WORDS)
        return self._filler(h, 8 + h % 33)

    @staticmethod
    def _filler(h: int, count: int) -> str:
        words = []
        for _ in range(count):
            h = mix64(h)
            words.append(_WORDS[h % len(_WORDS)])
        return " " + " ".join(words) + "."

    def generate(
        self,
        prompt_text: str,
        max_tokens: int,
        stop: Sequence[str] = (),
        variant: int = 0,
    ) -> Generation:
        """Generate under ``max_tokens`` and ``stop`` (cut at the earliest stop sequence)."""
        if max_tokens <= 0:
            return Generation("", [], "length")
        full = self.continuation(prompt_text, variant)
        ids, ends = self.encode_with_ends(full)
        finish: Literal["stop", "length"] = "stop"
        limit = len(full)
        if len(ids) > max_tokens:
            ids = ids[:max_tokens]
            limit = ends[max_tokens - 1]
            finish = "length"
        cut = wire.earliest_stop(full, stop, limit)
        if cut >= 0:
            # keep the tokens that end within the cut (a token straddling it is dropped)
            ids = ids[: bisect_right(ends, cut, hi=len(ids))]
            limit = cut
            finish = "stop"
        text = full[:limit]
        return Generation(text, ids, finish)


def chat_prompt_text(messages: Sequence[dict[str, Any]]) -> str:
    """The messages' contents, joined by newlines (text parts only)."""
    return "\n".join(text for message in messages for text in wire.content_texts(message))
