"""``streaming_jobs``: the streaming jobs registered for the loop's receipt audits."""

from __future__ import annotations

import builtins
import logging

from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from cluster.core.errors import RegistrationError
from cluster.core.streaming import StreamingJob
from cluster.storage.documents import from_document, to_document
from cluster.storage.mongo.base import Document

log = logging.getLogger(__name__)


class StreamingJobStore:
    """``_id`` = job_id."""

    def __init__(self, collection: AsyncCollection[Document]) -> None:
        self.collection = collection

    async def add(self, job: StreamingJob) -> StreamingJob:
        """Register a job; RegistrationError when its id is taken."""
        try:
            await self.collection.insert_one(to_document(job, id_field="job_id"))
        except DuplicateKeyError as err:
            raise RegistrationError(
                f"streaming job {job.job_id!r} is already registered; remove it first") from err
        log.info("stores.streaming_jobs.added job=%s node=%s url=%s", job.job_id, job.node_id,
                 job.base_url)
        return job

    async def get(self, job_id: str) -> StreamingJob | None:
        doc = await self.collection.find_one({"_id": job_id})
        return from_document(StreamingJob, doc) if doc is not None else None

    async def list(self, *, enabled_only: bool = False) -> builtins.list[StreamingJob]:
        docs = await self.collection.find({}).sort("_id", ASCENDING).to_list()
        jobs = [from_document(StreamingJob, d) for d in docs]
        return [j for j in jobs if j.enabled] if enabled_only else jobs

    async def remove(self, job_id: str) -> bool:
        return (await self.collection.delete_one({"_id": job_id})).deleted_count == 1

    async def mark_audited(self, job_id: str, ts: float) -> None:
        await self.collection.update_one({"_id": job_id}, {"$set": {"last_audited_at": float(ts)}})
