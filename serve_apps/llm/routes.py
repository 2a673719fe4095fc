"""The LLM node's HTTP ingress: Ray Serve LLM's OpenAI routes plus the signature routes.

Thin handlers only: the signature routes forward to the ``ModelSignatures`` deployment.

| route | answer |
|---|---|
| ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``, ... | Ray Serve LLM (vLLM) |
| ``GET /signature/tokenizer`` | ``TokenizerSignature``: tokenizer files, sha256 each, combined |
| ``GET /signature/tokenizer/files/{name}`` | one tokenizer file's bytes (``x-sha256`` header) |
| ``GET /signature/config`` | ``ConfigSignature``: config.json + generation config, parsed and hashed |
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, HTTPException, status
from ray.serve.handle import DeploymentHandle
from ray.serve.llm.ingress import OpenAiIngress
from starlette.responses import Response

from cluster.modeldir.signatures import SignatureFile, UnknownSignatureFile
from cluster.wire.signatures import ConfigSignature, TokenizerSignature
from serve_apps.llm.ray_llm_compat import DEFAULT_ENDPOINTS

SHA256_HEADER = "x-sha256"


class NodeIngress(OpenAiIngress):
    """``OpenAiIngress`` with the node's signature routes."""

    def __init__(self, *args: Any, signatures: DeploymentHandle, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._signatures = signatures

    async def tokenizer_signature(self) -> TokenizerSignature:
        return await self._signatures.tokenizer.remote()

    async def config_signature(self) -> ConfigSignature:
        return await self._signatures.config.remote()

    async def tokenizer_file(self, name: str) -> Response:
        try:
            found: SignatureFile = await self._signatures.tokenizer_file.remote(name)
        except UnknownSignatureFile as exc:
            # Through a handle the error is Ray's task error, an instance of the cause's
            # class whose str() is the remote traceback: answer with the cause's message.
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(getattr(exc, "cause", exc))) from exc
        return Response(found.content, media_type=found.media_type, headers={SHA256_HEADER: found.sha256})


NODE_ENDPOINTS: dict[str, Callable[[FastAPI], Callable[..., Any]]] = {
    **DEFAULT_ENDPOINTS,
    "tokenizer_signature": lambda app: app.get("/signature/tokenizer", response_model=TokenizerSignature),
    "tokenizer_file": lambda app: app.get("/signature/tokenizer/files/{name}"),
    "config_signature": lambda app: app.get("/signature/config", response_model=ConfigSignature),
}
