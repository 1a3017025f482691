"""Futures (long-running requests polled for their result) and the SDK's telemetry events."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field, NonNegativeInt

from rl.types._base import StrictModel

Severity = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class FutureRetrieveRequest(StrictModel):
    """Asks for the result of a request accepted earlier."""

    request_id: str
    allow_metadata_only: bool = False


class TryAgainResponse(StrictModel):
    """The result is not ready yet: poll again."""

    request_id: str
    queue_state: Literal["active", "paused_capacity", "paused_rate_limit"] = "active"
    type: Literal["try_again"] = "try_again"


class _Event(StrictModel):
    event_id: str
    event_session_index: NonNegativeInt
    severity: Severity
    timestamp: datetime


class SessionStartEvent(_Event):
    event: Literal["SESSION_START"] = "SESSION_START"


class SessionEndEvent(_Event):
    event: Literal["SESSION_END"] = "SESSION_END"
    duration: str
    """ISO 8601 duration of the session."""


class UnhandledExceptionEvent(_Event):
    event: Literal["UNHANDLED_EXCEPTION"] = "UNHANDLED_EXCEPTION"
    error_type: str
    error_message: str
    traceback: str | None = None


class GenericEvent(_Event):
    event: Literal["GENERIC_EVENT"] = "GENERIC_EVENT"
    event_name: str
    event_data: dict[str, Any] = Field(default_factory=dict)


TelemetryEvent = Annotated[
    SessionStartEvent | SessionEndEvent | UnhandledExceptionEvent | GenericEvent, Field(discriminator="event")
]


class TelemetryBatch(StrictModel):
    """Events from one client process and session."""

    events: list[TelemetryEvent]
    platform: str
    sdk_version: str
    session_id: str
    process_uuid: str


class TelemetrySendRequest(TelemetryBatch):
    """The body of a telemetry POST: one batch."""
