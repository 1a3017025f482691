"""The base class of every API type: strict about unknown fields, so a misspelt option fails loudly."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A pydantic model that rejects fields it does not declare.

    Tinker's field names start with `model_` in places (`model_id`, `model_input`), so pydantic's protected
    `model_` namespace is switched off.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True)


def refuse_unsupported(model: BaseModel, served: dict[str, object]) -> None:
    """A ValueError naming the first field of `served` that `model` sets to a value this server does not serve:
    fields the SDK sends whose other values are refused, never silently ignored. `served` maps each field to its
    one served value, or to a tuple of them (the SDK sends `False` where the wire default is `None`)."""
    for name, values in served.items():
        values = values if isinstance(values, tuple) else (values,)
        value = getattr(model, name)
        if value not in values:
            served_values = " or ".join(map(repr, values))
            raise ValueError(f"{name}={value!r} is not supported by this server (only {served_values})")
