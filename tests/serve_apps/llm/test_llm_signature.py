"""ModelSignatures (no Ray): which files count, the combined-digest rule, typed errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.modeldir.signatures import combined_sha256, digest_files
from cluster.modeldir.sources import SourceKind, resolve_local, source_kind
from serve_apps.llm import ModelSignatures, SignatureError, UnknownSignatureFile


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 3}))
    (d / "tokenizer.json").write_text('{"version": "1.0"}')
    (d / "tokenizer_config.json").write_text('{"model_max_length": 8}')
    (d / "chat_template.jinja").write_text("{{ messages }}")
    (d / "model.safetensors").write_bytes(b"\0" * 16)
    return d


def test_tokenizer_signature_covers_tokenizer_files_only(model_dir: Path) -> None:
    sig = ModelSignatures("m", str(model_dir)).tokenizer()
    assert [f.name for f in sig.files] == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    assert sig.files[1].sha256 == hashlib.sha256(b'{"version": "1.0"}').hexdigest()
    assert sig.model == "m"


def test_combined_digest_is_the_sha256_of_the_sha256sum_manifest(model_dir: Path) -> None:
    files = digest_files(model_dir, ["tokenizer.json", "chat_template.jinja"])
    manifest = "".join(f"{f.sha256}  {f.name}\n" for f in sorted(files, key=lambda f: f.name))
    assert combined_sha256(files) == hashlib.sha256(manifest.encode()).hexdigest()
    assert combined_sha256(reversed(files)) == combined_sha256(files)


def test_any_tokenizer_byte_change_changes_the_signature(model_dir: Path) -> None:
    signatures = ModelSignatures("m", str(model_dir))
    before = signatures.tokenizer().sha256
    (model_dir / "chat_template.jinja").write_text("{{ messages }} ")
    assert signatures.tokenizer().sha256 != before


def test_config_signature_without_generation_config(model_dir: Path) -> None:
    sig = ModelSignatures("m", str(model_dir)).config()
    assert [f.name for f in sig.files] == ["config.json"]
    assert sig.config == {"model_type": "llama", "vocab_size": 3} and sig.generation_config is None


def test_tokenizer_file_serves_listed_files_and_refuses_others(model_dir: Path) -> None:
    signatures = ModelSignatures("m", str(model_dir))
    found = signatures.tokenizer_file("tokenizer.json")
    assert found.content == b'{"version": "1.0"}' and found.media_type == "application/json"
    for name in ["model.safetensors", "config.json", "../model/tokenizer.json", "vocab.json"]:
        with pytest.raises(UnknownSignatureFile, match="GET /signature/tokenizer"):
            signatures.tokenizer_file(name)


def test_missing_or_incomplete_model_dirs_are_typed_errors(tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(SignatureError, match="does not exist"):
        ModelSignatures("m", str(tmp_path / "absent"))
    with pytest.raises(SignatureError, match="remote URI"):
        ModelSignatures("m", "s3://bucket/model")
    (model_dir / "config.json").unlink()
    with pytest.raises(SignatureError, match="config.json"):
        ModelSignatures("m", str(model_dir))


@pytest.mark.parametrize(
    ("source", "kind"),
    [
        ("/abs/model", SourceKind.LOCAL),
        ("./.cache/models/smollm2", SourceKind.LOCAL),
        (".cache/models/smollm2", SourceKind.LOCAL),
        ("~/models/x", SourceKind.LOCAL),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", SourceKind.HUB),
        ("s3://bucket/models/x", SourceKind.REMOTE),
        ("pvc://volume/x", SourceKind.REMOTE),
    ],
)
def test_model_source_kinds(source: str, kind: SourceKind) -> None:
    assert source_kind(source) is kind


def test_relative_local_sources_resolve_against_the_working_directory(tmp_path: Path) -> None:
    assert resolve_local("./.cache/models/smollm2", cwd=tmp_path) == tmp_path / ".cache/models/smollm2"


def test_the_signature_replica_imports_neither_ray_nor_vllm() -> None:
    # The ModelSignatures replica starts beside vLLM; Ray Serve LLM's imports would cost it
    # tens of seconds of CPU there (see serve_apps/llm/__init__.py).
    code = (
        "import sys, cluster.modeldir.signatures; "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'vllm', 'torch')); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[3])


def test_the_public_names_resolve() -> None:
    import serve_apps.llm as package

    assert all(getattr(package, name) for name in package.__all__)
    with pytest.raises(AttributeError):
        package.not_a_name  # noqa: B018
