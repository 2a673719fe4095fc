from pathlib import Path

import pytest
from pydantic import ValidationError

from cluster.core.settings import Settings, load_settings


def test_defaults_follow_the_seed_figures() -> None:
    s = Settings()
    assert s.manager.target_samples == 50
    assert s.manager.sample_ttl_s == 5 * 24 * 3600
    assert s.manager.max_in_flight == 24
    assert s.requester.sla.per_output_token_s == 0.336
    assert s.tasks == ["signature", "gsm8k", "openbookqa"]
    assert s.manager.task_dependencies == {"gsm8k": ["signature"], "openbookqa": ["signature"]}


def test_yaml_then_env_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "tb.yaml"
    cfg.write_text("manager:\n  target_samples: 7\nrequester:\n  per_node_concurrency: 3\n")
    s = load_settings(cfg, environ={
        "TESTBENCH_MANAGER__TARGET_SAMPLES": "9",
        "TESTBENCH_MONGO_URL": "mongodb://db:27017",
        "TESTBENCH_POSTGRES_URL": "postgresql://pg/x",
        "TESTBENCH_TASKS": "[gsm8k]",  # not a section path: ignored
        "TESTBENCH_POOLS__SAMPLERS": "4",
        "UNRELATED": "1",
    })
    assert s.manager.target_samples == 9
    assert s.requester.per_node_concurrency == 3
    assert s.stores.mongo_url == "mongodb://db:27017"
    assert s.stores.postgres_url == "postgresql://pg/x"
    assert s.pools.samplers == 4


def test_unknown_keys_are_refused_with_their_name(tmp_path: Path) -> None:
    cfg = tmp_path / "tb.yaml"
    cfg.write_text("manager:\n  target_sample: 7\n")
    with pytest.raises(ValidationError, match="target_sample"):
        load_settings(cfg, environ={})
    with pytest.raises(ValidationError, match="bogus"):
        load_settings(None, environ={"TESTBENCH_MANAGER__BOGUS": "1"})


def test_invalid_values_and_shapes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        load_settings(None, environ={"TESTBENCH_MANAGER__TARGET_SAMPLES": "0"})
    cfg = tmp_path / "list.yaml"
    cfg.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_settings(cfg, environ={})
