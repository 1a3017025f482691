"""The Tinker SDK's protobuf wire format, converted to and from our pydantic types.

The SDK sends forward_backward requests as protobuf and asks (`Accept: application/x-protobuf`) for
forward_backward and sampling results as protobuf, so the server must speak it on those routes. Arrays travel as raw
little-endian bytes plus a dtype and shape, which keeps large batches cheap to parse. The SDK's own converters
(`tinker.proto.request_conv`, `tinker.proto.response_conv`) are the other half of each conversion here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
from google.protobuf.message import DecodeError
from pydantic import ValidationError
from tinker.proto import tinker_public_pb2 as pb

from rl.types.sampling import SampledSequence, SampleResponse
from rl.types.tensors import Datum, EncodedTextChunk, ModelInput, TensorData, TensorDtype
from rl.types.training import ForwardBackwardInput, ForwardBackwardOutput

_INT32 = np.dtype("<i4")
_INT64 = np.dtype("<i8")
_FLOAT32 = np.dtype("<f4")
# Wire dtype -> (how its bytes read, our dtype). int32 and bfloat16 widen to our two dtypes.
_WIRE_DTYPES: dict[int, tuple[np.dtype, TensorDtype]] = {
    pb.DTYPE_FLOAT32: (_FLOAT32, "float32"),
    pb.DTYPE_INT64: (_INT64, "int64"),
    pb.DTYPE_INT32: (_INT32, "int64"),
    pb.DTYPE_BFLOAT16: (np.dtype("<u2"), "float32"),
}
_PROTO_DTYPES: dict[TensorDtype, int] = {"float32": pb.DTYPE_FLOAT32, "int64": pb.DTYPE_INT64}
_NUMPY_DTYPES: dict[TensorDtype, np.dtype] = {"float32": _FLOAT32, "int64": _INT64}
_STOP_REASONS = {"stop": pb.STOP_REASON_STOP, "length": pb.STOP_REASON_LENGTH}
# The SDK reads a top-k slot holding token 0 with this logprob as empty (tinker.types.topk_logprobs.MASK_LOGPROB).
_EMPTY_TOPK_LOGPROB = -99999.0


@contextmanager
def _located(where: str) -> Iterator[None]:
    """Names the place in the request a validation error came from, which pydantic cannot see from here."""
    try:
        yield
    except ValidationError as error:
        problems = "; ".join(problem["msg"].removeprefix("Value error, ") for problem in error.errors())
        raise ValueError(f"{where}: {problems}") from None


def _read(buffer: bytes, dtype: np.dtype, where: str) -> np.ndarray:
    if len(buffer) % dtype.itemsize:
        raise ValueError(f"{where}: {len(buffer)} bytes is not a whole number of {dtype.itemsize}-byte values")
    return np.frombuffer(buffer, dtype=dtype)


def decode_tensor(tensor_pb: pb.Tensor, where: str) -> TensorData:
    """A proto Tensor (dense or sparse CSR) as our TensorData; `where` prefixes any error message."""
    if tensor_pb.dtype not in _WIRE_DTYPES:
        raise ValueError(f"{where}: unsupported dtype {tensor_pb.dtype}")
    wire_dtype, dtype = _WIRE_DTYPES[tensor_pb.dtype]
    sparse = tensor_pb.HasField("sparse_csr")
    values = _read(tensor_pb.sparse_csr.values if sparse else tensor_pb.dense, wire_dtype, where)
    if tensor_pb.dtype == pb.DTYPE_BFLOAT16:
        # bfloat16 is the upper half of a float32.
        values = (values.astype(np.uint32) << 16).view(np.float32)
    crow = _read(tensor_pb.sparse_csr.crow_indices, _INT64, where).tolist() if sparse else None
    col = _read(tensor_pb.sparse_csr.col_indices, _INT64, where).tolist() if sparse else None
    with _located(where):
        # proto3 cannot tell an absent shape from [], and the SDK omits it for shapeless (1-D) tensors.
        return TensorData(data=values.tolist(), dtype=dtype, shape=list(tensor_pb.shape) or None,
                          sparse_crow_indices=crow, sparse_col_indices=col)


def _decode_model_input(chunks: Iterable[pb.Chunk], where: str) -> ModelInput:
    decoded = []
    for chunk in chunks:
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise ValueError(f"{where}: {kind or 'empty'} chunks are not supported, only encoded_text")
        with _located(where):
            decoded.append(EncodedTextChunk(tokens=_read(chunk.encoded_text.tokens, _INT32, where).tolist()))
    return ModelInput(chunks=decoded)


def _decode_datum(datum_pb: pb.Datum, where: str) -> Datum:
    inputs = {name: decode_tensor(tensor, f"{where}.loss_fn_inputs[{name!r}]")
              for name, tensor in datum_pb.loss_fn_inputs.items()}
    return Datum(model_input=_decode_model_input(datum_pb.model_input, f"{where}.model_input"), loss_fn_inputs=inputs)


def _decode_loss_fn_config(request: pb.ForwardBackwardRequest) -> dict[str, float | str] | None:
    # The SDK writes numbers to both maps and text only to v2, so v2 wins when present.
    config: dict[str, float | str] = {}
    for name, value in request.loss_fn_config_v2.items():
        kind = value.WhichOneof("value")
        if kind is None:
            raise ValueError(f"loss_fn_config_v2[{name!r}] has neither a number nor a text")
        config[name] = getattr(value, kind)
    return config or dict(request.loss_fn_config) or None


def decode_forward_backward(body: bytes) -> tuple[str, int, ForwardBackwardInput, bool]:
    """A serialized ForwardBackwardRequest as (model_id, seq_id, input, forward_only). Raises ValueError."""
    request = pb.ForwardBackwardRequest()
    try:
        request.ParseFromString(body)
    except DecodeError as error:
        raise ValueError(f"the body is not a serialized ForwardBackwardRequest: {error}") from None
    data = [_decode_datum(datum, f"data[{index}]") for index, datum in enumerate(request.data)]
    batch = ForwardBackwardInput(data=data, loss_fn=request.loss_fn, loss_fn_config=_decode_loss_fn_config(request))
    return request.model_id, request.seq_id, batch, request.forward_only


def _batch(name: str, tensors: list[TensorData]) -> pb.BatchedTensor:
    dtype = tensors[0].dtype
    arrays = [tensor.to_numpy().astype(_NUMPY_DTYPES[dtype]) for tensor in tensors]
    if len({tensor.dtype for tensor in tensors}) > 1 or len({array.shape[1:] for array in arrays}) > 1:
        raise ValueError(f"every datum's {name!r} output must share one dtype and one trailing shape")
    # Offsets count bytes, not elements: the SDK divides them by the item size.
    offsets = np.cumsum([0] + [array.nbytes for array in arrays], dtype=_INT64)
    return pb.BatchedTensor(data=b"".join(array.tobytes() for array in arrays), offsets=offsets.tobytes(),
                            dtype=_PROTO_DTYPES[dtype], trailing_shape=arrays[0].shape[1:])


def encode_forward_backward_output(output: ForwardBackwardOutput) -> bytes:
    """A serialized ForwardBackwardOutput: one ArrayRecord holding each output field batched over the datums."""
    outputs = output.loss_fn_outputs
    record = pb.ArrayRecord(num_datums=len(outputs))
    for name in dict.fromkeys(name for datum_outputs in outputs for name in datum_outputs):
        if any(name not in datum_outputs for datum_outputs in outputs):
            raise ValueError(f"output {name!r} is missing from some datums; the wire format needs it on all")
        record.fields[name].CopyFrom(_batch(name, [datum_outputs[name] for datum_outputs in outputs]))
    message = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", loss_fn_outputs=[record],
                                       metrics=output.metrics)
    return message.SerializeToString()


def _encode_topk(positions: list[list[tuple[int, float]] | None]) -> pb.TopkLogprobs:
    k = max((len(pairs) for pairs in positions if pairs), default=0)
    token_ids = np.zeros((len(positions), k), dtype=_INT32)
    logprobs = np.full((len(positions), k), _EMPTY_TOPK_LOGPROB, dtype=_FLOAT32)
    for row, pairs in enumerate(positions):
        if pairs:
            token_ids[row, :len(pairs)], logprobs[row, :len(pairs)] = zip(*pairs, strict=True)
    return pb.TopkLogprobs(token_ids=token_ids.tobytes(), logprobs=logprobs.tobytes(), k=k, length=len(positions))


def _encode_sequence(sequence: SampledSequence) -> pb.SampledSequence:
    message = pb.SampledSequence(stop_reason=_STOP_REASONS[sequence.stop_reason],
                                 tokens=np.asarray(sequence.tokens, dtype=_INT32).tobytes())
    if sequence.logprobs is not None:
        message.logprobs = np.asarray(sequence.logprobs, dtype=_FLOAT32).tobytes()
    if sequence.topk_logprobs is not None:
        message.topk_sampled_logprobs.CopyFrom(_encode_topk(sequence.topk_logprobs))
    return message


def encode_sample_response(response: SampleResponse) -> bytes:
    """A serialized SampleResponse. `model_path` and `content_hash` have no field on the wire and are dropped."""
    message = pb.SampleResponse(sequences=[_encode_sequence(sequence) for sequence in response.sequences])
    if response.prompt_logprobs is not None:
        # The SDK reads NaN as "no logprob here" (the first prompt token).
        prompt_logprobs = [math.nan if logprob is None else logprob for logprob in response.prompt_logprobs]
        message.prompt_logprobs = np.asarray(prompt_logprobs, dtype=_FLOAT32).tobytes()
    if response.topk_prompt_logprobs is not None:
        message.topk_prompt_logprobs.CopyFrom(_encode_topk(response.topk_prompt_logprobs))
    return message.SerializeToString()
