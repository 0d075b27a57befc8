def executor_for(config, loaded=None):
    """The executor `config.parallel` asks for: the worker in this process (one rank, `uni`,
    the default), one process per rank (`mp`), or one Ray actor per rank (`ray`)."""
    p = config.parallel
    if p.distributed_executor_backend == "ray":
        if loaded is not None:
            raise ValueError("a loaded model cannot be handed to Ray actors")
        from tokenmill.executor.ray_executor import RayExecutor

        return RayExecutor(config)
    if p.distributed_executor_backend == "mp" or p.world_size > 1:
        if loaded is not None:
            raise ValueError("a loaded model cannot be handed to ranks in other processes")
        from tokenmill.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor(config)
    from tokenmill.executor.uniproc import UniprocExecutor

    return UniprocExecutor(config, loaded)
