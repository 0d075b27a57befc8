"""Where KV blocks below the device pool are kept: host memory (host.py) and files (disk.py),
driven by the tier policy's moves (mover.py). The only part of kv/ that touches torch."""
