#!/usr/bin/env python
"""Build the documentation site from the notebooks: `make docs`, into _docs/ (open _docs/index.html).

With Quarto on PATH this runs nbdev's own pipeline, `nbdev-docs`. Quarto's PyPI package (`quarto-cli`) is a source
package whose install step downloads the Quarto binary from GitHub, and neither Debian nor npm packages it, so a
machine that reaches only the package registries has no Quarto. There the site is built here instead, keeping
nbdev's pipeline as far as it goes:

1. run: `nbs/index.ipynb` and `nbs/tutorials/*` are executed as `nbdev-test` runs them (in their own folder, with
   IN_TEST set, so at their test size, the `notest slow gpu` cells left out): the notebooks are stored without
   outputs, and a tutorial's page should show its tables and pictures. `--full` leaves IN_TEST unset.
2. process: nbdev's own notebook processors (those of `nbdev-proc-nbs`: frontmatter, `show_doc` for every exported
   name, hidden cells, `#|` directives, links from backticked names to their pages) write each notebook to _proc/.
   Two changes (see `_docs_filter`): a cell that nbdev runs because it imports something runs its top-level
   imports only; a `show_doc` that fails (it resolves annotations, whose names may be imported only
   inside the function) gives a plain entry (heading, signature, docstring) and a warning, where nbdev would stop.
3. render: each processed notebook becomes a page (markdown through nbconvert's renderer, code through Pygments,
   TeX through latex2mathml to MathML), named as nbdev names it (`01_norms.ipynb` -> `norms.html`), with a sidebar
   in the order of nbdev's sidebar.yml (`nbdev-sidebar`): the home page, the tutorials, then one API page per
   module. Links to notebooks (`tutorials/01_build_tinyllama.ipynb`) and nbdev's links to names
   (`/norms.html#rmsnorm`) become relative links, so the site opens from disk.
4. check: every local link and anchor of the site must resolve (`check_site`), or the build fails. A link to a
   notebook that is not in nbs/ is the one exception: its text stays, unlinked, with a warning.

    python tools/build_docs.py [--out _docs] [--proc _proc] [--no-execute] [--full] [--no-quarto] [--reuse-proc]
                               [-n WORKERS]
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import multiprocessing
import os
import posixpath
import re
import shutil
import subprocess
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from contextlib import redirect_stdout
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
EXECUTE = ["index.ipynb", "tutorials/*.ipynb"]     # the pages whose outputs are shown (see 1. above)
SITE = "smollm"
WARNINGS: list[str] = []                        # what the build printed as warnings (links to missing notebooks)


# ---------------------------------------------------------------------------------------------- 1 and 2: a worker

def _docs_filter():
    """nbdev's docs processors (`FilterDefaults`, those of `nbdev-proc-nbs`), with `exec_show_docs` changed in two
    ways. A cell that it runs because it imports something (any cell with an import in it, at any depth) runs its
    top-level imports only: they are what show_doc needs, and the rest (a test, say) may use names from cells that
    nbdev does not run, or train a model; nbdev warns of such cells, and its FAQ says to split them. And a show_doc
    that fails gives a plain entry."""
    import ast
    from nbdev.processors import FilterDefaults, _do_eval, _show_docs, exec_show_docs
    imports = (ast.Import, ast.ImportFrom)

    class exec_doc_cells(exec_show_docs):
        def __call__(self, cell):
            trees = cell.parsed_() if cell.cell_type == "code" else None
            defines = bool(getattr(cell, "directives_", {}).keys() & {"export", "exports", "exporti", "exec_doc"})
            if trees and not defines and not _show_docs(trees):    # nbdev runs it for an import in it
                top = [t for t in trees if isinstance(t, imports)]
                if top and _do_eval(cell) and self.nb.has_docs_ and hasattr(self, "k"):
                    self.k.run("\n".join(ast.unparse(t) for t in top))
                    if (e := self.k.exc) is not None:
                        raise RuntimeError(f"cell {cell.idx_}'s imports failed: {type(e).__name__}: {e}")
                return
            try:
                super().__call__(cell)
            except Exception as e:
                self.k.exc = None
                if defines or not _show_docs(trees or []):
                    raise                   # an exported definition that fails is a real error
                cell["outputs"] = [_plain_entry(cell.source, self.k.user_ns, e)]

    class DocsFilter(FilterDefaults):
        def base_procs(self):
            return [exec_doc_cells if p is exec_show_docs else p for p in super().base_procs()]

    return DocsFilter()


def _plain_entry(source: str, ns: dict, err: Exception) -> dict:
    """The entry for a `show_doc(obj)` that failed (show_doc resolves the annotations, and a name in one may be
    imported only inside the function): a heading, the unresolved signature and the docstring, and a warning."""
    import inspect
    m = re.search(r"show_doc\(\s*([\w.]+)", source)
    obj = eval(m[1], ns) if m else None
    name = getattr(obj, "__qualname__", m[1] if m else "?")
    try:
        sig = f"{'class' if inspect.isclass(obj) else 'def'} {name}{inspect.signature(obj)}"
    except (TypeError, ValueError):
        sig = name
    doc = (inspect.getdoc(obj) or "").split("\n\n")[0]
    err = err.__cause__ or err                  # exec_show_docs wraps the error in its own
    ENTRY_WARNINGS.append(f"show_doc({name}) failed ({type(err).__name__}: {err}); a plain entry instead")
    md = f"---\n\n### {name}\n\n```python\n{sig}\n```\n\n" + (f"*{doc}*\n" if doc else "")
    return {"output_type": "execute_result", "execution_count": None, "metadata": {},
            "data": {"text/markdown": md, "text/plain": name}}


ENTRY_WARNINGS: list[str] = []                  # a worker's warnings for the notebook it is processing


def _execute(nb, src: Path, full: bool, timeout: int):
    "Run notebook `nb` (read from `src`) as nbdev-test does: in its folder, with its test flags, stopping at an error."
    from execnb.shell import CaptureShell
    from fastcore.xtras import working_directory
    from nbdev.config import get_config
    from nbdev.test import _skip_cell

    skip = _skip_cell(nb, get_config().get("tst_flags", "").split())
    if not full:
        os.environ["IN_TEST"] = "1"
    try:
        k = CaptureShell(src)
        with working_directory(src.parent):
            k.run_all(nb, exc_stop=True, preproc=skip, cell_timeout=timeout)
    except Exception as e:
        tb = k.prettytb(fname=src) if "k" in locals() else ""
        raise RuntimeError(f"{src.relative_to(ROOT)} failed to run:\n{tb or e}") from None
    finally:
        os.environ.pop("IN_TEST", None)


def process_notebook(job):
    "Worker: (src, dst, execute, full, timeout) -> (src, seconds, warnings): run it if asked, then process it."
    src, dst, execute, full, timeout = job
    from fastcore.nbio import write_nb
    from nbdev.process import NBProcessor

    warnings.filterwarnings("ignore", message="Found cells containing imports")   # nbdev's FAQ note, see 2. above
    t0 = time.time()
    nb = NBProcessor(src, rm_directives=False, process=True).nb     # parsed directives, as nbdev-test reads it
    if execute:
        _execute(nb, src, full, timeout)
        for o in (o for c in nb.cells for o in c.get("outputs", [])):   # as a saved notebook reads: strings,
            if isinstance(o.get("text"), list):                          # which nbdev's processors expect
                o["text"] = "".join(o["text"])
            for k, v in o.get("data", {}).items():
                if isinstance(v, list):
                    o["data"][k] = "".join(v)
    os.environ["IN_TEST"] = "1"                                      # as nbdev's serve_drv does while processing
    try:
        _docs_filter()(nb)
    except Exception as e:
        if os.environ.get("DOCS_DEBUG"): raise
        raise RuntimeError(f"{src.relative_to(ROOT)}: nbdev's processing failed: {e}") from None
    finally:
        os.environ.pop("IN_TEST", None)
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_nb(nb, dst)
    warned = [f"{src.relative_to(ROOT)}: {w}" for w in ENTRY_WARNINGS]
    ENTRY_WARNINGS.clear()
    return src, time.time() - t0, warned


# ----------------------------------------------------------------------------------------------------- 3: render

def _frontmatter(nb) -> dict:
    "The YAML of nbdev's raw frontmatter cell (title, description, output-file), which is then dropped."
    for i, c in enumerate(nb["cells"]):
        src = "".join(c["source"])
        if c["cell_type"] == "raw" and src.lstrip().startswith("---"):
            del nb["cells"][i]
            return yaml.safe_load(src.strip().strip("-")) or {}
    return {}


_DIRECTIVE = re.compile(r"^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$")


def _directives(source: str) -> tuple[dict, str]:
    "Quarto's `#| key: value` lines at the top of a code cell (nbdev leaves these for Quarto), and the rest."
    lines, out = source.splitlines(), {}
    while lines and (m := _DIRECTIVE.match(lines[0])):
        out[m[1]] = m[2].lower()
        lines.pop(0)
    return out, "\n".join(lines).strip("\n")


_SRC_LINK = re.compile(r"\[source\]\(([^)]*)\)(\{[^}]*\})?")


def _source_links(md: str, git_url: str) -> str:
    "show_doc's `[source](.../blob/<branch>/<file>#L<n>){...}`: a plain `file:line` note where no git_url is set."
    def sub(m):
        url = m[1]
        f = re.search(r"/blob/[^/]+/([^#]+)(?:#L(\d+))?", url)
        where = f"{f[1]}:{f[2]}" if f and f[2] else (f[1] if f else url)
        if git_url and url.startswith("http"):
            return f'<a class="srcref" href="{html.escape(url)}">{html.escape(where)}</a>'
        return f'<span class="srcref">{html.escape(where)}</span>'
    return _SRC_LINK.sub(sub, md)


def _md(md: str, git_url: str) -> str:
    from nbconvert.filters.markdown_mistune import markdown2html_mistune
    return _tex_to_mathml(markdown2html_mistune(_source_links(md, git_url)))


def _code_html(source: str) -> str:
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import PythonLexer, get_lexer_by_name
    from pygments.util import ClassNotFound
    try:
        lexer = get_lexer_by_name("ipython3")      # knows `!cmd` and `%magic` lines
    except ClassNotFound:
        lexer = PythonLexer()
    return '<div class="cell-input">' + highlight(source, lexer, HtmlFormatter(cssclass="highlight")) + "</div>"


def _text(t) -> str:
    return "".join(t) if isinstance(t, list) else t


def _output_html(o, asis: bool, git_url: str) -> str:
    "One output: a picture, a table (HTML), markdown, or text; ANSI colours from tracebacks become HTML."
    from nbconvert.filters import ansi2html
    kind = o.get("output_type")
    if kind == "stream":
        cls = "stderr" if o.get("name") == "stderr" else "stdout"
        return f'<pre class="output {cls}">{ansi2html(_text(o["text"]))}</pre>'
    if kind == "error":
        return f'<pre class="output error">{ansi2html(chr(10).join(o.get("traceback", [])))}</pre>'
    data, meta = o.get("data", {}), o.get("metadata", {})
    if asis and "text/markdown" in data:
        return _md(_text(data["text/markdown"]), git_url)
    for mime in ("image/svg+xml", "image/png", "image/jpeg", "text/html", "text/markdown", "text/latex", "text/plain"):
        if mime not in data:
            continue
        v = _text(data[mime])
        if mime == "image/svg+xml":
            return f'<div class="output image">{v}</div>'
        if mime.startswith("image/"):
            m = meta.get(mime, {})
            size = "".join(f' {k}="{m[k]}"' for k in ("width", "height") if k in m)
            b64 = v if isinstance(v, str) else base64.b64encode(v).decode()
            return f'<div class="output image"><img src="data:{mime};base64,{b64.strip()}"{size} alt=""></div>'
        if mime == "text/html":
            return f'<div class="output html">{v}</div>'
        if mime == "text/markdown":
            return f'<div class="output markdown">{_md(v, git_url)}</div>'
        return f'<pre class="output result">{html.escape(v)}</pre>'
    return ""


def render_body(nb, git_url: str) -> str:
    "The page's content: markdown cells, then each code cell's source and outputs as its `#|` directives say."
    parts = []
    for c in nb["cells"]:
        src = _text(c["source"])
        if c["cell_type"] == "markdown":
            parts.append(_md(src, git_url))
        elif c["cell_type"] == "code":
            d, code = _directives(src)
            if d.get("include") == "false":
                continue
            cell = []
            if code.strip() and d.get("echo") != "false":
                cell.append(_code_html(code))
            if d.get("output") != "false":
                cell += [_output_html(o, d.get("output") == "asis", git_url) for o in c.get("outputs", [])]
            if any(cell):
                asis = d.get("output") == "asis" and d.get("echo") == "false"
                parts.append("\n".join(cell) if asis else '<div class="cell">' + "\n".join(cell) + "</div>")
    return "\n".join(parts)


def pandoc_id(text: str) -> str:
    "Pandoc's (so Quarto's) id of a heading, which nbdev links names to: `Attention.forward` -> `attention.forward`."
    s = re.sub(r"[^\w\s.-]", "", text.lower())
    s = re.sub(r"\s+", "-", s.strip())
    s = re.sub(r"^[^a-z]+", "", s)          # pandoc drops everything before the first letter
    return s or "section"


_MATH = re.compile(r"\$\$(.+?)\$\$|\$([^$\n]+?)\$", re.S)
_CODE = re.compile(r"(<pre\b.*?</pre>|<code\b.*?</code>)", re.S)


def _tex_to_mathml(html_text: str) -> str:
    """The `$...$` and `$$...$$` that nbconvert's renderer leaves in its HTML (for MathJax, which would be a
    download) as MathML, which browsers draw themselves; code is left alone, and TeX that does not convert (or all of
    it, without the `docs` extra's latex2mathml) is shown as code."""
    try:
        from latex2mathml.converter import convert
    except ImportError:
        convert = None

    def one(m):
        tex, display = (m[1], "block") if m[1] is not None else (m[2], "inline")
        try:
            return convert(html.unescape(tex).strip(), display=display) if convert else _tex_code(m[0])
        except Exception:
            return _tex_code(m[0])

    return "".join(part if i % 2 else _MATH.sub(one, part) for i, part in enumerate(_CODE.split(html_text)))


def _tex_code(tex: str) -> str:
    return f'<code class="tex">{tex}</code>'            # still escaped as nbconvert left it


def postprocess(body: str, page: str, pages: dict[str, str]) -> tuple[str, list[tuple[int, str, str]]]:
    """Heading ids as Pandoc makes them, and relative links (to pages for notebooks, nbdev's `/x.html#y` from the
    site's root). `page` is this page's path in the site, `pages` maps notebook paths (relative to nbs/) to
    page paths. Returns the HTML and the table of contents [(level, id, text)]."""
    from bs4 import BeautifulSoup
    soup = BeautifulSoup(body, "html.parser")
    here = posixpath.dirname(page)
    seen, toc = {}, []
    for a in soup.select("a.anchor-link"):
        a.decompose()
    for h in soup.find_all(["h1", "h2", "h3", "h4"]):
        base = pandoc_id(h.get_text(" ", strip=True))
        n = seen.get(base, 0)
        seen[base] = n + 1
        h["id"] = base if n == 0 else f"{base}-{n}"
        anchor = soup.new_tag("a", attrs={"class": "anchor", "href": f"#{h['id']}", "aria-label": "link here"})
        anchor.string = "#"
        h.append(anchor)
        if h.name in ("h2", "h3"):
            toc.append((int(h.name[1]), h["id"], h.get_text(" ", strip=True).rstrip("#").strip()))
    for a in soup.find_all("a", href=True):
        href = _relink(a["href"], here, pages)
        if href is None:                        # a notebook not (yet) in nbs/: its title stays, unlinked
            WARNINGS.append(f"{page}: links {a['href']}, which is no notebook in nbs/; shown unlinked")
            a.unwrap()
        elif a["href"].startswith("/") and not a["href"].startswith("//"):
            a.attrs = {"class": "doclink", "href": href}      # nbdev's link to a name: see _fix_doclinks
        else:
            a["href"] = href
    return str(soup), toc


def _relink(href: str, here: str, pages: dict[str, str]) -> str | None:
    """A notebook link becomes its page's (None for a notebook that is not there); a root link (nbdev's
    `/norms.html#rmsnorm`) becomes relative to `here`."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", href) or href.startswith(("#", "//")):
        return href
    path, _, frag = href.partition("#")
    target = posixpath.normpath(path.lstrip("/") if path.startswith("/") else posixpath.join(here, path))
    if target.endswith(".ipynb"):
        if target not in pages:
            return None
        target = pages[target]
    rel = posixpath.relpath(target, here or ".")
    return rel + (f"#{frag}" if frag else "")


_DOCLINK = re.compile(r'<a class="doclink" href="([^"]*)">(.*?)</a>', re.S)


def _fix_doclinks(body: str, page: str, ids: dict[str, set[str]], tally: dict) -> str:
    """nbdev links every backticked name it knows (`Transformer.param_counts`, `_named`) to `page#name`, but only
    exported functions and classes, and the methods a cell shows, have an entry there. A link to a method without
    one goes to its class's entry; a link to a name without any (a private helper) is left as code, unlinked."""
    def one(m):
        path, _, frag = html.unescape(m[1]).partition("#")
        target = posixpath.normpath(posixpath.join(posixpath.dirname(page), path)) if path else page
        want = frag
        while frag and frag not in ids.get(target, ()):
            frag = frag.rpartition(".")[0]
        if frag == want:
            return m[0]
        tally["to their class" if frag else "unlinked"] += 1
        return f'<a class="doclink" href="{html.escape(path)}#{html.escape(frag)}">{m[2]}</a>' if frag else m[2]
    return _DOCLINK.sub(one, body)


def page_html(title, description, body, toc, page, nav, prev_next) -> str:
    "The page around the content: sidebar, title, on-this-page list, and the previous and next pages."
    root = posixpath.relpath(".", posixpath.dirname(page) or ".")
    rel = lambda p: posixpath.relpath(p, posixpath.dirname(page) or ".")
    side = [f'<a class="brand" href="{rel("index.html")}">{SITE}</a>']
    for section, items in nav:
        if section:
            side.append(f'<div class="nav-section">{html.escape(section)}</div>')
        side.append("<ul>" + "".join(
            f'<li><a href="{rel(p)}"{" class=current" if p == page else ""}>{html.escape(t)}</a></li>'
            for p, t in items) + "</ul>")
    toc_html = ""
    if len(toc) > 1:
        toc_html = '<nav class="toc"><div class="toc-title">On this page</div><ul>' + "".join(
            f'<li class="l{lvl}"><a href="#{i}">{html.escape(t)}</a></li>' for lvl, i, t in toc) + "</ul></nav>"
    links = []
    for cls, item in zip(("prev", "next"), prev_next):
        if item:
            links.append(f'<a class="{cls}" href="{rel(item[0])}">{"&larr; " if cls == "prev" else ""}'
                         f'{html.escape(item[1])}{" &rarr;" if cls == "next" else ""}</a>')
    desc = ""
    if description:                             # inline markdown, as Quarto renders it: `code`, *emphasis*
        inner = re.sub(r"^<p>|</p>\s*$", "", _md(description, "").strip())
        desc = f'<p class="description">{inner}</p>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)} – {SITE}</title>
<link rel="stylesheet" href="{root}/site.css">
</head><body>
<nav class="sidebar">{"".join(side)}</nav>
<main><header><h1 class="title">{html.escape(title)}</h1>{desc}</header>
{toc_html}
<article>{body}</article>
<footer class="pager">{"".join(links)}</footer>
</main></body></html>
"""


CSS = """
:root { --fg:#1d2329; --muted:#5c6670; --line:#e3e6ea; --accent:#2a6bb1; --code-bg:#f6f8fa; }
* { box-sizing: border-box; }
body { margin:0; font:16px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif; color:var(--fg); }
a { color:var(--accent); text-decoration:none; } a:hover { text-decoration:underline; }
.sidebar { position:fixed; top:0; bottom:0; left:0; width:240px; overflow-y:auto; padding:18px 16px 40px;
  border-right:1px solid var(--line); background:#fafbfc; font-size:14px; }
.sidebar .brand { display:block; font-size:22px; font-weight:700; color:var(--fg); margin-bottom:12px; }
.sidebar .nav-section { margin:16px 0 4px; font-size:12px; font-weight:700; text-transform:uppercase;
  letter-spacing:.06em; color:var(--muted); }
.sidebar ul { list-style:none; margin:0; padding:0; }
.sidebar li a { display:block; padding:2px 8px; border-radius:4px; color:var(--fg); }
.sidebar li a:hover { background:#eef2f6; text-decoration:none; }
.sidebar li a.current { background:#e1ecf7; color:var(--accent); font-weight:600; }
main { margin-left:240px; padding:28px 32px 60px 40px; max-width:1400px; display:grid;
  grid-template-columns:minmax(0,1fr) 200px; column-gap:28px; }
main > header, main > article, main > footer { grid-column:1; }
.toc { grid-column:2; grid-row:1 / span 3; position:sticky; top:20px; align-self:start; max-height:calc(100vh - 40px);
  overflow-y:auto; font-size:13px; border-left:1px solid var(--line); padding-left:14px; }
.toc ul { list-style:none; margin:0; padding:0; } .toc li { margin:3px 0; } .toc li.l3 { padding-left:12px; }
.toc-title { font-weight:700; margin-bottom:6px; color:var(--muted); }
h1.title { font-size:34px; margin:0 0 6px; } .description { color:var(--muted); font-size:18px; margin:0 0 24px; }
h2 { margin-top:36px; padding-bottom:4px; border-bottom:1px solid var(--line); } h3 { margin-top:28px; }
h1 .anchor, h2 .anchor, h3 .anchor, h4 .anchor { margin-left:8px; color:#b8c0c8; font-weight:400; visibility:hidden; }
h1:hover .anchor, h2:hover .anchor, h3:hover .anchor, h4:hover .anchor { visibility:visible; }
article hr { border:0; border-top:1px solid var(--line); margin:28px 0 8px; }
.srcref { float:right; font-size:12px; color:var(--muted); font-family:ui-monospace,"DejaVu Sans Mono",monospace; }
code { font-family:ui-monospace,"DejaVu Sans Mono",Menlo,monospace; font-size:.88em; background:var(--code-bg);
  padding:1px 4px; border-radius:3px; }
pre { margin:0; padding:10px 14px; overflow-x:auto; font:13.5px/1.45 ui-monospace,"DejaVu Sans Mono",Menlo,monospace; }
pre code { background:none; padding:0; }
.highlight, article > pre { background:var(--code-bg); border:1px solid var(--line); border-radius:6px; }
.cell { margin:14px 0; } .cell-input .highlight { border-left:3px solid #9ec1e6; }
.output { border:1px solid var(--line); border-top:0; border-radius:0 0 6px 6px; background:#fff; }
.cell > .output:first-child { border-top:1px solid var(--line); border-radius:6px; }
pre.output.stderr { background:#fff7f2; } pre.output.error { background:#fff0f0; }
.output.image { padding:8px; } .output.image img { max-width:100%; height:auto; }
.output.html, .output.markdown { padding:6px 12px; overflow-x:auto; }
table { border-collapse:collapse; margin:12px 0; font-size:14px; }
th, td { border:1px solid var(--line); padding:4px 10px; text-align:left; vertical-align:top; }
th { background:#f3f5f7; } tr:nth-child(even) td { background:#fbfcfd; }
.output.html table td, .output.html table th { text-align:right; }
math[display=block] { margin:12px 0; overflow-x:auto; } code.tex { background:#fffbe6; }
.pager { display:flex; justify-content:space-between; margin-top:48px; padding-top:14px;
  border-top:1px solid var(--line); }
.pager .next { margin-left:auto; }
@media (max-width:1439px) { main { grid-template-columns:minmax(0,1fr); } .toc { display:none; } }
@media (max-width:760px) { .sidebar { position:static; width:auto; height:auto; border-right:0; }
  main { margin-left:0; padding:16px; } }
"""


def _css() -> str:
    from pygments.formatters import HtmlFormatter
    return CSS + HtmlFormatter(style="friendly").get_style_defs(".highlight") + \
        "\n.highlight { background:var(--code-bg); }\n"


# -------------------------------------------------------------------------------------------------- 4: the check

def check_site(out: Path) -> list[str]:
    """Every local `href` and `src` of every page in `out` (a file in the site, and its `#anchor` an id on that page),
    as a list of problems; links to other sites and `data:` pictures are not followed."""
    from bs4 import BeautifulSoup
    out = Path(out).resolve()
    ids, links, problems = {}, [], []
    for page in sorted(out.rglob("*.html")):
        soup = BeautifulSoup(page.read_text(), "html.parser")
        names = {a["name"] for a in soup.find_all("a", attrs={"name": True})}
        ids[page] = {t["id"] for t in soup.find_all(id=True)} | names
        links += [(page, attr, tag[attr]) for tag in soup.find_all(["a", "link", "img", "script", "iframe", "source"])
                  for attr in ("href", "src") if tag.get(attr) is not None]
    for page, attr, url in links:
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", url) and not url.startswith("file:") or url.startswith("//"):
            continue
        where = f"{page.relative_to(out)}: {attr}={url!r}"
        path, _, frag = url.partition("#")
        target = (page.parent / path).resolve() if path else page
        if url.startswith("file:"):
            problems.append(f"{where} points at this machine's disk")
        elif path.startswith("/") or not target.is_relative_to(out):
            problems.append(f"{where} leaves the site")
        elif not target.is_file():
            problems.append(f"{where}: no such file")
        elif frag and target.suffix == ".html" and frag not in ids[target]:
            problems.append(f"{where}: no #{frag} on {target.relative_to(out)}")
    return problems


# ------------------------------------------------------------------------------------------------------- driver

def _sidebar(nbs: Path) -> list:
    "nbdev's sidebar (what `nbdev-sidebar` writes to sidebar.yml), read from its printout so nbs/ is not written to."
    from nbdev.quarto import nbdev_sidebar
    buf = io.StringIO()
    with redirect_stdout(buf):
        nbdev_sidebar.__wrapped__(path=str(nbs), printit=True, force=True)
    return yaml.safe_load(buf.getvalue())["website"]["sidebar"]["contents"]


def _flatten(contents, section=None):
    "sidebar.yml's contents as [(section, notebook path relative to nbs/)], sections being folders."
    for item in contents:
        if isinstance(item, str):
            yield section, item
        else:
            yield from _flatten(item.get("contents", []), item.get("section"))


def build(out: Path, proc: Path, execute: bool = True, full: bool = False, workers: int = 2,
          timeout: int = 600, reuse_proc: bool = False) -> dict:
    "Build the site into `out` (processed notebooks in `proc`); returns {'pages': n, 'seconds': {...}}."
    from fnmatch import fnmatch
    from nbdev.config import get_config
    from nbdev.config import import_obj

    os.chdir(ROOT)
    cfg = get_config()
    nbs = cfg.nbs_path
    git_url = cfg.get("git_url", "") or ""
    if setup := cfg.get("test_setup"):           # Triton's interpreter where there is no GPU, as for nbdev-test
        import_obj(setup)([])
    t0 = time.time()
    items = list(_flatten(_sidebar(nbs)))
    shutil.rmtree(out, ignore_errors=True)
    if reuse_proc and proc.is_dir():
        jobs = []                               # render only, from the notebooks processed before
        items = [(s, nb) for s, nb in items if (proc / nb).is_file()]
    else:
        shutil.rmtree(proc, ignore_errors=True)
        jobs = [(nbs / nb, proc / nb, execute and any(fnmatch(nb, p) for p in EXECUTE), full, timeout)
                for _, nb in items]
    times = {}
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per worker, as nbdev's own processing uses
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import build_docs                           # the workers' function by its module's name: IPython, which runs
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:     # the cells, replaces __main__
        for src, s, warned in pool.map(build_docs.process_notebook, jobs):
            times[str(src.relative_to(nbs))] = round(s, 1)
            WARNINGS.extend(warned)
    t_proc = time.time() - t0

    from fastcore.nbio import read_nb
    from nbdev.config import nbpath2html
    pages, meta = {}, {}
    for section, nb in items:
        n = read_nb(proc / nb)
        fm = _frontmatter(n)
        page = str(Path(nb).parent / fm.get("output-file", nbpath2html(nb).name)).removeprefix("./")
        pages[nb], meta[nb] = page, (section, fm, n)
    titled = lambda nb: meta[nb][1].get("title") or Path(pages[nb]).stem

    def label(nb):
        "The sidebar's name: the title, a tutorial's numbered ('Tutorial 2: your first x' -> '2. Your first x')."
        if not meta[nb][0]:
            return titled(nb)
        t = re.sub(r"^tutorial\s*\d*\s*[:.-]\s*", "", titled(nb), flags=re.I)
        n = re.match(r"(\d+)_", Path(nb).name)
        return (f"{int(n[1])}. " if n else "") + t[:1].upper() + t[1:]
    home = [nb for nb in pages if pages[nb] == "index.html"]
    tutorials = [nb for s, nb in items if s]
    api = [nb for s, nb in items if not s and nb not in home]
    nav = [(None, [(pages[nb], "Home") for nb in home]),
           ("Tutorials", [(pages[nb], label(nb)) for nb in tutorials]),
           ("API", [(pages[nb], titled(nb)) for nb in api])]
    order = home + tutorials + api
    out.mkdir(parents=True)
    (out / "site.css").write_text(_css())
    rendered = {nb: postprocess(render_body(meta[nb][2], git_url), pages[nb], pages) for nb in order}
    ids = {pages[nb]: set(re.findall(r'\bid="([^"]+)"', body)) for nb, (body, _) in rendered.items()}
    tally = {"to their class": 0, "unlinked": 0}
    for i, nb in enumerate(order):
        section, fm, n = meta[nb]
        body, toc = rendered[nb]
        body = _fix_doclinks(body, pages[nb], ids, tally)
        neighbours = (order[i - 1] if i > 0 else None, order[i + 1] if i + 1 < len(order) else None)
        prev_next = [(pages[o], label(o)) if o else None for o in neighbours]
        f = out / pages[nb]
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(page_html(titled(nb), fm.get("description", ""), body, toc, pages[nb], nav, prev_next))
    if tally["to their class"] or tally["unlinked"]:
        print(f"links to names without an entry of their own: {tally['to their class']} go to their class's entry, "
              f"{tally['unlinked']} (private helpers) are shown unlinked")
    _copy_assets(out, nbs)
    (out / ".nojekyll").touch()
    return {"pages": len(order), "seconds": {"process": round(t_proc, 1), "total": round(time.time() - t0, 1)},
            "notebooks": times}


def _copy_assets(out: Path, nbs: Path) -> None:
    "Pictures and files that pages link to by a relative path (a tutorial's saved figure) come from nbs/."
    out = out.resolve()
    for page in out.rglob("*.html"):
        for url in re.findall(r'\b(?:src|href)="([^"#]+)', page.read_text()):
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^/", url):
                continue
            dst = (page.parent / html.unescape(url)).resolve()
            if dst.is_relative_to(out) and not dst.exists() and (src := nbs / dst.relative_to(out)).is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "_docs", help="the site (default: _docs)")
    p.add_argument("--proc", type=Path, default=ROOT / "_proc", help="processed notebooks (default: _proc)")
    p.add_argument("--no-execute", action="store_true", help="do not run the index and the tutorials")
    p.add_argument("--full", action="store_true", help="run them at full size (IN_TEST unset)")
    p.add_argument("--no-quarto", action="store_true", help="build without Quarto even where it is on PATH")
    p.add_argument("--reuse-proc", action="store_true", help="render from the processed notebooks already in --proc")
    p.add_argument("-n", "--workers", type=int, default=2)
    a = p.parse_args(argv)
    if shutil.which("quarto") and not a.no_quarto:
        print("Quarto found: running nbdev-docs")
        return subprocess.call([str(Path(sys.executable).parent / "nbdev-docs")], cwd=ROOT)
    try:
        r = build(a.out.resolve(), a.proc.resolve(), execute=not a.no_execute, full=a.full, workers=a.workers,
                  reuse_proc=a.reuse_proc)
    except RuntimeError as e:          # a notebook that does not run, or that nbdev cannot process
        print(f"docs not built: {e}", file=sys.stderr)
        return 1
    problems = check_site(a.out)
    for w in WARNINGS:
        print(f"warning: {w}", file=sys.stderr)
    print(f"{r['pages']} pages in {a.out} in {r['seconds']['total']} s (processing {r['seconds']['process']} s); "
          f"slowest: " + ", ".join(f"{k} {v} s" for k, v in sorted(r["notebooks"].items(), key=lambda kv: -kv[1])[:3]))
    if problems:
        print(f"{len(problems)} broken links:\n  " + "\n  ".join(problems[:50]), file=sys.stderr)
        return 1
    print(f"open {a.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
