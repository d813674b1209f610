"""The part of requirements.lock that scripts/setup_env.sh installs, as a pip requirements file.

    python scripts/lock_select.py [--extras dev,lab] [--without-torch] [--constraints]

Writes to stdout the lock's entries (with their hashes, for `pip install --require-hashes --no-deps
-r`) that the project's dependencies and the given extras need: an extra's packages are left out
when it is not asked for (the Docker images ask for none). The lock's `# via` annotations give the
dependency graph. --without-torch leaves out torch, torchvision and the CUDA stack that PyPI's torch
wheel pulls in (triton, nvidia-*, cuda-*): setup_env.sh then installs another build of torch from
PyTorch's wheel index, whose files have other hashes. --constraints writes the same selection as
plain `name==version` lines (pip constraints for that step: torch's dependencies keep the lock's
versions). Standard library only.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "segstudy"
TORCH_BUILD = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(text: str) -> str:
    return canonical(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", text)[1])


def parse_lock(text: str) -> dict[str, dict]:
    """name -> {"lines": the entry's requirement lines (hashes included), "via": [names]}."""
    entries: dict[str, dict] = {}
    current = None
    in_via = False
    for line in text.splitlines():
        if re.match(r"^[A-Za-z0-9]", line):
            current = {"lines": [line], "via": []}
            entries[requirement_name(line)] = current
            in_via = False
        elif current is None or not line.strip():
            continue
        elif line.lstrip().startswith("--hash") or (
                current["lines"][-1].endswith("\\") and not line.lstrip().startswith("#")):
            current["lines"].append(line)
        elif m := re.match(r"^\s+# via\s*(.*)$", line):
            in_via = True
            if m[1]:
                current["via"].append(m[1].strip())
        elif in_via and (m := re.match(r"^\s+#\s{3}(.+)$", line)):
            current["via"].append(m[1].strip())
        else:
            in_via = False
    for entry in entries.values():  # "segstudy (pyproject.toml)" -> segstudy; "-r file" stays as it is
        entry["via"] = [PROJECT if v.startswith(PROJECT + " ") else canonical(v.split()[0]) for v in entry["via"]]
    return entries


def roots(pyproject: dict, extras: list[str]) -> set[str]:
    project = pyproject["project"]
    wanted = list(project["dependencies"])
    for extra in extras:
        if extra not in project.get("optional-dependencies", {}):
            raise SystemExit(f"lock_select: no extra {extra!r} in pyproject.toml")
        wanted += project["optional-dependencies"][extra]
    return {requirement_name(r) for r in wanted}


def select(entries: dict[str, dict], wanted: set[str], without_torch: bool = False) -> list[str]:
    """Names of the lock's entries that `wanted` (direct requirements) needs, in the lock's order."""
    needed = {n for n in entries if n in wanted}
    changed = True
    while changed:
        changed = False
        for name, entry in entries.items():
            if name not in needed and any(parent in needed for parent in entry["via"] if parent != PROJECT):
                needed.add(name)
                changed = True
    missing = wanted - set(entries)
    if missing:
        raise SystemExit(f"lock_select: {sorted(missing)} not in requirements.lock: regenerate it (docs/deploy.md)")
    return [n for n in entries if n in needed and not (without_torch and TORCH_BUILD.match(n))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lock", type=Path, default=ROOT / "requirements.lock")
    parser.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    parser.add_argument("--extras", default="dev,lab", help="comma-separated; empty for none")
    parser.add_argument("--without-torch", action="store_true")
    parser.add_argument("--constraints", action="store_true")
    args = parser.parse_args(argv)
    entries = parse_lock(args.lock.read_text())
    wanted = roots(tomllib.loads(args.pyproject.read_text()), [e for e in args.extras.split(",") if e.strip()])
    for name in select(entries, wanted, args.without_torch):
        lines = entries[name]["lines"]
        if args.constraints:
            print(re.sub(r"\s*\\$", "", lines[0]).strip())
        else:
            print("\n".join(lines).rstrip("\\ \n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
