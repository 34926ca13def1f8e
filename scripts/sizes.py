"""Functions over 50 lines and files over 400 under src/moeflow, longest first: the ones that need a reason.

    python scripts/sizes.py [--function-lines 50] [--file-lines 400]
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "moeflow"


def long_functions(limit: int) -> list[tuple[int, str]]:
    """(lines, "path:line name") of every function or method longer than `limit` lines, docstring included."""
    out = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append((n, f"{path.relative_to(SRC.parent)}:{node.lineno} {node.name}"))
    return sorted(out, reverse=True)


def long_files(limit: int) -> list[tuple[int, str]]:
    files = ((len(p.read_text().splitlines()), str(p.relative_to(SRC.parent))) for p in SRC.rglob("*.py"))
    return sorted(((n, name) for n, name in files if n > limit), reverse=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--function-lines", type=int, default=50)
    p.add_argument("--file-lines", type=int, default=400)
    args = p.parse_args()
    for title, rows in ((f"functions over {args.function_lines} lines", long_functions(args.function_lines)),
                        (f"files over {args.file_lines} lines", long_files(args.file_lines))):
        print(f"{title}: {len(rows)}")
        for n, name in rows:
            print(f"  {n:4d}  {name}")


if __name__ == "__main__":
    main()
