"""CoreDNS, the child process: launch, output, memory limit and OOM accounting."""
