"""Publishing a round's adapter: the router publisher, the promotion gate (held-out figures, gate prompts) and the
resume from the promoted version after a held-back round."""
