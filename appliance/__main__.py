"""`python -m appliance` = the `appliance` command (how `appliance up` starts its children with the same interpreter)."""

from appliance.cli import app

app(prog_name="appliance")
