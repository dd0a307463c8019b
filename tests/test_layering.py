"""The house rules a newcomer relies on (docs/design.md §3): rooms of a readable size, design references that
resolve, and a library that never runs or imports the recipes. The import direction itself is checked by
import-linter (`lint-imports`, contracts in pyproject.toml), which CI runs beside pytest."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "nemo_logitavg"
MAX_MODULE_LINES = 700
MAX_LOOP_LINES = 400


def _lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def test_no_library_module_is_a_house_of_its_own():
    long = {str(p.relative_to(ROOT)): _lines(p) for p in LIBRARY.rglob("*.py") if _lines(p) > MAX_MODULE_LINES}
    assert not long, f"library modules above {MAX_MODULE_LINES} lines: {long}"
    assert _lines(LIBRARY / "trainer" / "loop.py") < MAX_LOOP_LINES, "the GRPO loop must read in one sitting"


def test_every_design_reference_points_at_a_file_that_exists():
    """Code, tests, scripts and configs cite `docs/design.md §N`; the file exists and has every cited section."""
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"^#+ *(?:§)?(\d+[a-z]?)\b", design, flags=re.M))
    files = [p for p in ROOT.rglob("*") if p.is_file() and p.suffix in {".py", ".sh", ".yaml", ".toml", ".md", ""}
             and not any(part.startswith(".") or part in {"runs", "build"} for part in p.relative_to(ROOT).parts)]
    stale, missing = [], []  # BENCHMARKS.md keeps its history as written
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        rel = str(path.relative_to(ROOT))
        if rel not in {"BENCHMARKS.md", "tests/test_layering.py"} and re.search(r"\bDESIGN(\.md)?\b", text):
            stale.append(rel)
        for cited in re.findall(r"docs/design\.md[^\n§]{0,3}§ ?(\d+[a-z]?)", text):
            if cited not in sections:
                missing.append(f"{rel}: §{cited}")
    assert not stale, f"references to a design file outside the repository: {stale}"
    assert not missing, f"cited sections absent from docs/design.md (it has {sorted(sections)}): {missing}"


def test_the_library_never_runs_a_recipe_by_path():
    """The installed package ships no recipes/: nothing in it may build a path into that folder (the job runs
    `python -m nemo_logitavg.trainer.main`); prose may name a recipe for the reader."""
    offenders = []
    for path in LIBRARY.rglob("*.py"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"""(["'])recipes\1|["']recipes/[\w.]+\.py["']""", code):
                offenders.append(f"{path.relative_to(ROOT)}:{number}")
    assert not offenders, f"the library refers to recipes/ as a path: {offenders}"
