"""A small web site to crawl, served from memory on 127.0.0.1: linked pages, one broken link, one external link.

    python website.py --port 8001 [--delay 0.05]
"""

from __future__ import annotations

import argparse
import html
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# path -> (title, links); links are relative, absolute-path or external, as on a real site
PAGES: dict[str, tuple[str, list[str]]] = {
    "/": ("Home", ["about.html", "blog/", "docs/", "https://example.org/elsewhere"]),
    "/about.html": ("About us", ["/", "team.html", "contact.html"]),
    "/team.html": ("The team", ["about.html", "/"]),
    "/contact.html": ("Contact", ["/", "old-contact.html"]),  # old-contact.html is gone: a 404
    "/blog/": ("Blog", ["post-1.html", "post-2.html", "post-3.html", "/"]),
    "/blog/post-1.html": ("First post", ["post-2.html", "/blog/"]),
    "/blog/post-2.html": ("Second post", ["post-1.html", "post-3.html", "/blog/"]),
    "/blog/post-3.html": ("Third post", ["post-2.html", "../docs/api.html#methods", "/blog/"]),
    "/docs/": ("Docs", ["intro.html", "api.html", "/"]),
    "/docs/intro.html": ("Introduction", ["api.html", "faq.html"]),
    "/docs/api.html": ("API reference", ["intro.html", "faq.html?print=1"]),
    "/docs/faq.html": ("FAQ", ["intro.html", "/"]),
    "/docs/faq.html?print=1": ("FAQ (print)", []),
}
BROKEN = ["/old-contact.html"]
EXTERNAL = ["https://example.org/elsewhere"]


def render(title: str, links: list[str]) -> bytes:
    items = "".join(f'<li><a href="{html.escape(href)}">{html.escape(href)}</a></li>' for href in links)
    return (f"<!doctype html><html><head><title>{html.escape(title)}</title></head>"
            f"<body><h1>{html.escape(title)}</h1><ul>{items}</ul></body></html>").encode()


class SiteHandler(BaseHTTPRequestHandler):
    delay = 0.0

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        time.sleep(self.delay)  # a page takes a while to serve, like a real one
        page = PAGES.get(self.path)
        if page is None:
            self.send_error(404, "no such page")
            return
        body = render(*page)
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8001, help="0 picks a free port")
    parser.add_argument("--delay", type=float, default=0.05, help="seconds each response takes")
    args = parser.parse_args()
    SiteHandler.delay = args.delay
    server = ThreadingHTTPServer(("127.0.0.1", args.port), SiteHandler)
    print(f"serving {len(PAGES)} pages on http://127.0.0.1:{server.server_port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
