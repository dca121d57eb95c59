"""`tidegate bench edge`: the CLI, the JSON rows, and the llama.cpp row without llama.cpp."""

from __future__ import annotations

import argparse
import sys

import pytest

from tidegate.benchmarks import edge, edge_worker
from tidegate.cli import build_parser

FACTS = {
    "load_avg_start": "0.50 0.40 0.30",
    "load_avg_end": "0.60 0.40 0.30",
    "convert_s": 17.0,
    "long_prompt_tokens": 512,
}


def test_the_cli_has_bench_edge():
    args = build_parser().parse_args(["bench", "edge", "--json", "--only", "default"])
    assert (args.command, args.bench, args.json, args.only) == ("bench", "edge", True, "default")
    assert (args.threads, args.new_tokens, args.long_tokens, args.rounds) == (2, 128, 512, 3)


def test_json_rows_name_the_variant_and_the_three_numbers():
    rows = [
        {"variant": "default", "decode_tps": 170.0, "ttft_s": 0.04, "peak_rss_mb": 700.0},
        {"variant": "llama.cpp", "error": "llama-cpp-python is not installed"},
    ]
    out = edge.json_rows(rows, FACTS)
    assert [r["variant"] for r in out] == ["default", "llama.cpp"]
    assert out[0]["decode_tps"] == 170.0 and out[0]["peak_rss_mb"] == 700.0
    assert out[1]["decode_tps"] is None and "not installed" in out[1]["error"]
    assert all(set(r) >= {"variant", "decode_tps", "ttft_s", "peak_rss_mb"} for r in out)


def test_the_table_gives_ratios_against_llama_cpp_and_keeps_failed_rows():
    rows = [
        {
            "variant": "default",
            "decode_tps": 180.0,
            "ttft_s": 0.04,
            "ttft_long_s": 0.5,
            "peak_rss_mb": 720.0,
            "load_cold_s": 20.0,
            "load_warm_s": 1.8,
            "compile_s": 50.0,
        },
        {"variant": "int8 dynamic + compile", "error": "AttributeError: cannot export"},
        {
            "variant": "llama.cpp",
            "decode_tps": 150.0,
            "ttft_s": 0.1,
            "ttft_long_s": 1.0,
            "peak_rss_mb": 240.0,
            "load_warm_s": 0.1,
            "n_ctx": 8192,
        },
        {
            "variant": "llama.cpp, n_ctx 2048",
            "decode_tps": 151.0,
            "ttft_s": 0.1,
            "ttft_long_s": 1.0,
            "peak_rss_mb": 180.0,
            "n_ctx": 2048,
        },
    ]
    args = argparse.Namespace(model="smollm2-135m", threads=2, new_tokens=128, rounds=3)
    table = edge.render(rows, FACTS, args)
    default_line = next(line for line in table.splitlines() if line.startswith("default"))
    assert "1.20" in default_line and "0.40" in default_line and "3.00" in default_line
    assert "AttributeError: cannot export" in table
    assert "use_extra_bufts=False" in table and "n_ctx 8192" in table  # how llama.cpp ran
    # and memory against the llama.cpp that allocates a shorter context
    assert "peak RSS against llama.cpp with n_ctx 2048: default 4.00" in table


def test_without_llama_cpp_its_row_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp → ImportError
    result = edge_worker._measure_llama_cpp({"model": "smollm2-135m", "threads": 2})
    assert result == {"error": "llama-cpp-python is not installed (pip install -e '.[bench]')"}


def test_per_round_ratios_pair_each_run_with_llama_cpps_in_the_same_round():
    ours = [{"decode_tps": 140.0}, {"error": "worker exit 1"}, {"decode_tps": 150.0}]
    llama = [{"decode_tps": 133.0}, {"decode_tps": 130.0}, {"decode_tps": 160.0}]
    ratios = edge.round_ratios(ours, llama)
    assert [round(r, 3) for r in ratios] == [1.053, 0.938]  # the failed round is left out
    assert edge.round_ratios(ours, []) == []  # no llama.cpp: no ratios


def test_the_table_shows_the_median_per_round_ratio():
    row = {"variant": "default", "decode_tps": 150.0, "ttft_s": 0.04, "ttft_long_s": 0.5,
           "peak_rss_mb": 700.0, "load_warm_s": 1.8, "decode_ratio_median": 1.031}  # fmt: skip
    args = argparse.Namespace(model="smollm2-135m", threads=2, new_tokens=128, rounds=3)
    line = next(x for x in edge.render([row], FACTS, args).splitlines() if x.startswith("default"))
    assert "1.03" in line.split()  # the median of the per-round ratios, 2 places


def test_llama_cpp_loads_without_extra_buffer_types_and_the_default_comes_back():
    # The AMX buffer type segfaults on AMX CPUs, and Llama(...) ignores a
    # use_extra_bufts keyword: the bench switches the default parameters instead.
    llama_cpp = pytest.importorskip("llama_cpp")  # the [bench] extra
    low_level = llama_cpp.llama_cpp
    assert low_level.llama_model_default_params().use_extra_bufts
    with edge_worker._without_extra_buffer_types(llama_cpp):
        assert not low_level.llama_model_default_params().use_extra_bufts
    assert low_level.llama_model_default_params().use_extra_bufts


def test_only_takes_every_variant_name_and_refuses_an_unknown_one():
    names = [v.name for v in edge.VARIANTS if not v.llama_cpp]
    assert all("," not in name for name in names)  # --only splits on commas
    assert edge._wanted_variants(",".join(names)) == set(names)
    assert edge._wanted_variants(None) is None
    with pytest.raises(SystemExit, match=r"unknown variant\(s\) \['int3'\]; known: fp32"):
        edge._wanted_variants("default,int3")
