"""The base of every settings section: a misspelt key is an error that names it, never a silent default."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A settings section that refuses unknown keys."""

    model_config = ConfigDict(extra="forbid")
