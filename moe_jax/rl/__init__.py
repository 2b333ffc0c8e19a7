"""Reinforcement learning: the policy's log-probs, GRPO losses, rewards, the GRPO step and loop."""
