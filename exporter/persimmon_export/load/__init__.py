"""Reading checkpoints: config.json, safetensors / torch files (never run), adept-inference conversion."""
