"""The quantized-weight cache: round trip, what invalidates an entry, bad entries."""

from __future__ import annotations

import pytest
import torch

from tests.support.tiny_models import tiny_model_and_tokenizer
from tidegate.config import ModelSettings
from tidegate.inference import quantized_cache
from tidegate.inference.int4 import Int4Linear
from tidegate.inference.prepare import prepare_model


def _folder(root, seed: int = 0, tied: bool = False):
    folder = root / f"tiny-{seed}-{'tied' if tied else 'untied'}"
    model, tokenizer = tiny_model_and_tokenizer(seed=seed, tied=tied)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _logits(model, ids=((5, 6, 7, 8, 9),)):
    with torch.inference_mode():
        return model(input_ids=torch.tensor(ids)).logits.float()


def _settings(folder, cache, quantization="int4"):
    return ModelSettings(
        source=str(folder), quantization=quantization, cache_dir=str(cache), compile="off"
    )


@pytest.mark.parametrize("quantization", ["int4", "int8"])
@pytest.mark.parametrize("tied", [False, True])
def test_a_second_start_reads_the_same_quantized_model_back(tmp_path, quantization, tied):
    folder = _folder(tmp_path, tied=tied)
    first = prepare_model(_settings(folder, tmp_path / "cache", quantization))
    assert not first.from_quantized_cache
    second = prepare_model(_settings(folder, tmp_path / "cache", quantization))
    assert second.from_quantized_cache and second.quantize_seconds == 0.0
    assert second.model_id == first.model_id
    torch.testing.assert_close(_logits(second.model), _logits(first.model), atol=0, rtol=0)
    # the same modules, and a tied lm_head still shares its int8 rows with the embedding
    assert [type(m) for m in second.model.modules()] == [type(m) for m in first.model.modules()]
    if quantization == "int4" and tied:
        embedding = second.model.get_input_embeddings()
        assert embedding.weight_int8.data_ptr() == second.model.lm_head.weight_int8.data_ptr()
    # nothing left on the meta device, every tensor aligned for the AVX-512 kernels
    tensors = [*second.model.parameters(), *second.model.buffers()]
    assert not any(t.is_meta for t in tensors)
    assert all(t.data_ptr() % 64 == 0 for t in tensors if t.numel())
    assert second.model.generation_config.eos_token_id == first.model.generation_config.eos_token_id


def test_entries_are_keyed_by_weights_and_scheme(tmp_path):
    cache = tmp_path / "cache"
    folder = _folder(tmp_path)
    int4 = prepare_model(_settings(folder, cache, "int4"))
    int8 = prepare_model(_settings(folder, cache, "int8"))
    assert not int8.from_quantized_cache  # another scheme: another entry
    assert quantized_cache.entry_dir(cache, int4.model_id, "int4") != quantized_cache.entry_dir(
        cache, int4.model_id, "int8"
    )
    # new weights in the same folder: a new identity, so the old entry is not read
    model, _ = tiny_model_and_tokenizer(seed=1)
    model.save_pretrained(folder)
    changed = prepare_model(_settings(folder, cache, "int4"))
    assert not changed.from_quantized_cache and changed.model_id != int4.model_id
    reference, _ = tiny_model_and_tokenizer(seed=1)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.inference_mode():
        expected = reference(input_ids=ids).logits.argmax(-1)
    assert (_logits(changed.model).argmax(-1) == expected).float().mean() >= 0.8


def test_a_bad_entry_is_made_again(tmp_path, caplog):
    cache = tmp_path / "cache"
    folder = _folder(tmp_path)
    first = prepare_model(_settings(folder, cache))
    entry = quantized_cache.entry_dir(cache, first.model_id, "int4")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(entry / "weights.safetensors"))
    del tensors["model.layers.0.mlp.down_proj.weight_int4"]
    save_file(tensors, str(entry / "weights.safetensors"))
    again = prepare_model(_settings(folder, cache))
    assert not again.from_quantized_cache
    assert "ignoring quantized cache entry" in caplog.text
    assert isinstance(again.model.model.layers[0].mlp.down_proj, Int4Linear)
    torch.testing.assert_close(_logits(again.model), _logits(first.model), atol=0, rtol=0)
    assert prepare_model(_settings(folder, cache)).from_quantized_cache  # the entry was re-made


def test_read_tensors_matches_safetensors_and_aligns_every_tensor(tmp_path):
    """Our reader gives what safetensors gives, each tensor in its own 64-byte-aligned
    buffer (the int8/int4 kernels crash on safetensors' 8-byte alignment)."""
    from safetensors.torch import load_file, save_file

    generator = torch.Generator().manual_seed(0)
    tensors = {
        "odd_bytes": torch.randint(0, 255, (3, 5), dtype=torch.uint8, generator=generator),
        "int8": torch.randint(-128, 127, (7, 3), dtype=torch.int8, generator=generator),
        "int32": torch.randint(0, 16, (4, 4), dtype=torch.int32, generator=generator),
        "bf16": torch.randn(5, 2, 2, generator=generator).to(torch.bfloat16),
        "fp32": torch.randn(9, generator=generator),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "flag": torch.tensor([True, False, True]),
    }
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    expected = load_file(str(path))
    got = quantized_cache.read_tensors(path)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
        assert got[name].numel() == 0 or got[name].data_ptr() % 64 == 0, name
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match="truncated"):
        quantized_cache.read_tensors(path)


def test_caches_are_keyed_by_the_cpu(tmp_path, monkeypatch):
    """The int4 packing differs between AVX-512 (blocks of 64 rows) and AVX2 (32): a cache
    built on one kind of CPU is never read on another (nor its compiled step)."""
    from tidegate.inference import compiled_step

    entry = quantized_cache.entry_dir(tmp_path, "m@x", "int4")
    package = compiled_step.package_path(tmp_path, "m@x", "int4", 2)
    other = "AVX2" if torch.backends.cpu.get_cpu_capability() != "AVX2" else "AVX512"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: other)
    assert quantized_cache.entry_dir(tmp_path, "m@x", "int4") != entry
    assert compiled_step.package_path(tmp_path, "m@x", "int4", 2) != package


def test_a_full_disk_only_costs_the_cache(tmp_path):
    """safetensors reports a failed write as its own SafetensorError, not an OSError:
    the start must still go on (in a child whose files may not grow past 4 KB)."""
    import subprocess
    import sys

    folder = _folder(tmp_path)
    child = f"""
import logging, resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
logging.basicConfig(level=logging.WARNING)
from tidegate.config import ModelSettings
from tidegate.inference.prepare import prepare_model
prepared = prepare_model(ModelSettings(source={str(folder)!r}, quantization="int4",
                                       cache_dir={str(tmp_path / "cache")!r}, compile="off"))
print("served", type(prepared.model).__name__)
"""
    done = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "served" in done.stdout
    assert "could not cache quantized weights" in done.stderr


def test_an_entry_with_another_layout_is_made_again(tmp_path, caplog):
    """Tensors of the right names but another shape (another group size, say) are
    not this model's: the entry is refused and remade, never loaded half-fitting."""
    cache = tmp_path / "cache"
    folder = _folder(tmp_path)
    first = prepare_model(_settings(folder, cache))
    entry = quantized_cache.entry_dir(cache, first.model_id, "int4")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(entry / "weights.safetensors"))
    name = next(n for n in tensors if n.endswith("down_proj.weight_int4"))
    tensors[name] = tensors[name][:, : tensors[name].shape[1] // 2].contiguous()
    save_file(tensors, str(entry / "weights.safetensors"))
    again = prepare_model(_settings(folder, cache))
    assert not again.from_quantized_cache
    assert "in the cache but" in caplog.text
    torch.testing.assert_close(_logits(again.model), _logits(first.model), atol=0, rtol=0)


def test_an_entry_cut_short_is_replaced(tmp_path):
    cache = tmp_path / "cache"
    folder = _folder(tmp_path)
    first = prepare_model(_settings(folder, cache))
    entry = quantized_cache.entry_dir(cache, first.model_id, "int4")
    (entry / "meta.json").unlink()  # the folder is there, its writing was not finished
    assert not prepare_model(_settings(folder, cache)).from_quantized_cache
    assert (entry / "meta.json").is_file()  # written again: the rename could not before
    assert prepare_model(_settings(folder, cache)).from_quantized_cache
