"""Scale-out: the device mesh and sharding rules, expert parallelism, multi-host helpers, AOT compile."""
