"""One machine carved into isolated slices: the MIG profile tables and CPU topology
(profiles.py, gpus.toml), slice strings (slices.py) and the pure planner (planner.py) behind
`tokenmill partition list | plan`."""
