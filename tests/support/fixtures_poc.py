"""Fixtures shared by the proof-of-compute tests (cluster, CLI and Serve app)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def torch_settings_restored() -> Iterator[None]:
    """``configure_torch`` changes process-wide torch settings (threads, deterministic
    algorithms): a PoC test module gives the rest of the session them back."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
