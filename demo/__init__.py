"""The demos: the real agent in a sandbox node (`make demo`) and on a real single-node cluster
(`make demo-cluster`)."""
