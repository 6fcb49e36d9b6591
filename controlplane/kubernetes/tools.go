//go:build tools

// Package tools pins the Kubernetes commands the tests run against (scripts/setup-controlplane.sh builds
// them from this module's go.mod and go.sum).
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
