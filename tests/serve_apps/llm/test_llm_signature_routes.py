"""The node's signature routes describe exactly the files in its model directory."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import httpx
import pytest
from llm_node_under_test import LLMNode
from transformers import AutoTokenizer

from serve_apps.llm import ConfigSignature, TokenizerSignature


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sha256sum_manifest_digest(directory: Path, names: list[str]) -> str:
    """The combined digest as a shell user computes it: sha256sum | sort | sha256sum."""
    listing = subprocess.run(["sha256sum", *names], cwd=directory, capture_output=True, text=True, check=True)
    manifest = "".join(sorted(listing.stdout.splitlines(keepends=True), key=lambda line: line.split("  ", 1)[1]))
    return hashlib.sha256(manifest.encode()).hexdigest()


@pytest.fixture(scope="module")
def tokenizer_signature(llm_node: LLMNode) -> TokenizerSignature:
    resp = httpx.get(f"{llm_node.url}/signature/tokenizer", timeout=30)
    resp.raise_for_status()
    return TokenizerSignature.model_validate(resp.json())


def test_tokenizer_signature_hashes_the_model_dirs_tokenizer_files(
    llm_node: LLMNode, tokenizer_signature: TokenizerSignature
) -> None:
    names = [f.name for f in tokenizer_signature.files]
    assert tokenizer_signature.model == llm_node.model_id
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(names)
    assert "model.safetensors" not in names and "config.json" not in names
    for f in tokenizer_signature.files:
        path = llm_node.model_dir / f.name
        assert f.sha256 == sha256(path) and f.size == path.stat().st_size
    assert tokenizer_signature.sha256 == sha256sum_manifest_digest(llm_node.model_dir, names)


def test_config_signature_hashes_and_parses_the_config_files(llm_node: LLMNode) -> None:
    resp = httpx.get(f"{llm_node.url}/signature/config", timeout=30)
    resp.raise_for_status()
    signature = ConfigSignature.model_validate(resp.json())
    model_dir = llm_node.model_dir
    assert [f.name for f in signature.files] == ["config.json", "generation_config.json"]
    assert {f.name: f.sha256 for f in signature.files} == {
        "config.json": sha256(model_dir / "config.json"),
        "generation_config.json": sha256(model_dir / "generation_config.json"),
    }
    assert signature.config == json.loads((model_dir / "config.json").read_text())
    assert signature.generation_config == json.loads((model_dir / "generation_config.json").read_text())
    assert signature.sha256 == sha256sum_manifest_digest(model_dir, ["config.json", "generation_config.json"])


def test_tokenizer_files_download_byte_for_byte_and_load_as_the_nodes_tokenizer(
    llm_node: LLMNode, tokenizer_signature: TokenizerSignature, tmp_path: Path
) -> None:
    for f in tokenizer_signature.files:
        resp = httpx.get(f"{llm_node.url}/signature/tokenizer/files/{f.name}", timeout=30)
        resp.raise_for_status()
        assert hashlib.sha256(resp.content).hexdigest() == f.sha256 == resp.headers["x-sha256"]
        (tmp_path / f.name).write_bytes(resp.content)
    fetched = AutoTokenizer.from_pretrained(tmp_path)
    local = AutoTokenizer.from_pretrained(llm_node.model_dir)
    text = "Question: What is the capital of France?\nAnswer: Paris"
    assert fetched.encode(text) == local.encode(text)
    chat = [{"role": "user", "content": "hi"}]
    assert fetched.apply_chat_template(chat, tokenize=False) == local.apply_chat_template(chat, tokenize=False)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "..%2Fconfig.json", "nope.json"])
def test_only_tokenizer_files_can_be_downloaded(llm_node: LLMNode, name: str) -> None:
    resp = httpx.get(f"{llm_node.url}/signature/tokenizer/files/{name}", timeout=30)
    assert resp.status_code == 404
    if name == "model.safetensors":  # reached ModelSignatures: a short, actionable message
        assert resp.json() == {
            "detail": "'model.safetensors' is not a tokenizer file of model 'smollm2'; "
            "GET /signature/tokenizer lists them"
        }
