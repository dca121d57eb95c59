"""EdgeSettings validation and the edge servicer wiring."""

from __future__ import annotations

import pytest

from edge_node.service import build_edge_servicer, serve_edge
from edge_node.settings import EdgeSettings
from tests.support.tiny_models import tiny_backend
from tidegate.config import load_config
from tidegate.errors import ConfigError
from tidegate.server import wait_for_health


def test_defaults():
    settings = EdgeSettings()
    assert settings.listen == "127.0.0.1:50052"
    assert (settings.model.source, settings.model.quantization) == ("smollm2-135m", "int4")
    assert settings.estimator == "gain"  # combiner, then seq_prob, where no weights fit the model
    assert (settings.default_max_new_tokens, settings.max_new_tokens_limit) == (256, 2048)


def test_yaml_and_env(tmp_path):
    path = tmp_path / "edge.yaml"
    path.write_text("estimator: min_prob\nmodel:\n  source: /models/x.gguf\n  threads: 2\n")
    settings = load_config(
        EdgeSettings,
        path,
        env_prefix="TIDEGATE_EDGE",
        environ={"TIDEGATE_EDGE__DEFAULT_MAX_NEW_TOKENS": "64"},
    )
    assert settings.estimator == "min_prob"
    assert settings.model.source == "/models/x.gguf" and settings.model.threads == 2
    assert settings.default_max_new_tokens == 64


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ("estimator: vibes\n", "estimator"),
        ("default_max_new_tokens: 0\n", "default_max_new_tokens"),
        ("default_max_new_tokens: 4096\n", "must not exceed max_new_tokens_limit"),
        ("model:\n  quantization: int3\n", "model.quantization"),
        ("listen: nowhere\n", "listen"),
        ("estimater: seq_prob\n", "estimater"),
    ],
)
def test_invalid_files_name_the_field(tmp_path, yaml_text, field):
    path = tmp_path / "edge.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=field):
        load_config(EdgeSettings, path)


def test_servicer_has_estimator_and_limits():
    settings = EdgeSettings(estimator="quantile_prob", default_max_new_tokens=8)
    servicer = build_edge_servicer(settings, tiny_backend())
    assert servicer.role == "edge"
    assert servicer.estimator.name == "quantile_prob"
    assert servicer.limits.default_max_new_tokens == 8
    assert servicer.limits.max_new_tokens_limit == 2048


async def test_serve_edge_binds_port_zero():
    backend = tiny_backend()
    server = await serve_edge(EdgeSettings(listen="127.0.0.1:0"), backend)
    try:
        assert server.port > 0
        await wait_for_health(server.address, timeout=5)
    finally:
        await server.stop(0)
        await backend.close()


async def test_an_edge_that_cannot_start_closes_the_model_it_loaded(monkeypatch, tmp_path):
    import tidegate.inference

    loaded = []

    def load(model_settings):
        loaded.append(tiny_backend())
        return loaded[-1]

    monkeypatch.setattr(tidegate.inference, "load_backend", load)
    settings = EdgeSettings(
        listen="127.0.0.1:0",
        estimator="combiner",
        estimator_options={"combiner_file": str(tmp_path / "missing.json")},
    )
    with pytest.raises(ConfigError, match="estimator: no combiner weights"):
        await serve_edge(settings)
    assert len(loaded) == 1 and loaded[0]._executor._shutdown  # its workers are gone
