//go:build tools

// Package tools pins the Kubernetes commands the tests run against (scripts/setup-controlplane.sh builds
// them from this module's go.mod and go.sum): the control plane, and the node components the cluster fixture
// (tests/cluster.py) runs.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
