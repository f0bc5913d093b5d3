"""Check the notebook-first promise without touching the working tree.

Copies the working tree (tracked files plus untracked, non-ignored ones) to a temporary
folder, runs `nbdev-export` and `nbdev-clean` there, and compares. Any file they would
change means either a hand edit of generated code in smollm/, or a notebook that is not
clean, or notebooks edited without re-exporting. Exits 1 naming each file.
"""
import filecmp, os, shutil, subprocess, sys, tempfile
from pathlib import Path

root = Path(__file__).resolve().parent.parent
bindir = Path(sys.executable).parent


def tree_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=root, check=True, capture_output=True).stdout.decode()
        return sorted({f for f in out.split("\0") if f and (root / f).is_file()})
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: take everything but the venv
        skip = {".venv", ".git", "__pycache__", ".pytest_cache"}
        return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                      if p.is_file() and not skip & set(p.relative_to(root).parts))


def main() -> int:
    files = tree_files()
    with tempfile.TemporaryDirectory(prefix="smollm-sync-") as tmp:
        tmp = Path(tmp)
        for f in files:
            (tmp / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / f, tmp / f)
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        env.pop("IN_TEST", None)  # nbdev-export does nothing when IN_TEST is set
        for cmd in ("nbdev-export", "nbdev-clean"):
            r = subprocess.run([str(bindir / cmd)], cwd=tmp, env=env, capture_output=True, text=True)
            if r.returncode:
                print(f"check_sync: `{cmd}` failed:\n{r.stdout}{r.stderr}", file=sys.stderr)
                return 1
        after = {str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
        before = set(files)
        changed = [f for f in sorted(before & after) if not filecmp.cmp(root / f, tmp / f, shallow=False)]
        added = sorted(after - before)
    if not changed and not added:
        print(f"check_sync: {sum(f.endswith('.ipynb') for f in files)} notebooks clean, smollm/ matches their export")
        return 0
    print("check_sync: the notebooks and the generated library are out of sync.", file=sys.stderr)
    for f in changed:
        why = ("notebook is not clean (run `nbdev-clean`)" if f.endswith(".ipynb")
               else "differs from what the notebooks export (edit the notebook, not this file; then `make export`)")
        print(f"  changed: {f}: {why}", file=sys.stderr)
    for f in added:
        print(f"  missing: {f}: exported by a notebook but not in the tree (run `make export`)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
