"""Rollouts: the ``Rollout`` batch, the backends that produce it (the lean decode loop, Hugging Face ``generate``,
multi-turn tool episodes, vLLM) and the sampler that runs them for a policy."""
