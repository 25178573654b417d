# OpenBao's server configuration for the reference 3-node raft cluster (statefulset.yaml). One
# file for every pod: each pod's node_id, api_addr and cluster_addr come from the environment
# (BAO_RAFT_NODE_ID, BAO_API_ADDR, BAO_CLUSTER_ADDR), set from the pod's name.
# The same shape the HA tests run on loopback (devstack/cluster.py): integrated raft storage,
# retry_join to every peer, auto-unseal.

storage "raft" {
  path = "/openbao/data"

  retry_join {
    leader_api_addr     = "https://openbao-0.openbao-internal.openbao.svc:8200"
    leader_ca_cert_file = "/openbao/tls/ca.crt"
  }
  retry_join {
    leader_api_addr     = "https://openbao-1.openbao-internal.openbao.svc:8200"
    leader_ca_cert_file = "/openbao/tls/ca.crt"
  }
  retry_join {
    leader_api_addr     = "https://openbao-2.openbao-internal.openbao.svc:8200"
    leader_ca_cert_file = "/openbao/tls/ca.crt"
  }
}

listener "tcp" {
  address         = "[::]:8200"
  cluster_address = "[::]:8201"
  tls_cert_file   = "/openbao/tls/tls.crt"
  tls_key_file    = "/openbao/tls/tls.key"
  tls_min_version = "tls12"
  # Prometheus scrapes /v1/sys/metrics without a token.
  telemetry {
    unauthenticated_metrics_access = true
  }
}

# Auto-unseal, so that a restarted pod rejoins without an operator: the static seal with a key
# from the Secret `openbao-seal-key` (32 random bytes). With a cloud KMS, replace this stanza
# with its seal (awskms, gcpckms, azurekeyvault, transit) and drop the Secret.
seal "static" {
  current_key_id = "k1"
  current_key    = "file:///openbao/seal/key"
}

telemetry {
  prometheus_retention_time = "30s"
  disable_hostname          = true
}

ui            = false
disable_mlock = true
