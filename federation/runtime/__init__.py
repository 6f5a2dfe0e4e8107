"""The running federation: the coordinator (sessions, round runner, recorder, status server), the silo agent, the
service entry points, checkpoints and the run bookkeeping around them."""
