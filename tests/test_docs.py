"""README.md and docs/*.md: every relative link resolves to a file, and every anchor to a
heading of its page (GitHub's anchors); the README stays a newcomer's page."""

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: str) -> set:
    text = FENCE.sub("", open(path, encoding="utf-8").read())
    return {anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def links(path: str):
    text = FENCE.sub("", open(path, encoding="utf-8").read())
    return [m.group(1) for m in LINK.finditer(text)]


def test_anchor_is_githubs():
    assert anchor("Knowledge distillation and multi-stage training, measured") == (
        "knowledge-distillation-and-multi-stage-training-measured"
    )
    assert anchor("Estimators (`--quantizer`)") == "estimators---quantizer"
    assert anchor("The 1-bit Wide ResNet's recipe") == "the-1-bit-wide-resnets-recipe"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        file, _, fragment = target.partition("#")
        path = os.path.normpath(os.path.join(os.path.dirname(page), file)) if file else page
        if not os.path.exists(path):
            broken.append(f"{target}: no file {os.path.relpath(path, ROOT)}")
        elif fragment and fragment not in anchors(path):
            broken.append(f"{target}: no heading with anchor #{fragment}")
    assert not broken, broken


def test_link_check_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [bad](#nothing) [gone](missing.md)\n")
    assert links(str(page)) == ["#title", "#nothing", "missing.md"]
    assert anchors(str(page)) == {"title"}


def test_readme_is_a_newcomers_page_and_links_every_doc():
    readme = open(PAGES[0], encoding="utf-8").read()
    assert len(readme.splitlines()) <= 300
    linked = {os.path.normpath(os.path.join(ROOT, t.partition("#")[0])) for t in links(PAGES[0])}
    assert set(PAGES[1:]) - {os.path.join(ROOT, "docs", "README.md")} <= linked
