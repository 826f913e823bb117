#!/usr/bin/env python3
"""Strip outputs from the notebooks in this directory (they are committed without them).

    python notebooks/strip.py            # strip in place
    python notebooks/strip.py --check    # exit 1 naming the notebooks that still carry outputs (the test run does this)
"""
import json
import sys
from pathlib import Path


def stripped(nb: dict) -> dict:
    out = json.loads(json.dumps(nb))
    for cell in out["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        cell.get("metadata", {}).pop("execution", None)
    out.get("metadata", {}).pop("widgets", None)
    return out


def main(argv: list[str]) -> int:
    check = "--check" in argv
    dirty = []
    for path in sorted(Path(__file__).resolve().parent.glob("*.ipynb")):
        nb = json.loads(path.read_text())
        clean = stripped(nb)
        if clean != nb:
            dirty.append(path.name)
            if not check:
                path.write_text(json.dumps(clean, indent=1, ensure_ascii=False) + "\n")
    if check and dirty:
        print("notebooks with outputs (run `python notebooks/strip.py`): " + ", ".join(dirty))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
