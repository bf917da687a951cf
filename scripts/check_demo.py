"""Checks `vda-jax demo` in a real browser: serve, upload the sample, wait for the depth, save a screenshot.

Starts `vda-jax demo` on a free local port, opens the page in headless Chromium
through Selenium, uploads the bundled sample video, presses "Compute depth", saves
a screenshot while the progress bar runs and one of the finished page, then uploads
a text file named .mp4 and a file over the size limit and checks that the page says
why (a screenshot each), stops the server with Ctrl-C and checks that it left no
temporary folder.

Needs Chromium and its driver (Debian: `apt-get install chromium chromium-driver`)
and Selenium (`pip install selenium`), neither of them a dependency of vda-jax.

  python scripts/check_demo.py /tmp/demo.png [--checkpoint DIR] [--max-len 48]
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

try:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # not a dependency of vda-jax: main() says what to install
    webdriver = None

from vda_jax.assets import SAMPLE_VIDEO

MAX_UPLOAD_MB = 1  # the sample is smaller, the refused upload larger


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int, tmp: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "vda_jax.cli", "demo", "--port", str(port), "--max-len", str(args.max_len),
               "--max-upload-mb", str(MAX_UPLOAD_MB)]
    command += ["--checkpoint", args.checkpoint] if args.checkpoint else []
    server = subprocess.Popen(command, env={**os.environ, "TMPDIR": tmp})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit(f"the server did not answer at {url} in {args.timeout} s")


def browser(args: argparse.Namespace) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = args.chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=args.chromedriver))


def screenshot(driver: webdriver.Chrome, path: str) -> None:
    """The whole page, also what lies below the window."""
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    with open(path, "wb") as f:
        f.write(base64.b64decode(shot["data"]))


def check_page(driver: webdriver.Chrome, url: str, args: argparse.Namespace) -> str:
    """Uploads the sample and computes its depth; returns the status line."""
    driver.get(url)
    wait = WebDriverWait(driver, args.timeout)
    upload = wait.until(expected_conditions.presence_of_element_located(
        (By.CSS_SELECTOR, "#input-video input[type=file]")))
    upload.send_keys(SAMPLE_VIDEO)
    wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#input-video video")))
    driver.find_element(By.CSS_SELECTOR, "#compute").click()
    progress = f"{os.path.splitext(args.output)[0]}_progress.png"
    try:  # the progress bar with frames/s, if the run is slow enough to catch it
        WebDriverWait(driver, 60).until(lambda d: "frames/s" in d.find_element(By.CSS_SELECTOR, "#pair").text)
        screenshot(driver, progress)
        print(f"wrote {progress}")
    except Exception:  # noqa: BLE001 (a fast run finishes first)
        print("the run finished before its progress could be captured")
    wait.until(lambda d: "frames of" in d.find_element(By.CSS_SELECTOR, "#status").text)
    wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#plot img")))
    wait.until(lambda d: d.execute_script(
        "const v = document.querySelector('#pair video'); return v !== null && v.readyState >= 2;"))
    time.sleep(1.0)  # let the video draw a frame
    screenshot(driver, args.output)
    return driver.find_element(By.CSS_SELECTOR, "#status").text


def check_refusals(driver: webdriver.Chrome, url: str, args: argparse.Namespace, tmp: str) -> list[str]:
    """Uploads a text file named .mp4 and a file over the size limit, presses the sample button; returns what
    the page did not say or do."""
    text, big = os.path.join(tmp, "notes.mp4"), os.path.join(tmp, "big.mp4")
    with open(text, "w") as f:
        f.write("a text file, not a video\n")
    with open(big, "wb") as f:
        f.write(bytes(MAX_UPLOAD_MB * 2**20 + 1))
    missing = []
    refusals = [(text, "could not be read as a video", True), (big, "exceed the maximum allowed size", False)]
    for path, expected, compute in refusals:
        driver.get(url)
        upload = WebDriverWait(driver, args.timeout).until(expected_conditions.presence_of_element_located(
            (By.CSS_SELECTOR, "#input-video input[type=file]")))
        upload.send_keys(path)
        if compute:
            driver.find_element(By.CSS_SELECTOR, "#compute").click()
        shot = f"{os.path.splitext(args.output)[0]}_{os.path.splitext(os.path.basename(path))[0]}.png"
        try:
            WebDriverWait(driver, 30).until(lambda d, e=expected: e in d.find_element(By.TAG_NAME, "body").text)
        except Exception:  # noqa: BLE001 (reported below, with the screenshot)
            missing.append(f"{os.path.basename(path)}: no message with {expected!r} (see {shot})")
        screenshot(driver, shot)
        print(f"wrote {shot}")
    driver.get(url)  # and the sample button, which loads the sample without an upload
    WebDriverWait(driver, args.timeout).until(expected_conditions.element_to_be_clickable(
        (By.XPATH, "//button[contains(., 'Use the sample video')]"))).click()
    try:
        WebDriverWait(driver, 30).until(expected_conditions.presence_of_element_located(
            (By.CSS_SELECTOR, "#input-video video")))
    except Exception:  # noqa: BLE001 (reported by the caller)
        missing.append("'Use the sample video' did not load the sample")
    return missing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="screenshot to write (PNG)")
    parser.add_argument("--checkpoint", help="model directory (default: the bundled demo model)")
    parser.add_argument("--max-len", type=int, default=48, help="the server's frame limit")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for each step")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--chromedriver", default=shutil.which("chromedriver") or "chromedriver")
    args = parser.parse_args()
    missing_tools = [name for name, found in (
        ("Selenium (pip install selenium)", webdriver is not None),
        (f"Chromium ({args.chromium})", shutil.which(args.chromium)),
        (f"its driver ({args.chromedriver})", shutil.which(args.chromedriver))) if not found]
    if missing_tools:
        sys.exit(f"check_demo.py: error: missing {', '.join(missing_tools)}; on Debian: apt-get install "
                 "chromium chromium-driver, or give --chromium and --chromedriver")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="check-demo-") as tmp:
        server = start_server(args, port, tmp)
        try:
            driver = browser(args)
            try:
                status = check_page(driver, f"http://127.0.0.1:{port}/", args)
                missing = check_refusals(driver, f"http://127.0.0.1:{port}/", args, tmp)
            finally:
                driver.quit()
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=60)
        left = [name for name in os.listdir(tmp) if name.startswith("vda-jax-demo-")]
    print(f"wrote {args.output}; status: {status}")
    print(f"server exited with {server.returncode}; temporary folders left: {left or 'none'}")
    for line in missing:
        print(line)
    if left or missing:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
