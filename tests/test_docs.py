"""The documentation's shape: a README a newcomer reads, everything else in docs/."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("model.md", "backends.md", "serving.md", "cluster.md", "measurements.md")
README_MAX_LINES = 200


def test_readme_is_short_and_links_every_doc():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    for name in DOCS:
        assert (ROOT / "docs" / name).is_file(), name
        assert f"docs/{name}" in readme, name


def test_every_relative_link_in_the_docs_points_at_a_file():
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#]+?)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name}: {target}"


def test_measurements_are_dated_and_name_their_cpu():
    text = (ROOT / "docs" / "measurements.md").read_text()
    assert re.search(r"20\d\d-\d\d-\d\d", text) and "Zen 3" in text and "Zen 4" in text
