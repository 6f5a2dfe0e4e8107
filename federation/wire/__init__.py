"""The wire: the message format (a JSON header frame + a safetensors payload frame), update compression, the ZeroMQ
transport and the CURVE keys. `payload` is the one entry point for encoding and decoding an adapter payload."""
