"""Checks that README.md shows the table `./dev demo` printed.

    python .ci/check_demo_table.py PRINTED [README.md]

PRINTED is the demo's standard output. The table is the block from the line
"N examples[, accuracy A]" to the line "report: ..." (``experiments.run.format_summary``);
exit 1 with a diff when the README's differs, or when either has none.
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path

HEAD = re.compile(r"^\d+ examples(, accuracy \d\.\d+)?$")


def extract_table(text: str) -> list[str] | None:
    """The last demo table in ``text`` (its lines, trailing spaces removed), or None."""
    lines = [line.rstrip() for line in text.splitlines()]
    starts = [i for i, line in enumerate(lines) if HEAD.match(line)]
    for start in reversed(starts):
        for end in range(start + 1, len(lines)):
            if lines[end].startswith("report: "):
                return lines[start : end + 1]
            if not lines[end] or lines[end].startswith("```"):
                break
    return None


def compare(printed: str, readme: str, readme_name: str = "README.md") -> list[str]:
    """Problems found (empty when the README shows the printed table): a missing table or a
    unified diff from the README's table to the printed one."""
    got, shown = extract_table(printed), extract_table(readme)
    if got is None:
        return ["the demo's output holds no table ('N examples' ... 'report:')"]
    if shown is None:
        return [f"{readme_name} holds no demo table ('N examples' ... 'report:')"]
    if got == shown:
        return []
    diff = difflib.unified_diff(
        shown, got, f"{readme_name} (shown)", "./dev demo (printed)", lineterm=""
    )
    return [f"{readme_name}'s demo table differs from the one ./dev demo printed:", *diff]


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    readme = Path(argv[2] if len(argv) == 3 else "README.md")
    problems = compare(Path(argv[1]).read_text(), readme.read_text(), readme.name)
    for line in problems:
        print(line, file=sys.stderr)
    if not problems:
        print(f"demo table: {readme.name} matches the demo's output")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
