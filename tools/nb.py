"""Edit notebooks cell by cell from the shell (the notebooks are the source; see DESIGN.md).

    python tools/nb.py list NB                      one line per cell: index, id, type, first line
    python tools/nb.py show NB CELL [CELL ...]      the source of cells (CELL: an index or an id)
    python tools/nb.py set NB CELL FILE             replace a cell's source with FILE's text ('-': stdin)
    python tools/nb.py insert NB AFTER TYPE FILE    a new cell (code|markdown) after cell AFTER (-1: at the top)
    python tools/nb.py delete NB CELL [CELL ...]    remove cells
    python tools/nb.py new NB TITLE                 a new notebook holding a title cell

Each command reads the notebook, changes it and writes it back at once, so that several people editing
different notebooks (or different cells, one command at a time) do not overwrite each other. Run
`make export` afterwards: nbdev-clean gives new cells their ids and strips outputs' metadata.
"""
import json, sys, uuid
from pathlib import Path


def _load(path):
    return json.loads(Path(path).read_text())


def _save(path, nb):
    tmp = Path(path).with_suffix(".ipynb.tmp")
    tmp.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _index(nb, cell: str) -> int:
    if cell.lstrip("-").isdigit():
        return int(cell)
    for i, c in enumerate(nb["cells"]):
        if c.get("id") == cell:
            return i
    sys.exit(f"nb.py: no cell with id {cell!r}")


def _text(file: str) -> str:
    return sys.stdin.read() if file == "-" else Path(file).read_text()


def _cell(kind: str, text: str) -> dict:
    c = {"cell_type": kind, "id": uuid.uuid4().hex[:8], "metadata": {}, "source": text.rstrip("\n")}
    if kind == "code":
        c.update(execution_count=None, outputs=[])
    return c


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    cmd, path, *rest = argv
    if cmd == "new":
        nb = {"cells": [_cell("markdown", rest[0])], "metadata": {"jupytext": {
            "cell_metadata_filter": "-all", "main_language": "python", "notebook_metadata_filter": "-all"}},
            "nbformat": 4, "nbformat_minor": 5}
        return _save(path, nb)
    nb = _load(path)
    cells = nb["cells"]
    if cmd == "list":
        for i, c in enumerate(cells):
            src = "".join(c["source"])
            first = src.split("\n", 1)[0][:90]
            print(f"{i:3d} {c.get('id', '-'):>10} {c['cell_type'][:4]} {src.count(chr(10)) + 1:4d}L  {first}")
    elif cmd == "show":
        for cell in rest:
            i = _index(nb, cell)
            print(f"# ---- cell {i} ({cells[i].get('id')}, {cells[i]['cell_type']})")
            print("".join(cells[i]["source"]))
    elif cmd == "set":
        i = _index(nb, rest[0])
        cells[i]["source"] = _text(rest[1]).rstrip("\n")
        _save(path, nb)
    elif cmd == "insert":
        i = _index(nb, rest[0]) if rest[0] != "-1" else -1
        cells.insert(i + 1, _cell(rest[1], _text(rest[2])))
        _save(path, nb)
        print(f"inserted at {i + 1}, id {cells[i + 1]['id']}")
    elif cmd == "delete":
        for i in sorted((_index(nb, c) for c in rest), reverse=True):
            del cells[i]
        _save(path, nb)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
