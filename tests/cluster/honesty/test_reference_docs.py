"""The trusted reference's per-doc results (cluster/honesty/reference_docs.py): computed
through the task's own adapter, in steps, stored in MongoDB, completed with the full-task
scores, restarted when the task's content changes; and paired estimates in an evaluation's
results JSON (cluster/evaluations/paired.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from cluster.core.errors import ErrorCode
from cluster.core.evaluations import EvalSample, EvaluationRun
from cluster.core.settings import PROJECT_ROOT, ReferenceSettings, Settings
from cluster.evaluations.paired import with_paired
from cluster.honesty.reference import TransformersReference
from cluster.honesty.reference_docs import reference_node, refresh_reference_docs
from cluster.storage.connections import StoreConnections
from cluster.tasks.datasets import load_datasets
from cluster.tasks.registry import load_adapter

TASK = "obqa_tiny"
N_DOCS = 6


def _task_folder(root: Path, rows: list[str]) -> Path:
    source = PROJECT_ROOT / "datasets" / "openbookqa"
    (root / TASK).mkdir(exist_ok=True)
    yaml = (source / "openbookqa.yaml").read_text().replace("task: openbookqa", f"task: {TASK}")
    (root / TASK / f"{TASK}.yaml").write_text(yaml)
    (root / TASK / "test.jsonl").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def reference(smollm2_dir: Path) -> TransformersReference:
    return TransformersReference.load("smollm2", smollm2_dir, threads=1)


async def test_reference_results_are_computed_in_steps_and_redone_when_the_task_changes(
    fresh_settings: Settings, tmp_path: Path, smollm2_dir: Path,
    reference: TransformersReference,
) -> None:
    rows = (PROJECT_ROOT / "datasets" / "openbookqa" / "test.jsonl").read_text().splitlines()
    root = _task_folder(tmp_path, rows[:N_DOCS])
    settings = fresh_settings.model_copy(update={
        "datasets_dir": root, "tasks": [TASK],
        "honesty": fresh_settings.honesty.model_copy(update={
            "references": {"smollm2": ReferenceSettings(model_dir=smollm2_dir)}})})
    await load_datasets(settings, [TASK])
    refs = {"smollm2": reference}
    stores = StoreConnections(settings)
    try:
        mongo, datasets = await stores.mongo(), await stores.datasets()
        first = await refresh_reference_docs(settings, mongo, datasets, refs, max_docs=4)
        step = first[f"smollm2|{TASK}"]
        assert (step["docs_done"], step["n_docs"], step["complete"]) == (4, N_DOCS, False)
        assert await mongo.reference_sets.usable() == {}  # incomplete: nothing pairs yet
        second = await refresh_reference_docs(settings, mongo, datasets, refs, max_docs=4)
        set_id = second[f"smollm2|{TASK}"]["set_id"]
        done = await mongo.reference_sets.get(set_id)
        assert done is not None and done.complete and done.docs_done == N_DOCS
        assert done.mean_metrics == ["acc,none", "acc_norm,none"]
        docs = await mongo.reference_docs.for_set(set_id)
        assert sorted(docs) == list(range(N_DOCS))
        # the full-task score is the task's own aggregate of the per-doc metrics
        assert done.full["acc,none"] == pytest.approx(
            sum(d.metrics["acc,none"] for d in docs.values()) / N_DOCS)
        # each request: lm-eval's split of the tokens it sends, and the reference's
        # loglikelihood of the continuation, as the adapter scores it
        adapter = load_adapter(TASK, root, reference_node("smollm2", smollm2_dir))
        instances = adapter.build_instances(0, json.loads(rows[0]))
        assert len(docs[0].requests) == len(instances) == 4
        for inst, req in zip(instances, docs[0].requests, strict=True):
            tokens, ctxlen = adapter.loglikelihood_tokens(inst)
            assert (req.context_tokens, req.continuation_tokens) == (ctxlen, len(tokens) - ctxlen)
            (scores,) = await reference.logprobs([(tokens[:ctxlen], tokens[ctxlen:])])
            assert req.loglikelihood == pytest.approx(sum(s.logprob for s in scores), abs=1e-4)
        # nothing more to do while task and reference stay as they are
        again = await refresh_reference_docs(settings, mongo, datasets, refs)
        assert again[f"smollm2|{TASK}"]["set_id"] == set_id
        # the task's content changes: a new set; the old one is stale at once, and gone
        # once the new one is complete
        _task_folder(root, rows[N_DOCS:2 * N_DOCS])
        await load_datasets(settings, [TASK])
        changed = await refresh_reference_docs(settings, mongo, datasets, refs, max_docs=2)
        new_id = changed[f"smollm2|{TASK}"]["set_id"]
        assert new_id != set_id
        old = await mongo.reference_sets.get(set_id)
        assert old is not None and old.stale
        assert await mongo.reference_sets.usable() == {}
        await refresh_reference_docs(settings, mongo, datasets, refs, max_docs=N_DOCS)
        assert await mongo.reference_sets.get(set_id) is None
        assert await mongo.reference_docs.for_set(set_id) == {}
        usable = await mongo.reference_sets.usable()
        assert usable[("smollm2", TASK)].set_id == new_id

        # an evaluation of the same model on these docs gets paired estimates beside
        # lm-eval's own results
        new_docs = await mongo.reference_docs.for_set(new_id)
        run = EvaluationRun.model_validate({
            "run_id": "r1", "tenant": "t", "created_at": time.time(), "updated_at": time.time(),
            "spec": {"endpoint": "http://127.0.0.1:1", "model": "smollm2", "tasks": [TASK]}})
        samples = [EvalSample(run_id="r1", task=TASK, doc_id=d, error_code=ErrorCode.OK,
                              metrics=dict(new_docs[d].metrics), created_at=time.time())
                   for d in range(3)]
        results = await with_paired({"results": {}}, mongo, run, samples)
        paired = results["testbench"]["paired"][TASK]
        assert paired["acc,none"]["n"] == 3 and paired["acc,none"]["stderr"] == 0.0
        usable_set = usable[("smollm2", TASK)]
        assert paired["acc,none"]["mean"] == pytest.approx(usable_set.full["acc,none"])
    finally:
        await stores.close()
