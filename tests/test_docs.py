"""The README and docs/ link only to files that are in the repository."""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def local_links(page: str) -> list[str]:
    with open(page, encoding="utf-8") as f:
        targets = LINK.findall(f.read())
    return [t.split("#", 1)[0] for t in targets
            if not re.match(r"^[a-z]+:", t) and not t.startswith("#")]


@pytest.mark.parametrize("page", PAGES, ids=[os.path.relpath(p, ROOT) for p in PAGES])
def test_every_local_link_and_figure_exists(page):
    missing = [t for t in local_links(page)
               if not os.path.exists(os.path.join(os.path.dirname(page), t))]
    assert not missing, f"{os.path.relpath(page, ROOT)} links to missing files: {missing}"


def test_the_link_check_sees_links():
    assert "docs/transfer.md" in local_links(os.path.join(ROOT, "README.md"))
