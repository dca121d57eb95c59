"""The README is part of the product: its commands and reference must be current."""

import re
from pathlib import Path

from tidegate.config_reference import splice

README = Path(__file__).resolve().parents[2] / "README.md"


def test_config_reference_matches_the_settings_classes() -> None:
    text = README.read_text(encoding="utf-8")
    assert splice(text) == text, "stale: run `python -m tidegate.config_reference --write`"


def test_exactly_two_setup_commands_at_the_top() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert first_block is not None
    commands = [line for line in first_block.group(1).splitlines() if line.strip()]
    assert [c.split("#")[0].strip() for c in commands] == ["make demo", "make test"]


def test_ci_runs_the_readme_test_command() -> None:
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "make test" in ci
