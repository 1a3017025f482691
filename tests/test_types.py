"""The API types: JSON round trips, documented behaviour, and validation errors that name their field."""

from datetime import UTC, datetime

import numpy as np
import pytest
import torch
from pydantic import BaseModel, ValidationError

import rl.types as T

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
CHECKPOINT = T.Checkpoint(checkpoint_id="weights/step-2", checkpoint_type="training", time=NOW,
                          tinker_path="tinker://run-1/weights/step-2", size_bytes=1234)
EVENT = {"event_id": "e1", "event_session_index": 0, "severity": "INFO", "timestamp": NOW}
DATUM = T.Datum(model_input=T.ModelInput.from_ints([1, 2, 3]),
                loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [0.0, 1.0, -0.5]})

EXAMPLES: list[BaseModel] = [
    T.AdamParams(learning_rate=3e-4, weight_decay=0.01, grad_clip_norm=1.0),
    T.AdamOptimizerConfig(),
    T.OptimStepRequest(model_id="s:train:0", adam_params=T.AdamParams(learning_rate=1e-3), seq_id=2),
    T.OptimStepResponse(metrics={"grad_norm:mean": 0.5}),
    T.GetInfoRequest(model_id="s:train:0"),
    T.WeightsInfoRequest(tinker_path="tinker://s:train:0/weights/step-2"),
    T.EncodedTextChunk(tokens=[5, 6]),
    T.ImageChunk(data=b"\x89PNG\x00\xff", format="png", expected_tokens=4),
    T.ImageAssetPointerChunk(format="jpeg", location="s3://bucket/cat.jpg", expected_tokens=3),
    T.ModelInput(chunks=[T.EncodedTextChunk(tokens=[1]), T.ImageChunk(data=b"x", format="png",
                                                                         expected_tokens=2)]),
    T.TensorData(data=[1.5, -2.0, 0.25, 4.0], dtype="float32", shape=[2, 2]),
    T.TensorData(data=[7, 9], dtype="int64", shape=[2, 3], sparse_crow_indices=[0, 1, 2],
                 sparse_col_indices=[2, 0]),
    DATUM,
    T.ForwardBackwardInput(data=[DATUM], loss_fn="ppo", loss_fn_config={"clip_low_threshold": 0.8}),
    T.ForwardBackwardOutput(loss_fn_outputs=[{"logprobs": T.TensorData(data=[-0.5], dtype="float32")}],
                            metrics={"loss:sum": 1.25}),
    T.SamplingParams(max_tokens=16, seed=3, stop=["\n"], temperature=0.7, top_k=20, top_p=0.9),
    T.SampleRequest(num_samples=4, prompt=T.ModelInput.from_ints([1, 2]), sampling_params=T.SamplingParams(),
                    sampling_session_id="s:sample:0", seq_id=0, prompt_logprobs=True, topk_prompt_logprobs=2),
    T.SampledSequence(stop_reason="stop", tokens=[4, 5], logprobs=[-0.1, -2.0]),
    T.SampleResponse(sequences=[T.SampledSequence(stop_reason="length", tokens=[1], logprobs=[-0.3])],
                     prompt_logprobs=[None, -1.5], topk_prompt_logprobs=[None, [(3, -0.2), (9, -1.7)]],
                     model_path="tinker://r/sampler_weights/s", content_hash="ab12"),
    T.LoraConfig(rank=8, seed=0, train_unembed=False),
    T.CreateModelRequest(session_id="s", model_seq_id=0, base_model="tiny", lora_config=T.LoraConfig(rank=4)),
    T.SaveWeightsRequest(model_id="s:train:0", path="step-2", seq_id=3, ttl_seconds=3600, user_metadata={"a": "b"}),
    T.SetCheckpointTtlRequest(ttl_seconds=7200),
    T.SaveWeightsExternalRequest(model_id="s:train:0", path="export", seq_id=6, ttl_seconds=3600),
    T.SaveWeightsExternalResponse(path="tinker://s:train:0/external_weights/export", size_bytes=1024),
    T.ExternalWeightsUrlsResponse(urls={"adapter_config.json": "http://127.0.0.1:8000/api/v1/external_files/x.y"},
                                  expires=NOW),
    T.CreateCustomLossRequest(session_id="s", custom_loss_seq_id=0, name="mean_logprob",
                              inputs=[T.CustomLossInput(name="logprobs", rank=1)],
                              graph=T.CustomLossGraph(nodes=[
                                  T.CustomLossNode(op="placeholder", name="logprobs", target="logprobs"),
                                  T.CustomLossNode(op="call_method", name="mean", target="mean",
                                                   args=[{"ref": "logprobs"}]),
                                  T.CustomLossNode(op="output", name="output", target="output",
                                                   args=[{"tuple": [{"ref": "mean"}, {"dict": {}}]}])])),
    T.CreateCustomLossResponse(loss_id="s:loss:0"),
    T.CustomLossInput(name="advantages", rank=1),
    T.CustomLossNode(op="call_function", name="exp", target="torch.exp", args=[{"ref": "logprobs"}]),
    T.CustomLossGraph(nodes=[T.CustomLossNode(op="output", name="output", target="output", args=[None])]),
    T.SaveWeightsResponse(path="tinker://s:train:0/weights/step-2"),
    T.SaveWeightsForSamplerRequest(model_id="s:train:0", sampling_session_seq_id=1, seq_id=4),
    T.SaveWeightsForSamplerResponse(path="tinker://s:train:0/sampler_weights/step-2"),
    T.LoadWeightsRequest(path="tinker://s:train:0/weights/step-2", optimizer=True, model_id="s:train:0",
                         seq_id=5),
    T.LoadWeightsResponse(path="tinker://s:train:0/weights/step-2", model_id="s:train:1"),
    CHECKPOINT,
    T.ParsedCheckpointTinkerPath.from_tinker_path("tinker://run-1/sampler_weights/final"),
    T.CheckpointsListResponse(checkpoints=[CHECKPOINT], cursor=T.Cursor(offset=0, limit=10, total_count=1)),
    STORAGE_USAGE := T.CheckpointStorageUsage(org_user_urn="user-0", checkpoint_count=2, size_bytes=3_000_000,
                                              size_gigabytes=0.003),
    T.CheckpointStorageUsageResponse(data=[STORAGE_USAGE]),
    T.CheckpointArchiveUrlResponse(url="file:///tmp/ckpt.tar", expires=NOW),
    T.Cursor(offset=20, limit=10, total_count=25),
    T.TrainingRun(training_run_id="run-1", base_model="tiny", model_owner="tml-alice", lora_rank=8,
                  last_request_time=NOW, last_checkpoint=CHECKPOINT),
    T.TrainingRunsResponse(training_runs=[], cursor=T.Cursor(offset=0, limit=10, total_count=0)),
    T.WeightsInfoResponse(base_model="tiny", lora_rank=8, train_mlp=True),
    T.CreateSamplingSessionRequest(session_id="s", sampling_session_seq_id=0, base_model="tiny"),
    T.CreateSamplingSessionResponse(sampling_session_id="s:sample:0"),
    T.FutureRetrieveRequest(request_id="r1"),
    T.TryAgainResponse(request_id="r1"),
    T.SessionStartEvent(**EVENT),
    T.SessionEndEvent(**EVENT, duration="PT5S"),
    T.UnhandledExceptionEvent(**EVENT, error_type="ValueError", error_message="bad", traceback="..."),
    T.GenericEvent(**EVENT, event_name="step", event_data={"n": 1}),
    T.TelemetrySendRequest(events=[T.SessionStartEvent(**EVENT), T.GenericEvent(**EVENT, event_name="x")],
                           platform="linux", sdk_version="0.38.0", session_id="s", process_uuid="u"),
    T.TelemetryBatch(events=[], platform="linux", sdk_version="0.38.0", session_id="s", process_uuid="u"),
]


def sdk_wire(request) -> dict:
    """A request as the tinker SDK puts it on the wire (its resources' model_dump settings)."""
    return request.model_dump(exclude_unset=False, exclude_none=True, mode="json")


def test_what_the_sdk_sends_validates_as_our_request_types():
    import tinker.types as sdk

    prompt = sdk.ModelInput.from_ints([1, 2])
    sent = [
        (T.CreateModelRequest, sdk.CreateModelRequest(session_id="s", model_seq_id=0, base_model="tiny",
                                                      lora_config=sdk.LoraConfig(rank=4, seed=1))),
        (T.GetInfoRequest, sdk.GetInfoRequest(model_id="s:train:0")),
        (T.OptimStepRequest, sdk.OptimStepRequest(model_id="s:train:0", seq_id=2,
                                                  optim_params=sdk.AdamParams(learning_rate=1e-3))),
        (T.SaveWeightsRequest, sdk.SaveWeightsRequest(model_id="s:train:0", path="a", seq_id=3)),
        (T.SaveWeightsForSamplerRequest, sdk.SaveWeightsForSamplerRequest(model_id="s:train:0", path="b", seq_id=4)),
        (T.SaveWeightsForSamplerRequest, sdk.SaveWeightsForSamplerRequest(model_id="s:train:0", seq_id=5,
                                                                          sampling_session_seq_id=0)),
        (T.LoadWeightsRequest, sdk.LoadWeightsRequest(path="tinker://s:train:0/weights/a", optimizer=True,
                                                      session_id="s", model_seq_id=1)),
        (T.CreateSamplingSessionRequest, sdk.CreateSamplingSessionRequest(session_id="s", sampling_session_seq_id=0,
                                                                          base_model="tiny")),
        (T.SampleRequest, sdk.SampleRequest(prompt=prompt, num_samples=2, sampling_session_id="s:sample:0", seq_id=0,
                                            sampling_params=sdk.SamplingParams(max_tokens=4, temperature=0.5))),
        # the SDK's SamplingClient sends record_stability_info=False where the wire default is None
        (T.SampleRequest, sdk.SampleRequest(prompt=prompt, sampling_params=sdk.SamplingParams(max_tokens=4),
                                            base_model="tiny", record_stability_info=False)),
        (T.FutureRetrieveRequest, sdk.FutureRetrieveRequest(request_id="r1")),
    ]
    for ours, request in sent:
        wire = sdk_wire(request)
        validated = ours.model_validate(wire)
        assert validated.model_dump(mode="json", exclude_none=True) == wire, ours.__name__
    assert T.OptimStepRequest.model_validate(sdk_wire(sent[2][1])).adam_params.learning_rate == 1e-3


@pytest.mark.parametrize(("request_type", "payload", "field"), [
    (T.SaveWeightsForSamplerRequest, {"model_id": "m", "path": "p", "kind": "inflight"}, "kind='inflight'"),
    (T.LoadWeightsRequest, {"path": "p", "optimizer": False, "model_id": "m", "weights_access_token": "t"},
     "weights_access_token"),
    (T.SaveWeightsExternalRequest, {"model_id": "m", "path": "p", "age_encryption_recipients": ["age1x"]},
     "age_encryption_recipients"),
    (T.SampleRequest, {"prompt": {"chunks": []}, "sampling_params": {}, "prompt_alt_tokens_k": 3},
     "prompt_alt_tokens_k=3"),
    (T.SampleRequest, {"prompt": {"chunks": []}, "sampling_params": {}, "prompt_logprobs_last_n": 2},
     "prompt_logprobs_last_n needs prompt_logprobs=True"),
    (T.SampleRequest, {"prompt": {"chunks": []}, "sampling_params": {}, "record_stability_info": True},
     "record_stability_info=True"),
    (T.OptimStepRequest, {"model_id": "m", "optimizer_params": {}}, "adam_params"),
])
def test_sdk_options_not_served_are_refused_by_name(request_type, payload, field):
    with pytest.raises(ValidationError, match=field):
        request_type.model_validate(payload)


def test_every_exported_model_has_an_example():
    exported = {name for name in T.__all__ if isinstance(getattr(T, name), type)
                and issubclass(getattr(T, name), BaseModel)}
    assert exported == {type(example).__name__ for example in EXAMPLES}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda example: type(example).__name__)
def test_json_round_trip(example: BaseModel):
    text = example.model_dump_json()
    again = type(example).model_validate_json(text)
    assert again == example
    assert again.model_dump_json() == text


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda example: type(example).__name__)
def test_unknown_fields_are_rejected(example: BaseModel):
    payload = example.model_dump(mode="json") | {"no_such_field": 1}
    with pytest.raises(ValidationError, match="no_such_field"):
        type(example).model_validate(payload)


def test_image_bytes_travel_as_base64():
    chunk = T.ImageChunk(data=b"\x00\x01\xff", format="png", expected_tokens=1)
    assert chunk.model_dump(mode="json")["data"] == "AAH/"
    assert T.ImageChunk.model_validate({"data": "AAH/", "format": "png"}).data == b"\x00\x01\xff"
    with pytest.raises(ValueError, match="expected_tokens"):
        _ = T.ImageChunk(data=b"x", format="png").length


def test_model_input_methods():
    empty = T.ModelInput.empty()
    assert empty.length == 0 and empty.to_ints() == []
    grown = empty.append(T.EncodedTextChunk(tokens=[4, 5])).append_int(6)
    assert grown.to_ints() == [4, 5, 6] and grown.length == 3
    assert empty.chunks == [], "append returns a new ModelInput"
    assert T.ModelInput.from_ints([7, 8]).chunks == [T.EncodedTextChunk(tokens=[7, 8])]
    with_image = grown.append(T.ImageChunk(data=b"x", format="png", expected_tokens=5))
    assert with_image.length == 8
    with pytest.raises(ValueError, match=r"chunks\[2\] is a image chunk"):
        with_image.to_ints()


def test_tensor_data_conversions():
    array = np.arange(6, dtype=np.float64).reshape(2, 3)
    data = T.TensorData.from_numpy(array)
    assert (data.dtype, data.shape, data.data) == ("float32", [2, 3], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    assert data.to_numpy().dtype == np.float32 and np.array_equal(data.to_numpy(), array)
    tensor = torch.tensor([[1, 2], [3, 4]], dtype=torch.int32)
    converted = T.TensorData.from_torch(tensor)
    assert converted.dtype == "int64" and converted.to_torch().dtype == torch.int64
    assert torch.equal(converted.to_torch(), tensor.long())
    bf16 = T.TensorData.from_torch(torch.tensor([0.5, -1.25], dtype=torch.bfloat16))
    assert bf16.dtype == "float32" and bf16.tolist() == [0.5, -1.25]
    assert T.TensorData(data=[1, 2, 3], dtype="int64").shape == [3], "a missing shape is inferred as 1-D"
    with pytest.raises(ValueError, match="bool"):
        T.TensorData.from_torch(torch.tensor([True]))


def test_sparse_tensor_densifies():
    sparse = T.TensorData(data=[7.0, 9.0], dtype="float32", shape=[2, 3], sparse_crow_indices=[0, 1, 2],
                          sparse_col_indices=[2, 0])
    assert sparse.tolist() == [[0.0, 0.0, 7.0], [9.0, 0.0, 0.0]]
    assert np.array_equal(sparse.to_numpy(), sparse.to_torch().numpy())


def test_datum_converts_arrays_on_construction():
    datum = T.Datum(model_input=T.ModelInput.from_ints([1, 2]), loss_fn_inputs={
        "target_tokens": torch.tensor([2, 3]), "weights": np.array([1.0, 0.5]), "advantages": [1, 2],
        "ref_logprobs": np.array([-1.0, -2.0], dtype=np.float64), "custom": [3, 4],
    })
    inputs = datum.loss_fn_inputs
    assert all(isinstance(value, T.TensorData) for value in inputs.values())
    assert inputs["target_tokens"].dtype == "int64" and inputs["target_tokens"].data == [2, 3]
    assert inputs["advantages"].dtype == "float32", "advantages are floats even when given as ints"
    assert inputs["ref_logprobs"].dtype == "float32"
    assert inputs["custom"].dtype == "int64", "an input of no fixed meaning keeps the kind of its values"
    with pytest.raises(ValueError, match="weights"):
        T.Datum(model_input=T.ModelInput.from_ints([1]), loss_fn_inputs={"weights": [[1.0], [2.0, 3.0]]})


def test_next_token_datum_shifts_tokens_and_per_token_inputs_together():
    datum = T.Datum.next_token([10, 11, 12, 13], weights=[0.0, 0.0, 1.0, 1.0], advantages=[9.0, 0.5, 0.5, 0.5])
    assert datum.model_input.to_ints() == [10, 11, 12]
    assert datum.loss_fn_inputs["target_tokens"].data == [11, 12, 13]
    assert datum.loss_fn_inputs["weights"].data == [0.0, 1.0, 1.0], "the weight of token t scores its prediction"
    assert datum.loss_fn_inputs["advantages"].data == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="weights has 3 values for 4 tokens"):
        T.Datum.next_token([10, 11, 12, 13], weights=[1.0, 1.0, 1.0])


def test_tinker_paths():
    parsed = T.ParsedCheckpointTinkerPath.from_tinker_path("tinker://s:train:0/weights/step-10")
    assert (parsed.training_run_id, parsed.checkpoint_type, parsed.checkpoint_id, parsed.name) == (
        "s:train:0", "training", "weights/step-10", "step-10")
    sampler = T.ParsedCheckpointTinkerPath.from_tinker_path("tinker://r/sampler_weights/final")
    assert sampler.checkpoint_type == "sampler"
    for bad in ["tinker://r/weights", "tinker://r/other/x", "http://r/weights/x", "tinker://r/weights/a/b",
                "tinker:///weights/x", "tinker://r/weights/../x"]:
        with pytest.raises(ValueError, match="not a checkpoint path|checkpoint name"):
            T.ParsedCheckpointTinkerPath.from_tinker_path(bad)


def test_adam_defaults_match_tinker():
    params = T.AdamParams()
    assert (params.learning_rate, params.beta1, params.beta2, params.eps, params.weight_decay,
            params.grad_clip_norm) == (1e-4, 0.9, 0.95, 1e-12, 0.0, 0.0)


INVALID = [
    (T.AdamParams, {"learning_rate": -1.0}, "learning_rate"),
    (T.AdamParams, {"beta1": 1.0}, "beta1"),
    (T.AdamParams, {"eps": 0.0}, "eps"),
    (T.AdamParams, {"grad_clip_norm": "lots"}, "grad_clip_norm"),
    (T.LoraConfig, {"rank": 0}, "rank"),
    (T.EncodedTextChunk, {"tokens": [1, -2]}, "tokens"),
    (T.ImageChunk, {"data": "not base64!", "format": "png"}, "data"),
    (T.ImageChunk, {"data": "AA==", "format": "gif"}, "format"),
    (T.TensorData, {"data": [1, 2, 3], "dtype": "float32", "shape": [2, 2]}, "shape"),
    (T.TensorData, {"data": [1.5], "dtype": "int64"}, "int64"),
    (T.TensorData, {"data": [1.0], "dtype": "float16"}, "dtype"),
    (T.TensorData, {"data": [1.0], "dtype": "float32", "shape": [1, 2], "sparse_crow_indices": [0, 1],
                    "sparse_col_indices": [2]}, "sparse_col_indices"),
    (T.ForwardBackwardInput, {"data": [], "loss_fn": "mse"}, "loss_fn"),
    (T.SamplingParams, {"max_tokens": 0}, "max_tokens"),
    (T.SamplingParams, {"temperature": -0.1}, "temperature"),
    (T.SamplingParams, {"top_k": 0}, "top_k"),
    (T.SamplingParams, {"top_p": 1.5}, "top_p"),
    (T.SampleRequest, {"prompt": {"chunks": []}, "sampling_params": {}, "num_samples": 0}, "num_samples"),
    (T.SampleRequest, {"prompt": {"chunks": []}, "sampling_params": {}, "sampling_session_id": "s"}, "seq_id"),
    (T.SaveWeightsForSamplerRequest, {"model_id": "m"}, "sampling_session_seq_id"),
    (T.LoadWeightsRequest, {"path": "p", "optimizer": True}, "model_id"),
    (T.LoadWeightsRequest, {"path": "p", "optimizer": True, "session_id": "s"}, "model_seq_id"),
    (T.CreateSamplingSessionRequest, {"session_id": "s", "sampling_session_seq_id": 0}, "base_model"),
    (T.Cursor, {"offset": -1, "limit": 1, "total_count": 1}, "offset"),
    (T.Checkpoint, {"checkpoint_id": "x", "checkpoint_type": "full", "time": NOW, "tinker_path": "p"},
     "checkpoint_type"),
    (T.GenericEvent, {**EVENT, "severity": "LOUD", "event_name": "x"}, "severity"),
]


@pytest.mark.parametrize(("model", "payload", "field"), INVALID,
                         ids=[f"{model.__name__}-{field}" for model, _, field in INVALID])
def test_validation_errors_name_their_field(model, payload, field):
    with pytest.raises(ValidationError) as raised:
        model.model_validate(payload)
    assert field in str(raised.value)
