"""A page rendered by headless Chromium: a PNG screenshot and the page's uncaught script errors.

Chromium is the system's (Debian's ``chromium``, which ``make setup`` installs where apt-get can; ``$CHROMIUM`` names
another binary). One browser process per page, with ``--screenshot`` (the viewport, once the page has loaded) and
its log on stderr (``--enable-logging=stderr``), where Chromium writes every console message as
``[...:CONSOLE...] "<message>", source: <url> (<line>)``; an uncaught exception or rejected promise is such a message
beginning with ``Uncaught``. ``tests/test_rollout_viewer.py`` checks that a page with a script error is
caught, so a change of that log format fails a test instead of passing pages unread.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CONSOLE = re.compile(r':CONSOLE[^\]]*\] "(?P<message>.*)", source: (?P<source>.*)$')


@dataclasses.dataclass
class Rendered:
    png: Path
    console: list[str]  # every console message, in order
    errors: list[str]  # the uncaught exceptions among them


def find_chromium() -> str | None:
    """The Chromium binary: ``$CHROMIUM``, else the first of ``BROWSERS`` on the PATH; None if there is none."""
    named = os.environ.get("CHROMIUM")
    return shutil.which(named) if named else next(filter(None, map(shutil.which, BROWSERS)), None)


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 960, timeout: float = 120) -> Rendered:
    """Loads ``page`` (a local HTML file) in a ``width`` x ``height`` window and writes the screenshot to ``png``."""
    browser = find_chromium()
    if browser is None:
        named = os.environ.get("CHROMIUM")
        where = f"$CHROMIUM={named!r} is not an executable" if named else \
            f"none of {', '.join(BROWSERS)} on the PATH and no $CHROMIUM"
        raise FileNotFoundError(f"no Chromium: {where}; `make setup` installs Debian's chromium (apt-get install "
                                f"chromium)")
    png = Path(png).resolve()
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:  # a fresh profile: no locks, nothing kept
        proc = subprocess.run(
            [browser, "--headless", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--no-sandbox",  # the sandbox needs user namespaces a container or root lacks; the page is our own file
             "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}", f"--window-size={width},{height}",
             f"--screenshot={png}", Path(page).resolve().as_uri()],
            check=False, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not png.is_file():
        raise RuntimeError(f"{browser} rendered no screenshot of {page} (exit {proc.returncode}): "
                           f"{proc.stderr[-2000:]}")
    console = [m["message"] for m in map(CONSOLE.search, proc.stderr.splitlines()) if m]
    return Rendered(png, console, [m for m in console if m.startswith("Uncaught")])
