"""Rollout engines: the interface (:mod:`.base`) and the built-in engine on the training model
(:mod:`.builtin`)."""
