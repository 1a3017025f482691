"""The HTTP face of `Service`: Tinker's routes under /api/v1, as the official SDK calls them.

Every failure answers with a JSON body `{"error", "category"}` and a 4xx/5xx status (an empty 4xx makes the
SDK retry blindly); a failure inside a future is reported by `retrieve_future` in the same shape, which the SDK
raises as RequestFailedError. forward_backward arrives as protobuf; its result and sampling results leave as
protobuf; everything else is JSON.
"""

from __future__ import annotations

import inspect
import json
import socket
import threading
import time
from typing import Any

import uvicorn
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rl.service.codec import decode_forward_backward, encode_forward_backward_output, encode_sample_response
from rl.service.registry import AccessDenied
from rl.service.service import Service
from rl.types import (
    CreateCustomLossRequest,
    CreateModelRequest,
    CreateSamplingSessionRequest,
    ForwardBackwardOutput,
    FutureRetrieveRequest,
    GetInfoRequest,
    LoadWeightsRequest,
    OptimStepRequest,
    SampleRequest,
    SampleResponse,
    SaveWeightsExternalRequest,
    SaveWeightsForSamplerRequest,
    SaveWeightsRequest,
    SetCheckpointTtlRequest,
    TryAgainResponse,
    WeightsInfoRequest,
)

PROTOBUF = "application/x-protobuf"


def build_app(service: Service, *, max_body_bytes: int = 64 * 2**20) -> Starlette:
    return Starlette(routes=TinkerRoutes(service, max_body_bytes).routes(), lifespan=lambda app: service.supervising())


class TinkerRoutes:
    """Each route reads the caller's API key, parses the body (JSON into a request type, or protobuf) and answers
    with the service's result, a future over it, or a failure in the shape the SDK reads."""

    def __init__(self, service: Service, max_body_bytes: int):
        self.service = service
        self.max_body_bytes = max_body_bytes

    def routes(self) -> list[Route]:
        service, route, typed = self.service, self.route, self.typed
        return [
            route("client/config", lambda r, u: self.ok(r, service.client_config())),
            route("client/dynamic_config", lambda r, u: self.ok(r)),
            route("create_session", self.create_session),
            route("session_heartbeat", lambda r, u: self.ok(r)),
            route("sessions/{session_id}/finish", lambda r, u: self.ok(r)),
            route("sessions", lambda r, u: self.ok(r, service.list_sessions(u, *page(r, 20))), methods=("GET",)),
            route("sessions/{session_id}", lambda r, u: self.ok(r, service.get_session(u, r.path_params["session_id"])),
                  methods=("GET",)),
            route("telemetry", lambda r, u: self.ok(r, {"status": "accepted"})),
            route("healthz", lambda r, u: self.ok(r, {"status": "ok"}), methods=("GET",)),
            route("get_server_capabilities", lambda r, u: self.ok(r, service.capabilities()), methods=("GET",)),
            route("create_model", typed(CreateModelRequest, service.create_model, queued=True)),
            route("get_info", typed(GetInfoRequest, service.get_info)),
            route("forward_backward", self.forward_backward),
            route("optim_step", typed(OptimStepRequest, service.optim_step, queued=True)),
            route("create_custom_loss", typed(CreateCustomLossRequest, service.create_custom_loss, queued=True)),
            route("save_weights", typed(SaveWeightsRequest, service.save_weights, queued=True)),
            route("save_weights_for_sampler", typed(SaveWeightsForSamplerRequest, service.save_weights_for_sampler,
                                                    queued=True)),
            route("load_weights", typed(LoadWeightsRequest, service.load_weights, queued=True)),
            route("save_weights_external", typed(SaveWeightsExternalRequest, service.save_weights_external,
                                                 queued=True)),
            Route("/api/v1/external_files/{token}", self.external_file, methods=["GET"]),  # the signature is the key
            route("create_sampling_session", typed(CreateSamplingSessionRequest, service.create_sampling_session)),
            route("samplers/{sampler_id}", self.sampler, methods=("GET",)),
            route("asample", self.asample),
            route("retrieve_future", self.retrieve_future),
            route("weights_info", typed(WeightsInfoRequest, service.weights_info)),
            route("training_runs", self.training_runs, methods=("GET",)),
            route("training_runs/{run}", self.training_run, methods=("GET",)),
            route("training_runs/{run}/checkpoints", self.run_checkpoints, methods=("GET",)),
            route("training_runs/{run}/checkpoints/{checkpoint:path}", self.checkpoint,
                  methods=("GET", "DELETE", "POST", "PUT")),
            route("checkpoints", self.user_checkpoints, methods=("GET",)),
            route("billing/usage/checkpoints/current", self.checkpoint_storage_usage, methods=("GET",)),
            route("{unknown:path}", self.not_served, methods=("GET", "POST", "PUT", "DELETE")),  # last: the rest
        ]

    # ---- plumbing --------------------------------------------------------------------------------------------

    def route(self, path: str, handler, methods=("POST",)) -> Route:
        async def endpoint(request: Request) -> Response:
            try:
                user = self.service.registry.user(request.headers.get("x-api-key"))
                return await handler(request, user)
            except AccessDenied as error:
                return failure(401, str(error))
            except BodyTooLarge as error:
                return failure(413, f"body of {error.args[0]} bytes or more exceeds the limit of {self.max_body_bytes}")
            except ValueError as error:  # bad input, pydantic's ValidationError included: named by its field
                return failure(400, str(getattr(error, "cause", None) or error))  # a learner's, without Ray's trace
            except Exception as error:  # the server's fault; the server goes on
                return failure(500, f"{type(error).__name__}: {error}", "server")

        return Route(f"/api/v1/{path}", endpoint, methods=list(methods))

    def typed(self, request_type: type[BaseModel], function, *, queued: bool = False):
        """A JSON endpoint: the body is validated as `request_type` (a 400 names a bad field) and handed to
        `function(user, request)`; the answer is its result, awaited if need be, or a future over it (`queued`)."""
        async def handler(request: Request, user: str) -> Response:
            result = function(user, request_type.model_validate(await self.json_of(request)))
            if queued:
                return future(result)
            return as_json(await result if inspect.isawaitable(result) else result)
        return handler

    async def body_of(self, request: Request) -> bytes:
        declared = int(request.headers.get("content-length") or 0)
        if declared > self.max_body_bytes:
            raise BodyTooLarge(declared)
        # Read in chunks and counted as it comes: a chunked body declares no length, and would otherwise be held
        # whole, however large, before its size could be checked.
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BodyTooLarge(size)
            chunks.append(chunk)
        return b"".join(chunks)

    async def json_of(self, request: Request) -> dict:
        try:
            body = json.loads(await self.body_of(request) or b"{}")
        except json.JSONDecodeError as error:
            raise ValueError(f"malformed JSON body: {error}") from None
        if not isinstance(body, dict):
            raise ValueError("the JSON body must be an object")
        return body

    async def ok(self, request: Request, answer: dict | None = None) -> Response:
        if request.method == "POST":
            await self.json_of(request)
        return JSONResponse(answer or {})

    # ---- endpoints that are more than a typed body -----------------------------------------------------------

    async def external_file(self, request: Request) -> Response:
        try:
            content = await self.service.external_file(request.path_params["token"])
        except AccessDenied as error:
            return failure(403, str(error))
        except (ValueError, KeyError) as error:
            return failure(404, f"no such file: {error}")
        return Response(content, media_type="application/octet-stream")

    async def not_served(self, request: Request, user: str) -> Response:
        return failure(404, f"{request.method} {request.url.path} is not served by rl-serve (docs/tinker.md lists "
                            "what is)")

    async def forward_backward(self, request: Request, user: str) -> Response:
        if request.headers.get("content-encoding", "identity") != "identity":
            raise ValueError("compressed forward_backward bodies are not accepted (client/config says so)")
        model_id, seq_id, batch, forward_only = decode_forward_backward(await self.body_of(request))
        return future(self.service.forward_backward(user, model_id, seq_id, batch, forward_only))

    async def create_session(self, request: Request, user: str) -> Response:
        body = await self.json_of(request)
        return JSONResponse({"session_id": self.service.registry.new_session(
            user, body.get("user_metadata"), body.get("display_name"))})

    async def asample(self, request: Request, user: str) -> Response:
        sample = SampleRequest.model_validate(await self.json_of(request))
        request_id = self.service.sample(user, sample)
        return future(request_id, sample_sequence_ids=[f"{request_id}-{index}" for index in range(sample.num_samples)])

    async def retrieve_future(self, request: Request, user: str) -> Response:
        request_id = FutureRetrieveRequest.model_validate(await self.json_of(request)).request_id
        result = await self.service.futures.retrieve(user, request_id)
        if result is None:
            return as_json(TryAgainResponse(request_id=request_id, queue_state="active"))
        if isinstance(result, ForwardBackwardOutput):
            return Response(encode_forward_backward_output(result), media_type=PROTOBUF)
        if isinstance(result, SampleResponse):
            return Response(encode_sample_response(result), media_type=PROTOBUF)
        return as_json(result)

    async def sampler(self, request: Request, user: str) -> Response:
        sampler_id = request.path_params["sampler_id"]
        found = self.service.sampler(user, sampler_id)
        return JSONResponse({"sampler_id": sampler_id, "base_model": found["base_model"],
                             "model_path": found["model_path"]})

    async def training_runs(self, request: Request, user: str) -> Response:
        return as_json(await self.service.training_runs(user, *page(request, 20)))

    async def training_run(self, request: Request, user: str) -> Response:
        return as_json(await self.service.training_run(user, request.path_params["run"]))

    async def run_checkpoints(self, request: Request, user: str) -> Response:
        return as_json(await self.service.run_checkpoints(user, request.path_params["run"]))

    async def user_checkpoints(self, request: Request, user: str) -> Response:
        return as_json(await self.service.user_checkpoints(user, *page(request, 100)))

    async def checkpoint_storage_usage(self, request: Request, user: str) -> Response:
        return as_json(await self.service.checkpoint_storage_usage(user, request.query_params.get("project_id")))

    async def checkpoint(self, request: Request, user: str) -> Response:
        run, path = request.path_params["run"], request.path_params["checkpoint"]
        # KIND/NAME, or KIND/NAME/ACTION (a name has no "/": a checkpoint may be called "publish" or "ttl")
        checkpoint_id, action = path.rsplit("/", 1) if path.count("/") == 2 else (path, None)
        if action == "external_weights_urls" and request.method == "GET":
            return as_json(await self.service.external_weights_urls(user, run, checkpoint_id, str(request.base_url)))
        if action == "publish":
            await self.service.set_public(user, run, checkpoint_id, request.method == "POST")
        elif action == "ttl" and request.method == "PUT":
            ttl = SetCheckpointTtlRequest.model_validate(await self.json_of(request)).ttl_seconds
            await self.service.set_checkpoint_ttl(user, run, checkpoint_id, ttl)
        elif action is None and request.method == "DELETE":
            await self.service.delete_checkpoint(user, run, checkpoint_id)
        else:
            raise ValueError(f"{request.method} {request.url.path} is not supported")
        return JSONResponse({})


def future(request_id: str, **extra) -> Response:
    return JSONResponse({"request_id": request_id, **extra})


def page(request: Request, default_limit: int) -> tuple[int, int]:
    return int(request.query_params.get("limit", default_limit)), int(request.query_params.get("offset", 0))


class BodyTooLarge(Exception):
    pass


def failure(status: int, message: str, category: str = "user") -> JSONResponse:
    return JSONResponse({"error": message, "category": category}, status_code=status)


def as_json(value: Any) -> JSONResponse:
    return JSONResponse(value.model_dump(mode="json") if isinstance(value, BaseModel) else value)



class ServerThread:
    """The app under uvicorn on a thread of this process, on a loopback port (a free one unless `port` is given):
    for tests, benchmarks and notebooks (`rl-serve` runs it in the foreground instead)."""

    def __init__(self, service: Service, *, port: int | None = None, **app_options):
        self.service = service
        port = port or free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(build_app(service, **app_options), host="127.0.0.1", port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
