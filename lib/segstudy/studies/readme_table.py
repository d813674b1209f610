"""The README's verdict table, written from a run's verdicts.json (notebook 08) between two markers,
so the front door shows a run's answers as the report gave them instead of a hand-edited copy:
`segstudy headline --profile demo` after `./run_all.sh`."""

from __future__ import annotations

import re
from pathlib import Path

from segstudy.config import Config
from segstudy.errors import UserError
from segstudy.studies import results_files

BEGIN = "<!-- verdict table: written by `segstudy headline` from a run's verdicts.json; do not edit -->"
END = "<!-- end of the verdict table -->"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def source_line(payload: dict) -> str:
    """Which run the table comes from, by its provenance stamp."""
    p = payload.get("provenance", {})
    commit = (p.get("commit") or "unknown")[:7] + (" with uncommitted changes" if p.get("dirty") else "")
    flags = " ".join(p.get("cpu_flags") or []) or "no AVX2"
    overrides = "".join(f" --set {k}={v}" for k, v in (p.get("overrides") or {}).items())
    return (f"From `./run_all.sh {payload.get('profile', '?')}{overrides}` at "
            f"{commit}, {(p.get('written') or '')[:10]}: {p.get('cpu', '?')} ({flags}), "
            f"{'GPU ' + p['gpu'] if p.get('gpu') else 'no GPU'}, torch {p.get('torch', '?')}.")


def render(payload: dict) -> str:
    """The block between the markers: the source line and the question | answer | evidence rows
    (written here: pandas' to_markdown pads every cell to its column's widest, ~500 characters)."""
    rows = [f"| {_cell(v['question'])} | {_cell(v['answer'])} | {_cell(v['evidence'])} |"
            for v in payload["verdicts"]]
    return "\n".join([BEGIN, source_line(payload), "", "| question | answer | evidence |", "|---|---|---|",
                      *rows, END])


def update(readme: Path, payload: dict) -> bool:
    """Replace the block between the markers in `readme`; True when its text changed."""
    text = readme.read_text()
    new, found = re.subn(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: render(payload), text, count=1,
                         flags=re.S)
    if not found:
        raise UserError(f"{readme} has no verdict table markers; put the lines\n{BEGIN}\n{END}\n"
                        "where the table belongs, then run `segstudy headline` again")
    if new != text:
        readme.write_text(new)
    return new != text


def headline(cfg: Config, readme: Path) -> bool:
    """update() from cfg's verdicts.json (notebook 08's); a clear error when the run has not written it."""
    payload, file, note = results_files.read(cfg, "verdicts")
    if payload is None:
        raise UserError(f"{note} Run `./run_all.sh {cfg.profile}` (or `--only 08`) first.")
    with results_files.reading(cfg, "verdicts"):
        return update(readme, payload)
