"""Online classification on Ray Serve: one deployment with a FastAPI ingress and dynamic
batching, on the checkpoints, decoder and limits batch scoring uses.

    POST /predict   one or more images: multipart form files in the field ``file``
                    (``curl -F file=@cat.png``, repeatable) or the raw bytes as the body
    GET  /model     what is served: model, trial, validation/test accuracy, input size, commit
    GET  /healthz   {"status": "ok"} once the replica has loaded and traced its model
    GET  /          a page to try it: choose or drop images, see each one's top-3

Every answer names the model (trial id and settings hash). Bad input is a 4xx with a JSON
``error`` naming the problem (empty body 400, not an image 415, too large or too many files
413), never a 500 and never a dead replica. The model is loaded once per replica through the
project's one safe loader; images are decoded by ``images.decode_image`` with the pixel cap
checked before decoding; concurrent requests' images are batched together
(``@serve.batch``: up to ``max_batch_size`` images, waiting at most ``batch_wait_ms``).
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations
# at run time (``request: Request``), and postponed ones made it take ``request`` for a query
# parameter (every POST answered 422).
import asyncio
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve

from cifar_core.images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from cifar_core.settings import CLASS_NAMES

#: Status codes for the decoder's error kinds, when no image of a request could be scored.
STATUS_OF_KIND = {"too large": 413, "empty file": 400}
UNSUPPORTED = 415


@dataclass(frozen=True)
class ServeLimits:
    """What one request may carry."""

    max_request_bytes: int = 16 * 2**20   # the whole body
    max_files: int = 16                   # images per request
    max_file_bytes: int = 8 * 2**20       # one image's encoded bytes
    max_pixels: int = DEFAULT_MAX_PIXELS  # one image's declared size, checked before decoding

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} {value} must be >= 1")


class RequestError(Exception):
    """A request that cannot be answered: its HTTP status and the problem, named."""

    def __init__(self, status: int, problem: str):
        super().__init__(problem)
        self.status = status


def answer(name: str, probabilities: np.ndarray | None, decoded: Any) -> dict:
    """One image's entry: its top-3 classes with probabilities, or its error."""
    if probabilities is None:
        return {"name": name, "status": "error", "error": str(decoded), "top3": []}
    top = np.argsort(-probabilities, kind="stable")[:3]
    return {"name": name, "status": "ok", "error": None,
            "top3": [{"class": CLASS_NAMES[i], "probability": float(probabilities[i])}
                     for i in top]}


async def read_images(request: Request, limits: ServeLimits) -> list[tuple[str, bytes]]:
    """(name, bytes) of each image in a request, within the limits; RequestError otherwise."""
    body = await read_body(request, limits.max_request_bytes)
    if not body:
        raise RequestError(400, "empty body: send an image (raw bytes, or multipart form "
                                "files in the field 'file')")
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        named = [("body", body)]
    else:
        named = await _form_files(request, body, limits)
    for name, data in named:
        if len(data) > limits.max_file_bytes:
            raise RequestError(413, f"{name}: {len(data)} bytes exceeds the cap of "
                                    f"{limits.max_file_bytes} bytes per image")
    return named


async def read_body(request: Request, cap: int) -> bytes:
    """The request body, read no further than ``cap`` bytes (413 beyond it)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise RequestError(413, f"the request is {declared} bytes; the cap is {cap}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise RequestError(413, f"the request is over the cap of {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _form_files(request: Request, body: bytes, limits: ServeLimits):
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=limits.max_files,
                                     max_fields=limits.max_files,
                                     max_part_size=limits.max_file_bytes).parse()
    except MultiPartException as error:
        too_many = "Too many" in str(error)
        raise RequestError(413 if too_many else 400, f"multipart form: {error} (at most "
                           f"{limits.max_files} files of {limits.max_file_bytes} bytes)")
    files = [item for item in form.getlist("file") if isinstance(item, UploadFile)]
    if not files:
        raise RequestError(400, "multipart form without files in the field 'file' "
                                "(curl -F file=@image.png)")
    return [(item.filename or f"file{index}", await item.read())
            for index, item in enumerate(files)]


app = FastAPI(title="cifar-fleet", docs_url=None, redoc_url=None)


@serve.deployment(ray_actor_options={"num_cpus": 1})
@serve.ingress(app)
class Classifier:
    """One replica: the model loaded and traced once, requests' images batched together."""

    def __init__(self, model_bytes: bytes, description: dict, limits: ServeLimits,
                 max_batch_size: int = 32, batch_wait_ms: float = 10.0):
        import cifar_core  # noqa: F401  (tf_keras before TensorFlow)
        from cifar_core.scoring import load_model_from_bytes, make_predict_function
        from cifar_core.train import configure_gpus

        configure_gpus()  # replicas may share a GPU
        self.description, self.limits = description, limits
        self.predict = make_predict_function(load_model_from_bytes(model_bytes),
                                             description["input_size"])
        self.predict(np.zeros((1, 32, 32, 3), np.uint8))  # trace now, not on a request
        self.classify.set_max_batch_size(max_batch_size)
        self.classify.set_batch_wait_timeout_s(batch_wait_ms / 1000)
        self.answer_model = {k: description.get(k) for k in ("model", "trial_id",
                                                               "settings_hash")}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def classify(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return list(self.predict(np.stack(images)))

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/model")
    async def model(self) -> dict:
        return {**self.description, "limits": asdict(self.limits)}

    @app.get("/", response_class=HTMLResponse)
    async def page(self) -> str:
        from cifar_core.serving_page import PAGE

        return PAGE

    @app.post("/predict")
    async def predict(self, request: Request):
        try:
            named = await read_images(request, self.limits)
        except RequestError as error:
            return JSONResponse({"error": str(error), "model": self.answer_model},
                                status_code=error.status)
        decoded = await asyncio.gather(*(asyncio.to_thread(self._pixels, data)
                                         for _, data in named))
        scored = [i for i, item in enumerate(decoded) if not isinstance(item, ImageError)]
        if not scored:  # nothing to classify: the request itself is bad
            first = decoded[0]
            return JSONResponse({"error": str(first), "model": self.answer_model},
                                status_code=STATUS_OF_KIND.get(first.kind, UNSUPPORTED))
        probabilities = await asyncio.gather(*(self.classify(decoded[i]) for i in scored))
        by_index = dict(zip(scored, probabilities))
        return {"model": self.answer_model, "predictions": [
            answer(name, by_index.get(i), decoded[i]) for i, (name, _) in enumerate(named)]}

    def _pixels(self, data: bytes) -> np.ndarray | ImageError:
        try:
            return decode_image(data, self.limits.max_pixels)
        except ImageError as error:
            return error
        except Exception as error:  # a decoder bug on one image must not cost the replica
            return ImageError("corrupt image", " ".join(str(error).split())[:300])


def build(model: str, limits: ServeLimits = ServeLimits(), *, replicas: int = 1,
          gpus_per_replica: float = 0.0, max_batch_size: int = 32,
          batch_wait_ms: float = 10.0, endpoint: str | None = None):
    """The Serve application for MODEL (anything ``cifar score --model`` takes), checked and
    loaded once here, before any replica starts. Raises CheckpointError for a bad MODEL."""
    from cifar_core.checkpoints import check_model, resolve_checkpoint

    if replicas < 1 or max_batch_size < 1 or not batch_wait_ms >= 0 or not (
            gpus_per_replica >= 0 and np.isfinite(gpus_per_replica)):
        raise ValueError(f"--replicas {replicas} and --max-batch-size {max_batch_size} must be "
                         f">= 1, --batch-wait-ms {batch_wait_ms} and --gpus-per-replica "
                         f"{gpus_per_replica} finite and >= 0")
    checkpoint = resolve_checkpoint(model, endpoint)
    model_bytes = check_model(checkpoint)
    # Serve's default of 5 requests in flight per replica would keep a batch from ever
    # filling: the proxy queues the rest and retries them with back-off.
    options: dict[str, Any] = {"num_replicas": replicas,
                               "max_ongoing_requests": max(64, 2 * max_batch_size)}
    if gpus_per_replica:
        options["ray_actor_options"] = {"num_cpus": 1, "num_gpus": gpus_per_replica}
    return Classifier.options(**options).bind(model_bytes, checkpoint.describe(), limits,
                                              max_batch_size, batch_wait_ms)


def app_builder(args: dict[str, str]):
    """For Ray Serve's own tools: ``serve run cifar_core.serving:app_builder model=MODEL``
    (or a ``serve deploy`` config's ``import_path``, with ``args: {model: ...}``)."""
    return build(args["model"], replicas=int(args.get("replicas", 1)),
                 max_batch_size=int(args.get("max_batch_size", 32)),
                 batch_wait_ms=float(args.get("batch_wait_ms", 10)))
