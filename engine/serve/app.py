"""The HTTP server over one backend: OpenAI- and A1111-compatible endpoints, jobs with
Server-Sent Events, adapter management, health, metrics and a small web page.

    app = create_app(LocalBackend(engine), Settings(api_keys=[...]))
    uvicorn.run(app)           # or `impasto serve`, which also drains on SIGTERM

Every generation is `backend.submit` of one request per image, so concurrent clients with
different adapters share the engine's denoising steps.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..api import ADAPTER_NAME
from ..errors import AdapterError, AdapterNameError, RequestError
from . import build, errors, page
from .a1111 import NotSupportedError
from .auth import AuthError, Keys
from .metrics import CONTENT_TYPE, Metrics
from .schemas import (
    AdapterList,
    AdapterOut,
    ErrorResponse,
    ImageGenerationRequest,
    ImageGenerationResponse,
    JobCreated,
    JobStatus,
    Txt2ImgRequest,
    Txt2ImgResponse,
)
from .tasks import Task, Tasks

SSE_POLL_SECONDS = 0.005  # the engine has no per-step callback: progress is polled this often


@dataclass
class Settings:
    """Server settings (the CLI's flags). Body limits are bytes; `max_body_bytes` bounds JSON
    bodies, `max_upload_bytes` an adapter upload. `grace_seconds`: how long a stopping server
    lets in-flight requests and jobs finish. Finished jobs stay readable `job_ttl_seconds`, at
    most `max_kept_jobs` of them."""

    api_keys: tuple = ()
    admin_keys: tuple = ()
    adapter_root: str | None = None
    max_body_bytes: int = 16 * 2**20
    max_upload_bytes: int = 512 * 2**20
    grace_seconds: float = 30.0
    job_ttl_seconds: float = 3600.0
    max_kept_jobs: int = 256  # finished jobs hold their images until fetched or evicted
    drain: dict = field(default_factory=dict)  # {"deadline": monotonic time}, set when stopping


class _Limits:
    """ASGI middleware: refuses bodies over the limit with 413 (Content-Length at once, a
    chunked body when it crosses the limit), checks the admin key of an upload before its body
    is read (FastAPI parses a form before running the route's dependencies), and records every
    response in the metrics."""

    def __init__(self, app, settings: Settings, metrics: Metrics, keys: Keys):
        self.app, self.settings, self.metrics, self.keys = app, settings, metrics, keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [500]
        upload = scope["path"] == "/v1/adapters" and scope["method"] == "POST"
        limit = self.settings.max_upload_bytes if upload else self.settings.max_body_bytes
        too_large = errors.error_response(413, "request_too_large", str(errors.BodyTooLarge(limit)))
        over = [False]

        async def send_status(message):
            if over[0]:  # the app answered a body it could not read (FastAPI says 400): it is a 413
                if message["type"] == "http.response.start":
                    status[0] = 413
                    await too_large(scope, receive, send)
                return
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            headers = dict(scope["headers"])
            if upload:
                try:
                    self.keys.admin(headers.get(b"authorization", b"").decode("latin-1"))
                except AuthError as e:
                    status[0] = e.status
                    await errors.auth_error(e)(scope, receive, send)
                    return
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                status[0] = 413
                await too_large(scope, receive, send)
                return
            seen = [0]

            async def bounded_receive():
                message = await receive()
                if message["type"] == "http.request":
                    seen[0] += len(message.get("body", b""))
                    if seen[0] > limit:
                        over[0] = True
                        raise errors.BodyTooLarge(limit)
                return message

            await self.app(scope, bounded_receive, send_status)
        finally:
            route = scope.get("route")
            self.metrics.observe(getattr(route, "path", "other"), status[0], time.perf_counter() - t0)


def create_app(backend, settings: Settings | None = None) -> FastAPI:
    """Semantics: a FastAPI app serving `backend` (see backend.Backend) with `settings`; its
    lifespan waits, when the server stops, for in-flight tasks until the drain deadline, then
    cancels what is left and closes the backend."""
    settings = settings or Settings()
    keys = Keys(settings.api_keys, settings.admin_keys)
    tasks = Tasks(ttl=settings.job_ttl_seconds, keep=settings.max_kept_jobs)
    metrics = Metrics(backend)

    @asynccontextmanager
    async def lifespan(app):
        yield
        deadline = settings.drain.get("deadline", time.monotonic() + settings.grace_seconds)
        while tasks.in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in tasks.in_flight():
            task.cancel()
        await anyio.to_thread.run_sync(backend.close)

    errors_doc = {code: {"model": ErrorResponse} for code in (401, 403, 404, 409, 413, 422, 429, 500, 503, 504)}
    app = FastAPI(title="impasto", version="0.1.0", lifespan=lifespan, responses=errors_doc,
                  description="Personalized text-to-image diffusion: many adapters, one batched forward per step.")
    app.state.backend, app.state.tasks, app.state.settings = backend, tasks, settings
    errors.install(app)
    app.add_middleware(_Limits, settings=settings, metrics=metrics, keys=keys)

    def caller(request: Request) -> str:
        return keys.caller(request.headers.get("authorization"))

    def admin(request: Request) -> str:
        return keys.admin(request.headers.get("authorization"))

    def start(images, owner: str, kind: str) -> Task:
        task = Task(owner, images, build.submit_all(backend, images), kind)
        keep = getattr(backend, "keep", None)
        if kind == "job" and keep is not None:  # held by remote replicas: the id names them (serve/ray)
            try:
                task.id = keep(task, settings.job_ttl_seconds)
            except BaseException:
                task.cancel()
                raise
        tasks.add(task)
        return task

    async def start_async(images, owner: str, kind: str) -> Task:
        """`start` off the event loop: a backend's submit may wait (a remote replica starting)."""
        return await anyio.to_thread.run_sync(start, images, owner, kind)

    async def finish_sync(request: Request, task: Task) -> list[str]:
        """Wait for a synchronous call's task; a client that disconnects cancels it."""
        waiter = asyncio.ensure_future(task.wait())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        try:
            if not waiter.done():
                waiter.cancel()
                task.cancel()
                return []
            return await anyio.to_thread.run_sync(build.encode, task, backend)
        finally:
            tasks.discard(task)  # answered (or nobody to answer): only jobs are kept for GET

    # ------------------------------------------------------------------ OpenAI
    @app.post("/v1/images/generations", response_model=ImageGenerationResponse)
    async def images_generations(body: ImageGenerationRequest, request: Request, who: str = Depends(caller)):
        task = await start_async(build.openai_images(body, backend), who, "sync")
        pngs = await finish_sync(request, task)
        return build.openai_response(task, pngs)

    # ------------------------------------------------------------------ A1111
    @app.post("/sdapi/v1/txt2img", response_model=Txt2ImgResponse)
    async def txt2img(body: Txt2ImgRequest, request: Request, who: str = Depends(caller)):
        task = await start_async(build.a1111_images(body, backend), who, "sync")
        pngs = await finish_sync(request, task)
        return build.a1111_response(body, task, pngs, backend)

    @app.post("/sdapi/v1/img2img")
    @app.post("/v1/images/edits")
    async def img2img(who: str = Depends(caller)):
        raise NotSupportedError("img2img is not supported yet (txt2img and /v1/images/generations are)")

    @app.get("/sdapi/v1/loras")
    async def sd_loras(who: str = Depends(caller)):
        return [{"name": a.name, "alias": a.name, "path": os.path.basename(a.path),
                 "metadata": {"family": a.family, "rank": a.rank}}
                for a in await anyio.to_thread.run_sync(backend.adapters) if a.family in ("lora",)]

    @app.get("/sdapi/v1/sd-models")
    async def sd_models(who: str = Depends(caller)):
        name = backend.model_name
        return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None}]

    @app.get("/sdapi/v1/samplers")
    async def sd_samplers(who: str = Depends(caller)):
        from .. import schedulers

        return [{"name": name, "aliases": [cls], "options": dict(overrides)}  # the model's own first
                for name, (cls, overrides) in sorted(schedulers.A1111.items(), key=lambda kv: kv[0] != backend.sampler)]

    @app.get("/sdapi/v1/schedulers")
    async def sd_schedulers(who: str = Depends(caller)):
        from .a1111 import SCHEDULE_TYPES

        return [{"name": s.lower(), "label": s} for s in SCHEDULE_TYPES]

    @app.get("/sdapi/v1/options")
    async def sd_options(who: str = Depends(caller)):
        return {"sd_model_checkpoint": backend.model_name, "sd_checkpoint_hash": None,
                "samples_format": "png", "CLIP_stop_at_last_layers": 1}

    @app.get("/sdapi/v1/progress")
    async def sd_progress(who: str = Depends(caller)):
        """The caller's own in-flight tasks only (A1111 reports the one job of its server)."""
        mine = tasks.in_flight(who)
        done = sum(t.progress[0] * len(t.jobs) for t in mine)
        total = sum(t.progress[1] * len(t.jobs) for t in mine)
        fraction = done / total if total else 0.0
        elapsed = time.time() - min((t.created for t in mine), default=time.time())
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        step, steps = (mine[0].progress if mine else (0, 0))
        return {"progress": fraction, "eta_relative": eta, "current_image": None, "textinfo": None,
                "state": {"skipped": False, "interrupted": False, "job": mine[0].id if mine else "",
                          "job_count": len(mine), "job_timestamp": "", "job_no": 0,
                          "sampling_step": step, "sampling_steps": steps}}

    @app.post("/sdapi/v1/interrupt")
    async def sd_interrupt(who: str = Depends(caller)):
        """Cancel the caller's own in-flight tasks, never another caller's."""
        for task in tasks.in_flight(who):
            task.cancel()
        return {}

    # ------------------------------------------------------------------ jobs
    def job_status(task: Task) -> dict:
        step, total = task.progress
        out = {"id": task.id, "state": task.state, "progress": {"step": step, "total": total},
               "created": int(task.created), "result": None, "error": None}
        if task.state == "succeeded":
            out["result"] = build.openai_response(task, build.encode(task, backend))
        elif task.done():
            err = errors.impasto_error(task.error())
            out["error"] = json.loads(err.body)["error"]
        return out

    async def own(task_id: str, who: str) -> Task:
        task = tasks.get(task_id, who)
        find = getattr(backend, "find", None)
        if task is None and find is not None:  # made by another ingress replica, or before a restart
            task = await anyio.to_thread.run_sync(find, task_id, who)
            if task is not None:
                tasks.add(task)
        if task is None:
            raise HTTPException(404, f"no job {task_id!r}")
        return task

    @app.post("/v1/jobs", response_model=JobCreated, status_code=202)
    async def create_job(body: ImageGenerationRequest, who: str = Depends(caller)):
        return {"id": (await start_async(build.openai_images(body, backend), who, "job")).id}

    @app.get("/v1/jobs/{job_id}", response_model=JobStatus)
    async def get_job(job_id: str, who: str = Depends(caller)):
        return await anyio.to_thread.run_sync(job_status, await own(job_id, who))

    @app.delete("/v1/jobs/{job_id}", response_model=JobStatus, status_code=202)
    async def cancel_job(job_id: str, who: str = Depends(caller)):
        task = await own(job_id, who)
        task.cancel()
        return await anyio.to_thread.run_sync(job_status, task)

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str, who: str = Depends(caller)):
        """Server-Sent Events: `progress` {step, total} once per denoising step, then one
        `result` (the job's status with its images) or `error` event."""
        task = await own(job_id, who)

        async def stream():
            sent = 0
            while True:
                finished = task.done()  # read before progress: no step is missed at the end
                step, total = task.progress
                for s in range(sent + 1, step + 1):
                    yield _sse("progress", {"step": s, "total": total})
                sent = max(sent, step)
                if finished:
                    break
                await asyncio.sleep(SSE_POLL_SECONDS)
            status = await anyio.to_thread.run_sync(job_status, task)
            yield _sse("result" if status["state"] == "succeeded" else "error", status)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------ adapters
    @app.get("/v1/adapters", response_model=AdapterList)
    async def list_adapters(who: str = Depends(caller)):
        return {"data": [_adapter_out(a) for a in await anyio.to_thread.run_sync(backend.adapters)]}

    @app.post("/v1/adapters", status_code=201, response_model=AdapterOut)
    async def upload_adapter(file: UploadFile = File(...), name: str | None = Form(None),
                             family: str | None = Form(None), suffix: str | None = Form(None),
                             token: str | None = Form(None), who: str = Depends(admin)):
        """Write the upload atomically under the adapter root, then register it (at a step
        boundary); a file the store refuses is deleted and its error returned."""
        root = settings.adapter_root
        if root is None:
            raise RequestError("adapter uploads need an adapter root (impasto serve --adapters DIR)")
        filename = os.path.basename(file.filename or "")
        if not filename.endswith(".safetensors"):
            raise RequestError(f"file: {filename!r}: only .safetensors adapters can be uploaded")
        name = name or filename[: -len(".safetensors")]
        if not ADAPTER_NAME.match(name):
            raise RequestError(f"name: {name!r} must match [A-Za-z0-9._-]+")
        final = os.path.join(root, f"{name}.safetensors")
        if any(a.name == name for a in await anyio.to_thread.run_sync(backend.adapters)):
            raise HTTPException(409, f"adapter {name!r} is already registered")
        await anyio.to_thread.run_sync(_write_atomically, file.file, root, final)
        try:
            info = await anyio.to_thread.run_sync(
                lambda: backend.register(name, final, family=family, suffix=suffix, token=token))
        except BaseException:
            os.unlink(final)
            raise
        return _adapter_out(info)

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str, who: str = Depends(admin)):
        """Unregister (at a step boundary) and remove its file when it lies in the adapter root."""
        info = next((a for a in await anyio.to_thread.run_sync(backend.adapters) if a.name == name), None)
        if info is None:
            raise HTTPException(404, f"no adapter {name!r}")
        try:
            await anyio.to_thread.run_sync(backend.unregister, name)
        except AdapterNameError:  # unregistered meanwhile
            raise HTTPException(404, f"no adapter {name!r}") from None
        except AdapterError as e:  # in use by a running request
            raise HTTPException(409, str(e)) from None
        root = settings.adapter_root
        if root and os.path.isfile(info.path) and os.path.dirname(os.path.realpath(info.path)) == os.path.realpath(root):
            os.unlink(info.path)
        return {"deleted": name}

    # ------------------------------------------------------------------ operations
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        alive = (await anyio.to_thread.run_sync(backend.stats))["alive"]  # a remote backend's stats wait
        if settings.drain or not alive:
            why = "stopping" if settings.drain else "the engine's worker is not running"
            return errors.error_response(503, "unavailable", why)
        return {"status": "ready", "model": backend.model_name}

    @app.get("/metrics")
    async def prometheus(who: str = Depends(caller)):
        return Response(await anyio.to_thread.run_sync(metrics.render), media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page.HTML

    return app


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def _adapter_out(info) -> dict:
    return {"name": info.name, "family": info.family, "format": info.format, "rank": info.rank,
            "nbytes": info.nbytes, "token": info.token, "suffix": info.suffix}


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the ASGI server sends http.disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _write_atomically(src, root: str, final: str) -> None:
    """Copy `src` to `final` (inside `root`) so that `final` appears whole or not at all, and
    never replaces an existing file: a temporary file in the same folder, fsync, then a hard
    link (which fails if `final` exists) and unlink of the temporary name."""
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".upload-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(2**20):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(tmp, final)
        except FileExistsError:
            raise HTTPException(409, f"{os.path.basename(final)} already exists in the adapter root") from None
    finally:
        os.unlink(tmp)
