"""Streaming organic jobs: a thin Serve app in front of a node's model app
that forwards OpenAI requests and signs a receipt for every answer.

The Serve builder is ``serve_apps.streaming.server:build_streaming_app`` (it imports Ray); the rest
is plain: ``protocol`` (wire), ``serving`` (logic), ``routes`` (FastAPI).
"""

from serve_apps.streaming.config import StreamingDeployment, StreamingJobConfig

__all__ = ["StreamingJobConfig", "StreamingDeployment"]
