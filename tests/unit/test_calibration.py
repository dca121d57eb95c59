"""tidegate calibrate: threshold picking, per-rule groups, the YAML edit, the router's check."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from router.domain import Escalation, Tier
from router.guard_settings import RuleSettings
from router.policy import EdgeSignal, RequestFacts, judge_edge
from router.settings import DEFAULT_POLICY_PATH, PolicySettings, load_router_settings
from tidegate.chat import FinishReason
from tidegate.cli import run
from tidegate.evaluation.calibrate import Target, calibrate, replay, route_groups
from tidegate.evaluation.policy_yaml import MARKER, ValueUpdate, apply_updates


def rec(score, edge, cloud, split="calib", tags=(), tenant="", estimator="gain"):
    return {
        "confidence": {estimator: score},
        "edge_correct": edge,
        "cloud_correct": cloud,
        "split": split,
        "tags": list(tags),
        "tenant": tenant,
    }


# Scores 0.1…0.6; the edge is wrong on the three lowest, the cloud right on all but one.
RECORDS = [
    rec(0.1, False, True),
    rec(0.2, False, True),
    rec(0.3, False, False),
    rec(0.4, True, True),
    rec(0.5, True, True),
    rec(0.6, True, True),
]


def test_target_parsing():
    assert Target.parse(0.25, None) == Target(escalation=0.25)
    assert Target.parse(None, "0.6") == Target(accuracy=0.6)
    assert Target.parse(None, "0.95xcloud") == Target(accuracy=0.95, relative_to_cloud=True)
    for escalation, accuracy in [(None, None), (0.2, "0.5"), (1.5, None), (None, "lots")]:
        with pytest.raises(ValueError):
            Target.parse(escalation, accuracy)


def test_target_escalation_picks_the_midpoint_below_the_budget():
    result = calibrate(RECORDS, "gain", Target(escalation=0.34))
    # Escalating the two lowest (1/3) is the most accurate within the budget.
    assert result.threshold == pytest.approx(0.25)
    assert result.escalated == pytest.approx(1 / 3) and result.accuracy == pytest.approx(5 / 6)
    assert (result.edge_accuracy, result.cloud_accuracy) == (0.5, pytest.approx(5 / 6))
    assert result.reached and result.items == 6


def test_target_accuracy_escalates_the_least_that_reaches_it():
    result = calibrate(RECORDS, "gain", Target(accuracy=0.8))
    assert result.threshold == pytest.approx(0.25) and result.escalated == pytest.approx(1 / 3)
    relative = calibrate(RECORDS, "gain", Target(accuracy=1.0, relative_to_cloud=True))
    assert relative.accuracy >= 5 / 6 and relative.escalated == pytest.approx(1 / 3)
    unreachable = calibrate(RECORDS, "gain", Target(accuracy=0.99))
    assert not unreachable.reached and unreachable.accuracy == pytest.approx(5 / 6)


def test_extremes_and_replay():
    assert calibrate(RECORDS, "gain", Target(escalation=0.0)).threshold == 0.0
    everything = calibrate(RECORDS, "gain", Target(escalation=1.0))
    assert everything.escalated <= 1.0
    held = replay(RECORDS, "gain", 0.35)
    assert (held.escalated, held.accuracy, held.items) == (0.5, pytest.approx(5 / 6), 6)
    cloud = sum(r["cloud_correct"] for r in RECORDS) / 6
    assert held.cloud_accuracy == pytest.approx(cloud)
    assert held.of_cloud == pytest.approx((5 / 6) / cloud)
    # the one item both get wrong is escalated: routed equals cloud-only in any resample
    assert held.of_cloud_ci95 == (1.0, 1.0)
    fewer = replay(RECORDS, "gain", 0.15)  # keeps the edge's wrong 0.2 answer
    assert fewer.of_cloud == pytest.approx(4 / 5)
    assert fewer.of_cloud_ci95 is not None
    low, high = fewer.of_cloud_ci95
    assert low < fewer.of_cloud < high  # 6 items: a wide interval
    wrong = [dict(r, edge_correct=False) for r in RECORDS]
    assert replay(wrong, "gain", 0.0).of_cloud == 0.0  # nothing escalated, all kept wrong
    no_cloud = [dict(r, cloud_correct=False) for r in RECORDS]
    assert math.isnan(replay(no_cloud, "gain", 0.35).of_cloud)  # no cloud-only accuracy


def test_what_is_reported_is_what_the_threshold_does():
    # A score of 1 cannot be escalated by any threshold the router accepts (≤ 1).
    top = [rec(s, False, True) for s in (0.1, 0.2, 0.3, 1.0)]  # escalating all is best
    everything = calibrate(top, "gain", Target(escalation=1.0))
    assert everything.threshold == 1.0 and everything.escalated == 0.75
    # …so an accuracy only escalating everything reaches is not reached.
    all_of_cloud = calibrate(top, "gain", Target(accuracy=1.0, relative_to_cloud=True))
    assert all_of_cloud.accuracy == 0.75 and not all_of_cloud.reached
    # Two scores closer than 4 decimals: the exact midpoint, not a rounded one.
    close = [rec(s, s > 0.5, True) for s in (0.10, 0.12341, 0.12344, 0.9)]
    result = calibrate(close, "gain", Target(escalation=0.5))
    assert 0.12341 < result.threshold < 0.12344 and result.escalated == 0.5


def test_the_policy_gets_the_threshold_exactly(tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    close = [rec(s, s > 0.5, True) for s in (0.10, 0.12341, 0.12344, 0.9)]
    (out / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in close))
    (out / "metrics.json").write_text(json.dumps({"run": {"edge_model": "edge@abc/int8"}}))
    policy = tmp_path / "router.yaml"
    policy.write_text("policy:\n  min_confidence: 0.5\n")
    args = ["calibrate", "--data", str(out / "items.jsonl"), "--target-escalation", "0.5"]
    assert run([*args, "--policy", str(policy)]) == 0
    written = load_router_settings(policy).policy.min_confidence
    assert written == calibrate(close, "gain", Target(escalation=0.5)).threshold
    assert f"threshold {written!r} " in capsys.readouterr().out  # printed as written


def test_needs_the_estimator_and_both_tiers():
    with pytest.raises(ValueError, match="'seq_prob' score"):
        calibrate(RECORDS, "seq_prob", Target(escalation=0.2))
    edge_only = [dict(r, cloud_correct=None) for r in RECORDS]
    with pytest.raises(ValueError, match="without --edge-only"):
        calibrate(edge_only, "gain", Target(escalation=0.2))


def test_items_go_to_the_first_rule_that_matches():
    rules = [
        RuleSettings(name="private", tags=["pii"], route="edge_only"),
        RuleSettings(name="math", tags=["arithmetic"], min_confidence=0.9),
        RuleSettings(name="acme", tenants=["acme"], min_confidence=0.2),
        RuleSettings(name="slow", tags=["dates"], deadline_s=5),
    ]
    records = [
        rec(0.1, True, True, tags=["pii", "arithmetic"]),  # pinned: no threshold
        rec(0.2, True, True, tags=["arithmetic"], tenant="acme"),  # math comes first
        rec(0.3, True, True, tenant="acme"),
        rec(0.4, True, True, tags=["dates"]),  # deadline only: the policy's threshold
        rec(0.5, True, True),
    ]
    groups = route_groups(records, rules)
    assert {k: [r["confidence"]["gain"] for r in v] for k, v in groups.items()} == {
        None: [0.4, 0.5],
        1: [0.2],
        2: [0.3],
    }


def test_a_pii_rule_takes_the_items_whose_question_it_finds_pii_in():
    # As the router does: a PII rule that finds nothing is passed over.
    rules = [
        RuleSettings(name="private", pii=True, route="edge_only"),
        RuleSettings(name="math", tags=["arithmetic"], min_confidence=0.9),
    ]
    records = [
        rec(0.1, True, True) | {"question": "Mail jane.doe@example.com the answer."},  # pinned
        rec(0.2, True, True, tags=["arithmetic"]) | {"question": "What is 2 + 2?"},
        rec(0.3, True, True) | {"question": "What is the capital of France?"},
        rec(0.4, True, True),  # written before items recorded their question: no PII seen
    ]
    groups = route_groups(records, rules)
    assert {k: [r["confidence"]["gain"] for r in v] for k, v in groups.items()} == {
        None: [0.3, 0.4],
        1: [0.2],
    }


# ---- the YAML edit ----------------------------------------------------------------------------

POLICY_YAML = """\
# my router
listen: 127.0.0.1:50051   # keep me

policy:
  version: v7                  # a comment on version
  min_confidence: 0.5          # keep the edge answer when confidence >= this
                               # (continued)
  escalate_truncated: true
rules:
  - name: math
    tags: [arithmetic]
    min_confidence: "0.9"
"""


def test_only_the_value_changes_and_comments_stay():
    new = apply_updates(POLICY_YAML, [ValueUpdate(("policy",), "min_confidence", "0.4375")])
    # The trailing comment keeps its column.
    assert new == POLICY_YAML.replace("min_confidence: 0.5    ", "min_confidence: 0.4375 ")
    tight = "policy:\n  min_confidence: 0.5 # c\n"
    assert apply_updates(tight, [ValueUpdate(("policy",), "min_confidence", "0.25")]) == (
        "policy:\n  min_confidence: 0.25 # c\n"
    )


def test_provenance_block_is_written_and_replaced():
    update = ValueUpdate(("policy",), "min_confidence", "0.3", ["first line", "second"])
    once = apply_updates(POLICY_YAML, [update])
    assert f"  {MARKER} first line\n  {MARKER} second\n  min_confidence: 0.3" in once
    twice = apply_updates(once, [ValueUpdate(("policy",), "min_confidence", "0.2", ["newer"])])
    assert "first line" not in twice and f"  {MARKER} newer\n  min_confidence: 0.2" in twice
    assert twice.count(MARKER) == 1


def test_missing_keys_are_inserted_and_rules_are_reached_by_index():
    new = apply_updates(
        POLICY_YAML,
        [
            ValueUpdate(("policy",), "estimator", "combiner"),
            ValueUpdate(("rules", 0), "min_confidence", "0.66"),
        ],
    )
    assert "  estimator: combiner\n  version: v7" in new
    assert "min_confidence: 0.66\n" in new and '"0.9"' not in new
    assert "# a comment on version" in new and "# my router" in new


def test_a_key_inserted_above_a_value_replaced_on_the_same_line():
    # min_confidence is missing (inserted above the first key), estimator is replaced.
    new = apply_updates(
        f"policy:\n  {MARKER} old\n  estimator: gain\nrules: []\n",
        [
            ValueUpdate(("policy",), "min_confidence", "0.4", ["why"]),
            ValueUpdate(("policy",), "estimator", "combiner"),
        ],
    )
    assert new == (
        f"policy:\n  {MARKER} why\n  min_confidence: 0.4\n  {MARKER} old\n"
        "  estimator: combiner\nrules: []\n"
    )


def test_a_file_without_a_policy_section_gets_one():
    new = apply_updates(
        "listen: 127.0.0.1:1\n", [ValueUpdate(("policy",), "min_confidence", "0.1", ["why"])]
    )
    assert new == f"listen: 127.0.0.1:1\npolicy:\n  {MARKER} why\n  min_confidence: 0.1\n"


def test_unusable_shapes_are_errors():
    with pytest.raises(ValueError, match="flow mapping"):
        apply_updates(
            "policy: {min_confidence: 0.5}\n", [ValueUpdate(("policy",), "min_confidence", "0.1")]
        )
    with pytest.raises(ValueError, match="no 'rules.3' section"):
        apply_updates(POLICY_YAML, [ValueUpdate(("rules", 3), "min_confidence", "0.1")])


# ---- the command, end to end on an items file ----------------------------------------------


def _items(tmp_path: Path) -> Path:
    out = tmp_path / "eval"
    out.mkdir()
    records = [dict(r, split="calib") for r in RECORDS] + [dict(r, split="test") for r in RECORDS]
    (out / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "metrics.json").write_text(json.dumps({"run": {"edge_model": "edge@abc/int8"}}))
    return out / "items.jsonl"


def test_calibrate_command_updates_the_default_policy_keeping_the_rest(tmp_path, capsys):
    policy = tmp_path / "router.yaml"
    original = DEFAULT_POLICY_PATH.read_text()
    policy.write_text(original)
    items = _items(tmp_path)
    code = run(
        ["calibrate", "--data", str(items), "--target-escalation", "0.34", "--policy", str(policy)]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "threshold 0.2500" in out and "held out:    6 items" in out
    settings = load_router_settings(policy)
    assert settings.policy.min_confidence == 0.25 and settings.policy.estimator == "gain"
    new = policy.read_text()
    assert "edge@abc/int8" in new and "held out (6 items)" in new
    # Every original line is still there (only min_confidence's value differs).
    changed = [line for line in original.splitlines() if line not in new.splitlines()]
    changed = [line for line in changed if not line.strip().startswith("# calibrated:")]
    assert len(changed) <= 1 and all("min_confidence:" in line for line in changed)


def test_calibrate_command_calibrates_each_rule_on_its_tagged_items(tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    # Untagged items: the RECORDS pattern; "math" items: the edge right only above 0.7.
    math_items = [rec(s / 10, s >= 7, True, tags=["arithmetic"]) for s in range(1, 10)]
    records = [dict(r, split=split) for split in ("calib", "test") for r in RECORDS + math_items]
    (out / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "metrics.json").write_text(json.dumps({"run": {"edge_model": "edge@abc/int8"}}))
    policy = tmp_path / "router.yaml"
    policy.write_text(
        "policy:\n  min_confidence: 0.5\nrules:\n  - name: math  # sums\n"
        "    tags: [arithmetic]\n    min_confidence: 0.1\n"
    )
    code = run(["calibrate", "--data", str(out / "items.jsonl"), "--target-accuracy", "1.0",
                "--policy", str(policy)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    report = capsys.readouterr().out
    assert "rules[math]" in report and "policy.min_confidence" in report
    settings = load_router_settings(policy)
    assert settings.rules[0].min_confidence == pytest.approx(0.65)  # between 0.6 and 0.7
    # The untagged items: 1.0 is out of reach, so the most accurate point (escalate 0.1, 0.2).
    assert settings.policy.min_confidence == pytest.approx(0.25)
    assert "NOT reached" in report
    assert "  - name: math  # sums\n" in policy.read_text()


def test_calibrate_dry_run_and_errors(tmp_path, capsys):
    policy = tmp_path / "router.yaml"
    policy.write_text("policy:\n  min_confidence: 0.5\n")
    items = _items(tmp_path)
    args = ["calibrate", "--data", str(items), "--policy", str(policy)]
    assert run([*args, "--target-escalation", "0.3", "--dry-run"]) == 0
    assert policy.read_text() == "policy:\n  min_confidence: 0.5\n"
    assert run([*args, "--target-escalation", "0.3", "--split", "nope"]) == 2
    assert "no items with split 'nope'" in capsys.readouterr().err
    assert run([*args, "--target-accuracy", "0.5", "--estimator", "seq_prob"]) == 2


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "each line must be a JSON object"),
        ('{"confidence": {"gain": NaN}}', "confidence 'gain' is nan, not a number in [0, 1]"),
        ('{"confidence": {"gain": 1.5}}', "confidence 'gain' is 1.5, not a number in [0, 1]"),
        ('{"confidence": {"gain": "high"}}', "confidence 'gain' is 'high'"),
    ],
)
def test_a_broken_items_file_is_an_error_naming_its_line(tmp_path, capsys, line, says):
    items = _items(tmp_path)
    items.write_text(items.read_text() + line + "\n")
    policy = tmp_path / "router.yaml"
    policy.write_text("policy:\n  min_confidence: 0.5\n")
    args = ["calibrate", "--data", str(items), "--policy", str(policy)]
    assert run([*args, "--target-escalation", "0.3"]) == 2
    lines = len(items.read_text().splitlines())
    assert f"{items}:{lines}: {says}" in capsys.readouterr().err
    assert policy.read_text() == "policy:\n  min_confidence: 0.5\n"


def test_calibrate_can_fit_the_combiner_first(tmp_path, capsys):
    import math
    import random

    from edge_node.combiner import features
    from tidegate.backend import Generation

    rng = random.Random(3)
    out = tmp_path / "eval"
    out.mkdir()
    with (out / "items.jsonl").open("w") as f:
        for i in range(80):
            mean_lp = -rng.random() * 3
            g = Generation("x", [1, 2], [mean_lp, mean_lp], [0.5, 0.5], FinishReason.STOP, 9, "m")
            right = rng.random() < math.exp(mean_lp)
            cloud_right = rng.random() < 0.6
            record = rec(0.5, right, cloud_right, split="calib" if i % 2 else "test")
            f.write(json.dumps(record | {"features": features(g, "q")}) + "\n")
    (out / "metrics.json").write_text(json.dumps({"run": {"edge_model": "edge@abc/int8"}}))
    policy = tmp_path / "router.yaml"
    policy.write_text("policy:\n  min_confidence: 0.5\n")
    weights = tmp_path / "w.json"
    code = run(["calibrate", "--data", str(out / "items.jsonl"), "--fit-combiner",
                "--combiner-file", str(weights), "--target-escalation", "0.3",
                "--policy", str(policy), "--no-pin-estimator"])  # fmt: skip
    assert code == 0
    report = capsys.readouterr().out
    assert "combiner fitted on 40 items" in report and "cloud head (gain) fitted" in report
    assert json.loads(weights.read_text())["model"] == "edge@abc/int8"
    settings = load_router_settings(policy)
    assert settings.policy.estimator is None and settings.policy.min_confidence != 0.5
    assert run(["calibrate", "--data", str(out / "items.jsonl"), "--fit-combiner",
                "--estimator", "seq_prob", "--target-escalation", "0.3",
                "--policy", str(policy)]) == 2  # fmt: skip


# ---- the router refuses a threshold calibrated for another estimator --------------------------


def test_router_escalates_scores_from_another_estimator():
    policy = PolicySettings(min_confidence=0.3, estimator="combiner")
    facts = RequestFacts(prompt_tokens=5, max_new_tokens=16, threshold=0.3)
    other = EdgeSignal(confidence=0.99, estimator="seq_prob", finish_reason=FinishReason.STOP)
    decision = judge_edge(other, facts, policy)
    assert decision.tier is Tier.CLOUD and decision.escalation is Escalation.LOW_CONFIDENCE
    assert "calibrated for 'combiner'" in decision.reason
    same = EdgeSignal(confidence=0.99, estimator="combiner", finish_reason=FinishReason.STOP)
    assert judge_edge(same, facts, policy).tier is Tier.EDGE
    keep_all = RequestFacts(prompt_tokens=5, max_new_tokens=16, threshold=0.0)
    assert judge_edge(other, keep_all, policy).tier is Tier.EDGE  # threshold 0 keeps anything
    assert judge_edge(other, facts, PolicySettings(min_confidence=0.3)).tier is Tier.EDGE


# ---- files the YAML edit used to mangle or crash on -----------------------------------------


def _set(text: str, value: str = "0.25", path: tuple[str | int, ...] = ("policy",)) -> str:
    return apply_updates(text, [ValueUpdate(path, "min_confidence", value, ["why"])])


def test_a_tag_or_unused_anchor_on_the_value_is_kept_and_only_the_number_changes():
    tagged = _set("policy:\n  min_confidence: !!float 0.5 # c\n")
    assert tagged == f"policy:\n  {MARKER} why\n  min_confidence: !!float 0.25 # c\n"
    anchored = _set("policy:\n  min_confidence: &t 0.5\n")
    assert anchored == f"policy:\n  {MARKER} why\n  min_confidence: &t 0.25\n"
    both = _set("policy:\n  min_confidence: &t !!float 0.5\n")
    assert both.endswith("  min_confidence: &t !!float 0.25\n")


def test_an_anchor_other_values_refer_to_is_refused():
    text = (
        "policy:\n  min_confidence: &t 0.5\n"
        "rules:\n  - name: r\n    tags: [x]\n    min_confidence: *t\n"
    )
    with pytest.raises(ValueError, match=r"anchor &t, and \*t refers to it elsewhere"):
        _set(text)
    # The alias itself is just a value: the rule gets a number of its own.
    assert "    min_confidence: 0.25\n" in _set(text, path=("rules", 0))


def test_a_rule_with_min_confidence_from_a_merge_key_gets_its_own():
    text = (
        "rules:\n  - &base\n    name: a\n    tags: [x]\n    min_confidence: 0.6\n"
        "  - <<: *base\n    name: b\n    tags: [y]\n"
    )
    new = _set(text, path=("rules", 1))
    assert new == text.replace(
        "  - <<: *base\n", f"  - <<: *base\n    {MARKER} why\n    min_confidence: 0.25\n"
    )
    assert _set(text, path=("rules", 0)).count("min_confidence: 0.25") == 1  # the anchored one
    with pytest.raises(ValueError, match="add `min_confidence:` to it yourself"):
        _set("rules:\n  - name: b\n    <<: {tags: [y], min_confidence: 0.4}\n", path=("rules", 0))


def test_a_key_is_added_to_the_right_rule_when_its_first_key_follows_the_dash():
    text = "rules:\n  - name: a\n    tags: [x]\n  - name: b\n    tags: [y]\n"
    new = _set(text, path=("rules", 1))
    assert new == (
        f"rules:\n  - name: a\n    tags: [x]\n  - name: b\n    {MARKER} why\n"
        "    min_confidence: 0.25\n    tags: [y]\n"
    )


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('{listen: "127.0.0.1:1"}\n', "flow mapping"),
        ("policy: [\n", "not YAML this tool can edit"),
    ],
)
def test_yaml_the_edit_cannot_handle_is_a_value_error(text, says):
    with pytest.raises(ValueError, match=says):
        _set(text)


def test_a_policy_section_goes_before_the_document_end_marker():
    new = _set("---\nlisten: 127.0.0.1:1\n...\n# end\n")
    policy = f"policy:\n  {MARKER} why\n  min_confidence: 0.25\n"
    assert new == f"---\nlisten: 127.0.0.1:1\n{policy}...\n# end\n"
    assert _set("policy:\n  min_confidence: 0.5\n...\n").endswith("  min_confidence: 0.25\n...\n")


def test_crlf_line_endings_are_kept():
    text = "# r\r\npolicy:\r\n  version: v1  # x\r\n  min_confidence: 0.5\r\n"
    new = apply_updates(
        text,
        [
            ValueUpdate(("policy",), "min_confidence", "0.25", ["why"]),
            ValueUpdate(("policy",), "estimator", "gain"),
        ],
    )
    assert new == (
        f"# r\r\npolicy:\r\n  estimator: gain\r\n  version: v1  # x\r\n  {MARKER} why\r\n"
        "  min_confidence: 0.25\r\n"
    )
    added = _set("listen: 127.0.0.1:1\r\n")
    assert (
        added == f"listen: 127.0.0.1:1\r\npolicy:\r\n  {MARKER} why\r\n  min_confidence: 0.25\r\n"
    )


def _calibrate(tmp_path: Path, policy_text: str | bytes, *extra: str) -> tuple[int, Path]:
    policy = tmp_path / "router.yaml"
    if isinstance(policy_text, str):
        policy_text = policy_text.encode()
    policy.write_bytes(policy_text)
    items = _items(tmp_path)
    code = run(["calibrate", "--data", str(items), "--policy", str(policy),
                "--target-escalation", "0.34", *extra])  # fmt: skip
    return code, policy


def test_calibrate_keeps_a_crlf_policy_crlf(tmp_path, capsys):
    code, policy = _calibrate(tmp_path, b"policy:\r\n  version: v1\r\n  min_confidence: 0.5\r\n")
    assert code == 0, capsys.readouterr().err
    raw = policy.read_bytes()
    assert raw.count(b"\n") == raw.count(b"\r\n") > 3
    assert b"  min_confidence: 0.25\r\n" in raw and b"  estimator: gain\r\n" in raw


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('{listen: "127.0.0.1:1"}\n', "flow mapping"),
        (
            "policy:\n  min_confidence: &t 0.5\n"
            "rules:\n  - name: r\n    tags: [zzz]\n    min_confidence: *t\n",
            "anchor &t",
        ),
    ],
)
def test_calibrate_refuses_a_policy_it_cannot_edit_leaving_it_unchanged(
    tmp_path, capsys, text, says
):
    code, policy = _calibrate(tmp_path, text)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {policy}: ") and says in err
    assert "Traceback" not in err and policy.read_text() == text


def test_calibrate_writes_a_policy_section_before_a_document_end(tmp_path, capsys):
    code, policy = _calibrate(tmp_path, "listen: 127.0.0.1:1\n...\n")
    assert code == 0, capsys.readouterr().err
    assert policy.read_text().endswith("  min_confidence: 0.25\n  estimator: gain\n...\n")
    assert load_router_settings(policy).policy.min_confidence == 0.25


# ---- --data / --items that are not what they should be -------------------------------------


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "--data {path} is a folder, not a file"),
        (b"\n\nnot json\n", "{path}:3: not valid JSON"),
        (b"5\n", "{path}:1: expected a JSON object"),
        (b'{"id": "a"}\n\xff\xfe\n', "{path}:2: not UTF-8 text (byte 0xff)"),
        (b"\xff{}\n", "{path}:1: not UTF-8 text (byte 0xff)"),
    ],
)
def test_calibrate_data_that_is_neither_items_nor_a_data_file(
    tmp_path, capsys, no_models, content, says
):
    data = tmp_path / "data.jsonl"
    if content is None:
        data.mkdir()
    else:
        data.write_bytes(content)
    policy = tmp_path / "router.yaml"
    policy.write_text("policy:\n  min_confidence: 0.5\n")
    code = run(["calibrate", "--data", str(data), "--policy", str(policy),
                "--target-escalation", "0.3"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and f"error: {says.format(path=data)}" in err, err
    assert policy.read_text() == "policy:\n  min_confidence: 0.5\n"


@pytest.mark.parametrize(
    ("metrics", "says"),
    [
        ('{"run": {"edge_model": "m"', "metrics.json:1: not valid JSON"),
        ('{"run": ["m"]}', "metrics.json: expected a JSON object with a 'run' object"),
        ("[1]", "metrics.json: expected a JSON object with a 'run' object"),
    ],
)
def test_fit_combiner_and_calibrate_say_what_is_wrong_with_metrics_json(
    tmp_path, capsys, metrics, says
):
    items = _items(tmp_path)
    (items.parent / "metrics.json").write_text(metrics)
    assert run(["fit-combiner", "--items", str(items), "--out", str(tmp_path / "w.json")]) == 2
    assert f"error: {items.parent / 'metrics.json'}" in capsys.readouterr().err
    policy = tmp_path / "router.yaml"
    policy.write_text("policy:\n  min_confidence: 0.5\n")
    code = run(["calibrate", "--data", str(items), "--policy", str(policy),
                "--target-escalation", "0.3"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and says in err and "Traceback" not in err


def test_fit_combiner_says_the_items_file_is_missing(tmp_path, capsys):
    missing = tmp_path / "nothere" / "items.jsonl"
    assert run(["fit-combiner", "--items", str(missing)]) == 2
    assert f"error: items file {missing} does not exist" in capsys.readouterr().err
    assert run(["fit-combiner", "--items", str(tmp_path)]) == 2
    assert f"error: items file {tmp_path} is a folder, not a file" in capsys.readouterr().err
