"""A screenshot of a run's Custom Scalars page in real TensorBoard, taken by headless Chromium.

    ./run.sh --tensorboard_dir=/tmp/sam_eos_tb --layer_sharpness --max_steps=1500 \
        --time_limit_in_hours=0.5
    python3 -m experiments.tensorboard_screenshot --log_dir=/tmp/sam_eos_tb \
        --screenshot=docs/tensorboard.png     # the README's picture

Starts `tensorboard --logdir LOG_DIR` on a free port of 127.0.0.1, waits until it serves the
run's custom-scalars layout and its lambda_max points, has headless Chromium (Debian's
`chromium` package: `apt-get install chromium`) load the page `#custom_scalars` with no
smoothing, then stops TensorBoard and scales the picture to `--width` pixels.

TensorBoard colours a chart's curves by run, so one run's curves share a colour and only their
markers differ; the legend is each chart's "Matches" list, closed at first. The browser
therefore goes through a small proxy in front of TensorBoard that adds one script to the page
(and drops the page's Content-Security-Policy header, which forbids such a script): it opens
every chart's "Matches" list and widens the first chart, as clicks would, and turns off "Ignore
outliers in chart scaling" (a setting kept in the browser's local storage), so every point is
on the chart.

Not part of the suite: it needs the `tensorboard` package (`pip install tensorboard`, found on
the PATH or beside this Python, or `--tensorboard=PATH`; tensorboardX, which the programs write
with, does not bring it) and a browser (`--chromium=PATH`).
"""

import argparse
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

from sam_eos.reports.tensorboard_writer import tag_for

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars")


# Run first in the page: the outliers setting is read when the charts are made. Once the cards
# exist (looked for every 500 ms), the first chart (the layout's first: lambda_max, the SAM edge
# and 2/eta) is widened as its "fullscreen" button does, and every card's "Matches" list opened
# at once (no animation: headless Chromium's virtual time may not run it to its end).
PAGE_SCRIPT = """<script>
localStorage.setItem("_ignoreYOutliers", "false");
(function () {
  function cards(root, found) {
    for (const element of root.querySelectorAll("*")) {
      if (element.tagName === "TF-CUSTOM-SCALAR-MULTI-LINE-CHART-CARD") found.push(element);
      if (element.shadowRoot) cards(element.shadowRoot, found);
    }
    return found;
  }
  const timer = setInterval(function () {
    const found = cards(document, []);
    if (!found.length) return;
    clearInterval(timer);
    if (!found[0]._expanded) found[0]._toggleExpanded();
    for (const card of found) {
      for (const list of card.shadowRoot.querySelectorAll("iron-collapse")) {
        list.noAnimation = true;
      }
      if (!card._matchesListOpened) card._toggleMatchesOpen();
    }
  }, 500);
})();
</script>"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def wait_for_data(base: str, server: subprocess.Popen, timeout_s: float) -> None:
    """Until TensorBoard serves a layout and the lambda_max points (it loads the event files
    in the background after it starts listening)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"tensorboard exited with code {server.returncode}")
        try:
            layout = get_json(f"{base}/data/plugin/custom_scalars/layout")
            tags = get_json(f"{base}/data/plugin/scalars/tags")
            if layout.get("category") and any(
                    tag_for("lambda_max") in run_tags for run_tags in tags.values()):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"tensorboard served no custom-scalars layout in {timeout_s:.0f} s")


def proxy(target: str) -> http.server.ThreadingHTTPServer:
    """A server on a free port of 127.0.0.1 that passes every request on to `target` and the
    answers back, with PAGE_SCRIPT added to the page itself ("/")."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            headers = {name: value for name, value in self.headers.items() if name.lower()
                       not in ("host", "connection", "accept-encoding", "content-length")}
            request = urllib.request.Request(
                target + self.path, data=self.rfile.read(length) if length else None,
                headers=headers, method=self.command)
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    status, reply, body = response.status, response.headers, response.read()
            except urllib.error.HTTPError as error:
                status, reply, body = error.code, error.headers, error.read()
            page = self.path.split("?")[0].split("#")[0] in ("/", "/index.html")
            if page:
                body = body.replace(b"<head>", b"<head>" + PAGE_SCRIPT.encode(), 1)
            self.send_response(status)
            for name, value in reply.items():
                if name.lower() not in ("content-length", "connection", "transfer-encoding") and (
                        not page or name.lower() != "content-security-policy"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = forward

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def screenshot(args) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as scratch:
        log = open(os.path.join(scratch, "tensorboard.log"), "w")  # noqa: SIM115
        server = subprocess.Popen(
            [args.tensorboard, "--logdir", args.log_dir, "--host", "127.0.0.1",
             "--port", str(port), "--reload_interval", "1"], stdout=log, stderr=log)
        try:
            wait_for_data(base, server, args.timeout_s)
            raw = os.path.join(scratch, "screenshot.png")
            front = proxy(base)
            try:
                page = f"http://127.0.0.1:{front.server_address[1]}/"
                subprocess.run(
                    [args.chromium, *CHROMIUM_FLAGS, f"--user-data-dir={scratch}/profile",
                     f"--window-size={args.window_size}",
                     f"--force-device-scale-factor={args.scale}",
                     f"--virtual-time-budget={args.virtual_time_ms}", f"--screenshot={raw}",
                     f"{page}#custom_scalars&_smoothingWeight=0"],
                    check=True, timeout=args.timeout_s, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
            finally:
                front.shutdown()
                front.server_close()
        finally:
            server.terminate()
            server.wait(timeout=30)
            log.close()
        shrink(raw, args.screenshot, args.width)
    print(f"wrote {args.screenshot}")


def shrink(source: str, target: str, width: int) -> None:
    """`source` scaled to `width` pixels wide (kept if narrower), saved as an optimised PNG."""
    from PIL import Image

    with Image.open(source) as image:
        image = image.convert("RGB")
        if image.width > width:
            image = image.resize((width, round(image.height * width / image.width)),
                                 Image.Resampling.LANCZOS)
        image.save(target, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log_dir", required=True, help="the run's --tensorboard_dir")
    parser.add_argument("--screenshot", default="tensorboard.png")
    parser.add_argument("--tensorboard", default=shutil.which("tensorboard") or os.path.join(
        os.path.dirname(sys.executable), "tensorboard"))
    parser.add_argument("--chromium", default="chromium")
    parser.add_argument("--window_size", default="1000,1210",
                        help="the browser's, in CSS pixels")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="device pixels per CSS pixel (sharper text when > 1)")
    parser.add_argument("--width", type=int, default=1000, help="the PNG's, in pixels")
    parser.add_argument("--virtual_time_ms", type=int, default=20000,
                        help="Chromium's virtual time for the page to load and draw")
    parser.add_argument("--timeout_s", type=float, default=120.0)
    args = parser.parse_args()
    if not os.path.isdir(args.log_dir):
        parser.error(f"--log_dir={args.log_dir} is not a folder")
    screenshot(args)


if __name__ == "__main__":
    main()
