"""tokenbudget explore in a real browser: headless Chromium moves the budget slider on the embedded
DINOv2 and sees the merge picture, token counts, FLOPs and measured time change; a bad upload
shows its sentence on the page."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from browser import chromium, missing_browser, serving

pytestmark = pytest.mark.slow

#: generous: a forward of the embedded ViT-S/14 takes seconds on a loaded 2-core machine
WAIT_S = 240


@pytest.fixture(scope="module")
def explorer():  # noqa: ANN201 - tokenbudget.explore.Explorer
    from tokenbudget.explore import Explorer
    from tokenbudget.models import load_model

    return Explorer(load_model("dinov2_small"), model_name="dinov2_small")


def _settled(driver, *ids: str) -> bool:  # noqa: ANN001 - a selenium driver
    """No request in flight and every element of ``ids`` filled in."""
    if driver.find_element("tag name", "body").get_attribute("data-busy") != "0":
        return False
    return all(driver.find_element("id", i).text not in ("", "-") for i in ids)


def _final_tokens(text: str) -> int:
    """The count after the arrow in '257 → 129 (keep 0.500)'."""
    return int(text.split("\u2192")[1].split()[0])


def test_the_slider_changes_the_picture_and_the_tokens(explorer, tmp_path: Path) -> None:  # noqa: ANN001
    reason = missing_browser()
    if reason:
        pytest.skip(reason)
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    patches = explorer.adapter.grid[0] * explorer.adapter.grid[1]
    prefix = explorer.adapter.num_prefix
    with serving(explorer) as url, chromium(tmp_path / "profile") as driver:
        driver.get(url)
        wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.2)
        wait.until(lambda d: _settled(d, "tokens-a", "tokens-b"))
        assert driver.find_element("id", "error").get_attribute("hidden") is not None
        # the page opens on the recommended method against the paper's
        assert [driver.find_element("id", f"method-{p}").get_attribute("value") for p in "ab"] == [
            "auto",
            "tome",
        ]
        before_picture = driver.find_element("id", "picture-a").get_attribute("src")
        before_tokens = driver.find_element("id", "tokens-a").text
        assert _final_tokens(before_tokens) == prefix + round(0.5 * patches)

        # A user's move: focus the slider and press the left arrow 25 times (0.50 -> 0.25).
        slider = driver.find_element("id", "slider")
        slider.click()
        slider.send_keys(Keys.END)
        slider.send_keys(*[Keys.LEFT] * 75)
        assert driver.find_element("id", "budget-value").text == "0.25"
        wait.until(lambda d: _settled(d, "tokens-a", "tokens-b"))
        wait.until(
            lambda d: _final_tokens(d.find_element("id", "tokens-a").text) == prefix + round(0.25 * patches)
        )
        assert driver.find_element("id", "picture-a").get_attribute("src") != before_picture
        assert _final_tokens(driver.find_element("id", "tokens-b").text) == prefix + round(0.25 * patches)
        points = driver.find_element("css selector", "#chart polyline.series-a").get_attribute("points")
        assert len(points.split()) == explorer.adapter.num_layers + 1

        # The measured times arrive once the panels settle.
        wait.until(
            lambda d: (
                "ms" in d.find_element("id", "time-a").text and "ms" in d.find_element("id", "time-b").text
            )
        )
        screenshot = tmp_path / "explore.png"
        driver.save_screenshot(str(screenshot))
        with Image.open(screenshot) as shot:
            assert shot.size[0] >= 800 and shot.getextrema() != ((255, 255),) * 3

        # A FLOPs-ideal speedup budget: the panel reaches at least the slider's speedup.
        driver.find_element("css selector", 'input[name="kind"][value="speedup"]').click()
        wait.until(lambda d: d.find_element("id", "budget-value").text.endswith("\u00d7"))
        wanted = float(driver.find_element("id", "slider").get_attribute("value"))
        wait.until(lambda d: _settled(d, "flops-a"))
        wait.until(lambda d: float(d.find_element("id", "flops-a").text.split("\u00d7")[0]) >= wanted - 5e-3)

        # An uploaded photo becomes the image of both panels.
        photo = tmp_path / "photo.png"
        Image.linear_gradient("L").convert("RGB").resize((300, 200)).save(photo)
        before_picture = driver.find_element("id", "picture-a").get_attribute("src")
        driver.find_element("id", "upload").send_keys(str(photo))
        wait.until(lambda d: d.find_element("id", "image").get_attribute("value").startswith("upload:"))
        wait.until(lambda d: _settled(d, "tokens-a", "tokens-b"))
        wait.until(lambda d: d.find_element("id", "picture-a").get_attribute("src") != before_picture)
        assert "upload: photo.png" in driver.find_element("id", "image").text

        # A file that is not an image: the page says so.
        not_an_image = tmp_path / "notes.txt"
        not_an_image.write_text("not an image")
        driver.find_element("id", "upload").send_keys(str(not_an_image))
        wait.until(lambda d: d.find_element("id", "error").is_displayed())
        assert "not an image" in driver.find_element("id", "error").text

        severe = [
            e
            for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and "api/upload" not in e["message"]
        ]
        assert not severe, severe
