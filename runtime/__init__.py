"""Process plumbing and hardening: channels, the coordinator, checkpoints, input checks. You need not read it to learn
OPD."""
