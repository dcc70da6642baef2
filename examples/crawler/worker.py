"""The crawler service: fetches one page and returns its title and links."""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from typing import Any

import pyrorpc

# This example only fetches from the local test site. A crawler that takes URLs from callers can be
# pointed at internal services (SSRF): widen this on purpose, not by accident.
ALLOWED_HOSTS = {"127.0.0.1", "localhost"}
MAX_BYTES = 1_000_000


class LinkParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.links.append(href)
        self._in_title = tag == "title"

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data


@pyrorpc.service("crawler")
class Crawler:
    @pyrorpc.idempotent  # fetching a page twice does no harm: retried elsewhere if this worker dies
    def fetch(self, url: str) -> dict[str, Any]:
        """GET ``url``; returns ``{url, status, title, links (absolute, no #fragment), bytes, worker, error}``."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or parts.hostname not in ALLOWED_HOSTS:
            raise ValueError(f"this crawler only fetches http:// URLs on {sorted(ALLOWED_HOSTS)}, not {url!r}")
        page: dict[str, Any] = {"url": url, "status": None, "title": "", "links": [], "bytes": 0,
                                "worker": f"{socket.gethostname()}:{os.getpid()}", "error": None}
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                page["status"] = resp.status
                body = resp.read(MAX_BYTES)
                charset = resp.headers.get_content_charset() or "utf-8"
                is_html = resp.headers.get_content_type() == "text/html"
        except urllib.error.HTTPError as exc:
            page.update(status=exc.code, error=str(exc.reason))
            return page
        except (urllib.error.URLError, OSError) as exc:
            page["error"] = str(exc)
            return page
        page["bytes"] = len(body)
        if is_html:
            parser = LinkParser()
            parser.feed(body.decode(charset, errors="replace"))
            page["title"] = parser.title.strip()
            links = (urllib.parse.urldefrag(urllib.parse.urljoin(url, href)).url for href in parser.links)
            page["links"] = list(dict.fromkeys(links))  # absolute, de-duplicated, in page order
        return page
