"""RL for mvlm: rollouts, rewards, advantages and the GRPO-family loss.

All but ``rollout/`` is plain tensor/Python code that knows nothing of the model or the trainer
(collectives only where a caller passes a process group), so the objective that drives it
(``mvlm/train/objectives/grpo.py``) and the tests share one implementation:

* ``advantages``  -- group-relative advantages (GRPO, RLOO, REINFORCE++), DAPO's dynamic sampling
                     and overlong filter;
* ``grpo_loss``   -- the per-token policy loss of the GRPO family, normalised by global counts,
                     with its metrics (KL, clipping, rollout/trainer mismatch);
* ``rewards``     -- the reward registry, ms-swift's built-ins and ``--external_plugins``;
* ``chord``       -- CHORD's mu schedule and expert SFT term;
* ``flags``       -- the algorithm/reward flags (ms-swift names) and the configs they build;
* ``rollout/``    -- the rollout-engine interface and engines.
"""
