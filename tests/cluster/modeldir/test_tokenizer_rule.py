"""The registration rule for a node's tokenizer (cluster/modeldir/tokenizers.py): a path is
stored absolute and must hold a tokenizer; a hub id needs the hub (or its cache)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizer_copies import tokenizer_copy

from cluster.core.errors import RegistrationError
from cluster.core.schemas import Node
from cluster.modeldir.tokenizers import registered_node, resolve_tokenizer


def test_a_relative_or_home_path_is_stored_absolute(
    smollm2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tok = tokenizer_copy(smollm2_dir, tmp_path / "cli" / "tok")
    assert resolve_tokenizer("tok", cwd=tmp_path / "cli") == str(tok)
    assert resolve_tokenizer("./cli/tok/", cwd=tmp_path) == str(tok)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_tokenizer("~/cli/tok") == str(tok)
    monkeypatch.chdir(tmp_path / "cli")
    node = Node(node_id="n", url="http://127.0.0.1:9", model="m", tokenizer="tok")
    assert registered_node(node).tokenizer == str(tok)
    bare = node.model_copy(update={"tokenizer": None})
    assert registered_node(bare) is bare  # no tokenizer: nothing to check


def test_a_path_that_is_missing_or_holds_no_tokenizer_is_refused_with_the_reason(
    tmp_path: Path,
) -> None:
    with pytest.raises(RegistrationError, match=r"does not exist.*working directory"):
        resolve_tokenizer("./no-such-dir", cwd=tmp_path)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "config.json").write_text("{}")
    with pytest.raises(RegistrationError, match="holds no tokenizer vocabulary"):
        resolve_tokenizer("weights", cwd=tmp_path)
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(RegistrationError, match="is not a directory"):
        resolve_tokenizer("./file.json", cwd=tmp_path)
    with pytest.raises(RegistrationError, match="remote URI"):
        resolve_tokenizer("s3://bucket/tok", cwd=tmp_path)


def test_a_hub_id_needs_the_hub_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RegistrationError, match=r"hub is switched off \(HF_HUB_OFFLINE=1\)"):
        resolve_tokenizer("nobody/no-such-tokenizer", cwd=tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    assert resolve_tokenizer("nobody/no-such-tokenizer", cwd=tmp_path) == \
        "nobody/no-such-tokenizer"
