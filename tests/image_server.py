"""A real aiohttp image host on 127.0.0.1 with injectable faults (tests and benchmarks).

``ImageServer(addresses=("127.0.0.1", "127.0.0.2"))`` listens on both loopback addresses with
one port: two hosts for per-host behaviour (``srv.url(path, host="127.0.0.2")``).
:class:`DeadServer` is a host that accepts connections and never answers.

Routes (``srv.url(path)`` gives the full URL):

* ``/img/<name>``: a generated image (:func:`make_images`), with the server's latency and random
  500 rate applied; ``?xrt=<value>`` (repeatable) adds an ``X-Robots-Tag: <value>`` header;
* ``/robots.txt``: :attr:`ImageServer.robots_txt` (404 when None; ``robots_status`` overrides the
  status; ``robots_location`` makes it a redirect);
* ``/status/<code>`` (``?retry_after=<s>`` adds a ``Retry-After``); ``/flaky/<key>`` (500 once,
  then the image); ``/ratelimited/<key>`` (429
  with ``Retry-After: 1`` once, then the image); ``/slow`` (answers after ``slow_s``);
  ``/stall`` (half the body, then silence); ``/big`` (streams past any limit, no length);
  ``/big-declared`` (a huge Content-Length); ``/html`` (a text/html page);
  ``/loop/a`` <-> ``/loop/b``; ``/chain/<n>`` (n redirects, then the image);
  ``/to?location=...`` (a redirect to anything).

``/img/<name>`` answers carry an ``ETag`` (a hash of the body) and a ``Last-Modified`` (bumped by
:meth:`ImageServer.set_image`), and a conditional request (``If-None-Match``, else
``If-Modified-Since``) for an unchanged image is answered ``304 Not Modified``. Names in
``fail_first`` answer 404 to their first request (an image missing for a while).

Every request is counted in ``hits`` (path -> count), so a test can prove that a refused URL
never reached the server; ``conditional`` and ``not_modified`` count the conditional requests
and the 304 answers per path; ``max_in_flight`` is the most requests it served at once;
``host_times`` holds the arrival time of every request per host (``Host`` header, e.g.
``127.0.0.2:41234``), for request counts and rates per host. Addresses in ``down`` answer 503 to
every request.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import hashlib
import io
import random
from collections.abc import Iterable

import numpy as np
from aiohttp import web
from PIL import Image

from item_embeddings.loop_thread import LoopThread

FIRST_MODIFIED = 1_700_000_000  # Last-Modified of an image never replaced (a fixed date)


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(size=(96, 64), seed: int = 0) -> Image.Image:
    """A deterministic, non-trivial RGB picture."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)),
                    rng.integers(0, 256, size=(h, w))], axis=-1).astype("uint8")
    return Image.fromarray(arr, "RGB")


def product_photo(size=(1000, 750), seed: int = 0) -> Image.Image:
    """A natural-looking product photo: a shaded object with edges, fine detail and a soft
    shadow on a light studio background, sensor noise, a lens's softness (the fast-decode
    quality gate's fixture; tests may not read real photos)."""
    from PIL import ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    backdrop = 235 + 15 * (y / h)[..., None] - 10 * (x / w)[..., None] * rng.uniform(0, 1, 3)
    # A wooden table in the lower part: fine grain, a few pixels per period.
    grain = np.sin(2 * np.pi * (x / 4.5 + 3 * np.sin(y / 37.0) + rng.normal(0, 0.2, (h, w))))
    table = np.stack([150 + 25 * grain, 105 + 20 * grain, 70 + 15 * grain], axis=-1)
    backdrop = np.where((y > 0.85 * h)[..., None], table, backdrop)
    img = Image.fromarray(np.clip(backdrop, 0, 255).astype(np.uint8), "RGB")
    shadow = Image.new("L", size, 0)
    ImageDraw.Draw(shadow).ellipse((0.2 * w, 0.78 * h, 0.8 * w, 0.92 * h), fill=90)
    img.paste((40, 40, 40), mask=shadow.filter(ImageFilter.GaussianBlur(w / 40)))
    # The object: a body shaded by a radial gradient of a random colour.
    colour = rng.uniform(30, 220, 3)
    cx, cy, r = w * rng.uniform(0.4, 0.6), h * rng.uniform(0.4, 0.55), min(w, h) * 0.35
    light = np.clip(1.25 - np.hypot(x - cx + r / 3, y - cy + r / 3) / (1.6 * r), 0.3, 1.2)
    body = Image.fromarray(np.clip(colour * light[..., None], 0, 255).astype(np.uint8), "RGB")
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    draw.rounded_rectangle((cx - r, cy - 0.8 * r, cx + r, cy + 0.9 * r), radius=r / 4, fill=255)
    draw.ellipse((cx - 0.6 * r, cy - 1.25 * r, cx + 0.6 * r, cy - 0.5 * r), fill=255)
    img.paste(body, mask=mask)
    # Details: a label with lines of "text", buttons, a specular highlight.
    draw = ImageDraw.Draw(img)
    draw.rectangle((cx - 0.6 * r, cy, cx + 0.6 * r, cy + 0.5 * r), fill=(245, 245, 240))
    for i in range(6):
        top = cy + 0.06 * r + i * 0.07 * r
        draw.line((cx - 0.5 * r, top, cx + rng.uniform(-0.3, 0.5) * r, top),
                  fill=(20, 20, 20), width=max(1, w // 400))
    for i in range(4):
        bx = cx - 0.6 * r + i * 0.4 * r
        draw.ellipse((bx, cy - 0.5 * r, bx + 0.2 * r, cy - 0.3 * r),
                     fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw.ellipse((cx - 0.7 * r, cy - 0.7 * r, cx - 0.45 * r, cy - 0.5 * r), fill=(255, 255, 250))
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float32)
    arr += rng.normal(0, 3, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def make_images() -> dict[str, tuple[bytes, str]]:
    """name -> (body, content type) of real encoded images in many modes, plus broken ones."""
    rgb = gradient((96, 64), seed=1)
    palette = gradient((64, 64), seed=2).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    rgba = gradient((80, 80), seed=3).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((80, 80)))
    frames = [gradient((48, 48), seed=s).convert("P", palette=Image.Palette.ADAPTIVE)
              for s in (4, 5)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    grey16 = Image.fromarray(np.arange(64 * 64, dtype="uint16").reshape(64, 64) * 16)
    big_jpeg = _jpeg(gradient((400, 300), seed=6))
    return {
        "rgb.jpg": (_jpeg(rgb), "image/jpeg"),
        "cmyk.jpg": (_jpeg(gradient((64, 96), seed=7).convert("CMYK")), "image/jpeg"),
        "grey.jpg": (_jpeg(gradient((50, 70), seed=8).convert("L")), "image/jpeg"),
        "palette.png": (_save(palette, "PNG", transparency=0), "image/png"),
        "rgba.png": (_save(rgba, "PNG"), "image/png"),
        "grey16.png": (_save(grey16, "PNG"), "image/png"),
        "photo.webp": (_save(gradient((72, 72), seed=9), "WEBP", quality=80), "image/webp"),
        "anim.gif": (gif.getvalue(), "image/gif"),
        "octet.jpg": (_jpeg(gradient((40, 40), seed=10)), "application/octet-stream"),
        "truncated.jpg": (big_jpeg[: len(big_jpeg) // 2], "image/jpeg"),
        # 8000 x 8000 = 64 M pixels in a few KB: refused on its header (limit 40 M).
        "bomb.png": (_save(Image.new("1", (8000, 8000)), "PNG", optimize=True), "image/png"),
        "notimage.jpg": (b"<html><body>not found</body></html>", "image/jpeg"),
    }


class ImageServer:
    """Runs the fault-injecting host in a background thread; use as a context manager."""

    def __init__(self, images: dict[str, tuple[bytes, str]] | None = None, *,
                 latency_s: float = 0.0, fail_rate: float = 0.0, slow_s: float = 3.0,
                 seed: int = 0, fail_first: Iterable[str] = (),
                 addresses: tuple[str, ...] = ("127.0.0.1",)):
        self.images = images if images is not None else make_images()
        self.addresses = addresses
        self.robots_txt: str | None = None
        self.robots_status = 200
        self.robots_location: str | None = None  # robots.txt redirects there when set
        self.down: set[str] = set()  # addresses that answer 503 to everything (a failing host)
        self.host_times: dict[str, list[float]] = collections.defaultdict(list)
        self.fail_first = set(fail_first)
        self._modified: dict[str, int] = {}  # name -> Last-Modified (seconds) once replaced
        self.latency_s = latency_s
        self.fail_rate = fail_rate
        self.slow_s = slow_s
        self.hits: collections.Counter = collections.Counter()
        self.conditional: collections.Counter = collections.Counter()
        self.not_modified: collections.Counter = collections.Counter()
        self.times: dict[str, list[float]] = collections.defaultdict(list)
        self.user_agents: set[str] = set()
        self.accepts: dict[str, set[str]] = collections.defaultdict(set)  # path -> Accept seen
        self.in_flight = self.max_in_flight = 0
        self._seen: set[str] = set()
        self._random = random.Random(seed)
        self._loop_thread = LoopThread("image-server")
        self._loop = self._loop_thread.loop
        self._runner: web.AppRunner | None = None
        self.port = 0

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/{path.lstrip('/')}"

    def set_image(self, name: str, body: bytes, content_type: str = "image/jpeg") -> None:
        """Add or replace an image: a new body gets a new ETag and a later Last-Modified."""
        self.images[name] = (body, content_type)
        self._modified[name] = self._modified.get(name, FIRST_MODIFIED) + 3600

    def snapshot_hits(self) -> dict[str, int]:
        """A copy of ``hits``, taken on the server's loop (safe while requests are served)."""
        async def copy() -> dict[str, int]:
            return dict(self.hits)
        return self._loop_thread.run(copy())

    def _validators(self, name: str) -> tuple[str, int]:
        return (f'"{hashlib.sha256(self.images[name][0]).hexdigest()[:20]}"',
                self._modified.get(name, FIRST_MODIFIED))

    def _unchanged(self, request: web.Request, etag: str, modified: int) -> bool:
        """RFC 9110 13.2.2: If-None-Match decides when present, else If-Modified-Since."""
        if_none_match = request.headers.get("If-None-Match")
        if if_none_match is not None:
            return etag in [t.strip() for t in if_none_match.split(",")] or if_none_match == "*"
        since = request.headers.get("If-Modified-Since")
        if since is None:
            return False
        try:
            return modified <= email.utils.parsedate_to_datetime(since).timestamp()
        except (TypeError, ValueError):
            return False

    # -- handlers
    def _image(self, name: str) -> web.Response:
        body, ctype = self.images[name]
        return web.Response(body=body, headers={"Content-Type": ctype})

    def host_hits(self, host: str) -> int:
        """Requests that reached ``host`` (an address; this server's port)."""
        return len(self.host_times.get(f"{host}:{self.port}", []))

    async def _img(self, request: web.Request) -> web.StreamResponse:
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if self.fail_rate and self._random.random() < self.fail_rate:
            return web.Response(status=500, text="injected failure")
        name = request.match_info["name"]
        if name in self.fail_first and self._first_time(request.path):
            return web.Response(status=404, text="not there yet")
        if name not in self.images:
            return web.Response(status=404, text="no such image")
        etag, modified = self._validators(name)
        validators = {"ETag": etag, "Last-Modified": email.utils.formatdate(modified, usegmt=True)}
        if {"If-None-Match", "If-Modified-Since"} & set(request.headers):
            self.conditional[request.path] += 1
            if self._unchanged(request, etag, modified):
                self.not_modified[request.path] += 1
                return web.Response(status=304, headers=validators)
        response = self._image(name)
        response.headers.update(validators)
        for value in request.query.getall("xrt", ()):
            response.headers.add("X-Robots-Tag", value)
        return response

    async def _status(self, request: web.Request) -> web.Response:
        headers = {"Retry-After": request.query["retry_after"]} if "retry_after" in request.query \
            else {}
        return web.Response(status=int(request.match_info["code"]), text="status",
                            headers=headers)

    async def _robots(self, request: web.Request) -> web.Response:
        if self.robots_location:
            raise web.HTTPFound(self.robots_location)
        if self.robots_txt is None:
            return web.Response(status=404, text="no robots.txt")
        return web.Response(status=self.robots_status, text=self.robots_txt)

    def _first_time(self, key: str) -> bool:
        first = key not in self._seen
        self._seen.add(key)
        return first

    async def _flaky(self, request: web.Request) -> web.Response:
        if self._first_time(request.path):
            return web.Response(status=500, text="try again")
        return self._image("rgb.jpg")

    async def _ratelimited(self, request: web.Request) -> web.Response:
        if self._first_time(request.path):
            return web.Response(status=429, text="slow down", headers={"Retry-After": "1"})
        return self._image("photo.webp")

    async def _slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.slow_s)
        return self._image("rgb.jpg")

    async def _stall(self, request: web.Request) -> web.StreamResponse:
        body, ctype = self.images["rgb.jpg"]
        resp = web.StreamResponse(headers={"Content-Type": ctype,
                                           "Content-Length": str(len(body))})
        await resp.prepare(request)
        await resp.write(body[: len(body) // 2])
        await asyncio.sleep(self.slow_s)
        return resp

    async def _big(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        chunk = b"\xff" * 65536
        for _ in range(int(request.query.get("chunks", "64"))):  # 4 MiB by default
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def _big_declared(self, request: web.Request) -> web.Response:
        # 2 MiB with its Content-Length: refused on the header by a smaller max_bytes.
        return web.Response(body=b"\xff" * (2 * 1024 * 1024),
                            headers={"Content-Type": "image/jpeg"})

    async def _html(self, request: web.Request) -> web.Response:
        return web.Response(text="<html><body>a page</body></html>", content_type="text/html")

    async def _loop_route(self, request: web.Request) -> web.Response:
        other = "b" if request.match_info["side"] == "a" else "a"
        raise web.HTTPFound(f"/loop/{other}")

    async def _chain(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        if n <= 0:
            return self._image("rgb.jpg")
        raise web.HTTPFound(f"/chain/{n - 1}")

    async def _to(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["location"])

    @web.middleware
    async def _count(self, request: web.Request, handler):
        self.hits[request.path] += 1
        self.times[request.path].append(self._loop.time())
        self.host_times[request.host].append(self._loop.time())
        self.user_agents.add(request.headers.get("User-Agent", ""))
        self.accepts[request.path].add(request.headers.get("Accept", ""))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if request.host.rsplit(":", 1)[0] in self.down:
                return web.Response(status=503, text="down")
            return await handler(request)
        finally:
            self.in_flight -= 1

    # -- lifecycle
    async def _start(self) -> None:
        app = web.Application(middlewares=[self._count])
        app.add_routes([
            web.get("/img/{name}", self._img), web.get("/status/{code}", self._status),
            web.get("/flaky/{key}", self._flaky), web.get("/ratelimited/{key}", self._ratelimited),
            web.get("/slow", self._slow), web.get("/stall", self._stall),
            web.get("/big", self._big), web.get("/big-declared", self._big_declared),
            web.get("/html", self._html), web.get("/loop/{side}", self._loop_route),
            web.get("/chain/{n}", self._chain), web.get("/to", self._to),
            web.get("/robots.txt", self._robots),
        ])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        for address in self.addresses:  # the first picks the port, the others share it
            site = web.TCPSite(self._runner, address, self.port)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]

    def __enter__(self) -> ImageServer:
        self._loop_thread.start().run(self._start())
        return self

    def __exit__(self, *exc) -> None:
        if self._runner is not None:
            self._loop_thread.run(self._runner.cleanup())
        self._loop_thread.stop()


def _serve(images, latency_s, fail_rate, fail_first, port_queue, commands, replies) -> None:
    with ImageServer(images, latency_s=latency_s, fail_rate=fail_rate,
                     fail_first=fail_first) as srv:
        port_queue.put(srv.port)
        while commands.get() == "hits":  # anything else stops the server
            replies.put(srv.snapshot_hits())


class ServerProcess:
    """The host in a child process (benchmarks: its CPU time is not the client's).

    ``with ServerProcess(images, latency_s=0.05) as port:`` serves ``/img/<name>`` on 127.0.0.1;
    :meth:`hits` returns the requests it served so far (path -> count).
    """

    def __init__(self, images: dict[str, tuple[bytes, str]], latency_s: float = 0.0,
                 fail_rate: float = 0.0, fail_first: Iterable[str] = ()):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._ports = ctx.Queue()
        self._commands = ctx.Queue()
        self._replies = ctx.Queue()
        self._proc = ctx.Process(target=_serve, daemon=True,
                                 args=(images, latency_s, fail_rate, set(fail_first),
                                       self._ports, self._commands, self._replies))

    def __enter__(self) -> int:
        self._proc.start()
        return self._ports.get(timeout=60)

    def hits(self) -> dict[str, int]:
        """Requests served so far, per path (counted by the server)."""
        self._commands.put("hits")
        return self._replies.get(timeout=60)

    def __exit__(self, *exc) -> None:
        self._commands.put("stop")
        self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.terminate()


class DeadServer:
    """A host that accepts connections, reads the requests and never answers (a hung server).

    ``with DeadServer("127.0.0.2") as dead:`` listens on a free port (``dead.port``,
    ``dead.url(path)``); ``requests`` counts the HTTP requests that reached it (each complete
    request head), ``times`` their arrival. Leaving the block closes every connection.
    """

    def __init__(self, address: str = "127.0.0.2"):
        self.address = address
        self.port = 0
        self.requests = 0
        self.times: list[float] = []
        self._transports: list[asyncio.Transport] = []
        self._loop_thread = LoopThread("dead-server")
        self._server: asyncio.AbstractServer | None = None

    def url(self, path: str) -> str:
        return f"http://{self.address}:{self.port}/{path.lstrip('/')}"

    def _protocol(self) -> asyncio.Protocol:
        server = self

        class Silent(asyncio.Protocol):
            def __init__(self):
                self.buffer = b""

            def connection_made(self, transport):
                server._transports.append(transport)

            def data_received(self, data):
                self.buffer += data
                while b"\r\n\r\n" in self.buffer:  # one request head (GETs have no body)
                    _, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
                    server.requests += 1
                    server.times.append(server._loop_thread.loop.time())

        return Silent()

    async def _start(self) -> None:
        self._server = await self._loop_thread.loop.create_server(
            self._protocol, self.address, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        self._server.close()
        for transport in self._transports:
            transport.abort()
        await self._server.wait_closed()

    def __enter__(self) -> DeadServer:
        self._loop_thread.start().run(self._start())
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._loop_thread.run(self._stop())
        self._loop_thread.stop()
