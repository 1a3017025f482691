"""The base class of every API type: strict about unknown fields, so a misspelt option fails loudly."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A pydantic model that rejects fields it does not declare.

    Tinker's field names start with `model_` in places (`model_id`, `model_input`), so pydantic's protected
    `model_` namespace is switched off.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True)
