// Checks the custom resources in rendered manifests against their CRDs' schemas, offline:
// cert-manager (Certificate, Issuer, ClusterIssuer) and the Prometheus operator (PodMonitor,
// PrometheusRule), from the @kubernetes-models packages (installed by `make deploy-check`).
// kubernetes-validate checks the built-in kinds; this fails on any other kind, so that every
// resource is checked by one of the two.
//   node deploy/kubernetes/validate-custom-resources.mjs RENDERED.yaml...
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";
import { Certificate, ClusterIssuer, Issuer } from "@kubernetes-models/cert-manager/cert-manager.io/v1";
import { PodMonitor, PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const custom = { Certificate, ClusterIssuer, Issuer, PodMonitor, PrometheusRule };
const builtIn = /^(v1|(apps|policy|batch|autoscaling|networking\.k8s\.io|rbac\.authorization\.k8s\.io)\/v\d+)$/;

let failed = 0;
for (const file of process.argv.slice(2)) {
  for (const document of parseAllDocuments(readFileSync(file, "utf8"))) {
    const resource = document.toJS();
    if (!resource) continue;
    const what = `${file}: ${resource.kind}/${resource.metadata?.name}`;
    const Model = custom[resource.kind];
    if (!Model) {
      if (!builtIn.test(resource.apiVersion)) {
        console.error(`${what}: no schema for ${resource.apiVersion} ${resource.kind}`);
        failed++;
      }
      continue;
    }
    try {
      new Model(resource).validate();
      console.log(`${what}: valid`);
    } catch (error) {
      console.error(`${what}: ${error.message}`);
      failed++;
    }
  }
}
process.exit(failed ? 1 : 0);
