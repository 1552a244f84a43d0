#!/usr/bin/env bash
# Provide the test-infrastructure binaries (kube-apiserver, etcd, helm, and
# jaeger, the trace tests' OTLP endpoint) in a cache directory outside the
# repo, building them from the Go module proxy only when missing, and the
# Debian packages the tests use (strace, for the proof that a 250 follows an
# fsync; prometheus, whose server and promtool check the metrics and alert
# rules; unbound and ldnsutils, a validating resolver and the tools that
# sign the DANE tests' zone; iptables, for the nemesis's one-way and per-port
# cuts between test hosts; postfix, a submitting client and an older next hop
# in the DSN tests). A second run is instant; a cold one builds for
# minutes (jaeger alone took 6.5 min on 2 cores).
#
#   scripts/testbin.sh            # builds what is missing, prints the bin dir
#   BIN=$(scripts/testbin.sh | tail -n1)
#
# Everything is logged to stderr; the bin dir is the last line on stdout.
#
# Environment:
#   KURRIER_CACHE         cache root (default: $HOME/.cache/kurrier); binaries
#                         go to $KURRIER_CACHE/bin, scratch modules to
#                         $KURRIER_CACHE/src. Go's module and build caches stay
#                         in their default places.
#   KURRIER_KUBE_VERSION  k8s.io/kubernetes release (default below)
#   KURRIER_ETCD_VERSION  go.etcd.io/etcd/server/v3 release (default below)
#   KURRIER_HELM_VERSION  helm.sh/helm/v3 release (default below)
#   KURRIER_JAEGER_VERSION github.com/jaegertracing/jaeger release (default below)
#
# A binary is rebuilt when its recorded version differs from the requested one.
set -euo pipefail

KUBE_VERSION=${KURRIER_KUBE_VERSION:-v1.37.2}
ETCD_VERSION=${KURRIER_ETCD_VERSION:-v3.7.3}
HELM_VERSION=${KURRIER_HELM_VERSION:-v3.22.0}
JAEGER_VERSION=${KURRIER_JAEGER_VERSION:-v1.75.0}

CACHE=${KURRIER_CACHE:-$HOME/.cache/kurrier}
BIN=$CACHE/bin
SRC=$CACHE/src

log() { printf 'testbin: %s\n' "$*" >&2; }

# Is $BIN/$1 present, executable and built at version $2?
have() {
  [[ -x "$BIN/$1" && -f "$BIN/.$1.version" && "$(<"$BIN/.$1.version")" == "$2" ]]
}

# Record that $BIN/$1 was built at version $2.
stamp() { printf '%s\n' "$2" >"$BIN/.$1.version"; }

need_go() {
  command -v go >/dev/null 2>&1 || {
    log "the 'go' toolchain is required to build the test binaries"
    exit 1
  }
}

# Path of the go.mod of module $1 at version $2, downloading it if needed.
modfile() {
  local out
  out=$(go mod download -json "$1@$2")
  sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p' <<<"$out"
}

build_kube_apiserver() {
  local v=$KUBE_VERSION
  local staging=v0.${v#v1.} # v1.37.2 -> v0.37.2
  local dir=$SRC/kube-apiserver-$v
  local kmod
  kmod=$(modfile k8s.io/kubernetes "$v")
  [[ -n "$kmod" && -f "$kmod" ]] || {
    log "cannot find go.mod of k8s.io/kubernetes@$v"
    exit 1
  }

  rm -rf "$dir"
  mkdir -p "$dir"
  {
    echo "module kurrier.local/testbin/kubeapiserver"
    echo
    echo "go $(awk '$1 == "go" {print $2; exit}' "$kmod")"
    echo
    echo "require k8s.io/kubernetes $v"
    echo
    echo "replace ("
    # Staging modules are required as v0.0.0 and replaced by ./staging/...
    # in the kubernetes repo; map them to their published v0.X.Y instead.
    awk -v s="$staging" '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" {print "\t" $1 " => " $1 " " s}' \
      "$kmod" | sort -u
    echo ")"
  } >"$dir/go.mod"

  local major minor
  major=${v#v}
  major=${major%%.*}
  minor=${v#v*.}
  minor=${minor%%.*}
  local ldflags="-s -w"
  local pkg key val
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    for kv in "gitVersion=$v" "gitMajor=$major" "gitMinor=$minor" \
      "gitTreeState=clean" "buildDate=1970-01-01T00:00:00Z"; do
      key=${kv%%=*}
      val=${kv#*=}
      ldflags+=" -X $pkg.$key=$val"
    done
  done

  (
    cd "$dir"
    go get "k8s.io/kubernetes/cmd/kube-apiserver@$v" >&2
    CGO_ENABLED=0 go build -trimpath -ldflags="$ldflags" \
      -o "$BIN/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver >&2
  )
  mv -f "$BIN/kube-apiserver.tmp" "$BIN/kube-apiserver"
}

build_etcd() {
  local v=$ETCD_VERSION
  local dir=$SRC/etcd-$v
  rm -rf "$dir"
  mkdir -p "$dir"
  local emod
  emod=$(modfile go.etcd.io/etcd/server/v3 "$v")
  {
    echo "module kurrier.local/testbin/etcd"
    echo
    echo "go $(awk '$1 == "go" {print $2; exit}' "$emod")"
    echo
    echo "require go.etcd.io/etcd/server/v3 $v"
  } >"$dir/go.mod"
  (
    cd "$dir"
    go get "go.etcd.io/etcd/server/v3@$v" >&2
    CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" \
      -o "$BIN/etcd.tmp" go.etcd.io/etcd/server/v3 >&2
  )
  mv -f "$BIN/etcd.tmp" "$BIN/etcd"
}

build_helm() {
  local v=$HELM_VERSION
  local hmod kver kmajor kminor
  hmod=$(modfile helm.sh/helm/v3 "$v")
  # Helm's Makefile stamps the Kubernetes version its client libraries track.
  kver=$(awk '$1 == "k8s.io/client-go" {print $2; exit}' "$hmod") # v0.34.0
  kver=${kver#v0.}
  kmajor=1
  kminor=${kver%%.*}
  local ldflags="-s -w"
  ldflags+=" -X helm.sh/helm/v3/internal/version.version=$v"
  ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  if [[ -n "$kminor" ]]; then
    local p
    for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
      ldflags+=" -X $p.k8sVersionMajor=$kmajor -X $p.k8sVersionMinor=$kminor"
    done
  fi
  local tmp
  tmp=$(mktemp -d "$BIN/.helm.XXXXXX")
  GOBIN=$tmp CGO_ENABLED=0 go install -trimpath -ldflags="$ldflags" \
    "helm.sh/helm/v3/cmd/helm@$v" >&2
  mv -f "$tmp/helm" "$BIN/helm"
  rmdir "$tmp"
}

build_jaeger() {
  local v=$JAEGER_VERSION
  local dir=$SRC/jaeger-$v
  rm -rf "$dir"
  mkdir -p "$dir"
  local jmod
  jmod=$(modfile github.com/jaegertracing/jaeger "$v")
  # Jaeger's go.mod pins dependencies with replace directives, which apply only
  # in the main module (so `go install pkg@version` refuses it): carry them over.
  {
    echo "module kurrier.local/testbin/jaeger"
    echo
    echo "go $(awk '$1 == "go" {print $2; exit}' "$jmod")"
    echo
    echo "require github.com/jaegertracing/jaeger $v"
    echo
    grep '^replace ' "$jmod" || true
  } >"$dir/go.mod"
  (
    cd "$dir"
    go get "github.com/jaegertracing/jaeger/cmd/jaeger@$v" >&2
    CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" \
      -o "$BIN/jaeger.tmp" github.com/jaegertracing/jaeger/cmd/jaeger >&2
  )
  mv -f "$BIN/jaeger.tmp" "$BIN/jaeger"
}

# Build $1 with function $2 at version $3 unless it is already there.
ensure() {
  local name=$1 fn=$2 v=$3
  if have "$name" "$v"; then
    return
  fi
  need_go
  log "building $name $v (this can take a while on a cold cache)"
  local start=$SECONDS
  "$fn"
  stamp "$name" "$v"
  log "built $name $v in $((SECONDS - start))s"
}

# Install Debian package $1 unless command $2 is already there.
ensure_package() {
  local package=$1 command=$2
  command -v "$command" >/dev/null 2>&1 && return
  local sudo=""
  [[ $(id -u) -eq 0 ]] || sudo=sudo
  log "installing Debian package $package"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    "$package" >&2
}

# Postfix, asked to configure nothing: the tests run private instances of it
# (tests/support/postfix.py), never the system's.
ensure_postfix() {
  command -v postconf >/dev/null 2>&1 && return
  local sudo=""
  [[ $(id -u) -eq 0 ]] || sudo=sudo
  echo "postfix postfix/main_mailer_type select No configuration" | $sudo debconf-set-selections
  ensure_package postfix postconf
}

mkdir -p "$BIN" "$SRC"
# Serialise concurrent runs (parallel test workers, CI steps).
exec 9>"$CACHE/.lock"
flock 9

ensure kube-apiserver build_kube_apiserver "$KUBE_VERSION"
ensure etcd build_etcd "$ETCD_VERSION"
ensure helm build_helm "$HELM_VERSION"
ensure jaeger build_jaeger "$JAEGER_VERSION"
ensure_package strace strace
ensure_package prometheus promtool
ensure_package unbound unbound
ensure_package ldnsutils ldns-signzone
ensure_package iptables iptables
ensure_postfix

printf '%s\n' "$BIN"
