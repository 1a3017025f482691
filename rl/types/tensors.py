"""What a model reads: token chunks, tensors, and the datums that pair them for a loss.

`TensorData` is the one array type that crosses a boundary (Ray, HTTP); inside a component we convert it once
to a torch tensor. Dense tensors carry their values flattened in row-major order; 2-D tensors may instead arrive
as sparse CSR (the SDK sends soft `target_tokens`/`weights` that way), and are densified on conversion.
"""

from __future__ import annotations

import base64
import math
import sys
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import Field, NonNegativeInt, PositiveInt, field_serializer, field_validator, model_validator

from rl.types._base import StrictModel

# torch is imported where a tensor is made or read, not here: a process that only validates (rl-train refusing a
# configuration) does not wait ~1.6 s for it.
if TYPE_CHECKING:
    import torch

TensorDtype = Literal["int64", "float32"]

# The dtype a plain Python list becomes, for the loss inputs whose meaning fixes it.
LOSS_INPUT_DTYPES: dict[str, TensorDtype] = {
    "target_tokens": "int64",
    "weights": "float32",
    "advantages": "float32",
    "logprobs": "float32",
    "ref_logprobs": "float32",
    "clip_low_threshold": "float32",
    "clip_high_threshold": "float32",
    "sequence_ratio_mask": "float32",
}
_NUMPY_DTYPES: dict[TensorDtype, type] = {"int64": np.int64, "float32": np.float32}


class EncodedTextChunk(StrictModel):
    """A run of token ids."""

    tokens: list[NonNegativeInt]
    type: Literal["encoded_text"] = "encoded_text"

    @property
    def length(self) -> int:
        return len(self.tokens)


class _ImageBase(StrictModel):
    format: Literal["png", "jpeg"]
    expected_tokens: PositiveInt | None = None
    """How many tokens the image will occupy; needed to know the chunk's length before it is encoded."""

    @property
    def length(self) -> int:
        if self.expected_tokens is None:
            raise ValueError(f"{type(self).__name__}.expected_tokens must be set to know its length")
        return self.expected_tokens


class ImageChunk(_ImageBase):
    """An image given inline. Bytes in Python, base64 text in JSON."""

    data: bytes
    type: Literal["image"] = "image"

    @field_validator("data", mode="before")
    @classmethod
    def _decode_base64(cls, value: Any) -> Any:
        if isinstance(value, str):
            return base64.b64decode(value, validate=True)
        return value

    @field_serializer("data")
    def _encode_base64(self, value: bytes) -> str:
        return base64.b64encode(value).decode("ascii")


class ImageAssetPointerChunk(_ImageBase):
    """An image given by location (a path or URL) instead of its bytes."""

    location: str
    type: Literal["image_asset_pointer"] = "image_asset_pointer"


ModelInputChunk = Annotated[EncodedTextChunk | ImageChunk | ImageAssetPointerChunk, Field(discriminator="type")]


class ModelInput(StrictModel):
    """A model's input: a sequence of chunks. Immutable in use: `append` returns a new ModelInput."""

    chunks: list[ModelInputChunk]

    @classmethod
    def from_ints(cls, tokens: list[int]) -> ModelInput:
        return cls(chunks=[EncodedTextChunk(tokens=tokens)])

    @classmethod
    def empty(cls) -> ModelInput:
        return cls(chunks=[])

    def to_ints(self) -> list[int]:
        """All token ids, in order. Raises ValueError if any chunk is not text."""
        for index, chunk in enumerate(self.chunks):
            if not isinstance(chunk, EncodedTextChunk):
                raise ValueError(f"ModelInput.chunks[{index}] is a {chunk.type} chunk; to_ints needs text only")
        return [token for chunk in self.chunks for token in chunk.tokens]

    @property
    def length(self) -> int:
        return sum(chunk.length for chunk in self.chunks)

    def append(self, chunk: EncodedTextChunk | ImageChunk | ImageAssetPointerChunk) -> ModelInput:
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        return self.append(EncodedTextChunk(tokens=[token]))


class TensorData(StrictModel):
    """An int64 or float32 array: flattened values, a dtype and a shape (inferred as 1-D when absent)."""

    data: list[int] | list[float]
    dtype: TensorDtype
    shape: list[NonNegativeInt] | None = None
    sparse_crow_indices: list[NonNegativeInt] | None = None
    """CSR row pointers (length rows + 1). When set, `data` holds only the listed values; the rest are zero."""
    sparse_col_indices: list[NonNegativeInt] | None = None
    """CSR column indices, one per listed value."""

    @model_validator(mode="after")
    def _check_layout(self) -> TensorData:
        if self.dtype == "int64" and any(isinstance(value, float) for value in self.data):
            raise ValueError("an int64 tensor's data must be integers")
        if self.sparse_crow_indices is None and self.sparse_col_indices is None:
            if self.shape is None:
                self.__dict__["shape"] = [len(self.data)]
            elif math.prod(self.shape) != len(self.data):
                raise ValueError(f"data has {len(self.data)} values but shape {self.shape} needs "
                                 f"{math.prod(self.shape)}")
            return self
        if self.sparse_crow_indices is None or self.sparse_col_indices is None or self.shape is None:
            raise ValueError("a sparse tensor needs sparse_crow_indices, sparse_col_indices and shape together")
        if len(self.shape) != 2 or len(self.sparse_crow_indices) != self.shape[0] + 1:
            raise ValueError(f"sparse_crow_indices must have rows + 1 entries for a 2-D shape, got shape "
                             f"{self.shape} and {len(self.sparse_crow_indices)} row pointers")
        if not len(self.sparse_col_indices) == len(self.data) == self.sparse_crow_indices[-1]:
            raise ValueError("sparse_col_indices, data and the last row pointer must agree on the value count")
        if any(np.diff(self.sparse_crow_indices) < 0):
            raise ValueError("sparse_crow_indices must not decrease")
        if any(column >= self.shape[1] for column in self.sparse_col_indices):
            raise ValueError(f"sparse_col_indices must be below the column count {self.shape[1]}")
        return self

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> TensorData:
        if array.dtype.kind in "iu":
            dtype: TensorDtype = "int64"
        elif array.dtype.kind == "f":
            dtype = "float32"
        else:
            raise ValueError(f"TensorData holds integers or floats, not numpy dtype {array.dtype}")
        flat = np.ascontiguousarray(array, dtype=_NUMPY_DTYPES[dtype]).reshape(-1)
        return cls(data=flat.tolist(), dtype=dtype, shape=list(array.shape))

    @classmethod
    def from_torch(cls, tensor: torch.Tensor) -> TensorData:
        """bfloat16 and float16 widen to float32; bool is refused rather than guessed."""
        import torch

        if tensor.dtype == torch.bool or tensor.is_complex():
            raise ValueError(f"TensorData holds integers or floats, not torch dtype {tensor.dtype}")
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32)
        return cls.from_numpy(tensor.detach().cpu().numpy())

    def to_numpy(self) -> np.ndarray:
        values = np.asarray(self.data, dtype=_NUMPY_DTYPES[self.dtype])
        if self.sparse_crow_indices is None:
            return values.reshape(self.shape)
        dense = np.zeros(self.shape, dtype=values.dtype)
        rows = np.repeat(np.arange(self.shape[0]), np.diff(self.sparse_crow_indices))
        dense[rows, self.sparse_col_indices] = values
        return dense

    def to_torch(self) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.to_numpy())

    def tolist(self) -> list:
        return self.to_numpy().tolist()


def as_tensor_data(name: str, value: Any) -> Any:
    """Converts a torch tensor, numpy array or numeric list given for loss input `name` to TensorData.

    Lists take the dtype their input's meaning fixes (`target_tokens` are int64, `weights` float32, ...); a list
    for an input of no fixed meaning is int64 if all its values are integers, else float32. Anything else is
    returned unchanged for pydantic to validate.
    """
    torch = sys.modules.get("torch")  # a torch tensor exists only once torch is imported
    if torch is not None and isinstance(value, torch.Tensor):
        return TensorData.from_torch(value)
    if isinstance(value, np.ndarray):
        return TensorData.from_numpy(value)
    if isinstance(value, list | tuple):
        array = np.asarray(value)
        if array.dtype == object or array.dtype.kind not in "iuf":
            raise ValueError(f"loss_fn_inputs[{name!r}] must be a rectangular array of numbers")
        dtype = LOSS_INPUT_DTYPES.get(name, "int64" if array.dtype.kind in "iu" else "float32")
        return TensorData.from_numpy(array.astype(_NUMPY_DTYPES[dtype]))
    return value


class Datum(StrictModel):
    """One training example: the model's input and the per-token arrays its loss reads.

    `loss_fn_inputs` values may be given as TensorData, torch tensors, numpy arrays or lists; they are
    converted to TensorData on construction.
    """

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = Field(default_factory=dict)

    @field_validator("loss_fn_inputs", mode="before")
    @classmethod
    def _convert_arrays(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        return {name: as_tensor_data(name, array) for name, array in value.items()}

    @classmethod
    def next_token(cls, tokens_T: list[int], **per_token_T: list[float]) -> Datum:
        """A next-token datum: the model reads tokens_T[:-1] and each position is scored on the token after it.

        Each of `per_token_T` (weights, advantages, logprobs...) is given one value per token of tokens_T and
        shifted with the targets: the value of token t goes with the position that predicts it (the first
        token's value is dropped, as no position predicts it).
        """
        for name, values in per_token_T.items():
            if len(values) != len(tokens_T):
                raise ValueError(f"{name} has {len(values)} values for {len(tokens_T)} tokens")
        return cls(model_input=ModelInput.from_ints(tokens_T[:-1]),
                   loss_fn_inputs={"target_tokens": tokens_T[1:],
                                   **{name: values[1:] for name, values in per_token_T.items()}})
