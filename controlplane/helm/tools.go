//go:build tools

// Package tools pins the helm command the chart tests run (scripts/setup-controlplane.sh builds it from this
// module's go.mod and go.sum).
package tools

import (
	_ "helm.sh/helm/v3/cmd/helm"
)
