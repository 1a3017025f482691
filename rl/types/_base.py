"""The base class of every API type: strict about unknown fields, so a misspelt option fails loudly."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A pydantic model that rejects fields it does not declare.

    Tinker's field names start with `model_` in places (`model_id`, `model_input`), so pydantic's protected
    `model_` namespace is switched off.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True)


def refuse_unsupported(model: BaseModel, defaults: dict[str, object]) -> None:
    """A ValueError naming the first field of `defaults` that `model` sets to anything but its default: fields the
    SDK sends whose other values this server does not serve (refused, never silently ignored)."""
    for name, default in defaults.items():
        value = getattr(model, name)
        if value != default:
            raise ValueError(f"{name}={value!r} is not supported by this server (only {default!r})")
