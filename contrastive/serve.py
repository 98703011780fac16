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


def create_app(index: SearchIndex, model, limits: Limits | None = None):
    from flask import Flask, Response, jsonify, request
    from werkzeug.exceptions import HTTPException

    limits = limits or Limits()
    app = Flask("contrastive.serve")
    app.config["MAX_CONTENT_LENGTH"] = int(limits.upload_mb * (1 << 20))
    lock = threading.Lock()  # one forward pass at a time: torch's threads are already all the cores'
    extensions = {name: list(m.extensions) for name, m in model.modalities.items()}
    extensions.setdefault("text", ["txt"])

    @app.errorhandler(RequestError)
    def refused(e: RequestError):
        return jsonify(error=str(e)), e.status

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        message = e.description
        if e.code == 413:
            message = f"the upload is larger than {limits.upload_mb:g} MB"
        return jsonify(error=message), e.code

    @app.get("/")
    def page():
        return Response(PAGE.read_text(), mimetype="text/html")

    @app.get("/api/info")
    def info():
        return jsonify(index.info | {"query_modalities": list(model.modalities), "limits": vars(limits)})

    def field(data: dict, name: str, default: Any = None) -> Any:
        value = data.get(name, default)
        return value if value not in ("", None) else default

    @app.post("/api/search")
    def search():
        data = request.get_json(silent=True) if request.is_json else request.form.to_dict()
        if data is None:
            raise RequestError("the body is not JSON")
        target = field(data, "modality")
        if target not in index.modalities:
            raise RequestError(f"modality {target!r}: this index holds {index.modalities}")
        try:
            k = int(field(data, "k", 10))
        except (TypeError, ValueError):
            raise RequestError(f"k must be a whole number, not {data.get('k')!r}") from None
        if not 1 <= k <= limits.max_k:
            raise RequestError(f"k must be between 1 and {limits.max_k}, not {k}")
        query = embed_query(data)
        hits = index.search(target, query, k)
        return jsonify(
            results=[
                {
                    "key": h.key,
                    "score": round(h.score, 6),
                    "label": h.label,
                    "caption": h.caption,
                    "media": {m: f"/media/{h.key}/{m}" for m in media_of(h.media)},
                }
                for h in hits
            ]
        )

    def media_of(members: list[str]) -> list[str]:
        return [m for m, exts in extensions.items() if any(e in members for e in exts)]

    def embed_query(data: dict):
        upload = request.files.get("file")
        query_modality = field(data, "query_modality", "text" if upload is None else None)
        if query_modality not in model.modalities:
            raise RequestError(f"query_modality {query_modality!r}: the model embeds {list(model.modalities)}")
        if upload is not None:
            item: Any = upload.read()
            if not item:
                raise RequestError("the uploaded file is empty")
        elif field(data, "key") is not None:
            key = str(data["key"])
            if key not in index.by_key:
                raise RequestError(f"no sample {key!r} in the index", 404)
            found = index.member(key, extensions[query_modality])
            if found is None:
                raise RequestError(f"sample {key!r} has no {query_modality}")
            item = found[1].decode("utf-8") if query_modality == "text" else found[1]
        else:
            if query_modality != "text":
                raise RequestError(f"a {query_modality} query is an uploaded file (field 'file') or a sample key")
            item = str(field(data, "query", "")).strip()
            if not item:
                raise RequestError("the query is empty")
            if len(item) > limits.max_query_chars:
                raise RequestError(f"the query is longer than {limits.max_query_chars} characters")
        try:
            with lock, torch.no_grad():
                return model.embed(query_modality, [item])[0].numpy()
        except Exception as e:  # an upload that does not decode as the modality
            raise RequestError(f"could not read the {query_modality} query: {type(e).__name__}: {e}") from None

    @app.get("/media/<path:key>/<modality>")
    def media(key: str, modality: str):
        if key not in index.by_key:
            raise RequestError(f"no sample {key!r} in the index", 404)
        if modality not in extensions:
            raise RequestError(f"modality {modality!r}: one of {sorted(extensions)}", 404)
        found = index.member(key, extensions[modality])
        if found is None:
            raise RequestError(f"sample {key!r} has no {modality}", 404)
        ext, data = found
        return Response(data, mimetype=MEDIA_TYPES.get(ext, "application/octet-stream"))

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
