"""What builds sandboxes, clusters, control planes, containers and load for the tests, benchmarks
and demos."""
