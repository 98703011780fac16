"""A search service over an index (contrastive.search) and the model that made it: an HTTP JSON API
and a web page, on Flask. It binds to 127.0.0.1 unless told otherwise.

    GET  /                        the page (one HTML file, no build step, nothing fetched from elsewhere)
    GET  /api/info                the model, the data, each modality's rows and index kind
    POST /api/search              JSON {"query": "a dog barking" | "key": "<sample key>",
                                        "query_modality": "text", "modality": "audio", "k": 10}
                                  or a form with a file field `file` (an image or audio clip) and
                                  fields query_modality, modality, k
                                  -> {"results": [{key, score, label, caption, media: {modality: url}}]}
    GET  /media/<key>/<modality>  the sample's image, audio or caption, from its shard

Limits (`limits`): upload size on the wire (413 beyond it), and what an upload may decode to: the
modalities' own budgets (an image's pixels by its header, audio read by window, never whole), a
refusal of them a 413 too; k, query length; every refusal is a 4xx with {"error": message}, and the
server keeps serving.

A tool on localhost is reachable by any web page its user opens, so: a request whose Host header is
not the address served (or one of `--allow-host`) is refused (DNS rebinding), and a POST that is not
JSON (a form with an upload) must carry `X-Requested-With: contrastive-search`, which the page sends
and which a page elsewhere cannot send without the browser asking this server first (CSRF).
"""

from __future__ import annotations

import json
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

import torch

from contrastive.modalities.base import Refused
from contrastive.search import MEDIA_TYPES, SearchIndex

log = logging.getLogger("contrastive.serve")

PAGE = Path(__file__).with_name("search.html")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
FORM_HEADER = ("X-Requested-With", "contrastive-search")  # what a form POST must carry (CSRF)


@dataclass
class Limits:
    upload_mb: float = 10.0
    max_k: int = 100
    max_query_chars: int = 1000


class RequestError(ValueError):
    """A request the service refuses: answered with `status` and the message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Service:
    """What the routes answer, apart from HTTP: a search request's results, a sample's media."""

    def __init__(self, index: SearchIndex, model, limits: Limits):
        self.index, self.model, self.limits = index, model, limits
        self.lock = threading.Lock()  # one forward pass at a time: torch's threads already use every core
        self.extensions = {name: list(m.extensions) for name, m in model.modalities.items()}
        self.extensions.setdefault("text", ["txt"])

    def info(self) -> dict[str, Any]:
        return self.index.info | {"query_modalities": list(self.model.modalities), "limits": vars(self.limits)}

    def search(self, data: dict, upload: bytes | None) -> list[dict[str, Any]]:
        target = field(data, "modality")
        if target not in self.index.modalities:
            raise RequestError(f"modality {target!r}: this index holds {self.index.modalities}")
        k = whole_number(data.get("k", 10), "k")
        if not 1 <= k <= self.limits.max_k:
            raise RequestError(f"k must be between 1 and {self.limits.max_k}, not {k}")
        hits = self.index.search(target, self.embed_query(data, upload), k)
        return [
            {
                "key": h.key,
                "score": round(h.score, 6),
                "label": h.label,
                "caption": h.caption,
                "media": {m: f"/media/{quote(h.key, safe='')}/{m}" for m in self.media_of(h.media)},
            }
            for h in hits
        ]

    def media_of(self, members: list[str]) -> list[str]:
        return [m for m, exts in self.extensions.items() if any(e in members for e in exts)]

    def query_item(self, data: dict, upload: bytes | None, modality: str) -> Any:
        """What to embed: the upload, a sample's member (by key), or the caption."""
        if upload is not None:
            if not upload:
                raise RequestError("the uploaded file is empty")
            return upload
        if field(data, "key") is not None:
            key = field(data, "key")
            if key not in self.index.by_key:
                raise RequestError(f"no sample {key!r} in the index", 404)
            found = self.member(key, modality)
            if found is None:
                raise RequestError(f"sample {key!r} has no {modality}")
            return found[1].decode("utf-8") if modality == "text" else found[1]
        if modality != "text":
            raise RequestError(f"a {modality} query is an uploaded file (field 'file') or a sample key")
        text = (field(data, "query") or "").strip()
        if not text:
            raise RequestError("the query is empty")
        if len(text) > self.limits.max_query_chars:
            raise RequestError(f"the query is longer than {self.limits.max_query_chars} characters")
        return text

    def embed_query(self, data: dict, upload: bytes | None):
        modality = field(data, "query_modality", "text" if upload is None else None)
        if modality not in self.model.modalities:
            raise RequestError(f"query_modality {modality!r}: the model embeds {list(self.model.modalities)}")
        item = self.query_item(data, upload, modality)
        what = f"the uploaded {modality}" if upload is not None else f"the {modality} query"
        try:
            with self.lock, torch.no_grad():
                return self.model.embed(modality, [item])[0].numpy()
        except Refused as e:  # over what an upload may decode to: refused before it is decoded
            raise RequestError(f"{what} is too large once decoded: {e}", 413) from None
        except Exception as e:  # an upload that does not decode as the modality
            raise RequestError(f"could not read {what}: {e}") from None

    def member(self, key: str, modality: str) -> tuple[str, bytes] | None:
        """The sample's member for `modality` from its shard; a shard that cannot be read is a 502."""
        try:
            return self.index.member(key, self.extensions[modality])
        except OSError as e:
            raise RequestError(f"the shard of sample {key!r} cannot be read: {e}", 502) from None

    def media(self, key: str, modality: str) -> tuple[str, bytes]:
        """(media type, bytes) of a sample's member for `modality`."""
        if key not in self.index.by_key:
            raise RequestError(f"no sample {key!r} in the index", 404)
        if modality not in self.extensions:
            raise RequestError(f"modality {modality!r}: one of {sorted(self.extensions)}", 404)
        found = self.member(key, modality)
        if found is None:
            raise RequestError(f"sample {key!r} has no {modality}", 404)
        ext, data = found
        return MEDIA_TYPES.get(ext, "application/octet-stream"), data


def field(data: dict, name: str, default: Any = None) -> Any:
    """A text field of the request (a form's or JSON's); anything but a string is a 400 naming it."""
    value = data.get(name, default)
    if value in ("", None):
        return default
    if not isinstance(value, str):
        raise RequestError(f"{name} must be a string, not {json.dumps(value)[:60]}")
    return value


def whole_number(value: Any, name: str) -> int:
    """A whole number from JSON or a form field (12, 12.0, "12"); anything else a 400 naming it."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    raise RequestError(f"{name} must be a whole number, not {json.dumps(value)[:60]}")


def host_name(host: str) -> str:
    """The name of a Host header, without its port ("[::1]:8000" -> "::1")."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def create_app(index: SearchIndex, model, limits: Limits | None = None, *, hosts: Sequence[str] = LOOPBACK):
    """The Flask app: routes onto a Service, refusals as JSON. `hosts`: the Host names it answers
    ("*": any)."""
    from flask import Flask, Response, jsonify, request
    from werkzeug.exceptions import HTTPException

    service = Service(index, model, limits or Limits())
    app = Flask("contrastive.serve")
    app.config["MAX_CONTENT_LENGTH"] = int(service.limits.upload_mb * (1 << 20))

    allowed = {host_name(h) for h in hosts}

    @app.errorhandler(RequestError)
    def refused(e: RequestError):
        return jsonify(error=str(e)), e.status

    @app.before_request
    def guard():
        name = host_name(request.host)
        if "*" not in allowed and name not in allowed:
            shown = ", ".join(sorted(allowed))
            raise RequestError(f"this server answers for {shown}, not {name!r} (--allow-host adds a name)", 403)
        if request.method == "POST" and not request.is_json and request.headers.get(FORM_HEADER[0]) != FORM_HEADER[1]:
            raise RequestError(f"a form POST must carry the header {FORM_HEADER[0]}: {FORM_HEADER[1]}", 403)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        too_large = f"the upload is larger than {service.limits.upload_mb:g} MB"
        return jsonify(error=too_large if e.code == 413 else e.description), e.code

    @app.get("/")
    def page():
        return Response(PAGE.read_text(), mimetype="text/html")

    @app.get("/api/info")
    def info():
        return jsonify(service.info())

    @app.post("/api/search")
    def search():
        data = request.get_json(silent=True) if request.is_json else request.form.to_dict()
        if data is None:
            raise RequestError("the body is not JSON")
        upload = request.files.get("file")
        return jsonify(results=service.search(data, upload.read() if upload is not None else None))

    @app.get("/media/<path:key>/<modality>")
    def media(key: str, modality: str):
        mimetype, data = service.media(key, modality)
        return Response(data, mimetype=mimetype)

    return app


def serve(
    index_dir: str,
    model_spec: str | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    allow_hosts: Sequence[str] = (),
    **limits,
) -> None:
    from contrastive.export import load_model_spec

    index = SearchIndex(index_dir)
    model, _ = load_model_spec(model_spec or index.info["model"])
    hosts = [*LOOPBACK, host, *allow_hosts]
    if host in ("0.0.0.0", "::") and not allow_hosts:
        hosts = ["*"]  # open to the network: any name this machine is reached by
    app = create_app(index, model, Limits(**limits), hosts=hosts)
    if host not in LOOPBACK:
        log.warning("serving on %s: anyone who reaches this address can query the index and read its media", host)
    log.info("serving %s on http://%s:%d/", index_dir, host, port)
    app.run(host=host, port=port, threaded=True)
