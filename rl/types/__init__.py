"""The Tinker API's types, as pydantic models: what crosses every boundary of `rl` (Ray calls, HTTP).

Grouped by concern: `tensors` (model inputs, arrays, datums), `training`, `sampling`, `checkpoints`, `futures`
(futures and telemetry). Import them from here.
"""

from rl.types.checkpoints import (
    Checkpoint,
    CheckpointArchiveUrlResponse,
    CheckpointsListResponse,
    CheckpointStorageUsage,
    CheckpointStorageUsageResponse,
    CheckpointType,
    Cursor,
    ExternalWeightsUrlsResponse,
    LoadWeightsRequest,
    LoadWeightsResponse,
    ParsedCheckpointTinkerPath,
    SaveWeightsExternalRequest,
    SaveWeightsExternalResponse,
    SaveWeightsForSamplerRequest,
    SaveWeightsForSamplerResponse,
    SaveWeightsRequest,
    SaveWeightsResponse,
    SetCheckpointTtlRequest,
    TrainingRun,
    TrainingRunsResponse,
    WeightsInfoRequest,
    WeightsInfoResponse,
    check_checkpoint_name,
)
from rl.types.futures import (
    FutureRetrieveRequest,
    GenericEvent,
    SessionEndEvent,
    SessionStartEvent,
    Severity,
    TelemetryBatch,
    TelemetryEvent,
    TelemetrySendRequest,
    TryAgainResponse,
    UnhandledExceptionEvent,
)
from rl.types.sampling import (
    CreateSamplingSessionRequest,
    CreateSamplingSessionResponse,
    SampledSequence,
    SampleRequest,
    SampleResponse,
    SamplingParams,
    StopReason,
)
from rl.types.tensors import (
    Datum,
    EncodedTextChunk,
    ImageAssetPointerChunk,
    ImageChunk,
    ModelInput,
    ModelInputChunk,
    TensorData,
    TensorDtype,
)
from rl.types.training import (
    AdamOptimizerConfig,
    AdamParams,
    CreateCustomLossRequest,
    CreateCustomLossResponse,
    CreateModelRequest,
    CustomLossGraph,
    CustomLossInput,
    CustomLossNode,
    ForwardBackwardInput,
    ForwardBackwardOutput,
    GetInfoRequest,
    LoraConfig,
    LossFnType,
    OptimStepRequest,
    OptimStepResponse,
)

__all__ = [
    "AdamOptimizerConfig", "AdamParams", "Checkpoint", "CheckpointArchiveUrlResponse", "CheckpointType",
    "CheckpointsListResponse", "CheckpointStorageUsage", "CheckpointStorageUsageResponse", "CreateCustomLossRequest",
    "CreateCustomLossResponse", "CreateModelRequest",
    "CreateSamplingSessionRequest", "CreateSamplingSessionResponse", "Cursor", "CustomLossGraph", "CustomLossInput",
    "CustomLossNode", "Datum", "EncodedTextChunk", "ExternalWeightsUrlsResponse", "ForwardBackwardInput",
    "ForwardBackwardOutput", "FutureRetrieveRequest", "GenericEvent", "GetInfoRequest", "ImageAssetPointerChunk",
    "ImageChunk", "LoadWeightsRequest", "LoadWeightsResponse", "LoraConfig", "LossFnType", "ModelInput",
    "ModelInputChunk", "OptimStepRequest", "OptimStepResponse", "ParsedCheckpointTinkerPath", "SampleRequest",
    "SampleResponse", "SampledSequence", "SamplingParams", "SaveWeightsExternalRequest",
    "SaveWeightsExternalResponse", "SaveWeightsForSamplerRequest", "SaveWeightsForSamplerResponse",
    "SaveWeightsRequest", "SaveWeightsResponse", "SessionEndEvent", "SessionStartEvent", "SetCheckpointTtlRequest",
    "Severity", "StopReason", "TelemetryBatch", "TelemetryEvent", "TelemetrySendRequest", "TensorData", "TensorDtype",
    "TrainingRun", "TrainingRunsResponse", "TryAgainResponse", "UnhandledExceptionEvent", "WeightsInfoRequest",
    "WeightsInfoResponse", "check_checkpoint_name"
]
