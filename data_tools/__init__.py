"""Tools that make and check datasets in the shard format."""
