"""Hardware profiles: the machine as a value (hardware.py) and the engine configuration chosen
for a model on it, with the candidates and reasons (choose.py); `tokenmill profiles list` and
`--profile` on serve / generate."""
