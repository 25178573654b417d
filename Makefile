# Two commands for a new user (see README): `make dev` runs the dev stack, `make test` runs every check.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
# The proto as last released (the commit of the last landed stop): buf breaking checks against it.
PROTO_RELEASE := ed6606c
# The deploy kit's offline checkers, each pinned: a venv of their own (checkov pins many
# packages), and the CRD schemas of cert-manager and the Prometheus operator from npm.
DEPLOY_TOOLS := .tools/deploy-venv/bin
CHECKOV_VERSION := 3.3.30
KUBERNETES_VALIDATE_VERSION := 1.37.0
CRD_MODELS := .tools/node_modules/@kubernetes-models/prometheus-operator

.PHONY: dev dev-ha dev-postgres test check lint typecheck proto proto-check buf-lint buf-breaking unit clean system-tools deploy-check k8s-rules

# The SDK (sdk/, its own distribution) and the broker with its dev extra, both editable.
$(BIN)/python: pyproject.toml sdk/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ./sdk -e '.[dev]'
	touch $(BIN)/python

$(BUF):
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@$(BUF_VERSION)

## Run the dev stack: OpenBao, the broker over mTLS, the catalog reading through it. Ctrl-C stops it.
dev: $(BIN)/python
	$(BIN)/python -m devstack

## The same with a 3-node OpenBao raft cluster and two broker replicas (kill a node and watch).
dev-ha: $(BIN)/python
	$(BIN)/python -m devstack --ha

## The catalog on PostgreSQL, one user per broker issued by OpenBao's database engine (rotate: a new one).
dev-postgres: $(BIN)/python
	$(BIN)/python -m devstack --postgres

## Every check CI runs: generated code fresh, buf lint, ruff, mypy --strict, the deploy kit, then the test suite.
test: system-tools proto-check buf-lint buf-breaking lint typecheck deploy-check
	@# The 3-minute certificate soak mostly waits: it runs beside the rest, its report after.
	@$(BIN)/python -m pytest -m soak -p no:cacheprovider > .soak.log 2>&1 & soak=$$!; \
	$(BIN)/python -m pytest -m "not soak"; suite=$$?; \
	wait $$soak; soaked=$$?; echo "--- the soak (pytest -m soak), run beside the suite:"; \
	cat .soak.log; rm -f .soak.log; test $$suite -eq 0 && test $$soaked -eq 0

## The fast loop for development (under 5 minutes): ruff, mypy --strict, and every test not
## marked soak, ha or slow. `make test` runs them all.
check: $(BIN)/python lint typecheck
	$(BIN)/python -m pytest -m "not soak and not ha and not slow"

## npm (buf), promtool and prometheus, PostgreSQL's server binaries: present, or a clear message.
system-tools:
	@.ci/check-system-tools

## Regenerate the Python code from proto/ into sdk/secretbroker/v1/.
proto: $(BIN)/python
	$(BIN)/python proto/generate.py

## Fail when the checked-in generated code differs from a fresh generation.
proto-check: proto
	@git diff --exit-code --stat -- sdk/secretbroker/v1 || (echo "generated code in sdk/secretbroker/v1/ is stale: run 'make proto' and commit" && exit 1)
	@test -z "$$(git status --porcelain --untracked-files=all -- sdk/secretbroker/v1)" || (git status --short -- sdk/secretbroker/v1; echo "untracked generated files in sdk/secretbroker/v1/" && exit 1)

$(DEPLOY_TOOLS)/checkov:
	$(PYTHON) -m venv .tools/deploy-venv
	$(DEPLOY_TOOLS)/python -m pip install --quiet checkov==$(CHECKOV_VERSION) kubernetes-validate==$(KUBERNETES_VALIDATE_VERSION)

$(CRD_MODELS):
	npm install --silent --no-audit --no-fund --prefix .tools @kubernetes-models/cert-manager@6.0.0 @kubernetes-models/prometheus-operator@6.0.0 yaml@2.9.1

## The Containerfile and the Kubernetes manifests, checked offline (deploy/check says how).
deploy-check: $(DEPLOY_TOOLS)/checkov $(CRD_MODELS)
	deploy/check

## Regenerate deploy/kubernetes/base/prometheusrule.yaml from deploy/prometheus/secretbroker-rules.yml.
k8s-rules: $(BIN)/python
	$(BIN)/python deploy/kubernetes/prometheusrule.py

buf-lint: $(BUF)
	$(BUF) lint

## The API contract stays wire-compatible with its last release (PROTO_RELEASE).
buf-breaking: $(BUF)
	@git cat-file -e $(PROTO_RELEASE)^{commit} 2>/dev/null || (echo "buf-breaking needs the git history (commit $(PROTO_RELEASE)): clone without --depth" && exit 1)
	@# buf clones only 50 commits back from HEAD unless told how deep the release lies
	$(BUF) breaking --against ".git#ref=$(PROTO_RELEASE),depth=$$(( $$(git rev-list --count $(PROTO_RELEASE)..HEAD) + 1 ))"

lint: $(BIN)/python
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(BIN)/python
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .tools .dev-stack .mypy_cache .ruff_cache .pytest_cache
