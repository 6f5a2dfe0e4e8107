"""Settings of the Gradio console (`ui/`)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class UISettings(BaseModel):
    """Where the console listens and how it logs people in."""

    host: str = Field("127.0.0.1", description="Console bind address; beyond 127.0.0.1 a login is required.")
    port: int = Field(7860, ge=0, le=65535, description="Console port.")
