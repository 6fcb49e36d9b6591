"""The Corefile: parsed, rendered from the template and the kube-dns ConfigMap."""
