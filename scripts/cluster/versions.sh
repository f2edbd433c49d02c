# Pinned versions of the local control plane (scripts/cluster/*.sh and tests read them from here).
# Kubernetes v1.31.14 and v1.32.x cannot be built from the module proxy (staging modules refused or
# missing from the checksum database); KServe v0.21 is refused by the proxy. See docs/install.md.
KUBE_VERSION=v1.31.0
KSERVE_VERSION=v0.20.0
TRAINING_OPERATOR_VERSION=v1.9.4
KWOK_VERSION=v0.8.0
# The real node's DNS server and metrics API (Go modules; CoreDNS v1.15 requires Go 1.26).
COREDNS_VERSION=v1.15.0
METRICS_SERVER_VERSION=v0.8.0
# The etcd server comes from the Debian package of this name (3.4 on Debian 12).
ETCD_PACKAGE=etcd-server
