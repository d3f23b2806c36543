"""shardqa: sharded, millisecond-latency extractive question answering."""
__version__ = "0.1.0"
