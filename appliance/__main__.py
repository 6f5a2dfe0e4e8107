"""`python -m fedllm.appliance` = the `appliance` command (how `appliance up` starts its children with the same
interpreter)."""

from fedllm.appliance.cli import app

app(prog_name="appliance")
