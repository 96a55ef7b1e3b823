"""RL pieces that do not depend on the trainer: advantages, the GRPO-family loss, rewards.

Everything here is plain tensor/Python code (no process groups, no model), so the objective that
drives it (``mvlm/train/objectives/grpo.py``) and the tests share one implementation:

* ``advantages``  -- group-relative advantages (GRPO, RLOO, REINFORCE++), DAPO's dynamic sampling
                     and overlong filter;
* ``grpo_loss``   -- the per-token policy loss of the GRPO family, normalised by global counts,
                     with its metrics (KL, clipping, rollout/trainer mismatch);
* ``rewards``     -- the reward registry, ms-swift's built-ins and ``--external_plugins``;
* ``chord``       -- CHORD's mu schedule and expert SFT term;
* ``flags``       -- the algorithm/reward flags (ms-swift names) and the configs they build;
* ``rollout/``    -- the rollout-engine interface and engines.
"""
