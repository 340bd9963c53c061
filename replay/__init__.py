"""The replay service: trajectory schema, msgpack codec and ReplayService."""
