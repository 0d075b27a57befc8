"""Validation of SamplingParams and EngineConfig: errors name the field and the range."""

import pytest

from tokenmill.config import CacheConfig, EngineConfig
from tokenmill.sampling_params import SamplingParams


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_k": -2}, "top_k"),
        ({"n": 0}, "n"),
        ({"min_p": 2.0}, "min_p"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logprobs": 21}, "logprobs"),
        ({"stop": [""]}, "stop"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ],
)
def test_invalid_sampling_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field} "):
        SamplingParams(**kwargs)


def test_stop_normalized_and_child_seeds():
    p = SamplingParams(stop="END", n=3, seed=10, temperature=0.7)
    assert p.stop_strings == ["END"]
    assert [p.for_child(i).seed for i in range(3)] == [10, 11, 12]
    assert p.for_child(1).temperature == 0.7 and p.for_child(1).n == 1


def test_engine_config_routes_and_rejects_unknown():
    cfg = EngineConfig.from_kwargs(model="m", block_size=32, max_num_seqs=3, dtype="float32")
    assert cfg.cache.block_size == 32 and cfg.scheduler.max_num_seqs == 3
    assert cfg.model.dtype == "float32"
    with pytest.raises(TypeError, match="unknown engine option 'blocksize'"):
        EngineConfig.from_kwargs(blocksize=32)


def test_cache_config_validation():
    with pytest.raises(ValueError, match="block_size"):
        CacheConfig(block_size=12)
    with pytest.raises(ValueError, match="kv_cache_memory"):
        CacheConfig(kv_cache_memory=0)


def test_no_placeholder_for_the_derived_max_model_len():
    """Without chunked prefill the budget must cover max_model_len, which is known only once
    the model is: the config accepts it, the scheduler checks it against the real length."""
    from tokenmill.config import EngineConfig
    from tokenmill.engine.scheduler import Scheduler
    from tokenmill.kv.manager import KVCacheManager

    cfg = EngineConfig.from_kwargs(
        enable_chunked_prefill=False, max_num_batched_tokens=1024, max_model_len=512
    )
    assert cfg.model.max_model_len == 512
    kv = KVCacheManager(64, 16)
    Scheduler(cfg.scheduler, kv, max_model_len=512)  # fits
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(cfg.scheduler, kv, max_model_len=2048)


def test_serve_config_validates_and_the_cli_is_generated_from_it():
    from tokenmill.cli import build_parser, serve_config
    from tokenmill.config import ServeConfig

    args = build_parser().parse_args(
        [
            "serve",
            "--port",
            "9",
            "--api-key",
            "a=1",
            "--api-key",
            "2",
            "--max-waiting",
            "3",
            "--no-engine-process",
        ]
    )
    opts = serve_config(args)
    assert opts == ServeConfig(port=9, api_key=("a=1", "2"), max_waiting=3, engine_process=False)
    for bad in ({"port": 70000}, {"grace_period": -1}, {"max_waiting": -2}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServeConfig(**bad)
