"""One lm-eval task, turned into OpenAI request bodies per doc and scored per doc.

Requests are built with lm-eval's own Task machinery (``fewshot_context``,
``construct_requests``) and encoded with lm-eval's own API model class
(``LocalCompletionsAPI`` for ``/v1/completions``, ``LocalChatCompletion`` for
``/v1/chat/completions``): its ``_encode_pair``, ``batch_loglikelihood_requests``,
``tok_encode``, ``create_message`` and ``_create_payload`` (its private names through
:mod:`cluster.tasks.lmeval._compat`), with the glue of its
``loglikelihood`` / ``generate_until`` at ``batch_size=1`` reproduced here. Scoring parses
each response with the same class's ``parse_logprobs`` / ``parse_generations``, applies the
task's filter ensembles and calls ``task.process_results`` per filter, as
``lm_eval.evaluator.evaluate`` does. A doc's prompts depend only on its id and row (see
:mod:`cluster.tasks.lmeval.fewshot`), so any subset of docs, in any order, gets the
prompts a full lm-eval run would send.

Differences from lm-eval, on purpose:
- a response lm-eval would accept but that cannot be a faithful answer (missing choices,
  an echo of the wrong length, non-finite or positive logprobs, a non-string text) raises
  :class:`~cluster.core.errors.EvaluationError` instead of being scored;
- ``stop`` always carries the tokenizer's EOS string, as lm-eval's synchronous path does
  (its concurrent path omits it; the shipped tasks list it in ``until`` anyway).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import math
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cluster.core.errors import ErrorCode, EvaluationError, TaskError, TestbenchError
from cluster.core.schemas import ApiKind, Node, Prompt, Relay, prompt_id
from cluster.tasks.lmeval import _compat as lmeval_compat
from cluster.tasks.lmeval.fewshot import FewshotReplay
from cluster.tasks.lmeval.groups import LeafTask
from cluster.tasks.lmeval.loading import TaskCatalog, as_catalog, config_digest, load_lmeval_task
from cluster.wire import openai as wire

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.models.api_models import TemplateAPI

log = logging.getLogger(__name__)

LOGLIKELIHOOD_TYPES = ("loglikelihood", "multiple_choice")
BODY_CACHE_DOCS = 4096
# (context, continuation) -> token ids and context length: a few requests per doc
TOKEN_CACHE_REQUESTS = 8 * BODY_CACHE_DOCS

_built_lock = threading.Lock()
_built = {"docs": 0, "cpu_s": 0.0}


def request_build_stats() -> dict[str, float]:
    """Docs whose request bodies this process built (not taken from a body cache) and the
    CPU seconds that took (lm-eval's few-shot context, templates, tokenizing), over every
    adapter, since the process started: what a loop pays for docs it has not seen yet."""
    with _built_lock:
        return dict(_built)


def _count_build(cpu_s: float) -> None:
    with _built_lock:
        _built["docs"] += 1
        _built["cpu_s"] += cpu_s


@dataclass(frozen=True, slots=True)
class DocRequests:
    """What building one doc's requests computed: its lm-eval Instances (as first built)
    and the token ids of their loglikelihood requests. The Sampler builds them; the
    Evaluator, scoring the same doc for the same adapter in another process, takes them
    (:meth:`TaskAdapter.adopt_doc_requests`) instead of rendering and tokenizing it again."""

    key: tuple[int, str]  # (doc_id, the doc's digest)
    instances: list[Instance]
    inputs: dict[tuple[str, str], tuple[list[int], int]]
SUPPORTED_TYPES = ("loglikelihood", "multiple_choice", "generate_until")


class RequestSettings(BaseModel):
    """lm-eval's knobs that shape requests and scores; defaults are lm-eval 0.4.13's
    (``TemplateAPI`` model args and ``simple_evaluate`` arguments)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_length: int = Field(default=2048, ge=2, description="TemplateAPI max_length")
    max_gen_toks: int = Field(default=256, ge=1, description="default max_tokens")
    seed: int = Field(default=1234, description="the `seed` field of every body")
    add_bos_token: bool = False
    tokenized_requests: bool = Field(
        default=True, description="completions: send token ids (lm-eval's default) or strings"
    )
    fewshot_seed: int = 1234
    num_fewshot: int | None = Field(
        default=None, ge=0, description="None = the task's; a task set to 0 stays 0 (as lm-eval)"
    )
    system_instruction: str | None = Field(
        default=None, description="prepended to every prompt (a system message with a chat "
        "template, text before the few-shot examples without one), as lm-eval's")
    apply_chat_template: bool | None = Field(
        default=None, description="render prompts with the chat template (the tokenizer's for "
        "completions); None = on for chat-completions, which needs it, off for completions")
    fewshot_as_multiturn: bool = Field(
        default=True, description="with a chat template: few-shot examples as separate turns")
    bootstrap_iters: int = Field(default=100000, ge=0)
    # Not an lm-eval knob: send all of a doc's loglikelihood requests (a multiple-choice
    # doc's choices) as one batched /v1/completions body (a prompt list, as lm-eval itself
    # posts with batch_size > 1). Same per-doc scores (tests), fewer round trips, and the
    # engine batches a doc's choices at once: 0.85x of one-request-per-choice wall time on
    # the SmolLM2 vLLM node (bench/e2e_vs_lmeval.py). Off for servers without prompt lists.
    batch_doc_requests: bool = True


class FailedRelayError(TestbenchError):
    """A relay that is not an answer (timeout, HTTP error, ...): the doc fails with its code."""

    def __init__(self, relay: Relay) -> None:
        super().__init__(
            f"relay {relay.prompt_id} failed with {relay.error_code.name}: {relay.error or ''}".strip()
        )
        self.code = relay.error_code


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class TaskAdapter:
    """One lm-eval task from YAML, for one tokenizer and one API kind."""

    def __init__(
        self,
        task: ConfigurableTask,
        lm: TemplateAPI,
        *,
        api: ApiKind,
        model: str,
        settings: RequestSettings,
        replay: FewshotReplay,
        lock: threading.RLock,
    ) -> None:
        self.task = task
        self.lm = lm
        self.api: ApiKind = api
        self.model = model
        self.settings = settings
        self._replay = replay
        self._lock = lock
        self.name: str = task.config.task
        self.output_type: str = task.OUTPUT_TYPE
        if self.output_type not in SUPPORTED_TYPES:
            raise TaskError(f"task {self.name}: output_type {self.output_type} is not supported")
        if api == "chat-completions" and self.output_type in LOGLIKELIHOOD_TYPES:
            raise TaskError(
                f"task {self.name} needs loglikelihoods ({self.output_type}), which "
                "/v1/chat/completions cannot give; measure it over api='completions'"
            )
        self.chat_template: bool = chat_template_on(api, settings)
        self.eval_split: str = task.config.test_split or task.config.validation_split
        self.num_fewshot: int = _num_fewshot(task, settings)
        self.repeats: int = int(task.config.repeats or 1)
        self.filter_names: list[str] = [f.name for f in lmeval_compat.filter_ensembles(task)]
        self.metric_names: list[str] = [
            f"{metric},{flt}"
            for flt in self.filter_names
            for metric in lmeval_compat.metric_names(task)
        ]
        self.path: Literal["/v1/completions", "/v1/chat/completions"] = (
            wire.CHAT_PATH if api == "chat-completions" else wire.COMPLETIONS_PATH
        )
        # doc -> its request bodies: a doc's few-shot context is a pure function of the doc
        # (FewshotReplay), so every node measured on it gets the same bodies, and building
        # them (templates, tokenizing a few-shot context) costs a millisecond or more.
        self._bodies: OrderedDict[tuple[int, str], list[tuple[dict[str, Any], int]]] = (
            OrderedDict())
        self._instances: OrderedDict[tuple[int, str], list[Instance]] = OrderedDict()
        self._inputs: OrderedDict[tuple[str, str], tuple[list[int], int]] = OrderedDict()
        self._bodies_lock = threading.Lock()
        self._features = _eval_features(task, self.eval_split)

    # ------------------------------------------------------------------ requests
    def _doc(self, doc: dict[str, Any]) -> dict[str, Any]:
        """The doc as lm-eval's task sees it: a row of its dataset (the dataset's column
        order and types: PostgreSQL's JSONB returns keys in its own order, and lm-eval's
        ``doc_hash`` is over the row's JSON), then ``process_docs``."""
        process = self.task.config.process_docs
        features = self._features
        if process is None and features is None:
            return doc
        row_dataset = _row_dataset_class()
        rows = None
        if features is not None and set(doc) <= set(features):
            try:  # columns in the dataset's order (nested ones follow the features' types)
                row = {k: doc.get(k) for k in features}
                if process is None:
                    return _as_row(row, features)
                rows = row_dataset.from_list([row], features=features)
            except (TypeError, ValueError, KeyError) as exc:  # not a row of this dataset
                log.debug("doc_as_row.skipped task=%s reason=%r", self.name, exc)
        if rows is None:
            rows = row_dataset.from_list([doc])
        if process is not None:
            rows = process(rows)
        return dict(rows[0])

    def build_instances(self, doc_id: int, doc: dict[str, Any]) -> list[Instance]:
        """lm-eval's Instances for the doc, as ``Task.build_all_requests`` makes them:
        fresh objects every call (scoring fills their ``resps``), copied from the doc's
        first build (an LRU of ``BODY_CACHE_DOCS`` docs), since a doc's requests are a pure
        function of the doc (its few-shot examples included, :class:`FewshotReplay`)."""
        if doc_id < 0:
            raise TaskError(f"doc_id must be >= 0, got {doc_id}")
        key = (doc_id, _doc_digest(doc))
        with self._bodies_lock:
            built = self._instances.get(key)
            if built is not None:
                self._instances.move_to_end(key)
        if built is None:
            built = self._new_instances(doc_id, doc)
            with self._bodies_lock:
                self._instances[key] = built
                while len(self._instances) > BODY_CACHE_DOCS:
                    self._instances.popitem(last=False)
        fresh = []
        for template in built:
            inst = copy.copy(template)
            inst.resps, inst.filtered_resps = [], {}
            fresh.append(inst)
        return fresh

    def _new_instances(self, doc_id: int, doc: dict[str, Any]) -> list[Instance]:
        task, chat = self.task, self.chat_template
        doc = self._doc(doc)
        chat_template = self.lm.apply_chat_template if chat else None
        with self._lock, self._replay.positioned(doc_id):
            ctx = task.fewshot_context(
                doc,
                num_fewshot=self.num_fewshot,
                system_instruction=self.settings.system_instruction,
                apply_chat_template=chat,
                fewshot_as_multiturn=chat and self.settings.fewshot_as_multiturn,
                chat_template=chat_template,
                gen_prefix=task.doc_to_prefix(doc),
            )
            inst = task.construct_requests(
                doc=doc,
                ctx=ctx,
                metadata=(task.config["task"], doc_id, task.config.repeats),
                apply_chat_template=chat,
                chat_template=chat_template,
            )
        return inst if isinstance(inst, list) else [inst]

    def doc_requests(self, doc_id: int, doc: dict[str, Any]) -> DocRequests | None:
        """The doc's requests as this adapter built them (None if it has not): for the
        same adapter in another process, :meth:`adopt_doc_requests`."""
        key = (doc_id, _doc_digest(doc))
        with self._bodies_lock:
            built = self._instances.get(key)
            if built is None:
                return None
            inputs = {}
            for inst in built:
                if inst.request_type not in LOGLIKELIHOOD_TYPES:
                    continue
                found = self._inputs.get((inst.args[0], inst.args[1]))
                if found is not None:
                    inputs[(inst.args[0], inst.args[1])] = found
        return DocRequests(key=key, instances=built, inputs=inputs)

    def adopt_doc_requests(self, handed: DocRequests) -> None:
        """Take a doc's requests built by this adapter's twin elsewhere (same task, node
        settings and doc: the same Instances and token ids, which are pure functions of
        them), so that scoring the doc here builds nothing."""
        with self._bodies_lock:
            self._instances.setdefault(handed.key, handed.instances)
            self._instances.move_to_end(handed.key)
            while len(self._instances) > BODY_CACHE_DOCS:
                self._instances.popitem(last=False)
            for key, found in handed.inputs.items():
                self._inputs.setdefault(key, found)
            while len(self._inputs) > TOKEN_CACHE_REQUESTS:
                self._inputs.popitem(last=False)

    def _loglikelihood_input(self, instance: Instance) -> tuple[list[int], int]:
        """Token ids sent and context length, as ``TemplateLM.loglikelihood`` →
        ``TemplateAPI.batch_loglikelihood_requests`` compute them; computed once per
        (context, continuation) (an LRU of ``TOKEN_CACHE_REQUESTS``). The token list is
        shared: callers read it, never change it."""
        key = (instance.args[0], instance.args[1])
        with self._bodies_lock:
            found = self._inputs.get(key)
            if found is not None:
                self._inputs.move_to_end(key)
                return found
        found = self._encode_loglikelihood(instance)
        with self._bodies_lock:
            self._inputs[key] = found
            while len(self._inputs) > TOKEN_CACHE_REQUESTS:
                self._inputs.popitem(last=False)
        return found

    def _encode_loglikelihood(self, instance: Instance) -> tuple[list[int], int]:
        lm = self.lm
        context, continuation = instance.args[0], instance.args[1]
        if context == "":
            continuation_enc = lm.tok_encode(continuation, add_special_tokens=False)
            context_enc, continuation_enc = (
                ([lm.prefix_token_id], continuation_enc)
                if lm.prefix_token_id != continuation_enc[0]
                else (continuation_enc[:1], continuation_enc[1:])
            )
        else:
            context_enc, continuation_enc = lmeval_compat.encode_pair(lm, context, continuation)
        inputs, ctxlens, _ = lm.batch_loglikelihood_requests(
            [[((context, continuation), context_enc, continuation_enc)]]
        )
        return inputs[0], ctxlens[0]

    def loglikelihood_tokens(self, instance: Instance) -> tuple[list[int], int]:
        """The token ids a loglikelihood request sends and its context length (lm-eval's
        ``ctxlen``): the continuation is ``tokens[ctxlen:]``. What a trusted reference
        scores to answer the same request (``cluster/honesty/reference_docs.py``)."""
        return self._loglikelihood_input(instance)

    def _generation_message(self, instance: Instance) -> Any:
        """What ``TemplateAPI.generate_until`` hands to ``model_call`` for one request."""
        lm = self.lm
        context, gen_kwargs = instance.args[0], instance.args[1]
        if lm.tokenized_requests:
            encodings = lm.tok_encode([context], add_special_tokens=lm.add_bos_token)
            max_gen_toks = gen_kwargs.get("max_gen_toks", lmeval_compat.default_max_gen_toks(lm))
            max_context_len = lm.max_length - max_gen_toks
            return [x[-max_context_len:] for x in encodings]
        return [context]

    def request_body(self, instance: Instance, model: str) -> tuple[dict[str, Any], int]:
        """The JSON body lm-eval's ``model_call`` would POST for this instance (batch_size=1),
        and the prompt's length in tokens (estimated for chat)."""
        lm = self.lm
        if instance.request_type in LOGLIKELIHOOD_TYPES:
            tokens, _ = self._loglikelihood_input(instance)
            body = lmeval_compat.request_payload(
                lm, lm.create_message([tokens]), generate=False, gen_kwargs=None
            )
            prompt_tokens = len(tokens)
        else:
            messages = self._generation_message(instance)
            body = lmeval_compat.request_payload(
                lm,
                lm.create_message(messages),
                generate=True,
                gen_kwargs=copy.deepcopy(instance.args[1]),
            )
            if lm.tokenized_requests:
                prompt_tokens = len(messages[0])
            else:
                prompt_tokens = self._estimate_tokens(messages[0])
        body["model"] = model
        return body, prompt_tokens

    def _batched(self, instances: list[Instance]) -> bool:
        return (
            self.settings.batch_doc_requests
            and self.repeats == 1
            and len(instances) > 1
            and all(inst.request_type in LOGLIKELIHOOD_TYPES for inst in instances)
        )

    def batched_request_body(
        self, instances: list[Instance], model: str
    ) -> tuple[dict[str, Any], int]:
        """One body for all of a doc's loglikelihood instances (prompt = a list of token
        lists), exactly what lm-eval's ``model_call`` posts for such a batch."""
        lm = self.lm
        tokens = [self._loglikelihood_input(inst)[0] for inst in instances]
        body = lmeval_compat.request_payload(
            lm, lm.create_message(tokens), generate=False, gen_kwargs=None
        )
        body["model"] = model
        return body, sum(len(t) for t in tokens)

    def _estimate_tokens(self, message: Any) -> int:
        text = message.prompt if hasattr(message, "prompt") else str(message)
        return max(1, len(text) // 4)

    def build_prompts(
        self, node: Node, doc_id: int, doc: dict[str, Any], sample_key: str, now: float,
        gen_kwargs: Mapping[str, Any] | None = None,
    ) -> list[Prompt]:
        """The HTTP requests that make up one sample of this doc for ``node``; a run's
        ``gen_kwargs`` are merged into generation requests (:func:`merge_gen_kwargs`)."""
        if gen_kwargs:
            started = time.thread_time()
            instances = merge_gen_kwargs(self.build_instances(doc_id, doc), gen_kwargs)
            bodies = self._bodies_of(instances, node.model)
            _count_build(time.thread_time() - started)
        else:
            bodies = self._doc_bodies(doc_id, doc, node.model)
        n_requests = len(bodies) * self.repeats
        prompts: list[Prompt] = []
        for body, prompt_tokens in bodies:
            for _ in range(self.repeats):
                index = len(prompts)
                prompts.append(
                    Prompt(
                        prompt_id=prompt_id(sample_key, index),
                        sample_key=sample_key,
                        node_id=node.node_id,
                        task=self.name,
                        doc_id=doc_id,
                        request_index=index,
                        n_requests=n_requests,
                        path=self.path,
                        # a shallow copy: the nested values (token ids) are shared with the
                        # cache and never modified (the Requester builds new bodies)
                        body={**body, "model": node.model},
                        prompt_tokens=prompt_tokens,
                        max_output_tokens=wire.max_output_tokens(body),
                        created_at=now,
                    )
                )
        return prompts

    def _bodies_of(
        self, instances: list[Instance], model: str
    ) -> list[tuple[dict[str, Any], int]]:
        if self._batched(instances):
            return [self.batched_request_body(instances, model)]
        return [self.request_body(inst, model) for inst in instances]

    def _doc_bodies(
        self, doc_id: int, doc: dict[str, Any], model: str
    ) -> list[tuple[dict[str, Any], int]]:
        """The doc's request bodies, built once per doc content (an LRU of the last
        ``BODY_CACHE_DOCS`` docs); ``model`` is set per prompt."""
        key = (doc_id, _doc_digest(doc))
        with self._bodies_lock:
            found = self._bodies.get(key)
            if found is not None:
                self._bodies.move_to_end(key)
                return found
        started = time.thread_time()  # this thread's CPU: the build runs on it, unawaited
        bodies = self._bodies_of(self.build_instances(doc_id, doc), model)
        _count_build(time.thread_time() - started)
        with self._bodies_lock:
            self._bodies[key] = bodies
            while len(self._bodies) > BODY_CACHE_DOCS:
                self._bodies.popitem(last=False)
        return bodies

    # ------------------------------------------------------------------ scoring
    def _parse_loglikelihood(
        self, response: dict[str, Any], tokens: list[int], ctxlen: int, where: str
    ) -> tuple[float, bool]:
        try:
            wire.check_echo_logprobs(wire.sole_choice(response), len(tokens), ctxlen)
        except wire.MalformedAnswer as exc:
            raise EvaluationError(f"{where}: {exc}") from exc
        try:
            parsed = self.lm.parse_logprobs(outputs=[response], tokens=[tokens], ctxlens=[ctxlen])
        except (KeyError, TypeError, ValueError, IndexError, AssertionError) as exc:
            raise EvaluationError(f"{where}: unparseable logprobs: {exc!r}") from exc
        if len(parsed) != 1:
            raise EvaluationError(f"{where}: expected one loglikelihood, parsed {len(parsed)}")
        ll, is_greedy = parsed[0]
        return float(ll), bool(is_greedy)

    def _parse_generation(self, response: dict[str, Any], where: str) -> str:
        from lm_eval.models.api_models import LMEVAL_MODEL_NONE_ANSWER_PLACEHOLDER

        try:
            choice = wire.sole_choice(response)
            wire.generated_text(choice, chat=self.api == "chat-completions")
        except wire.MalformedAnswer as exc:
            raise EvaluationError(f"{where}: {exc}") from exc
        normalized = wire.with_sole_choice(response, choice)
        try:
            parsed = self.lm.parse_generations(outputs=normalized)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise EvaluationError(f"{where}: unparseable generation: {exc!r}") from exc
        if len(parsed) != 1:
            raise EvaluationError(f"{where}: expected one generation, parsed {len(parsed)}")
        # lm-eval scores a null answer as its placeholder (an empty string by default)
        return LMEVAL_MODEL_NONE_ANSWER_PLACEHOLDER if parsed[0] is None else parsed[0]

    def _ordered_relays(self, doc_id: int, relays: list[Relay], n_requests: int) -> list[Relay]:
        by_index: dict[int, Relay] = {}
        for relay in relays:
            if relay.doc_id != doc_id or relay.task != self.name:
                raise TaskError(
                    f"relay {relay.prompt_id} is for {relay.task} doc {relay.doc_id}, "
                    f"not {self.name} doc {doc_id}"
                )
            if relay.request_index in by_index:
                raise TaskError(f"two relays for request {relay.request_index} of doc {doc_id}")
            by_index[relay.request_index] = relay
        if sorted(by_index) != list(range(n_requests)):
            raise TaskError(
                f"{self.name} doc {doc_id} needs relays 0..{n_requests - 1}, got {sorted(by_index)}"
            )
        ordered = [by_index[i] for i in range(n_requests)]
        for relay in ordered:
            if relay.error_code != ErrorCode.OK:
                raise FailedRelayError(relay)
            if not isinstance(relay.response, dict):
                raise EvaluationError(f"relay {relay.prompt_id} is OK but carries no JSON object")
        return ordered

    def score(self, doc_id: int, doc: dict[str, Any], relays: list[Relay]) -> dict[str, float]:
        """Per-doc metrics keyed ``"<metric>,<filter>"`` (lm-eval's result keys).

        Raises :class:`EvaluationError` when a response cannot be parsed,
        :class:`FailedRelayError` (carrying the relay's code) when a relay is not OK and
        :class:`TaskError` when the relays do not match the doc's requests."""
        return self.score_instances(self.answered_instances(doc_id, doc, relays))

    def answered_instances(
        self, doc_id: int, doc: dict[str, Any], relays: list[Relay],
        gen_kwargs: Mapping[str, Any] | None = None,
    ) -> list[Instance]:
        """The doc's lm-eval Instances with ``resps`` parsed from its relays (what
        :meth:`score` scores; lm-eval's per-sample records are built from them too).
        Raises as :meth:`score` does."""
        instances = merge_gen_kwargs(self.build_instances(doc_id, doc), gen_kwargs)
        if self._batched(instances):
            (relay,) = self._ordered_relays(doc_id, relays, 1)
            where = f"{self.name} doc {doc_id} batched request"
            try:
                answers = wire.split_choices(relay.response or {}, [1] * len(instances))
            except wire.MalformedAnswer as exc:
                raise EvaluationError(
                    f"{where}: expected {len(instances)} indexed choices, one per request ({exc})"
                ) from exc
            for i, (instance, answer) in enumerate(zip(instances, answers, strict=True)):
                tokens, ctxlen = self._loglikelihood_input(instance)
                instance.resps = [self._parse_loglikelihood(answer, tokens, ctxlen, f"{where} #{i}")]
            return instances
        ordered = self._ordered_relays(doc_id, relays, len(instances) * self.repeats)
        for i, instance in enumerate(instances):
            instance.resps = []
            tokens_ctx = (
                self._loglikelihood_input(instance)
                if instance.request_type in LOGLIKELIHOOD_TYPES
                else None
            )
            for r in range(self.repeats):
                relay = ordered[i * self.repeats + r]
                response = relay.response or {}
                where = f"{self.name} doc {doc_id} request {relay.request_index}"
                if tokens_ctx is not None:
                    instance.resps.append(self._parse_loglikelihood(response, *tokens_ctx, where))
                else:
                    instance.resps.append(self._parse_generation(response, where))
        return instances

    def score_instances(self, instances: list[Instance]) -> dict[str, float]:
        """Filters + ``process_results`` over one doc's answered Instances (``resps`` set)."""
        task = self.task
        for ensemble in lmeval_compat.filter_ensembles(task):
            ensemble.apply(instances)
        instances = sorted(instances, key=lambda x: x.idx)
        doc = instances[0].doc
        out: dict[str, float] = {}
        for filter_key in instances[0].filtered_resps:
            metrics = task.process_results(doc, [inst.filtered_resps[filter_key] for inst in instances])
            for metric, value in metrics.items():
                if isinstance(value, bool) or _is_number(value) or _is_numpy_number(value):
                    out[f"{metric},{filter_key}"] = float(value)
                else:
                    raise TaskError(
                        f"task {self.name}: metric {metric} yields {type(value).__name__} per doc; "
                        "only scalar metrics are supported"
                    )
        return out

    # ------------------------------------------------------------------ aggregation
    def aggregate(self, metric: str, values: list[float]) -> tuple[float, float | None]:
        """lm-eval's aggregate of per-doc values and its stderr (None where lm-eval says N/A)."""
        from lm_eval.api.metrics import mean, stderr_for_metric

        name = metric.split(",", 1)[0]
        if not values:
            raise ValueError(f"no values to aggregate for {metric}")
        agg_fn = self.task.aggregation().get(name, mean)
        value = float(agg_fn(values))
        iters = self.settings.bootstrap_iters
        if iters <= 0 or len(values) <= 1:
            return value, None
        stderr_fn = stderr_for_metric(
            metric=agg_fn,
            bootstrap_iters=min(iters, 100) if name in ("bleu", "chrf", "chrf++", "ter") else iters,
        )
        return value, (float(stderr_fn(values)) if stderr_fn else None)

    @property
    def higher_is_better(self) -> dict[str, bool]:
        hib = self.task.higher_is_better()
        return {m: bool(hib.get(m.split(",", 1)[0], True)) for m in self.metric_names}

    @property
    def n_docs(self) -> int:
        return len(self.task.eval_docs)


def _as_row(row: dict[str, Any], features: Any) -> dict[str, Any]:
    """``dict(Dataset.from_list([row], features=features)[0])`` without the Dataset: the row
    encoded by the features, cast to their Arrow schema and decoded as a Dataset's Python
    formatter decodes it (same columns, order and types; a tenth of the cost, which matters
    twice per doc in the loop: the Sampler's and the Evaluator's)."""
    import pyarrow as pa

    table = pa.Table.from_pylist([features.encode_example(row)], schema=features.arrow_schema)
    return features.decode_example(table.to_pylist()[0])


@functools.cache
def _row_dataset_class() -> Any:
    """``datasets.Dataset`` for one doc, without its content fingerprint.

    A new Dataset hashes its whole table with dill for a fingerprint that names cache files;
    for a one-row, in-memory dataset (no cache files) that hash was most of the cost of
    turning a doc into a row: about half of the loop's scoring CPU on gsm8k
    (``bench/sim_nodes.py``). A fixed fingerprint is safe here: in-memory datasets never
    read or write a cache, and ``process_docs``' ``map`` derives its own from it."""
    import datasets

    class DocRow(datasets.Dataset):
        def __init__(self, arrow_table: Any, info: Any = None, split: Any = None,
                     indices_table: Any = None, fingerprint: str | None = None) -> None:
            super().__init__(arrow_table, info, split, indices_table,
                             fingerprint or "testbench-doc-row")

    return DocRow


def _doc_digest(doc: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def merge_gen_kwargs(
    instances: list[Instance], gen_kwargs: Mapping[str, Any] | None
) -> list[Instance]:
    """A run's ``gen_kwargs`` merged into each generation request's arguments, exactly as
    lm-eval's ``simple_evaluate(gen_kwargs=...)`` merges them into ``generation_kwargs``."""
    if gen_kwargs:
        for inst in instances:
            if inst.request_type == "generate_until":
                context, kwargs = inst.arguments
                inst.arguments = (context, {**kwargs, **copy.deepcopy(dict(gen_kwargs))})
    return instances


def _is_numpy_number(value: Any) -> bool:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, np.number) and bool(np.isfinite(value))


def chat_template_on(api: ApiKind, settings: RequestSettings) -> bool:
    """Whether prompts go through a chat template; TaskError for a chat endpoint without
    one (lm-eval's chat client sends messages, which only a chat template makes)."""
    if settings.apply_chat_template is None:
        return api == "chat-completions"
    if api == "chat-completions" and not settings.apply_chat_template:
        raise TaskError("apply_chat_template: a chat-completions endpoint needs the chat "
                        "template (its requests are chat messages)")
    return settings.apply_chat_template


def _eval_features(task: ConfigurableTask, split: str | None) -> Any:
    """The Hugging Face features of the task's eval split (None when unknown)."""
    dataset = getattr(task, "dataset", None)
    try:
        return dataset[split].features if dataset is not None and split else None
    except (KeyError, TypeError, AttributeError):
        return None


def _num_fewshot(task: ConfigurableTask, settings: RequestSettings) -> int:
    configured = task.config.num_fewshot
    if settings.num_fewshot is not None and configured != 0:
        return settings.num_fewshot
    return int(configured or 0)


# ---------------------------------------------------------------------- caches
_cache_lock = threading.Lock()
_lms: dict[tuple[str, str | None, RequestSettings], TemplateAPI] = {}
_replays: dict[tuple[int, int, int], tuple[FewshotReplay, threading.RLock]] = {}
_adapters: dict[tuple[Any, ...], TaskAdapter] = {}


def _api_lm(api: ApiKind, tokenizer: str | None, settings: RequestSettings) -> TemplateAPI:
    key = (api, tokenizer, settings)
    with _cache_lock:
        lm = _lms.get(key)
    if lm is not None:
        return lm
    from lm_eval.models.openai_completions import LocalChatCompletion, LocalCompletionsAPI

    common: dict[str, Any] = {
        "base_url": None,
        "batch_size": 1,
        "num_concurrent": 1,
        "max_length": settings.max_length,
        "max_gen_toks": settings.max_gen_toks,
        "seed": settings.seed,
        "add_bos_token": settings.add_bos_token,
    }
    try:
        if api == "completions":
            if not tokenizer:
                raise TaskError("api 'completions' needs a tokenizer (path or id) to align tokens")
            if tokenizer.startswith(("/", ".", "~")) and not Path(tokenizer).expanduser().is_dir():
                # transformers would take it for a malformed hub id and say only that
                raise TaskError(
                    f"cannot build lm-eval's {api} client with tokenizer {tokenizer!r}: no such "
                    f"directory on {socket.gethostname()} (working directory {Path.cwd()}); "
                    "the tokenizer must be readable where the loop's workers run")
            with lmeval_compat.direct_fast_tokenizers():
                lm = LocalCompletionsAPI(
                    tokenizer_backend="huggingface",
                    tokenizer=tokenizer,
                    tokenized_requests=settings.tokenized_requests,
                    **common,
                )
        elif api == "chat-completions":
            lm = LocalChatCompletion(tokenizer_backend=None, tokenized_requests=None, **common)
        else:
            raise TaskError(f"unknown api kind {api!r}")
    except TaskError:
        raise
    except Exception as exc:  # tokenizer loading errors come in many types
        raise TaskError(f"cannot build lm-eval's {api} client with tokenizer {tokenizer!r}: {exc!r}") from exc
    with _cache_lock:
        return _lms.setdefault(key, lm)


def _replay_for(task: ConfigurableTask, settings: RequestSettings) -> tuple[FewshotReplay, threading.RLock]:
    n = _num_fewshot(task, settings)
    key = (id(task), settings.fewshot_seed, n)
    with _cache_lock:
        found = _replays.get(key)
        if found is None:
            replay = FewshotReplay(task, seed=settings.fewshot_seed, num_fewshot=n)
            found = _replays[key] = (replay, replay.lock)
        return found


def load_task_adapter(
    name: str,
    datasets_dir: TaskCatalog | Path,
    tokenizer: str | None,
    api: ApiKind,
    model: str,
    settings: RequestSettings | None = None,
    leaf: LeafTask | None = None,
) -> TaskAdapter:
    """The adapter for task ``name`` of a catalog (or a datasets dir), cached per arguments.

    ``tokenizer`` is a Hugging Face tokenizer path or id; like lm-eval, ``model`` stands in
    for it when it is None. Bodies name the model each node claims (``node.model``).
    ``leaf`` carries what a group sets for this member (overrides, or an inline config).
    The lm-eval Task and the tokenizer are shared by all adapters that use them."""
    settings = settings or RequestSettings()
    catalog = as_catalog(datasets_dir)
    tokenizer_id = tokenizer or (model if api == "completions" else None)
    overrides = leaf.extra_overrides if leaf is not None else None
    inline = leaf.inline if leaf is not None else None
    key = (name, catalog, config_digest(overrides), config_digest(inline), tokenizer_id, api,
           model, settings)
    with _cache_lock:
        adapter = _adapters.get(key)
    if adapter is not None:
        return adapter
    chat_template_on(api, settings)
    task = load_lmeval_task(name, catalog, overrides, inline,
                            leaf.base_dir if leaf is not None else None)
    if api == "chat-completions" and task.OUTPUT_TYPE in LOGLIKELIHOOD_TYPES:
        raise TaskError(
            f"task {name} needs loglikelihoods ({task.OUTPUT_TYPE}), which "
            "/v1/chat/completions cannot give; measure it over api='completions'"
        )
    lm = _api_lm(api, tokenizer_id, settings)
    replay, lock = _replay_for(task, settings)
    adapter = TaskAdapter(
        task, lm, api=api, model=model, settings=settings, replay=replay, lock=lock
    )
    with _cache_lock:
        return _adapters.setdefault(key, adapter)
