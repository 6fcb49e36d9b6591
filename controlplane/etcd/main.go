// Command etcd is the etcd server at the release pinned in go.mod, for the tests' control plane
// (scripts/setup-controlplane.sh builds it).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
