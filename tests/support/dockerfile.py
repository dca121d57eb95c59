"""A small Dockerfile reader for tests: stages, their instructions, ARG defaults.

Containers cannot run on the test machines, so the images are checked by
reading the Dockerfile: which stages exist, what each role's stage chain runs,
which user it ends as. Enough of the syntax for our own file: line
continuations, comments, ``FROM image AS name``, ``ARG NAME=default``.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field


@dataclass
class Stage:
    name: str
    base: str  # the FROM argument: an image or an earlier stage's name
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (OP, args)

    def ops(self, op: str) -> list[str]:
        return [args for o, args in self.instructions if o == op]


@dataclass
class Dockerfile:
    global_args: dict[str, str]  # ARGs before the first FROM, with their defaults
    stages: dict[str, Stage]

    def chain(self, target: str) -> list[Stage]:
        """The stages ``target`` is built on, root first, ending with ``target``."""
        stages = []
        name = target
        while name in self.stages:
            stage = self.stages[name]
            stages.append(stage)
            name = stage.base
        return stages[::-1]

    def root_image(self, target: str) -> str:
        base = self.chain(target)[0].base
        return re.sub(r"\$\{(\w+)\}", lambda m: self.global_args.get(m.group(1), ""), base)

    def effective(self, target: str, op: str) -> str | None:
        """The last ``op`` (USER, HEALTHCHECK, CMD, ENTRYPOINT…) in effect for ``target``."""
        found = None
        for stage in self.chain(target):
            for o, args in stage.instructions:
                if o == op:
                    found = args
        return found

    def runs(self, target: str) -> str:
        """Every RUN of the target's chain, joined: what building it executes."""
        return "\n".join(args for stage in self.chain(target) for args in stage.ops("RUN"))

    def copied_sources(self) -> list[str]:
        """Paths COPY takes from the build context (not ``--from`` another stage)."""
        sources = []
        for stage in self.stages.values():
            for args in stage.ops("COPY"):
                words = shlex.split(args)
                if any(w.startswith("--from=") for w in words):
                    continue
                words = [w for w in words if not w.startswith("--")]
                sources.extend(words[:-1])
        return sources


def parse(text: str) -> Dockerfile:
    joined = re.sub(r"\\\n", " ", text)
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        op, _, args = line.partition(" ")
        op, args = op.upper(), " ".join(args.split())
        if op == "FROM":
            words = args.split()
            base = words[0]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else base
            current = stages[name] = Stage(name, base)
        elif current is None:
            if op == "ARG":
                key, _, default = args.partition("=")
                global_args[key] = default
        else:
            current.instructions.append((op, args))
    return Dockerfile(global_args, stages)
