"""Rollout actors: environment construction and the RolloutActor."""
