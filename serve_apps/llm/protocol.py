"""The LLM app's own wire models: the signature routes' answers. The validator reads the same
answers, so the models live in ``cluster/wire/signatures.py``; this is the app's view."""

from cluster.wire.signatures import ConfigSignature, FileDigest, TokenizerSignature, WireModel

__all__ = ["ConfigSignature", "FileDigest", "TokenizerSignature", "WireModel"]
