"""Write docs/explore.png: the explorer's page on the embedded DINOv2 (astronaut, Auto vs ToMe at
keep 0.25, measured times shown), taken by headless Debian chromium and stored as a small palette PNG.

    python scripts/explore_screenshot.py [--out docs/explore.png] [--image skimage:astronaut] [--keep 0.25]

Needs chromium, chromium-driver (apt) and selenium (the dev extra), like the browser test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from browser import chromium, missing_browser, serving  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/explore.png")
    parser.add_argument("--image", default="skimage:astronaut")
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--width", type=int, default=1100, help="width of the stored PNG in px")
    args = parser.parse_args()
    reason = missing_browser()
    if reason:
        print(reason, file=sys.stderr)
        return 1

    from PIL import Image
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from tokenbudget.explore import Explorer
    from tokenbudget.models import load_model

    explorer = Explorer(load_model("dinov2_small"), model_name="dinov2_small")
    with tempfile.TemporaryDirectory() as tmp, serving(explorer) as url:
        with chromium(Path(tmp) / "profile", width=1140, height=1180) as driver:
            driver.get(url)
            wait = WebDriverWait(driver, 600, poll_frequency=0.2)

            def idle(d) -> bool:  # noqa: ANN001
                body = d.find_element("tag name", "body").get_attribute("data-busy") == "0"
                return body and "ms" in d.find_element("id", "time-b").text

            wait.until(lambda d: d.find_element("id", "tokens-a").text not in ("", "-"))
            Select(driver.find_element("id", "image")).select_by_value(args.image)
            driver.execute_script(
                "const s = document.getElementById('slider'); s.value = arguments[0];"
                "s.dispatchEvent(new Event('input'));",
                str(args.keep),
            )
            wait.until(idle)
            shot = Path(tmp) / "page.png"
            driver.save_screenshot(str(shot))
        with Image.open(shot) as page:
            page = page.convert("RGB")
            height = round(page.height * args.width / page.width)
            small = page.resize((args.width, height), Image.Resampling.LANCZOS).quantize(colors=128)
            small.save(args.out, optimize=True)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size // 1024} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
