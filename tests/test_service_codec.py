"""The protobuf codec against the Tinker SDK's own converters: what the SDK sends we decode exactly, and what we
encode the SDK decodes to the same values."""

import math

import numpy as np
import pytest
import tinker.types as sdk
from tinker.proto import tinker_public_pb2 as pb
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

import rl.types as T
from rl.service.codec import (
    decode_forward_backward,
    decode_tensor,
    encode_forward_backward_output,
    encode_sample_response,
)


def sdk_body(data: list, loss_fn: str = "ppo", loss_fn_config: dict | None = None, forward_only: bool = False,
             model_id: str = "run-7", seq_id: int = 3) -> bytes:
    batch = sdk.ForwardBackwardInput(data=data, loss_fn=loss_fn, loss_fn_config=loss_fn_config)
    message = forward_backward_request_to_proto(
        sdk.ForwardBackwardRequest(forward_backward_input=batch, model_id=model_id, seq_id=seq_id))
    message.forward_only = forward_only  # as tinker.resources.training sets it
    return message.SerializeToString()


def test_sdk_request_decodes_exactly():
    weights = [1.0, -0.5, 0.0, 2.5e-3]
    sparse = sdk.TensorData(data=np.array([0.75, -1.5, 4.0], dtype=np.float32), dtype="float32", shape=[3, 4],
                            sparse_crow_indices=[0, 2, 2, 3], sparse_col_indices=[1, 3, 0])
    data = [
        sdk.Datum(model_input=sdk.ModelInput(chunks=[sdk.EncodedTextChunk(tokens=[151643, 7, 0]),
                                                     sdk.EncodedTextChunk(tokens=[42])]),
                  loss_fn_inputs={"target_tokens": sdk.TensorData(data=[7, 0, 42, 2**40], dtype="int64"),
                                  "weights": sdk.TensorData(data=weights, dtype="float32", shape=[4])}),
        sdk.Datum(model_input=sdk.ModelInput.from_ints([5, 6, 7]), loss_fn_inputs={"advantages": sparse}),
    ]
    body = sdk_body(data, loss_fn_config={"clip_low_threshold": 0.8, "clip_high_threshold": 1.25, "mode": "seq"},
                    forward_only=True)

    model_id, seq_id, batch, forward_only = decode_forward_backward(body)

    assert (model_id, seq_id, forward_only) == ("run-7", 3, True)
    assert batch.loss_fn == "ppo"
    assert batch.loss_fn_config == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.25, "mode": "seq"}
    first, second = batch.data
    assert first.model_input.to_ints() == [151643, 7, 0, 42]
    assert len(first.model_input.chunks) == 2
    assert first.loss_fn_inputs["target_tokens"] == T.TensorData(data=[7, 0, 42, 2**40], dtype="int64", shape=[4])
    assert first.loss_fn_inputs["weights"] == T.TensorData(data=[float(np.float32(w)) for w in weights],
                                                           dtype="float32", shape=[4])
    assert second.model_input.to_ints() == [5, 6, 7]
    advantages = second.loss_fn_inputs["advantages"]
    assert advantages.sparse_crow_indices == [0, 2, 2, 3]
    assert advantages.sparse_col_indices == [1, 3, 0]
    assert advantages.tolist() == [[0.0, 0.75, 0.0, -1.5], [0.0] * 4, [4.0, 0.0, 0.0, 0.0]]


def test_legacy_float_config_and_no_config():
    datum = sdk.Datum(model_input=sdk.ModelInput.from_ints([1]), loss_fn_inputs={})
    message = pb.ForwardBackwardRequest.FromString(sdk_body([datum], loss_fn="cross_entropy"))
    assert decode_forward_backward(message.SerializeToString())[2].loss_fn_config is None
    message.loss_fn_config["beta"] = 0.25  # an old client writes only the float map
    _, seq_id, batch, forward_only = decode_forward_backward(message.SerializeToString())
    assert batch.loss_fn_config == {"beta": 0.25}
    assert (seq_id, forward_only, batch.loss_fn) == (3, False, "cross_entropy")


def test_narrow_and_half_width_dtypes_widen():
    int32 = pb.Tensor(dense=np.array([3, -1], dtype="<i4").tobytes(), dtype=pb.DTYPE_INT32, shape=[2])
    # bfloat16 keeps the upper 16 bits of a float32; these values are exact in it.
    bf16 = (np.array([1.5, -2.0, 0.0, 96.0], dtype="<f4").view("<u4") >> 16).astype("<u2")
    bfloat16 = pb.Tensor(dense=bf16.tobytes(), dtype=pb.DTYPE_BFLOAT16, shape=[2, 2])
    assert decode_tensor(int32, "x") == T.TensorData(data=[3, -1], dtype="int64", shape=[2])
    assert decode_tensor(bfloat16, "x") == T.TensorData(data=[1.5, -2.0, 0.0, 96.0], dtype="float32", shape=[2, 2])


def test_garbage_body_is_a_value_error():
    with pytest.raises(ValueError, match="not a serialized ForwardBackwardRequest"):
        decode_forward_backward(b"\xff\xff\xff\xff")


def datum_with_weights(tensor: pb.Tensor) -> pb.Datum:
    datum = pb.Datum(model_input=[pb.Chunk(encoded_text=pb.EncodedTextChunk(tokens=np.array([1, 2], "<i4").tobytes()))])
    datum.loss_fn_inputs["weights"].CopyFrom(tensor)
    return datum


@pytest.mark.parametrize(("tensor", "problem"), [
    (pb.Tensor(dense=np.zeros(3, "<f4").tobytes(), dtype=pb.DTYPE_FLOAT32, shape=[2, 2]), "3 values but shape"),
    (pb.Tensor(dense=b"\x00" * 6, dtype=pb.DTYPE_FLOAT32, shape=[2]), "6 bytes is not a whole number"),
    (pb.Tensor(dense=b"", dtype=pb.DTYPE_UNSPECIFIED), "unsupported dtype"),
])
def test_malformed_tensor_names_datum_and_field(tensor: pb.Tensor, problem: str):
    good = datum_with_weights(pb.Tensor(dense=np.ones(2, "<f4").tobytes(), dtype=pb.DTYPE_FLOAT32, shape=[2]))
    body = pb.ForwardBackwardRequest(model_id="m", loss_fn="ppo", data=[good, good, datum_with_weights(tensor)])
    with pytest.raises(ValueError, match=r"^data\[2\]\.loss_fn_inputs\['weights'\]: .*" + problem):
        decode_forward_backward(body.SerializeToString())


def test_image_chunk_is_refused_by_name():
    data = [sdk.Datum(model_input=sdk.ModelInput(chunks=[sdk.EncodedTextChunk(tokens=[1]),
                                                         sdk.ImageChunk(data=b"\x89PNG", format="png")]))]
    with pytest.raises(ValueError, match=r"^data\[0\]\.model_input: image chunks are not supported"):
        decode_forward_backward(sdk_body(data))


def test_forward_backward_output_decodes_in_the_sdk():
    logprobs = [[-0.5, -1.25, -3.0], [], [-0.125]]
    topk = np.arange(12, dtype=np.float32).reshape(2, 2, 3) - 5.5  # two datums of [T=2, K=3]
    output = T.ForwardBackwardOutput(
        loss_fn_outputs=[{"logprobs": T.TensorData(data=values, dtype="float32"),
                          "topk": T.TensorData.from_numpy(topk[min(index, 1)]),
                          "ids": T.TensorData(data=[index, 2**40], dtype="int64")}
                         for index, values in enumerate(logprobs)],
        metrics={"loss:sum": 1.2345678901234, "dpo_accuracy:mean": 0.5})

    decoded = deserialize_forward_backward_output(encode_forward_backward_output(output))

    assert decoded.loss_fn_output_type == "ArrayRecord"
    assert decoded.metrics == {"loss:sum": 1.2345678901234, "dpo_accuracy:mean": 0.5}
    assert len(decoded.loss_fn_outputs) == 3
    for index, outputs in enumerate(decoded.loss_fn_outputs):
        assert outputs["logprobs"].dtype == "float32"
        assert outputs["logprobs"].shape == [len(logprobs[index])]
        assert outputs["logprobs"].data == logprobs[index]
        assert outputs["topk"].shape == [2, 3]
        assert outputs["topk"].data == topk[min(index, 1)].reshape(-1).tolist()
        assert (outputs["ids"].dtype, outputs["ids"].data) == ("int64", [index, 2**40])


def test_forward_backward_output_wire_layout():
    output = T.ForwardBackwardOutput(loss_fn_outputs=[{"logprobs": T.TensorData(data=[-1.0, -2.0], dtype="float32")},
                                                      {"logprobs": T.TensorData(data=[-3.0], dtype="float32")}])
    message = pb.ForwardBackwardOutput.FromString(encode_forward_backward_output(output))
    (record,) = message.loss_fn_outputs
    batched = record.fields["logprobs"]
    assert record.num_datums == 2
    assert np.frombuffer(batched.offsets, "<i8").tolist() == [0, 8, 12]  # bytes, not elements
    assert np.frombuffer(batched.data, "<f4").tolist() == [-1.0, -2.0, -3.0]
    assert (batched.dtype, list(batched.trailing_shape)) == (pb.DTYPE_FLOAT32, [])


def test_forward_backward_output_refuses_ragged_fields():
    ragged = T.ForwardBackwardOutput(loss_fn_outputs=[{"logprobs": T.TensorData(data=[-1.0], dtype="float32")}, {}])
    with pytest.raises(ValueError, match="'logprobs' is missing from some datums"):
        encode_forward_backward_output(ragged)
    mixed = T.ForwardBackwardOutput(loss_fn_outputs=[{"x": T.TensorData(data=[1], dtype="int64")},
                                                     {"x": T.TensorData(data=[1.5], dtype="float32")}])
    with pytest.raises(ValueError, match="'x' output must share one dtype"):
        encode_forward_backward_output(mixed)


def test_sample_response_decodes_in_the_sdk():
    response = T.SampleResponse(
        sequences=[T.SampledSequence(stop_reason="stop", tokens=[5, 151643], logprobs=[-0.25, -1.5]),
                   T.SampledSequence(stop_reason="length", tokens=[9, 8, 7])],
        prompt_logprobs=[None, -2.5, -0.75],
        topk_prompt_logprobs=[None, [(3, -0.5), (0, -1.0)], [(11, -0.25)]],
        model_path="tinker://run-1/sampler_weights/step-2")

    decoded = deserialize_sample_response(encode_sample_response(response))

    first, second = decoded.sequences
    assert (first.stop_reason, first.tokens, first.logprobs) == ("stop", [5, 151643], [-0.25, -1.5])
    assert (second.stop_reason, second.tokens, second.logprobs) == ("length", [9, 8, 7], None)
    assert decoded.prompt_logprobs == [None, -2.5, -0.75]
    assert decoded.topk_prompt_logprobs == [None, [(3, -0.5), (0, -1.0)], [(11, -0.25)]]
    assert decoded.topk_prompt_logprobs_np.token_ids.tolist() == [[0, 0], [3, 0], [11, 0]]
    assert decoded.topk_prompt_logprobs_np.logprobs[2].tolist() == [-0.25, -99999.0]


def test_sample_response_without_prompt_logprobs():
    response = T.SampleResponse(sequences=[T.SampledSequence(stop_reason="length", tokens=[1], logprobs=[-0.1])])
    message = pb.SampleResponse.FromString(encode_sample_response(response))
    assert not message.HasField("prompt_logprobs")
    assert not message.HasField("topk_prompt_logprobs")
    decoded = deserialize_sample_response(encode_sample_response(response))
    assert decoded.prompt_logprobs is None and decoded.topk_prompt_logprobs is None
    assert math.isclose(decoded.sequences[0].logprobs[0], -0.1, rel_tol=1e-6)
