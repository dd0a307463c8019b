"""The wheels ``tests/gpu/fetch_wheels.sh`` ships import on the GPU image (issue 23, item 2).

The GPU machine has no registry: ``tests/gpu/smoke.sh`` installs the shipped wheels with ``--no-deps`` ahead of the
image's own packages (``tests/gpu/gpu_image_packages.txt``). Every ``Requires-Dist`` of every shipped wheel (read
from this machine's installed metadata, markers evaluated for the image: CPython 3.12 on x86-64 Linux, extras
ignored) must be met by the wheel set or by the image; a package on the image at a version the project can use is
not shipped over it. No network: the wheel set is the script's ``PACKAGES`` at the versions installed here, as the
script pins them.
"""

import importlib.metadata
import re
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

_GPU = Path(__file__).resolve().parent / "gpu"
_ROOT = _GPU.parent.parent


def _shipped() -> dict[str, str]:
    """The wheel set fetch_wheels.sh would ship: canonical name -> the version installed here."""
    script = (_GPU / "fetch_wheels.sh").read_text()
    match = re.search(r"^PACKAGES=\((.*?)\)", script, re.S | re.M)
    assert match, "fetch_wheels.sh has no PACKAGES=( ... ) list"
    return {canonicalize_name(name): importlib.metadata.version(name) for name in match.group(1).split()}


def _image() -> tuple[Version, dict[str, Version | None]]:
    """The GPU image's interpreter version and packages: canonical name -> version, None where not recorded."""
    packages: dict[str, Version | None] = {}
    for line in (_GPU / "gpu_image_packages.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        packages[canonicalize_name(name.strip())] = Version(version.strip()) if version else None
    python = packages.pop("python")
    assert python is not None
    return python, packages


def _environment(python: Version) -> dict[str, str]:
    env = default_environment()
    env.update(
        python_version=f"{python.major}.{python.minor}",
        python_full_version=str(python),
        implementation_name="cpython",
        platform_python_implementation="CPython",
        sys_platform="linux",
        os_name="posix",
        platform_system="Linux",
        platform_machine="x86_64",
        extra="",
    )
    return env


def _unmet(requirements: list[Requirement], shipped: dict[str, str], image: dict[str, Version | None]) -> list[str]:
    """Why each requirement that neither the wheel set nor the image meets is not met."""
    unmet = []
    for req in requirements:
        name = canonicalize_name(req.name)
        if name in shipped:
            version, where = Version(shipped[name]), "shipped"
        elif name in image:
            version, where = image[name], "on the image"
            if version is None:  # present at a version not recorded: taken as meeting any requirement
                continue
        else:
            unmet.append(f"{req}: absent from the wheels and the image")
            continue
        if not req.specifier.contains(version, prereleases=True):
            unmet.append(f"{req}: {where} at {version}")
    return unmet


def _requires(dist: str, env: dict[str, str]) -> list[Requirement]:
    reqs = [Requirement(text) for text in importlib.metadata.requires(dist) or []]
    return [req for req in reqs if req.marker is None or req.marker.evaluate(env)]


def _project_requirements(env: dict[str, str]) -> list[Requirement]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((_ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(text) for text in project["dependencies"]]
    return [req for req in reqs if req.marker is None or req.marker.evaluate(env)]


def test_every_requirement_of_every_shipped_wheel_is_met_by_the_wheels_or_the_image():
    shipped = _shipped()
    python, image = _image()
    env = _environment(python)
    problems = []
    for dist in shipped:
        requires_python = importlib.metadata.metadata(dist).get("Requires-Python")
        if requires_python and not SpecifierSet(requires_python).contains(python, prereleases=True):
            problems.append(f"{dist}: Requires-Python {requires_python}, the image has {python}")
        problems += [f"{dist} requires {why}" for why in _unmet(_requires(dist, env), shipped, image)]
    assert not problems, "\n".join(problems)


def test_the_project_requirements_hold_for_what_the_wheels_or_the_image_provide():
    # numpy is shipped because the project (megatron-core 0.16) needs numpy<2.5 and the image has 2.5.2. Packages
    # neither ships nor holds (tensorboard, datasets, ...) are not needed by the smoke check and are left out here.
    shipped = _shipped()
    python, image = _image()
    reqs = [r for r in _project_requirements(_environment(python)) if canonicalize_name(r.name) in shipped | image]
    assert not _unmet(reqs, shipped, image)


def test_no_wheel_is_shipped_over_a_usable_version_on_the_image():
    # A shipped wheel goes ahead of the image's copy; where the image's recorded version meets every requirement on
    # it (the project's and every shipped wheel's), the wheel only risks disagreeing with the image's other packages
    # (transformers here against the image's tokenizers and huggingface_hub).
    shipped = _shipped()
    python, image = _image()
    env = _environment(python)
    requirements = _project_requirements(env) + [req for dist in shipped for req in _requires(dist, env)]
    redundant = []
    for name in shipped:
        version = image.get(name)
        if version is None:  # not on the image, or at a version not recorded: shipping it is the safe side
            continue
        on_it = [req for req in requirements if canonicalize_name(req.name) == name]
        if all(req.specifier.contains(version, prereleases=True) for req in on_it):
            redundant.append(f"{name}: the image has {version}, which meets {[str(r) for r in on_it]}")
    assert not redundant, "\n".join(redundant)
