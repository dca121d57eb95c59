"""`tidegate eval` → `fit-combiner` → `calibrate`, end to end with tiny models saved as folders.

The edge and cloud "models" are random tiny Llamas on disk, loaded by the same
code path as real ones (``model.source`` = a folder). Their answers are noise,
so the labelled items are made from a first edge-only pass: half of them accept
what the edge actually said (right), half accept nothing it could say (wrong).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from router.settings import DEFAULT_POLICY_PATH, load_router_settings
from tests.support.tiny_models import tiny_model_and_tokenizer
from tidegate.cli import run
from tidegate.evaluation.dataset import load_items
from tidegate.evaluation.scoring import is_correct

QUESTIONS = [
    "What is the capital of France?",
    "What is 2 + 2?",
    "Name a colour.",
    "Which is larger, 3 or 4?",
    "Hello, how are you?",
    "What is the quick brown fox?",
    "Say a number.",
    "Write add(a, b).",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    for role, seed in (("edge", 0), ("cloud", 1)):
        folder = root / f"{role}-model"
        model, tokenizer = tiny_model_and_tokenizer(seed)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (root / f"{role}.yaml").write_text(
            f"model:\n  source: {folder}\n  quantization: none\n  cache_dir: {root / 'conv'}\n"
        )
    (root / "edge.yaml").write_text(
        (root / "edge.yaml").read_text() + "estimator_options:\n  consistency_samples: 2\n"
    )
    probe = root / "probe.jsonl"
    probe.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "question": q, "answers": ["zzz-never"]}) + "\n"
            for i, q in enumerate(QUESTIONS)
        )
    )
    assert run(["eval", *common(root), "--data", str(probe), "--out", str(root / "probe")]) == 0
    probed = list(map(json.loads, (root / "probe/items.jsonl").open()))
    said = {r["id"]: r["edge_text"] for r in probed}
    cloud_said = {r["id"]: r["cloud_text"] for r in probed}
    with (root / "data.jsonl").open("w") as f:
        for i, question in enumerate(QUESTIONS):
            answers = ["zzz-never"]  # the edge is right on even items, the cloud on every third
            if i % 2 == 0 and said[f"q{i}"].strip():
                answers.append(said[f"q{i}"].strip())
            if i % 3 == 0 and cloud_said[f"q{i}"].strip():
                answers.append(cloud_said[f"q{i}"].strip())
            f.write(
                json.dumps(
                    {
                        "id": f"q{i}",
                        "question": question,
                        "answers": answers,
                        "split": "calib" if i < 6 else "test",
                        "category": "even" if i % 2 == 0 else "odd",
                        "extra": "ignored",
                    }
                )
                + "\n"
            )
    return root


def common(root: Path) -> list[str]:
    return [
        "--edge-config", str(root / "edge.yaml"),
        "--cloud-config", str(root / "cloud.yaml"),
        "--cache-dir", str(root / "cache"),
        "--max-new-tokens", "6",
        "--no-progress",
    ]  # fmt: skip


def test_eval_as_a_user_runs_it(workdir):
    out = workdir / "run1"
    proc = subprocess.run(
        [sys.executable, "-m", "tidegate", "eval", *common(workdir),
         "--data", str(workdir / "data.jsonl"), "--out", str(out), "--limit", "6",
         "--estimators", "seq_prob,min_prob,self_verify,consistency"],
        capture_output=True, text=True, timeout=300, env={**os.environ},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "seq_prob" in proc.stdout and "cloud-only" in proc.stdout and "AUROC" in proc.stdout
    records = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(records) == 6  # --limit
    items = {i.id: i for i in load_items(workdir / "data.jsonl")}
    for r in records:
        assert set(r["confidence"]) == {"seq_prob", "min_prob", "self_verify", "consistency"}
        assert all(0.0 <= s <= 1.0 for s in r["confidence"].values())
        assert r["edge_correct"] == is_correct(items[r["id"]], r["edge_text"])
        assert r["cloud_correct"] == is_correct(items[r["id"]], r["cloud_text"])
        assert r["latency_ms"]["edge"] > 0 and r["latency_ms"]["cloud"] > 0
        assert "extra" not in r and r["tags"] == [items[r["id"]].category]
    assert [r["edge_correct"] for r in records] == [True, False] * 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["edge_accuracy"] == 0.5 and metrics["items"] == 6
    assert metrics["estimators"]["consistency"]["extra_cost"] == "2 extra generations"
    for name in ("seq_prob", "min_prob", "self_verify", "consistency"):
        entry = metrics["estimators"][name]
        assert 0.0 <= entry["auroc"] <= 1.0 and entry["ece"] is not None
        assert metrics["routing"][name][0]["escalated"] == 0.0
        assert metrics["routing"][name][-1]["escalated"] == 1.0
    assert metrics["run"]["edge_model"].endswith("/none")
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_comes_from_the_cache_and_edge_only_skips_the_cloud(workdir, capsys):
    args = ["eval", *common(workdir), "--data", str(workdir / "data.jsonl")]
    assert run([*args, "--out", str(workdir / "run2"), "--limit", "6"]) == 0
    metrics = json.loads((workdir / "run2/metrics.json").read_text())
    # The edge answers (and the cloud's) of run1 are reused: nothing is generated again.
    assert metrics["run"]["cache"]["edge_hits"] >= 6 and metrics["run"]["cache"]["cloud_hits"] == 6
    assert run([*args, "--out", str(workdir / "edge"), "--edge-only", "--split", "test"]) == 0
    records = [json.loads(x) for x in (workdir / "edge/items.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["cloud_text"] is None for r in records)
    assert not (workdir / "edge/curve.png").exists()


def test_bad_data_fails_naming_the_line(workdir, capsys):
    bad = workdir / "bad.jsonl"
    bad.write_text('{"id": "a", "question": "q", "answers": ["x"]}\n{"id": "b", "question": "q"}\n')
    code = run(["eval", *common(workdir), "--data", str(bad), "--out", str(workdir / "bad")])
    assert code == 2
    assert f"{bad}:2: 'answers' must be a non-empty list" in capsys.readouterr().err


def test_fit_combiner_then_calibrate_a_policy(workdir, capsys):
    args = ["eval", *common(workdir), "--data", str(workdir / "data.jsonl")]
    assert run([*args, "--out", str(workdir / "all")]) == 0
    weights = workdir / "weights.json"
    items = workdir / "all/items.jsonl"
    assert run(["fit-combiner", "--items", str(items), "--out", str(weights)]) == 0
    fitted = json.loads(weights.read_text())
    assert fitted["model"].startswith("edge-model@") and fitted["provenance"]["n"] == 6
    # a probe on each hidden state the items recorded; the penalty cross-validated
    assert list(fitted["probes"]) == ["prompt_state", "answer_state"]
    assert fitted["provenance"]["probes"] == ["prompt_state", "answer_state"]
    assert fitted["provenance"]["l2"] > 0
    cloud_head = json.loads(
        (workdir / "weights.cloud.json").read_text()
    )  # the items have cloud answers
    assert cloud_head["model"] == fitted["model"] and cloud_head["predicts"].startswith(
        "cloud-model@"
    )
    # The combiner and the gain score the next evaluation.
    edge_yaml = workdir / "edge-combiner.yaml"
    edge_yaml.write_text((workdir / "edge.yaml").read_text() + f"  combiner_file: {weights}\n")
    assert run([*args, "--out", str(workdir / "with"), "--edge-config", str(edge_yaml),
                "--estimators", "gain,combiner,seq_prob"]) == 0  # fmt: skip
    metrics = json.loads((workdir / "with/metrics.json").read_text())
    assert metrics["estimators"]["combiner"]["ece"] is not None
    assert metrics["estimators"]["gain"]["auroc"] is not None
    capsys.readouterr()
    policy = workdir / "router.yaml"
    policy.write_text(DEFAULT_POLICY_PATH.read_text())
    code = run(["calibrate", "--data", str(workdir / "with/items.jsonl"),
                "--target-escalation", "0.5", "--policy", str(policy)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    report = capsys.readouterr().out
    assert "policy.min_confidence" in report and "held out:" in report
    settings = load_router_settings(policy)
    assert settings.policy.estimator == "gain"  # the default when the policy names none
    assert f"gain on edge model {fitted['model']}" in policy.read_text()


def test_calibrate_on_a_data_file_scores_with_the_weights_it_just_fitted(
    workdir, capsys, monkeypatch
):
    from edge_node.combiner import load_weights

    monkeypatch.setenv("TIDEGATE_EVAL_CACHE_DIR", str(workdir / "cache"))
    weights = workdir / "fresh.json"  # not the file the edge config names (none: the default)
    policy = workdir / "fresh-router.yaml"
    policy.write_text(DEFAULT_POLICY_PATH.read_text())
    out = workdir / "calibrated"
    code = run(["calibrate", "--data", str(workdir / "data.jsonl"), "--fit-combiner",
                "--combiner-file", str(weights), "--edge-config", str(workdir / "edge.yaml"),
                "--cloud-config", str(workdir / "cloud.yaml"), "--out", str(out),
                "--target-escalation", "0.5", "--policy", str(policy)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    head = load_weights(weights, json.loads(weights.read_text())["model"])
    records = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
    scored = [r for r in records if r.get("features")]
    assert len(scored) == len(QUESTIONS)
    for r in scored:  # the items (and the threshold) are scored by the weights just written
        assert r["confidence"]["combiner"] == pytest.approx(head.probability(r["features"], r))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["estimators"]["combiner"]["ece"] is not None


# ---- errors that come before any model loads ------------------------------------------------


ONE_ITEM = b'{"id": "a", "question": "q", "answers": ["x"], "split": "calib"}\n'


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "data file {path} is a folder, not a file"),
        (ONE_ITEM + b'{"id": "b", "question": "\xff"}\n', "{path}:2: not UTF-8 text (byte 0xff)"),
        (b"\n  \n\n", "data file {path} has no items (it is empty or only blank lines)"),
        (b"", "data file {path} has no items"),
    ],
)
def test_unusable_data_files_are_errors_naming_them(tmp_path, capsys, no_models, content, says):
    data = tmp_path / "data.jsonl"
    if content is None:
        data.mkdir()
    else:
        data.write_bytes(content)
    code = run(["eval", "--data", str(data), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"error: {says.format(path=data)}" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--out", "{tmp}/afile"], "--out {tmp}/afile is a file, not a folder"),
        (["--out", "{tmp}/afile/sub"], "--out {tmp}/afile/sub: cannot create the folder"),
        (["--estimators", "seq_prob,bogus"], "unknown confidence estimator 'bogus'; choose from"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, not 0"),
        (["--max-new-tokens", "-1"], "--max-new-tokens must be at least 1, not -1"),
        (["--limit", "0"], "--limit must be at least 1, not 0"),
        (["--sample", "0"], "--sample must be at least 1, not 0"),
    ],
)
def test_bad_options_are_usage_errors_before_anything_runs(
    tmp_path, capsys, no_models, options, says
):
    data = tmp_path / "data.jsonl"
    data.write_bytes(ONE_ITEM)
    (tmp_path / "afile").write_text("keep me")
    options = [o.format(tmp=tmp_path) for o in options]
    if "--out" not in options:
        options += ["--out", str(tmp_path / "out")]
    code = run(["eval", "--data", str(data), "--no-progress", *options])
    err = capsys.readouterr().err
    assert code == 2 and f"error: {says.format(tmp=tmp_path)}" in err, err
    assert (tmp_path / "afile").read_text() == "keep me"
