"""The block page in a real headless Chromium at tablet size: it renders, fits, and its words are where a child
looks. The screenshots are kept in the test's temporary directory for a human to look at."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from policy.snapshot import Snapshot
from tests.conftest import snapshot_of
from tests.test_proxy_hooks import FILES, request

TABLET_SIZES = [(768, 1024), (1024, 768), (1180, 820)]  # iPad portrait, landscape, iPad Air landscape
BACKGROUND = (0xEE, 0xF3, 0xF8)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    return snapshot_of(tmp_path_factory.mktemp("page"), FILES)


def screenshot(page: Path, size: tuple[int, int], out: Path) -> Image.Image:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is needed (make test installs Debian's chromium package)"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--no-first-run", f"--user-data-dir={out.parent / 'chromium-profile'}",
                    f"--window-size={size[0]},{size[1]}", f"--screenshot={out}", page.as_uri()],
                   check=True, capture_output=True, timeout=60)
    return Image.open(out).convert("RGB")


def close(color: tuple[int, ...], expected: tuple[int, int, int], tolerance: int = 6) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(color, expected, strict=False))


@pytest.mark.parametrize("size", TABLET_SIZES, ids=[f"{w}x{h}" for w, h in TABLET_SIZES])
def test_the_block_page_renders_and_fits_a_tablet(snapshot: Snapshot, tmp_path: Path,
                                                  size: tuple[int, int]) -> None:
    flow = request(snapshot, "http://www.roblox.com/games")
    assert flow.response is not None
    page = tmp_path / "block.html"
    page.write_bytes(flow.response.content or b"")
    image = screenshot(page, size, tmp_path / f"block-{size[0]}x{size[1]}.png")
    width, height = image.size
    assert (width, height) == size
    pixels = image.load()
    assert pixels is not None
    # The page's background around the card, the white card in the middle.
    assert close(pixels[2, 2], BACKGROUND) and close(pixels[width - 3, height - 3], BACKGROUND)
    assert close(pixels[width // 2, int(height * 0.12)], (255, 255, 255), 2)
    # Nothing spills to the edges: the outer columns are background from top to bottom.
    assert all(close(pixels[x, y], BACKGROUND) for x in (1, width - 2) for y in range(0, height, 7))
    # Dark text (the title) sits in the top half, in view without scrolling; the site's name in blue below it.
    top = [pixels[x, y] for y in range(0, height // 2, 2) for x in range(0, width, 2)]
    assert sum(1 for p in top if max(p) < 80) > 200
    assert sum(1 for p in top if p[2] > 150 and p[0] < 60) > 50
    assert sum(1 for p in top if close(p, (0xE8, 0x62, 0x3A), 12)) > 200  # the drawn icon, no font needed


def test_the_page_text_is_what_chromium_reads(snapshot: Snapshot, tmp_path: Path) -> None:
    flow = request(snapshot, "http://www.roblox.com/games", headers={"Accept-Language": "en"})
    assert flow.response is not None
    page = tmp_path / "block.html"
    page.write_bytes(flow.response.content or b"")
    chromium = shutil.which("chromium") or "chromium"
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    assert "<h1>This site is blocked</h1>" in dom and "This site belongs to a blocked category." in dom
