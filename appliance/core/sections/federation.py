"""Settings of the federation (`federation/`): coordinator and silo."""

from __future__ import annotations

from pydantic import BaseModel, Field


class FederationSettings(BaseModel):
    """Coordinator and silo defaults; `appliance coordinator start` / `appliance silo join` flags override them."""

    bind_host: str = Field("127.0.0.1", description="Interface the coordinator's ZeroMQ ROUTER binds to.")
    port: int = Field(5555, ge=0, le=65535, description="Coordinator ZeroMQ port (0 = any free port).")
    status_port: int = Field(5556, ge=0, le=65535, description="Coordinator HTTP status port (0 = any free port).")
    plaintext: bool = Field(False, description="Disable CURVE encryption; only for tests, must be asked for explicitly.")
    run_name: str = Field("federation", description="Name of the federation run; global adapters are published as NAME-latest.")
    rounds: int = Field(10, ge=1, description="Rounds to run.")
    strategy: str = Field("fedavg", description="fedavg | fedprox | fedavgm | fedadam | fedyogi | median | trimmed_mean | krum | multikrum.")
    min_silos: int = Field(2, ge=1, description="Answers needed for a round to count.")
    round_deadline_s: float = Field(600.0, gt=0, description="Seconds a round waits for updates.")
    local_steps: int = Field(50, ge=1, description="Optimizer steps each silo trains per round.")
    max_message_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="Largest message accepted on the socket.")
    heartbeat_interval_s: float = Field(5.0, gt=0, description="Silo heartbeat period.")
    auto_publish: bool = Field(True, description="Publish each round's global adapter to the router as soon as it is checkpointed.")
