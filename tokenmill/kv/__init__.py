"""The paged KV cache's bookkeeping: physical blocks (block_pool) and per-request tables (manager)."""

from tokenmill.kv.block_pool import BlockPool
from tokenmill.kv.manager import KVCacheManager

__all__ = ["BlockPool", "KVCacheManager"]
