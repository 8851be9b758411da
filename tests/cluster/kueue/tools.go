//go:build tools

// Package tools pins the Kueue controller build.sh builds, so that `go mod tidy` keeps its dependencies in go.sum.
package tools

import (
	_ "sigs.k8s.io/kueue/cmd/kueue"
)
