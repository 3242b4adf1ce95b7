"""Does the evaluation report fit a laptop screen? Render it in headless Chromium and check.

    python benchmarks/screenshot_report.py runs/quickstart/eval/report.html
    python benchmarks/screenshot_report.py runs/quickstart/eval/report.html --rebuild   # with today's report code

Chromium (Debian: ``apt-get install -y chromium``) renders the page at ``--size`` (default
1366x768, a common laptop screen) twice:

* ``--screenshot``: what the screen shows -> ``benchmarks/results/report_screenshot.png``, and the
  whole page at the same width -> ``report_screenshot_full.png``;
* ``--dump-dom`` of a copy of the page in a temporary folder, with a ``<base>`` pointing at the
  original's folder (images load the same) and a small script appended: the script measures
  ``document.documentElement.scrollWidth`` against ``innerWidth`` and lists every element whose right
  edge passes the window. The page fits when nothing does.

``--rebuild`` first writes the report again from its ``metrics.json`` (``hetray.eval.report``) into
a temporary folder, so an older run shows what the current code makes of it.

Prints the measurements as JSON and exits 1 when the page is wider than the window.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MEASURE = """<script>
window.addEventListener('load', () => {
  const w = window.innerWidth, wide = [];
  for (const el of document.body.querySelectorAll('*')) {
    const r = el.getBoundingClientRect();
    if (r.right > w + 0.5) wide.push({tag: el.tagName.toLowerCase(), right: Math.round(r.right),
                                      text: (el.getAttribute('src') || el.textContent || '').slice(0, 60)});
  }
  const imgs = [...document.images].map(i => ({src: i.getAttribute('src'), natural: i.naturalWidth,
                                                shown: Math.round(i.getBoundingClientRect().width)}));
  const out = document.createElement('pre');
  out.id = 'hetray-measure';
  out.textContent = JSON.stringify({innerWidth: w, scrollWidth: document.documentElement.scrollWidth,
                                    scrollHeight: document.documentElement.scrollHeight, wide, images: imgs});
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    raise SystemExit("no Chromium found: apt-get install -y chromium")


def run(browser: str, args: list[str]) -> str:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--allow-file-access-from-files", "--virtual-time-budget=5000", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done.stdout


def measure(browser: str, page: Path, width: int, height: int, tmp: Path) -> dict:
    probe = tmp / "measure.html"
    text = page.read_text().replace("<head>", f'<head><base href="{page.parent.as_uri()}/">', 1)
    probe.write_text(text.replace("</body>", MEASURE + "</body>"))
    dom = run(browser, [f"--window-size={width},{height}", "--dump-dom", probe.as_uri()])
    found = re.search(r'<pre id="hetray-measure">(.*?)</pre>', dom, re.S)
    if not found:
        raise SystemExit("the measuring script did not run (no result in the DOM)")
    return json.loads(html.unescape(found.group(1)))


def rebuild(page: Path, into: Path) -> Path:
    """The report written again from ``metrics.json`` beside ``page``, by today's code."""
    from hetray.eval.report import write_report

    src = page.parent
    shutil.copytree(src, into, dirs_exist_ok=True)
    saved = json.loads((src / "metrics.json").read_text())
    meta = saved.pop("_meta")
    names = write_report(saved, into, run_info=meta.get("runs") or {}, paired=meta.get("paired"),
                         bootstrap=meta.get("bootstrap"))
    return into / names["html"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("report", type=Path, help="an evaluation's report.html")
    p.add_argument("--size", default="1366x768", help="window WIDTHxHEIGHT (default: 1366x768)")
    p.add_argument("--out", type=Path, default=RESULTS / "report_screenshot.png")
    p.add_argument("--rebuild", action="store_true", help="write the report again with the current code first")
    args = p.parse_args(argv)
    width, height = (int(x) for x in args.size.lower().split("x"))
    browser = chromium()
    with tempfile.TemporaryDirectory() as tmp:
        page = rebuild(args.report, Path(tmp) / "eval") if args.rebuild else args.report.resolve()
        found = measure(browser, page, width, height, Path(tmp))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        run(browser, [f"--window-size={width},{height}", f"--screenshot={args.out.resolve()}", page.as_uri()])
        full = args.out.with_name(f"{args.out.stem}_full{args.out.suffix}")
        run(browser, [f"--window-size={width},{found['scrollHeight']}", f"--screenshot={full.resolve()}", page.as_uri()])
    fits = found["scrollWidth"] <= found["innerWidth"] and not found["wide"]
    print(json.dumps({"report": str(args.report), "rebuilt": args.rebuild, "window": [width, height],
                      "fits": fits, **found, "screenshot": str(args.out), "full_page": str(full)}, indent=1))
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
