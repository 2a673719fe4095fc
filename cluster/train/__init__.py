"""Training on MLNodes: DiLoCo over Ray Train workers, with a signed outer sync between nodes.

Plain classes and functions (no Ray): the run's config (``config``), data snapshot and
packing (``data``), the outer step (``diloco``), the checkpoint format (``checkpoint``), the
model export (``export``), the peer exchange (``exchange``; the message format and its
signature are ``cluster/auth/sync_messages.py``), one worker's loop (``loop``) and the
node's coordinator of a run (``coordinator``). The Ray Train wiring is
``serve_apps/poc/training.py``.
"""
