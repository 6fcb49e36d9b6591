"""What the agent tells the world: logs, metrics, the status file, sd_notify."""
