"""A saved run's rollout pages, without loading a model (``src/callbacks/rollout_viewer.py`` writes them).

    python src/inspect_run.py <run dir>            # lists the pages, newest last, and the index's path
    python src/inspect_run.py <run dir> --open     # and opens the index in the default browser
    python src/inspect_run.py <run dir> --step 50  # one page's rows as text: token | reward | clipped | kept
"""

from __future__ import annotations

import argparse
import json
import sys
import webbrowser
from pathlib import Path


def pages(run: Path, dirname: str = "rollouts") -> list[Path]:
    folder = run / dirname
    if not folder.is_dir():
        raise SystemExit(f"{run} has no {dirname}/ folder: the run wrote no rollout pages (callbacks.rollout_viewer "
                         f"writes one every every_n_steps steps under REOPOLD, OPD or GRPO)")
    return sorted(folder.glob("step_*.html"))


def as_text(page_json: Path) -> str:
    data = json.loads(page_json.read_text())
    lines = [" ".join(f"{k}={v}" for k, v in data["header"].items() if k in ("step", "phase", "selection", "floor"))]
    for i, row in enumerate(data["rows"]):
        lines.append(f"--- row {i}: {row['prompt']!r}")
        lines += [f"{t['text']!r:>12} {t['reward']:+.3f} {'clipped' if t['clipped'] else '       '} "
                  f"{'kept' if t['kept'] else 'dropped'}" for t in row["tokens"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a run's output folder (logs/<task>/runs/<time>)")
    ap.add_argument("--open", action="store_true", help="open the index in the default browser")
    ap.add_argument("--step", type=int, default=None, help="print this step's page as text")
    args = ap.parse_args(argv)
    found = pages(args.run)
    if args.step is not None:
        page = args.run / "rollouts" / f"step_{args.step:06d}.json"
        if not page.exists():
            steps = ", ".join(str(int(p.stem.split("_")[1])) for p in found)
            raise SystemExit(f"no page for step {args.step} in {args.run}; pages exist for steps {steps}")
        print(as_text(page))
        return 0
    for page in found:
        print(page)
    index = args.run / "rollouts" / "index.html"
    print(f"index: {index}")
    if args.open:
        webbrowser.open(index.resolve().as_uri())
    return 0


if __name__ == "__main__":
    sys.exit(main())
