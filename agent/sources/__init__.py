"""Where the configuration comes from, watched: a mounted directory and the Kubernetes API."""
