"""Tensor parallelism's groundwork: the rank group (group.py) and the sharding of the layers
(layers/parallel.py). Size 1 never touches torch.distributed."""
