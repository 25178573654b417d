"""The catalog API's request and response bodies: pydantic models, so that validation, the
errors that name a field, and the OpenAPI document all come from one declaration."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Kind = Literal["movie", "series", "episode", "documentary"]
Title = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=300)]


class MediaIn(BaseModel):
    """An item to add. Unknown fields are refused, not dropped."""

    model_config = ConfigDict(extra="forbid", strict=True)

    title: Title
    kind: Kind = "movie"
    year: Annotated[int, Field(ge=1870, le=2200)] | None = None


class Media(BaseModel):
    id: int
    title: str
    kind: str
    year: int | None
    created_by: str


class MediaList(BaseModel):
    items: list[Media]


class SecretStatus(BaseModel):
    version: int
    source: str
    stale: bool


class Health(BaseModel):
    status: Literal["ok"]
    secrets: dict[str, SecretStatus]


class Problem(BaseModel):
    """Every error answer: what is wrong, never a value of a secret or a token."""

    error: str
