"""``organic_jobs``: users' own requests, recorded before the first request leaves."""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection

from cluster.storage.mongo.base import Document


class OrganicJobStore:
    """One document per job, ``_id`` = job id; its fields are the organic jobs' own
    (``cluster/organic/jobs.py``): opened as ``running``, then finished with the answer
    or the last failure and every attempt."""

    def __init__(self, collection: AsyncCollection[Document]) -> None:
        self.collection = collection

    async def open(self, job_id: str, fields: Mapping[str, Any]) -> None:
        await self.collection.insert_one({**fields, "_id": job_id})

    async def finish(self, job_id: str, fields: Mapping[str, Any]) -> None:
        await self.collection.update_one({"_id": job_id}, {"$set": dict(fields)})

    async def get(self, job_id: str) -> Document | None:
        return await self.collection.find_one({"_id": job_id})

    async def list(self, limit: int = 20, user: str | None = None) -> builtins.list[Document]:
        """The newest ``limit`` jobs (of ``user``, or of everyone), newest first."""
        query: Document = {} if user is None else {"user": user}
        return await self.collection.find(query).sort("created_at", -1).limit(limit).to_list(None)
