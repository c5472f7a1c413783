"""A bundled sample catalogue with images served on loopback, for ``item-embeddings demo``.

Everything is generated (no download): product-like titles and descriptions in a few categories, and
one small picture per item whose colour and shape follow the category, served by a local aiohttp
server so the image step downloads over real HTTP.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import pyarrow as pa

from .loop_thread import LoopThread

CATEGORIES = {
    # category: (colour, shape, product nouns)
    "Headphones": ((200, 40, 40), "ellipse", ["over-ear headphones", "wireless earbuds",
                                             "noise-cancelling headset"]),
    "Cables": ((40, 90, 200), "line", ["USB-C cable", "HDMI cable", "Lightning cable"]),
    "Keyboards": ((40, 160, 70), "rectangle", ["mechanical keyboard", "wireless keyboard",
                                               "gaming keypad"]),
    "Storage": ((230, 170, 20), "square", ["portable SSD", "microSD card", "USB flash drive"]),
    "Cameras": ((120, 50, 170), "circle", ["4K webcam", "action camera", "security camera"]),
    "Chargers": ((30, 160, 170), "triangle", ["65W GaN charger", "wireless charging pad",
                                              "car charger"]),
}
BRANDS = ["Acme", "Volt", "Nimbus", "Orion", "Kestrel", "Lumen", "Zephyr", "Quanta"]
FEATURES = ["compact design", "two-year warranty", "fast shipping", "braided jacket",
            "low latency", "aluminium body", "travel pouch included", "energy efficient"]
FORMATS = [("JPEG", "jpg", "image/jpeg"), ("PNG", "png", "image/png"),
           ("WEBP", "webp", "image/webp")]


def make_sample_catalogue(n: int = 120, image_base_url: str = "", seed: int = 0) -> pa.Table:
    """``n`` items (``asin``, ``title``, ``description`` list, ``image_url``, ``main_category``).

    Three items in four have an image URL under ``image_base_url`` (none when it is empty).
    """
    rng = random.Random(seed)
    names = list(CATEGORIES)
    rows: dict[str, list] = {"asin": [], "title": [], "description": [], "image_url": [],
                             "main_category": []}
    for i in range(n):
        category = names[i % len(names)]
        noun = rng.choice(CATEGORIES[category][2])
        rows["asin"].append(f"S{i:06d}")
        rows["title"].append(f"{rng.choice(BRANDS)} {noun} {rng.choice(['Pro', 'Lite', 'X', '2'])}")
        rows["description"].append([f"<p>A {noun} with {rng.choice(FEATURES)}.</p>",
                                    f"Ideal for home &amp; office; {rng.choice(FEATURES)}."])
        ext = FORMATS[i % len(FORMATS)][1]
        has_image = image_base_url and i % 4 != 3
        rows["image_url"].append(f"{image_base_url}/img/{i}.{ext}" if has_image else None)
        rows["main_category"].append(category)
    return pa.table(rows)


def render_sample_image(index: int, size: int = 96) -> tuple[bytes, str]:
    """The picture of item ``index``: its category's colour and shape, a little jitter."""
    from PIL import Image, ImageDraw

    names = list(CATEGORIES)
    colour, shape, _ = CATEGORIES[names[index % len(names)]]
    rng = random.Random(index)
    img = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    m = rng.randint(8, 20)
    box = (m, m, size - m, size - m)
    fill = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in colour)
    if shape in ("ellipse", "circle"):
        draw.ellipse(box if shape == "circle" else (m, size // 4, size - m, 3 * size // 4),
                     fill=fill)
    elif shape == "line":
        draw.line((m, m, size - m, size - m), fill=fill, width=10)
    elif shape == "triangle":
        draw.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=fill)
    elif shape == "rectangle":
        draw.rectangle((m, size // 3, size - m, 2 * size // 3), fill=fill)
    else:
        draw.rectangle(box, fill=fill)
    fmt, _, content_type = FORMATS[index % len(FORMATS)]
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue(), content_type


class SampleImageServer:
    """Serves ``/img/<index>.<ext>`` on 127.0.0.1 from a background thread.

    Example::

        with SampleImageServer() as server:
            table = make_sample_catalogue(50, server.base_url)
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host, self.port = host, port
        self._loop_thread: LoopThread | None = None
        self._runner = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def _handle(self, request):
        from aiohttp import web

        stem = request.match_info["name"].split(".")[0]
        if not stem.isdigit():
            raise web.HTTPNotFound()
        body, content_type = render_sample_image(int(stem))
        return web.Response(body=body, content_type=content_type)

    async def _serve(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/img/{name}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def start(self) -> SampleImageServer:
        self._loop_thread = LoopThread("sample-image-server").start()
        self._loop_thread.run(self._serve())
        return self

    def stop(self) -> None:
        if self._loop_thread is None:
            return
        if self._runner is not None:
            self._loop_thread.run(self._runner.cleanup())
        self._loop_thread.stop()
        self._loop_thread = None

    def __enter__(self) -> SampleImageServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def write_sample_catalogue(path: str | Path, n: int, image_base_url: str) -> Path:
    from .storage import write_parquet_atomic

    path = Path(path)
    write_parquet_atomic(path, make_sample_catalogue(n, image_base_url))
    return path
