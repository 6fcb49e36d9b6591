// Command coredns is CoreDNS at the release pinned in go.mod (image/coredns.version) with only the plugins a
// node-local Corefile uses: the image's default CoreDNS (image/Dockerfile, COREDNS_PLUGINS=node). This is
// CoreDNS's documented way to build with a chosen plugin set: a main package that imports coremain and the
// plugins and sets dnsserver.Directives (the order in which a query passes the plugins). scripts/setup.sh
// builds it (CGO_ENABLED=0, -trimpath, fixed -ldflags) into /usr/local/bin/coredns-node; docs/image.md tells
// why these plugins, what it saves, and how to build the image with every plugin instead.
//
// The one list is `directives` below; each entry's import follows. A Corefile naming any other plugin is
// refused by the agent before CoreDNS sees it (agent/corefile/plugins.py).
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	// What node-cache 1.26.7 compiles in (kubernetes/dns cmd/node-cache/main.go; its binary links these
	// packages), so a node-local-dns ConfigMap written for node-cache runs here unchanged (and back, for a
	// rollback by image swap).
	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/bufsize"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/debug"
	_ "github.com/coredns/coredns/plugin/dns64"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/hosts"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/metrics"
	_ "github.com/coredns/coredns/plugin/pprof"
	_ "github.com/coredns/coredns/plugin/reload"
	_ "github.com/coredns/coredns/plugin/rewrite"
	_ "github.com/coredns/coredns/plugin/template"
	_ "github.com/coredns/coredns/plugin/trace"
	_ "github.com/coredns/coredns/plugin/whoami"

	// What the agent renders besides: `ready` for the readiness probe (node-cache has none; the agent adds it).
	_ "github.com/coredns/coredns/plugin/ready"

	// What operators put in node-local Corefiles beyond node-cache's set, each small (no client library):
	// acl (who may ask what, e.g. refusing a query type) and any (RFC 8482 answers to ANY queries).
	_ "github.com/coredns/coredns/plugin/acl"
	_ "github.com/coredns/coredns/plugin/any"

	// Linked in anyway (forward imports dnstap; log, rewrite and template import metadata), as in node-cache,
	// and listed by `coredns -plugins`, which the agent checks a Corefile against: so directives too, free.
	_ "github.com/coredns/coredns/plugin/dnstap"
	_ "github.com/coredns/coredns/plugin/metadata"
)

// directives: CoreDNS v1.14.7's own directive order (plugin.cfg, core/dnsserver/zdirectives.go) restricted to
// the plugins imported above. Directive names, not packages: `prometheus` is plugin/metrics.
// tests/integration/test_coredns_node_build.py fails when this drifts from CoreDNS's order or the imports.
var directives = []string{
	"metadata",
	"reload",
	"bufsize",
	"bind",
	"debug",
	"trace",
	"ready",
	"health",
	"pprof",
	"prometheus",
	"errors",
	"log",
	"dnstap",
	"dns64",
	"any",
	"loadbalance",
	"rewrite",
	"acl",
	"cache",
	"template",
	"hosts",
	"loop",
	"forward",
	"whoami",
}

func init() {
	dnsserver.Directives = directives
}

func main() {
	coremain.Run()
}
