"""A saved run's rollout pages, without loading a model (``src/callbacks/rollout_viewer.py`` writes them).

    python src/inspect_run.py <run dir>            # lists the pages, newest last, and the index's path
    python src/inspect_run.py <run dir> --open     # and opens the index in the default browser
    python src/inspect_run.py <run dir> --step 50  # one page's rows as text: token | reward | clipped | kept
    python src/inspect_run.py <run dir> --step 50 --screenshot page.png  # the page in headless Chromium, as a PNG
                                                   # (without --step: the newest page); fails on a script error
"""

from __future__ import annotations

import argparse
import json
import sys
import webbrowser
from pathlib import Path

from src.utils.headless_browser import screenshot


def pages(run: Path, dirname: str = "rollouts") -> list[Path]:
    folder = run / dirname
    if not run.is_dir():
        raise SystemExit(f"{run} does not exist or is not a folder: give a run's output folder (logs/<task>/runs/<time>)")
    if run.name == dirname and not folder.is_dir():
        raise SystemExit(f"{run} is a {dirname}/ folder: give the run's output folder above it ({run.parent})")
    if not folder.is_dir():
        raise SystemExit(f"{run} has no {dirname}/ folder: the run wrote no rollout pages (callbacks.rollout_viewer "
                         f"writes one every every_n_steps steps under REOPOLD, OPD or GRPO)")
    return sorted(folder.glob("step_*.html"))


def as_text(page_json: Path) -> str:
    data = json.loads(page_json.read_text())
    lines = [" ".join(f"{k}={v}" for k, v in data["header"].items() if k in ("step", "phase", "selection", "floor"))]
    for i, row in enumerate(data["rows"]):
        lines.append(f"--- row {i}: {row['prompt']!r}" + (f" ({len(row['images'])} images)" if row.get("images") else ""))
        replies = {r["at"]: r["text"] for r in row.get("tool_replies", [])}  # pages before tool replies had none
        for k, t in enumerate(row["tokens"]):
            if k in replies:
                lines.append(f"[tool reply, not scored] {replies.pop(k)!r}")
            lines.append(f"{t['text']!r:>12} {t['reward']:+.3f} {'clipped' if t['clipped'] else '       '} "
                         f"{'kept' if t['kept'] else 'dropped'}")
        lines += [f"[tool reply, not scored] {text!r}" for text in replies.values()]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a run's output folder (logs/<task>/runs/<time>)")
    ap.add_argument("--open", action="store_true", help="open the index in the default browser")
    ap.add_argument("--step", type=int, default=None, help="print this step's page as text")
    ap.add_argument("--screenshot", type=Path, default=None, metavar="PNG",
                    help="render the page (--step's, else the newest) in headless Chromium into this PNG")
    args = ap.parse_args(argv)
    if args.open and (args.step is not None or args.screenshot is not None):
        ap.error("--open opens the index; use it without --step and --screenshot")
    found = pages(args.run)
    if not found:
        raise SystemExit(f"{args.run / 'rollouts'} holds no page yet")
    if args.step is not None and not (args.run / "rollouts" / f"step_{args.step:06d}.json").exists():
        steps = ", ".join(str(int(p.stem.split("_")[1])) for p in found)
        raise SystemExit(f"no page for step {args.step} in {args.run}; pages exist for steps {steps}")
    if args.screenshot is not None:
        page = args.run / "rollouts" / f"step_{args.step:06d}.html" if args.step is not None else found[-1]
        args.screenshot.parent.mkdir(parents=True, exist_ok=True)
        try:
            rendered = screenshot(page, args.screenshot)
        except FileNotFoundError as e:  # no browser: what to install, not a traceback
            raise SystemExit(str(e)) from None
        print(f"{page} -> {rendered.png}")
        for error in rendered.errors:
            print(f"script error: {error}", file=sys.stderr)
        return 1 if rendered.errors else 0
    if args.step is not None:
        print(as_text(args.run / "rollouts" / f"step_{args.step:06d}.json"))
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
