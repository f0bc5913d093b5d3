"""The documentation site (`make docs`, tools/build_docs.py): it builds, every notebook in nbs/ has its page in the
sidebar, every local link and anchor resolves, nbdev's links to names land on their `show_doc` entries, and the
tutorials show their outputs.

Building runs the index and the tutorials and processes every notebook (minutes), so those tests are `slow`; .ci/run
runs them after `make test`. The link checker itself is tested on small hand-made sites, fast, so that it is shown to
find what it must find.
"""
import html
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
_spec = importlib.util.spec_from_file_location("build_docs", ROOT / "tools" / "build_docs.py")
bd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bd)


def _page_of(nb: Path) -> str:
    "Where nbdev puts a notebook's page, written out here: its folder, the name less a number prefix, .html."
    rel = nb.relative_to(NBS)
    name = re.sub(r"^\d+[a-zA-Z0-9]*_", "", rel.stem.lower()) + ".html"
    return str(rel.parent / name).removeprefix("./")


def _notebooks():
    "The notebooks nbdev documents: every .ipynb under nbs/, less folders and files that start with _ or ."
    return sorted(p for p in NBS.rglob("*.ipynb")
                  if not any(part.startswith(("_", ".")) for part in p.relative_to(NBS).parts))


def _title(nb: Path) -> str:
    import json
    for c in json.loads(nb.read_text())["cells"]:
        src = "".join(c["source"])
        if c["cell_type"] == "markdown" and (m := re.match(r"#\s+(.+)", src)):
            return m[1].strip()
    return ""


# ------------------------------------------------------------------------------------------ fast: the pieces

def _site(tmp_path, pages: dict[str, str]) -> Path:
    for name, body in pages.items():
        f = tmp_path / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(f"<html><body>{body}</body></html>")
    return tmp_path


def test_check_site_passes_good_links(tmp_path):
    site = _site(tmp_path, {
        "index.html": '<h2 id="a">A</h2><a href="#a">here</a> <a href="sub/b.html#b">b</a> <img src="p.png">'
                      ' <a href="https://example.org/x.html#y">away</a> <img src="data:image/png;base64,AAAA">',
        "sub/b.html": '<h3 id="b">B</h3><a href="../index.html">home</a> <a name="old"></a><a href="#old">old</a>',
    })
    (site / "p.png").write_bytes(b"\x89PNG")
    assert bd.check_site(site) == []


def test_check_site_finds_each_broken_link(tmp_path):
    site = _site(tmp_path, {
        "index.html": '<a href="#nowhere">1</a> <a href="b.html#missing">2</a> <a href="gone.html">3</a>'
                      ' <img src="gone.png"> <a href="../outside.html">5</a> <a href="/b.html">6</a>'
                      ' <a href="file:///tmp/b.html">7</a> <a href="b.html#here">fine</a>',
        "b.html": '<p id="here">B</p>',
    })
    problems = bd.check_site(site)
    assert len(problems) == 7, problems
    for url in ("#nowhere", "b.html#missing", "gone.html", "gone.png", "../outside.html", "/b.html", "file:///tmp"):
        assert any(url in p for p in problems), (url, problems)


def test_pandoc_ids():
    "Pandoc's rules, which Quarto's pages and nbdev's links to names follow (the examples of Pandoc's manual)."
    assert bd.pandoc_id("Heading identifiers in HTML") == "heading-identifiers-in-html"
    assert bd.pandoc_id("Maître d'hôtel") == "maître-dhôtel"
    assert bd.pandoc_id("*Dogs*?--in *my* house?") == "dogs--in-my-house"
    assert bd.pandoc_id("[HTML], [S5], or [RTF]?") == "html-s5-or-rtf"
    assert bd.pandoc_id("3. Applications") == "applications"
    assert bd.pandoc_id("33") == "section"
    assert bd.pandoc_id("Attention.forward") == "attention.forward"          # as _modidx.py links show_doc's entries


def test_relink():
    pages = {"01_norms.ipynb": "norms.html", "tutorials/01_build_tinyllama.ipynb": "tutorials/build_tinyllama.html"}
    assert bd._relink("tutorials/01_build_tinyllama.ipynb", "", pages) == "tutorials/build_tinyllama.html"
    assert bd._relink("../01_norms.ipynb#rmsnorm", "tutorials", pages) == "../norms.html#rmsnorm"
    assert bd._relink("/norms.html#rmsnorm", "tutorials", pages) == "../norms.html#rmsnorm"      # nbdev's root links
    assert bd._relink("https://arxiv.org/abs/1910.07467", "tutorials", pages) == "https://arxiv.org/abs/1910.07467"
    assert bd._relink("#local", "tutorials", pages) == "#local"
    assert bd._relink("99_missing.ipynb", "", pages) is None


def test_directives_and_asis_outputs():
    "Quarto's `#|` directives that nbdev leaves in the cells: echo, output: asis (show_doc's), include."
    cell = lambda src, outs=(): {"cell_type": "code", "source": src, "outputs": list(outs), "metadata": {}}
    md_out = {"output_type": "execute_result", "data": {"text/markdown": "### RMSNorm\n\n*doc*", "text/plain": "x"}}
    nb = {"cells": [cell("#| echo: false\n#| output: asis\nshow_doc(RMSNorm)", [md_out]),
                    cell("#| include: false\nsecret = 1"),
                    cell("x = 2\nx", [{"output_type": "execute_result", "data": {"text/plain": "2"}}])]}
    body = bd.render_body(nb, git_url="")
    assert "<h3" in body and "show_doc" not in body and "secret" not in body
    assert body.count('class="cell"') == 1 and '<pre class="output result">2</pre>' in body


# ------------------------------------------------------------------------------------------ slow: the site

@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "tools/build_docs.py", "--no-quarto", "--out", str(tmp / "_docs"),
                        "--proc", str(tmp / "_proc")], cwd=ROOT, capture_output=True, text=True, timeout=3000)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return tmp / "_docs"


@pytest.mark.slow
def test_every_notebook_has_its_page_in_the_sidebar(site):
    nbs = _notebooks()
    assert len(nbs) > 30 and any(p.parent.name == "tutorials" for p in nbs)
    sidebar = (site / "index.html").read_text().split('<nav class="sidebar">')[1].split("</nav>")[0]
    for nb in nbs:
        page = site / _page_of(nb)
        assert page.is_file(), f"{nb.relative_to(ROOT)} has no page {_page_of(nb)}"
        text = page.read_text()
        if title := _title(nb):
            assert f'<h1 class="title">{html.escape(title)}</h1>' in text, (nb, title)
        assert f'href="{_page_of(nb)}"' in sidebar, f"{_page_of(nb)} is not in the sidebar"


@pytest.mark.slow
def test_every_local_link_resolves(site):
    assert bd.check_site(site) == []
    links = sum(len(re.findall(r'href="(?!https?:)', p.read_text())) for p in site.rglob("*.html"))
    assert links > 500                           # the check read the pages' links, not an empty site


@pytest.mark.slow
def test_a_broken_link_in_a_copy_is_found(site, tmp_path):
    copy = tmp_path / "docs"
    shutil.copytree(site, copy)
    page = copy / "norms.html"
    page.write_text(page.read_text().replace('href="model.html#', 'href="model.html#no-such-', 1))
    problems = bd.check_site(copy)
    assert len(problems) == 1 and "norms.html" in problems[0] and "no-such-" in problems[0], problems


@pytest.mark.slow
def test_links_to_names_land_on_their_entries(site):
    "nbdev's index of names (smollm/_modidx.py) points each exported class and function at an anchor on its page."
    from smollm._modidx import d
    missing, n = [], 0
    for mod, syms in d["syms"].items():
        for name, (link, _) in syms.items():
            if name.count(".") != mod.count(".") + 1 or name.rpartition(".")[2].startswith("_"):
                continue                # methods, private helpers: nbdev shows neither unless a cell asks
            n += 1
            page, _, anchor = link.partition("#")
            f = site / page
            if not f.is_file() or f'id="{anchor}"' not in f.read_text():
                missing.append(link)
    assert n > 100 and not missing, missing[:20]


@pytest.mark.slow
def test_index_and_tutorials_show_their_outputs(site):
    index = (site / "index.html").read_text()
    assert "1,100,048,384" in index and 'class="output' in index        # the executed index, not just its code
    for nb in sorted((NBS / "tutorials").glob("*.ipynb")):
        text = (site / _page_of(nb)).read_text()
        assert 'class="output' in text, f"{nb.name}: no outputs on its page"
        assert "<h1" in text and 'class="highlight"' in text
