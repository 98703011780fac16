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

Limits (`limits`): upload size (413 beyond it), k, query length; every refusal is a 4xx with
{"error": message}, and the server keeps serving.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from contrastive.search import MEDIA_TYPES, SearchIndex

log = logging.getLogger("contrastive.serve")

PAGE = Path(__file__).with_name("search.html")


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
        try:
            k = int(field(data, "k", 10))
        except (TypeError, ValueError):
            raise RequestError(f"k must be a whole number, not {data.get('k')!r}") from None
        if not 1 <= k <= self.limits.max_k:
            raise RequestError(f"k must be between 1 and {self.limits.max_k}, not {k}")
        hits = self.index.search(target, self.embed_query(data, upload), k)
        return [
            {
                "key": h.key,
                "score": round(h.score, 6),
                "label": h.label,
                "caption": h.caption,
                "media": {m: f"/media/{h.key}/{m}" for m in self.media_of(h.media)},
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
            key = str(data["key"])
            if key not in self.index.by_key:
                raise RequestError(f"no sample {key!r} in the index", 404)
            found = self.index.member(key, self.extensions[modality])
            if found is None:
                raise RequestError(f"sample {key!r} has no {modality}")
            return found[1].decode("utf-8") if modality == "text" else found[1]
        if modality != "text":
            raise RequestError(f"a {modality} query is an uploaded file (field 'file') or a sample key")
        text = str(field(data, "query", "")).strip()
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
        try:
            with self.lock, torch.no_grad():
                return self.model.embed(modality, [item])[0].numpy()
        except Exception as e:  # an upload that does not decode as the modality
            raise RequestError(f"could not read the {modality} query: {type(e).__name__}: {e}") from None

    def media(self, key: str, modality: str) -> tuple[str, bytes]:
        """(media type, bytes) of a sample's member for `modality`."""
        if key not in self.index.by_key:
            raise RequestError(f"no sample {key!r} in the index", 404)
        if modality not in self.extensions:
            raise RequestError(f"modality {modality!r}: one of {sorted(self.extensions)}", 404)
        found = self.index.member(key, self.extensions[modality])
        if found is None:
            raise RequestError(f"sample {key!r} has no {modality}", 404)
        ext, data = found
        return MEDIA_TYPES.get(ext, "application/octet-stream"), data


def field(data: dict, name: str, default: Any = None) -> Any:
    value = data.get(name, default)
    return value if value not in ("", None) else default


def create_app(index: SearchIndex, model, limits: Limits | None = None):
    """The Flask app: routes onto a Service, refusals as JSON."""
    from flask import Flask, Response, jsonify, request
    from werkzeug.exceptions import HTTPException

    service = Service(index, model, limits or Limits())
    app = Flask("contrastive.serve")
    app.config["MAX_CONTENT_LENGTH"] = int(service.limits.upload_mb * (1 << 20))

    @app.errorhandler(RequestError)
    def refused(e: RequestError):
        return jsonify(error=str(e)), e.status

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


def serve(index_dir: str, model_spec: str | None, host: str = "127.0.0.1", port: int = 8000, **limits) -> None:
    from contrastive.export import load_model_spec

    index = SearchIndex(index_dir)
    model, _ = load_model_spec(model_spec or index.info["model"])
    app = create_app(index, model, Limits(**limits))
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: anyone who reaches this address can query the index and read its media", host)
    log.info("serving %s on http://%s:%d/", index_dir, host, port)
    app.run(host=host, port=port, threaded=True)
