"""The part of requirements.lock that the services need at run time, hashes and all.

requirements.lock (`make lock`) holds every group, the dev tools too (pytest, ruff, kubectl,
hadolint, ...): the image installs only what the workspace packages depend on. uv writes, under
each pinned requirement, `# via` the packages that need it; a requirement is kept when one of
those is a workspace package (`booking-*`) or, in turn, a kept requirement. The kept entries are
copied unchanged, so the image installs the exact versions and hashes of the lock.

    python deploy/runtime_requirements.py requirements.lock > runtime.lock
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

WORKSPACE_PREFIX = "booking-"
_REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class Entry:
    name: str
    lines: list[str] = field(default_factory=list)
    via: set[str] = field(default_factory=set)


def parse(text: str) -> list[Entry]:
    """The lock's entries: each requirement with its hash lines and the `# via` names after it."""
    entries: list[Entry] = []
    in_via = False
    for line in text.splitlines():
        match = _REQUIREMENT.match(line)
        if match:
            entries.append(Entry(canonical(match.group(1)), [line]))
            in_via = False
            continue
        if not entries:
            continue  # the header comments
        entry = entries[-1]
        stripped = line.strip()
        if stripped.startswith("--hash") or (line.startswith(" ") and not stripped.startswith("#")):
            entry.lines.append(line)
        elif stripped.startswith("# via"):
            rest = stripped.removeprefix("# via").strip()
            if rest:  # `# via name` on one line
                entry.via.add(canonical(rest))
                in_via = False
            else:  # `# via` then one `#   name` per line
                in_via = True
        elif in_via and stripped.startswith("#"):
            entry.via.add(canonical(stripped.lstrip("#").strip()))
        else:
            in_via = False
    return entries


def runtime_entries(entries: list[Entry]) -> list[Entry]:
    """The entries some workspace package needs, directly or through another kept entry."""
    needed: set[str] = set()
    changed = True
    while changed:
        changed = False
        for entry in entries:
            if entry.name in needed:
                continue
            if any(v.startswith(WORKSPACE_PREFIX) or v in needed for v in entry.via):
                needed.add(entry.name)
                changed = True
    return [e for e in entries if e.name in needed]


def runtime_requirements(lock_text: str) -> str:
    kept = runtime_entries(parse(lock_text))
    header = "# The run-time part of requirements.lock (deploy/runtime_requirements.py).\n"
    return header + "".join("\n".join(e.lines) + "\n" for e in kept)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} requirements.lock", file=sys.stderr)
        return 2
    text = runtime_requirements(Path(argv[1]).read_text())
    if text.count("==") == 0:
        print("no run-time requirement found: is the lock annotated (# via)?", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
