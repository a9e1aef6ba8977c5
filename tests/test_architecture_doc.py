"""docs/architecture.md names every module under src/commit_mllm, and only those."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "commit_mllm"
DOC = ROOT / "docs" / "architecture.md"


def _modules_on_disk() -> set[str]:
    return {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")}


def _modules_in_doc() -> set[str]:
    text = DOC.read_text()
    section = text.split("\n## Modules\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([\w/]+\.py)` \|", section, flags=re.M))


def test_every_module_is_on_the_page():
    missing = _modules_on_disk() - _modules_in_doc()
    assert not missing, f"add to docs/architecture.md (## Modules): {sorted(missing)}"


def test_the_page_names_no_module_that_does_not_exist():
    gone = _modules_in_doc() - _modules_on_disk()
    assert not gone, f"docs/architecture.md names modules that do not exist: {sorted(gone)}"


def test_paths_in_the_prose_exist():
    """Module paths named anywhere on the page (``method/balance.py``) are real files."""
    named = set(re.findall(r"`((?:[a-z_]+/)+[a-z_]+\.py)", DOC.read_text()))
    named = {n for n in named if not n.startswith(("tests/", "src/", "benchmarks/"))}
    assert named - _modules_on_disk() == set()
