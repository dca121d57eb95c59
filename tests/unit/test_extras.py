"""Installs per role: `pip install 'tidegate[edge]'` pulls only what an edge needs.

The extras are read from the wheel metadata setuptools builds from
pyproject.toml (what pip resolves), following self-references such as
``tidegate[models]``. Separately, a fresh interpreter imports the edge's code
paths and must not load any router or cloud package.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
KERNEL = {"grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf", "pydantic", "pyyaml"}
MODEL_STACK = {"torch", "transformers", "tokenizers", "safetensors", "gguf", "accelerate"}
ROUTER_ONLY = {"redis", "prometheus-client", "starlette", "uvicorn"}
CLOUD_ONLY = {"httpx", "openai"}
TOOLS_ONLY = {"matplotlib", "ruamel-yaml", "pytest", "grpcio-tools"}


@pytest.fixture(scope="module")
def metadata(tmp_path_factory) -> list[Requirement]:
    """Requires-Dist of the wheel built from this pyproject.toml (in a copy, so
    no build files land in the working tree)."""
    src = tmp_path_factory.mktemp("src")
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    out = tmp_path_factory.mktemp("meta")
    code = (
        "import sys; from setuptools import build_meta; "
        "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    dist_info = out / done.stdout.strip().splitlines()[-1]
    message = Parser().parsestr((dist_info / "METADATA").read_text())
    return [Requirement(r) for r in message.get_all("Requires-Dist")]


def closure(requirements: list[Requirement], extras: set[str]) -> set[str]:
    """Every distribution `pip install 'tidegate[extras]'` asks for directly."""
    names: set[str] = set()
    seen: set[str] = set()
    todo = set(extras) | {""}
    while todo:
        extra = todo.pop()
        seen.add(extra)
        for req in requirements:
            if req.marker is not None and not req.marker.evaluate({"extra": extra}):
                continue
            if req.marker is None and extra:
                continue  # base requirements are counted once, under ""
            if canonicalize_name(req.name) == "tidegate":
                todo |= set(req.extras) - seen
            else:
                names.add(canonicalize_name(req.name))
    return names


def test_the_kernel_has_no_role_specific_packages(metadata):
    assert closure(metadata, set()) == KERNEL


def test_the_edge_extra_is_the_kernel_and_the_model_stack_only(metadata):
    edge = closure(metadata, {"edge"})
    assert edge == KERNEL | MODEL_STACK
    assert not edge & (ROUTER_ONLY | CLOUD_ONLY | TOOLS_ONLY)


def test_router_and_openai_cloud_installs_need_no_torch(metadata):
    router = closure(metadata, {"router"})
    assert ROUTER_ONLY <= router and not router & MODEL_STACK
    openai_cloud = closure(metadata, {"cloud-openai"})
    assert "httpx" in openai_cloud and not openai_cloud & (MODEL_STACK | ROUTER_ONLY)
    assert MODEL_STACK | {"httpx"} <= closure(metadata, {"cloud"})


def test_all_still_installs_every_role(metadata):
    everything = closure(metadata, {"all"})
    for role in ("edge", "cloud", "router"):
        assert closure(metadata, {role}) <= everything, role
    torch = next(r for r in metadata if canonicalize_name(r.name) == "torch")
    assert any(s.operator == "<" for s in torch.specifier)  # never an open-ended torch


FORBIDDEN_ON_EDGE = [
    "redis",
    "httpx",
    "prometheus_client",
    "starlette",
    "uvicorn",
    "openai",
    "router",
    "cloud_node",
    "torch",  # only once a model is loaded
]
EDGE_IMPORTS = """
import json, sys
import edge_node.service, edge_node.agent, edge_node.facade, edge_node.settings
from tidegate.cli import build_parser
build_parser().parse_args(["edge", "serve", "--register", "127.0.0.1:50051"])
print(json.dumps(sorted(m for m in sys.argv[1:] if m in sys.modules)))
"""


def test_the_edge_code_paths_import_no_router_or_cloud_package():
    done = subprocess.run(
        [sys.executable, "-c", EDGE_IMPORTS, *FORBIDDEN_ON_EDGE],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_a_role_without_its_extra_says_which_to_install():
    """Simulates a missing package (None in sys.modules makes its import fail)."""
    code = (
        "import sys; sys.modules['redis'] = None; "
        "from tidegate.cli import run; sys.exit(run(['router', 'serve']))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert "needs the Python package 'redis'" in done.stderr
    assert "pip install 'tidegate[router]'" in done.stderr
